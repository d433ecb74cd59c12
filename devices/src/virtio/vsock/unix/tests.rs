//! Tests of the unix-socket muxer through the device: real unix sockets in a temp dir on the
//! host side, the guest driver harness (split queues over `GuestMemoryMmap`, an
//! `EventManager`) on the other, and the test playing the guest's vsock stack.

use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::connection::CONN_BUF_ALLOC;
use super::*;
use crate::virtio::lock;
use crate::virtio::vsock::tests::{ghdr, Harness};
use crate::virtio::vsock::{op, Vsock, HOST_CID, SHUTDOWN_RCV, SHUTDOWN_SEND};
use crate::virtio::VirtioDevice;

const GUEST_PORT: u32 = 1024;
const HOST_PORT: u32 = 5000;
const TIMEOUT: Duration = Duration::from_secs(20);

type Pkt = (PacketHeader, Vec<u8>);

struct Env {
    dir: TempDir,
    h: Harness<UnixMuxer>,
    sock: PathBuf,
}

impl Env {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("docker.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let cfg = VsockConfig {
            guest_cid: 3,
            listeners: vec![(listener, GUEST_PORT)],
            host_ports: vec![(HOST_PORT, dir.path().join("host.sock"))],
        };
        let mut h = Harness::new(Vsock::new(cfg).unwrap());
        h.post_rx(32);
        Env { dir, h, sock }
    }

    fn host_listener(&self) -> UnixListener {
        UnixListener::bind(self.dir.path().join("host.sock")).unwrap()
    }

    fn client(&self) -> UnixStream {
        let c = UnixStream::connect(&self.sock).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c
    }

    /// Run the device until `n` packets arrived.
    fn wait_pkts(&mut self, n: usize) -> Vec<Pkt> {
        let deadline = Instant::now() + TIMEOUT;
        let mut pkts = Vec::new();
        while pkts.len() < n {
            assert!(Instant::now() < deadline, "timed out, got {pkts:?}");
            self.h.run_wait(10);
            pkts.extend(self.h.take_rx());
        }
        assert_eq!(pkts.len(), n, "unexpected packets: {pkts:?}");
        pkts
    }

    fn wait_one(&mut self) -> Pkt {
        self.wait_pkts(1).remove(0)
    }

    /// Run the device a little and check that nothing arrives.
    fn expect_nothing(&mut self) {
        for _ in 0..5 {
            self.h.run_wait(5);
        }
        assert_eq!(self.h.take_rx(), vec![]);
    }

    /// A client connection the guest accepted: (client, host port).
    fn accepted_client(&mut self) -> (UnixStream, u32) {
        let client = self.client();
        let (req, _) = self.wait_one();
        assert_eq!(req.op, op::REQUEST);
        assert_eq!(req.dst_port, GUEST_PORT);
        self.h
            .send(ghdr(op::RESPONSE, GUEST_PORT, req.src_port), &[]);
        (client, req.src_port)
    }

    fn conns(&self) -> usize {
        lock(&self.h.dev).backend().connection_count()
    }

    fn metric(&self, f: impl Fn(&VsockMetrics) -> &std::sync::atomic::AtomicU64) -> u64 {
        VsockMetrics::get(f(&self.h.metrics()))
    }
}

fn read_to_eof(s: &mut UnixStream) -> Vec<u8> {
    let mut v = Vec::new();
    s.read_to_end(&mut v).unwrap();
    v
}

#[test]
fn host_connect_then_data_both_ways() {
    let mut env = Env::new();
    let mut client = env.client();
    let (req, data) = env.wait_one();
    assert_eq!(req.op, op::REQUEST);
    assert!(data.is_empty());
    assert_eq!((req.src_cid, req.dst_cid), (HOST_CID, 3));
    assert_eq!(req.dst_port, GUEST_PORT);
    assert!(req.src_port >= EPHEMERAL_PORT_BASE);
    assert_eq!(req.buf_alloc, CONN_BUF_ALLOC);
    // Nothing is read from the client before the guest answers.
    client.write_all(b"ping").unwrap();
    env.expect_nothing();
    env.h
        .send(ghdr(op::RESPONSE, GUEST_PORT, req.src_port), &[]);
    let (rw, data) = env.wait_one();
    assert_eq!(
        (rw.op, rw.src_port, rw.dst_port),
        (op::RW, req.src_port, GUEST_PORT)
    );
    assert_eq!(data, b"ping");
    env.h.send(ghdr(op::RW, GUEST_PORT, req.src_port), b"pong");
    let mut got = [0u8; 4];
    client.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"pong");
    assert_eq!(env.metric(|m| &m.conns_opened), 1);
    assert_eq!(env.conns(), 1);
}

#[test]
fn guest_rst_refuses_host_connection() {
    let mut env = Env::new();
    let mut client = env.client();
    let (req, _) = env.wait_one();
    env.h.send(ghdr(op::RST, GUEST_PORT, req.src_port), &[]);
    assert_eq!(read_to_eof(&mut client), b"");
    assert_eq!(env.conns(), 0);
    env.expect_nothing();
}

#[test]
fn guest_connects_to_configured_host_port() {
    let mut env = Env::new();
    let listener = env.host_listener();
    env.h.send(ghdr(op::REQUEST, 2000, HOST_PORT), &[]);
    let (resp, _) = env.wait_one();
    assert_eq!(
        (resp.op, resp.src_port, resp.dst_port),
        (op::RESPONSE, HOST_PORT, 2000)
    );
    let (mut server, _) = listener.accept().unwrap();
    server
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    server.write_all(b"hello").unwrap();
    let (rw, data) = env.wait_one();
    assert_eq!((rw.op, rw.dst_port), (op::RW, 2000));
    assert_eq!(data, b"hello");
    env.h.send(ghdr(op::RW, 2000, HOST_PORT), b"world");
    let mut got = [0u8; 5];
    server.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"world");
}

#[test]
fn guest_connect_to_unknown_or_dead_port_is_reset() {
    let mut env = Env::new();
    // Not configured.
    env.h.send(ghdr(op::REQUEST, 2000, 6000), &[]);
    let (rst, _) = env.wait_one();
    assert_eq!((rst.op, rst.src_port, rst.dst_port), (op::RST, 6000, 2000));
    // Configured, nobody listening.
    env.h.send(ghdr(op::REQUEST, 2001, HOST_PORT), &[]);
    let (rst, _) = env.wait_one();
    assert_eq!((rst.op, rst.dst_port), (op::RST, 2001));
    assert_eq!(env.metric(|m| &m.conns_refused), 2);
    // A packet for no connection gets RST, an RST gets nothing.
    env.h.send(ghdr(op::RW, 2002, HOST_PORT), b"x");
    assert_eq!(env.wait_one().0.op, op::RST);
    env.h.send(ghdr(op::RST, 2003, HOST_PORT), &[]);
    env.expect_nothing();
    assert_eq!(env.conns(), 0);
}

#[test]
fn host_to_guest_large_transfer_respects_guest_credit() {
    const TOTAL: usize = 1 << 20;
    const GUEST_BUF: u32 = 32 * 1024;
    let mut env = Env::new();
    let client = env.client();
    let (req, _) = env.wait_one();
    let port = req.src_port;
    let mut resp = ghdr(op::RESPONSE, GUEST_PORT, port);
    resp.buf_alloc = GUEST_BUF;
    env.h.send(resp, &[]);
    let expected: Vec<u8> = (0..TOTAL).map(|i| (i * 31 % 251) as u8).collect();
    let to_send = expected.clone();
    let writer = thread::spawn(move || {
        let mut client = client;
        client.write_all(&to_send).unwrap();
        client.shutdown(Shutdown::Write).unwrap();
        client
    });
    let mut got = Vec::new();
    let mut fwd: u32 = 0;
    let mut max_in_flight = 0;
    let mut credit_requests = 0;
    let deadline = Instant::now() + TIMEOUT;
    'outer: loop {
        assert!(
            Instant::now() < deadline,
            "timed out after {} bytes",
            got.len()
        );
        env.h.run_wait(10);
        for (hdr, data) in env.h.take_rx() {
            assert_eq!(hdr.dst_port, GUEST_PORT);
            match hdr.op {
                op::RW => {
                    got.extend_from_slice(&data);
                    let in_flight = got.len() as u32 - fwd;
                    assert!(in_flight <= GUEST_BUF, "credit overrun: {in_flight}");
                    max_in_flight = max_in_flight.max(in_flight);
                }
                op::CREDIT_REQUEST => credit_requests += 1,
                op::SHUTDOWN => {
                    assert_eq!(hdr.flags, SHUTDOWN_SEND);
                    break 'outer;
                }
                other => panic!("unexpected op {other}"),
            }
        }
        // The guest application reads everything once the window is full.
        if got.len() as u32 - fwd == GUEST_BUF {
            fwd = got.len() as u32;
            let mut upd = ghdr(op::CREDIT_UPDATE, GUEST_PORT, port);
            upd.buf_alloc = GUEST_BUF;
            upd.fwd_cnt = fwd;
            env.h.send(upd, &[]);
        }
    }
    assert_eq!(got.len(), TOTAL);
    assert!(got == expected, "data corrupted or reordered");
    assert_eq!(max_in_flight, GUEST_BUF);
    assert!(credit_requests > 0, "a starved host asks for credit");
    drop(writer.join().unwrap());
}

#[test]
fn guest_to_host_large_transfer_gets_credit_updates() {
    const TOTAL: usize = 2 << 20;
    const CHUNK: usize = 16 * 1024;
    let mut env = Env::new();
    let (client, port) = env.accepted_client();
    let reader = thread::spawn(move || {
        let mut client = client;
        let mut got = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match client.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => panic!("read: {e}"),
            }
            // A slow reader: the host-side buffer fills up.
            thread::sleep(Duration::from_micros(200));
        }
        got
    });
    let data: Vec<u8> = (0..TOTAL).map(|i| (i * 7 % 253) as u8).collect();
    let (mut sent, mut host_fwd, mut host_buf) = (0usize, 0u32, CONN_BUF_ALLOC);
    let mut updates = 0;
    let deadline = Instant::now() + TIMEOUT;
    while sent < TOTAL {
        assert!(Instant::now() < deadline, "timed out after {sent} bytes");
        let credit = host_buf - (sent as u32 - host_fwd);
        if credit > 0 {
            let n = CHUNK.min(credit as usize).min(TOTAL - sent);
            env.h
                .send(ghdr(op::RW, GUEST_PORT, port), &data[sent..sent + n]);
            sent += n;
        } else {
            env.h.run_wait(10);
        }
        for (hdr, _) in env.h.take_rx() {
            assert_eq!(hdr.op, op::CREDIT_UPDATE, "{hdr:?}");
            updates += 1;
            host_fwd = hdr.fwd_cnt;
            host_buf = hdr.buf_alloc;
        }
    }
    assert!(
        updates >= (TOTAL as u32 - CONN_BUF_ALLOC) / CONN_BUF_ALLOC,
        "{updates}"
    );
    env.h.send(
        {
            let mut h = ghdr(op::SHUTDOWN, GUEST_PORT, port);
            h.flags = SHUTDOWN_SEND;
            h
        },
        &[],
    );
    // The client reads everything, then closes: both directions are done, the guest gets
    // RST.
    let deadline = Instant::now() + TIMEOUT;
    let mut rst = false;
    while !rst || !reader.is_finished() {
        assert!(Instant::now() < deadline);
        env.h.run_wait(10);
        rst |= env.h.take_rx().iter().any(|(h, _)| h.op == op::RST);
    }
    let got = reader.join().unwrap();
    assert_eq!(got.len(), TOTAL);
    assert!(got == data, "data corrupted or reordered");
    assert_eq!(env.conns(), 0);
}

#[test]
fn guest_exceeding_credit_is_reset() {
    let mut env = Env::new();
    let (client, port) = env.accepted_client();
    let chunk = vec![0x55u8; 64 * 1024];
    let mut rst = false;
    // Kernel socket buffer + our CONN_BUF_ALLOC are far below 8 MiB.
    for _ in 0..128 {
        env.h.send(ghdr(op::RW, GUEST_PORT, port), &chunk);
        if env.h.take_rx().iter().any(|(h, _)| h.op == op::RST) {
            rst = true;
            break;
        }
    }
    assert!(rst, "credit overrun must reset the connection");
    assert_eq!(env.metric(|m| &m.protocol_errors), 1);
    assert_eq!(env.conns(), 0);
    drop(client);
}

#[test]
fn guest_half_close_then_host_close() {
    let mut env = Env::new();
    let (mut client, port) = env.accepted_client();
    let mut shut = ghdr(op::SHUTDOWN, GUEST_PORT, port);
    shut.flags = SHUTDOWN_SEND;
    env.h.send(ghdr(op::RW, GUEST_PORT, port), b"last words");
    env.h.send(shut, &[]);
    // The client reads the data, then EOF, but can still talk.
    assert_eq!(read_to_eof(&mut client), b"last words");
    client.write_all(b"late reply").unwrap();
    let (rw, data) = env.wait_one();
    assert_eq!((rw.op, data.as_slice()), (op::RW, b"late reply".as_slice()));
    assert_eq!(env.conns(), 1);
    // Now the client is done too: both directions closed, the guest gets RST.
    client.shutdown(Shutdown::Write).unwrap();
    let (rst, _) = env.wait_one();
    assert_eq!(rst.op, op::RST);
    assert_eq!(env.conns(), 0);
}

#[test]
fn host_half_close_then_guest_close() {
    let mut env = Env::new();
    let (mut client, port) = env.accepted_client();
    client.write_all(b"request").unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    let pkts = env.wait_pkts(2);
    assert_eq!(pkts[0].0.op, op::RW);
    assert_eq!(pkts[0].1, b"request");
    assert_eq!(
        (pkts[1].0.op, pkts[1].0.flags),
        (op::SHUTDOWN, SHUTDOWN_SEND)
    );
    // The guest still answers, then closes (Linux sends SHUTDOWN RCV|SEND on close).
    env.h.send(ghdr(op::RW, GUEST_PORT, port), b"response");
    let mut shut = ghdr(op::SHUTDOWN, GUEST_PORT, port);
    shut.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
    env.h.send(shut, &[]);
    assert_eq!(env.wait_one().0.op, op::RST);
    assert_eq!(read_to_eof(&mut client), b"response");
    assert_eq!(env.conns(), 0);
}

#[test]
fn client_disappearing_resets_the_guest_side() {
    let mut env = Env::new();
    let (client, port) = env.accepted_client();
    drop(client);
    let (shut, _) = env.wait_one();
    assert_eq!((shut.op, shut.flags), (op::SHUTDOWN, SHUTDOWN_SEND));
    // Writing to the dead peer fails: RST.
    env.h.send(ghdr(op::RW, GUEST_PORT, port), b"anyone?");
    assert_eq!(env.wait_one().0.op, op::RST);
    assert_eq!(env.conns(), 0);
    assert!(env.metric(|m| &m.conns_closed) >= 1);
}

#[test]
fn guest_rst_closes_client() {
    let mut env = Env::new();
    let (mut client, port) = env.accepted_client();
    env.h.send(ghdr(op::RST, GUEST_PORT, port), &[]);
    assert_eq!(read_to_eof(&mut client), b"");
    assert_eq!(env.conns(), 0);
    env.expect_nothing();
}

#[test]
fn credit_request_and_protocol_errors() {
    let mut env = Env::new();
    let (_client, port) = env.accepted_client();
    env.h.send(ghdr(op::CREDIT_REQUEST, GUEST_PORT, port), &[]);
    let (upd, _) = env.wait_one();
    assert_eq!(
        (upd.op, upd.buf_alloc, upd.fwd_cnt),
        (op::CREDIT_UPDATE, CONN_BUF_ALLOC, 0)
    );
    // A REQUEST on an established connection is a protocol error.
    env.h.send(ghdr(op::REQUEST, GUEST_PORT, port), &[]);
    assert_eq!(env.wait_one().0.op, op::RST);
    assert_eq!(env.metric(|m| &m.protocol_errors), 1);
    assert_eq!(env.conns(), 0);
    // A malformed packet for a live connection resets it.
    let (_client, port) = env.accepted_client();
    let mut bad = ghdr(op::RW, GUEST_PORT, port);
    bad.len = 10;
    env.h.send_raw(&bad, b"short");
    assert_eq!(env.wait_one().0.op, op::RST);
    assert_eq!(env.conns(), 0);
}

#[test]
fn many_concurrent_connections_echo() {
    const N: usize = 50;
    let mut env = Env::new();
    let mut clients: Vec<UnixStream> = (0..N).map(|_| env.client()).collect();
    let reqs = env.wait_pkts(N);
    let mut ports: Vec<u32> = reqs.iter().map(|(h, _)| h.src_port).collect();
    ports.sort_unstable();
    ports.dedup();
    assert_eq!(ports.len(), N, "distinct host ports");
    for (h, _) in &reqs {
        assert_eq!(h.op, op::REQUEST);
        env.h.send(ghdr(op::RESPONSE, GUEST_PORT, h.src_port), &[]);
    }
    for (i, c) in clients.iter_mut().enumerate() {
        c.write_all(format!("message {i:03}").as_bytes()).unwrap();
    }
    // The guest echoes every RW back on its connection.
    let mut echoed = 0;
    let deadline = Instant::now() + TIMEOUT;
    while echoed < N {
        assert!(Instant::now() < deadline);
        env.h.run_wait(10);
        for (hdr, data) in env.h.take_rx() {
            assert_eq!(hdr.op, op::RW);
            assert_eq!(data.len(), 11);
            env.h.send(ghdr(op::RW, GUEST_PORT, hdr.src_port), &data);
            echoed += 1;
        }
    }
    for (i, c) in clients.iter_mut().enumerate() {
        let mut got = [0u8; 11];
        c.read_exact(&mut got).unwrap();
        assert_eq!(got, format!("message {i:03}").as_bytes());
    }
    assert_eq!(env.conns(), N);
    drop(clients);
    // Every client left: each guest connection sees SHUTDOWN(SEND).
    let shuts = env.wait_pkts(N);
    assert!(shuts.iter().all(|(h, _)| h.op == op::SHUTDOWN));
}

#[test]
fn reset_closes_connections_and_stops_listening() {
    let mut env = Env::new();
    let (mut client, _port) = env.accepted_client();
    assert!(lock(&env.h.dev).reset());
    env.h.run_idle();
    assert_eq!(read_to_eof(&mut client), b"");
    assert_eq!(env.conns(), 0);
    // Connections wait in the backlog while the device is down.
    let _waiting = env.client();
    for _ in 0..5 {
        env.h.run_wait(5);
    }
    env.h.activate();
    env.h.post_rx(32);
    let (req, _) = env.wait_one();
    assert_eq!(req.op, op::REQUEST);
}
