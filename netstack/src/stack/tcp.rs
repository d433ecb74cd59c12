//! TCP NAT: guest connections become host sockets, port-forwarded host connections become
//! smoltcp connections to the guest, and bytes are relayed both ways.
//!
//! A guest SYN is held while a non-blocking host `connect` runs. On success a smoltcp socket is
//! created listening on the original destination (AnyIP) and the held SYN is injected into it,
//! so the guest's handshake completes only once the far side accepted; on failure (or after the
//! connect timeout) the SYN is injected with no listener and smoltcp answers RST. Retransmitted
//! SYNs while the connect runs are dropped. Host sockets are edge-triggered: readiness flags are
//! kept per flow and cleared on `EAGAIN`. A guest RST or a host error aborts the other side
//! (RST via `SO_LINGER` 0); FINs are relayed as half-closes.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddrV4, TcpStream};
use std::time::Instant;

use smoltcp::iface::SocketHandle;
use smoltcp::socket::tcp::{self, State};
use smoltcp::wire::{IpAddress, IpListenEndpoint};

use super::NetStack;
use crate::device::{QueueDevice, RxQueue};
use crate::nat::{FlowId, FlowKey, NatError, Proto};
use crate::sys;

#[derive(Debug)]
enum Phase {
    /// Host connect in progress; the guest's SYN is held.
    Connecting { syn: Vec<u8>, since: Instant },
    /// Relaying through a smoltcp socket.
    Open(SocketHandle),
}

/// One TCP connection.
#[derive(Debug)]
pub(super) struct TcpFlow {
    stream: TcpStream,
    phase: Phase,
    host_readable: bool,
    host_writable: bool,
    /// The host peer sent FIN (we closed the smoltcp side).
    host_eof: bool,
    /// We shut down the host socket's write half after the guest's FIN.
    host_shut_wr: bool,
    /// The smoltcp side reached a synchronized state at least once.
    established: bool,
    /// An error aborted the flow; remove once the RST went out.
    dead: bool,
}

impl TcpFlow {
    fn new(stream: TcpStream, phase: Phase) -> Self {
        Self {
            stream,
            phase,
            host_readable: true,
            host_writable: true,
            host_eof: false,
            host_shut_wr: false,
            established: false,
            dead: false,
        }
    }

    fn fail(&mut self, sock: &mut tcp::Socket) {
        sys::set_linger_zero(&self.stream);
        sock.abort();
        self.dead = true;
    }

    /// Moves bytes between the host socket and the smoltcp socket; true if anything happened.
    fn pump(&mut self, sock: &mut tcp::Socket) -> bool {
        if self.dead {
            return false;
        }
        let state = sock.state();
        if !self.established && synchronized(state) {
            self.established = true;
        }
        let mut moved = false;
        // Guest → host.
        while self.host_writable && sock.can_recv() {
            let stream = &self.stream;
            let r = sock.recv(|buf| match (&*stream).write(buf) {
                Ok(n) => (n, Ok(n)),
                Err(e) => (0, Err(e)),
            });
            match r {
                Ok(Ok(0)) => break,
                Ok(Ok(_)) => moved = true,
                Ok(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => self.host_writable = false,
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                _ => {
                    self.fail(sock);
                    return true;
                }
            }
        }
        // Guest FIN, once everything before it was written → host half-close.
        if self.established && !self.host_shut_wr && peer_closed(state) && sock.recv_queue() == 0 {
            let _ = self.stream.shutdown(Shutdown::Write);
            self.host_shut_wr = true;
            moved = true;
        }
        // Host → guest.
        while self.host_readable && !self.host_eof && sock.may_send() && sock.can_send() {
            let stream = &self.stream;
            let r = sock.send(|buf| {
                if buf.is_empty() {
                    return (0, Err(io::ErrorKind::WouldBlock.into()));
                }
                match (&*stream).read(buf) {
                    Ok(n) => (n, Ok(n)),
                    Err(e) => (0, Err(e)),
                }
            });
            match r {
                Ok(Ok(0)) => {
                    self.host_eof = true;
                    sock.close();
                    moved = true;
                }
                Ok(Ok(_)) => moved = true,
                Ok(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                    if sock.can_send() {
                        self.host_readable = false;
                    }
                    break;
                }
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                _ => {
                    self.fail(sock);
                    return true;
                }
            }
        }
        moved
    }
}

fn synchronized(s: State) -> bool {
    !matches!(
        s,
        State::Closed | State::Listen | State::SynSent | State::SynReceived
    )
}

fn peer_closed(s: State) -> bool {
    matches!(
        s,
        State::CloseWait | State::LastAck | State::Closing | State::TimeWait
    )
}

impl NetStack {
    fn new_tcp_socket(&self) -> tcp::Socket<'static> {
        let n = self.config.limits.tcp_buffer_size;
        let mut sock = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0u8; n]),
            tcp::SocketBuffer::new(vec![0u8; n]),
        );
        sock.set_nagle_enabled(false);
        sock
    }

    /// A guest SYN without ACK.
    pub(super) fn tcp_syn(&mut self, frame: &[u8], src: SocketAddrV4, dst: SocketAddrV4) {
        let key = FlowKey {
            proto: Proto::Tcp,
            guest: src,
            peer: dst,
        };
        if let Some(id) = self.nat.lookup(&key) {
            // Retransmission: held while connecting, smoltcp's business once open.
            if let Some(TcpFlow {
                phase: Phase::Open(_),
                ..
            }) = self.tcp.get(&id)
            {
                self.queue_for_smoltcp(frame);
            }
            return;
        }
        let Some(target) = self.plan.translate(dst) else {
            self.stats.tcp_refused += 1;
            // No socket listens there: smoltcp answers RST.
            self.queue_for_smoltcp(frame);
            return;
        };
        let now = Instant::now();
        let id = match self.nat.insert(key, now) {
            Ok(id) => id,
            Err(_) => {
                self.stats.flow_limit += 1;
                self.queue_for_smoltcp(frame);
                return;
            }
        };
        let stream = match sys::connect_nonblocking(target) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(%target, "Host connect failed at once: {e}");
                self.nat.remove(id);
                self.stats.tcp_refused += 1;
                self.queue_for_smoltcp(frame);
                return;
            }
        };
        if let Err(e) = self.epoll.add(&stream, sys::IN | sys::OUT | sys::ET, id) {
            tracing::warn!("epoll_ctl: {e}");
            self.nat.remove(id);
            return;
        }
        let phase = Phase::Connecting {
            syn: frame.to_vec(),
            since: now,
        };
        self.tcp.insert(id, TcpFlow::new(stream, phase));
    }

    /// Readiness of a TCP flow's host socket.
    pub(super) fn tcp_event(&mut self, id: FlowId, bits: u32, ts: smoltcp::time::Instant) {
        let Some(flow) = self.tcp.get_mut(&id) else {
            return;
        };
        if bits & (sys::IN | sys::ERR_HUP) != 0 {
            flow.host_readable = true;
        }
        if bits & (sys::OUT | sys::ERR_HUP) != 0 {
            flow.host_writable = true;
        }
        if !matches!(flow.phase, Phase::Connecting { .. }) || bits & (sys::OUT | sys::ERR_HUP) == 0
        {
            return;
        }
        let failed =
            bits & libc::EPOLLHUP as u32 != 0 || !matches!(flow.stream.take_error(), Ok(None));
        self.tcp_connect_done(id, !failed, ts);
    }

    /// Ends the connecting phase: opens the guest side or refuses it.
    fn tcp_connect_done(&mut self, id: FlowId, ok: bool, ts: smoltcp::time::Instant) {
        let Some(key) = self.nat.key(id) else { return };
        let Some(flow) = self.tcp.get_mut(&id) else {
            return;
        };
        let Phase::Connecting { syn, .. } = &flow.phase else {
            return;
        };
        let syn = syn.clone();
        let handle = if ok {
            let mut sock = self.new_tcp_socket();
            let ep = IpListenEndpoint {
                addr: Some(IpAddress::Ipv4(*key.peer.ip())),
                port: key.peer.port(),
            };
            if sock.listen(ep).is_err() {
                None
            } else {
                Some(self.sockets.add(sock))
            }
        } else {
            None
        };
        // Inject the held SYN: into the fresh listener, or nowhere (smoltcp answers RST).
        let mut one = RxQueue::default();
        one.push(&syn);
        let mut dev = QueueDevice {
            rx: &mut one,
            tx: &mut self.tx,
            caps: &self.caps,
            force: true,
        };
        self.iface
            .poll_ingress_single(ts, &mut dev, &mut self.sockets);
        let accepted = handle
            .is_some_and(|h| self.sockets.get::<tcp::Socket>(h).state() == State::SynReceived);
        match (handle, accepted) {
            (Some(h), true) => {
                self.stats.tcp_connected += 1;
                if let Some(flow) = self.tcp.get_mut(&id) {
                    flow.phase = Phase::Open(h);
                }
            }
            (h, _) => {
                if let Some(h) = h {
                    self.sockets.remove(h);
                }
                self.stats.tcp_refused += 1;
                self.remove_tcp(id, true);
            }
        }
    }

    /// New connections on port-forward listener `idx`.
    pub(super) fn tcp_accept(&mut self, idx: usize, now: Instant) {
        loop {
            let Some((listener, fwd)) = self.tcp_listeners.get(idx) else {
                return;
            };
            let fwd = *fwd;
            let stream = match listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // ECONNABORTED, EMFILE, ...: try again on the next readiness.
                    tracing::debug!("accept: {e}");
                    return;
                }
            };
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let _ = stream.set_nodelay(true);
            let guest = SocketAddrV4::new(self.config.guest_ip, fwd.guest_port);
            let (id, key) =
                match self
                    .nat
                    .insert_forwarded(Proto::Tcp, self.config.gateway_ip, guest, now)
                {
                    Ok(v) => v,
                    Err(NatError::Full | NatError::NoPort | NatError::Exists) => {
                        self.stats.flow_limit += 1;
                        sys::set_linger_zero(&stream);
                        continue;
                    }
                };
            let mut sock = self.new_tcp_socket();
            if sock
                .connect(self.iface.context(), key.guest, key.peer)
                .is_err()
            {
                self.nat.remove(id);
                sys::set_linger_zero(&stream);
                continue;
            }
            if let Err(e) = self.epoll.add(&stream, sys::IN | sys::OUT | sys::ET, id) {
                tracing::warn!("epoll_ctl: {e}");
                self.nat.remove(id);
                continue;
            }
            let handle = self.sockets.add(sock);
            self.stats.tcp_accepted += 1;
            self.tcp
                .insert(id, TcpFlow::new(stream, Phase::Open(handle)));
        }
    }

    /// Relays bytes for every open flow; true if anything moved.
    pub(super) fn pump_tcp(&mut self) -> bool {
        let mut moved = false;
        for flow in self.tcp.values_mut() {
            if let Phase::Open(h) = flow.phase {
                moved |= flow.pump(self.sockets.get_mut::<tcp::Socket>(h));
            }
        }
        moved
    }

    /// Removes finished flows and times out connects.
    pub(super) fn reap_tcp(&mut self, now: Instant) {
        let timeout = self.config.limits.tcp_connect_timeout;
        let mut done = Vec::new();
        let mut timed_out = Vec::new();
        for (id, flow) in &self.tcp {
            match &flow.phase {
                Phase::Connecting { since, .. } => {
                    if now.saturating_duration_since(*since) >= timeout {
                        timed_out.push(*id);
                    }
                }
                Phase::Open(h) => {
                    let sock = self.sockets.get::<tcp::Socket>(*h);
                    let finished = match sock.state() {
                        State::Closed => true,
                        State::TimeWait => {
                            sock.recv_queue() == 0 && (flow.host_shut_wr || flow.dead)
                        }
                        _ => false,
                    };
                    if finished {
                        let clean = flow.host_eof && flow.host_shut_wr && !flow.dead;
                        done.push((*id, *h, clean));
                    }
                }
            }
        }
        for (id, h, clean) in done {
            self.sockets.remove(h);
            self.remove_tcp(id, !clean);
        }
        for id in timed_out {
            let ts = self.smol_now(now);
            self.tcp_connect_done(id, false, ts);
        }
    }

    fn remove_tcp(&mut self, id: FlowId, reset: bool) {
        if let Some(flow) = self.tcp.remove(&id) {
            if reset {
                sys::set_linger_zero(&flow.stream);
            }
            let _ = self.epoll.delete(&flow.stream);
        }
        self.nat.remove(id);
    }

    /// The earliest connect timeout.
    pub(super) fn next_connect_deadline(&self) -> Option<Instant> {
        let timeout = self.config.limits.tcp_connect_timeout;
        self.tcp
            .values()
            .filter_map(|f| match f.phase {
                Phase::Connecting { since, .. } => Some(since + timeout),
                Phase::Open(_) => None,
            })
            .min()
    }
}
