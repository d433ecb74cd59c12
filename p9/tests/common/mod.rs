//! A small 9P2000.L test client: encodes T-messages with `p9::wire`, passes
//! them through the server and decodes the R-messages. By default a message goes through
//! `Server::handle_direct` with a transport that keeps file data in its own buffers (as
//! virtio-9p does with guest memory); `Client::copying` uses `Server::handle_message`.
#![allow(dead_code)]

use std::cell::RefCell;
use std::io::{self, Write};
use std::os::fd::BorrowedFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use p9::wire::{self, Dirent, Qid, Rgetattr, Rmessage, Tmessage};
use p9::{Config, Server};

pub const ROOT: u32 = 1;

/// A raw reply frame.
#[derive(Debug)]
pub struct Resp {
    pub buf: Vec<u8>,
}

impl Resp {
    pub fn msg(&self) -> Rmessage<'_> {
        Rmessage::decode_frame(&self.buf)
            .expect("server sent a malformed R-message")
            .1
    }
    pub fn tag(&self) -> u16 {
        Rmessage::decode_frame(&self.buf)
            .expect("malformed R-message")
            .0
    }
    pub fn errno(&self) -> Option<i32> {
        match self.msg() {
            Rmessage::Lerror { ecode } => Some(ecode as i32),
            _ => None,
        }
    }
}

/// The test fixture: `<tmp>/export` is exported, `<tmp>/outside` is not.
#[derive(Debug)]
pub struct Client {
    pub srv: Server,
    pub tmp: tempfile::TempDir,
    tag: u16,
    /// Serve through `handle_direct` (default) or `handle_message`.
    pub direct: bool,
}

impl Client {
    pub fn new() -> Self {
        Self::with(|_| {})
    }

    pub fn with(f: impl FnOnce(&mut Config)) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir(tmp.path().join("export")).unwrap();
        std::fs::create_dir(tmp.path().join("outside")).unwrap();
        std::fs::write(tmp.path().join("outside/secret"), b"top secret").unwrap();
        let mut cfg = Config::new(tmp.path().join("export"));
        f(&mut cfg);
        let srv = Server::new(cfg).unwrap();
        Client {
            srv,
            tmp,
            tag: 0,
            direct: true,
        }
    }

    pub fn from_server(srv: Server, tmp: tempfile::TempDir) -> Self {
        Client {
            srv,
            tmp,
            tag: 0,
            direct: true,
        }
    }

    /// Version + attach `ROOT`.
    pub fn attached() -> Self {
        let mut c = Self::new();
        c.version(1 << 20);
        c.attach(ROOT, b"").unwrap();
        c
    }

    pub fn export(&self) -> PathBuf {
        self.tmp.path().join("export")
    }

    pub fn outside(&self) -> PathBuf {
        self.tmp.path().join("outside")
    }

    /// The same fixture serving through `Server::handle_message` (file data copied).
    pub fn copying(mut self) -> Self {
        self.direct = false;
        self
    }

    pub fn raw(&self, frame: &[u8]) -> std::io::Result<Vec<u8>> {
        if !self.direct {
            return self.raw_copying(frame);
        }
        let reply = Rc::new(RefCell::new(vec![0u8; self.srv.msize() as usize]));
        let mut direct = Direct {
            request: frame.to_vec(),
            reply: reply.clone(),
        };
        let mut w = SharedWriter {
            buf: reply.clone(),
            pos: 0,
        };
        let len = self
            .srv
            .handle_direct(&mut &frame[..], &mut w, &mut direct)?;
        let mut out = reply.borrow().clone();
        assert!(len <= out.len(), "reply length {len} beyond the buffer");
        out.truncate(len);
        Ok(out)
    }

    /// `raw` through `Server::handle_message`.
    pub fn raw_copying(&self, frame: &[u8]) -> std::io::Result<Vec<u8>> {
        let mut r = frame;
        let mut out = Vec::new();
        self.srv.handle_message(&mut r, &mut out)?;
        Ok(out)
    }

    pub fn call(&mut self, m: &Tmessage<'_>) -> Resp {
        self.tag = self.tag.wrapping_add(1) % 0xfffe;
        let tag = if matches!(m, Tmessage::Version { .. }) {
            wire::NOTAG
        } else {
            self.tag
        };
        let mut frame = Vec::new();
        m.encode(tag, &mut frame).unwrap();
        let buf = self.raw(&frame).unwrap();
        let resp = Resp { buf };
        assert_eq!(resp.tag(), tag, "reply tag");
        assert!(
            resp.buf.len() <= self.srv.msize() as usize,
            "reply exceeds msize"
        );
        resp
    }

    /// Call and expect an error reply; returns the errno.
    pub fn err(&mut self, m: &Tmessage<'_>) -> i32 {
        let r = self.call(m);
        r.errno()
            .unwrap_or_else(|| panic!("expected Rlerror for {m:?}, got {:?}", r.msg()))
    }

    /// Call and expect a reply without payload.
    pub fn unit(&mut self, m: &Tmessage<'_>) -> Result<(), i32> {
        let r = self.call(m);
        match r.errno() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    pub fn version(&mut self, msize: u32) -> (u32, Vec<u8>) {
        let r = self.call(&Tmessage::Version {
            msize,
            version: b"9P2000.L",
        });
        match r.msg() {
            Rmessage::Version { msize, version } => (msize, version.to_vec()),
            other => panic!("{other:?}"),
        }
    }

    pub fn attach(&mut self, fid: u32, aname: &[u8]) -> Result<Qid, i32> {
        let r = self.call(&Tmessage::Attach {
            fid,
            afid: wire::NOFID,
            uname: b"root",
            aname,
            n_uname: 0,
        });
        match r.msg() {
            Rmessage::Attach { qid } => Ok(qid),
            Rmessage::Lerror { ecode } => Err(ecode as i32),
            other => panic!("{other:?}"),
        }
    }

    /// Walk; a partial walk is returned as `Ok` with fewer qids.
    pub fn walk(&mut self, fid: u32, newfid: u32, names: &[&[u8]]) -> Result<Vec<Qid>, i32> {
        let r = self.call(&Tmessage::Walk {
            fid,
            newfid,
            names: names.to_vec(),
        });
        match r.msg() {
            Rmessage::Walk { qids } => Ok(qids),
            Rmessage::Lerror { ecode } => Err(ecode as i32),
            other => panic!("{other:?}"),
        }
    }

    /// Walk from `ROOT` along `path` ("a/b") to `newfid`, all or nothing.
    pub fn walk_to(&mut self, newfid: u32, path: &str) -> Result<Vec<Qid>, i32> {
        let names: Vec<&[u8]> = path
            .split('/')
            .filter(|c| !c.is_empty())
            .map(str::as_bytes)
            .collect();
        let qids = self.walk(ROOT, newfid, &names)?;
        if qids.len() != names.len() {
            return Err(libc::ENOENT);
        }
        Ok(qids)
    }

    pub fn lopen(&mut self, fid: u32, flags: u32) -> Result<Qid, i32> {
        match self.call(&Tmessage::Lopen { fid, flags }).msg() {
            Rmessage::Lopen { qid, .. } => Ok(qid),
            Rmessage::Lerror { ecode } => Err(ecode as i32),
            other => panic!("{other:?}"),
        }
    }

    pub fn lcreate(&mut self, fid: u32, name: &[u8], flags: u32, mode: u32) -> Result<Qid, i32> {
        match self
            .call(&Tmessage::Lcreate {
                fid,
                name,
                flags,
                mode,
                gid: 0,
            })
            .msg()
        {
            Rmessage::Lcreate { qid, .. } => Ok(qid),
            Rmessage::Lerror { ecode } => Err(ecode as i32),
            other => panic!("{other:?}"),
        }
    }

    pub fn read(&mut self, fid: u32, offset: u64, count: u32) -> Result<Vec<u8>, i32> {
        match self.call(&Tmessage::Read { fid, offset, count }).msg() {
            Rmessage::Read { data } => Ok(data.to_vec()),
            Rmessage::Lerror { ecode } => Err(ecode as i32),
            other => panic!("{other:?}"),
        }
    }

    pub fn write(&mut self, fid: u32, offset: u64, data: &[u8]) -> Result<u32, i32> {
        match self.call(&Tmessage::Write { fid, offset, data }).msg() {
            Rmessage::Write { count } => Ok(count),
            Rmessage::Lerror { ecode } => Err(ecode as i32),
            other => panic!("{other:?}"),
        }
    }

    pub fn clunk(&mut self, fid: u32) -> Result<(), i32> {
        self.unit(&Tmessage::Clunk { fid })
    }

    pub fn getattr(&mut self, fid: u32) -> Result<Rgetattr, i32> {
        match self
            .call(&Tmessage::Getattr {
                fid,
                request_mask: wire::getattr::ALL,
            })
            .msg()
        {
            Rmessage::Getattr(a) => Ok(*a),
            Rmessage::Lerror { ecode } => Err(ecode as i32),
            other => panic!("{other:?}"),
        }
    }

    pub fn readlink(&mut self, fid: u32) -> Result<Vec<u8>, i32> {
        match self.call(&Tmessage::Readlink { fid }).msg() {
            Rmessage::Readlink { target } => Ok(target.to_vec()),
            Rmessage::Lerror { ecode } => Err(ecode as i32),
            other => panic!("{other:?}"),
        }
    }

    pub fn mkdir(&mut self, dfid: u32, name: &[u8], mode: u32) -> Result<Qid, i32> {
        match self
            .call(&Tmessage::Mkdir {
                dfid,
                name,
                mode,
                gid: 0,
            })
            .msg()
        {
            Rmessage::Mkdir { qid } => Ok(qid),
            Rmessage::Lerror { ecode } => Err(ecode as i32),
            other => panic!("{other:?}"),
        }
    }

    /// Readdir one batch: `(name, offset, type)` entries.
    pub fn readdir(
        &mut self,
        fid: u32,
        offset: u64,
        count: u32,
    ) -> Result<Vec<(Vec<u8>, u64, u8)>, i32> {
        let r = self.call(&Tmessage::Readdir { fid, offset, count });
        match r.msg() {
            Rmessage::Readdir { data } => Ok(Dirent::decode_all(data)
                .unwrap()
                .into_iter()
                .map(|d| (d.name.to_vec(), d.offset, d.ty))
                .collect()),
            Rmessage::Lerror { ecode } => Err(ecode as i32),
            other => panic!("{other:?}"),
        }
    }

    /// All names of a directory fid (opened here), following offsets.
    pub fn list(&mut self, dirfid: u32, count: u32) -> Vec<Vec<u8>> {
        let mut names = Vec::new();
        let mut off = 0;
        loop {
            let batch = self.readdir(dirfid, off, count).unwrap();
            let Some(last) = batch.last() else { break };
            off = last.1;
            names.extend(batch.into_iter().map(|e| e.0));
        }
        names.sort();
        names
    }
}

/// The effective uid of the test process.
pub fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Recursive listing of a host directory (to prove nothing changed outside).
pub fn snapshot(dir: &Path) -> Vec<(PathBuf, u64, u64)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let md = std::fs::symlink_metadata(e.path()).unwrap();
            use std::os::unix::fs::MetadataExt;
            out.push((e.path(), md.len(), md.nlink()));
            if md.is_dir() {
                stack.push(e.path());
            }
        }
    }
    out.sort();
    out
}

/// A transport with the message in its own buffers: the request bytes, and a reply buffer
/// of msize bytes that `SharedWriter` (headers) and `Direct` (file data) both fill.
struct Direct {
    request: Vec<u8>,
    reply: Rc<RefCell<Vec<u8>>>,
}

fn file(fd: BorrowedFd<'_>) -> std::fs::File {
    std::fs::File::from(fd.try_clone_to_owned().expect("dup"))
}

impl p9::DirectIo for Direct {
    fn request_len(&self) -> usize {
        self.request.len()
    }

    fn request_to_file(
        &mut self,
        at: usize,
        len: usize,
        fd: BorrowedFd<'_>,
        offset: u64,
    ) -> io::Result<usize> {
        let data = self
            .request
            .get(at..at + len)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EPROTO))?;
        file(fd).write_at(data, offset)
    }

    fn file_to_reply(
        &mut self,
        at: usize,
        len: usize,
        fd: BorrowedFd<'_>,
        offset: u64,
    ) -> io::Result<usize> {
        let mut reply = self.reply.borrow_mut();
        let end = at.saturating_add(len).min(reply.len());
        let Some(room) = reply.get_mut(at..end) else {
            return Ok(0);
        };
        let f = file(fd);
        if room.is_empty() {
            // As the virtio transport: a zero-length read still checks the fd.
            return f.read_at(&mut [], offset);
        }
        let mut done = 0;
        while done < room.len() {
            match f.read_at(&mut room[done..], offset + done as u64)? {
                0 => break,
                n => done += n,
            }
        }
        Ok(done)
    }
}

/// Writes at its position into the shared reply buffer, never past its end.
struct SharedWriter {
    buf: Rc<RefCell<Vec<u8>>>,
    pos: usize,
}

impl Write for SharedWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let mut buf = self.buf.borrow_mut();
        let n = data.len().min(buf.len().saturating_sub(self.pos));
        buf[self.pos..self.pos + n].copy_from_slice(&data[..n]);
        self.pos += n;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
