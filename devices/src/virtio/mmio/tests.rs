//! Tests of the virtio-mmio transport against a fake device.

use std::sync::{Arc, Mutex};

use virtio_queue::mock::MockSplitQueue;
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use virtio_queue::QueueState;

use super::*;
use crate::virtio::{ActivateError, VirtioDevice, VIRTIO_RING_F_EVENT_IDX};

const BASE: MmioAddress = MmioAddress(0xd000_0000);
const FAKE_ID: u32 = 42;
const FAKE_FEATURE: u64 = 1 << 3;

#[derive(Debug)]
struct FakeDevice {
    queue_sizes: Vec<u16>,
    acked: u64,
    config: Vec<u8>,
    evts: Vec<EventFd>,
    activations: usize,
    resets: usize,
    fail_activate: bool,
    queues_seen: Vec<(u16, bool)>,
    next_avail_seen: Vec<u16>,
    restored: usize,
    /// What the device reports as its live queues.
    live_queues: Option<Vec<QueueState>>,
}

impl FakeDevice {
    fn new(queues: usize) -> Self {
        Self {
            queue_sizes: vec![16; queues],
            acked: 0,
            config: (0u8..16).collect(),
            evts: (0..queues)
                .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
                .collect(),
            activations: 0,
            resets: 0,
            fail_activate: false,
            queues_seen: Vec::new(),
            next_avail_seen: Vec::new(),
            restored: 0,
            live_queues: None,
        }
    }
}

impl VirtioDevice for FakeDevice {
    fn device_type(&self) -> u32 {
        FAKE_ID
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }
    fn avail_features(&self) -> u64 {
        FAKE_FEATURE | (1 << VIRTIO_RING_F_EVENT_IDX)
    }
    fn ack_features(&mut self, features: u64) {
        self.acked = features;
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.config.get(offset as usize + i).copied().unwrap_or(0);
        }
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            if let Some(c) = self.config.get_mut(offset as usize + i) {
                *c = *b;
            }
        }
    }
    fn activate(&mut self, ctx: ActivationContext) -> Result<(), ActivateError> {
        if self.fail_activate {
            return Err(ActivateError::AlreadyActive);
        }
        self.activations += 1;
        self.queues_seen = ctx
            .queues
            .iter()
            .map(|q| (q.size(), q.event_idx_enabled()))
            .collect();
        self.next_avail_seen = ctx.queues.iter().map(|q| q.next_avail()).collect();
        self.live_queues = Some(ctx.queues.iter().map(|q| q.state()).collect());
        Ok(())
    }
    fn reset(&mut self) -> bool {
        self.resets += 1;
        true
    }
    fn queue_events(&self) -> &[EventFd] {
        &self.evts
    }
    fn restored(&mut self) {
        self.restored += 1;
    }
    fn queue_states(&self) -> Option<Vec<QueueState>> {
        self.live_queues.clone()
    }
}

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
}

fn transport(queues: usize) -> (MmioTransport, Arc<Mutex<FakeDevice>>, GuestMemoryMmap) {
    let dev = Arc::new(Mutex::new(FakeDevice::new(queues)));
    let mem = mem();
    let t = MmioTransport::new(mem.clone(), dev.clone()).unwrap();
    (t, dev, mem)
}

fn rd(t: &mut MmioTransport, reg: u32) -> u32 {
    let mut b = [0u8; 4];
    t.mmio_read(BASE, reg.into(), &mut b);
    u32::from_le_bytes(b)
}

fn wr(t: &mut MmioTransport, reg: u32, val: u32) {
    t.mmio_write(BASE, reg.into(), &val.to_le_bytes());
}

fn device_features(t: &mut MmioTransport) -> u64 {
    wr(t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
    let lo = rd(t, VIRTIO_MMIO_DEVICE_FEATURES);
    wr(t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
    let hi = rd(t, VIRTIO_MMIO_DEVICE_FEATURES);
    u64::from(lo) | (u64::from(hi) << 32)
}

fn write_driver_features(t: &mut MmioTransport, f: u64) {
    wr(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    wr(t, VIRTIO_MMIO_DRIVER_FEATURES, f as u32);
    wr(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    wr(t, VIRTIO_MMIO_DRIVER_FEATURES, (f >> 32) as u32);
}

/// ACKNOWLEDGE → DRIVER → features → FEATURES_OK. Returns the status read back.
fn negotiate(t: &mut MmioTransport, features: u64) -> u32 {
    wr(t, VIRTIO_MMIO_STATUS, STATUS_ACK);
    wr(t, VIRTIO_MMIO_STATUS, STATUS_DRIVER);
    write_driver_features(t, features);
    wr(t, VIRTIO_MMIO_STATUS, STATUS_FEATURES_OK);
    rd(t, VIRTIO_MMIO_STATUS)
}

/// Program queue `sel` from a mock queue laid out at `start`.
fn setup_queue(t: &mut MmioTransport, mem: &GuestMemoryMmap, sel: u32, start: u64) {
    let vq = MockSplitQueue::create(mem, GuestAddress(start), 16);
    wr(t, VIRTIO_MMIO_QUEUE_SEL, sel);
    assert_eq!(rd(t, VIRTIO_MMIO_QUEUE_READY), 0);
    wr(t, VIRTIO_MMIO_QUEUE_NUM, 8);
    let regs = [
        (
            VIRTIO_MMIO_QUEUE_DESC_LOW,
            VIRTIO_MMIO_QUEUE_DESC_HIGH,
            vq.desc_table_addr(),
        ),
        (
            VIRTIO_MMIO_QUEUE_AVAIL_LOW,
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH,
            vq.avail_addr(),
        ),
        (
            VIRTIO_MMIO_QUEUE_USED_LOW,
            VIRTIO_MMIO_QUEUE_USED_HIGH,
            vq.used_addr(),
        ),
    ];
    for (lo, hi, addr) in regs {
        wr(t, lo, addr.0 as u32);
        wr(t, hi, (addr.0 >> 32) as u32);
    }
    wr(t, VIRTIO_MMIO_QUEUE_READY, 1);
    assert_eq!(rd(t, VIRTIO_MMIO_QUEUE_READY), 1);
}

fn full_features() -> u64 {
    FAKE_FEATURE | (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX)
}

fn activate(t: &mut MmioTransport, mem: &GuestMemoryMmap, queues: u32) {
    assert_eq!(negotiate(t, full_features()), STATUS_FEATURES_OK);
    for q in 0..queues {
        setup_queue(t, mem, q, 0x1000 * u64::from(q + 1));
    }
    wr(t, VIRTIO_MMIO_STATUS, STATUS_DRIVER_OK);
}

#[test]
fn identification_registers() {
    let (mut t, _dev, _mem) = transport(2);
    assert_eq!(rd(&mut t, VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
    assert_eq!(rd(&mut t, VIRTIO_MMIO_VERSION), 2);
    assert_eq!(rd(&mut t, VIRTIO_MMIO_DEVICE_ID), FAKE_ID);
    assert_eq!(rd(&mut t, VIRTIO_MMIO_VENDOR_ID), VENDOR_ID);
    assert_eq!(rd(&mut t, VIRTIO_MMIO_STATUS), 0);
    assert_eq!(rd(&mut t, VIRTIO_MMIO_CONFIG_GENERATION), 0);
    assert_eq!(rd(&mut t, VIRTIO_MMIO_SHM_LEN_LOW), u32::MAX);
    wr(&mut t, VIRTIO_MMIO_QUEUE_SEL, 1);
    assert_eq!(rd(&mut t, VIRTIO_MMIO_QUEUE_NUM_MAX), 16);
    wr(&mut t, VIRTIO_MMIO_QUEUE_SEL, 2);
    assert_eq!(
        rd(&mut t, VIRTIO_MMIO_QUEUE_NUM_MAX),
        0,
        "non-existent queue"
    );
    let f = device_features(&mut t);
    assert_eq!(f, full_features(), "VERSION_1 always offered");
    wr(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 7);
    assert_eq!(rd(&mut t, VIRTIO_MMIO_DEVICE_FEATURES), 0);
}

#[test]
fn negotiation_activates_device() {
    let (mut t, dev, mem) = transport(2);
    activate(&mut t, &mem, 2);
    assert_eq!(rd(&mut t, VIRTIO_MMIO_STATUS), STATUS_DRIVER_OK);
    assert!(t.is_activated());
    let dev = dev.lock().unwrap();
    assert_eq!(dev.activations, 1);
    assert_eq!(dev.acked, full_features());
    assert_eq!(dev.queues_seen, vec![(8, true), (8, true)]);
}

#[test]
fn features_ok_refused() {
    // A feature that was not offered.
    let (mut t, dev, _mem) = transport(1);
    assert_eq!(
        negotiate(&mut t, full_features() | (1 << 40)),
        STATUS_DRIVER,
        "FEATURES_OK must not stick"
    );
    // No VIRTIO_F_VERSION_1: legacy drivers are refused.
    let (mut t2, _dev2, _mem2) = transport(1);
    assert_eq!(negotiate(&mut t2, FAKE_FEATURE), STATUS_DRIVER);
    assert_eq!(dev.lock().unwrap().acked, 0);
    // DRIVER_OK without FEATURES_OK does nothing.
    wr(
        &mut t2,
        VIRTIO_MMIO_STATUS,
        STATUS_DRIVER | VIRTIO_CONFIG_S_DRIVER_OK,
    );
    assert_eq!(rd(&mut t2, VIRTIO_MMIO_STATUS), STATUS_DRIVER);
    assert!(!t2.is_activated());
    // The driver may then give up.
    wr(
        &mut t2,
        VIRTIO_MMIO_STATUS,
        STATUS_DRIVER | VIRTIO_CONFIG_S_FAILED,
    );
    assert_ne!(rd(&mut t2, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_FAILED, 0);
}

#[test]
fn invalid_transitions_and_early_writes_are_ignored() {
    let (mut t, dev, _mem) = transport(1);
    // Skipping states.
    wr(&mut t, VIRTIO_MMIO_STATUS, STATUS_DRIVER_OK);
    assert_eq!(rd(&mut t, VIRTIO_MMIO_STATUS), 0);
    wr(&mut t, VIRTIO_MMIO_STATUS, STATUS_ACK);
    wr(&mut t, VIRTIO_MMIO_STATUS, STATUS_FEATURES_OK);
    assert_eq!(rd(&mut t, VIRTIO_MMIO_STATUS), STATUS_ACK);
    // Queue registers before FEATURES_OK.
    wr(&mut t, VIRTIO_MMIO_QUEUE_READY, 1);
    assert_eq!(rd(&mut t, VIRTIO_MMIO_QUEUE_READY), 0);
    // Driver features before DRIVER.
    write_driver_features(&mut t, full_features());
    wr(&mut t, VIRTIO_MMIO_STATUS, STATUS_DRIVER);
    wr(&mut t, VIRTIO_MMIO_STATUS, STATUS_FEATURES_OK);
    assert_eq!(rd(&mut t, VIRTIO_MMIO_STATUS), STATUS_DRIVER);
    assert_eq!(dev.lock().unwrap().acked, 0);
}

#[test]
fn activation_with_bad_queue_needs_reset() {
    let (mut t, dev, mem) = transport(2);
    assert_eq!(negotiate(&mut t, full_features()), STATUS_FEATURES_OK);
    setup_queue(&mut t, &mem, 0, 0x1000);
    // Queue 1: used ring outside guest memory.
    setup_queue(&mut t, &mem, 1, 0x2000);
    wr(&mut t, VIRTIO_MMIO_QUEUE_USED_HIGH, 0x10);
    wr(&mut t, VIRTIO_MMIO_STATUS, STATUS_DRIVER_OK);
    let status = rd(&mut t, VIRTIO_MMIO_STATUS);
    assert_ne!(status & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    assert!(!t.is_activated());
    assert_eq!(dev.lock().unwrap().activations, 0);
    assert_eq!(
        rd(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS),
        VIRTIO_MMIO_INT_CONFIG
    );
    assert_eq!(t.interrupt_evt().read().unwrap(), 1);
    assert_eq!(rd(&mut t, VIRTIO_MMIO_CONFIG_GENERATION), 1);

    // A queue that was never made ready, and a device that refuses, fail the same way.
    let (mut t, _dev, mem) = transport(2);
    assert_eq!(negotiate(&mut t, full_features()), STATUS_FEATURES_OK);
    setup_queue(&mut t, &mem, 0, 0x1000);
    wr(&mut t, VIRTIO_MMIO_STATUS, STATUS_DRIVER_OK);
    assert_ne!(
        rd(&mut t, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET,
        0
    );

    let (mut t, dev, mem) = transport(1);
    dev.lock().unwrap().fail_activate = true;
    activate(&mut t, &mem, 1);
    assert_ne!(
        rd(&mut t, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET,
        0
    );
}

#[test]
fn status_zero_resets() {
    let (mut t, dev, mem) = transport(1);
    activate(&mut t, &mem, 1);
    t.interrupt().trigger(InterruptType::Queue(0)).unwrap();
    wr(&mut t, VIRTIO_MMIO_STATUS, 0);
    assert_eq!(rd(&mut t, VIRTIO_MMIO_STATUS), 0);
    assert!(!t.is_activated());
    assert_eq!(dev.lock().unwrap().resets, 1);
    assert_eq!(rd(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), 0);
    assert_eq!(
        rd(&mut t, VIRTIO_MMIO_QUEUE_SEL),
        0,
        "write-only register reads 0"
    );
    assert_eq!(rd(&mut t, VIRTIO_MMIO_QUEUE_READY), 0);
    // The device can be brought up again.
    activate(&mut t, &mem, 1);
    assert_eq!(dev.lock().unwrap().activations, 2);
}

#[test]
fn interrupt_status_and_ack() {
    let (mut t, _dev, mem) = transport(1);
    activate(&mut t, &mem, 1);
    t.interrupt().trigger(InterruptType::Queue(0)).unwrap();
    t.interrupt().trigger(InterruptType::Config).unwrap();
    assert_eq!(
        rd(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS),
        VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG
    );
    assert_eq!(t.interrupt_evt().read().unwrap(), 2);
    wr(&mut t, VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING);
    assert_eq!(
        rd(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS),
        VIRTIO_MMIO_INT_CONFIG
    );
    wr(&mut t, VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INT_CONFIG);
    assert_eq!(rd(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), 0);
}

#[test]
fn queue_notify_signals_queue_event() {
    let (mut t, dev, mem) = transport(2);
    activate(&mut t, &mem, 2);
    let evts: Vec<EventFd> = t
        .queue_evts()
        .iter()
        .map(|e| e.try_clone().unwrap())
        .collect();
    assert_eq!(evts.len(), 2);
    t.mmio_write(BASE, NOTIFY_REG_OFFSET, &1u32.to_le_bytes());
    assert_eq!(evts[1].read().unwrap(), 1);
    assert!(
        dev.lock().unwrap().evts[0].read().is_err(),
        "queue 0 not signalled"
    );
    // A non-existent queue is ignored.
    wr(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 9);
}

#[test]
fn config_space_access() {
    let (mut t, dev, _mem) = transport(1);
    let mut b8 = [0u8; 8];
    t.mmio_read(BASE, CONFIG_SPACE_OFFSET + 4, &mut b8);
    assert_eq!(b8, [4, 5, 6, 7, 8, 9, 10, 11]);
    let mut b1 = [0u8; 1];
    t.mmio_read(BASE, CONFIG_SPACE_OFFSET + 15, &mut b1);
    assert_eq!(b1, [15]);
    // Writes need at least DRIVER.
    t.mmio_write(BASE, CONFIG_SPACE_OFFSET, &[0xaa, 0xbb]);
    assert_eq!(dev.lock().unwrap().config[0], 0);
    wr(&mut t, VIRTIO_MMIO_STATUS, STATUS_ACK);
    wr(&mut t, VIRTIO_MMIO_STATUS, STATUS_DRIVER);
    t.mmio_write(BASE, CONFIG_SPACE_OFFSET, &[0xaa, 0xbb]);
    assert_eq!(dev.lock().unwrap().config[..2], [0xaa, 0xbb]);
}

#[test]
fn bad_accesses_are_ignored() {
    let (mut t, _dev, _mem) = transport(1);
    let mut b = [0xffu8; 4];
    t.mmio_read(BASE, 2, &mut b); // unaligned
    assert_eq!(b, [0; 4]);
    let mut b2 = [0xffu8; 2];
    t.mmio_read(BASE, VIRTIO_MMIO_MAGIC_VALUE.into(), &mut b2); // narrow
    assert_eq!(b2, [0; 2]);
    let mut b8 = [0xffu8; 8];
    t.mmio_read(BASE, MMIO_REGION_SIZE + 4, &mut b8); // past the window
    assert_eq!(b8, [0; 8]);
    t.mmio_read(BASE, u64::MAX, &mut b8);
    t.mmio_read(BASE, 0x0f0, &mut b); // unknown register
    assert_eq!(b, [0; 4]);
    t.mmio_write(BASE, VIRTIO_MMIO_STATUS.into(), &[1]); // narrow
    t.mmio_write(BASE, VIRTIO_MMIO_STATUS.into(), &[1; 8]); // wide
    t.mmio_write(BASE, 0x71, &[1; 4]); // unaligned
    t.mmio_write(BASE, u64::MAX, &[1; 4]);
    t.mmio_write(BASE, VIRTIO_MMIO_MAGIC_VALUE.into(), &[1; 4]); // read-only
    assert_eq!(rd(&mut t, VIRTIO_MMIO_STATUS), 0);
    assert_eq!(rd(&mut t, VIRTIO_MMIO_MAGIC_VALUE), MMIO_MAGIC_VALUE);
}

#[test]
fn block_device_through_transport() {
    use crate::virtio::block::{Block, BlockConfig};
    let file = tempfile::NamedTempFile::new().unwrap();
    file.as_file().set_len(1 << 20).unwrap();
    let block = Arc::new(Mutex::new(
        Block::new(BlockConfig::new(file.path())).unwrap(),
    ));
    let mem = mem();
    let mut t = MmioTransport::new(mem.clone(), block.clone()).unwrap();
    assert_eq!(rd(&mut t, VIRTIO_MMIO_DEVICE_ID), 2);
    let offered = device_features(&mut t);
    assert_eq!(negotiate(&mut t, offered), STATUS_FEATURES_OK);
    setup_queue(&mut t, &mem, 0, 0x1000);
    wr(&mut t, VIRTIO_MMIO_STATUS, STATUS_DRIVER_OK);
    assert_eq!(rd(&mut t, VIRTIO_MMIO_STATUS), STATUS_DRIVER_OK);
    assert!(block.lock().unwrap().is_active());
    let mut cap = [0u8; 8];
    t.mmio_read(BASE, CONFIG_SPACE_OFFSET, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 2048);
}

#[test]
fn snapshot_restores_registers_queues_and_activation() {
    let (mut t, dev, mem) = transport(2);
    activate(&mut t, &mem, 2);
    assert!(t.is_activated());
    // The device consumed three buffers of queue 1 before the snapshot (its own queue copy
    // moved, the transport's did not); a vring interrupt is not acknowledged yet.
    {
        let mut d = dev.lock().unwrap();
        let live = d.live_queues.as_mut().unwrap();
        live[1].next_avail = 3;
        live[1].next_used = 3;
    }
    wr(&mut t, VIRTIO_MMIO_QUEUE_SEL, 1);
    t.interrupt().trigger(InterruptType::Queue(1)).unwrap();
    let snap = t.snapshot().unwrap();
    assert_eq!((snap.queues[1].next_avail, snap.queues[1].next_used), (3, 3), "positions come from the device");
    assert_eq!((snap.queue_sel, snap.interrupt_status), (1, VIRTIO_MMIO_INT_VRING));
    assert_eq!(snap.device_type, FAKE_ID);
    assert_eq!(dev.lock().unwrap().restored, 0);

    // A fresh transport over a fresh device, as in a new process (same memory layout).
    let (mut fresh, fresh_dev, _) = transport(2);
    fresh.restore(&snap).unwrap();
    assert!(fresh.is_activated());
    assert_eq!(rd(&mut fresh, VIRTIO_MMIO_STATUS), STATUS_DRIVER_OK);
    assert_eq!(rd(&mut fresh, VIRTIO_MMIO_INTERRUPT_STATUS), VIRTIO_MMIO_INT_VRING);
    assert_eq!(rd(&mut fresh, VIRTIO_MMIO_QUEUE_READY), 1, "queue 1 selected and ready");
    assert_eq!(fresh.interrupt_evt().read().unwrap(), 1, "the pending interrupt is raised again");
    let d = fresh_dev.lock().unwrap();
    assert_eq!((d.activations, d.restored), (1, 1));
    assert_eq!(d.acked, full_features());
    assert_eq!(d.queues_seen, vec![(8, true), (8, true)]);
    assert_eq!(d.next_avail_seen, vec![0, 3], "ring positions carried over");
    drop(d);
    assert_eq!(fresh.snapshot().unwrap(), snap, "a restored transport snapshots the same");
}

#[test]
fn snapshot_of_another_device_or_bad_queues_is_refused() {
    let (t, _dev, _mem) = transport(2);
    let snap = t.snapshot().unwrap();
    let mut other = snap.clone();
    other.device_type = FAKE_ID + 1;
    let (mut t3, _, _) = transport(3);
    assert!(matches!(t3.restore(&snap), Err(MmioError::SnapshotMismatch { .. })), "queue count");
    let (mut t2, dev2, _) = transport(2);
    assert!(matches!(t2.restore(&other), Err(MmioError::SnapshotMismatch { .. })), "device type");
    let mut bad = snap.clone();
    bad.queues[0].size = 5; // not a power of two
    bad.queues[0].max_size = 16;
    assert!(matches!(t2.restore(&bad), Err(MmioError::QueueState(0, _))), "queue size");
    let mut big = snap;
    big.queues[0].max_size = 1024;
    assert!(matches!(t2.restore(&big), Err(MmioError::SnapshotMismatch { .. })), "max size");
    assert_eq!(dev2.lock().unwrap().activations, 0);
}
