//! A confined, transport-agnostic 9P2000.L file server for dinv bind mounts.
//!
//! [`Server::handle_message`] reads one T-message from any [`std::io::Read`]
//! and writes exactly one R-message to any [`std::io::Write`]; the virtio-9p
//! device hands it a descriptor chain's reader/writer, tests hand it byte
//! slices. The protocol is 9P2000.L as described in diod's `protocol.md` and
//! implemented by the Linux client (`net/9p`, `fs/9p`); the wire codec lives in
//! [`wire`]. [`Server::handle_direct`] serves a transport that implements
//! [`DirectIo`] without copying file data through the server.
//!
//! ```
//! use p9::wire::{Rmessage, Tmessage};
//! let dir = tempfile::tempdir().unwrap();
//! let server = p9::Server::new(p9::Config::new(dir.path())).unwrap();
//! let mut req = Vec::new();
//! Tmessage::Version { msize: 1 << 20, version: b"9P2000.L" }.encode(0xffff, &mut req).unwrap();
//! let mut resp = Vec::new();
//! server.handle_message(&mut &req[..], &mut resp).unwrap();
//! let (_, reply) = Rmessage::decode_frame(&resp).unwrap();
//! assert_eq!(reply, Rmessage::Version { msize: 1 << 20, version: b"9P2000.L" });
//! ```
//!
//! # Messages
//! version, auth (always refused: no authentication), attach, flush, walk,
//! lopen, lcreate, read, write, clunk, remove, statfs, getattr, setattr,
//! readdir, symlink, mknod, rename, renameat, unlinkat, readlink, link,
//! mkdir, fsync, lock, getlock, xattrwalk (read-only: list and get) and
//! xattrcreate (refused with `EOPNOTSUPP`). Legacy 9P2000 open/create/stat
//! are not served. Every failure is an `Rlerror` carrying the host errno; a
//! malformed message is answered with `EPROTO`/`EINVAL`/`EMSGSIZE` and never
//! stops the server.
//!
//! # Confinement
//! - Every fid holds an `O_PATH` fd, never a path string. A walk resolves one
//!   component at a time with `openat(dir, name, O_PATH|O_NOFOLLOW)` starting
//!   from the fid's fd, so symlinks are never followed on the host: walking
//!   *to* a symlink yields the link itself (readlink returns its text and the
//!   guest kernel resolves it), walking *through* one fails with `ENOTDIR`.
//! - Names must not be empty, `.`, contain `/` or NUL (`EINVAL`) or exceed 255
//!   bytes (`ENAMETOOLONG`); `..` is only accepted by walk, stays at the root
//!   when already there, and is checked to lead to an ancestor inside the export.
//! - Operations that take names (lcreate, mkdir, symlink, mknod, link, rename,
//!   renameat, unlinkat) use `*at` calls relative to a directory fid and never
//!   follow a final symlink (`O_NOFOLLOW`, `AT_SYMLINK_NOFOLLOW`). Hard links
//!   and renames take fids, so their sources are always inside the export.
//! - Opening for I/O reopens the fid's own inode through `/proc/self/fd/N`
//!   after checking it is a regular file or directory (symlinks: `ELOOP`;
//!   devices, FIFOs, sockets: `ENXIO`). A path swapped after the walk cannot
//!   redirect the open: the fd names the inode, not the path.
//! - Remove, rename and link act on a fid's remembered (directory fd, name)
//!   only after checking that the name still refers to the fid's inode.
//! - The host itself can still move a directory out of the export under a
//!   live fid; `..` from it is then refused (`EACCES`), but the fid keeps
//!   naming that directory. Mounts inside the export are crossed.
//! - mknod creates only regular files, FIFOs, sockets and 0:0 whiteouts;
//!   device nodes are refused with `EPERM`.
//!
//! # Ownership (uid/gid semantics)
//! The server acts with its own host credentials. Files and directories the
//! guest creates belong to the host user running the server (dinv's user),
//! and the host's permission checks for that user apply. With the default
//! [`Ownership::ServerUser`] the uid/gid a guest asks for (create, attach
//! `n_uname`, setattr chown) are ignored: chown succeeds without effect, so
//! tools like `tar` or `cp -a` running as root in the guest keep working.
//! Getattr reports the real host uid/gid. [`Ownership::GuestIds`] applies the
//! guest's ids with `fchownat` (only meaningful when the server runs as root).
//! Set-user-ID and set-group-ID bits are stripped from non-directories the
//! guest creates or chmods, so a guest can never plant a set-id executable on
//! the host.
//!
//! # Concurrency
//! `handle_message` takes `&self`: a pool of worker threads may serve
//! requests concurrently. Each worker keeps its own request/response buffers.
//! Since every request is answered before `handle_message` returns, `Tflush`
//! is answered immediately.

mod fid;
mod ops;
mod server;
mod session;
mod sys;
pub mod wire;

use std::io;
use std::path::PathBuf;

use thiserror::Error;

pub use server::Server;
pub use session::{FidState, SessionError, SessionState};

/// File data moved straight between a host file and a transport's own buffers.
///
/// A transport whose messages live in memory the kernel can reach (virtio: descriptor
/// chains in guest memory) implements this, and serves with [`Server::handle_direct`]:
/// a `Twrite` payload then goes from the request to the file with one `pwritev`, and an
/// `Rread`'s data from the file into the reply with one `preadv`, never through the
/// server's buffers. Positions are byte offsets in the whole request / reply message.
pub trait DirectIo {
    /// Bytes of the request the transport holds (a message may claim more than arrived).
    fn request_len(&self) -> usize;
    /// Write request bytes `at..at + len` to `fd` at file offset `offset`. Returns the
    /// bytes written (fewer on a short write).
    fn request_to_file(
        &mut self,
        at: usize,
        len: usize,
        fd: std::os::fd::BorrowedFd<'_>,
        offset: u64,
    ) -> io::Result<usize>;
    /// Read up to `len` bytes of `fd` at file offset `offset` into reply bytes `at..`
    /// (bounded by the room the reply has). Returns the bytes read (fewer at end of file).
    fn file_to_reply(
        &mut self,
        at: usize,
        len: usize,
        fd: std::os::fd::BorrowedFd<'_>,
        offset: u64,
    ) -> io::Result<usize>;
}

/// Smallest msize the server negotiates.
pub const MIN_MSIZE: u32 = 4096;
/// Default (and recommended) largest msize: 4 MiB.
pub const DEFAULT_MSIZE_MAX: u32 = 4 << 20;
/// Hard upper bound for [`Config::msize_max`].
pub const MAX_MSIZE: u32 = 16 << 20;

/// Default for [`Config::max_fids`].
pub const DEFAULT_MAX_FIDS: usize = 1 << 20;

/// Whose ids files created by the guest carry on the host.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Ownership {
    /// Everything belongs to the server's user; guest uid/gid requests are
    /// accepted and ignored.
    #[default]
    ServerUser,
    /// Apply the guest's uid (attach `n_uname`) and gid to new files and
    /// honour chown; needs the server to run as root to be useful.
    GuestIds,
}

/// Server configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The exported host directory.
    pub root: PathBuf,
    /// Refuse every modifying operation with `EROFS`.
    pub read_only: bool,
    /// Largest msize offered to the client (clamped to [`MIN_MSIZE`]..=[`MAX_MSIZE`]).
    pub msize_max: u32,
    /// uid/gid policy.
    pub ownership: Ownership,
    /// Most fids alive at once (each holds one or two host fds; the VMM
    /// should raise `RLIMIT_NOFILE` accordingly). Beyond it: `EMFILE`.
    pub max_fids: usize,
}

impl Config {
    /// A read-write export of `root` with default limits.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Config {
            root: root.into(),
            read_only: false,
            msize_max: DEFAULT_MSIZE_MAX,
            ownership: Ownership::default(),
            max_fids: DEFAULT_MAX_FIDS,
        }
    }
}

/// Errors creating a [`Server`].
#[derive(Debug, Error)]
pub enum Error {
    /// The export root cannot be opened.
    #[error("Cannot open export root {path}: {source}")]
    OpenRoot {
        /// The configured root.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The export root is not a directory.
    #[error("Export root {0} is not a directory")]
    NotADirectory(PathBuf),
    /// `/proc/self/fd` is unusable (needed to reopen files safely).
    #[error("/proc/self/fd is not available: {0}")]
    NoProc(io::Error),
}

/// An errno destined for an `Rlerror`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("errno {0}")]
pub(crate) struct Errno(pub i32);

impl From<io::Error> for Errno {
    fn from(e: io::Error) -> Self {
        Errno(e.raw_os_error().unwrap_or(libc::EIO))
    }
}

impl From<wire::WireError> for Errno {
    fn from(e: wire::WireError) -> Self {
        Errno(e.errno() as i32)
    }
}
