//! [`NetStack`]: the gateway the guest talks to. Owns the smoltcp interface, the frame queues,
//! the NAT table and every host socket; driven entirely by the caller's event loop.
//!
//! Events handled by [`NetStack::poll`]: guest frames queued by [`NetStack::receive_frame`],
//! readiness of host sockets (connect completion, data, hang-up, new connections/datagrams on
//! port-forward listeners) collected from the internal epoll set, smoltcp timers and NAT idle
//! timers (internal timerfd), and the TX queue draining below half (internal eventfd).
//! TCP lives in `tcp.rs`, UDP/DNS and ICMP echo in `udp.rs`.

mod tcp;
mod udp;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr, TcpListener, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use smoltcp::iface::{Config as IfaceConfig, Interface, PollResult, SocketHandle, SocketSet};
use smoltcp::phy::DeviceCapabilities;
use smoltcp::socket::raw;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr, IpProtocol, IpVersion, Ipv4Cidr};

use crate::config::{parse_resolv_conf, Config, PortForward};
use crate::device::{capabilities, QueueDevice, RxQueue, TxQueue};
use crate::frame::{parse_guest_frame, GuestPacket, Malformed};
use crate::nat::{AddressPlan, FlowId, NatLimits, NatTable, FIRST_FLOW_ID};
use crate::sys::{self, Epoll, EventFd, TimerFd};
use crate::Error;

use tcp::TcpFlow;
use udp::{IcmpFlow, UdpFlow};

const TOKEN_TIMER: u64 = 0;
const TOKEN_WAKER: u64 = 1;
const TOKEN_TCP_LISTENER: u64 = 0x100;
const TOKEN_UDP_LISTENER: u64 = 0x8000;
/// Rounds of "move host data / run smoltcp" per `poll` before yielding to the caller.
const MAX_ROUNDS: usize = 16;

/// Counters, for diagnostics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Frames received from the guest.
    pub rx_frames: u64,
    /// Frames handed to the guest.
    pub tx_frames: u64,
    /// Guest frames dropped as malformed (truncated, bad lengths), checksums excluded.
    pub malformed: u64,
    /// Guest frames dropped for a bad checksum.
    pub bad_checksum: u64,
    /// Well-formed guest frames not handled (IPv6, fragments, other protocols, ...).
    pub ignored: u64,
    /// Guest frames with a source address other than the guest's.
    pub spoofed: u64,
    /// Guest frames dropped because the RX queue was full.
    pub rx_queue_full: u64,
    /// Outbound TCP connections established on the host.
    pub tcp_connected: u64,
    /// Outbound TCP connections refused (policy, host connect failure or timeout).
    pub tcp_refused: u64,
    /// Port-forwarded TCP connections accepted on the host.
    pub tcp_accepted: u64,
    /// Flows refused because a flow limit was reached.
    pub flow_limit: u64,
    /// UDP flows opened (both directions).
    pub udp_flows: u64,
    /// UDP datagrams dropped (no route, send failure, too large, queue full).
    pub udp_dropped: u64,
    /// DNS queries forwarded.
    pub dns_queries: u64,
    /// ICMP echo requests answered or forwarded.
    pub icmp_echo: u64,
}

/// The netstack. See the crate docs for how to drive it.
pub struct NetStack {
    config: Config,
    plan: AddressPlan,
    epoll: Epoll,
    timer: TimerFd,
    waker: EventFd,
    epoch: Instant,
    iface: Interface,
    sockets: SocketSet<'static>,
    caps: DeviceCapabilities,
    rx: RxQueue,
    tx: TxQueue,
    nat: NatTable,
    tcp: HashMap<FlowId, TcpFlow>,
    udp: HashMap<FlowId, UdpFlow>,
    icmp: HashMap<FlowId, IcmpFlow>,
    tcp_listeners: Vec<(TcpListener, PortForward)>,
    udp_listeners: Vec<(UdpSocket, PortForward)>,
    udp_clients: HashMap<(usize, SocketAddr), FlowId>,
    udp_raw: SocketHandle,
    icmp_raw: SocketHandle,
    icmp_unavailable: bool,
    next_delay: Option<Duration>,
    stats: Stats,
    scratch: Vec<u8>,
    events: Vec<libc::epoll_event>,
}

impl std::fmt::Debug for NetStack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetStack")
            .field("guest_ip", &self.config.guest_ip)
            .field("tcp_flows", &self.tcp.len())
            .field("udp_flows", &self.udp.len())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> Error {
    move |source| Error::Io { what, source }
}

impl NetStack {
    /// Builds the stack: validates `config`, reads the upstream resolver from
    /// `config.resolv_conf` (DNS is disabled, with a warning, if it has none), and binds the
    /// port-forward listeners on `config.forward_bind`.
    pub fn new(config: Config) -> Result<Self, Error> {
        config.validate()?;
        let upstream = match std::fs::read_to_string(&config.resolv_conf) {
            Ok(text) => parse_resolv_conf(&text),
            Err(e) => {
                tracing::warn!(path = %config.resolv_conf.display(), "Cannot read resolv.conf: {e}");
                None
            }
        };
        if upstream.is_none() {
            tracing::warn!("No upstream nameserver: guest DNS queries will be dropped");
        }
        let plan = AddressPlan::new(&config, upstream);

        let epoll = Epoll::new().map_err(io_err("epoll_create1"))?;
        let timer = TimerFd::new().map_err(io_err("timerfd_create"))?;
        let waker = EventFd::new().map_err(io_err("eventfd"))?;
        epoll
            .add(&timer, sys::IN, TOKEN_TIMER)
            .map_err(io_err("epoll_ctl"))?;
        epoll
            .add(&waker, sys::IN, TOKEN_WAKER)
            .map_err(io_err("epoll_ctl"))?;

        let mut tcp_listeners = Vec::new();
        for (i, fwd) in config.tcp_forwards.iter().enumerate() {
            let addr = SocketAddr::new(config.forward_bind, fwd.host_port);
            let l = TcpListener::bind(addr).map_err(|source| Error::Bind {
                proto: "TCP",
                addr,
                source,
            })?;
            l.set_nonblocking(true).map_err(io_err("fcntl"))?;
            epoll
                .add(&l, sys::IN, TOKEN_TCP_LISTENER + i as u64)
                .map_err(io_err("epoll_ctl"))?;
            tcp_listeners.push((l, *fwd));
        }
        let mut udp_listeners = Vec::new();
        for (i, fwd) in config.udp_forwards.iter().enumerate() {
            let addr = SocketAddr::new(config.forward_bind, fwd.host_port);
            let s = UdpSocket::bind(addr).map_err(|source| Error::Bind {
                proto: "UDP",
                addr,
                source,
            })?;
            s.set_nonblocking(true).map_err(io_err("fcntl"))?;
            epoll
                .add(&s, sys::IN, TOKEN_UDP_LISTENER + i as u64)
                .map_err(io_err("epoll_ctl"))?;
            udp_listeners.push((s, *fwd));
        }

        let caps = capabilities(config.mtu, config.checksums.compute_tx);
        let mut rx = RxQueue::default();
        let mut tx = TxQueue::new(config.limits.max_tx_frames);
        let epoch = Instant::now();
        let mut iface_cfg = IfaceConfig::new(HardwareAddress::Ethernet(EthernetAddress(
            config.gateway_mac,
        )));
        iface_cfg.random_seed = random_seed();
        let mut iface = {
            let mut dev = QueueDevice {
                rx: &mut rx,
                tx: &mut tx,
                caps: &caps,
                force: false,
            };
            Interface::new(iface_cfg, &mut dev, smoltcp::time::Instant::ZERO)
        };
        iface.update_ip_addrs(|addrs| {
            // Capacity is at least 1; the gateway address is the only one.
            let _ = addrs.push(IpCidr::Ipv4(Ipv4Cidr::new(
                config.gateway_ip,
                config.subnet.prefix(),
            )));
        });
        // AnyIP: accept segments for every destination (the NAT decides what to do with them).
        // It needs a route whose gateway is one of our addresses.
        iface.set_any_ip(true);
        iface
            .routes_mut()
            .add_default_ipv4_route(config.gateway_ip)
            .map_err(|_| Error::Io {
                what: "smoltcp route",
                source: io::Error::other("route table full"),
            })?;

        let mut sockets = SocketSet::new(Vec::new());
        let raw_socket = |proto| {
            raw::Socket::new(
                Some(IpVersion::Ipv4),
                Some(proto),
                raw::PacketBuffer::new(Vec::new(), Vec::new()),
                raw::PacketBuffer::new(vec![raw::PacketMetadata::EMPTY; 512], vec![0u8; 1 << 20]),
            )
        };
        let udp_raw = sockets.add(raw_socket(IpProtocol::Udp));
        let icmp_raw = sockets.add(raw_socket(IpProtocol::Icmp));

        let nat = NatTable::new(NatLimits {
            tcp: config.limits.max_tcp_flows,
            udp: config.limits.max_udp_flows,
        });
        Ok(Self {
            plan,
            epoll,
            timer,
            waker,
            epoch,
            iface,
            sockets,
            caps,
            rx,
            tx,
            nat,
            tcp: HashMap::new(),
            udp: HashMap::new(),
            icmp: HashMap::new(),
            tcp_listeners,
            udp_listeners,
            udp_clients: HashMap::new(),
            udp_raw,
            icmp_raw,
            icmp_unavailable: false,
            next_delay: None,
            stats: Stats::default(),
            scratch: vec![0u8; 65536],
            events: vec![libc::epoll_event { events: 0, u64: 0 }; 256],
            config,
        })
    }

    /// The configuration in use.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The upstream DNS server, if one was found.
    pub fn dns_upstream(&self) -> Option<IpAddr> {
        self.plan.dns_upstream
    }

    /// Counters.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Active (TCP, UDP + ICMP) flows.
    pub fn active_flows(&self) -> (usize, usize) {
        (self.tcp.len(), self.udp.len() + self.icmp.len())
    }

    /// Host addresses of the port-forward listeners, in config order: (TCP, UDP).
    pub fn forward_addrs(&self) -> (Vec<SocketAddr>, Vec<SocketAddr>) {
        let t = self
            .tcp_listeners
            .iter()
            .filter_map(|(l, _)| l.local_addr().ok())
            .collect();
        let u = self
            .udp_listeners
            .iter()
            .filter_map(|(s, _)| s.local_addr().ok())
            .collect();
        (t, u)
    }

    /// Hands one frame from the guest to the stack. Cheap: it is parsed, dispatched (UDP and
    /// ICMP are sent to the host at once) or queued for smoltcp; call [`poll`](Self::poll) after
    /// a batch. Malformed frames are counted in [`Stats`] and dropped.
    pub fn receive_frame(&mut self, frame: &[u8]) {
        self.stats.rx_frames += 1;
        let parsed = match parse_guest_frame(
            frame,
            self.config.gateway_mac,
            self.config.guest_ip,
            self.config.checksums.verify_rx,
        ) {
            Ok(p) => p,
            Err(Malformed::Ipv4Checksum | Malformed::Checksum) => {
                self.stats.bad_checksum += 1;
                return;
            }
            Err(e) => {
                tracing::trace!("Dropping malformed guest frame: {e}");
                self.stats.malformed += 1;
                return;
            }
        };
        let guest_ip = self.config.guest_ip;
        match parsed.packet {
            GuestPacket::Arp => self.queue_for_smoltcp(frame),
            GuestPacket::Tcp { src, .. } if *src.ip() != guest_ip => self.stats.spoofed += 1,
            GuestPacket::Tcp { .. } => self.queue_for_smoltcp(frame),
            GuestPacket::TcpSyn { src, dst } => {
                if *src.ip() != guest_ip {
                    self.stats.spoofed += 1;
                } else {
                    self.tcp_syn(frame, src, dst);
                }
            }
            GuestPacket::Udp { src, dst, payload } => {
                if *src.ip() != guest_ip {
                    self.stats.spoofed += 1;
                } else {
                    self.udp_from_guest(src, dst, payload);
                }
            }
            GuestPacket::IcmpEcho {
                src,
                dst,
                ident,
                seq,
                data,
            } => {
                if src != guest_ip {
                    self.stats.spoofed += 1;
                } else {
                    self.icmp_from_guest(dst, ident, seq, data);
                }
            }
            GuestPacket::Ignored(_) => self.stats.ignored += 1,
        }
    }

    fn queue_for_smoltcp(&mut self, frame: &[u8]) {
        if self.rx.frames.len() >= self.config.limits.max_rx_frames {
            self.stats.rx_queue_full += 1;
            return;
        }
        self.rx.push(frame);
    }

    /// Takes the next frame for the guest. If it returns `None` or the caller stops early (guest
    /// RX ring full), the stack wakes its fd once the queue has drained below half.
    pub fn transmit_frame(&mut self) -> Option<Vec<u8>> {
        let (frame, unstalled) = self.tx.pop()?;
        self.stats.tx_frames += 1;
        if unstalled {
            self.waker.signal();
        }
        Some(frame)
    }

    /// Length of the next frame for the guest, to check it fits before taking it.
    pub fn peek_frame_len(&self) -> Option<usize> {
        self.tx.peek_len()
    }

    /// Number of frames waiting for the guest.
    pub fn pending_frames(&self) -> usize {
        self.tx.len()
    }

    /// Gives a frame buffer from [`transmit_frame`](Self::transmit_frame) back for reuse.
    pub fn recycle_frame(&mut self, frame: Vec<u8>) {
        self.tx.recycle(frame);
    }

    /// How long until the stack needs [`poll`](Self::poll) again without any new event, as of
    /// the last poll (`None`: only on events). The internal timerfd is already armed for it.
    pub fn poll_delay(&self) -> Option<Duration> {
        self.next_delay
    }

    fn smol_now(&self, now: Instant) -> smoltcp::time::Instant {
        let us = now.saturating_duration_since(self.epoch).as_micros();
        smoltcp::time::Instant::from_micros(i64::try_from(us).unwrap_or(i64::MAX))
    }

    /// Does all pending work: host socket events, guest frames queued by
    /// [`receive_frame`](Self::receive_frame), TCP relaying both ways, timers, expiry. Frames
    /// for the guest are then available from [`transmit_frame`](Self::transmit_frame).
    pub fn poll(&mut self, now: Instant) {
        let ts = self.smol_now(now);
        self.handle_host_events(now, ts);
        let mut rounds = 0;
        loop {
            rounds += 1;
            let moved = self.pump_tcp();
            let changed = self.run_iface(ts);
            if !(moved || changed) || rounds >= MAX_ROUNDS {
                break;
            }
        }
        self.reap_tcp(now);
        self.expire_udp(now);
        let busy = rounds >= MAX_ROUNDS || (!self.rx.frames.is_empty() && self.tx.has_room());
        self.arm_timer(now, ts, busy);
    }

    fn run_iface(&mut self, ts: smoltcp::time::Instant) -> bool {
        let mut dev = QueueDevice {
            rx: &mut self.rx,
            tx: &mut self.tx,
            caps: &self.caps,
            force: false,
        };
        self.iface.poll(ts, &mut dev, &mut self.sockets) == PollResult::SocketStateChanged
    }

    fn handle_host_events(&mut self, now: Instant, ts: smoltcp::time::Instant) {
        loop {
            let mut events = std::mem::take(&mut self.events);
            let n = match self.epoll.poll_now(&mut events) {
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!("epoll_wait: {e}");
                    0
                }
            };
            for ev in &events[..n] {
                let (token, bits) = (ev.u64, ev.events);
                match token {
                    TOKEN_TIMER => self.timer.clear(),
                    TOKEN_WAKER => self.waker.clear(),
                    t if t >= FIRST_FLOW_ID => {
                        if self.tcp.contains_key(&t) {
                            self.tcp_event(t, bits, ts);
                        } else if self.udp.contains_key(&t) {
                            self.udp_readable(t, now);
                        } else if self.icmp.contains_key(&t) {
                            self.icmp_readable(t, now);
                        }
                    }
                    t if t >= TOKEN_UDP_LISTENER => {
                        self.udp_listener_readable((t - TOKEN_UDP_LISTENER) as usize, now)
                    }
                    t if t >= TOKEN_TCP_LISTENER => {
                        self.tcp_accept((t - TOKEN_TCP_LISTENER) as usize, now)
                    }
                    _ => {}
                }
            }
            let full = n == events.len();
            self.events = events;
            if !full {
                break;
            }
        }
    }

    fn arm_timer(&mut self, now: Instant, ts: smoltcp::time::Instant, busy: bool) {
        let mut delay = if busy {
            Some(Duration::ZERO)
        } else if self.tx.is_full() {
            // smoltcp has frames to send but the guest is not taking them: do not spin on its
            // "poll now"; the waker fires when the queue drains.
            None
        } else {
            self.iface
                .poll_delay(ts, &self.sockets)
                .map(|d| Duration::from_micros(d.total_micros()))
        };
        let mut consider = |deadline: Option<Instant>| {
            if let Some(d) = deadline {
                let left = d.saturating_duration_since(now);
                delay = Some(delay.map_or(left, |cur| cur.min(left)));
            }
        };
        consider(self.next_udp_expiry());
        consider(self.next_connect_deadline());
        self.next_delay = delay;
        if let Err(e) = self.timer.arm(delay) {
            tracing::warn!("timerfd_settime: {e}");
        }
    }
}

impl AsRawFd for NetStack {
    /// The epoll fd to watch for readability; when readable, call [`NetStack::poll`].
    fn as_raw_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }
}

fn random_seed() -> u64 {
    let mut seed = [0u8; 8];
    // SAFETY: getrandom writes at most `seed.len()` bytes into the valid buffer.
    let n = unsafe { libc::getrandom(seed.as_mut_ptr().cast(), seed.len(), libc::GRND_NONBLOCK) };
    if n == 8 {
        u64::from_ne_bytes(seed)
    } else {
        // Fall back to the clock: the seed only needs to differ between runs.
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x5eed)
    }
}
