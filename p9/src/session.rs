//! Saving and restoring a 9P session — the negotiated msize and the fid table — so that a
//! VM snapshot taken with bind mounts resumes with the guest's mounts working.
//!
//! A fid is saved as the path of its inode below the export root (read back from
//! `/proc/self/fd`, so it is where the inode is *now*, whatever renames happened since the
//! walk) and, if opened, its host open flags. Restoring walks the path again one component at
//! a time from the root with `O_PATH|O_NOFOLLOW`, exactly as a `Twalk` would (so a restored
//! fid can never name anything outside the export), and reopens it through its own inode.
//! The export may have changed in between (it is the host directory of the resuming run): a
//! fid whose path is gone is not restored, and the guest gets `EBADF` if it uses it.
//!
//! Not saved, so a snapshot is refused while they exist: xattr fids (transient, only alive
//! inside a getxattr/listxattr call) and fids whose inode was unlinked or moved out of the
//! export. POSIX locks the guest held are not re-taken.

use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::fid::{self, Fid, FidKind, Loc, OpenFile, PathFid};
use crate::{sys, Errno, Server};

/// A 9P session as saved in a snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionState {
    /// The msize in force.
    pub msize: u32,
    /// Every fid, in fid order.
    pub fids: Vec<FidState>,
}

/// One saved fid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FidState {
    /// The fid number.
    pub fid: u32,
    /// The numeric user it acts for (`n_uname` of its attach).
    pub uid: u32,
    /// Path components below the export root (empty: the root itself).
    pub path: Vec<Vec<u8>>,
    /// Host open flags (access mode and status flags), if the fid was opened
    /// (`Tlopen`/`Tlcreate`).
    pub open: Option<i32>,
}

/// Errors saving or restoring a session.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// A fid cannot be described by a path in the export.
    #[error("9P fid {fid} cannot be saved: {reason}")]
    Unsaveable {
        /// The fid.
        fid: u32,
        /// Why.
        reason: String,
    },
    /// The session to restore into already has fids.
    #[error("9P session already in use ({0} fids)")]
    InUse(usize),
    /// Reading the export root's own path failed.
    #[error("Cannot read the export root's path: {0}")]
    Root(std::io::Error),
}

/// Open flags worth restoring: access mode and the status flags a reopen can carry.
const KEPT_FLAGS: i32 = libc::O_ACCMODE
    | libc::O_APPEND
    | libc::O_NONBLOCK
    | libc::O_DIRECT
    | libc::O_NOATIME
    | libc::O_SYNC
    | libc::O_DSYNC
    | libc::O_DIRECTORY
    | libc::O_LARGEFILE;

impl Server {
    /// The session for a snapshot. Call with no request running (the device drains first).
    pub fn save_session(&self) -> Result<SessionState, SessionError> {
        let root = sys::fd_path(self.root.as_fd()).map_err(SessionError::Root)?;
        // What every path inside the export starts with.
        let mut prefix = root.clone();
        if !prefix.ends_with(b"/") {
            prefix.push(b'/');
        }
        let table = self.table();
        let mut ids: Vec<u32> = table.keys().copied().collect();
        ids.sort_unstable();
        let mut fids = Vec::with_capacity(ids.len());
        for id in ids {
            let Some(f) = table.get(&id) else { continue };
            let unsaveable = |reason: &str| SessionError::Unsaveable {
                fid: id,
                reason: reason.into(),
            };
            let FidKind::Path(pf) = &f.kind else {
                return Err(unsaveable("an xattr fid"));
            };
            let path = sys::fd_path(pf.path_fd()).map_err(|e| unsaveable(&e.to_string()))?;
            let rel: Vec<Vec<u8>> = if path == root {
                Vec::new()
            } else {
                let rest = path
                    .strip_prefix(prefix.as_slice())
                    .ok_or_else(|| unsaveable("its file is no longer inside the export"))?;
                rest.split(|&b| b == b'/').map(<[u8]>::to_vec).collect()
            };
            // The path must lead back to this very inode (not so for a deleted file, whose
            // link reads "name (deleted)", or one renamed meanwhile).
            match self
                .walk_path(&rel)
                .and_then(|(fd, _)| sys::fstat(fd.as_fd()))
            {
                Ok(st) if st.st_dev == pf.dev && st.st_ino == pf.ino => {}
                _ => return Err(unsaveable("its file was deleted or moved")),
            }
            let open = match pf.open.get() {
                Some(o) => {
                    // SAFETY: F_GETFL on an fd we own.
                    let fl = unsafe { libc::fcntl(o.fd.as_raw_fd(), libc::F_GETFL) };
                    if fl < 0 {
                        return Err(unsaveable(&std::io::Error::last_os_error().to_string()));
                    }
                    Some(fl & KEPT_FLAGS)
                }
                None => None,
            };
            fids.push(FidState {
                fid: id,
                uid: f.uid,
                path: rel,
                open,
            });
        }
        Ok(SessionState {
            msize: self.msize(),
            fids,
        })
    }

    /// Put a saved session into this (fresh) server. Fids whose path no longer exists in the
    /// export are left out (logged); their number then answers `EBADF`. Returns how many
    /// fids were restored.
    pub fn restore_session(&self, state: &SessionState) -> Result<usize, SessionError> {
        let in_use = self.table().len();
        if in_use != 0 {
            return Err(SessionError::InUse(in_use));
        }
        self.msize.store(
            state.msize.clamp(crate::MIN_MSIZE, self.msize_max),
            Ordering::Relaxed,
        );
        let mut restored = 0;
        for saved in &state.fids {
            // The same admission as a new fid: not NOFID, not twice, at most max_fids.
            let result = self.restore_fid(saved).and_then(|f| {
                self.insert_new(saved.fid, f)
                    .map_err(|Errno(e)| std::io::Error::from_raw_os_error(e))
            });
            match result {
                Ok(()) => restored += 1,
                Err(e) => tracing::warn!(fid = saved.fid, "9P fid not restored: {e}"),
            }
        }
        Ok(restored)
    }

    /// Walk `path` from the export root one component at a time, as `Twalk` does: the
    /// final fd and where it was found.
    fn walk_path(&self, path: &[Vec<u8>]) -> std::io::Result<(Arc<OwnedFd>, Option<Loc>)> {
        let mut cur: Arc<OwnedFd> = self.root.clone();
        let mut loc = None;
        for comp in path {
            // The same name rules as a walk: no `/`, `.`, `..`, NUL, or over-long names.
            let name: CString =
                fid::name(comp).map_err(|Errno(e)| std::io::Error::from_raw_os_error(e))?;
            let next = Arc::new(sys::open_path_at(cur.as_fd(), &name)?);
            loc = Some(Loc { parent: cur, name });
            cur = next;
        }
        Ok((cur, loc))
    }

    fn restore_fid(&self, saved: &FidState) -> std::io::Result<Fid> {
        let invalid =
            |why: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, why.to_string());
        let (cur, loc) = self.walk_path(&saved.path)?;
        let st = sys::fstat(cur.as_fd())?;
        let pf = PathFid::new(cur, &st, loc);
        if let Some(flags) = saved.open {
            // Only what a save can hold (never O_TRUNC, O_CREAT...); writability follows from
            // the access mode, whatever the saved flag says.
            let flags = flags & KEPT_FLAGS;
            let writable = flags & libc::O_ACCMODE != libc::O_RDONLY;
            let flags = match pf.fmt {
                libc::S_IFREG => flags & !libc::O_DIRECTORY,
                libc::S_IFDIR if !writable => libc::O_RDONLY | libc::O_DIRECTORY,
                _ => {
                    return Err(invalid(
                        "an open fid that is not a file or a read-only directory",
                    ))
                }
            };
            if self.read_only && writable {
                return Err(invalid("a writable open fid on a read-only export"));
            }
            let fd = sys::reopen(pf.path_fd(), flags)?;
            pf.open
                .set(OpenFile {
                    fd,
                    writable,
                    dir: Default::default(),
                })
                .map_err(|_| invalid("opened twice"))?;
        }
        Ok(Fid {
            kind: FidKind::Path(pf),
            uid: saved.uid,
        })
    }
}
