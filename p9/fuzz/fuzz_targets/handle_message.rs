//! Fuzz `Server::handle_message` on a temporary export: the input is a
//! stream of T-messages served one after another. The server must never
//! panic, every answer must be a well-formed R-message, and nothing outside
//! the export may change. Inputs whose first byte is odd are served through
//! `Server::handle_direct` instead, one frame (by its size field) at a time,
//! with a transport holding the frame and an msize reply buffer, as
//! virtio-9p does with guest memory.
#![no_main]

use std::cell::RefCell;
use std::io::{self, Write};
use std::os::fd::BorrowedFd;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use p9::wire::{Rmessage, Tmessage, NOFID};
use p9::{Config, Server};

struct Fixture {
    _tmp: tempfile::TempDir,
    outside: PathBuf,
    srv: Server,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let tmp = tempfile::tempdir().unwrap();
        let export = tmp.path().join("export");
        let outside = tmp.path().join("outside");
        std::fs::create_dir_all(export.join("d/e")).unwrap();
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("secret"), b"secret").unwrap();
        std::fs::write(export.join("f"), b"file").unwrap();
        std::os::unix::fs::symlink("/etc", export.join("etc")).unwrap();
        std::os::unix::fs::symlink(&outside, export.join("out")).unwrap();
        let srv = Server::new(Config::new(&export)).unwrap();
        Fixture {
            _tmp: tmp,
            outside,
            srv,
        }
    })
}

fn send(srv: &Server, m: Tmessage<'_>) {
    let mut f = Vec::new();
    m.encode(1, &mut f).unwrap();
    srv.handle_message(&mut &f[..], &mut Vec::new()).unwrap();
}

fuzz_target!(|data: &[u8]| {
    let fx = fixture();
    // Restore what earlier inputs may have removed (all inside the export).
    let export = fx.outside.with_file_name("export");
    let _ = std::fs::create_dir_all(export.join("d/e"));
    if std::fs::symlink_metadata(export.join("f")).is_err() {
        let _ = std::fs::write(export.join("f"), b"file");
    }
    // A fresh session with fid 0 at the root for every input.
    send(
        &fx.srv,
        Tmessage::Version {
            msize: 1 << 16,
            version: b"9P2000.L",
        },
    );
    let attach = Tmessage::Attach {
        fid: 0,
        afid: NOFID,
        uname: b"",
        aname: b"",
        n_uname: 0,
    };
    send(&fx.srv, attach);
    let direct = data.first().is_some_and(|b| b & 1 == 1);
    let mut input = data.get(1..).unwrap_or_default();
    for _ in 0..64 {
        if input.is_empty() {
            break;
        }
        let out = if direct {
            // One frame: as many bytes as its size field says (or what is left).
            let size = input
                .get(..4)
                .map_or(input.len(), |s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]) as usize);
            let (frame, rest) = input.split_at(size.clamp(1, input.len()));
            input = rest;
            match serve_direct(&fx.srv, frame) {
                Some(out) => out,
                None => break,
            }
        } else {
            let mut out = Vec::new();
            if fx.srv.handle_message(&mut input, &mut out).is_err() {
                break;
            }
            out
        };
        Rmessage::decode_frame(&out).expect("well-formed reply");
    }
    assert_eq!(std::fs::read(fx.outside.join("secret")).unwrap(), b"secret");
    assert_eq!(std::fs::read_dir(&fx.outside).unwrap().count(), 1);
});

/// Serve `frame` through `handle_direct`; the reply, or `None` when the server
/// returned an error (a frame too short for a tag).
fn serve_direct(srv: &Server, frame: &[u8]) -> Option<Vec<u8>> {
    let reply = Rc::new(RefCell::new(vec![0u8; srv.msize() as usize]));
    let mut direct = Direct {
        request: frame.to_vec(),
        reply: reply.clone(),
    };
    let mut w = SharedWriter {
        buf: reply.clone(),
        pos: 0,
    };
    let len = srv.handle_direct(&mut &frame[..], &mut w, &mut direct).ok()?;
    let mut out = reply.borrow().clone();
    assert!(len <= out.len(), "reply length beyond the buffer");
    out.truncate(len);
    Some(out)
}

/// The frame and a reply buffer that `SharedWriter` (headers) and the server's
/// direct file I/O both fill.
struct Direct {
    request: Vec<u8>,
    reply: Rc<RefCell<Vec<u8>>>,
}

fn file(fd: BorrowedFd<'_>) -> io::Result<std::fs::File> {
    Ok(std::fs::File::from(fd.try_clone_to_owned()?))
}

impl p9::DirectIo for Direct {
    fn request_len(&self) -> usize {
        self.request.len()
    }

    fn request_to_file(&mut self, at: usize, len: usize, fd: BorrowedFd<'_>, offset: u64) -> io::Result<usize> {
        let data = self
            .request
            .get(at..at.saturating_add(len))
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EPROTO))?;
        file(fd)?.write_at(data, offset)
    }

    fn file_to_reply(&mut self, at: usize, len: usize, fd: BorrowedFd<'_>, offset: u64) -> io::Result<usize> {
        let mut reply = self.reply.borrow_mut();
        let end = at.saturating_add(len).min(reply.len());
        let Some(room) = reply.get_mut(at..end) else {
            return Ok(0);
        };
        file(fd)?.read_at(room, offset)
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
