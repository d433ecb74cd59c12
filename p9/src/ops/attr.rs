//! Attribute operations of 9P2000.L (diod `protocol.md`): getattr, setattr,
//! statfs.
//!
//! Getattr reports the host's stat (uid/gid unchanged, see the crate docs on
//! ownership). Setattr works on the fid's inode: chmod/truncate/utimes go
//! through `/proc/self/fd/N` for non-symlinks, symlink times through the
//! fid's checked location with `AT_SYMLINK_NOFOLLOW`.

use std::os::fd::AsFd;

use super::erofs;
use crate::server::Server;
use crate::wire::{getattr, setattr, Rgetattr, Rmessage, Rstatfs, Tsetattr};
use crate::{sys, Errno, Ownership};

impl Server {
    pub(super) fn getattr(&self, fid: u32, _mask: u64) -> Result<Rmessage<'static>, Errno> {
        let f = self.get(fid)?;
        let pf = f.path()?;
        let st = sys::fstat(pf.path_fd())?;
        Ok(Rmessage::Getattr(Box::new(Rgetattr {
            valid: getattr::BASIC,
            qid: self.qid(&st),
            mode: st.st_mode,
            uid: st.st_uid,
            gid: st.st_gid,
            nlink: st.st_nlink,
            rdev: st.st_rdev,
            size: st.st_size as u64,
            blksize: st.st_blksize as u64,
            blocks: st.st_blocks as u64,
            atime_sec: st.st_atime as u64,
            atime_nsec: st.st_atime_nsec as u64,
            mtime_sec: st.st_mtime as u64,
            mtime_nsec: st.st_mtime_nsec as u64,
            ctime_sec: st.st_ctime as u64,
            ctime_nsec: st.st_ctime_nsec as u64,
            ..Default::default()
        })))
    }

    pub(super) fn setattr(&self, fid: u32, a: &Tsetattr) -> Result<Rmessage<'static>, Errno> {
        if self.read_only {
            return Err(erofs());
        }
        let f = self.get(fid)?;
        let pf = f.path()?;
        let fd = pf.path_fd();
        if a.valid & setattr::MODE != 0 {
            if pf.is_symlink() {
                return Err(Errno(libc::EOPNOTSUPP));
            }
            sys::chmod_fd(fd, self.sanitize_mode(a.mode, pf.is_dir()))?;
        }
        if a.valid & (setattr::UID | setattr::GID) != 0 && self.ownership == Ownership::GuestIds {
            let uid = if a.valid & setattr::UID != 0 {
                a.uid
            } else {
                u32::MAX
            };
            let gid = if a.valid & setattr::GID != 0 {
                a.gid
            } else {
                u32::MAX
            };
            sys::chown_fd(fd, uid, gid)?;
        }
        if a.valid & setattr::SIZE != 0 {
            match pf.fmt {
                libc::S_IFREG => {}
                libc::S_IFDIR => return Err(Errno(libc::EISDIR)),
                _ => return Err(Errno(libc::EINVAL)),
            }
            match pf.open.get() {
                Some(open) if open.writable => sys::ftruncate(open.fd.as_fd(), a.size)?,
                _ => sys::truncate_fd(fd, a.size)?,
            }
        }
        if a.valid & (setattr::ATIME | setattr::MTIME) != 0 {
            let ts = |set: u32, given: u32, sec: u64, nsec: u64| {
                if a.valid & set == 0 {
                    libc::timespec {
                        tv_sec: 0,
                        tv_nsec: libc::UTIME_OMIT,
                    }
                } else if a.valid & given == 0 {
                    libc::timespec {
                        tv_sec: 0,
                        tv_nsec: libc::UTIME_NOW,
                    }
                } else {
                    libc::timespec {
                        tv_sec: sec as i64,
                        tv_nsec: nsec as i64,
                    }
                }
            };
            let times = [
                ts(
                    setattr::ATIME,
                    setattr::ATIME_SET,
                    a.atime_sec,
                    a.atime_nsec,
                ),
                ts(
                    setattr::MTIME,
                    setattr::MTIME_SET,
                    a.mtime_sec,
                    a.mtime_nsec,
                ),
            ];
            if pf.is_symlink() {
                let loc = pf.checked_loc()?;
                sys::utimensat(
                    std::os::fd::AsRawFd::as_raw_fd(&loc.parent.as_fd()),
                    &loc.name,
                    &times,
                    true,
                )?;
            } else {
                sys::utimensat(libc::AT_FDCWD, &sys::proc_path(fd), &times, false)?;
            }
        }
        // CTIME alone: the kernel updates ctime with any change; nothing to do.
        Ok(Rmessage::Setattr)
    }

    pub(super) fn statfs(&self, fid: u32) -> Result<Rmessage<'static>, Errno> {
        let f = self.get(fid)?;
        let pf = f.path()?;
        let s = sys::fstatfs(pf.path_fd())?;
        // SAFETY: fsid_t is two plain i32s; reading it as bytes is sound.
        let fsid: [i32; 2] = unsafe { std::mem::transmute(s.f_fsid) };
        Ok(Rmessage::Statfs(Rstatfs {
            ty: s.f_type as u32,
            bsize: s.f_bsize as u32,
            blocks: s.f_blocks,
            bfree: s.f_bfree,
            bavail: s.f_bavail,
            files: s.f_files,
            ffree: s.f_ffree,
            fsid: (fsid[0] as u32 as u64) | ((fsid[1] as u32 as u64) << 32),
            namelen: s.f_namelen as u32,
        }))
    }
}
