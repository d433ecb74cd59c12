//! Tests of the virtio-9p device against a temporary export directory: identity, config space
//! and tag validation, a full 9P session through the queue (split and indirect chains, like
//! the Linux driver's zero-copy requests), worker concurrency (a stuck request does not block
//! others), a table of malformed chains, and reset with requests in flight. The guest side is
//! a split queue laid out by hand in `GuestMemoryMmap`, driven through an `EventManager`.

use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ::p9::wire::{Rmessage, Tmessage, NOFID, NOTAG};
use event_manager::{EventManager, SubscriberOps};
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;
use crate::virtio::test_utils::{guest_mem, publish, run_idle, split_queue, take_used, write_desc};
use crate::virtio::DeviceStateError;
use crate::virtio::{
    feature, lock, ActivationContext, InterruptType, RecordingInterrupt, VirtioDevice,
    VIRTIO_F_VERSION_1,
};

const MEM_SIZE: usize = 0x400_0000;
const QSIZE: u16 = 256;
const DESC: u64 = 0x1_0000;
const AVAIL: u64 = 0x2_0000;
const USED: u64 = 0x3_0000;
/// Per-request slots: T-message at `REQ + n * STRIDE`, R-message at `RESP + n * STRIDE`.
const REQ: u64 = 0x10_0000;
const RESP: u64 = 0x100_0000;
const STRIDE: u64 = 0x10_0000;
const SLOTS: u64 = 16;
/// Indirect descriptor tables.
const INDIRECT: u64 = 0x4_0000;
const R: u16 = 0;
const W: u16 = VRING_DESC_F_WRITE as u16;
const MSIZE: u32 = 512 * 1024;
const WAIT: Duration = Duration::from_secs(10);

type Dev = Arc<Mutex<P9Device>>;
/// A chain as (addr, len, flags) triples.
type Descs = Vec<(u64, u32, u16)>;

/// The guest driver: one request queue in guest memory, the device behind an event manager.
struct Harness {
    dev: Dev,
    em: EventManager<Dev>,
    mem: GuestMemoryMmap,
    irq: Arc<RecordingInterrupt>,
    dir: tempfile::TempDir,
    avail_idx: u16,
    used_seen: u16,
    next_desc: u16,
    next_slot: u64,
}

impl Harness {
    fn new(workers: usize) -> Self {
        Self::exporting(workers, None)
    }

    /// A device exporting `root` (default: its own temporary directory).
    fn exporting(workers: usize, root: Option<&std::path::Path>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = P9Config::new("/data", root.unwrap_or(dir.path()));
        cfg.workers = workers;
        let dev = Arc::new(Mutex::new(P9Device::new(cfg).unwrap()));
        let mut em = EventManager::<Dev>::new().unwrap();
        em.add_subscriber(dev.clone());
        let mut h = Harness {
            dev,
            em,
            mem: guest_mem(MEM_SIZE),
            irq: Arc::new(RecordingInterrupt::new()),
            dir,
            avail_idx: 0,
            used_seen: 0,
            next_desc: 0,
            next_slot: 0,
        };
        h.activate();
        h
    }

    fn activate(&mut self) {
        self.avail_idx = 0;
        self.used_seen = 0;
        self.next_desc = 0;
        self.mem
            .write_slice(&[0u8; 0x3_0000], GuestAddress(DESC))
            .unwrap();
        let queue = split_queue(QSIZE, DESC, AVAIL, USED, false);
        {
            let mut dev = lock(&self.dev);
            let features = dev.avail_features();
            dev.ack_features(features);
            dev.activate(ActivationContext {
                mem: self.mem.clone(),
                interrupt: self.irq.clone(),
                queues: vec![queue],
            })
            .unwrap();
        }
        self.run_idle();
    }

    fn run_idle(&mut self) {
        run_idle(&mut self.em);
    }

    /// Link `descs` (addr, len, flags) into a chain in the table at `table` starting at
    /// index `first` of a `size`-entry table.
    fn link(&self, table: u64, first: u16, size: u16, descs: &[(u64, u32, u16)]) {
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let idx = (first + i as u16) % size;
            let last = i + 1 == descs.len();
            let (flags, next) = if last {
                (flags, 0)
            } else {
                (flags | VRING_DESC_F_NEXT as u16, (idx + 1) % size)
            };
            write_desc(&self.mem, table, idx, (addr, len, flags), next);
        }
    }

    fn publish(&mut self, head: u16) {
        publish(&self.mem, AVAIL, QSIZE, &mut self.avail_idx, head);
    }

    /// Put a chain of (addr, len, flags) on the queue; returns its head.
    fn add_chain(&mut self, descs: &[(u64, u32, u16)]) -> u16 {
        let head = self.next_desc;
        self.link(DESC, head, QSIZE, descs);
        self.next_desc = (head + descs.len() as u16) % QSIZE;
        self.publish(head);
        head
    }

    /// Put a one-descriptor chain pointing at an indirect table holding `descs`.
    fn add_indirect(&mut self, descs: &[(u64, u32, u16)]) -> u16 {
        let n = descs.len() as u16;
        self.link(INDIRECT, 0, n, descs);
        self.add_chain(&[(INDIRECT, 16 * u32::from(n), VRING_DESC_F_INDIRECT as u16)])
    }

    fn kick(&mut self) {
        lock(&self.dev).queue_events()[0].write(1).unwrap();
        self.run_idle();
    }

    /// New used entries as (id, len).
    fn take_used(&mut self) -> Vec<(u32, u32)> {
        take_used(&self.mem, USED, QSIZE, &mut self.used_seen)
    }

    /// Run the event loop until `n` used entries arrived (panics after [`WAIT`]).
    fn wait_used(&mut self, n: usize) -> Vec<(u32, u32)> {
        let deadline = Instant::now() + WAIT;
        let mut out = self.take_used();
        while out.len() < n {
            assert!(
                Instant::now() < deadline,
                "only {} of {n} used entries",
                out.len()
            );
            self.em.run_with_timeout(20).unwrap();
            out.extend(self.take_used());
        }
        out
    }

    fn slot(&mut self) -> (u64, u64) {
        let n = self.next_slot % SLOTS;
        self.next_slot += 1;
        (REQ + n * STRIDE, RESP + n * STRIDE)
    }

    /// Write `msg` into a fresh slot and queue it with `resp_cap` bytes for the reply;
    /// returns (head, reply address).
    fn submit(&mut self, tag: u16, msg: &Tmessage<'_>, resp_cap: u32) -> (u16, u64) {
        let mut buf = Vec::new();
        msg.encode(tag, &mut buf).unwrap();
        let (req, resp) = self.slot();
        self.mem.write_slice(&buf, GuestAddress(req)).unwrap();
        let head = self.add_chain(&[(req, buf.len() as u32, R), (resp, resp_cap, W)]);
        self.kick();
        (head, resp)
    }

    fn reply_at(&self, addr: u64, len: u32) -> Vec<u8> {
        let mut out = vec![0u8; len as usize];
        self.mem.read_slice(&mut out, GuestAddress(addr)).unwrap();
        out
    }

    /// Send one T-message and wait for its R-message.
    fn rpc(&mut self, tag: u16, msg: &Tmessage<'_>) -> Vec<u8> {
        let (head, resp) = self.submit(tag, msg, MSIZE);
        let used = self.wait_used(1);
        assert_eq!(used.len(), 1);
        assert_eq!(used[0].0, u32::from(head));
        self.reply_at(resp, used[0].1)
    }

    /// Version + attach fid 0 to the export root.
    fn session(&mut self) {
        let r = self.rpc(
            NOTAG,
            &Tmessage::Version {
                msize: MSIZE,
                version: b"9P2000.L",
            },
        );
        assert_eq!(
            decode(&r),
            Rmessage::Version {
                msize: MSIZE,
                version: b"9P2000.L"
            }
        );
        let r = self.rpc(
            1,
            &Tmessage::Attach {
                fid: 0,
                afid: NOFID,
                uname: b"root",
                aname: b"",
                n_uname: 0,
            },
        );
        assert!(matches!(decode(&r), Rmessage::Attach { .. }), "{r:?}");
    }

    /// Walk fid 0 to `name` as `fid` and open it read-only.
    fn open(&mut self, fid: u32, name: &[u8]) {
        let r = self.rpc(
            2,
            &Tmessage::Walk {
                fid: 0,
                newfid: fid,
                names: vec![name],
            },
        );
        assert!(matches!(decode(&r), Rmessage::Walk { qids } if qids.len() == 1));
        let r = self.rpc(3, &Tmessage::Lopen { fid, flags: 0 });
        assert!(matches!(decode(&r), Rmessage::Lopen { .. }), "{r:?}");
    }

    fn metrics(&self) -> Arc<P9Metrics> {
        lock(&self.dev).metrics().clone()
    }

    fn set_hook(&self, hook: Option<super::worker::TestHook>) {
        lock(&self.dev).pool().set_test_hook(hook);
    }
}

fn decode(frame: &[u8]) -> Rmessage<'_> {
    Rmessage::decode_frame(frame).unwrap().1
}

fn tag_of(frame: &[u8]) -> u16 {
    u16::from_le_bytes([frame[5], frame[6]])
}

/// A hook that parks requests tagged `tag` until the returned sender sends (or drops), and
/// reports each parked request on the returned receiver.
fn gate(
    tag: u16,
) -> (
    super::worker::TestHook,
    mpsc::Sender<()>,
    mpsc::Receiver<()>,
) {
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let (entered_tx, entered_rx) = mpsc::channel::<()>();
    let release_rx = Mutex::new(release_rx);
    let entered_tx = Mutex::new(entered_tx);
    let hook: super::worker::TestHook = Arc::new(move |t| {
        if t == tag {
            let _ = lock(&entered_tx).send(());
            let _ = lock(&release_rx).recv_timeout(WAIT);
        }
    });
    (hook, release_tx, entered_rx)
}

#[test]
fn identity_and_config_space() {
    let h = Harness::new(1);
    let dev = lock(&h.dev);
    assert_eq!(dev.device_type(), 9);
    assert_eq!(dev.queue_max_sizes(), &[QUEUE_SIZE]);
    assert_eq!(dev.tag(), "/data");
    let f = dev.avail_features();
    assert_ne!(f & feature(VIRTIO_9P_MOUNT_TAG), 0);
    assert_ne!(f & feature(VIRTIO_F_VERSION_1), 0);
    assert_eq!(dev.acked_features(), f);
    let mut cfg = [0xffu8; 10];
    dev.read_config(0, &mut cfg);
    assert_eq!(&cfg, b"\x05\x00/data\0\0\0");
    let mut two = [0u8; 2];
    dev.read_config(0, &mut two);
    assert_eq!(u16::from_le_bytes(two), 5);
    let mut tail = [0xffu8; 3];
    dev.read_config(5, &mut tail);
    assert_eq!(&tail, b"ta\0");
    dev.read_config(u64::MAX, &mut tail);
    assert_eq!(tail, [0; 3]);
}

#[test]
fn config_is_validated() {
    let dir = tempfile::tempdir().unwrap();
    let new = |tag: &str, workers: usize| {
        let mut cfg = P9Config::new(tag, dir.path());
        cfg.workers = workers;
        P9Device::new(cfg)
    };
    assert!(matches!(new("", 1), Err(P9Error::EmptyTag)));
    assert!(matches!(new("a\0b", 1), Err(P9Error::TagNul)));
    let long = "x".repeat(MAX_TAG_LEN + 1);
    assert!(matches!(new(&long, 1), Err(P9Error::TagTooLong(_))));
    assert!(matches!(
        new("t", MAX_WORKERS + 1),
        Err(P9Error::Workers(_))
    ));
    let max = new(&"y".repeat(MAX_TAG_LEN), 0).unwrap();
    let mut len = [0u8; 2];
    max.read_config(0, &mut len);
    assert_eq!(u16::from_le_bytes(len), u16::MAX);
    let missing = P9Device::new(P9Config::new("t", dir.path().join("nope")));
    assert!(matches!(missing, Err(P9Error::Server(_))));
    let file = dir.path().join("f");
    std::fs::write(&file, b"x").unwrap();
    assert!(matches!(
        P9Device::new(P9Config::new("t", &file)),
        Err(P9Error::Server(_))
    ));
}

#[test]
fn no_thread_or_runtime_fd_before_activation() {
    let dir = tempfile::tempdir().unwrap();
    let dev = Arc::new(Mutex::new(
        P9Device::new(P9Config::new("/x", dir.path())).unwrap(),
    ));
    // What the VMM does: the transport gets a `SharedDevice`, the event loop a subscriber.
    let _transport_side: crate::virtio::SharedDevice = dev.clone();
    let subscriber: Arc<Mutex<dyn event_manager::MutEventSubscriber + Send>> = dev.clone();
    let mut em =
        EventManager::<Arc<Mutex<dyn event_manager::MutEventSubscriber + Send>>>::new().unwrap();
    em.add_subscriber(subscriber);
    // A notification before activation is not even watched.
    lock(&dev).queue_events()[0].write(1).unwrap();
    assert_eq!(em.run_with_timeout(0).unwrap(), 0);
    assert_eq!(lock(&dev).pool().threads(), 0);
}

#[test]
fn session_round_trip() {
    let mut h = Harness::new(4);
    assert_eq!(lock(&h.dev).pool().threads(), 4);
    let content: Vec<u8> = (0..200_000u32).map(|i| (i * 31 % 251) as u8).collect();
    std::fs::write(h.dir.path().join("hello.txt"), &content).unwrap();
    h.session();
    h.open(1, b"hello.txt");
    let r = h.rpc(
        4,
        &Tmessage::Read {
            fid: 1,
            offset: 0,
            count: 4096,
        },
    );
    assert_eq!(tag_of(&r), 4);
    assert_eq!(
        decode(&r),
        Rmessage::Read {
            data: &content[..4096]
        }
    );
    // One interrupt per reply (each was its own batch).
    assert_eq!(h.irq.take(), vec![InterruptType::Queue(0); 5]);
    let m = h.metrics();
    assert_eq!(m.replies.load(Ordering::Relaxed), 5);
    assert_eq!(m.requests.load(Ordering::Relaxed), 5);
    assert_eq!(m.invalid_requests.load(Ordering::Relaxed), 0);
    assert!(m.reply_bytes.load(Ordering::Relaxed) > 4096);

    // A large read the way Linux does zero-copy: the T-message split over two descriptors,
    // the R-message header in its own buffer followed by page-sized data buffers, all in an
    // indirect table.
    let mut treq = Vec::new();
    Tmessage::Read {
        fid: 1,
        offset: 1000,
        count: 150_000,
    }
    .encode(5, &mut treq)
    .unwrap();
    let (req, resp) = h.slot();
    h.mem.write_slice(&treq, GuestAddress(req)).unwrap();
    let mut descs = vec![
        (req, 5, R),
        (req + 5, treq.len() as u32 - 5, R),
        (resp, 11, W),
    ];
    let pages = 150_000u64.div_ceil(4096);
    // Data pages deliberately not contiguous with the header.
    descs.extend((0..pages).map(|p| (resp + 0x1000 + p * 0x1000, 4096, W)));
    let head = h.add_indirect(&descs);
    h.kick();
    let used = h.wait_used(1);
    assert_eq!(used, vec![(u32::from(head), 11 + 150_000)]);
    let hdr = h.reply_at(resp, 11);
    assert_eq!(
        u32::from_le_bytes(hdr[0..4].try_into().unwrap()),
        11 + 150_000
    );
    assert_eq!(hdr[4], ::p9::wire::msg::RREAD);
    assert_eq!(u32::from_le_bytes(hdr[7..11].try_into().unwrap()), 150_000);
    let data = h.reply_at(resp + 0x1000, 150_000);
    assert_eq!(data, content[1000..151_000]);

    // Write through a split chain, then read it back on the host.
    let r = h.rpc(
        6,
        &Tmessage::Lcreate {
            fid: 0,
            name: b"new.bin",
            flags: 2, // O_RDWR
            mode: 0o644,
            gid: 0,
        },
    );
    assert!(matches!(decode(&r), Rmessage::Lcreate { .. }), "{r:?}");
    let payload = vec![0x5au8; 70_000];
    let mut twrite = Vec::new();
    Tmessage::Write {
        fid: 0,
        offset: 0,
        data: &payload,
    }
    .encode(7, &mut twrite)
    .unwrap();
    let (req, resp) = h.slot();
    let hdr_len = ::p9::wire::TWRITE_HEADER_LEN as u32;
    h.mem.write_slice(&twrite, GuestAddress(req)).unwrap();
    h.add_chain(&[
        (req, hdr_len, R),
        (req + u64::from(hdr_len), twrite.len() as u32 - hdr_len, R),
        (resp, 64, W),
    ]);
    h.kick();
    let used = h.wait_used(1);
    assert_eq!(
        decode(&h.reply_at(resp, used[0].1)),
        Rmessage::Write { count: 70_000 }
    );
    assert_eq!(
        std::fs::read(h.dir.path().join("new.bin")).unwrap(),
        payload
    );
}

/// Reads and writes move file data with `preadv`/`pwritev` straight on the guest buffers
/// (`direct::ChainIo`): scatter lists longer than one syscall's `IOV_MAX` (1024), a reply
/// with less room than asked for, and a chain holding less payload than its message says.
#[test]
fn direct_io_over_long_scatter_lists() {
    let mut h = Harness::new(2);
    h.session();
    let r = h.rpc(
        4,
        &Tmessage::Lcreate {
            fid: 0,
            name: b"scatter.bin",
            flags: 2, // O_RDWR
            mode: 0o644,
            gid: 0,
        },
    );
    assert!(matches!(decode(&r), Rmessage::Lcreate { .. }), "{r:?}");

    // A 1100-piece Twrite: the payload in 256-byte descriptors, gaps between them.
    let payload: Vec<u8> = (0..1100u32 * 256).map(|i| (i % 253) as u8).collect();
    let mut twrite = Vec::new();
    Tmessage::Write {
        fid: 0,
        offset: 7,
        data: &payload,
    }
    .encode(5, &mut twrite)
    .unwrap();
    let hdr_len = ::p9::wire::TWRITE_HEADER_LEN;
    let (req, resp) = h.slot();
    h.mem
        .write_slice(&twrite[..hdr_len], GuestAddress(req))
        .unwrap();
    let mut descs = vec![(req, hdr_len as u32, R)];
    for (i, piece) in payload.chunks(256).enumerate() {
        let at = req + 0x1000 + i as u64 * 512;
        h.mem.write_slice(piece, GuestAddress(at)).unwrap();
        descs.push((at, 256, R));
    }
    descs.push((resp, 64, W));
    h.add_indirect(&descs);
    h.kick();
    let used = h.wait_used(1);
    assert_eq!(
        decode(&h.reply_at(resp, used[0].1)),
        Rmessage::Write {
            count: payload.len() as u32
        }
    );
    let on_disk = std::fs::read(h.dir.path().join("scatter.bin")).unwrap();
    assert_eq!(on_disk.len(), 7 + payload.len());
    assert_eq!(&on_disk[7..], &payload[..]);

    // A 1200-piece Rread of 250,000 bytes, 256 bytes per descriptor.
    let mut tread = Vec::new();
    Tmessage::Read {
        fid: 0,
        offset: 7,
        count: 250_000,
    }
    .encode(6, &mut tread)
    .unwrap();
    let (req, resp) = h.slot();
    h.mem.write_slice(&tread, GuestAddress(req)).unwrap();
    let mut descs = vec![(req, tread.len() as u32, R), (resp, 11, W)];
    descs.extend((0..1200u64).map(|i| (resp + 0x1000 + i * 512, 256, W)));
    h.add_indirect(&descs);
    h.kick();
    let used = h.wait_used(1);
    assert_eq!(used[0].1, 11 + 250_000);
    let hdr = h.reply_at(resp, 11);
    assert_eq!(u32::from_le_bytes(hdr[7..11].try_into().unwrap()), 250_000);
    let got: Vec<u8> = (0..1200u64)
        .flat_map(|i| h.reply_at(resp + 0x1000 + i * 512, 256))
        .take(250_000)
        .collect();
    assert_eq!(got, payload[..250_000]);

    // Less room than asked for: the reply carries what fits.
    let mut tread = Vec::new();
    Tmessage::Read {
        fid: 0,
        offset: 7,
        count: 4096,
    }
    .encode(7, &mut tread)
    .unwrap();
    let (req, resp) = h.slot();
    h.mem.write_slice(&tread, GuestAddress(req)).unwrap();
    h.add_chain(&[(req, tread.len() as u32, R), (resp, 11 + 100, W)]);
    h.kick();
    let used = h.wait_used(1);
    assert_eq!(
        decode(&h.reply_at(resp, used[0].1)),
        Rmessage::Read {
            data: &payload[..100]
        }
    );

    // A Twrite whose chain ends 100 bytes into a 10,000-byte payload: EPROTO, file untouched.
    let big = vec![0xeeu8; 10_000];
    let mut twrite = Vec::new();
    Tmessage::Write {
        fid: 0,
        offset: 0,
        data: &big,
    }
    .encode(8, &mut twrite)
    .unwrap();
    let (req, resp) = h.slot();
    h.mem
        .write_slice(&twrite[..hdr_len + 100], GuestAddress(req))
        .unwrap();
    h.add_chain(&[(req, hdr_len as u32 + 100, R), (resp, 64, W)]);
    h.kick();
    let used = h.wait_used(1);
    assert_eq!(
        decode(&h.reply_at(resp, used[0].1)),
        Rmessage::Lerror {
            ecode: libc::EPROTO as u32
        }
    );
    assert_eq!(
        std::fs::read(h.dir.path().join("scatter.bin")).unwrap(),
        on_disk
    );
    // Zero-length I/O still goes to the kernel, which checks the offset (as `pread` does).
    let r = h.rpc(
        9,
        &Tmessage::Read {
            fid: 0,
            offset: u64::MAX,
            count: 0,
        },
    );
    assert_eq!(
        decode(&r),
        Rmessage::Lerror {
            ecode: libc::EINVAL as u32
        }
    );
    assert_eq!(h.metrics().invalid_requests.load(Ordering::Relaxed), 0);
}

#[test]
fn many_requests_complete_in_batches() {
    let mut h = Harness::new(4);
    h.session();
    h.irq.take();
    let n = 64u16;
    let mut heads = Vec::new();
    for tag in 0..n {
        let mut buf = Vec::new();
        Tmessage::Getattr {
            fid: 0,
            request_mask: 0x7ff,
        }
        .encode(tag, &mut buf)
        .unwrap();
        let at = REQ + u64::from(tag) * 0x1000;
        h.mem.write_slice(&buf, GuestAddress(at)).unwrap();
        heads.push(h.add_chain(&[
            (at, buf.len() as u32, R),
            (RESP + u64::from(tag) * 0x1000, 512, W),
        ]));
    }
    // Let the event loop hand the batch to the workers, wait until they all finished, then
    // let it collect the completions: one batch, one interrupt.
    lock(&h.dev).queue_events()[0].write(1).unwrap();
    h.em.run_with_timeout(0).unwrap();
    let deadline = Instant::now() + WAIT;
    while lock(&h.dev).pending_requests() > 0 {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(2));
    }
    h.run_idle();
    assert_eq!(h.irq.take(), vec![InterruptType::Queue(0)]);
    let mut used = h.take_used();
    used.sort();
    let mut want: Vec<u32> = heads.iter().map(|&h| u32::from(h)).collect();
    want.sort();
    assert_eq!(used.iter().map(|u| u.0).collect::<Vec<_>>(), want);
    for tag in 0..n {
        let at = RESP + u64::from(tag) * 0x1000;
        let len = used
            .iter()
            .find(|u| u.0 == u32::from(heads[tag as usize]))
            .unwrap()
            .1;
        let r = h.reply_at(at, len);
        assert_eq!(tag_of(&r), tag);
        assert!(matches!(decode(&r), Rmessage::Getattr(_)));
    }
}

#[test]
fn slow_request_does_not_block_others() {
    let mut h = Harness::new(2);
    h.session();
    let (hook, release, entered) = gate(100);
    h.set_hook(Some(hook));
    let statfs = Tmessage::Statfs { fid: 0 };
    let (slow_head, _) = h.submit(100, &statfs, 512);
    entered
        .recv_timeout(WAIT)
        .expect("slow request reached a worker");
    // The slow request holds one worker; the other serves these.
    for tag in 101..105 {
        let (head, resp) = h.submit(tag, &statfs, 512);
        let used = h.wait_used(1);
        assert_eq!(used[0].0, u32::from(head));
        assert_eq!(tag_of(&h.reply_at(resp, used[0].1)), tag);
    }
    // The slow one is still running (the last fast worker may still be finishing up).
    let deadline = Instant::now() + WAIT;
    while lock(&h.dev).pending_requests() != 1 {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(h.take_used().is_empty());
    release.send(()).unwrap();
    let used = h.wait_used(1);
    assert_eq!(used[0].0, u32::from(slow_head));
    assert!(used[0].1 > 7);
}

#[test]
fn malformed_chains_are_counted_not_fatal() {
    let mut h = Harness::new(2);
    h.session();
    let before = h.metrics().invalid_requests.load(Ordering::Relaxed);
    let mut statfs = Vec::new();
    Tmessage::Statfs { fid: 0 }.encode(8, &mut statfs).unwrap();
    let (req, resp) = h.slot();
    h.mem.write_slice(&statfs, GuestAddress(req)).unwrap();
    let vlen = statfs.len() as u32;
    let outside = MEM_SIZE as u64 + 0x1000;
    let cases: &[(&str, Descs)] = &[
        ("no writable part", vec![(req, vlen, R)]),
        ("no readable part", vec![(resp, 512, W)]),
        ("shorter than a header", vec![(req, 6, R), (resp, 512, W)]),
        ("reply does not fit", vec![(req, vlen, R), (resp, 9, W)]),
        (
            "request outside memory",
            vec![(outside, vlen, R), (resp, 512, W)],
        ),
        (
            "reply outside memory",
            vec![(req, vlen, R), (outside, 512, W)],
        ),
    ];
    for (i, (what, chain)) in cases.iter().enumerate() {
        let head = h.add_chain(chain);
        h.kick();
        let used = h.wait_used(1);
        assert_eq!(used, vec![(u32::from(head), 0)], "{what}");
        assert_eq!(
            h.metrics().invalid_requests.load(Ordering::Relaxed),
            before + i as u64 + 1,
            "{what}"
        );
    }
    // Well framed but undecodable: the server answers Rlerror, not a malformed chain.
    let (req, resp) = h.slot();
    let bogus = [11u8, 0, 0, 0, 0x7f, 9, 0, 1, 2, 3, 4];
    h.mem.write_slice(&bogus, GuestAddress(req)).unwrap();
    h.add_chain(&[(req, 11, R), (resp, 64, W)]);
    h.kick();
    let used = h.wait_used(1);
    let r = h.reply_at(resp, used[0].1);
    assert_eq!(tag_of(&r), 9);
    assert!(matches!(decode(&r), Rmessage::Lerror { .. }));
    assert_eq!(
        h.metrics().invalid_requests.load(Ordering::Relaxed),
        before + cases.len() as u64
    );
    // The session survived.
    let r = h.rpc(10, &Tmessage::Statfs { fid: 0 });
    assert!(matches!(decode(&r), Rmessage::Statfs(_)));
}

#[test]
fn reset_drops_in_flight_work() {
    let mut h = Harness::new(1);
    h.session();
    let (hook, release, entered) = gate(200);
    h.set_hook(Some(hook));
    let statfs = Tmessage::Statfs { fid: 0 };
    h.submit(200, &statfs, 512);
    entered.recv_timeout(WAIT).unwrap();
    // The only worker is stuck: this one waits in the pool's queue.
    h.submit(201, &statfs, 512);
    assert_eq!(lock(&h.dev).pending_requests(), 2);
    let started = Instant::now();
    assert!(lock(&h.dev).reset());
    assert!(started.elapsed() >= super::device::RESET_DRAIN_TIMEOUT);
    assert!(!lock(&h.dev).is_active());
    // The queued request is gone; the running one finishes into the void.
    release.send(()).unwrap();
    let deadline = Instant::now() + WAIT;
    while lock(&h.dev).pending_requests() > 0 {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(5));
    }
    h.run_idle();
    assert_eq!(h.metrics().stale_completions.load(Ordering::Relaxed), 2);

    // A new activation starts a new session on fresh rings: nothing of the old one shows.
    h.set_hook(None);
    h.activate();
    assert!(h.take_used().is_empty());
    let r = h.rpc(1, &Tmessage::Statfs { fid: 0 });
    assert_eq!(
        decode(&r),
        Rmessage::Lerror {
            ecode: libc::EBADF as u32
        }
    );
    h.session();
    let r = h.rpc(2, &statfs);
    assert!(matches!(decode(&r), Rmessage::Statfs(_)));
    assert_eq!(h.metrics().activations.load(Ordering::Relaxed), 2);
}

#[test]
fn reset_when_idle_is_immediate() {
    let mut h = Harness::new(2);
    h.session();
    let started = Instant::now();
    assert!(lock(&h.dev).reset());
    assert!(started.elapsed() < super::device::RESET_DRAIN_TIMEOUT);
    // Notifications while inactive are ignored.
    lock(&h.dev).queue_events()[0].write(1).unwrap();
    h.run_idle();
    h.activate();
    h.session();
}

#[test]
fn wrong_queue_count_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut dev = P9Device::new(P9Config::new("t", dir.path())).unwrap();
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
    let res = dev.activate(ActivationContext {
        mem,
        interrupt: Arc::new(RecordingInterrupt::new()),
        queues: vec![],
    });
    assert!(res.is_err());
    assert!(!dev.is_active());
}

/// A snapshot carries the 9P session: saving waits out requests in flight (`Busy` until
/// they are returned, `settle` publishes finished ones without the event loop), and a new
/// device restored from the saved bytes serves the guest's old fids.
#[test]
fn session_survives_save_and_restore() {
    let mut h = Harness::new(2);
    std::fs::write(h.dir.path().join("kept.txt"), b"still here").unwrap();
    h.session();
    h.open(1, b"kept.txt");

    // A request parked on a worker: not saveable until it is returned.
    let (hook, release, entered) = gate(100);
    h.set_hook(Some(hook));
    let (head, resp) = h.submit(100, &Tmessage::Statfs { fid: 0 }, 512);
    entered
        .recv_timeout(WAIT)
        .expect("request reached a worker");
    assert!(matches!(
        lock(&h.dev).save_state(),
        Err(DeviceStateError::Busy)
    ));
    release.send(()).unwrap();
    let deadline = Instant::now() + WAIT;
    let saved = loop {
        let mut dev = lock(&h.dev);
        dev.settle();
        match dev.save_state() {
            Ok(state) => break state.expect("an active device has a session"),
            Err(DeviceStateError::Busy) => assert!(Instant::now() < deadline, "still busy"),
            Err(e) => panic!("{e}"),
        }
        drop(dev);
        std::thread::sleep(Duration::from_millis(2));
    };
    // settle() returned the parked request without the event loop.
    let used = h.take_used();
    assert_eq!(used.first().map(|u| u.0), Some(u32::from(head)));
    assert!(matches!(
        decode(&h.reply_at(resp, used[0].1)),
        Rmessage::Statfs(_)
    ));
    h.set_hook(None);

    // A new device on the same export, activated and given the saved session.
    let mut h2 = Harness::exporting(2, Some(h.dir.path()));
    lock(&h2.dev).restore_state(&saved).unwrap();
    assert_eq!(lock(&h2.dev).server().fid_count(), 2);
    let r = h2.rpc(
        5,
        &Tmessage::Read {
            fid: 1,
            offset: 0,
            count: 100,
        },
    );
    assert_eq!(
        decode(&r),
        Rmessage::Read {
            data: b"still here"
        }
    );
    // Garbage is refused, not half-applied.
    assert!(matches!(
        lock(&h2.dev).restore_state(b"\x01\x02"),
        Err(DeviceStateError::Invalid(_))
    ));
    assert!(lock(&h2.dev).save_state().unwrap().is_some());
}
