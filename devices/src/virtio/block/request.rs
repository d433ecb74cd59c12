//! Parse, then execute, one virtio-blk request (virtio 1.2 §5.2.6).
//!
//! A request is `struct { le32 type; le32 reserved; le64 sector; u8 data[]; u8 status; }`
//! laid out over a descriptor chain: device-readable descriptors first, device-writable ones
//! after, the status byte being the last byte of the last descriptor (which must therefore be
//! writable). [`Request::parse`] walks the chain once, resolves every buffer to guest memory
//! slices, copies the header (and DISCARD/WRITE_ZEROES segments) into Rust values and checks
//! direction, alignment and sector ranges with overflow-checked arithmetic.
//! [`Request::execute`] never re-reads the guest data it validated; it only moves payload
//! between the disk and the resolved slices and writes the status byte. Handles no events.

use std::mem::{offset_of, size_of};

use tracing::debug;
use virtio_bindings::virtio_blk::{
    virtio_blk_discard_write_zeroes, virtio_blk_outhdr, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, VolatileMemoryError,
    VolatileSlice,
};

use super::{
    BlockMetrics, Disk, MAX_DESCRIPTORS, MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, SECTOR_SHIFT,
    SECTOR_SIZE,
};

const HEADER_LEN: usize = size_of::<virtio_blk_outhdr>();
const SEGMENT_LEN: usize = size_of::<virtio_blk_discard_write_zeroes>();
// Length checks below use masks.
const _: () = assert!(SEGMENT_LEN.is_power_of_two() && SECTOR_SIZE.is_power_of_two());

/// Why a descriptor chain is not a valid request. Answered with `VIRTIO_BLK_S_IOERR`.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    /// The chain has no descriptors.
    #[error("Empty descriptor chain")]
    EmptyChain,
    /// The chain is longer than [`MAX_DESCRIPTORS`].
    #[error("Descriptor chain longer than {MAX_DESCRIPTORS}")]
    TooManyDescriptors,
    /// The last descriptor is not device-writable or has length 0.
    #[error("No writable status byte at the end of the chain")]
    NoStatus,
    /// A device-readable descriptor follows a device-writable one.
    #[error("Readable descriptor after a writable one")]
    ReadableAfterWritable,
    /// A buffer lies (partly) outside guest memory.
    #[error("Buffer at {addr:#x} (+{len:#x}) is outside guest memory")]
    GuestMemory {
        /// Guest physical address of the buffer.
        addr: u64,
        /// Its length.
        len: u64,
    },
    /// Fewer than 16 readable bytes for the request header.
    #[error("Request header too short ({0} bytes)")]
    HeaderTooShort(u64),
    /// Data in the direction the request type does not allow (e.g. readable data for IN).
    #[error("Request type {0} does not take {1} data")]
    WrongDirection(u32, &'static str),
    /// IN/OUT length not a multiple of the sector size.
    #[error("Data length {0} is not a multiple of 512")]
    UnalignedLength(u64),
    /// The sector range does not fit the disk (or overflows).
    #[error("Sectors {sector}+{count} beyond capacity {capacity}")]
    OutOfRange {
        /// First sector.
        sector: u64,
        /// Number of sectors.
        count: u64,
        /// Disk capacity in sectors.
        capacity: u64,
    },
    /// DISCARD/WRITE_ZEROES payload empty, not a whole number of segments, or too many.
    #[error("Bad discard/write-zeroes payload of {0} bytes")]
    BadSegments(u64),
    /// A DISCARD/WRITE_ZEROES segment larger than advertised.
    #[error("Segment of {0} sectors exceeds the advertised maximum")]
    SegmentTooLarge(u32),
    /// Splitting a guest memory slice failed.
    #[error("Guest memory slice error: {0}")]
    Slice(String),
}

impl From<VolatileMemoryError> for ParseError {
    fn from(e: VolatileMemoryError) -> Self {
        ParseError::Slice(e.to_string())
    }
}

/// What the driver negotiated and the disk size: everything parsing depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestContext {
    /// Disk capacity in sectors.
    pub capacity_sectors: u64,
    /// `VIRTIO_BLK_F_DISCARD` negotiated.
    pub discard: bool,
    /// `VIRTIO_BLK_F_WRITE_ZEROES` negotiated.
    pub write_zeroes: bool,
}

/// One DISCARD / WRITE_ZEROES range (`struct virtio_blk_discard_write_zeroes`), copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// First sector.
    pub sector: u64,
    /// Number of sectors.
    pub num_sectors: u32,
    /// `VIRTIO_BLK_WRITE_ZEROES_FLAG_*`.
    pub flags: u32,
}

/// A validated request.
#[derive(Debug)]
pub enum Operation<'a> {
    /// IN: read from byte `offset` of the disk into `bufs`.
    Read {
        /// Byte offset on the disk.
        offset: u64,
        /// Guest buffers, in order.
        bufs: Vec<VolatileSlice<'a>>,
    },
    /// OUT: write `bufs` to byte `offset` of the disk.
    Write {
        /// Byte offset on the disk.
        offset: u64,
        /// Guest buffers, in order.
        bufs: Vec<VolatileSlice<'a>>,
    },
    /// FLUSH.
    Flush,
    /// GET_ID: the serial goes into `bufs`.
    GetId {
        /// Guest buffers, in order.
        bufs: Vec<VolatileSlice<'a>>,
    },
    /// DISCARD of the given ranges.
    Discard(Vec<Segment>),
    /// WRITE_ZEROES of the given ranges.
    WriteZeroes(Vec<Segment>),
    /// A type this device does not implement (or not negotiated, or with unknown flags).
    Unsupported(u32),
}

/// A parsed request: what to do and where its status byte is.
#[derive(Debug)]
pub struct Request<'a> {
    /// The operation.
    pub op: Operation<'a>,
    status: VolatileSlice<'a>,
}

/// The outcome of a request as written to the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// `VIRTIO_BLK_S_*`.
    pub status: u8,
    /// Bytes written into the chain, status byte included (the used-ring length).
    pub used_len: u32,
}

/// Readable and writable buffers of a chain, as guest memory slices.
struct Buffers<'a> {
    readable: Vec<VolatileSlice<'a>>,
    readable_len: u64,
    writable: Vec<VolatileSlice<'a>>,
    writable_len: u64,
}

impl<'a> Request<'a> {
    /// Validate `chain` and copy its header. Nothing is written to the guest.
    pub fn parse(
        chain: &DescriptorChain<&GuestMemoryMmap>,
        mem: &'a GuestMemoryMmap,
        ctx: &RequestContext,
    ) -> Result<Self, ParseError> {
        let descs = collect(chain)?;
        let (status, bufs) = split_buffers(&descs, mem)?;
        let Buffers {
            readable,
            readable_len,
            writable,
            writable_len,
        } = bufs;

        if readable_len < HEADER_LEN as u64 {
            return Err(ParseError::HeaderTooShort(readable_len));
        }
        let (header, payload) = split_at(readable, HEADER_LEN)?;
        let mut hdr = [0u8; HEADER_LEN];
        copy_out(&header, &mut hdr);
        let req_type = le_u32(&hdr, offset_of!(virtio_blk_outhdr, type_));
        let sector = le_u64(&hdr, offset_of!(virtio_blk_outhdr, sector));
        let payload_len = readable_len - HEADER_LEN as u64;

        let no_readable = |what| {
            if payload_len != 0 {
                return Err(ParseError::WrongDirection(req_type, what));
            }
            Ok(())
        };
        let no_writable = |what| {
            if writable_len != 0 {
                return Err(ParseError::WrongDirection(req_type, what));
            }
            Ok(())
        };

        let op = match req_type {
            VIRTIO_BLK_T_IN => {
                no_readable("readable")?;
                let offset = check_range(ctx, sector, writable_len)?;
                Operation::Read {
                    offset,
                    bufs: writable,
                }
            }
            VIRTIO_BLK_T_OUT => {
                no_writable("writable")?;
                let offset = check_range(ctx, sector, payload_len)?;
                Operation::Write {
                    offset,
                    bufs: payload,
                }
            }
            VIRTIO_BLK_T_FLUSH => {
                no_readable("readable")?;
                no_writable("writable")?;
                Operation::Flush
            }
            VIRTIO_BLK_T_GET_ID => {
                no_readable("readable")?;
                Operation::GetId { bufs: writable }
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                let discard = req_type == VIRTIO_BLK_T_DISCARD;
                let negotiated = if discard {
                    ctx.discard
                } else {
                    ctx.write_zeroes
                };
                if !negotiated {
                    Operation::Unsupported(req_type)
                } else {
                    no_writable("writable")?;
                    let segments = parse_segments(ctx, &payload, payload_len)?;
                    let allowed = if discard {
                        0
                    } else {
                        VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
                    };
                    // §5.2.6.2: unknown flags (or UNMAP on DISCARD) → UNSUPP.
                    if segments.iter().any(|s| s.flags & !allowed != 0) {
                        Operation::Unsupported(req_type)
                    } else if discard {
                        Operation::Discard(segments)
                    } else {
                        Operation::WriteZeroes(segments)
                    }
                }
            }
            other => Operation::Unsupported(other),
        };
        Ok(Request { op, status })
    }

    /// Run the request against `disk`, write the status byte, and return the completion.
    pub fn execute(self, disk: &Disk, metrics: &BlockMetrics) -> Completion {
        let (status, data_len) = self.run(disk, metrics);
        let completion = Completion {
            status: status as u8,
            used_len: data_len.saturating_add(1),
        };
        write_status(&self.status, completion.status);
        completion
    }

    fn run(&self, disk: &Disk, metrics: &BlockMetrics) -> (u32, u32) {
        let io_err = |what: &str, e: std::io::Error| {
            debug!("virtio-blk: {what} failed: {e}");
            BlockMetrics::inc(&metrics.io_errors);
            (VIRTIO_BLK_S_IOERR, 0)
        };
        match &self.op {
            Operation::Read { offset, bufs } => match disk.read_at(bufs, *offset) {
                Ok(n) => {
                    BlockMetrics::inc(&metrics.reads);
                    BlockMetrics::add(&metrics.read_bytes, n);
                    // The chain is at most 2^32 bytes, and one of them is the status.
                    (VIRTIO_BLK_S_OK, u32::try_from(n).unwrap_or(u32::MAX))
                }
                Err(e) => io_err("read", e),
            },
            Operation::Write { offset, bufs } => {
                if disk.read_only() {
                    BlockMetrics::inc(&metrics.io_errors);
                    return (VIRTIO_BLK_S_IOERR, 0);
                }
                match disk.write_at(bufs, *offset) {
                    Ok(n) => {
                        BlockMetrics::inc(&metrics.writes);
                        BlockMetrics::add(&metrics.write_bytes, n);
                        (VIRTIO_BLK_S_OK, 0)
                    }
                    Err(e) => io_err("write", e),
                }
            }
            Operation::Flush => match disk.flush() {
                Ok(()) => {
                    BlockMetrics::inc(&metrics.flushes);
                    (VIRTIO_BLK_S_OK, 0)
                }
                Err(e) => io_err("flush", e),
            },
            Operation::GetId { bufs } => {
                BlockMetrics::inc(&metrics.get_ids);
                let n = copy_in(bufs, disk.id());
                (VIRTIO_BLK_S_OK, u32::try_from(n).unwrap_or(0))
            }
            Operation::Discard(segments) | Operation::WriteZeroes(segments) => {
                let discard = matches!(self.op, Operation::Discard(_));
                if disk.read_only() {
                    BlockMetrics::inc(&metrics.io_errors);
                    return (VIRTIO_BLK_S_IOERR, 0);
                }
                for s in segments {
                    let offset = s.sector << SECTOR_SHIFT;
                    let len = u64::from(s.num_sectors) << SECTOR_SHIFT;
                    let res = if discard {
                        disk.discard(offset, len)
                    } else {
                        let unmap = s.flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
                        disk.write_zeroes(offset, len, unmap)
                    };
                    if let Err(e) = res {
                        return io_err(if discard { "discard" } else { "write-zeroes" }, e);
                    }
                }
                BlockMetrics::inc(if discard {
                    &metrics.discards
                } else {
                    &metrics.write_zeroes
                });
                (VIRTIO_BLK_S_OK, 0)
            }
            Operation::Unsupported(t) => {
                debug!(req_type = t, "virtio-blk: unsupported request");
                BlockMetrics::inc(&metrics.unsupported);
                (VIRTIO_BLK_S_UNSUPP, 0)
            }
        }
    }
}

/// Answer a chain that failed to parse: write `VIRTIO_BLK_S_IOERR` to its status byte if it
/// has one. Returns the used-ring length (1 if the status was written, else 0).
pub fn complete_invalid(chain: &DescriptorChain<&GuestMemoryMmap>, mem: &GuestMemoryMmap) -> u32 {
    // The walk is bounded by the queue (or indirect table) size.
    let status = chain
        .clone()
        .last()
        .and_then(|last| status_slice(&last, mem).ok());
    match status {
        Some(slice) => {
            write_status(&slice, VIRTIO_BLK_S_IOERR as u8);
            1
        }
        None => 0,
    }
}

fn write_status(slice: &VolatileSlice<'_>, status: u8) {
    // A 1-byte slice resolved from guest memory: the write cannot be out of bounds.
    if let Err(e) = slice.write_obj(status, 0) {
        debug!("virtio-blk: failed to write status: {e}");
    }
}

fn collect(chain: &DescriptorChain<&GuestMemoryMmap>) -> Result<Vec<Descriptor>, ParseError> {
    let mut descs = Vec::new();
    for desc in chain.clone() {
        if descs.len() == MAX_DESCRIPTORS {
            return Err(ParseError::TooManyDescriptors);
        }
        descs.push(desc);
    }
    Ok(descs)
}

/// The status byte: the last byte of `last`, which must be device-writable.
fn status_slice<'a>(
    last: &Descriptor,
    mem: &'a GuestMemoryMmap,
) -> Result<VolatileSlice<'a>, ParseError> {
    if !last.is_write_only() || last.len() == 0 {
        return Err(ParseError::NoStatus);
    }
    let bad = || ParseError::GuestMemory {
        addr: last.addr().raw_value(),
        len: last.len().into(),
    };
    let addr = last
        .addr()
        .checked_add(u64::from(last.len()) - 1)
        .ok_or_else(bad)?;
    mem.get_slice(addr, 1).map_err(|_| bad())
}

fn split_buffers<'a>(
    descs: &[Descriptor],
    mem: &'a GuestMemoryMmap,
) -> Result<(VolatileSlice<'a>, Buffers<'a>), ParseError> {
    let (last, _) = descs.split_last().ok_or(ParseError::EmptyChain)?;
    let status = status_slice(last, mem)?;
    let mut bufs = Buffers {
        readable: Vec::new(),
        readable_len: 0,
        writable: Vec::new(),
        writable_len: 0,
    };
    let count = descs.len();
    let first_writable = first_writable(descs);
    for (i, desc) in descs.iter().enumerate() {
        let mut len = u64::from(desc.len());
        if i + 1 == count {
            // Exclude the status byte.
            len -= 1;
        }
        let (list, total) = if desc.is_write_only() {
            (&mut bufs.writable, &mut bufs.writable_len)
        } else {
            if i > first_writable {
                return Err(ParseError::ReadableAfterWritable);
            }
            (&mut bufs.readable, &mut bufs.readable_len)
        };
        resolve(mem, desc.addr(), len, list)?;
        // A chain carries at most 2^32 bytes; the sum cannot overflow a u64.
        *total += len;
    }
    Ok((status, bufs))
}

/// Index of the first device-writable descriptor (there is one: the status).
fn first_writable(descs: &[Descriptor]) -> usize {
    descs
        .iter()
        .position(Descriptor::is_write_only)
        .unwrap_or(descs.len())
}

/// Append the guest memory slices covering `addr..addr+len` to `out`.
fn resolve<'a>(
    mem: &'a GuestMemoryMmap,
    addr: GuestAddress,
    len: u64,
    out: &mut Vec<VolatileSlice<'a>>,
) -> Result<(), ParseError> {
    let bad = || ParseError::GuestMemory {
        addr: addr.raw_value(),
        len,
    };
    if len == 0 {
        return Ok(());
    }
    let count = usize::try_from(len).map_err(|_| bad())?;
    for slice in GuestMemoryBackend::get_slices(mem, addr, count) {
        out.push(slice.map_err(|_| bad())?);
    }
    Ok(())
}

/// Split `slices` into the first `at` bytes and the rest.
type SlicePair<'a> = (Vec<VolatileSlice<'a>>, Vec<VolatileSlice<'a>>);
fn split_at(slices: Vec<VolatileSlice<'_>>, at: usize) -> Result<SlicePair<'_>, ParseError> {
    let mut head = Vec::new();
    let mut tail = Vec::new();
    let mut rem = at;
    for s in slices {
        if rem == 0 {
            tail.push(s);
        } else if s.len() <= rem {
            rem -= s.len();
            head.push(s);
        } else {
            head.push(s.subslice(0, rem)?);
            tail.push(s.offset(rem)?);
            rem = 0;
        }
    }
    Ok((head, tail))
}

/// Copy from guest slices into `buf` (as much as fits).
fn copy_out(slices: &[VolatileSlice<'_>], buf: &mut [u8]) -> usize {
    let mut done = 0;
    for s in slices {
        if done == buf.len() {
            break;
        }
        done += s.copy_to(&mut buf[done..]);
    }
    done
}

/// Copy `data` into guest slices (as much as fits). Returns the bytes copied.
fn copy_in(slices: &[VolatileSlice<'_>], data: &[u8]) -> usize {
    let mut done = 0;
    for s in slices {
        if done == data.len() {
            break;
        }
        let n = s.len().min(data.len() - done);
        s.copy_from(&data[done..done + n]);
        done += n;
    }
    done
}

/// Check `len` bytes starting at `sector`; return the byte offset on the disk.
fn check_range(ctx: &RequestContext, sector: u64, len: u64) -> Result<u64, ParseError> {
    if len & (SECTOR_SIZE - 1) != 0 {
        return Err(ParseError::UnalignedLength(len));
    }
    check_sectors(ctx, sector, len >> SECTOR_SHIFT)?;
    // sector + count <= capacity <= file size / 512, so this cannot overflow.
    Ok(sector << SECTOR_SHIFT)
}

fn check_sectors(ctx: &RequestContext, sector: u64, count: u64) -> Result<(), ParseError> {
    match sector.checked_add(count) {
        Some(end) if end <= ctx.capacity_sectors => Ok(()),
        _ => Err(ParseError::OutOfRange {
            sector,
            count,
            capacity: ctx.capacity_sectors,
        }),
    }
}

fn parse_segments(
    ctx: &RequestContext,
    payload: &[VolatileSlice<'_>],
    len: u64,
) -> Result<Vec<Segment>, ParseError> {
    let n = len / SEGMENT_LEN as u64;
    if len == 0 || len & (SEGMENT_LEN as u64 - 1) != 0 || n > u64::from(MAX_DISCARD_SEG) {
        return Err(ParseError::BadSegments(len));
    }
    let mut raw = vec![0u8; len as usize];
    copy_out(payload, &mut raw);
    raw.chunks_exact(SEGMENT_LEN)
        .map(|b| {
            let s = Segment {
                sector: le_u64(b, offset_of!(virtio_blk_discard_write_zeroes, sector)),
                num_sectors: le_u32(b, offset_of!(virtio_blk_discard_write_zeroes, num_sectors)),
                flags: le_u32(b, offset_of!(virtio_blk_discard_write_zeroes, flags)),
            };
            if s.num_sectors > MAX_DISCARD_SECTORS {
                return Err(ParseError::SegmentTooLarge(s.num_sectors));
            }
            check_sectors(ctx, s.sector, s.num_sectors.into())?;
            Ok(s)
        })
        .collect()
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut v = [0u8; 4];
    v.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(v)
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}
