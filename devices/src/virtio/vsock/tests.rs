//! Tests of the virtio-vsock device with a fake backend: identity and config space, packet
//! parsing (a table of malformed tx chains and rx buffers), delivery in both directions,
//! backpressure, rx starvation, reset. Also the guest-driver harness the muxer tests share:
//! real split queues (laid out like `MockSplitQueue`, but with ring wrap-around) over
//! `GuestMemoryMmap`, driven through an `EventManager`.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, SubscriberOps};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;
use crate::virtio::test_utils::{
    avail_addr, desc_addr, guest_mem, publish, queue_base, run_idle, split_queue, take_used,
    used_addr, write_desc,
};
use crate::virtio::{
    feature, lock, ActivationContext, InterruptType, RecordingInterrupt, VirtioDevice,
    VIRTIO_F_VERSION_1,
};

pub(crate) const GUEST_CID: u64 = 3;
const MEM_SIZE: usize = 0x200_0000;
const QSIZE: u16 = 256;
const RX_SLOTS: u16 = 64;
const RX_STRIDE: u64 = 0x1_1000;
const RX_BASE: u64 = 0x10_0000;
const TX_SLOTS: u64 = 32;
const TX_STRIDE: u64 = 0x1_1000;
const TX_BASE: u64 = 0x60_0000;
/// Free area for hand-made chains.
pub(crate) const SCRATCH: u64 = 0x100_0000;
pub(crate) const R: u16 = 0;
pub(crate) const W: u16 = VRING_DESC_F_WRITE as u16;
/// Default rx buffer: a header plus 4 KiB, like Linux's driver.
pub(crate) const RX_BUF_LEN: u32 = HDR_LEN as u32 + 4096;

#[derive(Debug, Default, Clone, Copy)]
struct QState {
    avail_idx: u16,
    used_seen: u16,
    next_desc: u16,
}

/// A header from the guest to the host.
pub(crate) fn ghdr(op: u16, src_port: u32, dst_port: u32) -> PacketHeader {
    PacketHeader {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        type_: TYPE_STREAM,
        op,
        buf_alloc: 64 * 1024,
        ..PacketHeader::default()
    }
}

/// The guest driver: three queues in guest memory, the device behind an event manager.
pub(crate) struct Harness<B: VsockBackend + 'static> {
    pub dev: Arc<Mutex<Vsock<B>>>,
    pub em: EventManager<Arc<Mutex<Vsock<B>>>>,
    pub mem: GuestMemoryMmap,
    pub irq: Arc<RecordingInterrupt>,
    qs: [QState; NUM_QUEUES],
    rx_outstanding: u16,
    pub rx_buf_len: u32,
    /// Repost as many rx buffers as were used by `take_rx`.
    pub auto_refill: bool,
    tx_count: u64,
    /// Used rx entries shorter than a header (malformed buffers).
    pub short_rx: usize,
}

impl<B: VsockBackend + 'static> Harness<B> {
    pub fn new(dev: Vsock<B>) -> Self {
        let mem = guest_mem(MEM_SIZE);
        let dev = Arc::new(Mutex::new(dev));
        let mut em = EventManager::<Arc<Mutex<Vsock<B>>>>::new().unwrap();
        em.add_subscriber(dev.clone());
        let mut h = Harness {
            dev,
            em,
            mem,
            irq: Arc::new(RecordingInterrupt::new()),
            qs: [QState::default(); NUM_QUEUES],
            rx_outstanding: 0,
            rx_buf_len: RX_BUF_LEN,
            auto_refill: true,
            tx_count: 0,
            short_rx: 0,
        };
        h.activate();
        h
    }

    pub fn activate(&mut self) {
        self.qs = [QState::default(); NUM_QUEUES];
        self.rx_outstanding = 0;
        for q in 0..NUM_QUEUES {
            self.mem
                .write_slice(&[0u8; 0x3000], GuestAddress(queue_base(q)))
                .unwrap();
        }
        let queues = (0..NUM_QUEUES).map(make_queue).collect();
        {
            let mut dev = lock(&self.dev);
            let features = dev.avail_features();
            dev.ack_features(features);
            dev.activate(ActivationContext {
                mem: self.mem.clone(),
                interrupt: self.irq.clone(),
                queues,
            })
            .unwrap();
        }
        self.run_idle();
    }

    /// Run the event loop until nothing is ready.
    pub fn run_idle(&mut self) {
        run_idle(&mut self.em);
    }

    /// Run the event loop for up to `ms` milliseconds waiting for something.
    pub fn run_wait(&mut self, ms: i32) {
        if self.em.run_with_timeout(ms).unwrap() > 0 {
            self.run_idle();
        }
    }

    pub fn kick(&mut self, q: usize) {
        lock(&self.dev).queue_events()[q].write(1).unwrap();
    }

    /// Put a chain of (addr, len, flags) on queue `q`; returns its head.
    pub fn add_chain(&mut self, q: usize, descs: &[(u64, u32, u16)]) -> u16 {
        let st = &mut self.qs[q];
        let head = st.next_desc;
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let idx = (head + i as u16) % QSIZE;
            let last = i + 1 == descs.len();
            let next = (idx + 1) % QSIZE;
            let flags = if last {
                flags
            } else {
                flags | VRING_DESC_F_NEXT as u16
            };
            let next = if last { 0 } else { next };
            write_desc(&self.mem, desc_addr(q), idx, (addr, len, flags), next);
        }
        st.next_desc = (head + descs.len() as u16) % QSIZE;
        publish(&self.mem, avail_addr(q), QSIZE, &mut st.avail_idx, head);
        head
    }

    /// New used entries of queue `q` as (id, len).
    pub fn take_used(&mut self, q: usize) -> Vec<(u32, u32)> {
        take_used(&self.mem, used_addr(q), QSIZE, &mut self.qs[q].used_seen)
    }

    fn rx_addr(head: u32) -> u64 {
        RX_BASE + (u64::from(head) % u64::from(RX_SLOTS)) * RX_STRIDE
    }

    /// Post `n` rx buffers of `rx_buf_len` bytes and notify.
    pub fn post_rx(&mut self, n: u16) {
        assert!(self.rx_outstanding + n <= RX_SLOTS, "too many rx buffers");
        let len = self.rx_buf_len;
        for _ in 0..n {
            let head = u32::from(self.qs[RX_QUEUE].next_desc);
            self.add_chain(RX_QUEUE, &[(Self::rx_addr(head), len, W)]);
        }
        self.rx_outstanding += n;
        self.kick(RX_QUEUE);
        self.run_idle();
    }

    /// Packets the device put on the rx queue since the last call.
    pub fn take_rx(&mut self) -> Vec<(PacketHeader, Vec<u8>)> {
        let used = self.take_used(RX_QUEUE);
        let n = used.len() as u16;
        self.rx_outstanding -= n;
        let mut out = Vec::new();
        for (id, len) in used {
            if (len as usize) < HDR_LEN {
                self.short_rx += 1;
                continue;
            }
            let mut bytes = vec![0u8; len as usize];
            self.mem
                .read_slice(&mut bytes, GuestAddress(Self::rx_addr(id)))
                .unwrap();
            let hdr = PacketHeader::from_bytes(bytes[..HDR_LEN].try_into().unwrap());
            assert_eq!(
                hdr.len as usize,
                len as usize - HDR_LEN,
                "len matches used len"
            );
            out.push((hdr, bytes[HDR_LEN..].to_vec()));
        }
        if self.auto_refill && n > 0 {
            self.post_rx(n);
        }
        out
    }

    /// Send a packet whose header is written exactly as given.
    pub fn send_raw(&mut self, hdr: &PacketHeader, data: &[u8]) {
        let addr = TX_BASE + (self.tx_count % TX_SLOTS) * TX_STRIDE;
        self.tx_count += 1;
        self.mem
            .write_slice(&hdr.to_bytes(), GuestAddress(addr))
            .unwrap();
        let data_addr = addr + HDR_LEN as u64;
        self.mem.write_slice(data, GuestAddress(data_addr)).unwrap();
        if data.is_empty() {
            self.add_chain(TX_QUEUE, &[(addr, HDR_LEN as u32, R)]);
        } else {
            self.add_chain(
                TX_QUEUE,
                &[(addr, HDR_LEN as u32, R), (data_addr, data.len() as u32, R)],
            );
        }
        self.kick(TX_QUEUE);
        self.run_idle();
    }

    /// Send `hdr` with `data` (its `len` set to match).
    pub fn send(&mut self, mut hdr: PacketHeader, data: &[u8]) {
        hdr.len = data.len() as u32;
        self.send_raw(&hdr, data);
    }

    pub fn metrics(&self) -> Arc<VsockMetrics> {
        lock(&self.dev).metrics().clone()
    }
}

fn make_queue(q: usize) -> Queue {
    split_queue(QSIZE, desc_addr(q), avail_addr(q), used_addr(q), false)
}

/// A backend that records what the guest sent and replays what the test queued.
#[derive(Debug, Default)]
pub(crate) struct FakeBackend {
    pub sent: Vec<TxPacket>,
    pub rejected: Vec<PacketHeader>,
    pub to_guest: VecDeque<(PacketHeader, Vec<u8>)>,
    pub backpressure: bool,
    pub activations: usize,
    pub resets: usize,
}

impl VsockBackend for FakeBackend {
    fn activate(&mut self) {
        self.activations += 1;
    }

    fn reset(&mut self) {
        self.resets += 1;
    }

    fn send_pkt(&mut self, pkt: &TxPacket) -> Result<(), Backpressure> {
        if self.backpressure {
            return Err(Backpressure);
        }
        self.sent.push(pkt.clone());
        Ok(())
    }

    fn reject(&mut self, hdr: &PacketHeader) {
        self.rejected.push(*hdr);
    }

    fn has_pending_rx(&self) -> bool {
        !self.to_guest.is_empty()
    }

    fn recv_pkt(&mut self, buf: &mut [u8]) -> Option<(PacketHeader, usize)> {
        let (hdr, data) = self.to_guest.front_mut()?;
        let hdr = *hdr;
        let n = data.len().min(buf.len());
        buf[..n].copy_from_slice(&data[..n]);
        data.drain(..n);
        if data.is_empty() {
            self.to_guest.pop_front();
        }
        Some((hdr, n))
    }

    fn handle_fd_event(&mut self, _fd: std::os::fd::RawFd, _events: event_manager::EventSet) {}

    fn take_fd_ops(&mut self, _out: &mut Vec<FdOp>) {}
}

fn fake() -> Harness<FakeBackend> {
    let metrics = Arc::new(VsockMetrics::default());
    Harness::new(Vsock::with_backend(GUEST_CID, FakeBackend::default(), metrics).unwrap())
}

fn with_fake<T>(h: &Harness<FakeBackend>, f: impl FnOnce(&mut FakeBackend) -> T) -> T {
    f(lock(&h.dev).backend_mut())
}

fn host_pkt(op: u16, src_port: u32, dst_port: u32) -> PacketHeader {
    PacketHeader {
        src_port,
        dst_port,
        op,
        ..PacketHeader::default()
    }
}

#[test]
fn identity_and_config_space() {
    let dev = Vsock::with_backend(
        0x1234_5678,
        FakeBackend::default(),
        Arc::new(VsockMetrics::default()),
    )
    .unwrap();
    assert_eq!(dev.device_type(), 19);
    assert_eq!(dev.queue_max_sizes(), &[QUEUE_SIZE; 3]);
    assert_ne!(dev.avail_features() & feature(VIRTIO_F_VERSION_1), 0);
    // No VIRTIO_VSOCK_F_SEQPACKET (bit 1) nor F_STREAM (bit 0, implied).
    assert_eq!(dev.avail_features() & 0b11, 0);
    let mut cid = [0u8; 8];
    dev.read_config(0, &mut cid);
    assert_eq!(u64::from_le_bytes(cid), 0x1234_5678);
    let mut hi = [0xffu8; 4];
    dev.read_config(4, &mut hi);
    assert_eq!(hi, [0; 4]);
    let mut past = [0xffu8; 4];
    dev.read_config(6, &mut past);
    assert_eq!(past, [0x00, 0x00, 0, 0]);
    dev.read_config(u64::MAX, &mut past);
    assert_eq!(past, [0; 4]);
}

#[test]
fn invalid_configuration_is_rejected() {
    for cid in [0, 1, 2, u64::from(u32::MAX), 1 << 32] {
        let cfg = VsockConfig {
            guest_cid: cid,
            listeners: vec![],
            host_ports: vec![],
        };
        assert!(matches!(Vsock::new(cfg), Err(VsockError::InvalidCid(c)) if c == cid));
    }
    let cfg = VsockConfig {
        guest_cid: 3,
        listeners: vec![],
        host_ports: vec![(5, "/a".into()), (5, "/b".into())],
    };
    assert!(matches!(
        Vsock::new(cfg),
        Err(VsockError::DuplicateHostPort(5))
    ));
}

#[test]
fn header_round_trip() {
    let hdr = PacketHeader {
        src_cid: 0x0102_0304_0506_0708,
        dst_cid: 2,
        src_port: 0xaabb_ccdd,
        dst_port: 7,
        len: 9,
        type_: 1,
        op: 5,
        flags: 3,
        buf_alloc: 0x1_0000,
        fwd_cnt: 0xffff_fffe,
    };
    let b = hdr.to_bytes();
    assert_eq!(&b[0..8], &0x0102_0304_0506_0708u64.to_le_bytes());
    assert_eq!(&b[28..32], &[1, 0, 5, 0]);
    assert_eq!(PacketHeader::from_bytes(&b), hdr);
}

#[test]
fn tx_packet_reaches_backend() {
    let mut h = fake();
    assert_eq!(with_fake(&h, |b| b.activations), 1);
    h.irq.take();
    let data: Vec<u8> = (0..3000u32).map(|i| (i % 253) as u8).collect();
    h.send(ghdr(op::RW, 1000, 1024), &data);
    let sent = with_fake(&h, |b| std::mem::take(&mut b.sent));
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].hdr.op, op::RW);
    assert_eq!(sent[0].hdr.src_port, 1000);
    assert_eq!(sent[0].data, data);
    assert_eq!(h.take_used(TX_QUEUE), vec![(0, 0)]);
    assert_eq!(h.irq.take(), vec![InterruptType::Queue(TX_QUEUE as u16)]);
    let m = h.metrics();
    assert_eq!(VsockMetrics::get(&m.tx_packets), 1);
    assert_eq!(VsockMetrics::get(&m.tx_bytes), 3000);
}

#[test]
fn header_split_over_descriptors_is_accepted() {
    let mut h = fake();
    let mut hdr = ghdr(op::RW, 1, 2);
    hdr.len = 4;
    let b = hdr.to_bytes();
    h.mem.write_slice(&b, GuestAddress(SCRATCH)).unwrap();
    h.mem
        .write_slice(b"wxyz", GuestAddress(SCRATCH + 44))
        .unwrap();
    // 10 + 30 + (4 header bytes and 2 data bytes) + 2 data bytes.
    h.add_chain(
        TX_QUEUE,
        &[
            (SCRATCH, 10, R),
            (SCRATCH + 10, 30, R),
            (SCRATCH + 40, 6, R),
            (SCRATCH + 46, 2, R),
        ],
    );
    h.kick(TX_QUEUE);
    h.run_idle();
    let sent = with_fake(&h, |b| std::mem::take(&mut b.sent));
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].data, b"wxyz");
}

/// Malformed tx chains: (name, chain builder, expect a reject/RST).
#[test]
fn malformed_tx_packets_are_counted_not_fatal() {
    type Build = fn(&GuestMemoryMmap) -> Vec<(u64, u32, u16)>;
    fn with_hdr(mem: &GuestMemoryMmap, hdr: PacketHeader, total: u32) -> Vec<(u64, u32, u16)> {
        mem.write_slice(&hdr.to_bytes(), GuestAddress(SCRATCH))
            .unwrap();
        vec![(SCRATCH, total, R)]
    }
    let cases: Vec<(&str, Build, bool)> = vec![
        (
            "wrong type (seqpacket)",
            |m| {
                let mut h = ghdr(op::REQUEST, 5, 6);
                h.type_ = 2;
                with_hdr(m, h, 44)
            },
            true,
        ),
        (
            "len beyond chain",
            |m| {
                let mut h = ghdr(op::RW, 5, 6);
                h.len = 100;
                with_hdr(m, h, 44 + 99)
            },
            true,
        ),
        (
            "len beyond maximum",
            |m| {
                let mut h = ghdr(op::RW, 5, 6);
                h.len = MAX_PKT_LEN + 1;
                with_hdr(m, h, 44 + MAX_PKT_LEN + 1)
            },
            true,
        ),
        (
            "len u32::MAX",
            |m| {
                let mut h = ghdr(op::RW, 5, 6);
                h.len = u32::MAX;
                with_hdr(m, h, 44)
            },
            true,
        ),
        (
            "wrong source CID",
            |m| {
                let mut h = ghdr(op::RW, 5, 6);
                h.src_cid = 7;
                with_hdr(m, h, 44)
            },
            false,
        ),
        (
            "wrong destination CID",
            |m| {
                let mut h = ghdr(op::REQUEST, 5, 6);
                h.dst_cid = 1;
                with_hdr(m, h, 44)
            },
            false,
        ),
        (
            "chain too short",
            |m| with_hdr(m, ghdr(op::REQUEST, 5, 6), 43),
            false,
        ),
        (
            "writable descriptor",
            |m| {
                let mut c = with_hdr(m, ghdr(op::RW, 5, 6), 44);
                c.push((SCRATCH + 0x1000, 16, W));
                c
            },
            false,
        ),
        (
            "only a writable descriptor",
            |m| {
                let mut c = with_hdr(m, ghdr(op::RW, 5, 6), 44);
                c[0].2 = W;
                c
            },
            false,
        ),
        (
            "outside guest memory",
            |_| vec![(MEM_SIZE as u64 - 20, 44, R)],
            false,
        ),
        ("zero-length descriptor", |_| vec![(SCRATCH, 0, R)], false),
    ];
    let mut h = fake();
    for (i, (name, build, rst)) in cases.into_iter().enumerate() {
        let chain = build(&h.mem);
        h.add_chain(TX_QUEUE, &chain);
        h.kick(TX_QUEUE);
        h.run_idle();
        let used = h.take_used(TX_QUEUE);
        assert_eq!(used.len(), 1, "{name}: chain returned");
        assert_eq!(used[0].1, 0, "{name}");
        assert_eq!(
            VsockMetrics::get(&h.metrics().invalid_packets),
            i as u64 + 1,
            "{name}: counted"
        );
        let (sent, rejected) = with_fake(&h, |b| (b.sent.len(), std::mem::take(&mut b.rejected)));
        assert_eq!(sent, 0, "{name}: not delivered");
        assert_eq!(rejected.len(), usize::from(rst), "{name}: RST decision");
        if rst {
            assert_eq!((rejected[0].src_port, rejected[0].dst_port), (5, 6));
        }
    }
    // The device still works.
    h.send(ghdr(op::REQUEST, 9, 10), &[]);
    assert_eq!(with_fake(&h, |b| b.sent.len()), 1);
}

#[test]
fn rx_packets_are_stamped_and_fit_the_buffer() {
    let mut h = fake();
    let payload: Vec<u8> = (0..10_000u32).map(|i| (i * 13 % 256) as u8).collect();
    with_fake(&h, |b| {
        b.to_guest
            .push_back((host_pkt(op::RESPONSE, 77, 1000), vec![]));
        b.to_guest
            .push_back((host_pkt(op::RW, 77, 1000), payload.clone()));
    });
    h.irq.take();
    h.post_rx(8);
    let pkts = h.take_rx();
    // 10 000 bytes in 4 KiB buffers: RESPONSE + 3 RW packets.
    assert_eq!(pkts.len(), 4);
    for (hdr, _) in &pkts {
        assert_eq!(hdr.src_cid, HOST_CID);
        assert_eq!(hdr.dst_cid, GUEST_CID);
        assert_eq!(hdr.type_, TYPE_STREAM);
        assert_eq!((hdr.src_port, hdr.dst_port), (77, 1000));
    }
    assert_eq!(pkts[0].0.op, op::RESPONSE);
    let got: Vec<u8> = pkts[1..].iter().flat_map(|(_, d)| d.clone()).collect();
    assert_eq!(got, payload);
    assert_eq!(pkts[1].1.len(), 4096);
    assert_eq!(h.irq.take(), vec![InterruptType::Queue(RX_QUEUE as u16)]);
    assert_eq!(VsockMetrics::get(&h.metrics().rx_bytes), 10_000);
}

#[test]
fn malformed_rx_buffers_are_skipped() {
    let mut h = fake();
    with_fake(&h, |b| {
        b.to_guest
            .push_back((host_pkt(op::RW, 1, 2), b"hello".to_vec()));
    });
    // A readable descriptor, a too-small buffer, then a good one.
    h.add_chain(RX_QUEUE, &[(SCRATCH, 100, R)]);
    h.add_chain(RX_QUEUE, &[(SCRATCH + 0x1000, 43, W)]);
    h.add_chain(
        RX_QUEUE,
        &[(SCRATCH + 0x2000, 10, R), (SCRATCH + 0x3000, 100, W)],
    );
    h.add_chain(RX_QUEUE, &[(SCRATCH + 0x4000, 100, W)]);
    h.kick(RX_QUEUE);
    h.run_idle();
    let used = h.take_used(RX_QUEUE);
    assert_eq!(used.len(), 4);
    assert_eq!(used[..3].iter().map(|u| u.1).collect::<Vec<_>>(), [0, 0, 0]);
    assert_eq!(used[3].1, 44 + 5);
    let mut got = [0u8; 5];
    h.mem
        .read_slice(&mut got, GuestAddress(SCRATCH + 0x4000 + 44))
        .unwrap();
    assert_eq!(&got, b"hello");
    assert_eq!(VsockMetrics::get(&h.metrics().invalid_packets), 3);
}

#[test]
fn rx_starvation_loses_nothing() {
    let mut h = fake();
    with_fake(&h, |b| {
        for i in 0..10u8 {
            b.to_guest.push_back((host_pkt(op::RW, 1, 2), vec![i; 100]));
        }
    });
    h.kick(TX_QUEUE);
    h.run_idle();
    assert!(h.take_rx().is_empty());
    h.auto_refill = false;
    h.post_rx(3);
    let first = h.take_rx();
    h.post_rx(20);
    let rest = h.take_rx();
    assert_eq!(first.len(), 3);
    assert_eq!(rest.len(), 7);
    for (i, (_, d)) in first.iter().chain(&rest).enumerate() {
        assert_eq!(d, &vec![i as u8; 100]);
    }
    // Nothing pending: the spare buffers stay available.
    assert!(h.take_used(RX_QUEUE).is_empty());
}

#[test]
fn backpressure_keeps_tx_packets_in_order() {
    let mut h = fake();
    with_fake(&h, |b| b.backpressure = true);
    h.send(ghdr(op::RW, 1, 2), b"one");
    h.send(ghdr(op::RW, 1, 2), b"two");
    assert!(h.take_used(TX_QUEUE).is_empty(), "chains stay on the queue");
    assert_eq!(VsockMetrics::get(&h.metrics().tx_backpressure), 2);
    with_fake(&h, |b| b.backpressure = false);
    // Progress on rx retries the stalled tx queue.
    h.post_rx(1);
    assert_eq!(h.take_used(TX_QUEUE).len(), 2);
    let sent = with_fake(&h, |b| std::mem::take(&mut b.sent));
    let data: Vec<&[u8]> = sent.iter().map(|p| p.data.as_slice()).collect();
    assert_eq!(data, [b"one".as_slice(), b"two".as_slice()]);
}

#[test]
fn reset_reaches_backend_and_device_reactivates() {
    let mut h = fake();
    assert!(lock(&h.dev).reset());
    assert!(!lock(&h.dev).is_active());
    h.run_idle();
    assert_eq!(with_fake(&h, |b| (b.resets, b.activations)), (1, 1));
    // Notifications of an inactive device are harmless.
    h.kick(TX_QUEUE);
    h.run_idle();
    h.activate();
    assert_eq!(with_fake(&h, |b| b.activations), 2);
    h.send(ghdr(op::REQUEST, 1, 2), &[]);
    assert_eq!(with_fake(&h, |b| b.sent.len()), 1);
    // Double activation is refused.
    let err = lock(&h.dev).activate(ActivationContext {
        mem: h.mem.clone(),
        interrupt: h.irq.clone(),
        queues: (0..NUM_QUEUES).map(make_queue).collect(),
    });
    assert!(err.is_err());
}

#[test]
fn wrong_queue_count_is_refused() {
    let mut dev = Vsock::with_backend(
        GUEST_CID,
        FakeBackend::default(),
        Arc::new(VsockMetrics::default()),
    )
    .unwrap();
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let res = dev.activate(ActivationContext {
        mem,
        interrupt: Arc::new(RecordingInterrupt::new()),
        queues: vec![make_queue(0)],
    });
    assert!(res.is_err());
}

#[test]
fn fits_the_vmm_wiring() {
    let dir = tempfile::tempdir().unwrap();
    let listener = std::os::unix::net::UnixListener::bind(dir.path().join("s")).unwrap();
    let cfg = VsockConfig {
        guest_cid: 3,
        listeners: vec![(listener, 1024)],
        host_ports: vec![(5000, dir.path().join("h"))],
    };
    let dev = Arc::new(Mutex::new(Vsock::new(cfg).unwrap()));
    // What the VMM does: the transport gets a `SharedDevice`, the event loop a subscriber.
    let _transport_side: crate::virtio::SharedDevice = dev.clone();
    let subscriber: Arc<Mutex<dyn event_manager::MutEventSubscriber + Send>> = dev;
    let mut em =
        EventManager::<Arc<Mutex<dyn event_manager::MutEventSubscriber + Send>>>::new().unwrap();
    em.add_subscriber(subscriber);
    // Nothing is watched but the activate EventFd until the guest activates the device.
    assert_eq!(em.run_with_timeout(0).unwrap(), 0);
}

#[test]
fn restored_device_posts_one_transport_reset_event() {
    let mut h = fake();
    h.irq.take();
    lock(&h.dev).restored();
    // No event buffer yet: the reset waits for one.
    h.kick(EVENT_QUEUE);
    h.run_idle();
    assert!(h.take_used(EVENT_QUEUE).is_empty());
    // A buffer the device cannot write into is returned empty; the reset waits on.
    let bad = h.add_chain(EVENT_QUEUE, &[(SCRATCH, 4, R)]);
    h.kick(EVENT_QUEUE);
    h.run_idle();
    assert_eq!(h.take_used(EVENT_QUEUE), vec![(u32::from(bad), 0)]);
    // Linux's driver posts 4-byte writable buffers (struct virtio_vsock_event).
    h.mem.write_obj(0xffff_ffff_u32, GuestAddress(SCRATCH + 0x100)).unwrap();
    let good = h.add_chain(EVENT_QUEUE, &[(SCRATCH + 0x100, 4, W)]);
    h.add_chain(EVENT_QUEUE, &[(SCRATCH + 0x200, 4, W)]);
    h.kick(EVENT_QUEUE);
    h.run_idle();
    assert_eq!(h.take_used(EVENT_QUEUE), vec![(u32::from(good), 4)], "exactly one event");
    assert_eq!(h.mem.read_obj::<u32>(GuestAddress(SCRATCH + 0x100)).unwrap(), EVENT_TRANSPORT_RESET);
    assert!(h.irq.take().contains(&InterruptType::Queue(EVENT_QUEUE as u16)));
    h.kick(EVENT_QUEUE);
    h.run_idle();
    assert!(h.take_used(EVENT_QUEUE).is_empty(), "posted once");
}
