//! AF_VSOCK stream sockets (std has none) and the docker API proxy.
//!
//! The agent listens on vsock port [`DOCKER_PORT`] (any CID; the guest is CID 3) and proxies each
//! accepted connection byte-for-byte to `/run/docker.sock`: one thread per direction, 64 KiB reads,
//! half-close aware (EOF on one side becomes `shutdown(SHUT_WR)` on the other; the connection ends
//! when both directions have). An error in either direction shuts both sockets down fully.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// vsock port the docker API is served on.
pub const DOCKER_PORT: u32 = 2375;
/// The host's CID.
pub const HOST_CID: u32 = libc::VMADDR_CID_HOST;

/// A connected AF_VSOCK stream socket.
#[derive(Debug)]
pub struct VsockStream {
    fd: OwnedFd,
}

/// A listening AF_VSOCK socket.
#[derive(Debug)]
pub struct VsockListener {
    fd: OwnedFd,
}

fn addr(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain data.
    let mut a: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    a.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    a.svm_cid = cid;
    a.svm_port = port;
    a
}

fn socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket syscall.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by socket() and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

const ADDR_LEN: libc::socklen_t = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;

impl VsockListener {
    /// Binds and listens on `port` for any CID.
    pub fn bind(port: u32) -> io::Result<Self> {
        let fd = socket()?;
        let a = addr(libc::VMADDR_CID_ANY, port);
        // SAFETY: valid fd and a sockaddr_vm of ADDR_LEN bytes.
        if unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&a as *const libc::sockaddr_vm).cast(),
                ADDR_LEN,
            )
        } < 0
        {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: valid fd.
        if unsafe { libc::listen(fd.as_raw_fd(), 128) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(VsockListener { fd })
    }

    /// Accepts one connection; returns it and the peer's (cid, port).
    pub fn accept(&self) -> io::Result<(VsockStream, u32, u32)> {
        // SAFETY: sockaddr_vm is plain data.
        let mut a: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
        let mut len = ADDR_LEN;
        // SAFETY: valid fd and out-pointers sized by len.
        let fd = unsafe {
            libc::accept4(
                self.fd.as_raw_fd(),
                (&mut a as *mut libc::sockaddr_vm).cast(),
                &mut len,
                libc::SOCK_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd was just returned by accept4 and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let s = VsockStream { fd };
        Ok((s, a.svm_cid, a.svm_port))
    }
}

impl VsockStream {
    /// Connects to `cid:port`.
    pub fn connect(cid: u32, port: u32) -> io::Result<Self> {
        let fd = socket()?;
        let a = addr(cid, port);
        loop {
            // SAFETY: valid fd and a sockaddr_vm of ADDR_LEN bytes.
            let r = unsafe {
                libc::connect(
                    fd.as_raw_fd(),
                    (&a as *const libc::sockaddr_vm).cast(),
                    ADDR_LEN,
                )
            };
            if r == 0 {
                return Ok(VsockStream { fd });
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// A second handle on the same socket.
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(VsockStream {
            fd: self.fd.try_clone()?,
        })
    }

    /// `shutdown(2)`.
    pub fn shutdown(&self, how: std::net::Shutdown) -> io::Result<()> {
        shutdown_fd(&self.fd, how)
    }
}

fn shutdown_fd(fd: &impl AsRawFd, how: std::net::Shutdown) -> io::Result<()> {
    let how = match how {
        std::net::Shutdown::Read => libc::SHUT_RD,
        std::net::Shutdown::Write => libc::SHUT_WR,
        std::net::Shutdown::Both => libc::SHUT_RDWR,
    };
    // SAFETY: plain syscall on a valid fd.
    if unsafe { libc::shutdown(fd.as_raw_fd(), how) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Read for &VsockStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: buf is valid writable memory of buf.len() bytes.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}

impl Write for &VsockStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // SAFETY: buf is valid readable memory of buf.len() bytes; MSG_NOSIGNAL avoids SIGPIPE.
        let n = unsafe {
            libc::send(
                self.fd.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Read for VsockStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&*self).read(buf)
    }
}

impl Write for VsockStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&*self).write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsRawFd for VsockStream {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }
}

/// Copies `from` → `to` until EOF, then half-closes `to`. On an error, shuts both down fully so
/// the other direction's thread wakes up too. Returns the bytes copied.
pub fn pump<R, W>(
    mut from: R,
    mut to: W,
    from_fd: &impl AsRawFd,
    to_fd: &impl AsRawFd,
) -> io::Result<u64>
where
    R: Read,
    W: Write,
{
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    let res = loop {
        let n = match from.read(&mut buf) {
            Ok(0) => break Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => break Err(e),
        };
        if let Err(e) = to.write_all(&buf[..n]) {
            break Err(e);
        }
        total += n as u64;
    };
    match res {
        Ok(_) => {
            let _ = shutdown_fd(to_fd, std::net::Shutdown::Write);
        }
        Err(_) => {
            let _ = shutdown_fd(from_fd, std::net::Shutdown::Both);
            let _ = shutdown_fd(to_fd, std::net::Shutdown::Both);
        }
    }
    res
}

/// Proxies one vsock connection to the unix socket at `target` (both directions, half-close aware).
pub fn proxy(conn: VsockStream, target: &Path) -> io::Result<()> {
    let unix = match UnixStream::connect(target) {
        Ok(u) => u,
        Err(e) => {
            let _ = conn.shutdown(std::net::Shutdown::Both);
            return Err(e);
        }
    };
    let conn = Arc::new(conn);
    let unix = Arc::new(unix);
    let (c2, u2) = (conn.clone(), unix.clone());
    let up = std::thread::Builder::new()
        .name("proxy-up".into())
        .spawn(move || pump(&*c2, &*u2, &*c2, &*u2))?;
    let down = pump(&*unix, &*conn, &*unix, &*conn);
    let up = up
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("proxy thread panicked")));
    crate::debug!(
        "proxy closed: host->dockerd {:?}, dockerd->host {:?}",
        up.as_ref().map_err(|e| e.to_string()),
        down.as_ref().map_err(|e| e.to_string())
    );
    Ok(())
}

/// Accept loop: serves the docker API on vsock `port`, one proxy thread per connection. Returns
/// only if the listener cannot be created.
pub fn serve(port: u32, target: PathBuf) -> io::Error {
    let listener = match VsockListener::bind(port) {
        Ok(l) => l,
        Err(e) => return e,
    };
    crate::info!("listening on vsock port {port} -> {}", target.display());
    loop {
        match listener.accept() {
            Ok((conn, cid, peer_port)) => {
                crate::debug!("vsock connection from {cid}:{peer_port}");
                let target = target.clone();
                let spawned = std::thread::Builder::new()
                    .name("proxy".into())
                    .spawn(move || {
                        if let Err(e) = proxy(conn, &target) {
                            crate::info!("proxy to {}: {e}", target.display());
                        }
                    });
                if let Err(e) = spawned {
                    crate::info!("cannot start proxy thread: {e}");
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                crate::info!("vsock accept: {e}");
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pump over unix socket pairs: data both ways, half-close propagates.
    #[test]
    fn pump_half_close() {
        let (client, a) = UnixStream::pair().unwrap();
        let (b, server) = UnixStream::pair().unwrap();
        let (a, b) = (Arc::new(a), Arc::new(b));
        let (a2, b2) = (a.clone(), b.clone());
        let t1 = std::thread::spawn(move || pump(&*a2, &*b2, &*a2, &*b2).unwrap());
        let (a3, b3) = (a.clone(), b.clone());
        let t2 = std::thread::spawn(move || pump(&*b3, &*a3, &*b3, &*a3).unwrap());
        let mut client = client;
        let mut server = server;
        client.write_all(b"GET /_ping HTTP/1.1\r\n\r\n").unwrap();
        client.shutdown(std::net::Shutdown::Write).unwrap();
        let mut req = String::new();
        server.read_to_string(&mut req).unwrap(); // EOF arrives: half-close propagated
        assert_eq!(req, "GET /_ping HTTP/1.1\r\n\r\n");
        server.write_all(b"OK").unwrap();
        drop(server);
        let mut resp = String::new();
        client.read_to_string(&mut resp).unwrap();
        assert_eq!(resp, "OK");
        assert_eq!(t1.join().unwrap(), 23);
        assert_eq!(t2.join().unwrap(), 2);
    }
}
