//! Name operations of 9P2000.L (diod `protocol.md`): symlink, mknod, mkdir,
//! rename, renameat, unlinkat, link, readlink.
//!
//! Every name is a single validated component and every call is an `*at`
//! call relative to a directory fid's `O_PATH` fd that never follows a final
//! symlink, so no operation can reach outside the export.

use std::ffi::CString;
use std::os::fd::AsFd;

use super::erofs;
use crate::fid::{self, Loc};
use crate::server::Server;
use crate::wire::{Rmessage, AT_REMOVEDIR};
use crate::{sys, Errno};

/// Longest symlink target (`PATH_MAX` minus the NUL).
const TARGET_MAX: usize = libc::PATH_MAX as usize - 1;

impl Server {
    pub(super) fn symlink(
        &self,
        dfid: u32,
        raw: &[u8],
        target: &[u8],
        gid: u32,
    ) -> Result<Rmessage<'static>, Errno> {
        if self.read_only {
            return Err(erofs());
        }
        let (f, dir) = self.dir_fid(dfid)?;
        let name = fid::name(raw)?;
        if target.is_empty() {
            return Err(Errno(libc::ENOENT));
        }
        if target.len() > TARGET_MAX {
            return Err(Errno(libc::ENAMETOOLONG));
        }
        // The target is stored as text only; it is never resolved on the host.
        let target = CString::new(target).map_err(|_| Errno(libc::EINVAL))?;
        sys::symlinkat(&target, dir.as_fd(), &name)?;
        let fd = sys::open_path_at(dir.as_fd(), &name)?;
        self.set_owner(fd.as_fd(), f.uid, gid);
        let st = sys::fstat(fd.as_fd())?;
        Ok(Rmessage::Symlink { qid: self.qid(&st) })
    }

    pub(super) fn mknod(
        &self,
        dfid: u32,
        raw: &[u8],
        mode: u32,
        major: u32,
        minor: u32,
        gid: u32,
    ) -> Result<Rmessage<'static>, Errno> {
        if self.read_only {
            return Err(erofs());
        }
        let (f, dir) = self.dir_fid(dfid)?;
        let name = fid::name(raw)?;
        let fmt = mode & libc::S_IFMT;
        match fmt {
            libc::S_IFREG | libc::S_IFIFO | libc::S_IFSOCK => {}
            // An overlayfs whiteout (0:0) cannot reach any host device.
            libc::S_IFCHR if major == 0 && minor == 0 => {}
            // A guest-made device node on the host would be a way out.
            libc::S_IFCHR | libc::S_IFBLK => return Err(Errno(libc::EPERM)),
            _ => return Err(Errno(libc::EINVAL)),
        }
        let perm = self.sanitize_mode(mode, false);
        let dev = libc::makedev(major, minor);
        sys::mknodat(dir.as_fd(), &name, fmt | perm, dev)?;
        let fd = sys::open_path_at(dir.as_fd(), &name)?;
        self.fix_mode(fd.as_fd(), perm, false)?;
        self.set_owner(fd.as_fd(), f.uid, gid);
        let st = sys::fstat(fd.as_fd())?;
        Ok(Rmessage::Mknod { qid: self.qid(&st) })
    }

    pub(super) fn mkdir(
        &self,
        dfid: u32,
        raw: &[u8],
        mode: u32,
        gid: u32,
    ) -> Result<Rmessage<'static>, Errno> {
        if self.read_only {
            return Err(erofs());
        }
        let (f, dir) = self.dir_fid(dfid)?;
        let name = fid::name(raw)?;
        let perm = self.sanitize_mode(mode, true);
        sys::mkdirat(dir.as_fd(), &name, perm)?;
        let fd = sys::open_path_at(dir.as_fd(), &name)?;
        self.fix_mode(fd.as_fd(), perm, false)?;
        self.set_owner(fd.as_fd(), f.uid, gid);
        let st = sys::fstat(fd.as_fd())?;
        Ok(Rmessage::Mkdir { qid: self.qid(&st) })
    }

    pub(super) fn rename(
        &self,
        fid: u32,
        dfid: u32,
        raw: &[u8],
    ) -> Result<Rmessage<'static>, Errno> {
        if self.read_only {
            return Err(erofs());
        }
        let f = self.get(fid)?;
        let pf = f.path()?;
        let (_, dir) = self.dir_fid(dfid)?;
        let name = fid::name(raw)?;
        let loc = pf.checked_loc()?;
        sys::renameat(loc.parent.as_fd(), &loc.name, dir.as_fd(), &name)?;
        pf.set_loc(Loc { parent: dir, name });
        Ok(Rmessage::Rename)
    }

    pub(super) fn renameat(
        &self,
        olddirfid: u32,
        oldname: &[u8],
        newdirfid: u32,
        newname: &[u8],
    ) -> Result<Rmessage<'static>, Errno> {
        if self.read_only {
            return Err(erofs());
        }
        let (_, olddir) = self.dir_fid(olddirfid)?;
        let (_, newdir) = self.dir_fid(newdirfid)?;
        let old = fid::name(oldname)?;
        let new = fid::name(newname)?;
        sys::renameat(olddir.as_fd(), &old, newdir.as_fd(), &new)?;
        Ok(Rmessage::Renameat)
    }

    pub(super) fn unlinkat(
        &self,
        dirfid: u32,
        raw: &[u8],
        flags: u32,
    ) -> Result<Rmessage<'static>, Errno> {
        if self.read_only {
            return Err(erofs());
        }
        let (_, dir) = self.dir_fid(dirfid)?;
        let name = fid::name(raw)?;
        let host = match flags {
            0 => 0,
            AT_REMOVEDIR => libc::AT_REMOVEDIR,
            _ => return Err(Errno(libc::EINVAL)),
        };
        sys::unlinkat(dir.as_fd(), &name, host)?;
        Ok(Rmessage::Unlinkat)
    }

    /// `Tlink`: the source is a fid, so it is always inside the export; the
    /// link is made from its checked location without following symlinks.
    pub(super) fn link(&self, dfid: u32, fid: u32, raw: &[u8]) -> Result<Rmessage<'static>, Errno> {
        if self.read_only {
            return Err(erofs());
        }
        let (_, dir) = self.dir_fid(dfid)?;
        let name = fid::name(raw)?;
        let f = self.get(fid)?;
        let pf = f.path()?;
        if pf.is_dir() {
            return Err(Errno(libc::EPERM));
        }
        let loc = pf.checked_loc()?;
        sys::linkat(loc.parent.as_fd(), &loc.name, dir.as_fd(), &name)?;
        Ok(Rmessage::Link)
    }

    pub(crate) fn readlink(&self, fid: u32) -> Result<Vec<u8>, Errno> {
        let f = self.get(fid)?;
        let pf = f.path()?;
        if !pf.is_symlink() {
            return Err(Errno(libc::EINVAL));
        }
        Ok(sys::readlink(pf.path_fd())?)
    }
}
