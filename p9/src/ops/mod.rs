//! File operations of 9P2000.L (diod `protocol.md`): open/create, I/O,
//! readdir, fsync, locks and read-only xattrs here; name operations in
//! `names`, attributes in `attr`.
//!
//! Each operation turns a decoded T-message into an R-message or an errno.
//! All I/O goes through the fid's own fds (`pread`/`pwrite` straight into and
//! out of the message buffers); nothing here resolves a path string.

mod attr;
mod names;

use std::ffi::CString;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;

use crate::fid::{self, Fid, FidKind, Loc, OpenFile, PathFid};
use crate::server::{finish_data, finish_data_with, Server};
use crate::wire::{
    self, lock, msg, oflags, Dirent, Qid, Rgetlock, Rmessage, Tgetlock, Tlock, Tmessage,
};
use crate::DirectIo;
use crate::{sys, Errno, Ownership};

/// `DT_*` values of `getdents64`.
const DT_DIR: u8 = 4;
const DT_LNK: u8 = 10;
/// Bytes in front of `d_name` in a `linux_dirent64`.
const DIRENT64_NAME_OFF: usize = 19;
/// Largest `getdents64` batch.
const DIRENT_BUF: usize = 64 << 10;

fn erofs() -> Errno {
    Errno(libc::EROFS)
}

/// Map 9P2000.L open flags to host flags, dropping those that make no sense
/// for the server (`O_CREAT`, `O_NOCTTY`, `O_ASYNC`, `O_DIRECT`, `O_NOATIME`,
/// `O_NONBLOCK`, `O_CLOEXEC`); returns `(flags, writable)`.
fn host_open_flags(flags: u32) -> Result<(i32, bool), Errno> {
    let (mut f, writable) = match flags & oflags::ACCMODE {
        oflags::RDONLY => (libc::O_RDONLY, false),
        oflags::WRONLY => (libc::O_WRONLY, true),
        oflags::RDWR => (libc::O_RDWR, true),
        _ => return Err(Errno(libc::EINVAL)),
    };
    for (p9, host) in [
        (oflags::TRUNC, libc::O_TRUNC),
        (oflags::APPEND, libc::O_APPEND),
        (oflags::DSYNC, libc::O_DSYNC),
        (oflags::SYNC, libc::O_SYNC),
        (oflags::DIRECTORY, libc::O_DIRECTORY),
        (oflags::LARGEFILE, libc::O_LARGEFILE),
    ] {
        if flags & p9 != 0 {
            f |= host;
        }
    }
    Ok((f, writable))
}

impl Server {
    /// Execute a file operation whose reply borrows nothing.
    pub(crate) fn file_op(&self, m: Tmessage<'_>) -> Result<Rmessage<'static>, Errno> {
        Ok(match m {
            Tmessage::Lopen { fid, flags } => self.lopen(fid, flags)?,
            Tmessage::Lcreate {
                fid,
                name,
                flags,
                mode,
                gid,
            } => self.lcreate(fid, name, flags, mode, gid)?,
            Tmessage::Write { fid, offset, data } => self.write(fid, offset, data)?,
            Tmessage::Remove { fid } => self.remove(fid)?,
            Tmessage::Statfs { fid } => self.statfs(fid)?,
            Tmessage::Getattr { fid, request_mask } => self.getattr(fid, request_mask)?,
            Tmessage::Setattr { fid, attr } => self.setattr(fid, &attr)?,
            Tmessage::Symlink {
                fid,
                name,
                target,
                gid,
            } => self.symlink(fid, name, target, gid)?,
            Tmessage::Mknod {
                dfid,
                name,
                mode,
                major,
                minor,
                gid,
            } => self.mknod(dfid, name, mode, major, minor, gid)?,
            Tmessage::Mkdir {
                dfid,
                name,
                mode,
                gid,
            } => self.mkdir(dfid, name, mode, gid)?,
            Tmessage::Rename { fid, dfid, name } => self.rename(fid, dfid, name)?,
            Tmessage::Renameat {
                olddirfid,
                oldname,
                newdirfid,
                newname,
            } => self.renameat(olddirfid, oldname, newdirfid, newname)?,
            Tmessage::Unlinkat {
                dirfid,
                name,
                flags,
            } => self.unlinkat(dirfid, name, flags)?,
            Tmessage::Link { dfid, fid, name } => self.link(dfid, fid, name)?,
            Tmessage::Fsync { fid, datasync } => self.fsync(fid, datasync)?,
            Tmessage::Lock { fid, lock } => self.lock(fid, &lock)?,
            Tmessage::Xattrwalk { fid, newfid, name } => self.xattrwalk(fid, newfid, name)?,
            Tmessage::Xattrcreate { .. } => return Err(Errno(libc::EOPNOTSUPP)),
            // Session messages and in-place replies are handled by `Server::dispatch`.
            _ => return Err(Errno(libc::EOPNOTSUPP)),
        })
    }

    fn lopen(&self, fid: u32, flags: u32) -> Result<Rmessage<'static>, Errno> {
        let f = self.get(fid)?;
        let pf = f.path()?;
        let (mut host, writable) = host_open_flags(flags)?;
        if self.read_only && (writable || flags & oflags::TRUNC != 0) {
            return Err(erofs());
        }
        if pf.open.get().is_some() {
            return Err(Errno(libc::EINVAL));
        }
        match pf.fmt {
            libc::S_IFREG => {}
            libc::S_IFDIR => {
                if writable || flags & oflags::TRUNC != 0 {
                    return Err(Errno(libc::EISDIR));
                }
                host = libc::O_RDONLY | libc::O_DIRECTORY;
            }
            libc::S_IFLNK => return Err(Errno(libc::ELOOP)),
            _ => return Err(Errno(libc::ENXIO)),
        }
        let fd = sys::reopen(pf.path_fd(), host)?;
        let st = sys::fstat(fd.as_fd())?;
        pf.open
            .set(OpenFile {
                fd,
                writable,
                dir: Default::default(),
            })
            .map_err(|_| Errno(libc::EINVAL))?;
        Ok(Rmessage::Lopen {
            qid: self.qid(&st),
            iounit: 0,
        })
    }

    fn lcreate(
        &self,
        fid: u32,
        raw: &[u8],
        flags: u32,
        mode: u32,
        gid: u32,
    ) -> Result<Rmessage<'static>, Errno> {
        if self.read_only {
            return Err(erofs());
        }
        let f = self.get(fid)?;
        let dir = f.path()?;
        if dir.open.get().is_some() {
            return Err(Errno(libc::EINVAL));
        }
        let name = fid::name(raw)?;
        let (host, writable) = host_open_flags(flags & !oflags::DIRECTORY)?;
        let mode = self.sanitize_mode(mode, false);
        let dfd = dir.path_fd();
        let create = host | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW;
        let fd = match sys::openat(dfd.as_raw(), &name, create, mode) {
            Ok(fd) => {
                self.fix_mode(fd.as_fd(), mode, true)?;
                self.set_owner(fd.as_fd(), f.uid, gid);
                fd
            }
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) && flags & oflags::EXCL == 0 => {
                // Open the existing file, but only if it is a regular file.
                let p = sys::open_path_at(dfd, &name)?;
                let st = sys::fstat(p.as_fd())?;
                match st.st_mode & libc::S_IFMT {
                    libc::S_IFREG => sys::reopen(p.as_fd(), host)?,
                    libc::S_IFDIR => return Err(Errno(libc::EISDIR)),
                    libc::S_IFLNK => return Err(Errno(libc::ELOOP)),
                    _ => return Err(Errno(libc::ENXIO)),
                }
            }
            Err(e) => return Err(e.into()),
        };
        let path = sys::reopen(fd.as_fd(), libc::O_PATH)?;
        let st = sys::fstat(path.as_fd())?;
        let pf = PathFid::new(
            Arc::new(path),
            &st,
            Some(Loc {
                parent: dir.fd.clone(),
                name,
            }),
        );
        pf.open
            .set(OpenFile {
                fd,
                writable,
                dir: Default::default(),
            })
            .map_err(|_| Errno(libc::EINVAL))?;
        let qid = self.qid(&st);
        self.table().insert(
            fid,
            Arc::new(Fid {
                kind: FidKind::Path(pf),
                uid: f.uid,
            }),
        );
        Ok(Rmessage::Lcreate { qid, iounit: 0 })
    }

    /// `Tread`: the reply is built in place and `pread` fills it directly.
    pub(crate) fn read(
        &self,
        tag: u16,
        fid: u32,
        offset: u64,
        count: u32,
        resp: &mut Vec<u8>,
    ) -> Result<(), Errno> {
        let f = self.get(fid)?;
        let count = (count as usize).min(self.max_payload());
        match &f.kind {
            FidKind::Xattr(data) => {
                let start = usize::try_from(offset)
                    .unwrap_or(usize::MAX)
                    .min(data.len());
                let end = start.saturating_add(count).min(data.len());
                Rmessage::Read {
                    data: &data[start..end],
                }
                .encode(tag, resp)?;
            }
            FidKind::Path(pf) => {
                let open = pf.opened()?;
                Self::begin_data(msg::RREAD, tag, resp);
                sys::pread_append(open.fd.as_fd(), resp, count, offset)?;
                finish_data(resp);
            }
        }
        Ok(())
    }

    fn write(&self, fid: u32, offset: u64, data: &[u8]) -> Result<Rmessage<'static>, Errno> {
        self.write_with(fid, |fd| sys::pwrite(fd, data, offset))
    }

    /// `Twrite` whose payload `io` writes to the fid's open file.
    fn write_with(
        &self,
        fid: u32,
        io: impl FnOnce(BorrowedFd<'_>) -> std::io::Result<usize>,
    ) -> Result<Rmessage<'static>, Errno> {
        if self.read_only {
            return Err(erofs());
        }
        let f = self.get(fid)?;
        let open = f.path()?.opened()?;
        let n = io(open.fd.as_fd())?;
        Ok(Rmessage::Write { count: n as u32 })
    }

    /// `Twrite` with the payload left in the transport's buffers: `fixed` is the body's
    /// fid, offset and count, `body_len` the whole body's length. `None` when the count does
    /// not match the body (the codec then answers as for any malformed message).
    pub(crate) fn write_direct(
        &self,
        fixed: &[u8],
        body_len: usize,
        direct: &mut dyn DirectIo,
    ) -> Option<Result<Rmessage<'static>, Errno>> {
        let mut d = wire::Decoder::new(fixed);
        let (fid, offset, count) = (d.u32().ok()?, d.u64().ok()?, d.u32().ok()?);
        if count as usize != body_len.checked_sub(fixed.len())? {
            return None;
        }
        if direct.request_len() < wire::TWRITE_HEADER_LEN + count as usize {
            // Truncated: answered before anything else, as the copying path does.
            return Some(Err(Errno(libc::EPROTO)));
        }
        Some(self.write_with(fid, |fd| {
            direct.request_to_file(wire::TWRITE_HEADER_LEN, count as usize, fd, offset)
        }))
    }

    /// `Tread` with the data read straight into the transport's reply buffers: `resp`
    /// gets the `Rread` header, the data follows it there. Returns the data's length, or
    /// `None` for a fid whose data is not a file (xattrs: served from memory as usual).
    pub(crate) fn read_direct(
        &self,
        tag: u16,
        fid: u32,
        offset: u64,
        count: u32,
        resp: &mut Vec<u8>,
        direct: &mut dyn DirectIo,
    ) -> Result<Option<usize>, Errno> {
        let f = self.get(fid)?;
        let FidKind::Path(pf) = &f.kind else {
            return Ok(None);
        };
        let open = pf.opened()?;
        let count = (count as usize).min(self.max_payload());
        let n = direct
            .file_to_reply(wire::RREAD_HEADER_LEN, count, open.fd.as_fd(), offset)?
            .min(count);
        Self::begin_data(msg::RREAD, tag, resp);
        finish_data_with(resp, n);
        Ok(Some(n))
    }

    fn remove(&self, fid: u32) -> Result<Rmessage<'static>, Errno> {
        // Tremove clunks the fid whether or not the removal succeeds.
        let f = self.table().remove(&fid).ok_or(Errno(libc::EBADF))?;
        if self.read_only {
            return Err(erofs());
        }
        let pf = f.path()?;
        let loc = pf.checked_loc()?;
        let flags = if pf.is_dir() { libc::AT_REMOVEDIR } else { 0 };
        sys::unlinkat(loc.parent.as_fd(), &loc.name, flags)?;
        Ok(Rmessage::Remove)
    }

    /// `Treaddir`: entries are converted from `getdents64` straight into the reply.
    pub(crate) fn readdir(
        &self,
        tag: u16,
        fid: u32,
        offset: u64,
        count: u32,
        resp: &mut Vec<u8>,
    ) -> Result<(), Errno> {
        let f = self.get(fid)?;
        let pf = f.path()?;
        let open = pf.opened()?;
        if !pf.is_dir() {
            return Err(Errno(libc::ENOTDIR));
        }
        let count = (count as usize).min(self.max_payload());
        let at_root = pf.dev == self.root_dev && pf.ino == self.root_ino;
        let _guard = open.dir.lock().unwrap_or_else(|e| e.into_inner());
        sys::seek_dir(open.fd.as_fd(), offset)?;
        Self::begin_data(msg::RREADDIR, tag, resp);
        let start = resp.len();
        let mut buf = vec![0u8; count.clamp(1024, DIRENT_BUF)];
        'fill: loop {
            let n = sys::getdents64(open.fd.as_fd(), &mut buf)?;
            if n == 0 {
                break;
            }
            let mut pos = 0;
            while pos + DIRENT64_NAME_OFF <= n {
                let rec = &buf[pos..n];
                let ino = u64::from_ne_bytes(rec[0..8].try_into().unwrap_or_default());
                let off = u64::from_ne_bytes(rec[8..16].try_into().unwrap_or_default());
                let reclen = u16::from_ne_bytes([rec[16], rec[17]]) as usize;
                let dtype = rec[18];
                if reclen < DIRENT64_NAME_OFF || reclen > rec.len() {
                    return Err(Errno(libc::EIO));
                }
                let raw = &rec[DIRENT64_NAME_OFF..reclen];
                let name = &raw[..raw.iter().position(|&b| b == 0).unwrap_or(raw.len())];
                if resp.len() - start + Dirent::encoded_len(name.len()) > count {
                    break 'fill;
                }
                // Do not reveal the inode of the directory above the export.
                let ino = if at_root && name == b".." {
                    self.root_ino
                } else {
                    ino
                };
                let ty = match dtype {
                    DT_DIR => wire::qt::DIR,
                    DT_LNK => wire::qt::SYMLINK,
                    _ => wire::qt::FILE,
                };
                let qid = Qid {
                    ty,
                    version: 0,
                    path: self.qid_path(pf.dev, ino),
                };
                Dirent {
                    qid,
                    offset: off,
                    ty: dtype,
                    name,
                }
                .encode(resp)?;
                pos += reclen;
            }
        }
        if resp.len() == start && count < Dirent::encoded_len(fid::NAME_MAX) {
            // Nothing fitted although entries may remain: do not fake end-of-directory.
            let n = sys::getdents64(open.fd.as_fd(), &mut buf)?;
            if n > 0 {
                return Err(Errno(libc::EINVAL));
            }
        }
        finish_data(resp);
        Ok(())
    }

    fn fsync(&self, fid: u32, datasync: u32) -> Result<Rmessage<'static>, Errno> {
        let f = self.get(fid)?;
        let open = f.path()?.opened()?;
        sys::fsync(open.fd.as_fd(), datasync != 0)?;
        Ok(Rmessage::Fsync)
    }

    fn flock(ty: u8, start: u64, length: u64) -> Result<libc::flock64, Errno> {
        let l_type = match ty {
            lock::TYPE_RDLCK => libc::F_RDLCK,
            lock::TYPE_WRLCK => libc::F_WRLCK,
            lock::TYPE_UNLCK => libc::F_UNLCK,
            _ => return Err(Errno(libc::EINVAL)),
        };
        let start = i64::try_from(start).map_err(|_| Errno(libc::EINVAL))?;
        let len = i64::try_from(length).map_err(|_| Errno(libc::EINVAL))?;
        // SAFETY: flock64 is a plain C struct for which all-zero is valid.
        let mut fl: libc::flock64 = unsafe { std::mem::zeroed() };
        fl.l_type = l_type as i16;
        fl.l_whence = libc::SEEK_SET as i16;
        fl.l_start = start;
        fl.l_len = len;
        Ok(fl)
    }

    /// `Tlock` with open-file-description locks: one lock owner per fid, and
    /// the server never blocks (the client retries on `BLOCKED`).
    fn lock(&self, fid: u32, l: &Tlock<'_>) -> Result<Rmessage<'static>, Errno> {
        let f = self.get(fid)?;
        let open = f.path()?.opened()?;
        let mut fl = Self::flock(l.ty, l.start, l.length)?;
        let status = match sys::fcntl_lock(open.fd.as_fd(), libc::F_OFD_SETLK, &mut fl) {
            Ok(()) => lock::SUCCESS,
            Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EACCES)) => {
                lock::BLOCKED
            }
            Err(e) => return Err(e.into()),
        };
        Ok(Rmessage::Lock { status })
    }

    pub(crate) fn getlock<'a>(&self, fid: u32, l: &Tgetlock<'a>) -> Result<Rgetlock<'a>, Errno> {
        let f = self.get(fid)?;
        let open = f.path()?.opened()?;
        let mut fl = Self::flock(l.ty, l.start, l.length)?;
        sys::fcntl_lock(open.fd.as_fd(), libc::F_OFD_GETLK, &mut fl)?;
        if i32::from(fl.l_type) == libc::F_UNLCK {
            return Ok(Rgetlock {
                ty: lock::TYPE_UNLCK,
                ..*l
            });
        }
        Ok(Rgetlock {
            ty: if i32::from(fl.l_type) == libc::F_WRLCK {
                lock::TYPE_WRLCK
            } else {
                lock::TYPE_RDLCK
            },
            start: fl.l_start as u64,
            length: fl.l_len as u64,
            proc_id: u32::try_from(fl.l_pid).unwrap_or(0),
            client_id: l.client_id,
        })
    }

    /// `Txattrwalk`: snapshot the name list (empty name) or one value into a
    /// new fid that the client then reads.
    fn xattrwalk(&self, fid: u32, newfid: u32, raw: &[u8]) -> Result<Rmessage<'static>, Errno> {
        let f = self.get(fid)?;
        let pf = f.path()?;
        let data = if raw.is_empty() {
            if pf.is_symlink() {
                Vec::new()
            } else {
                sys::listxattr_fd(pf.path_fd())?
            }
        } else {
            if raw.len() > fid::NAME_MAX {
                return Err(Errno(libc::ERANGE));
            }
            let name = CString::new(raw).map_err(|_| Errno(libc::EINVAL))?;
            if pf.is_symlink() {
                return Err(Errno(libc::ENODATA));
            }
            sys::getxattr_fd(pf.path_fd(), &name)?
        };
        let size = data.len() as u64;
        let new = Fid {
            kind: FidKind::Xattr(data),
            uid: f.uid,
        };
        if newfid == fid {
            self.table().insert(newfid, Arc::new(new));
        } else {
            self.insert_new(newfid, new)?;
        }
        Ok(Rmessage::Xattrwalk { size })
    }

    /// Mode bits the guest may set: permissions plus sticky; set-id bits only
    /// on directories (where set-gid means group inheritance).
    pub(crate) fn sanitize_mode(&self, mode: u32, dir: bool) -> u32 {
        if dir {
            mode & 0o7777
        } else {
            mode & 0o1777
        }
    }

    /// Undo the server's own umask on a freshly created inode (the guest has
    /// applied its umask already).
    pub(crate) fn fix_mode(
        &self,
        fd: BorrowedFd<'_>,
        mode: u32,
        is_fd_open: bool,
    ) -> Result<(), Errno> {
        if mode & self.umask == 0 {
            return Ok(());
        }
        if is_fd_open {
            // SAFETY: plain syscall on a valid open fd.
            if unsafe { libc::fchmod(std::os::fd::AsRawFd::as_raw_fd(&fd), mode) } < 0 {
                return Err(std::io::Error::last_os_error().into());
            }
            return Ok(());
        }
        sys::chmod_fd(fd, mode)?;
        Ok(())
    }

    /// Apply the guest's ids to a new inode under [`Ownership::GuestIds`].
    /// Failures are logged, not returned: the object exists either way.
    pub(crate) fn set_owner(&self, fd: BorrowedFd<'_>, uid: u32, gid: u32) {
        if self.ownership != Ownership::GuestIds {
            return;
        }
        if let Err(e) = sys::chown_fd(fd, uid, gid) {
            tracing::debug!(error = %e, uid, gid, "9p: cannot apply guest ownership");
        }
    }

    /// The path fid `fid`, which must be a directory.
    pub(crate) fn dir_fid(&self, fid: u32) -> Result<(Arc<Fid>, Arc<std::os::fd::OwnedFd>), Errno> {
        let f = self.get(fid)?;
        let pf = f.path()?;
        if !pf.is_dir() {
            return Err(Errno(libc::ENOTDIR));
        }
        let fd = pf.fd.clone();
        Ok((f, fd))
    }
}

/// Borrowed fd helpers.
trait AsRaw {
    fn as_raw(&self) -> i32;
}

impl AsRaw for BorrowedFd<'_> {
    fn as_raw(&self) -> i32 {
        std::os::fd::AsRawFd::as_raw_fd(self)
    }
}
