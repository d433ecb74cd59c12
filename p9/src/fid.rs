//! The fid table entries and name validation (9P2000.L fids; "walk" in
//! `intro(5)`/diod `protocol.md`).
//!
//! A path fid owns an `O_PATH|O_NOFOLLOW` fd on its inode, the directory it
//! was reached from plus its name there (for remove/rename/link, verified
//! against the inode before use) and, once opened, a real open fd. An xattr
//! fid holds a snapshot of an xattr value or name list for reads.

use std::ffi::CString;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex, OnceLock};

use crate::{sys, Errno};

/// Longest name accepted in a single path component.
pub(crate) const NAME_MAX: usize = 255;

/// Where a fid's inode was found: its directory and its name in it.
#[derive(Debug, Clone)]
pub(crate) struct Loc {
    pub parent: Arc<OwnedFd>,
    pub name: CString,
}

/// A file opened by `Tlopen`/`Tlcreate`.
#[derive(Debug)]
pub(crate) struct OpenFile {
    pub fd: OwnedFd,
    pub writable: bool,
    /// Serialises `lseek` + `getdents64` for readdir.
    pub dir: Mutex<()>,
}

/// A fid naming a file in the export.
#[derive(Debug)]
pub(crate) struct PathFid {
    pub fd: Arc<OwnedFd>,
    /// `st_mode & S_IFMT` at walk time (the type of an inode never changes).
    pub fmt: u32,
    pub dev: u64,
    pub ino: u64,
    pub loc: Mutex<Option<Loc>>,
    pub open: OnceLock<OpenFile>,
}

impl PathFid {
    pub fn new(fd: Arc<OwnedFd>, st: &libc::stat64, loc: Option<Loc>) -> Self {
        PathFid {
            fd,
            fmt: st.st_mode & libc::S_IFMT,
            dev: st.st_dev,
            ino: st.st_ino,
            loc: Mutex::new(loc),
            open: OnceLock::new(),
        }
    }

    pub fn path_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    pub fn is_symlink(&self) -> bool {
        self.fmt == libc::S_IFLNK
    }

    pub fn is_dir(&self) -> bool {
        self.fmt == libc::S_IFDIR
    }

    pub fn opened(&self) -> Result<&OpenFile, Errno> {
        self.open.get().ok_or(Errno(libc::EBADF))
    }

    /// The fid's location, checked to still name the fid's inode.
    /// `None` location (the root, or a directory reached by `..`) is `EBUSY`.
    pub fn checked_loc(&self) -> Result<Loc, Errno> {
        let loc = self.loc.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let loc = loc.ok_or(Errno(libc::EBUSY))?;
        let st = sys::fstatat(loc.parent.as_fd(), &loc.name, 0)?;
        if st.st_dev != self.dev || st.st_ino != self.ino {
            return Err(Errno(libc::ENOENT));
        }
        Ok(loc)
    }

    pub fn set_loc(&self, loc: Loc) {
        *self.loc.lock().unwrap_or_else(|e| e.into_inner()) = Some(loc);
    }
}

/// What a fid refers to.
#[derive(Debug)]
pub(crate) enum FidKind {
    Path(PathFid),
    Xattr(Vec<u8>),
}

/// One entry of the fid table.
#[derive(Debug)]
pub(crate) struct Fid {
    pub kind: FidKind,
    /// The numeric user given at attach (`n_uname`), inherited by walks.
    pub uid: u32,
}

impl Fid {
    pub fn path(&self) -> Result<&PathFid, Errno> {
        match &self.kind {
            FidKind::Path(p) => Ok(p),
            FidKind::Xattr(_) => Err(Errno(libc::EBADF)),
        }
    }
}

/// Validate a name used in a walk: like [`name`] but `..` is allowed.
pub(crate) fn walk_name(raw: &[u8]) -> Result<CString, Errno> {
    if raw == b".." {
        return Ok(c"..".to_owned());
    }
    name(raw)
}

/// Validate a single path component given by the guest.
pub(crate) fn name(raw: &[u8]) -> Result<CString, Errno> {
    if raw.is_empty() || raw == b"." || raw == b".." || raw.contains(&b'/') {
        return Err(Errno(libc::EINVAL));
    }
    if raw.len() > NAME_MAX {
        return Err(Errno(libc::ENAMETOOLONG));
    }
    CString::new(raw).map_err(|_| Errno(libc::EINVAL))
}
