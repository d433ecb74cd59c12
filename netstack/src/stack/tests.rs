//! The stack against a second smoltcp interface playing the guest, in-process, no privileges.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use smoltcp::iface::{Config as IfaceConfig, Interface, SocketHandle, SocketSet};
use smoltcp::socket::{tcp, udp};
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr, IpEndpoint, Ipv4Cidr};

use super::*;
use crate::device::{capabilities, QueueDevice, RxQueue, TxQueue};

const GUEST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x15];

struct Harness {
    net: NetStack,
    iface: Interface,
    sockets: SocketSet<'static>,
    rx: RxQueue,
    tx: TxQueue,
    caps: DeviceCapabilities,
    epoch: Instant,
}

impl Harness {
    fn new(config: Config) -> Self {
        let net = NetStack::new(config.clone()).unwrap();
        let caps = capabilities(config.mtu, true);
        let mut rx = RxQueue::default();
        let mut tx = TxQueue::new(4096);
        let mut iface = {
            let mut dev = QueueDevice {
                rx: &mut rx,
                tx: &mut tx,
                caps: &caps,
                force: false,
            };
            Interface::new(
                IfaceConfig::new(HardwareAddress::Ethernet(EthernetAddress(GUEST_MAC))),
                &mut dev,
                smoltcp::time::Instant::ZERO,
            )
        };
        iface.update_ip_addrs(|a| {
            a.push(IpCidr::Ipv4(Ipv4Cidr::new(config.guest_ip, 24)))
                .unwrap();
        });
        iface
            .routes_mut()
            .add_default_ipv4_route(config.gateway_ip)
            .unwrap();
        Self {
            net,
            iface,
            sockets: SocketSet::new(Vec::new()),
            rx,
            tx,
            caps,
            epoch: Instant::now(),
        }
    }

    fn step(&mut self) {
        let ts = smoltcp::time::Instant::from_micros(self.epoch.elapsed().as_micros() as i64);
        let mut dev = QueueDevice {
            rx: &mut self.rx,
            tx: &mut self.tx,
            caps: &self.caps,
            force: false,
        };
        self.iface.poll(ts, &mut dev, &mut self.sockets);
        while let Some((frame, _)) = self.tx.pop() {
            self.net.receive_frame(&frame);
        }
        self.net.poll(Instant::now());
        while let Some(frame) = self.net.transmit_frame() {
            self.rx.push(&frame);
            self.net.recycle_frame(frame);
        }
        let mut dev = QueueDevice {
            rx: &mut self.rx,
            tx: &mut self.tx,
            caps: &self.caps,
            force: false,
        };
        self.iface.poll(ts, &mut dev, &mut self.sockets);
    }

    fn run_until(&mut self, what: &str, mut done: impl FnMut(&mut Self) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done(self) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            self.step();
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    fn tcp_socket(&mut self) -> SocketHandle {
        let s = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; 65536]),
            tcp::SocketBuffer::new(vec![0; 65536]),
        );
        self.sockets.add(s)
    }

    fn tcp(&mut self, h: SocketHandle) -> &mut tcp::Socket<'static> {
        self.sockets.get_mut::<tcp::Socket>(h)
    }
}

fn config() -> Config {
    Config {
        resolv_conf: "/nonexistent/resolv.conf".into(),
        forward_bind: Ipv4Addr::LOCALHOST.into(),
        ..Config::default()
    }
}

#[test]
fn tcp_to_host_loopback_alias_round_trips() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = vec![0u8; 100_000];
        s.read_exact(&mut buf).unwrap();
        s.write_all(&buf).unwrap();
        // Half-close from the guest arrives as EOF.
        assert_eq!(s.read(&mut [0u8; 1]).unwrap(), 0);
    });
    let mut h = Harness::new(config());
    let alias = h.net.config().host_loopback_ip;
    let sock = h.tcp_socket();
    let cx = h.iface.context();
    h.sockets
        .get_mut::<tcp::Socket>(sock)
        .connect(cx, (IpAddress::Ipv4(alias), port), 40000)
        .unwrap();
    h.run_until("established", |h| h.tcp(sock).may_send());
    let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let mut sent = 0;
    let mut got = Vec::new();
    h.run_until("echo", |h| {
        let s = h.tcp(sock);
        if sent < data.len() && s.can_send() {
            sent += s.send_slice(&data[sent..]).unwrap();
        }
        while s.can_recv() {
            s.recv(|b| {
                got.extend_from_slice(b);
                (b.len(), ())
            })
            .unwrap();
        }
        got.len() == data.len()
    });
    assert!(got == data);
    h.tcp(sock).close();
    h.run_until("closed", |h| {
        matches!(
            h.tcp(sock).state(),
            tcp::State::TimeWait | tcp::State::Closed
        )
    });
    server.join().unwrap();
    h.run_until("flow reaped", |h| h.net.active_flows().0 == 0);
    assert_eq!(h.net.stats().tcp_connected, 1);
}

#[test]
fn refused_connections_are_reset() {
    // A port nobody listens on: bind then drop.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut h = Harness::new(config());
    let alias = h.net.config().host_loopback_ip;
    let gw = h.net.config().gateway_ip;
    for (i, dst) in [(alias, port), (gw, 80)].into_iter().enumerate() {
        let sock = h.tcp_socket();
        let cx = h.iface.context();
        h.sockets
            .get_mut::<tcp::Socket>(sock)
            .connect(cx, (IpAddress::Ipv4(dst.0), dst.1), 41000 + i as u16)
            .unwrap();
        h.run_until("reset", |h| h.tcp(sock).state() == tcp::State::Closed);
    }
    assert_eq!(h.net.stats().tcp_refused, 2);
    assert_eq!(h.net.active_flows().0, 0);
}

#[test]
fn udp_round_trip_and_forwards() {
    let echo = UdpSocket::bind("127.0.0.1:0").unwrap();
    let echo_port = echo.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = echo.recv_from(&mut buf) {
            let _ = echo.send_to(&buf[..n], from);
        }
    });
    let fwd_port = UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let tcp_fwd_port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cfg = config();
    cfg.udp_forwards = vec![PortForward {
        host_port: fwd_port,
        guest_port: 5353,
    }];
    cfg.tcp_forwards = vec![PortForward {
        host_port: tcp_fwd_port,
        guest_port: 8000,
    }];
    let mut h = Harness::new(cfg);
    let alias = h.net.config().host_loopback_ip;
    let u = udp::Socket::new(
        udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 8], vec![0; 8192]),
        udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 8], vec![0; 8192]),
    );
    let u = h.sockets.add(u);
    h.sockets.get_mut::<udp::Socket>(u).bind(5353).unwrap();
    let to = IpEndpoint::new(IpAddress::Ipv4(alias), echo_port);
    h.sockets
        .get_mut::<udp::Socket>(u)
        .send_slice(b"ping", to)
        .unwrap();
    h.run_until("udp echo", |h| {
        h.sockets.get_mut::<udp::Socket>(u).can_recv()
    });
    let (data, meta) = h.sockets.get_mut::<udp::Socket>(u).recv().unwrap();
    assert_eq!(data, b"ping");
    assert_eq!(meta.endpoint, to);

    // UDP forward: host → guest:5353, and the reply back.
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    client.send_to(b"hello", ("127.0.0.1", fwd_port)).unwrap();
    h.run_until("forwarded datagram", |h| {
        h.sockets.get_mut::<udp::Socket>(u).can_recv()
    });
    let (data, meta) = h.sockets.get_mut::<udp::Socket>(u).recv().unwrap();
    assert_eq!(data, b"hello");
    let from = meta.endpoint;
    assert_eq!(from.addr, IpAddress::Ipv4(h.net.config().gateway_ip));
    h.sockets
        .get_mut::<udp::Socket>(u)
        .send_slice(b"world", from)
        .unwrap();
    client.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 64];
    h.run_until("reply to client", |_| {
        matches!(client.recv(&mut buf), Ok(5))
    });
    assert_eq!(&buf[..5], b"world");

    // TCP forward: host → guest:8000.
    let l = h.tcp_socket();
    h.tcp(l).listen(8000).unwrap();
    let mut c = TcpStream::connect(("127.0.0.1", tcp_fwd_port)).unwrap();
    c.set_nonblocking(true).unwrap();
    c.write_all(b"abc").unwrap();
    h.run_until("forwarded bytes", |h| h.tcp(l).can_recv());
    let mut got = [0u8; 3];
    assert_eq!(h.tcp(l).recv_slice(&mut got).unwrap(), 3);
    assert_eq!(&got, b"abc");
    h.tcp(l).send_slice(b"xyz").unwrap();
    h.tcp(l).close();
    let mut back = Vec::new();
    h.run_until("reply and FIN", |_| {
        let mut b = [0u8; 16];
        match c.read(&mut b) {
            Ok(0) => true,
            Ok(n) => {
                back.extend_from_slice(&b[..n]);
                false
            }
            Err(_) => false,
        }
    });
    assert_eq!(back, b"xyz");
    drop(c);
    h.run_until("forward reaped", |h| h.net.active_flows().0 == 0);
    assert_eq!(h.net.stats().tcp_accepted, 1);
}

#[test]
fn tcp_forward_to_closed_guest_port_resets_host_client() {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cfg = config();
    cfg.tcp_forwards = vec![PortForward {
        host_port: port,
        guest_port: 9,
    }];
    let mut h = Harness::new(cfg);
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_nonblocking(true).unwrap();
    h.run_until("reset", |_| {
        let mut b = [0u8; 1];
        match c.read(&mut b) {
            Ok(0) => true,
            Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
            Ok(_) => false,
        }
    });
    h.run_until("reaped", |h| h.net.active_flows().0 == 0);
}

#[test]
fn malformed_and_unsupported_frames_are_counted() {
    let mut h = Harness::new(config());
    h.net.receive_frame(&[0u8; 5]);
    let mut bad = vec![0u8; 14 + 20];
    bad[..6].copy_from_slice(&h.net.config().gateway_mac);
    bad[12] = 0x08; // IPv4 with a zero header
    h.net.receive_frame(&bad);
    let mut v6 = bad.clone();
    v6[12] = 0x86;
    v6[13] = 0xdd;
    h.net.receive_frame(&v6);
    h.net.poll(Instant::now());
    let s = h.net.stats();
    assert_eq!((s.rx_frames, s.malformed, s.ignored), (3, 2, 1));
}

#[test]
fn timer_fd_is_armed_for_smoltcp_deadlines() {
    let mut h = Harness::new(config());
    let alias = h.net.config().host_loopback_ip;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let sock = h.tcp_socket();
    let cx = h.iface.context();
    h.sockets
        .get_mut::<tcp::Socket>(sock)
        .connect(cx, (IpAddress::Ipv4(alias), port), 40001)
        .unwrap();
    h.run_until("established", |h| h.tcp(sock).may_send());
    // Idle established connection: nothing to do until an event.
    h.step();
    assert!(h
        .net
        .poll_delay()
        .is_none_or(|d| d > Duration::from_millis(1)));
    drop(listener);
}

#[test]
fn flow_limit_resets_extra_connections() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut cfg = config();
    cfg.limits.max_tcp_flows = 1;
    let mut h = Harness::new(cfg);
    let alias = h.net.config().host_loopback_ip;
    let a = h.tcp_socket();
    let cx = h.iface.context();
    h.sockets
        .get_mut::<tcp::Socket>(a)
        .connect(cx, (IpAddress::Ipv4(alias), port), 42000)
        .unwrap();
    h.run_until("first established", |h| h.tcp(a).may_send());
    let b = h.tcp_socket();
    let cx = h.iface.context();
    h.sockets
        .get_mut::<tcp::Socket>(b)
        .connect(cx, (IpAddress::Ipv4(alias), port), 42001)
        .unwrap();
    h.run_until("second reset", |h| h.tcp(b).state() == tcp::State::Closed);
    assert_eq!(h.net.stats().flow_limit, 1);
    assert!(h.tcp(a).may_send());
}

#[test]
fn full_tx_queue_does_not_spin() {
    let mut cfg = config();
    cfg.limits.max_tx_frames = 4;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut h = Harness::new(cfg);
    let alias = h.net.config().host_loopback_ip;
    let sock = h.tcp_socket();
    let cx = h.iface.context();
    h.sockets
        .get_mut::<tcp::Socket>(sock)
        .connect(cx, (IpAddress::Ipv4(alias), port), 42002)
        .unwrap();
    h.run_until("established", |h| h.tcp(sock).may_send());
    // Deliver the guest's final ACK of the handshake.
    h.step();
    h.step();
    let (mut server, _) = listener.accept().unwrap();
    server.write_all(&vec![1u8; 60_000]).unwrap();
    // The "guest" stops draining: the queue fills and the stack must not ask for a busy poll.
    let deadline = Instant::now() + Duration::from_secs(5);
    while h.net.pending_frames() < 4 {
        assert!(
            Instant::now() < deadline,
            "queue never filled: {} {:?} {:?}",
            h.net.pending_frames(),
            h.net.stats(),
            h.tcp(sock).state()
        );
        h.net.poll(Instant::now());
        std::thread::sleep(Duration::from_millis(1));
    }
    h.net.poll(Instant::now());
    assert!(h.net.poll_delay().is_none_or(|d| d > Duration::ZERO));
    // Draining below half wakes the fd.
    for _ in 0..3 {
        h.net.transmit_frame().unwrap();
    }
    let mut pfd = libc::pollfd {
        fd: h.net.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut pfd, 1, 1000) };
    assert_eq!(n, 1, "drain did not wake the netstack fd");
}
