//! The 9P2000.L server core: message framing over `Read`/`Write`, the fid
//! table, session messages (version, auth, attach, flush, walk, clunk) and
//! dispatch of file operations to `ops`.
//!
//! Framing (`intro(5)`): `size[4] type[1] tag[2]` is read first so that any
//! later failure (size out of range, short body, undecodable body) can be
//! answered with an `Rlerror` carrying the request's tag. Only a message too
//! short to hold a tag, or an I/O error of the transport, is returned as an
//! `Err`: there is no one to answer.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::fid::{self, Fid, FidKind, Loc, PathFid};
use crate::wire::{self, qt, Encoder, Qid, Rmessage, Tmessage, HEADER_LEN};
use crate::{sys, Config, DirectIo, Errno, Error, Ownership, MAX_MSIZE, MIN_MSIZE};

/// A Twrite's body before its data: fid[4] offset[8] count[4].
const TWRITE_FIXED_LEN: usize = wire::TWRITE_HEADER_LEN - HEADER_LEN;

/// Deepest directory chain checked when verifying that `..` stays inside.
const MAX_DEPTH: usize = 4096;

/// Per-thread request/response buffers (grow to the largest message copied through them,
/// never shrink; with a direct transport, file data never is).
#[derive(Default)]
struct Scratch {
    req: Vec<u8>,
    resp: Vec<u8>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// A 9P2000.L server exporting one host directory.
#[derive(Debug)]
pub struct Server {
    pub(crate) read_only: bool,
    pub(crate) ownership: Ownership,
    pub(crate) msize_max: u32,
    max_fids: usize,
    pub(crate) msize: AtomicU32,
    pub(crate) root: Arc<OwnedFd>,
    pub(crate) root_dev: u64,
    pub(crate) root_ino: u64,
    pub(crate) umask: u32,
    fids: Mutex<HashMap<u32, Arc<Fid>>>,
}

impl Server {
    /// Open the export root and build a server for it.
    pub fn new(cfg: Config) -> Result<Self, Error> {
        let croot = std::ffi::CString::new(cfg.root.as_os_str().as_encoded_bytes())
            .map_err(|_| Error::NotADirectory(cfg.root.clone()))?;
        let root = sys::openat(libc::AT_FDCWD, &croot, libc::O_PATH | libc::O_DIRECTORY, 0)
            .map_err(|source| Error::OpenRoot {
                path: cfg.root.clone(),
                source,
            })?;
        let st = sys::fstat(root.as_fd()).map_err(|source| Error::OpenRoot {
            path: cfg.root.clone(),
            source,
        })?;
        if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
            return Err(Error::NotADirectory(cfg.root));
        }
        // Reopening through /proc/self/fd must work: probe it once.
        sys::reopen(root.as_fd(), libc::O_RDONLY | libc::O_DIRECTORY).map_err(Error::NoProc)?;
        let msize_max = cfg.msize_max.clamp(MIN_MSIZE, MAX_MSIZE);
        Ok(Server {
            read_only: cfg.read_only,
            ownership: cfg.ownership,
            msize_max,
            max_fids: cfg.max_fids.max(1),
            msize: AtomicU32::new(msize_max),
            root: Arc::new(root),
            root_dev: st.st_dev,
            root_ino: st.st_ino,
            umask: sys::current_umask(),
            fids: Mutex::new(HashMap::new()),
        })
    }

    /// The msize in force (the server's maximum until `Tversion` negotiates).
    pub fn msize(&self) -> u32 {
        self.msize.load(Ordering::Relaxed)
    }

    /// Number of live fids (for tests and metrics).
    pub fn fid_count(&self) -> usize {
        self.table().len()
    }

    /// Read one T-message from `r`, execute it, write one R-message to `w`.
    ///
    /// Returns `Err` only when the transport fails or the message is too short
    /// to carry a tag; every other problem is answered with an `Rlerror`.
    pub fn handle_message(&self, r: &mut impl Read, w: &mut impl Write) -> io::Result<()> {
        self.handle(r, w, None).map(|_| ())
    }

    /// [`Server::handle_message`] for a transport whose buffers `direct` reaches: `Twrite`
    /// payloads and `Rread` data move between the file and those buffers directly. `r` and
    /// `w` read and write the same message's buffers (headers, every other message).
    /// Returns the length of the R-message, which includes data `direct` placed after the
    /// bytes written through `w`.
    pub fn handle_direct(
        &self,
        r: &mut impl Read,
        w: &mut impl Write,
        direct: &mut impl DirectIo,
    ) -> io::Result<usize> {
        self.handle(r, w, Some(direct))
    }

    fn handle(
        &self,
        r: &mut impl Read,
        w: &mut impl Write,
        direct: Option<&mut dyn DirectIo>,
    ) -> io::Result<usize> {
        SCRATCH.with(|s| match s.try_borrow_mut() {
            Ok(mut s) => {
                let Scratch { req, resp } = &mut *s;
                self.handle_with(req, resp, r, w, direct)
            }
            Err(_) => self.handle_with(&mut Vec::new(), &mut Vec::new(), r, w, direct),
        })
    }

    fn handle_with(
        &self,
        req: &mut Vec<u8>,
        resp: &mut Vec<u8>,
        r: &mut impl Read,
        w: &mut impl Write,
        mut direct: Option<&mut dyn DirectIo>,
    ) -> io::Result<usize> {
        let mut hdr = [0u8; HEADER_LEN];
        if let Err(e) = r.read_exact(&mut hdr) {
            return Err(if e.kind() == io::ErrorKind::UnexpectedEof {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    "9P message shorter than its header",
                )
            } else {
                e
            });
        }
        let size = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let ty = hdr[4];
        let tag = u16::from_le_bytes([hdr[5], hdr[6]]);
        resp.clear();
        let body_len = (size as usize).checked_sub(HEADER_LEN);
        // File data `direct` placed in the reply after `resp`.
        let mut placed = 0;
        let result = match body_len {
            None => Err(Errno(wire::WireError::SizeTooSmall(size).errno() as i32)),
            Some(_) if size > self.msize() => {
                Err(Errno(wire::WireError::SizeTooLarge(size).errno() as i32))
            }
            Some(n) => {
                // With a direct transport, a Twrite's payload stays where it is: read only
                // its fixed part (and the buffer never grows to the payload's size).
                let direct_write =
                    ty == wire::msg::TWRITE && n >= TWRITE_FIXED_LEN && direct.is_some();
                let first = if direct_write { TWRITE_FIXED_LEN } else { n };
                if req.len() < first {
                    req.resize(first, 0);
                }
                match read_body(r, &mut req[..first])? {
                    Err(e) => Err(e),
                    Ok(()) => {
                        let served = match direct.as_deref_mut() {
                            Some(d) if direct_write => self.write_direct(&req[..first], n, d),
                            _ => None,
                        };
                        match served {
                            Some(reply) => reply.and_then(|m| Ok(m.encode(tag, resp).map(drop)?)),
                            // Not a well-formed Twrite, or no direct transport: decode it all.
                            None => {
                                if req.len() < n {
                                    req.resize(n, 0);
                                }
                                match read_body(r, &mut req[first..n])? {
                                    Err(e) => Err(e),
                                    Ok(()) => self.decode_and_dispatch(
                                        ty,
                                        tag,
                                        &req[..n],
                                        resp,
                                        direct,
                                        &mut placed,
                                    ),
                                }
                            }
                        }
                    }
                }
            }
        };
        if let Err(Errno(e)) = result {
            tracing::debug!(ty, tag, errno = e, "9p request failed");
            resp.clear();
            placed = 0;
            Rmessage::Lerror { ecode: e as u32 }
                .encode(tag, resp)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        }
        w.write_all(resp)?;
        w.flush()?;
        Ok(resp.len() + placed)
    }

    fn decode_and_dispatch(
        &self,
        ty: u8,
        tag: u16,
        body: &[u8],
        resp: &mut Vec<u8>,
        direct: Option<&mut dyn DirectIo>,
        placed: &mut usize,
    ) -> Result<(), Errno> {
        let m = Tmessage::decode(ty, body)?;
        if let (Tmessage::Read { fid, offset, count }, Some(d)) = (&m, direct) {
            if let Some(n) = self.read_direct(tag, *fid, *offset, *count, resp, d)? {
                *placed = n;
                return Ok(());
            }
        }
        self.dispatch(tag, m, resp)
    }

    fn dispatch(&self, tag: u16, m: Tmessage<'_>, resp: &mut Vec<u8>) -> Result<(), Errno> {
        let reply = match m {
            Tmessage::Version { msize, version } => self.version(msize, version)?,
            Tmessage::Auth { .. } => return Err(Errno(libc::EOPNOTSUPP)),
            Tmessage::Attach {
                fid,
                aname,
                n_uname,
                ..
            } => self.attach(fid, aname, n_uname)?,
            Tmessage::Flush { .. } => Rmessage::Flush,
            Tmessage::Walk { fid, newfid, names } => self.walk(fid, newfid, &names)?,
            Tmessage::Clunk { fid } => {
                self.table().remove(&fid).ok_or(Errno(libc::EBADF))?;
                Rmessage::Clunk
            }
            Tmessage::Read { fid, offset, count } => {
                return self.read(tag, fid, offset, count, resp)
            }
            Tmessage::Readdir { fid, offset, count } => {
                return self.readdir(tag, fid, offset, count, resp)
            }
            Tmessage::Getlock { fid, lock } => {
                let l = self.getlock(fid, &lock)?;
                Rmessage::Getlock(l).encode(tag, resp)?;
                return Ok(());
            }
            Tmessage::Readlink { fid } => {
                let target = self.readlink(fid)?;
                Rmessage::Readlink { target: &target }.encode(tag, resp)?;
                return Ok(());
            }
            other => self.file_op(other)?,
        };
        reply.encode(tag, resp)?;
        Ok(())
    }

    fn version(&self, msize: u32, version: &[u8]) -> Result<Rmessage<'static>, Errno> {
        // A version message starts a new session: drop every fid.
        self.table().clear();
        let msize = msize.min(self.msize_max);
        if msize < MIN_MSIZE {
            return Err(Errno(libc::EINVAL));
        }
        self.msize.store(msize, Ordering::Relaxed);
        let version = if version.starts_with(wire::VERSION_9P2000_L) {
            wire::VERSION_9P2000_L
        } else {
            wire::VERSION_UNKNOWN
        };
        Ok(Rmessage::Version { msize, version })
    }

    fn attach(&self, fid: u32, aname: &[u8], n_uname: u32) -> Result<Rmessage<'static>, Errno> {
        let mut cur = self.root.clone();
        let mut st = sys::fstat(cur.as_fd())?;
        let mut loc = None;
        // `aname` may select a subdirectory of the export; `..` is not allowed.
        for comp in aname.split(|&b| b == b'/').filter(|c| !c.is_empty()) {
            let name = fid::name(comp)?;
            let next = Arc::new(sys::open_path_at(cur.as_fd(), &name)?);
            st = sys::fstat(next.as_fd())?;
            if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
                return Err(Errno(libc::ENOTDIR));
            }
            loc = Some(Loc { parent: cur, name });
            cur = next;
        }
        let qid = self.qid(&st);
        let new = Fid {
            kind: FidKind::Path(PathFid::new(cur, &st, loc)),
            uid: n_uname,
        };
        self.insert_new(fid, new)?;
        Ok(Rmessage::Attach { qid })
    }

    fn walk(&self, fid: u32, newfid: u32, names: &[&[u8]]) -> Result<Rmessage<'static>, Errno> {
        let f = self.get(fid)?;
        let pf = f.path()?;
        if names.is_empty() && newfid == fid {
            // Cloning a fid onto itself changes nothing (and keeps it open).
            return Ok(Rmessage::Walk { qids: Vec::new() });
        }
        if newfid != fid && self.table().contains_key(&newfid) {
            return Err(Errno(libc::EBADF));
        }
        let mut cur = pf.fd.clone();
        let mut st = None;
        let mut loc = pf.loc.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut qids = Vec::with_capacity(names.len());
        for (i, raw) in names.iter().enumerate() {
            match self.walk_one(&cur, raw) {
                Ok((next, nst, nloc)) => {
                    qids.push(self.qid(&nst));
                    cur = next;
                    st = Some(nst);
                    loc = nloc;
                }
                Err(e) if i == 0 => return Err(e),
                Err(_) => return Ok(Rmessage::Walk { qids }),
            }
        }
        let st = match st {
            Some(st) => st,
            None => sys::fstat(cur.as_fd())?,
        };
        let new = Fid {
            kind: FidKind::Path(PathFid::new(cur, &st, loc)),
            uid: f.uid,
        };
        if newfid == fid {
            self.table().insert(newfid, Arc::new(new));
        } else {
            self.insert_new(newfid, new)?;
        }
        Ok(Rmessage::Walk { qids })
    }

    /// Resolve one component below `cur` without following symlinks.
    fn walk_one(
        &self,
        cur: &Arc<OwnedFd>,
        raw: &[u8],
    ) -> Result<(Arc<OwnedFd>, libc::stat64, Option<Loc>), Errno> {
        let name = fid::walk_name(raw)?;
        if raw == b".." {
            let here = sys::fstat(cur.as_fd())?;
            if self.is_root(&here) {
                return Ok((self.root.clone(), here, None));
            }
            let up = sys::openat(cur.as_raw_fd(), &name, libc::O_PATH | libc::O_DIRECTORY, 0)?;
            let st = sys::fstat(up.as_fd())?;
            self.check_inside(up.as_fd(), &st)?;
            return Ok((Arc::new(up), st, None));
        }
        let next = sys::open_path_at(cur.as_fd(), &name)?;
        let st = sys::fstat(next.as_fd())?;
        Ok((
            Arc::new(next),
            st,
            Some(Loc {
                parent: cur.clone(),
                name,
            }),
        ))
    }

    /// Verify that directory `fd` is the root or one of its descendants (the
    /// host may have moved a directory out of the export under a live fid).
    fn check_inside(&self, fd: BorrowedFd<'_>, st: &libc::stat64) -> Result<(), Errno> {
        let mut st = *st;
        let mut cur: Option<OwnedFd> = None;
        for _ in 0..MAX_DEPTH {
            if self.is_root(&st) {
                return Ok(());
            }
            let dir = cur.as_ref().map_or(fd, |c| c.as_fd());
            let up = sys::openat(dir.as_raw_fd(), c"..", libc::O_PATH | libc::O_DIRECTORY, 0)?;
            let ust = sys::fstat(up.as_fd())?;
            if ust.st_dev == st.st_dev && ust.st_ino == st.st_ino {
                // Reached the host's `/` without meeting the export root.
                return Err(Errno(libc::EACCES));
            }
            st = ust;
            cur = Some(up);
        }
        Err(Errno(libc::ELOOP))
    }

    pub(crate) fn is_root(&self, st: &libc::stat64) -> bool {
        st.st_dev == self.root_dev && st.st_ino == self.root_ino
    }

    /// The qid of a stat result. `version` stays 0: the Linux client compares
    /// it to decide inode identity, so it must not change with the contents.
    pub(crate) fn qid(&self, st: &libc::stat64) -> Qid {
        let ty = match st.st_mode & libc::S_IFMT {
            libc::S_IFDIR => qt::DIR,
            libc::S_IFLNK => qt::SYMLINK,
            _ => qt::FILE,
        };
        Qid {
            ty,
            version: 0,
            path: self.qid_path(st.st_dev, st.st_ino),
        }
    }

    /// Inode numbers of other filesystems mounted inside the export get the
    /// device mixed into their top bits to keep qid paths unique.
    pub(crate) fn qid_path(&self, dev: u64, ino: u64) -> u64 {
        if dev == self.root_dev {
            ino
        } else {
            ino ^ (dev.wrapping_mul(0x9e37_79b9_7f4a_7c15) & 0xffff_0000_0000_0000)
        }
    }

    pub(crate) fn table(&self) -> MutexGuard<'_, HashMap<u32, Arc<Fid>>> {
        self.fids.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn get(&self, fid: u32) -> Result<Arc<Fid>, Errno> {
        self.table().get(&fid).cloned().ok_or(Errno(libc::EBADF))
    }

    pub(crate) fn insert_new(&self, fid: u32, f: Fid) -> Result<(), Errno> {
        if fid == wire::NOFID {
            return Err(Errno(libc::EBADF));
        }
        let mut table = self.table();
        if table.len() >= self.max_fids {
            // Every fid holds host fds: bound what one guest can pin.
            return Err(Errno(libc::EMFILE));
        }
        match table.entry(fid) {
            std::collections::hash_map::Entry::Occupied(_) => Err(Errno(libc::EBADF)),
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(Arc::new(f));
                Ok(())
            }
        }
    }

    /// Largest payload of an `Rread`/`Rreaddir` under the current msize.
    pub(crate) fn max_payload(&self) -> usize {
        self.msize() as usize - wire::RREAD_HEADER_LEN
    }

    /// Start an `Rread`/`Rreaddir` whose count and size are patched by [`finish_data`].
    pub(crate) fn begin_data(ty: u8, tag: u16, resp: &mut Vec<u8>) {
        Encoder::begin(resp, ty, tag);
        resp.extend_from_slice(&[0; 4]);
    }
}

/// Patch count and size of a reply started with [`Server::begin_data`].
pub(crate) fn finish_data(resp: &mut [u8]) {
    let count = resp.len() - wire::RREAD_HEADER_LEN;
    finish_data_with(&mut resp[..wire::RREAD_HEADER_LEN], count);
}

/// Patch count and size of a reply header started with [`Server::begin_data`] whose
/// `count` data bytes follow it elsewhere (placed by a [`DirectIo`] transport).
pub(crate) fn finish_data_with(header: &mut [u8], count: usize) {
    let len = wire::RREAD_HEADER_LEN + count;
    header[..4].copy_from_slice(&(len as u32).to_le_bytes());
    header[HEADER_LEN..HEADER_LEN + 4].copy_from_slice(&(count as u32).to_le_bytes());
}

/// Read exactly `buf.len()` bytes of a message body. A body shorter than its size is
/// answered (`EPROTO`); any other failure of the transport is returned.
fn read_body(r: &mut impl Read, buf: &mut [u8]) -> io::Result<Result<(), Errno>> {
    match r.read_exact(buf) {
        Ok(()) => Ok(Ok(())),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(Err(Errno(libc::EPROTO))),
        Err(e) => Err(e),
    }
}
