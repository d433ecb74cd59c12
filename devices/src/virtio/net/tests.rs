//! Tests of the virtio-net device: identity and config space, tx frames reaching a fake backend
//! byte-exact (however the chain is split, indirect tables too), a table of malformed tx chains,
//! rx delivery (`DATA_VALID`, `num_buffers`, merged buffers, no `MRG_RXBUF`), rx backpressure
//! and resume, checksum fallbacks, reset, and an end-to-end ARP exchange with a real
//! `netstack::NetStack` inside the device. The test plays the virtio driver through real split
//! queues over `GuestMemoryMmap`, the device behind an `EventManager`.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, SubscriberOps};
use virtio_bindings::virtio_net::*;
use virtio_bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_USED_F_NO_NOTIFY,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::frame::{fill_l4_checksum, fold, sum_words};
use super::*;
use crate::virtio::test_utils::{
    avail_addr, desc_addr, guest_mem, publish, queue_base, run_idle, split_queue, take_used,
    used_addr, write_desc,
};
use crate::virtio::{
    feature, lock, ActivationContext, InterruptType, RecordingInterrupt, VirtioDevice,
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};

const MEM_SIZE: usize = 0x200_0000;
const QSIZE: u16 = 256;
const RX_SLOTS: u64 = 128;
const RX_STRIDE: u64 = 0x1_1000;
const RX_BASE: u64 = 0x10_0000;
const TX_SLOTS: u64 = 32;
const TX_STRIDE: u64 = 0x1_1000;
const TX_BASE: u64 = 0xa0_0000;
/// Free area for indirect tables.
const SCRATCH: u64 = 0x1f0_0000;
const R: u16 = 0;
const W: u16 = VRING_DESC_F_WRITE as u16;

/// A descriptor as (addr, len, flags).
type Desc = (u64, u32, u16);

/// What the fake backend saw and will send; shared with the test.
#[derive(Debug, Default)]
struct FakeState {
    sent: Vec<Vec<u8>>,
    to_guest: VecDeque<Vec<u8>>,
    polls: usize,
    verifies: bool,
    computes: bool,
}

/// A backend whose fd is an EventFd the test signals when it queues frames for the guest.
#[derive(Debug)]
struct FakeBackend {
    state: Arc<Mutex<FakeState>>,
    evt: Arc<EventFd>,
    mtu: Option<usize>,
}

impl NetBackend for FakeBackend {
    fn send_frame(&mut self, frame: &[u8]) {
        lock(&self.state).sent.push(frame.to_vec());
    }
    fn peek_frame_len(&self) -> Option<usize> {
        lock(&self.state).to_guest.front().map(Vec::len)
    }
    fn recv_frame(&mut self) -> Option<Vec<u8>> {
        lock(&self.state).to_guest.pop_front()
    }
    fn fd(&self) -> Option<RawFd> {
        Some(self.evt.as_raw_fd())
    }
    fn poll(&mut self) {
        let _ = self.evt.read();
        lock(&self.state).polls += 1;
    }
    fn verifies_checksums(&self) -> bool {
        lock(&self.state).verifies
    }
    fn computes_checksums(&self) -> bool {
        lock(&self.state).computes
    }
    fn mtu(&self) -> Option<usize> {
        self.mtu
    }
}

fn fake_backend() -> (FakeBackend, Arc<Mutex<FakeState>>, Arc<EventFd>) {
    let state = Arc::new(Mutex::new(FakeState {
        computes: true,
        ..FakeState::default()
    }));
    let evt = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
    let backend = FakeBackend {
        state: state.clone(),
        evt: evt.clone(),
        mtu: None,
    };
    (backend, state, evt)
}

/// One frame as the guest driver received it.
#[derive(Debug)]
struct Received {
    hdr: NetHeader,
    frame: Vec<u8>,
}

/// The guest driver: two queues in guest memory, the device behind an event manager.
struct Harness {
    dev: Arc<Mutex<Net>>,
    em: EventManager<Arc<Mutex<Net>>>,
    mem: GuestMemoryMmap,
    irq: Arc<RecordingInterrupt>,
    state: Option<Arc<Mutex<FakeState>>>,
    evt: Option<Arc<EventFd>>,
    avail_idx: [u16; NUM_QUEUES],
    used_seen: [u16; NUM_QUEUES],
    next_desc: [u16; NUM_QUEUES],
    rx_regions: HashMap<u16, Vec<(u64, u32)>>,
    rx_slot: u64,
    tx_count: u64,
    /// Used rx entries too short to hold a header (malformed buffers).
    short_rx: usize,
    event_idx: bool,
}

/// Features a Linux guest acks (everything offered).
fn all_features() -> u64 {
    u64::MAX
}

impl Harness {
    fn new(net: Net, features: u64) -> Self {
        let mem = guest_mem(MEM_SIZE);
        let dev = Arc::new(Mutex::new(net));
        let mut em = EventManager::<Arc<Mutex<Net>>>::new().unwrap();
        em.add_subscriber(dev.clone());
        let mut h = Harness {
            dev,
            em,
            mem,
            irq: Arc::new(RecordingInterrupt::new()),
            state: None,
            evt: None,
            avail_idx: [0; NUM_QUEUES],
            used_seen: [0; NUM_QUEUES],
            next_desc: [0; NUM_QUEUES],
            rx_regions: HashMap::new(),
            rx_slot: 0,
            tx_count: 0,
            short_rx: 0,
            event_idx: false,
        };
        h.activate(features);
        h
    }

    fn fake(features: u64) -> Self {
        Self::fake_with(features, |_| {})
    }

    fn fake_with(features: u64, f: impl FnOnce(&mut FakeState)) -> Self {
        let (backend, state, evt) = fake_backend();
        f(&mut lock(&state));
        let net = Net::new(NetConfig::with_backend(Box::new(backend))).unwrap();
        let mut h = Self::new(net, features);
        h.state = Some(state);
        h.evt = Some(evt);
        h
    }

    fn activate(&mut self, features: u64) {
        self.avail_idx = [0; NUM_QUEUES];
        self.used_seen = [0; NUM_QUEUES];
        self.next_desc = [0; NUM_QUEUES];
        self.rx_regions.clear();
        for q in 0..NUM_QUEUES {
            self.mem
                .write_slice(&[0u8; 0x3000], GuestAddress(queue_base(q)))
                .unwrap();
        }
        {
            let mut dev = lock(&self.dev);
            let features = dev.avail_features() & features;
            dev.ack_features(features);
            let event_idx = features & feature(VIRTIO_RING_F_EVENT_IDX) != 0;
            self.event_idx = event_idx;
            let queues = (0..NUM_QUEUES)
                .map(|q| split_queue(QSIZE, desc_addr(q), avail_addr(q), used_addr(q), event_idx))
                .collect();
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
    fn run_idle(&mut self) {
        run_idle(&mut self.em);
    }

    fn kick(&mut self, q: usize) {
        lock(&self.dev).queue_events()[q].write(1).unwrap();
        self.run_idle();
    }

    fn write_desc(&self, table: u64, idx: u16, desc: Desc, next: u16) {
        write_desc(&self.mem, table, idx, desc, next);
    }

    /// Put a chain of (addr, len, flags) on queue `q` without notifying; returns its head.
    fn add_chain(&mut self, q: usize, descs: &[Desc]) -> u16 {
        let head = self.next_desc[q];
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let idx = (head + i as u16) % QSIZE;
            let last = i + 1 == descs.len();
            let next = (idx + 1) % QSIZE;
            let flags = if last {
                flags
            } else {
                flags | VRING_DESC_F_NEXT as u16
            };
            self.write_desc(
                desc_addr(q),
                idx,
                (addr, len, flags),
                if last { 0 } else { next },
            );
        }
        self.next_desc[q] = (head + descs.len() as u16) % QSIZE;
        self.publish(q, head);
        head
    }

    /// Put a one-descriptor chain pointing at an indirect table holding `descs`.
    fn add_indirect(&mut self, q: usize, descs: &[Desc]) -> u16 {
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let last = i + 1 == descs.len();
            let flags = if last {
                flags
            } else {
                flags | VRING_DESC_F_NEXT as u16
            };
            let next = if last { 0 } else { i as u16 + 1 };
            self.write_desc(SCRATCH, i as u16, (addr, len, flags), next);
        }
        let head = self.next_desc[q];
        let ind = (
            SCRATCH,
            16 * descs.len() as u32,
            VRING_DESC_F_INDIRECT as u16,
        );
        self.write_desc(desc_addr(q), head, ind, 0);
        self.next_desc[q] = (head + 1) % QSIZE;
        self.publish(q, head);
        head
    }

    fn publish(&mut self, q: usize, head: u16) {
        publish(
            &self.mem,
            avail_addr(q),
            QSIZE,
            &mut self.avail_idx[q],
            head,
        );
    }

    /// New used entries of queue `q` as (id, len).
    fn take_used(&mut self, q: usize) -> Vec<(u32, u32)> {
        take_used(&self.mem, used_addr(q), QSIZE, &mut self.used_seen[q])
    }

    /// Post `n` single-descriptor rx buffers of `len` bytes (no kick).
    fn add_rx(&mut self, n: usize, len: u32) {
        for _ in 0..n {
            let addr = RX_BASE + (self.rx_slot % RX_SLOTS) * RX_STRIDE;
            self.rx_slot += 1;
            let head = self.add_chain(RX_QUEUE, &[(addr, len, W)]);
            self.rx_regions.insert(head, vec![(addr, len)]);
        }
    }

    /// Post `n` rx buffers of `len` bytes and notify if the device asked for it (§2.7.10:
    /// `avail_event` with EVENT_IDX, else the used ring's NO_NOTIFY flag).
    fn post_rx(&mut self, n: usize, len: u32) {
        let old = self.avail_idx[RX_QUEUE];
        self.add_rx(n, len);
        let new = self.avail_idx[RX_QUEUE];
        let needed = if self.event_idx {
            let at = used_addr(RX_QUEUE) + 4 + 8 * u64::from(QSIZE);
            let event: u16 = self.mem.read_obj(GuestAddress(at)).unwrap();
            new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
        } else {
            let flags: u16 = self
                .mem
                .read_obj(GuestAddress(used_addr(RX_QUEUE)))
                .unwrap();
            flags & VRING_USED_F_NO_NOTIFY as u16 == 0
        };
        if needed {
            self.kick(RX_QUEUE);
        } else {
            self.run_idle();
        }
    }

    fn read_rx(&self, head: u32, len: u32) -> Vec<u8> {
        let mut out = Vec::new();
        let mut left = len as usize;
        for &(addr, rlen) in &self.rx_regions[&(head as u16)] {
            let n = left.min(rlen as usize);
            let mut b = vec![0u8; n];
            self.mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
            out.extend_from_slice(&b);
            left -= n;
        }
        assert_eq!(left, 0, "used length beyond the buffer");
        out
    }

    /// Frames the device delivered since the last call, reassembled like Linux does.
    fn take_rx(&mut self) -> Vec<Received> {
        let mut used = self.take_used(RX_QUEUE).into_iter();
        let mut out = Vec::new();
        while let Some((id, len)) = used.next() {
            if (len as usize) < HDR_LEN {
                self.short_rx += 1;
                continue;
            }
            let bytes = self.read_rx(id, len);
            let hdr = NetHeader::from_bytes(bytes[..HDR_LEN].try_into().unwrap());
            let mut frame = bytes[HDR_LEN..].to_vec();
            for _ in 1..hdr.num_buffers {
                let (id, len) = used.next().expect("num_buffers beyond the used ring");
                frame.extend_from_slice(&self.read_rx(id, len));
            }
            out.push(Received { hdr, frame });
        }
        out
    }

    /// Send `frame` behind `hdr`, the bytes split into descriptors of the given sizes (the
    /// rest in a last descriptor). Notifies and runs the loop.
    fn send_split(&mut self, hdr: &NetHeader, frame: &[u8], splits: &[usize]) {
        let addr = TX_BASE + (self.tx_count % TX_SLOTS) * TX_STRIDE;
        self.tx_count += 1;
        let mut bytes = hdr.to_bytes().to_vec();
        bytes.extend_from_slice(frame);
        self.mem.write_slice(&bytes, GuestAddress(addr)).unwrap();
        let mut descs = Vec::new();
        let mut at = 0usize;
        for &s in splits {
            descs.push((addr + at as u64, s as u32, R));
            at += s;
        }
        descs.push((addr + at as u64, (bytes.len() - at) as u32, R));
        self.add_chain(TX_QUEUE, &descs);
        self.kick(TX_QUEUE);
    }

    fn send(&mut self, frame: &[u8]) {
        self.send_split(&NetHeader::default(), frame, &[]);
    }

    /// Queue frames in the fake backend and signal its fd.
    fn backend_push(&mut self, frames: impl IntoIterator<Item = Vec<u8>>) {
        lock(self.state.as_ref().unwrap()).to_guest.extend(frames);
        self.evt.as_ref().unwrap().write(1).unwrap();
        self.run_idle();
    }

    fn sent(&self) -> Vec<Vec<u8>> {
        std::mem::take(&mut lock(self.state.as_ref().unwrap()).sent)
    }

    fn pending(&self) -> usize {
        lock(self.state.as_ref().unwrap()).to_guest.len()
    }

    fn metric(&self, f: impl Fn(&NetMetrics) -> &std::sync::atomic::AtomicU64) -> u64 {
        NetMetrics::get(f(lock(&self.dev).metrics()))
    }
}

/// A frame of `len` bytes with a recognisable pattern.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(7) ^ seed).collect()
}

/// An IPv4/UDP frame guest → gateway with `payload`, checksum field left as given.
fn udp_frame(payload: &[u8], csum: u16) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&[0x02, 0x64, 0x69, 0x6e, 0x76, 0x01]);
    f.extend_from_slice(&DEFAULT_MAC);
    f.extend_from_slice(&[0x08, 0x00]);
    let total = (20 + 8 + payload.len()) as u16;
    let mut ip = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 17, 0, 0];
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&[10, 234, 0, 15, 10, 234, 0, 1]);
    let ipsum = !fold(sum_words(&ip, 0));
    ip[10..12].copy_from_slice(&ipsum.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&4000u16.to_be_bytes());
    f.extend_from_slice(&53u16.to_be_bytes());
    f.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    f.extend_from_slice(&csum.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// Whether the UDP checksum of an IPv4 frame built by [`udp_frame`] verifies.
fn udp_checksum_ok(f: &[u8]) -> bool {
    let ip = &f[ETH_HLEN..];
    let l4 = &ip[20..];
    let mut pseudo = [0u8; 12];
    pseudo[..8].copy_from_slice(&ip[12..20]);
    pseudo[9] = 17;
    pseudo[10..12].copy_from_slice(&(l4.len() as u16).to_be_bytes());
    l4[6..8] != [0, 0] && fold(sum_words(l4, sum_words(&pseudo, 0))) == 0xffff
}

#[test]
fn identity_features_and_config_space() {
    let (backend, _, _) = fake_backend();
    let mut cfg = NetConfig::with_backend(Box::new(backend));
    cfg.mac = [0x02, 1, 2, 3, 4, 5];
    cfg.mtu = 9000;
    let mut dev = Net::new(cfg).unwrap();
    assert_eq!(dev.device_type(), 1);
    assert_eq!(dev.queue_max_sizes(), &[QUEUE_SIZE; 2]);
    let f = dev.avail_features();
    for bit in [
        VIRTIO_F_VERSION_1,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_RING_F_INDIRECT_DESC,
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_MTU,
        VIRTIO_NET_F_STATUS,
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_MRG_RXBUF,
    ] {
        assert_ne!(f & feature(bit), 0, "feature {bit} offered");
    }
    for bit in [
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_HOST_UFO,
        VIRTIO_NET_F_CTRL_VQ,
        VIRTIO_NET_F_MQ,
    ] {
        assert_eq!(f & feature(bit), 0, "feature {bit} not offered");
    }
    dev.ack_features(u64::MAX);
    assert_eq!(dev.acked_features(), f);

    let mut config = [0xffu8; 12];
    dev.read_config(0, &mut config);
    assert_eq!(&config[0..6], &[0x02, 1, 2, 3, 4, 5]);
    assert_eq!(u16::from_le_bytes([config[6], config[7]]), 1, "link up");
    assert_eq!(u16::from_le_bytes([config[8], config[9]]), 1);
    assert_eq!(u16::from_le_bytes([config[10], config[11]]), 9000);
    let mut mtu = [0u8; 2];
    dev.read_config(10, &mut mtu);
    assert_eq!(u16::from_le_bytes(mtu), 9000);
    let mut past = [0xffu8; 4];
    dev.read_config(11, &mut past);
    assert_eq!(past, [(9000u16 >> 8) as u8, 0, 0, 0]);
    dev.read_config(u64::MAX, &mut past);
    assert_eq!(past, [0; 4]);
    dev.write_config(0, &[9; 6]);
    dev.read_config(0, &mut config);
    assert_eq!(&config[0..6], &[0x02, 1, 2, 3, 4, 5], "MAC is read-only");

    let defaults = Net::new(NetConfig::with_backend(Box::new(fake_backend().0))).unwrap();
    assert_eq!(defaults.mac(), DEFAULT_MAC);
    assert_eq!(defaults.mtu(), 65520);
}

#[test]
fn invalid_configuration_is_rejected() {
    let with = |mac: [u8; 6], mtu: u16, backend_mtu: Option<usize>| {
        let (mut backend, _, _) = fake_backend();
        backend.mtu = backend_mtu;
        Net::new(NetConfig {
            mac,
            mtu,
            backend: Box::new(backend),
        })
    };
    assert!(matches!(
        with([0; 6], 1500, None),
        Err(NetError::InvalidMac(_))
    ));
    assert!(matches!(
        with([0x01, 0, 0, 0, 0, 1], 1500, None),
        Err(NetError::InvalidMac(_))
    ));
    assert!(matches!(
        with(DEFAULT_MAC, 67, None),
        Err(NetError::InvalidMtu(67))
    ));
    assert!(matches!(
        with(DEFAULT_MAC, 65535, None),
        Err(NetError::InvalidMtu(65535))
    ));
    assert!(matches!(
        with(DEFAULT_MAC, 65520, Some(1500)),
        Err(NetError::MtuMismatch {
            device: 65520,
            backend: 1500
        })
    ));
    assert!(with(DEFAULT_MAC, 1500, Some(1500)).is_ok());
}

#[test]
fn header_round_trip() {
    let hdr = NetHeader {
        flags: 1,
        gso_type: 3,
        hdr_len: 0x0102,
        gso_size: 0x0304,
        csum_start: 0x0506,
        csum_offset: 0x0708,
        num_buffers: 0x090a,
    };
    let b = hdr.to_bytes();
    assert_eq!(b, [1, 3, 2, 1, 4, 3, 6, 5, 8, 7, 0x0a, 9]);
    assert_eq!(NetHeader::from_bytes(&b), hdr);
}

#[test]
fn tx_frame_reaches_backend_byte_exact() {
    let mut h = Harness::fake(all_features());
    let frame = pattern(1514, 0x5a);
    h.send(&frame);
    assert_eq!(h.sent(), vec![frame.clone()]);
    assert_eq!(h.take_used(TX_QUEUE).len(), 1);
    assert_eq!(h.irq.take(), vec![InterruptType::Queue(TX_QUEUE as u16)]);

    // Header split 5 + 7, frame over three more descriptors.
    h.send_split(&NetHeader::default(), &frame, &[5, 7, 1, 600]);
    // Header and frame sharing a descriptor.
    h.send_split(&NetHeader::default(), &frame, &[20]);
    // An indirect table.
    let addr = TX_BASE + 0x8000;
    let mut bytes = NetHeader::default().to_bytes().to_vec();
    bytes.extend_from_slice(&frame);
    h.mem.write_slice(&bytes, GuestAddress(addr)).unwrap();
    h.add_indirect(
        TX_QUEUE,
        &[
            (addr, 3, R),
            (addr + 3, 100, R),
            (addr + 103, bytes.len() as u32 - 103, R),
        ],
    );
    h.kick(TX_QUEUE);
    assert_eq!(h.sent(), vec![frame.clone(), frame.clone(), frame]);
    assert_eq!(h.take_used(TX_QUEUE).len(), 3);
    assert_eq!(h.metric(|m| &m.tx_frames), 4);
    assert_eq!(h.metric(|m| &m.tx_bytes), 4 * 1514);
    assert_eq!(h.metric(|m| &m.tx_malformed), 0);
    assert!(
        lock(h.state.as_ref().unwrap()).polls >= 4,
        "polled after each batch"
    );
}

#[test]
fn tx_batch_raises_one_interrupt() {
    let mut h = Harness::fake(all_features());
    for i in 0..10u8 {
        let addr = TX_BASE + u64::from(i) * 0x1000;
        let mut bytes = NetHeader::default().to_bytes().to_vec();
        bytes.extend_from_slice(&pattern(60, i));
        h.mem.write_slice(&bytes, GuestAddress(addr)).unwrap();
        h.add_chain(TX_QUEUE, &[(addr, bytes.len() as u32, R)]);
    }
    h.kick(TX_QUEUE);
    let sent = h.sent();
    assert_eq!(sent.len(), 10);
    assert_eq!(sent[3], pattern(60, 3));
    assert_eq!(h.irq.take(), vec![InterruptType::Queue(TX_QUEUE as u16)]);
}

#[test]
fn tx_needs_csum_passes_through_or_is_completed() {
    let partial = udp_frame(b"hello, checksum", 0x1234);
    let needs = NetHeader {
        flags: VIRTIO_NET_HDR_F_NEEDS_CSUM as u8,
        csum_start: (ETH_HLEN + 20) as u16,
        csum_offset: 6,
        ..NetHeader::default()
    };
    // The netstack's mode: accepted as is.
    let mut h = Harness::fake(all_features());
    h.send_split(&needs, &partial, &[]);
    assert_eq!(h.sent(), vec![partial.clone()]);
    assert_eq!(h.metric(|m| &m.tx_csum_completed), 0);

    // A verifying backend gets the checksum filled in: start from the pseudo-header sum.
    let mut h = Harness::fake_with(all_features(), |s| s.verifies = true);
    let mut pseudo = [0u8; 12];
    pseudo[..8].copy_from_slice(&[10, 234, 0, 15, 10, 234, 0, 1]);
    pseudo[9] = 17;
    pseudo[10..12].copy_from_slice(&(8u16 + 15).to_be_bytes());
    let frame = udp_frame(b"hello, checksum", fold(sum_words(&pseudo, 0)));
    assert!(!udp_checksum_ok(&frame));
    h.send_split(&needs, &frame, &[]);
    let sent = h.sent();
    assert!(udp_checksum_ok(&sent[0]), "checksum completed");
    let mut expect = frame.clone();
    assert!(fill_l4_checksum(&mut expect));
    assert_eq!(sent[0], expect);
    assert_eq!(h.metric(|m| &m.tx_csum_completed), 1);
}

#[test]
fn malformed_tx_chains_are_counted_and_completed() {
    let mut h = Harness::fake(all_features());
    let base = TX_BASE;
    let good = {
        let mut b = NetHeader::default().to_bytes().to_vec();
        b.extend_from_slice(&pattern(100, 1));
        b
    };
    h.mem.write_slice(&good, GuestAddress(base)).unwrap();
    let gso = NetHeader {
        gso_type: VIRTIO_NET_HDR_GSO_TCPV4 as u8,
        gso_size: 1448,
        ..NetHeader::default()
    };
    let bad_csum = NetHeader {
        flags: VIRTIO_NET_HDR_F_NEEDS_CSUM as u8,
        csum_start: 90,
        csum_offset: 9,
        ..NetHeader::default()
    };
    let hdr_at = |h: &Harness, hdr: NetHeader, at: u64| {
        h.mem
            .write_slice(&hdr.to_bytes(), GuestAddress(at))
            .unwrap();
        h.mem
            .write_slice(&pattern(100, 2), GuestAddress(at + HDR_LEN as u64))
            .unwrap();
    };
    hdr_at(&h, gso, base + 0x1000);
    hdr_at(&h, bad_csum, base + 0x2000);
    let len = good.len() as u32;
    let cases: Vec<(&str, Vec<Desc>)> = vec![
        ("header only", vec![(base, HDR_LEN as u32, R)]),
        ("short header", vec![(base, 5, R)]),
        (
            "frame shorter than ethernet",
            vec![(base, HDR_LEN as u32 + 13, R)],
        ),
        ("empty descriptor", vec![(base, 0, R)]),
        ("writable descriptor", vec![(base, len, W)]),
        (
            "writable second descriptor",
            vec![(base, 12, R), (base + 12, 100, W)],
        ),
        (
            "oversized",
            vec![(base, HDR_LEN as u32, R), (base + 0x10_0000, 65520 + 19, R)],
        ),
        ("outside guest memory", vec![(MEM_SIZE as u64 - 50, 100, R)]),
        ("beyond the address space", vec![(u64::MAX - 10, 100, R)]),
        ("gso without negotiation", vec![(base + 0x1000, len, R)]),
        (
            "checksum offsets outside the frame",
            vec![(base + 0x2000, len, R)],
        ),
    ];
    for (i, (name, descs)) in cases.iter().enumerate() {
        h.add_chain(TX_QUEUE, descs);
        h.kick(TX_QUEUE);
        assert!(h.sent().is_empty(), "{name}: nothing reaches the backend");
        assert_eq!(h.take_used(TX_QUEUE).len(), 1, "{name}: completed");
        assert_eq!(
            h.metric(|m| &m.tx_malformed),
            i as u64 + 1,
            "{name}: counted"
        );
    }
    // A table of 1025 descriptors through an indirect table is refused too.
    let many: Vec<_> = (0..1025).map(|_| (base, 1, R)).collect();
    for (i, d) in many.iter().enumerate() {
        let next = if i + 1 == many.len() { 0 } else { i as u16 + 1 };
        let flags = if i + 1 == many.len() {
            d.2
        } else {
            d.2 | VRING_DESC_F_NEXT as u16
        };
        h.write_desc(SCRATCH, i as u16, (d.0, d.1, flags), next);
    }
    let head = h.next_desc[TX_QUEUE];
    h.write_desc(
        desc_addr(TX_QUEUE),
        head,
        (SCRATCH, 16 * 1025, VRING_DESC_F_INDIRECT as u16),
        0,
    );
    h.next_desc[TX_QUEUE] += 1;
    h.publish(TX_QUEUE, head);
    h.kick(TX_QUEUE);
    assert!(h.sent().is_empty());
    assert_eq!(h.take_used(TX_QUEUE).len(), 1);

    // The device still works.
    h.add_chain(TX_QUEUE, &[(base, len, R)]);
    h.kick(TX_QUEUE);
    assert_eq!(h.sent(), vec![pattern(100, 1)]);
    assert_eq!(h.metric(|m| &m.tx_frames), 1);
    assert_eq!(h.metric(|m| &m.queue_errors), 0);
}

#[test]
fn rx_frames_delivered_with_data_valid() {
    let mut h = Harness::fake(all_features());
    h.post_rx(8, 1526);
    h.irq.take();
    let frames: Vec<_> = (0..3).map(|i| pattern(60 + i * 500, i as u8)).collect();
    h.backend_push(frames.clone());
    let rx = h.take_rx();
    assert_eq!(rx.len(), 3);
    for (r, f) in rx.iter().zip(&frames) {
        assert_eq!(&r.frame, f);
        assert_eq!(r.hdr, NetHeader::rx(1, true));
        assert_eq!(r.hdr.flags, VIRTIO_NET_HDR_F_DATA_VALID as u8);
        assert_eq!(r.hdr.gso_type, VIRTIO_NET_HDR_GSO_NONE as u8);
    }
    assert_eq!(
        h.irq.take(),
        vec![InterruptType::Queue(RX_QUEUE as u16)],
        "one per batch"
    );
    assert_eq!(h.metric(|m| &m.rx_frames), 3);
    assert_eq!(h.pending(), 0);
}

#[test]
fn rx_large_frame_spans_merged_buffers() {
    let mut h = Harness::fake(all_features());
    h.post_rx(40, 4096);
    let big = pattern(65534, 9);
    h.backend_push([big.clone(), pattern(100, 3)]);
    let used = h.take_used(RX_QUEUE);
    // 12 + 65534 bytes in 4096-byte buffers: 16 full ones and 10 bytes in a 17th.
    assert_eq!(used.len(), 18);
    assert!(used[..16].iter().all(|&(_, len)| len == 4096));
    assert_eq!(used[16].1, 10);
    assert_eq!(used[17].1, 112);
    h.used_seen[RX_QUEUE] = h.used_seen[RX_QUEUE].wrapping_sub(18);
    let rx = h.take_rx();
    assert_eq!(rx.len(), 2);
    assert_eq!(rx[0].hdr.num_buffers, 17);
    assert_eq!(rx[0].frame, big);
    assert_eq!(rx[1].hdr.num_buffers, 1);
    assert_eq!(rx[1].frame, pattern(100, 3));
    assert_eq!(h.metric(|m| &m.rx_bytes), 65634);

    // Buffers made of several descriptors work too.
    let a = RX_BASE + 100 * RX_STRIDE;
    let head = h.add_chain(
        RX_QUEUE,
        &[(a, 7, W), (a + 0x100, 30, W), (a + 0x1000, 4000, W)],
    );
    h.rx_regions
        .insert(head, vec![(a, 7), (a + 0x100, 30), (a + 0x1000, 4000)]);
    h.kick(RX_QUEUE);
    // The posted 4096-byte buffers come first: use them up.
    h.backend_push((0..22).map(|i| pattern(3000, i)));
    let rx = h.take_rx();
    assert_eq!(rx.len(), 22);
    h.backend_push([pattern(2000, 77)]);
    let rx = h.take_rx();
    assert_eq!(rx.len(), 1);
    assert_eq!(rx[0].frame, pattern(2000, 77));
}

#[test]
fn rx_without_mergeable_buffers() {
    let features = all_features() & !feature(VIRTIO_NET_F_MRG_RXBUF);
    let mut h = Harness::fake(features);
    h.post_rx(2, 1526);
    h.backend_push([pattern(1514, 1), pattern(1600, 2), pattern(1000, 3)]);
    let rx = h.take_rx();
    // The 1600-byte frame cannot fit a 1526-byte buffer: dropped, its buffer returned empty.
    assert_eq!(rx.len(), 1);
    assert_eq!(rx[0].frame, pattern(1514, 1));
    assert_eq!(rx[0].hdr.num_buffers, 1);
    assert_eq!(h.short_rx, 1);
    assert_eq!(h.metric(|m| &m.rx_dropped), 1);
    assert_eq!(h.pending(), 1, "the third frame waits for a buffer");
    h.post_rx(1, 65550);
    let rx = h.take_rx();
    assert_eq!(rx.len(), 1);
    assert_eq!(rx[0].frame, pattern(1000, 3));
}

#[test]
fn rx_backpressure_then_resume() {
    let mut h = Harness::fake(all_features());
    h.backend_push((0..5).map(|i| pattern(1000, i)));
    assert!(h.take_rx().is_empty());
    assert_eq!(h.pending(), 5, "the backend is not drained without buffers");
    assert!(h.metric(|m| &m.rx_starved) >= 1);
    assert_eq!(h.irq.count(), 0);

    // Room for two frames only.
    h.post_rx(2, 1100);
    let rx = h.take_rx();
    assert_eq!(rx.len(), 2);
    assert_eq!(rx[1].frame, pattern(1000, 1));
    assert_eq!(h.pending(), 3);

    // A large frame with too few buffers: nothing is consumed until enough are posted.
    lock(h.state.as_ref().unwrap()).to_guest.clear();
    h.backend_push([pattern(20000, 42)]);
    h.post_rx(3, 4096);
    assert!(
        h.take_used(RX_QUEUE).is_empty(),
        "partial buffers are given back"
    );
    assert_eq!(h.pending(), 1);
    h.post_rx(2, 4096);
    let rx = h.take_rx();
    assert_eq!(rx.len(), 1);
    assert_eq!(rx[0].hdr.num_buffers, 5);
    assert_eq!(rx[0].frame, pattern(20000, 42));
    assert_eq!(h.metric(|m| &m.rx_dropped), 0);
}

#[test]
fn rx_backpressure_with_event_idx_off() {
    let mut h = Harness::fake(all_features() & !feature(VIRTIO_RING_F_EVENT_IDX));
    h.backend_push([pattern(3000, 1)]);
    h.post_rx(1, 2048);
    assert!(h.take_used(RX_QUEUE).is_empty());
    h.post_rx(1, 2048);
    let rx = h.take_rx();
    assert_eq!(rx.len(), 1);
    assert_eq!(rx[0].frame, pattern(3000, 1));
}

#[test]
fn malformed_rx_buffers_are_returned_after_the_frame() {
    let mut h = Harness::fake(all_features());
    h.add_rx(1, 2048);
    // Device-readable, too small, and outside guest memory.
    let a = RX_BASE + 120 * RX_STRIDE;
    for descs in [
        vec![(a, 2048, R)],
        vec![(a, 11, W)],
        vec![(MEM_SIZE as u64 - 100, 2048, W)],
    ] {
        let head = h.add_chain(RX_QUEUE, &descs);
        h.rx_regions.insert(head, vec![(a, 0)]);
    }
    h.add_rx(1, 2048);
    h.kick(RX_QUEUE);
    h.backend_push([pattern(3000, 5)]);
    let rx = h.take_rx();
    assert_eq!(rx.len(), 1);
    assert_eq!(rx[0].hdr.num_buffers, 2);
    assert_eq!(rx[0].frame, pattern(3000, 5));
    assert_eq!(h.short_rx, 3);
    assert_eq!(h.metric(|m| &m.rx_malformed), 3);
}

#[test]
fn rx_frames_over_the_mtu_are_dropped() {
    let (mut backend, state, evt) = fake_backend();
    backend.mtu = Some(1500);
    let mut cfg = NetConfig::with_backend(Box::new(backend));
    cfg.mtu = 1500;
    let mut h = Harness::new(Net::new(cfg).unwrap(), all_features());
    h.state = Some(state);
    h.evt = Some(evt);
    h.post_rx(4, 4096);
    h.backend_push([pattern(1519, 1), pattern(1518, 2)]);
    let rx = h.take_rx();
    assert_eq!(rx.len(), 1);
    assert_eq!(rx[0].frame, pattern(1518, 2));
    assert_eq!(h.metric(|m| &m.rx_dropped), 1);
}

#[test]
fn rx_checksum_filled_without_guest_csum() {
    let frame = udp_frame(b"no checksum from the backend", 0);
    // GUEST_CSUM negotiated: delivered as is, marked DATA_VALID.
    let mut h = Harness::fake_with(all_features(), |s| s.computes = false);
    h.post_rx(1, 2048);
    h.backend_push([frame.clone()]);
    let rx = h.take_rx();
    assert_eq!(rx[0].frame, frame);
    assert_ne!(rx[0].hdr.flags & VIRTIO_NET_HDR_F_DATA_VALID as u8, 0);

    // Not negotiated: the device fills the checksum, no DATA_VALID.
    let features = all_features() & !feature(VIRTIO_NET_F_GUEST_CSUM);
    let mut h = Harness::fake_with(features, |s| s.computes = false);
    h.post_rx(1, 2048);
    h.backend_push([frame.clone()]);
    let rx = h.take_rx();
    assert_eq!(rx[0].hdr.flags, 0);
    assert!(udp_checksum_ok(&rx[0].frame));
    assert_eq!(rx[0].frame[..40], frame[..40]);
}

#[test]
fn reset_stops_the_device_and_reactivation_works() {
    let mut h = Harness::fake(all_features());
    h.post_rx(2, 2048);
    assert!(lock(&h.dev).reset());
    h.run_idle();
    assert!(!lock(&h.dev).is_active());
    // Frames wait while the device is reset; the backend fd is no longer watched.
    h.backend_push([pattern(100, 1)]);
    assert_eq!(h.pending(), 1);
    assert_eq!(
        h.evt.as_ref().unwrap().read().unwrap(),
        1,
        "fd not polled while reset"
    );
    h.activate(all_features());
    h.post_rx(2, 2048);
    let rx = h.take_rx();
    assert_eq!(rx.len(), 1);
    assert_eq!(rx[0].frame, pattern(100, 1));
    h.send(&pattern(80, 2));
    assert_eq!(h.sent(), vec![pattern(80, 2)]);
    assert_eq!(h.metric(|m| &m.activations), 2);
}

#[test]
fn arp_with_a_real_netstack() {
    let dir = tempfile::tempdir().unwrap();
    let resolv = dir.path().join("resolv.conf");
    std::fs::write(&resolv, "nameserver 127.0.0.1\n").unwrap();
    let config = netstack::Config {
        mtu: usize::from(DEFAULT_MTU),
        checksums: netstack::Checksums {
            verify_rx: false,
            compute_tx: false,
        },
        resolv_conf: resolv,
        ..netstack::Config::default()
    };
    let gateway_mac = config.gateway_mac;
    let stack = netstack::NetStack::new(config).unwrap();
    let net = Net::new(NetConfig::with_backend(Box::new(stack))).unwrap();
    let mut h = Harness::new(net, all_features());
    h.post_rx(16, 4096);

    // who-has 10.234.0.1 tell 10.234.0.15
    let mut arp = vec![0xff; 6];
    arp.extend_from_slice(&DEFAULT_MAC);
    arp.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0x00, 6, 4, 0, 1]);
    arp.extend_from_slice(&DEFAULT_MAC);
    arp.extend_from_slice(&[10, 234, 0, 15]);
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&[10, 234, 0, 1]);
    h.send(&arp);

    let mut rx = h.take_rx();
    for _ in 0..50 {
        if !rx.is_empty() {
            break;
        }
        // Let the stack's own timer fire if it deferred the reply.
        h.em.run_with_timeout(20).unwrap();
        h.run_idle();
        rx = h.take_rx();
    }
    let reply = rx
        .iter()
        .find(|r| r.frame.get(12..14) == Some(&[0x08, 0x06][..]))
        .expect("an ARP reply");
    let f = &reply.frame;
    assert_eq!(&f[0..6], &DEFAULT_MAC, "to the guest");
    assert_eq!(&f[6..12], &gateway_mac, "from the gateway");
    assert_eq!(&f[20..22], &[0, 2], "ARP reply");
    assert_eq!(&f[22..28], &gateway_mac, "sender MAC");
    assert_eq!(&f[28..32], &[10, 234, 0, 1], "sender IP");
    assert_eq!(&f[32..38], &DEFAULT_MAC, "target MAC");
    assert_eq!(&f[38..42], &[10, 234, 0, 15], "target IP");
    assert_eq!(reply.hdr.num_buffers, 1);
    assert_ne!(reply.hdr.flags & VIRTIO_NET_HDR_F_DATA_VALID as u8, 0);
    let m = lock(&h.dev).metrics().clone();
    assert_eq!(NetMetrics::get(&m.tx_frames), 1);
    assert!(NetMetrics::get(&m.rx_frames) >= 1);
    assert_eq!(NetMetrics::get(&m.queue_errors), 0);
}
