//! The unix-socket muxer: host unix sockets ⇄ guest vsock stream connections (virtio 1.2
//! §5.10.6), in the style of Firecracker's hybrid vsock but configured by a map instead of a
//! `CONNECT` handshake.
//!
//! - Every connection accepted on a configured listener becomes a guest stream connection to
//!   that listener's guest port: REQUEST from a fresh ephemeral host port; the guest's
//!   RESPONSE establishes it, its RST closes the unix stream.
//! - A guest REQUEST to host port P connects (non-blocking) to the unix socket configured for
//!   P and answers RESPONSE, or RST if P is not configured or the connect fails.
//! - Packets for unknown connections are answered with RST (never an RST to an RST).
//!
//! Events: readiness of the listener fds (accept) and of each connection's stream (read when
//! the guest has credit, write when guest data is buffered). Every fd is non-blocking and is
//! watched only for what it needs now ([`Connection::interest`]); registrations are handed
//! to the device's event loop as [`FdOp`]s, and a stream is closed only after its
//! deregistration. Control replies not tied to a live connection wait in a bounded queue;
//! when it is full the muxer pushes back on the tx queue.

pub mod connection;

#[cfg(test)]
mod tests;

use std::collections::{HashMap, VecDeque};
use std::io;
use std::mem::offset_of;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use event_manager::EventSet;
use tracing::{debug, warn};

use self::connection::{Connection, Next, State, Verdict};
use super::{
    op, Backpressure, FdOp, PacketHeader, TxPacket, VsockBackend, VsockConfig, VsockError,
    VsockMetrics,
};

/// Most connections open at once; more are refused.
pub const MAX_CONNECTIONS: usize = 1024;
/// Most control packets (RSTs for unknown connections) waiting for rx buffers before the
/// muxer stops taking tx packets.
pub const MAX_PENDING_CTRL: usize = 256;
/// First host port used for host-initiated connections.
pub const EPHEMERAL_PORT_BASE: u32 = 1 << 30;
/// Connections accepted per listener readiness event (fairness with other fds).
const ACCEPT_BATCH: usize = 32;

/// A connection's ports, from the host's side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnKey {
    /// Host port.
    pub local_port: u32,
    /// Guest port.
    pub peer_port: u32,
}

#[derive(Debug, Clone, Copy)]
enum FdOwner {
    Listener(usize),
    Conn(ConnKey),
}

/// The production [`VsockBackend`]: see the module documentation.
#[derive(Debug)]
pub struct UnixMuxer {
    listeners: Vec<(UnixListener, u32)>,
    host_ports: HashMap<u32, PathBuf>,
    conns: HashMap<ConnKey, Connection>,
    fds: HashMap<RawFd, FdOwner>,
    ctrl: VecDeque<PacketHeader>,
    rxq: VecDeque<ConnKey>,
    fd_ops: Vec<FdOp>,
    next_port: u32,
    listening: bool,
    metrics: Arc<VsockMetrics>,
}

impl UnixMuxer {
    /// Build the muxer from the listeners and host-port map of `config`.
    pub fn new(config: VsockConfig, metrics: Arc<VsockMetrics>) -> Result<Self, VsockError> {
        let mut host_ports = HashMap::new();
        for (port, path) in config.host_ports {
            if host_ports.insert(port, path).is_some() {
                return Err(VsockError::DuplicateHostPort(port));
            }
        }
        for (listener, _) in &config.listeners {
            listener
                .set_nonblocking(true)
                .map_err(VsockError::Listener)?;
        }
        Ok(UnixMuxer {
            listeners: config.listeners,
            host_ports,
            conns: HashMap::new(),
            fds: HashMap::new(),
            ctrl: VecDeque::new(),
            rxq: VecDeque::new(),
            fd_ops: Vec::new(),
            next_port: EPHEMERAL_PORT_BASE,
            listening: false,
            metrics,
        })
    }

    /// Number of open connections.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// The connection with these ports, if open.
    pub fn connection(&self, key: ConnKey) -> Option<&Connection> {
        self.conns.get(&key)
    }

    fn queue_rst(&mut self, local_port: u32, peer_port: u32) {
        self.ctrl.push_back(PacketHeader {
            src_port: local_port,
            dst_port: peer_port,
            op: op::RST,
            ..PacketHeader::default()
        });
        VsockMetrics::inc(&self.metrics.rst_sent);
    }

    /// Remove a connection, deregister and close its stream, optionally RST the guest.
    fn kill(&mut self, key: ConnKey, rst: bool) {
        let Some(conn) = self.conns.remove(&key) else {
            return;
        };
        let fd = conn.stream().as_raw_fd();
        if conn.registered.is_some() {
            self.fd_ops.push(FdOp::Remove(fd));
        }
        self.fds.remove(&fd);
        self.fd_ops
            .push(FdOp::Close(OwnedFd::from(conn.into_stream())));
        VsockMetrics::inc(&self.metrics.conns_closed);
        if rst {
            self.queue_rst(key.local_port, key.peer_port);
        }
    }

    /// Apply a verdict: keep (update interest, schedule rx) or remove.
    fn settle(&mut self, key: ConnKey, verdict: Verdict) {
        match verdict {
            Verdict::Keep => {
                self.sync_interest(key);
                self.schedule(key);
            }
            Verdict::Rst => self.kill(key, true),
            Verdict::Gone => self.kill(key, false),
        }
    }

    fn schedule(&mut self, key: ConnKey) {
        if let Some(conn) = self.conns.get_mut(&key) {
            if !conn.queued && conn.wants_rx() {
                conn.queued = true;
                self.rxq.push_back(key);
            }
        }
    }

    fn sync_interest(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        let fd = conn.stream().as_raw_fd();
        let want = conn.interest();
        match conn.registered {
            None if !want.is_empty() => self.fd_ops.push(FdOp::Add(fd, want)),
            Some(_) if want.is_empty() => self.fd_ops.push(FdOp::Remove(fd)),
            Some(cur) if cur != want => self.fd_ops.push(FdOp::Modify(fd, want)),
            _ => return,
        }
        conn.registered = (!want.is_empty()).then_some(want);
    }

    fn insert(&mut self, key: ConnKey, conn: Connection) {
        self.fds
            .insert(conn.stream().as_raw_fd(), FdOwner::Conn(key));
        self.conns.insert(key, conn);
        self.settle(key, Verdict::Keep);
    }

    /// A guest REQUEST for a connection we do not have.
    fn connect_to_host(&mut self, hdr: &PacketHeader) {
        let key = ConnKey {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
        };
        let stream = if self.conns.len() >= MAX_CONNECTIONS {
            Err(io::Error::other("connection limit reached"))
        } else {
            match self.host_ports.get(&hdr.dst_port) {
                Some(path) => connect_nonblocking(path),
                None => Err(io::ErrorKind::NotFound.into()),
            }
        };
        match stream {
            Ok(stream) => {
                VsockMetrics::inc(&self.metrics.conns_opened);
                self.insert(key, Connection::new_peer(stream, hdr));
            }
            Err(e) => {
                debug!(
                    port = hdr.dst_port,
                    "virtio-vsock: refusing guest connection: {e}"
                );
                VsockMetrics::inc(&self.metrics.conns_refused);
                self.queue_rst(key.local_port, key.peer_port);
            }
        }
    }

    fn alloc_port(&mut self, peer_port: u32) -> u32 {
        loop {
            let port = self.next_port;
            self.next_port = match self.next_port.checked_add(1) {
                Some(p) if p != u32::MAX => p,
                _ => EPHEMERAL_PORT_BASE,
            };
            let key = ConnKey {
                local_port: port,
                peer_port,
            };
            // At most MAX_CONNECTIONS ports are taken: this terminates quickly.
            if !self.conns.contains_key(&key) && !self.host_ports.contains_key(&port) {
                return port;
            }
        }
    }

    fn accept(&mut self, idx: usize) {
        for _ in 0..ACCEPT_BATCH {
            let Some((listener, guest_port)) = self.listeners.get(idx) else {
                return;
            };
            let guest_port = *guest_port;
            let stream = match listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    warn!("virtio-vsock: accept failed: {e}");
                    VsockMetrics::inc(&self.metrics.io_errors);
                    return;
                }
            };
            if self.conns.len() >= MAX_CONNECTIONS {
                debug!("virtio-vsock: connection limit reached, closing accepted stream");
                VsockMetrics::inc(&self.metrics.conns_refused);
                continue;
            }
            if let Err(e) = stream.set_nonblocking(true) {
                warn!("virtio-vsock: cannot make a stream non-blocking: {e}");
                VsockMetrics::inc(&self.metrics.io_errors);
                continue;
            }
            let local_port = self.alloc_port(guest_port);
            let key = ConnKey {
                local_port,
                peer_port: guest_port,
            };
            self.insert(key, Connection::new_local(stream, local_port, guest_port));
        }
    }
}

impl VsockBackend for UnixMuxer {
    fn activate(&mut self) {
        if self.listening {
            return;
        }
        for (idx, (listener, _)) in self.listeners.iter().enumerate() {
            let fd = listener.as_raw_fd();
            self.fds.insert(fd, FdOwner::Listener(idx));
            self.fd_ops.push(FdOp::Add(fd, EventSet::IN));
        }
        self.listening = true;
    }

    fn reset(&mut self) {
        let keys: Vec<ConnKey> = self.conns.keys().copied().collect();
        for key in keys {
            self.kill(key, false);
        }
        if self.listening {
            for (listener, _) in &self.listeners {
                let fd = listener.as_raw_fd();
                self.fds.remove(&fd);
                self.fd_ops.push(FdOp::Remove(fd));
            }
            self.listening = false;
        }
        self.ctrl.clear();
        self.rxq.clear();
    }

    fn send_pkt(&mut self, pkt: &TxPacket) -> Result<(), Backpressure> {
        if self.ctrl.len() >= MAX_PENDING_CTRL {
            return Err(Backpressure);
        }
        let hdr = &pkt.hdr;
        let key = ConnKey {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
        };
        if let Some(conn) = self.conns.get_mut(&key) {
            let was_connecting = conn.state() == State::Connecting;
            let verdict = match conn.handle_pkt(pkt) {
                Ok(v) => v,
                Err(e) => {
                    debug!(
                        key.local_port,
                        key.peer_port, "virtio-vsock: protocol error: {e}"
                    );
                    VsockMetrics::inc(&self.metrics.protocol_errors);
                    Verdict::Rst
                }
            };
            if was_connecting && conn.state() == State::Established {
                VsockMetrics::inc(&self.metrics.conns_opened);
            }
            self.settle(key, verdict);
            return Ok(());
        }
        match hdr.op {
            op::REQUEST => self.connect_to_host(hdr),
            op::RST => {}
            _ => self.queue_rst(key.local_port, key.peer_port),
        }
        Ok(())
    }

    fn reject(&mut self, hdr: &PacketHeader) {
        let key = ConnKey {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
        };
        if self.conns.contains_key(&key) {
            self.kill(key, true);
        } else if hdr.op != op::RST {
            self.queue_rst(key.local_port, key.peer_port);
        }
    }

    fn has_pending_rx(&self) -> bool {
        !self.ctrl.is_empty() || !self.rxq.is_empty()
    }

    fn recv_pkt(&mut self, buf: &mut [u8]) -> Option<(PacketHeader, usize)> {
        if let Some(hdr) = self.ctrl.pop_front() {
            return Some((hdr, 0));
        }
        while let Some(key) = self.rxq.pop_front() {
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            conn.queued = false;
            match conn.next_pkt(buf) {
                Next::Pkt(hdr, n) => {
                    self.settle(key, Verdict::Keep);
                    return Some((hdr, n));
                }
                Next::Nothing => self.settle(key, Verdict::Keep),
                Next::Rst => {
                    self.kill(key, true);
                    return self.ctrl.pop_front().map(|hdr| (hdr, 0));
                }
            }
        }
        None
    }

    fn handle_fd_event(&mut self, fd: RawFd, events: EventSet) {
        match self.fds.get(&fd).copied() {
            Some(FdOwner::Listener(idx)) => self.accept(idx),
            Some(FdOwner::Conn(key)) => {
                let Some(conn) = self.conns.get_mut(&key) else {
                    return;
                };
                let watched = conn.registered.unwrap_or(EventSet::empty());
                let trouble = events.intersects(EventSet::HANG_UP | EventSet::ERROR);
                if watched.contains(EventSet::IN) && (events.contains(EventSet::IN) || trouble) {
                    conn.on_readable();
                }
                let mut verdict = Verdict::Keep;
                if watched.contains(EventSet::OUT) && (events.contains(EventSet::OUT) || trouble) {
                    verdict = conn.on_writable();
                    if verdict == Verdict::Rst {
                        VsockMetrics::inc(&self.metrics.io_errors);
                    }
                }
                self.settle(key, verdict);
            }
            None => debug!(fd, "virtio-vsock: event for an unknown fd"),
        }
    }

    fn take_fd_ops(&mut self, out: &mut Vec<FdOp>) {
        out.append(&mut self.fd_ops);
    }
}

/// Connect to the unix socket at `path` without blocking: a listener whose backlog is full
/// refuses (EAGAIN) instead of stalling the device event loop.
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    let mut addr = libc::sockaddr_un {
        sun_family: libc::AF_UNIX as libc::sa_family_t,
        sun_path: [0; 108],
    };
    // Keep a terminating NUL.
    if bytes.len() >= addr.sun_path.len() || bytes.is_empty() {
        return Err(io::ErrorKind::InvalidInput.into());
    }
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    let len = offset_of!(libc::sockaddr_un, sun_path) + bytes.len() + 1;
    // SAFETY: socket(2) takes no pointers; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a freshly created socket that nothing else owns.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: `addr` is a valid, initialised sockaddr_un and `len` does not exceed its size;
    // connect(2) only reads it.
    let rc = unsafe {
        libc::connect(
            owned.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast::<libc::sockaddr>(),
            // len <= size_of::<sockaddr_un>() (110).
            len as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(owned))
}
