//! Real-peer test of the netstack, no VM: the Linux TCP/IP stack of a network namespace created
//! here plays the guest, attached through a TAP device whose fd the netstack drives in this
//! process. Every address involved is on this machine: the host side is 127.0.0.0/8, the guest
//! side lives only inside the namespace.
//!
//! Needs root, /dev/net/tun, `ip` (iproute2), `curl` and `getent` (netstack/apt-packages.txt).
//! A missing prerequisite fails the test with a message; it never skips.

use std::fs;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use netstack::{Config, NetStack, PortForward, Stats};

const TAP: &str = "dtap0";
const HOST_NAME: &str = "dinv-host.test";

// ---------------------------------------------------------------------------------------------
// Prerequisites, namespace, TAP.

fn require_prerequisites() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        panic!("the netstack real-peer test must run as root (network namespaces, TAP devices)");
    }
    if !Path::new("/dev/net/tun").exists() {
        panic!("/dev/net/tun is missing: the netstack real-peer test needs the tun driver");
    }
    for tool in ["ip", "curl", "getent"] {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
            .unwrap_or(false);
        if !found {
            panic!("`{tool}` not found in PATH: install the packages in netstack/apt-packages.txt");
        }
    }
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{cmd:?} failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

/// A network namespace, deleted on drop (including when the test panics).
struct Netns {
    name: String,
}

impl Netns {
    fn create() -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "dinvns{}x{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        run(Command::new("ip").args(["netns", "add", &name]));
        Netns { name }
    }

    fn ip(&self, args: &[&str]) {
        run(Command::new("ip").arg("-n").arg(&self.name).args(args));
    }

    fn exec(&self, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {args:?} in the namespace: {e}"))
    }

    /// Runs `f` on a new thread inside the namespace.
    fn spawn<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> JoinHandle<T> {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            enter_netns(&path);
            f()
        })
    }
}

/// Moves the calling thread into the network namespace at `path`.
fn enter_netns(path: &str) {
    let ns = fs::File::open(path).unwrap_or_else(|e| panic!("open {path}: {e}"));
    // SAFETY: `ns` is an open namespace fd; setns only affects the calling thread.
    let r = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(r, 0, "setns {path}: {}", io::Error::last_os_error());
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        let _ = fs::remove_dir_all(format!("/etc/netns/{}", self.name));
    }
}

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;

/// Creates TAP device `TAP` inside `ns` and returns its non-blocking fd.
fn open_tap(ns: &Netns) -> OwnedFd {
    let path = format!("/run/netns/{}", ns.name);
    std::thread::spawn(move || {
        enter_netns(&path);
        let tun = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .unwrap_or_else(|e| panic!("open /dev/net/tun: {e}"));
        let mut req = IfReq {
            name: [0; 16],
            flags: IFF_TAP | IFF_NO_PI,
            _pad: [0; 22],
        };
        req.name[..TAP.len()].copy_from_slice(TAP.as_bytes());
        // SAFETY: TUNSETIFF reads and writes one `struct ifreq` (40 bytes), which `req` is.
        let r = unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF, &mut req) };
        assert_eq!(r, 0, "TUNSETIFF: {}", io::Error::last_os_error());
        // SAFETY: F_SETFL on an fd we own.
        unsafe { libc::fcntl(tun.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
        OwnedFd::from(tun)
    })
    .join()
    .expect("TAP creation thread")
}

// ---------------------------------------------------------------------------------------------
// The netstack on the TAP fd.

struct Runner {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Stats>>,
}

impl Runner {
    fn start(mut net: NetStack, tap: OwnedFd) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let handle = std::thread::spawn(move || {
            // SAFETY: plain syscall.
            let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
            assert!(ep >= 0);
            // SAFETY: `ep` was just created and is owned here.
            let ep = unsafe { OwnedFd::from_raw_fd(ep) };
            for (fd, token) in [(tap.as_raw_fd(), 1u64), (net.as_raw_fd(), 2u64)] {
                let mut ev = libc::epoll_event {
                    events: libc::EPOLLIN as u32,
                    u64: token,
                };
                // SAFETY: valid epoll fd, valid event struct.
                let r =
                    unsafe { libc::epoll_ctl(ep.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) };
                assert_eq!(r, 0);
            }
            let mut events = [libc::epoll_event { events: 0, u64: 0 }; 8];
            let mut buf = vec![0u8; 65536 + 64];
            while !stop2.load(Ordering::Relaxed) {
                // SAFETY: `events` is a valid buffer of 8 entries.
                unsafe { libc::epoll_wait(ep.as_raw_fd(), events.as_mut_ptr(), 8, 50) };
                for _ in 0..256 {
                    // SAFETY: reads into a valid buffer of `buf.len()` bytes.
                    let n =
                        unsafe { libc::read(tap.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
                    if n <= 0 {
                        break;
                    }
                    net.receive_frame(&buf[..n as usize]);
                }
                net.poll(Instant::now());
                while let Some(frame) = net.transmit_frame() {
                    // SAFETY: writes one frame from a valid buffer.
                    unsafe { libc::write(tap.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
                    net.recycle_frame(frame);
                }
            }
            net.stats()
        });
        Runner {
            stop,
            handle: Some(handle),
        }
    }

    fn finish(mut self) -> Stats {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.take().unwrap().join().expect("netstack thread")
    }
}

impl Drop for Runner {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A namespace whose eth (TAP) is served by a netstack.
struct Env {
    ns: Netns,
    cfg: Config,
    runner: Option<Runner>,
}

impl Env {
    fn start(mtu: usize, configure: impl FnOnce(&mut Config)) -> Self {
        require_prerequisites();
        let ns = Netns::create();
        let tap = open_tap(&ns);
        let mut cfg = Config {
            mtu,
            forward_bind: Ipv4Addr::LOCALHOST.into(),
            ..Config::default()
        };
        configure(&mut cfg);
        let guest = format!("{}/{}", cfg.guest_ip, cfg.subnet.prefix());
        let gw = cfg.gateway_ip.to_string();
        let mtu_s = mtu.to_string();
        ns.ip(&["link", "set", "lo", "up"]);
        ns.ip(&["link", "set", TAP, "mtu", &mtu_s, "up"]);
        ns.ip(&["addr", "add", &guest, "dev", TAP]);
        ns.ip(&["route", "add", "default", "via", &gw]);
        let net = NetStack::new(cfg.clone()).expect("NetStack::new");
        Env {
            ns,
            cfg,
            runner: Some(Runner::start(net, tap)),
        }
    }

    fn finish(mut self) -> Stats {
        let stats = self.runner.take().unwrap().finish();
        eprintln!("netstack stats: {stats:?}");
        assert_eq!(
            stats.malformed, 0,
            "the Linux guest sent frames we call malformed"
        );
        assert_eq!(
            stats.bad_checksum, 0,
            "the Linux guest sent frames with bad checksums"
        );
        stats
    }

    fn alias(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.cfg.host_loopback_ip.into(), port)
    }
}

fn free_port_tcp() -> u16 {
    let [port] = dinv_tests::free_tcp_ports();
    port
}

fn free_port_udp() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

// ---------------------------------------------------------------------------------------------
// Servers.

fn pattern(len: usize, seed: u32) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(seed) >> 13) as u8)
        .collect()
}

/// Echoes every TCP connection on its own thread, until the listener's process ends.
fn tcp_echo_server(listener: TcpListener) {
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            std::thread::spawn(move || {
                let mut buf = [0u8; 16384];
                loop {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    }
                }
            });
        }
    });
}

fn udp_echo_server(sock: UdpSocket) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 65536];
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            let _ = sock.send_to(&buf[..n], from);
        }
    });
}

/// Minimal HTTP/1.1 server returning `body` for any request.
fn http_server(listener: TcpListener, body: Arc<Vec<u8>>) {
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            let body = body.clone();
            std::thread::spawn(move || {
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = s.write_all(head.as_bytes());
                let _ = s.write_all(&body);
            });
        }
    });
}

/// A DNS responder: `A dinv-host.test` → `answer`, `AAAA` of it → empty, anything else NXDOMAIN.
/// Bound on port 53 of a loopback address other than 127.0.0.1 so it needs no free port 53 there.
fn dns_server(answer: Ipv4Addr) -> Ipv4Addr {
    for last in 77..120u8 {
        let ip = Ipv4Addr::new(127, 0, 53, last);
        let Ok(sock) = UdpSocket::bind((ip, 53)) else {
            continue;
        };
        std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while let Ok((n, from)) = sock.recv_from(&mut buf) {
                if let Some(reply) = dns_reply(&buf[..n], answer) {
                    let _ = sock.send_to(&reply, from);
                }
            }
        });
        return ip;
    }
    panic!("no free port 53 on 127.0.53.77-119 for the test DNS responder");
}

fn dns_reply(q: &[u8], answer: Ipv4Addr) -> Option<Vec<u8>> {
    if q.len() < 12 {
        return None;
    }
    // Question name.
    let mut i = 12;
    let mut labels = Vec::new();
    loop {
        let len = *q.get(i)? as usize;
        i += 1;
        if len == 0 {
            break;
        }
        labels.push(String::from_utf8_lossy(q.get(i..i + len)?).to_lowercase());
        i += len;
    }
    let qtype = u16::from_be_bytes([*q.get(i)?, *q.get(i + 1)?]);
    let question_end = i + 4;
    q.get(..question_end)?;
    let name = labels.join(".");
    let known = name == HOST_NAME;
    let mut r = Vec::with_capacity(question_end + 16);
    r.extend_from_slice(&q[..2]);
    r.extend_from_slice(&[0x81, if known { 0x80 } else { 0x83 }]);
    r.extend_from_slice(&[0, 1]);
    let a = known && qtype == 1;
    r.extend_from_slice(&[0, a as u8, 0, 0, 0, 0]);
    r.extend_from_slice(&q[12..question_end]);
    if a {
        r.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
        r.extend_from_slice(&answer.octets());
    }
    Some(r)
}

// ---------------------------------------------------------------------------------------------
// Guest-side helpers (run on threads inside the namespace).

fn echo_once(to: SocketAddr, data: &[u8]) -> io::Result<()> {
    let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(data)?;
    s.shutdown(std::net::Shutdown::Write)?;
    let mut back = Vec::with_capacity(data.len());
    s.read_to_end(&mut back)?;
    if back != data {
        return Err(io::Error::other(format!(
            "echo mismatch: sent {} bytes, got {}",
            data.len(),
            back.len()
        )));
    }
    Ok(())
}

fn sequential(to: SocketAddr, count: usize) -> Result<Duration, String> {
    let t = Instant::now();
    for i in 0..count {
        let data = pattern(64 + i % 512, i as u32);
        echo_once(to, &data).map_err(|e| format!("connection {i}: {e}"))?;
    }
    Ok(t.elapsed())
}

/// `count` connections at once from `spawn`'s threads, each echoing `len` bytes.
fn concurrent(
    spawn: impl Fn(Box<dyn FnOnce() -> Result<(), String> + Send>) -> JoinHandle<Result<(), String>>,
    to: SocketAddr,
    count: usize,
    len: usize,
) -> Result<(), String> {
    let handles: Vec<_> = (0..count)
        .map(|i| {
            spawn(Box::new(move || {
                let data = pattern(len, 1000 + i as u32);
                echo_once(to, &data).map_err(|e| format!("concurrent connection {i}: {e}"))
            }))
        })
        .collect();
    for h in handles {
        h.join().map_err(|_| "thread panicked".to_string())??;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Tests.

#[test]
fn curl_dns_udp_icmp_and_port_forwards() {
    // Host side, all on loopback.
    let body = Arc::new(pattern(3 * 1024 * 1024 + 17, 7));
    let http = TcpListener::bind("127.0.0.1:0").unwrap();
    let http_port = http.local_addr().unwrap().port();
    http_server(http, body.clone());
    let udp_echo = UdpSocket::bind("127.0.0.1:0").unwrap();
    let udp_port = udp_echo.local_addr().unwrap().port();
    udp_echo_server(udp_echo);
    let alias_ip = Config::default().host_loopback_ip;
    let dns_ip = dns_server(alias_ip);
    let resolv = tempfile::NamedTempFile::new().unwrap();
    fs::write(resolv.path(), format!("# test\nnameserver {dns_ip}\n")).unwrap();
    let (tcp_fwd, udp_fwd) = (free_port_tcp(), free_port_udp());

    let env = Env::start(1500, |c| {
        c.resolv_conf = resolv.path().to_path_buf();
        c.tcp_forwards = vec![PortForward {
            host_port: tcp_fwd,
            guest_port: 8080,
        }];
        c.udp_forwards = vec![PortForward {
            host_port: udp_fwd,
            guest_port: 5300,
        }];
    });
    let ns = &env.ns;
    let etc = format!("/etc/netns/{}", ns.name);
    fs::create_dir_all(&etc).unwrap();
    fs::write(
        format!("{etc}/resolv.conf"),
        format!(
            "nameserver {}\noptions timeout:2 attempts:3\n",
            env.cfg.dns_ip
        ),
    )
    .unwrap();

    // DNS through the netstack to the responder named in our resolv.conf.
    let out = ns.exec(&["getent", "ahostsv4", HOST_NAME]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains(&alias_ip.to_string()),
        "getent ahostsv4 {HOST_NAME}: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = ns.exec(&["getent", "ahostsv4", "unknown.test"]);
    assert!(!out.status.success(), "unknown.test must not resolve");

    // curl, by name (DNS) and by address, from the server on the host's 127.0.0.1.
    for host in [HOST_NAME.to_string(), alias_ip.to_string()] {
        let url = format!("http://{host}:{http_port}/blob");
        let t = Instant::now();
        let out = ns.exec(&["curl", "-sS", "--fail", "--max-time", "30", &url]);
        assert!(
            out.status.success(),
            "curl {url}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.stdout.len(), body.len(), "curl {url}: body length");
        assert!(out.stdout == *body, "curl {url}: body differs");
        eprintln!("curl {url}: {} bytes in {:?}", body.len(), t.elapsed());
    }

    // UDP echo to the host through the alias.
    let to = env.alias(udp_port);
    ns.spawn(move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        for i in 0..20u32 {
            let msg = pattern(100 + i as usize * 50, i);
            let mut buf = [0u8; 4096];
            let got = (0..6).find_map(|_| {
                s.send_to(&msg, to).unwrap();
                s.recv_from(&mut buf).ok()
            });
            let (n, from) = got.unwrap_or_else(|| panic!("no UDP echo for datagram {i}"));
            assert_eq!(from, to);
            assert_eq!(&buf[..n], &msg[..]);
        }
    })
    .join()
    .expect("UDP echo through the netstack");

    // ICMP echo to the gateway, with a raw socket inside the namespace.
    let gw = env.cfg.gateway_ip;
    ns.spawn(move || ping(gw)).join().expect("ping the gateway");

    // Port forwards: servers inside the namespace, clients on the host.
    let (tx, rx) = std::sync::mpsc::channel();
    ns.spawn(move || {
        let l = TcpListener::bind("0.0.0.0:8080").unwrap();
        let u = UdpSocket::bind("0.0.0.0:5300").unwrap();
        tx.send(()).unwrap();
        udp_echo_server(u);
        tcp_echo_server(l);
    })
    .join()
    .unwrap();
    rx.recv().unwrap();
    let data = pattern(200_000, 3);
    echo_once(SocketAddr::from((Ipv4Addr::LOCALHOST, tcp_fwd)), &data)
        .expect("TCP through the port forward");
    let c = UdpSocket::bind("127.0.0.1:0").unwrap();
    c.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut buf = [0u8; 2048];
    let got = (0..6).find_map(|_| {
        c.send_to(b"forwarded datagram", ("127.0.0.1", udp_fwd))
            .unwrap();
        c.recv(&mut buf).ok()
    });
    assert_eq!(
        got.map(|n| &buf[..n]),
        Some(&b"forwarded datagram"[..]),
        "UDP through the port forward"
    );

    let stats = env.finish();
    assert!(stats.dns_queries >= 2, "{stats:?}");
    assert!(
        stats.tcp_connected >= 2 && stats.tcp_accepted >= 1,
        "{stats:?}"
    );
    assert!(stats.icmp_echo >= 1, "{stats:?}");
}

/// Sends one ICMP echo request to `dst` on a raw socket and waits for the reply.
fn ping(dst: Ipv4Addr) {
    // SAFETY: plain syscall.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::IPPROTO_ICMP,
        )
    };
    assert!(fd >= 0, "raw ICMP socket: {}", io::Error::last_os_error());
    // SAFETY: fresh fd owned here.
    let sock = UdpSocket::from(unsafe { OwnedFd::from_raw_fd(fd) });
    sock.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut req = vec![8u8, 0, 0, 0, 0x12, 0x34, 0, 1];
    req.extend_from_slice(b"dinv ping payload");
    let sum = internet_checksum(&req);
    req[2..4].copy_from_slice(&sum.to_be_bytes());
    for _ in 0..6 {
        sock.send_to(&req, (dst, 0)).unwrap();
        let mut buf = [0u8; 1500];
        let deadline = Instant::now() + Duration::from_millis(500);
        while Instant::now() < deadline {
            let Ok((n, _)) = sock.recv_from(&mut buf) else {
                break;
            };
            let ihl = usize::from(buf[0] & 0xf) * 4;
            let icmp = &buf[ihl..n];
            if icmp.len() >= 8 && icmp[0] == 0 && icmp[4..6] == [0x12, 0x34] {
                assert_eq!(&icmp[8..], b"dinv ping payload");
                assert_eq!(internet_checksum(icmp), 0, "echo reply checksum");
                return;
            }
        }
    }
    panic!("no ICMP echo reply from {dst}");
}

fn internet_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[test]
fn many_short_and_concurrent_connections_lose_nothing() {
    let echo = TcpListener::bind("127.0.0.1:0").unwrap();
    let echo_port = echo.local_addr().unwrap().port();
    tcp_echo_server(echo);
    let fwd = free_port_tcp();
    let env = Env::start(1500, |c| {
        c.tcp_forwards = vec![PortForward {
            host_port: fwd,
            guest_port: 7000,
        }];
    });
    let ns = &env.ns;
    let to = env.alias(echo_port);

    // Guest → host.
    let took = ns
        .spawn(move || sequential(to, 1000))
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("guest→host sequential: {e}"));
    eprintln!("1000 sequential guest→host connections: {took:?}");
    let path = format!("/run/netns/{}", ns.name);
    let in_ns = move |f: Box<dyn FnOnce() -> Result<(), String> + Send>| {
        let path = path.clone();
        std::thread::spawn(move || {
            enter_netns(&path);
            f()
        })
    };
    let t = Instant::now();
    concurrent(&in_ns, to, 50, 256 * 1024).unwrap_or_else(|e| panic!("guest→host concurrent: {e}"));
    eprintln!(
        "50 concurrent guest→host connections x 256 KiB: {:?}",
        t.elapsed()
    );

    // Host → guest through the port forward.
    ns.spawn(|| tcp_echo_server(TcpListener::bind("0.0.0.0:7000").unwrap()))
        .join()
        .unwrap();
    let fwd_addr = SocketAddr::from((Ipv4Addr::LOCALHOST, fwd));
    let took = sequential(fwd_addr, 1000).unwrap_or_else(|e| panic!("host→guest sequential: {e}"));
    eprintln!("1000 sequential host→guest connections: {took:?}");
    let t = Instant::now();
    concurrent(std::thread::spawn, fwd_addr, 50, 256 * 1024)
        .unwrap_or_else(|e| panic!("host→guest concurrent: {e}"));
    eprintln!(
        "50 concurrent host→guest connections x 256 KiB: {:?}",
        t.elapsed()
    );

    // Every flow is gone once the connections closed.
    std::thread::sleep(Duration::from_millis(300));
    let stats = env.finish();
    assert_eq!(stats.tcp_connected, 1050, "{stats:?}");
    assert_eq!(stats.tcp_accepted, 1050, "{stats:?}");
    assert_eq!(stats.tcp_refused, 0, "{stats:?}");
}

/// Bulk transfer both ways; prints MB/s (meaningful in `--release`). Size: `DINV_NETSTACK_MB`.
#[test]
fn throughput_both_directions() {
    let mb: usize = std::env::var("DINV_NETSTACK_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(16);
    let bytes = mb * 1024 * 1024;
    for mtu in [1500, 65520] {
        // Host sink/source on loopback.
        let sink = TcpListener::bind("127.0.0.1:0").unwrap();
        let sink_port = sink.local_addr().unwrap().port();
        let received = std::thread::spawn(move || {
            let (mut s, _) = sink.accept().unwrap();
            let mut buf = vec![0u8; 1 << 16];
            let mut total = 0usize;
            loop {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => return total,
                    Ok(n) => total += n,
                }
            }
        });
        let source = TcpListener::bind("127.0.0.1:0").unwrap();
        let source_port = source.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let (mut s, _) = source.accept().unwrap();
            let chunk = vec![0x5au8; 1 << 16];
            let mut left = bytes;
            while left > 0 {
                let n = left.min(chunk.len());
                if s.write_all(&chunk[..n]).is_err() {
                    return;
                }
                left -= n;
            }
        });
        let env = Env::start(mtu, |c| {
            if let Ok(v) = std::env::var("DINV_NETSTACK_BUF") {
                c.limits.tcp_buffer_size = v.parse().unwrap();
            }
        });
        let (up, down) = (env.alias(sink_port), env.alias(source_port));
        let (t_up, t_down) = env
            .ns
            .spawn(move || {
                let t = Instant::now();
                let mut s = TcpStream::connect(up).unwrap();
                let chunk = vec![0xa5u8; 1 << 16];
                let mut left = bytes;
                while left > 0 {
                    let n = left.min(chunk.len());
                    s.write_all(&chunk[..n]).unwrap();
                    left -= n;
                }
                drop(s);
                let t_up = t.elapsed();
                let t = Instant::now();
                let mut s = TcpStream::connect(down).unwrap();
                let mut buf = vec![0u8; 1 << 16];
                let mut total = 0;
                loop {
                    match s.read(&mut buf).unwrap() {
                        0 => break,
                        n => total += n,
                    }
                }
                assert_eq!(total, bytes, "guest received");
                (t_up, t.elapsed())
            })
            .join()
            .unwrap();
        assert_eq!(received.join().unwrap(), bytes, "host received");
        let rate = |t: Duration| bytes as f64 / t.as_secs_f64() / 1e6;
        eprintln!(
            "MTU {mtu}: guest→host {:.0} MB/s, host→guest {:.0} MB/s ({mb} MiB each)",
            rate(t_up),
            rate(t_down)
        );
        env.finish();
    }
}
