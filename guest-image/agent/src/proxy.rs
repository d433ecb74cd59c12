//! `dinv-agent -proto tcp -host-ip … -host-port … -container-ip … -container-port …`: a drop-in
//! for dockerd's userland proxy (`dockerd --userland-proxy-path=/sbin/dinv-agent`).
//!
//! Why: dockerd starts one `docker-proxy` per published port and gives it 16 s to report
//! readiness; `docker-proxy` is a Go program, and Go start-up alone takes longer than that on
//! PVM ("Timed out proxy starting the userland proxy"). This one starts in milliseconds.
//!
//! Protocol (as docker-proxy): the status pipe is fd 3: write `0\n` once listening, or
//! `1\n<error>` and exit 1. With `-use-listen-fd`, dockerd already bound the socket and passes
//! it as fd 4. TCP: each accepted connection is relayed to the container (half-closes
//! forwarded). UDP: each client address gets its own socket connected to the container; replies
//! go back from the listening socket; flows idle for 90 s are dropped.
//!
//! Binding follows docker-proxy (Go's `net.Listen("tcp6", …)`): an IPv6 host address is bound
//! with `IPV6_V6ONLY`, because dockerd starts one proxy for `0.0.0.0:P` and another for `[::]:P`
//! — a dual-stack `[::]:P` would collide with the first ("Address already in use").

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::FromRawFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use socket2::{Domain, Socket, Type};

const STATUS_FD: i32 = 3;
const LISTEN_FD: i32 = 4;
const UDP_IDLE: Duration = Duration::from_secs(90);

/// Parsed command line.
#[derive(Debug, PartialEq, Eq)]
pub struct Args {
    proto: String,
    host: SocketAddr,
    container: SocketAddr,
    use_listen_fd: bool,
}

/// Whether the agent was started as a userland proxy (by dockerd) rather than as init.
pub fn is_proxy_invocation(args: &[String]) -> bool {
    args.iter().skip(1).any(|a| flag_name(a) == Some("proto"))
}

fn flag_name(a: &str) -> Option<&str> {
    let name = a.strip_prefix("--").or_else(|| a.strip_prefix('-'))?;
    Some(name.split_once('=').map_or(name, |(n, _)| n))
}

/// Parses Go-`flag`-style arguments (`-name value`, `-name=value`, `--name`).
pub fn parse(args: &[String]) -> Result<Args, String> {
    let mut vals: HashMap<&str, String> = HashMap::new();
    let mut use_listen_fd = false;
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        let name = flag_name(a).ok_or_else(|| format!("unexpected argument {a:?}"))?;
        let inline = a.split_once('=').map(|(_, v)| v.to_string());
        if name == "use-listen-fd" {
            use_listen_fd = inline.as_deref().is_none_or(|v| v == "true" || v == "1");
            continue;
        }
        let value = match inline {
            Some(v) => v,
            None => it.next().cloned().ok_or_else(|| format!("flag -{name} needs a value"))?,
        };
        vals.insert(name, value);
    }
    let get = |k: &str| vals.get(k).cloned().ok_or_else(|| format!("missing -{k}"));
    let ip = |k: &str| -> Result<IpAddr, String> {
        let v = get(k)?;
        v.parse().map_err(|_| format!("-{k}: bad address {v:?}"))
    };
    let port = |k: &str| -> Result<u16, String> {
        let v = get(k)?;
        v.parse().map_err(|_| format!("-{k}: bad port {v:?}"))
    };
    let proto = vals.get("proto").cloned().unwrap_or_else(|| "tcp".into());
    if proto != "tcp" && proto != "udp" {
        return Err(format!("unsupported protocol {proto:?} (tcp or udp)"));
    }
    Ok(Args {
        proto,
        host: SocketAddr::new(ip("host-ip")?, port("host-port")?),
        container: SocketAddr::new(ip("container-ip")?, port("container-port")?),
        use_listen_fd,
    })
}

fn status(msg: &str) {
    // SAFETY: dockerd passes the status pipe as fd 3; nothing else in this process owns it.
    let mut f = unsafe { File::from_raw_fd(STATUS_FD) };
    let _ = f.write_all(msg.as_bytes());
}

/// Runs the proxy; never returns.
pub fn main(args: &[String]) -> ! {
    let a = match parse(args) {
        Ok(a) => a,
        Err(e) => {
            status(&format!("1\n{e}"));
            std::process::exit(1);
        }
    };
    let result = if a.proto == "tcp" { tcp(&a) } else { udp(&a) };
    if let Err(e) = result {
        status(&format!("1\n{e}"));
        std::process::exit(1);
    }
    std::process::exit(0);
}

fn tcp(a: &Args) -> io::Result<()> {
    let listener = if a.use_listen_fd {
        // SAFETY: with -use-listen-fd dockerd passes a bound, listening TCP socket as fd 4.
        unsafe { TcpListener::from_raw_fd(LISTEN_FD) }
    } else {
        bind(a.host, Type::STREAM)?.into()
    };
    status("0\n");
    let target = a.container;
    for conn in listener.incoming() {
        let Ok(client) = conn else { continue };
        let _ = std::thread::Builder::new().spawn(move || {
            let Ok(server) = TcpStream::connect(target) else {
                let _ = client.shutdown(Shutdown::Both);
                return;
            };
            relay(client, server);
        });
    }
    Ok(())
}

/// Binds (and for streams, listens on) `addr` the way docker-proxy does: IPv6 addresses are
/// IPv6-only, TCP listeners reuse addresses in TIME_WAIT.
fn bind(addr: SocketAddr, ty: Type) -> io::Result<Socket> {
    let sock = Socket::new(Domain::for_address(addr), ty, None)?;
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    if ty == Type::STREAM {
        sock.set_reuse_address(true)?;
    }
    sock.bind(&addr.into())?;
    if ty == Type::STREAM {
        sock.listen(1024)?;
    }
    Ok(sock)
}

fn relay(a: TcpStream, b: TcpStream) {
    let (Ok(a2), Ok(b2)) = (a.try_clone(), b.try_clone()) else { return };
    let t = std::thread::spawn(move || pipe(a2, b2));
    pipe(b, a);
    let _ = t.join();
}

fn pipe(mut from: TcpStream, mut to: TcpStream) {
    let _ = io::copy(&mut from, &mut to);
    let _ = to.shutdown(Shutdown::Write);
}

/// UDP flows by client address: the socket connected to the container, last use.
type Flows = HashMap<SocketAddr, (Arc<UdpSocket>, Instant)>;

fn udp(a: &Args) -> io::Result<()> {
    let sock = if a.use_listen_fd {
        // SAFETY: with -use-listen-fd dockerd passes a bound UDP socket as fd 4.
        unsafe { UdpSocket::from_raw_fd(LISTEN_FD) }
    } else {
        bind(a.host, Type::DGRAM)?.into()
    };
    status("0\n");
    let flows: Arc<Mutex<Flows>> = Arc::default();
    let mut buf = vec![0u8; 65535];
    loop {
        let (n, client) = sock.recv_from(&mut buf)?;
        let flow = {
            let mut map = flows.lock().unwrap_or_else(|p| p.into_inner());
            map.retain(|_, (_, last)| last.elapsed() < UDP_IDLE);
            match map.get_mut(&client) {
                Some((s, last)) => {
                    *last = Instant::now();
                    Some(s.clone())
                }
                None => {
                    let bind: SocketAddr = if a.container.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }
                        .parse()
                        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
                    let up = UdpSocket::bind(bind).and_then(|u| u.connect(a.container).map(|()| u));
                    match up {
                        Ok(u) => {
                            let u = Arc::new(u);
                            u.set_read_timeout(Some(UDP_IDLE))?;
                            map.insert(client, (u.clone(), Instant::now()));
                            let (back, up2, flows2) = (sock.try_clone()?, u.clone(), flows.clone());
                            std::thread::spawn(move || {
                                let mut b = vec![0u8; 65535];
                                while let Ok(n) = up2.recv(&mut b) {
                                    let _ = back.send_to(&b[..n], client);
                                }
                                flows2.lock().unwrap_or_else(|p| p.into_inner()).remove(&client);
                            });
                            Some(u)
                        }
                        Err(_) => None,
                    }
                }
            }
        };
        if let Some(f) = flow {
            let _ = f.send(&buf[..n]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn parses_docker_proxy_command_lines() {
        let a = parse(&v("p -proto tcp -host-ip 0.0.0.0 -host-port 8080 -container-ip 172.17.0.2 -container-port 80"))
            .unwrap();
        assert_eq!(a.proto, "tcp");
        assert_eq!(a.host, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(a.container, "172.17.0.2:80".parse().unwrap());
        assert!(!a.use_listen_fd);
        let a = parse(&v("p --proto=udp -host-ip=:: -host-port=53 -container-ip fd00::2 -container-port 53 -use-listen-fd"))
            .unwrap();
        assert_eq!(a.proto, "udp");
        assert!(a.use_listen_fd);
        assert_eq!(a.container, "[fd00::2]:53".parse().unwrap());
        assert!(is_proxy_invocation(&v("/sbin/dinv-agent -proto tcp")));
        assert!(!is_proxy_invocation(&v("/sbin/dinv-agent")));
        for bad in [
            "p -proto sctp -host-ip 0.0.0.0 -host-port 1 -container-ip 1.2.3.4 -container-port 1",
            "p -proto tcp -host-ip 0.0.0.0 -host-port 99999 -container-ip 1.2.3.4 -container-port 1",
            "p -proto tcp -host-ip nowhere -host-port 1 -container-ip 1.2.3.4 -container-port 1",
            "p -proto tcp -host-ip 0.0.0.0 -host-port 1 -container-ip 1.2.3.4",
            "p -proto tcp stray",
            "p -proto",
        ] {
            assert!(parse(&v(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn ipv4_and_ipv6_wildcards_bind_the_same_port_like_docker_proxy() {
        // dockerd publishes `-p P:80` as two proxies, 0.0.0.0:P and [::]:P.
        let v4 = bind("0.0.0.0:0".parse().unwrap(), Type::STREAM).unwrap();
        let port = v4.local_addr().unwrap().as_socket().unwrap().port();
        let v6 = bind(SocketAddr::new("::".parse().unwrap(), port), Type::STREAM)
            .expect("[::]:P must be IPv6-only so it does not collide with 0.0.0.0:P");
        assert!(v6.only_v6().unwrap());
        let u4 = bind("0.0.0.0:0".parse().unwrap(), Type::DGRAM).unwrap();
        let uport = u4.local_addr().unwrap().as_socket().unwrap().port();
        bind(SocketAddr::new("::".parse().unwrap(), uport), Type::DGRAM).unwrap();
        // And a real conflict is still reported.
        assert!(bind(SocketAddr::new("0.0.0.0".parse().unwrap(), port), Type::STREAM).is_err());
    }

    #[test]
    fn tcp_relay_carries_both_directions_and_half_close() {
        use std::io::Read;
        let server = TcpListener::bind("127.0.0.1:0").unwrap();
        let target = server.local_addr().unwrap();
        let front = TcpListener::bind("127.0.0.1:0").unwrap();
        let front_addr = front.local_addr().unwrap();
        std::thread::spawn(move || {
            let (c, _) = front.accept().unwrap();
            relay(c, TcpStream::connect(target).unwrap());
        });
        std::thread::spawn(move || {
            let (mut s, _) = server.accept().unwrap();
            let mut req = String::new();
            s.read_to_string(&mut req).unwrap();
            s.write_all(format!("echo:{req}").as_bytes()).unwrap();
        });
        let mut c = TcpStream::connect(front_addr).unwrap();
        c.write_all(b"hello").unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        let mut resp = String::new();
        c.read_to_string(&mut resp).unwrap();
        assert_eq!(resp, "echo:hello");
    }
}
