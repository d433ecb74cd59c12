//! Tests of the virtio-blk device: every request type through the queue loop with
//! `MockSplitQueue` over `GuestMemoryMmap` and a temporary raw file, a table of malformed
//! chains, the config space, and activation through the event manager.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, SubscriberOps};
use tempfile::NamedTempFile;
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;
use crate::virtio::{
    feature, ActivationContext, InterruptType, RecordingInterrupt, VirtioDevice, VIRTIO_F_VERSION_1,
};

const MEM_SIZE: usize = 0x100_0000;
const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const DATA2: u64 = 0x30_0000;
const STATUS: u64 = 0x40_0000;
const SEG: u64 = 0x50_0000;
const R: u16 = 0;
const W: u16 = VRING_DESC_F_WRITE as u16;
/// Default disk: 64 KiB = 128 sectors.
const DISK_SECTORS: u64 = 128;

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

fn disk_file(sectors: u64) -> NamedTempFile {
    let f = NamedTempFile::new().unwrap();
    f.as_file().set_len(sectors * SECTOR_SIZE).unwrap();
    f
}

fn block_with(file: &NamedTempFile, read_only: bool, id: Option<&str>) -> Block {
    let mut cfg = BlockConfig::new(file.path());
    cfg.read_only = read_only;
    cfg.id = id.map(str::to_owned);
    let mut block = Block::new(cfg).unwrap();
    block.ack_features(block.avail_features());
    block
}

fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
}

fn header(mem: &GuestMemoryMmap, addr: u64, req_type: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&req_type.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(addr)).unwrap();
}

fn segment(mem: &GuestMemoryMmap, addr: u64, sector: u64, num: u32, flags: u32) {
    let mut s = [0u8; 16];
    s[0..8].copy_from_slice(&sector.to_le_bytes());
    s[8..12].copy_from_slice(&num.to_le_bytes());
    s[12..16].copy_from_slice(&flags.to_le_bytes());
    mem.write_slice(&s, GuestAddress(addr)).unwrap();
}

fn status_at(mem: &GuestMemoryMmap, addr: u64) -> u8 {
    mem.read_obj(GuestAddress(addr)).unwrap()
}

/// Link `chain` into the descriptor table at `offset` (NEXT flags, next indexes).
fn linked(chain: &[RawDescriptor], offset: u16) -> Vec<RawDescriptor> {
    chain
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let d = SplitDescriptor::from(*d);
            let last = i + 1 == chain.len();
            let flags = if last {
                d.flags() & !(virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16)
            } else {
                d.flags() | virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16
            };
            let next = if last { 0 } else { offset + i as u16 + 1 };
            RawDescriptor::from(SplitDescriptor::new(d.addr().0, d.len(), flags, next))
        })
        .collect()
}

/// Activate `block` on a fresh queue holding `chains`, process it, and return the used
/// entries as (head, len) plus the interrupts raised.
fn run(
    block: &mut Block,
    mem: &GuestMemoryMmap,
    chains: &[Vec<RawDescriptor>],
) -> (Vec<(u32, u32)>, Vec<InterruptType>) {
    let vq = MockSplitQueue::new(mem, 64);
    let mut offset = 0u16;
    for chain in chains {
        vq.add_desc_chains(&linked(chain, offset), offset).unwrap();
        offset += chain.len() as u16;
    }
    let irq = Arc::new(RecordingInterrupt::new());
    let queue: Queue = vq.create_queue().unwrap();
    // The driver renegotiates after every reset.
    block.ack_features(block.avail_features());
    block
        .activate(ActivationContext {
            mem: mem.clone(),
            interrupt: irq.clone(),
            queues: vec![queue],
        })
        .unwrap();
    block.process_queue(0);
    let used_idx = vq.used().idx().load();
    let used = (0..used_idx)
        .map(|i| {
            let e = vq.used().ring().ref_at(i.into()).unwrap().load();
            (e.id(), e.len())
        })
        .collect();
    assert!(block.reset());
    (used, irq.take())
}

/// Run one chain; return (used len, status byte at STATUS).
fn run_one(block: &mut Block, mem: &GuestMemoryMmap, chain: Vec<RawDescriptor>) -> (u32, u8) {
    mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    let (used, _) = run(block, mem, &[chain]);
    assert_eq!(used.len(), 1);
    (used[0].1, status_at(mem, STATUS))
}

const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

#[test]
fn read_request() {
    let file = disk_file(DISK_SECTORS);
    let pattern: Vec<u8> = (0..1024u32).map(|i| (i * 7 % 251) as u8).collect();
    file.as_file()
        .write_all_at(&pattern, 2 * SECTOR_SIZE)
        .unwrap();
    let mut block = block_with(&file, false, None);
    let mem = mem();
    header(&mem, HDR, VIRTIO_BLK_T_IN, 2);
    let (used, irqs) = run(
        &mut block,
        &mem,
        &[vec![
            desc(HDR, 16, R),
            desc(DATA, 512, W),
            desc(DATA2, 512, W),
            desc(STATUS, 1, W),
        ]],
    );
    assert_eq!(used, vec![(0, 1025)]);
    assert_eq!(irqs, vec![InterruptType::Queue(0)]);
    assert_eq!(status_at(&mem, STATUS), OK);
    let mut got = vec![0u8; 1024];
    mem.read_slice(&mut got[..512], GuestAddress(DATA)).unwrap();
    mem.read_slice(&mut got[512..], GuestAddress(DATA2))
        .unwrap();
    assert_eq!(got, pattern);
    assert_eq!(block.metrics().read_bytes.load(Ordering::Relaxed), 1024);
}

#[test]
fn write_request() {
    let file = disk_file(DISK_SECTORS);
    let mut block = block_with(&file, false, None);
    let mem = mem();
    header(&mem, HDR, VIRTIO_BLK_T_OUT, 5);
    mem.write_slice(&[0xab; 1024], GuestAddress(DATA)).unwrap();
    let (len, status) = run_one(
        &mut block,
        &mem,
        vec![desc(HDR, 16, R), desc(DATA, 1024, R), desc(STATUS, 1, W)],
    );
    assert_eq!((len, status), (1, OK));
    let mut got = vec![0u8; 1024 + 512];
    file.as_file()
        .read_exact_at(&mut got, 5 * SECTOR_SIZE)
        .unwrap();
    assert!(got[..1024].iter().all(|&b| b == 0xab));
    assert!(got[1024..].iter().all(|&b| b == 0));
}

#[test]
fn any_layout_header_split_and_status_in_data_descriptor() {
    let file = disk_file(DISK_SECTORS);
    file.as_file().write_all_at(&[0x5a; 512], 0).unwrap();
    let mut block = block_with(&file, false, None);
    let mem = mem();
    header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    // Header in two pieces; data and status share the last descriptor.
    mem.write_obj(0xffu8, GuestAddress(DATA + 512)).unwrap();
    let (used, _) = run(
        &mut block,
        &mem,
        &[vec![
            desc(HDR, 8, R),
            desc(HDR + 8, 8, R),
            desc(DATA, 513, W),
        ]],
    );
    assert_eq!(used, vec![(0, 513)]);
    assert_eq!(status_at(&mem, DATA + 512), OK);
    let mut got = [0u8; 512];
    mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert!(got.iter().all(|&b| b == 0x5a));
}

#[test]
fn flush_request() {
    let file = disk_file(DISK_SECTORS);
    let mut block = block_with(&file, false, None);
    let mem = mem();
    header(&mem, HDR, VIRTIO_BLK_T_FLUSH, 0);
    let (len, status) = run_one(&mut block, &mem, vec![desc(HDR, 16, R), desc(STATUS, 1, W)]);
    assert_eq!((len, status), (1, OK));
    assert_eq!(block.metrics().flushes.load(Ordering::Relaxed), 1);
}

#[test]
fn get_id_request() {
    let file = disk_file(DISK_SECTORS);
    let mut block = block_with(&file, false, Some("dinv-data"));
    let mem = mem();
    header(&mem, HDR, VIRTIO_BLK_T_GET_ID, 0);
    mem.write_slice(&[0xee; 20], GuestAddress(DATA)).unwrap();
    let (len, status) = run_one(
        &mut block,
        &mem,
        vec![desc(HDR, 16, R), desc(DATA, 20, W), desc(STATUS, 1, W)],
    );
    assert_eq!((len, status), (10, OK));
    let mut got = [0u8; 10];
    mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert_eq!(&got[..9], b"dinv-data");
    assert_eq!(got[9], 0xee, "only the id bytes are written");

    // Default id: derived from the file, at most 20 bytes.
    let block = block_with(&file, false, None);
    assert!(!block.disk().id().is_empty() && block.disk().id().len() <= 20);
    // Too long an id is refused.
    let mut cfg = BlockConfig::new(file.path());
    cfg.id = Some("x".repeat(21));
    assert!(matches!(Block::new(cfg), Err(BlockError::IdTooLong(21))));
}

fn allocated_bytes(file: &File) -> u64 {
    file.metadata().unwrap().blocks() * 512
}

#[test]
fn discard_request_punches_holes() {
    let file = disk_file(4096); // 2 MiB
    file.as_file()
        .write_all_at(&vec![0x77; 1 << 20], 0)
        .unwrap();
    file.as_file().sync_all().unwrap();
    let before = allocated_bytes(file.as_file());
    assert!(before >= 1 << 20);
    let mut block = block_with(&file, false, None);
    let mem = mem();
    header(&mem, HDR, VIRTIO_BLK_T_DISCARD, 0);
    segment(&mem, DATA, 0, 1024, 0); // first 512 KiB
    segment(&mem, DATA + 16, 1024, 1024, 0); // next 512 KiB
    let (len, status) = run_one(
        &mut block,
        &mem,
        vec![desc(HDR, 16, R), desc(DATA, 32, R), desc(STATUS, 1, W)],
    );
    assert_eq!((len, status), (1, OK));
    let after = allocated_bytes(file.as_file());
    assert!(after + (1 << 20) <= before, "before {before} after {after}");
    let mut got = vec![0xffu8; 1 << 20];
    file.as_file().read_exact_at(&mut got, 0).unwrap();
    assert!(got.iter().all(|&b| b == 0));
    assert_eq!(file.as_file().metadata().unwrap().len(), 4096 * 512);
}

#[test]
fn write_zeroes_request() {
    for flags in [0, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP] {
        let file = disk_file(DISK_SECTORS);
        file.as_file().write_all_at(&[0x11; 8192], 0).unwrap();
        let mut block = block_with(&file, false, None);
        let mem = mem();
        header(&mem, HDR, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        segment(&mem, DATA, 1, 8, flags);
        let (len, status) = run_one(
            &mut block,
            &mem,
            vec![desc(HDR, 16, R), desc(DATA, 16, R), desc(STATUS, 1, W)],
        );
        assert_eq!((len, status), (1, OK), "flags {flags}");
        let mut got = vec![0u8; 8192];
        file.as_file().read_exact_at(&mut got, 0).unwrap();
        assert!(got[..512].iter().all(|&b| b == 0x11));
        assert!(got[512..512 * 9].iter().all(|&b| b == 0));
        assert!(got[512 * 9..].iter().all(|&b| b == 0x11));
        assert_eq!(file.as_file().metadata().unwrap().len(), DISK_SECTORS * 512);
    }
}

#[test]
fn discard_with_unmap_or_unknown_flags_is_unsupported() {
    let file = disk_file(DISK_SECTORS);
    let mut block = block_with(&file, false, None);
    let mem = mem();
    for (req_type, flags) in [
        (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP),
        (VIRTIO_BLK_T_WRITE_ZEROES, 0x80),
    ] {
        header(&mem, HDR, req_type, 0);
        segment(&mem, DATA, 0, 8, flags);
        let (len, status) = run_one(
            &mut block,
            &mem,
            vec![desc(HDR, 16, R), desc(DATA, 16, R), desc(STATUS, 1, W)],
        );
        assert_eq!((len, status), (1, UNSUPP));
    }
}

#[test]
fn read_only_device() {
    let file = disk_file(DISK_SECTORS);
    file.as_file().write_all_at(&[0x33; 512], 0).unwrap();
    let mut block = block_with(&file, true, None);
    let features = block.avail_features();
    assert_ne!(features & feature(VIRTIO_BLK_F_RO), 0);
    assert_eq!(features & feature(VIRTIO_BLK_F_DISCARD), 0);
    assert_eq!(features & feature(VIRTIO_BLK_F_WRITE_ZEROES), 0);
    let mem = mem();

    header(&mem, HDR, VIRTIO_BLK_T_OUT, 0);
    let (len, status) = run_one(
        &mut block,
        &mem,
        vec![desc(HDR, 16, R), desc(DATA, 512, R), desc(STATUS, 1, W)],
    );
    assert_eq!((len, status), (1, IOERR));
    let mut got = [0u8; 512];
    file.as_file().read_exact_at(&mut got, 0).unwrap();
    assert!(got.iter().all(|&b| b == 0x33), "read-only disk was written");

    // DISCARD was not offered: unsupported.
    header(&mem, HDR, VIRTIO_BLK_T_DISCARD, 0);
    segment(&mem, DATA, 0, 1, 0);
    let (len, status) = run_one(
        &mut block,
        &mem,
        vec![desc(HDR, 16, R), desc(DATA, 16, R), desc(STATUS, 1, W)],
    );
    assert_eq!((len, status), (1, UNSUPP));

    // Reads still work.
    header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    let (len, status) = run_one(
        &mut block,
        &mem,
        vec![desc(HDR, 16, R), desc(DATA, 512, W), desc(STATUS, 1, W)],
    );
    assert_eq!((len, status), (513, OK));
}

#[test]
fn unsupported_request_types() {
    let file = disk_file(DISK_SECTORS);
    let mut block = block_with(&file, false, None);
    let mem = mem();
    for req_type in [VIRTIO_BLK_T_SCSI_CMD, VIRTIO_BLK_T_SECURE_ERASE, 0xdead] {
        header(&mem, HDR, req_type, 0);
        let (len, status) = run_one(&mut block, &mem, vec![desc(HDR, 16, R), desc(STATUS, 1, W)]);
        assert_eq!((len, status), (1, UNSUPP), "type {req_type:#x}");
    }
    assert_eq!(block.metrics().unsupported.load(Ordering::Relaxed), 3);
}

/// (name, (request type, sector), chain, expected used len, expected status byte at STATUS —
/// `None` when the chain has no usable status byte).
type MalformedCase = (
    &'static str,
    (u32, u64),
    Vec<RawDescriptor>,
    u32,
    Option<u8>,
);

/// Malformed chains: each is answered (IOERR or a zero-length used entry), counted, and
/// never touches the disk.
#[test]
fn malformed_chains() {
    const FAR: u64 = 0xffff_0000_0000;
    let at0 = |t| (t, 0u64);
    let cases: Vec<MalformedCase> = vec![
        (
            "header only, no status",
            at0(VIRTIO_BLK_T_IN),
            vec![desc(HDR, 16, R)],
            0,
            None,
        ),
        (
            "status descriptor not writable",
            at0(VIRTIO_BLK_T_FLUSH),
            vec![desc(HDR, 16, R), desc(STATUS, 1, R)],
            0,
            Some(0xff),
        ),
        (
            "status descriptor empty",
            at0(VIRTIO_BLK_T_IN),
            vec![desc(HDR, 16, R), desc(DATA, 512, W), desc(STATUS, 0, W)],
            0,
            Some(0xff),
        ),
        (
            "status outside guest memory",
            at0(VIRTIO_BLK_T_FLUSH),
            vec![desc(HDR, 16, R), desc(FAR, 1, W)],
            0,
            None,
        ),
        (
            "header too short",
            at0(VIRTIO_BLK_T_IN),
            vec![desc(HDR, 8, R), desc(STATUS, 1, W)],
            1,
            Some(IOERR),
        ),
        (
            "header writable",
            at0(VIRTIO_BLK_T_IN),
            vec![desc(HDR, 16, W), desc(STATUS, 1, W)],
            1,
            Some(IOERR),
        ),
        (
            "IN with readable data",
            at0(VIRTIO_BLK_T_IN),
            vec![desc(HDR, 16, R), desc(DATA, 512, R), desc(STATUS, 1, W)],
            1,
            Some(IOERR),
        ),
        (
            "OUT with writable data",
            at0(VIRTIO_BLK_T_OUT),
            vec![desc(HDR, 16, R), desc(DATA, 512, W), desc(STATUS, 1, W)],
            1,
            Some(IOERR),
        ),
        (
            "FLUSH with data",
            at0(VIRTIO_BLK_T_FLUSH),
            vec![desc(HDR, 16, R), desc(DATA, 512, W), desc(STATUS, 1, W)],
            1,
            Some(IOERR),
        ),
        (
            "readable after writable",
            at0(VIRTIO_BLK_T_IN),
            vec![
                desc(HDR, 16, R),
                desc(DATA, 512, W),
                desc(DATA2, 512, R),
                desc(STATUS, 1, W),
            ],
            1,
            Some(IOERR),
        ),
        (
            "data outside guest memory",
            at0(VIRTIO_BLK_T_IN),
            vec![desc(HDR, 16, R), desc(FAR, 512, W), desc(STATUS, 1, W)],
            1,
            Some(IOERR),
        ),
        (
            "data straddling the end of guest memory",
            at0(VIRTIO_BLK_T_OUT),
            vec![
                desc(HDR, 16, R),
                desc(MEM_SIZE as u64 - 512, 1024, R),
                desc(STATUS, 1, W),
            ],
            1,
            Some(IOERR),
        ),
        (
            "huge length",
            at0(VIRTIO_BLK_T_IN),
            vec![
                desc(HDR, 16, R),
                desc(DATA, 0xffff_fe00, W),
                desc(STATUS, 1, W),
            ],
            1,
            Some(IOERR),
        ),
        (
            "length beyond capacity",
            at0(VIRTIO_BLK_T_IN),
            vec![
                desc(HDR, 16, R),
                desc(DATA, (DISK_SECTORS as u32 + 1) * 512, W),
                desc(STATUS, 1, W),
            ],
            1,
            Some(IOERR),
        ),
        (
            "sector at capacity",
            (VIRTIO_BLK_T_OUT, DISK_SECTORS),
            vec![desc(HDR, 16, R), desc(DATA, 512, R), desc(STATUS, 1, W)],
            1,
            Some(IOERR),
        ),
        (
            "last sector plus one",
            (VIRTIO_BLK_T_IN, DISK_SECTORS - 1),
            vec![desc(HDR, 16, R), desc(DATA, 1024, W), desc(STATUS, 1, W)],
            1,
            Some(IOERR),
        ),
        (
            "u64 sector overflow",
            (VIRTIO_BLK_T_IN, u64::MAX),
            vec![desc(HDR, 16, R), desc(DATA, 512, W), desc(STATUS, 1, W)],
            1,
            Some(IOERR),
        ),
        (
            "unaligned length",
            at0(VIRTIO_BLK_T_IN),
            vec![desc(HDR, 16, R), desc(DATA, 100, W), desc(STATUS, 1, W)],
            1,
            Some(IOERR),
        ),
        (
            "discard payload not a whole segment",
            at0(VIRTIO_BLK_T_DISCARD),
            vec![desc(HDR, 16, R), desc(DATA, 8, R), desc(STATUS, 1, W)],
            1,
            Some(IOERR),
        ),
        (
            "discard without segments",
            at0(VIRTIO_BLK_T_DISCARD),
            vec![desc(HDR, 16, R), desc(STATUS, 1, W)],
            1,
            Some(IOERR),
        ),
        (
            "too many discard segments",
            at0(VIRTIO_BLK_T_DISCARD),
            vec![
                desc(HDR, 16, R),
                desc(DATA2, (MAX_DISCARD_SEG + 1) * 16, R),
                desc(STATUS, 1, W),
            ],
            1,
            Some(IOERR),
        ),
        (
            "discard segment sector overflow",
            at0(VIRTIO_BLK_T_DISCARD),
            vec![desc(HDR, 16, R), desc(SEG, 16, R), desc(STATUS, 1, W)],
            1,
            Some(IOERR),
        ),
    ];

    let file = disk_file(DISK_SECTORS);
    let mut block = block_with(&file, false, None);
    let mem = mem();
    // The discard segment of the "sector overflow" case.
    segment(&mem, SEG, u64::MAX - 1, 8, 0);
    let mut expected_invalid = 0;
    for (name, (req_type, sector), chain, want_len, want_status) in cases {
        header(&mem, HDR, req_type, sector);
        let (len, status) = run_one(&mut block, &mem, chain);
        assert_eq!(len, want_len, "{name}: used len");
        if let Some(want) = want_status {
            assert_eq!(status, want, "{name}: status");
        }
        expected_invalid += 1;
        assert_eq!(
            block.metrics().invalid_requests.load(Ordering::Relaxed),
            expected_invalid,
            "{name}: not counted as invalid"
        );
    }
    // Nothing was written to the disk.
    let mut got = vec![0u8; (DISK_SECTORS * 512) as usize];
    file.as_file().read_exact_at(&mut got, 0).unwrap();
    assert!(got.iter().all(|&b| b == 0));
}

#[test]
fn parse_reports_typed_errors() {
    let mem = mem();
    let vq = MockSplitQueue::new(&mem, 16);
    header(&mem, HDR, VIRTIO_BLK_T_IN, 7);
    let ctx = RequestContext {
        capacity_sectors: 8,
        discard: false,
        write_zeroes: false,
    };
    let chain = vq
        .build_desc_chain(&[desc(HDR, 16, R), desc(DATA, 1024, W), desc(STATUS, 1, W)])
        .unwrap();
    assert_eq!(
        Request::parse(&chain, &mem, &ctx).unwrap_err(),
        ParseError::OutOfRange {
            sector: 7,
            count: 2,
            capacity: 8
        }
    );
    let chain = vq
        .build_desc_chain(&[desc(HDR, 16, R), desc(DATA, 512, W), desc(STATUS, 1, W)])
        .unwrap();
    let req = Request::parse(&chain, &mem, &ctx).unwrap();
    assert!(matches!(req.op, Operation::Read { offset: 3584, ref bufs } if bufs.len() == 1));
    // Discard not negotiated: parsed as unsupported, not as an error.
    header(&mem, HDR, VIRTIO_BLK_T_DISCARD, 0);
    let chain = vq
        .build_desc_chain(&[desc(HDR, 16, R), desc(DATA, 16, R), desc(STATUS, 1, W)])
        .unwrap();
    let req = Request::parse(&chain, &mem, &ctx).unwrap();
    assert!(matches!(
        req.op,
        Operation::Unsupported(VIRTIO_BLK_T_DISCARD)
    ));
}

#[test]
fn one_interrupt_per_batch() {
    let file = disk_file(DISK_SECTORS);
    let mut block = block_with(&file, false, None);
    let mem = mem();
    header(&mem, HDR, VIRTIO_BLK_T_FLUSH, 0);
    let chain = vec![desc(HDR, 16, R), desc(STATUS, 1, W)];
    let (used, irqs) = run(&mut block, &mem, &[chain.clone(), chain.clone(), chain]);
    assert_eq!(used, vec![(0, 1), (2, 1), (4, 1)]);
    assert_eq!(irqs, vec![InterruptType::Queue(0)]);
}

#[test]
fn config_space_and_features() {
    let file = disk_file(DISK_SECTORS);
    let block = block_with(&file, false, None);
    assert_eq!(block.device_type(), 2);
    assert_eq!(block.queue_max_sizes(), &[QUEUE_SIZE]);
    let f = block.avail_features();
    for bit in [
        VIRTIO_F_VERSION_1,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
    ] {
        assert_ne!(f & feature(bit), 0, "feature {bit}");
    }
    assert_eq!(f & feature(VIRTIO_BLK_F_RO), 0);

    let mut cap = [0u8; 8];
    block.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), DISK_SECTORS);
    let mut word = [0u8; 4];
    block.read_config(12, &mut word);
    assert_eq!(u32::from_le_bytes(word), u32::from(QUEUE_SIZE) - 2);
    block.read_config(20, &mut word);
    assert_eq!(u32::from_le_bytes(word), 512);
    block.read_config(40, &mut word);
    assert_eq!(u32::from_le_bytes(word), MAX_DISCARD_SEG);
    // Past the end reads as zeros, never panics.
    let mut far = [0xffu8; 8];
    block.read_config(56, &mut far);
    assert_eq!(far, [1, 0, 0, 0, 0, 0, 0, 0]);
    block.read_config(u64::MAX, &mut far);
    assert_eq!(far, [0; 8]);
}

#[test]
fn memfd_backend() {
    // SAFETY: the name is a valid NUL-terminated string; memfd_create has no other inputs.
    let fd = unsafe { libc::memfd_create(c"dinv-blk-test".as_ptr(), 0) };
    assert!(fd >= 0);
    // SAFETY: `fd` was just created and is owned by nobody else.
    let mut file = unsafe { <File as std::os::unix::io::FromRawFd>::from_raw_fd(fd) };
    file.write_all(&[0x44; 4096]).unwrap();
    let mut block = Block::with_file(file, BlockConfig::new("memfd")).unwrap();
    block.ack_features(block.avail_features());
    let mem = mem();
    // Write zeroes on tmpfs needs the punch-hole / write fallback.
    header(&mem, HDR, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    segment(&mem, DATA2, 0, 4, 0);
    let (len, status) = run_one(
        &mut block,
        &mem,
        vec![desc(HDR, 16, R), desc(DATA2, 16, R), desc(STATUS, 1, W)],
    );
    assert_eq!((len, status), (1, OK));
    header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    let (len, status) = run_one(
        &mut block,
        &mem,
        vec![desc(HDR, 16, R), desc(DATA, 4096, W), desc(STATUS, 1, W)],
    );
    assert_eq!((len, status), (4097, OK));
    let mut got = [0u8; 4096];
    mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert!(got[..2048].iter().all(|&b| b == 0));
    assert!(got[2048..].iter().all(|&b| b == 0x44));
}

#[test]
fn event_loop_registers_queue_after_activation() {
    let file = disk_file(DISK_SECTORS);
    let block = Arc::new(Mutex::new(block_with(&file, false, None)));
    let mut em = EventManager::<Arc<Mutex<Block>>>::new().unwrap();
    em.add_subscriber(block.clone());
    // Nothing to do before activation (only the activate EventFd is registered).
    assert_eq!(em.run_with_timeout(0).unwrap(), 0);

    let mem = mem();
    let vq = MockSplitQueue::new(&mem, 16);
    header(&mem, HDR, VIRTIO_BLK_T_FLUSH, 0);
    let chain = vec![desc(HDR, 16, R), desc(STATUS, 1, W)];
    vq.add_desc_chains(&linked(&chain, 0), 0).unwrap();
    let irq = Arc::new(RecordingInterrupt::new());
    block
        .lock()
        .unwrap()
        .activate(ActivationContext {
            mem: mem.clone(),
            interrupt: irq.clone(),
            queues: vec![vq.create_queue().unwrap()],
        })
        .unwrap();
    // The activate event registers the queue event and drains what is already queued.
    assert_eq!(em.run_with_timeout(100).unwrap(), 1);
    assert_eq!(vq.used().idx().load(), 1);
    assert_eq!(irq.count(), 1);

    // A notification through the queue EventFd.
    vq.add_desc_chains(&linked(&chain, 2), 2).unwrap();
    block.lock().unwrap().queue_events()[0].write(1).unwrap();
    assert_eq!(em.run_with_timeout(100).unwrap(), 1);
    assert_eq!(vq.used().idx().load(), 2);
    assert_eq!(irq.count(), 2);

    // After a reset, notifications are drained and ignored.
    assert!(block.lock().unwrap().reset());
    block.lock().unwrap().queue_events()[0].write(1).unwrap();
    assert_eq!(em.run_with_timeout(100).unwrap(), 1);
    assert_eq!(vq.used().idx().load(), 2);
    assert_eq!(em.run_with_timeout(0).unwrap(), 0);
}

#[test]
fn avail_index_far_ahead_is_an_error_not_a_spin() {
    // A driver publishes an available index 100 entries ahead on a 64-entry queue: nothing can
    // be popped, and the device must return (it used to go round forever) and count it.
    let file = disk_file(16);
    let mut block = block_with(&file, false, None);
    let mem = mem();
    let vq = MockSplitQueue::new(&mem, 64);
    vq.avail().idx().store(100u16.to_le());
    let queue: Queue = vq.create_queue().unwrap();
    block.ack_features(block.avail_features());
    block
        .activate(ActivationContext { mem: mem.clone(), interrupt: Arc::new(RecordingInterrupt::new()), queues: vec![queue] })
        .unwrap();
    block.process_queue(0);
    assert_eq!(vq.used().idx().load(), 0);
    assert!(block.metrics().queue_errors.load(std::sync::atomic::Ordering::Relaxed) >= 1);
}
