//! virtio-blk over a raw (possibly sparse) file, virtio 1.2 §5.2.
//!
//! - [`device`]: [`Block`], the [`super::VirtioDevice`] (features, configuration layout
//!   §5.2.4) and its `event_manager::MutEventSubscriber`. Events: the internal activate
//!   EventFd (registered at `init`), then, once the guest activates the device, the queue
//!   EventFd (the transport's `QueueNotify`, usually a KVM ioeventfd).
//! - [`request`]: parse-then-execute of one request (§5.2.6): the chain is validated and the
//!   header copied once by [`Request::parse`], then [`Request::execute`] moves data between
//!   the file and guest memory. Malformed chains complete with `VIRTIO_BLK_S_IOERR` (or with
//!   a zero-length used entry when there is no writable status byte) and are counted.
//! - [`disk`]: positional I/O, `fdatasync`, and hole punching for DISCARD / WRITE_ZEROES so
//!   sparse images stay sparse.
//!
//! Supported requests: IN, OUT, FLUSH, GET_ID, DISCARD and WRITE_ZEROES (the last two not on
//! read-only disks); everything else answers `VIRTIO_BLK_S_UNSUPP`.

pub mod device;
pub mod disk;
pub mod request;

#[cfg(test)]
mod tests;

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

pub use device::Block;
pub use disk::Disk;
pub use request::{Completion, Operation, ParseError, Request, RequestContext, Segment};

/// log2 of the virtio-blk sector size.
pub const SECTOR_SHIFT: u32 = 9;
/// virtio-blk sectors are always 512 bytes (§5.2.6).
pub const SECTOR_SIZE: u64 = 1 << SECTOR_SHIFT;
/// Default (and maximum) queue size.
pub const QUEUE_SIZE: u16 = 256;
/// Largest descriptor chain accepted, indirect tables included.
pub const MAX_DESCRIPTORS: usize = 1024;
/// `max_discard_sectors` / `max_write_zeroes_sectors` advertised (4 GiB - 512).
pub const MAX_DISCARD_SECTORS: u32 = u32::MAX >> SECTOR_SHIFT;
/// `max_discard_seg` / `max_write_zeroes_seg` advertised.
pub const MAX_DISCARD_SEG: u32 = 32;
/// `discard_sector_alignment` advertised (4 KiB, the host page / fs block size).
pub const DISCARD_SECTOR_ALIGNMENT: u32 = 8;

/// Configuration of one virtio-blk device.
#[derive(Debug, Clone)]
pub struct BlockConfig {
    /// The raw disk image.
    pub path: PathBuf,
    /// Open read-only and offer `VIRTIO_BLK_F_RO`.
    pub read_only: bool,
    /// Serial returned by GET_ID (at most 20 bytes); derived from the file if `None`.
    pub id: Option<String>,
    /// Queue size, a power of two up to [`QUEUE_SIZE`]; 0 means [`QUEUE_SIZE`].
    pub queue_size: u16,
}

impl BlockConfig {
    /// A read-write disk at `path` with default settings.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            read_only: false,
            id: None,
            queue_size: QUEUE_SIZE,
        }
    }
}

/// Errors creating a block device.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// Opening the backing file failed.
    #[error("Failed to open disk image {path}: {source}")]
    Open {
        /// The image path.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// Reading the backing file's metadata failed.
    #[error("Failed to stat disk image: {0}")]
    Metadata(#[source] io::Error),
    /// The serial is longer than `VIRTIO_BLK_ID_BYTES`.
    #[error("Disk id is {0} bytes, the maximum is 20")]
    IdTooLong(usize),
    /// The queue size is not a power of two in 1..=[`QUEUE_SIZE`].
    #[error("Invalid queue size {0}")]
    QueueSize(u16),
    /// Creating an EventFd failed.
    #[error("Failed to create an EventFd: {0}")]
    EventFd(#[source] io::Error),
}

/// Counters of one block device, shared with whoever wants to report them.
#[derive(Debug, Default)]
pub struct BlockMetrics {
    /// Queue notifications handled.
    pub queue_events: AtomicU64,
    /// Activations of the device.
    pub activations: AtomicU64,
    /// Successful reads.
    pub reads: AtomicU64,
    /// Bytes read from the disk.
    pub read_bytes: AtomicU64,
    /// Successful writes.
    pub writes: AtomicU64,
    /// Bytes written to the disk.
    pub write_bytes: AtomicU64,
    /// Successful flushes.
    pub flushes: AtomicU64,
    /// GET_ID requests.
    pub get_ids: AtomicU64,
    /// Successful discards.
    pub discards: AtomicU64,
    /// Successful write-zeroes.
    pub write_zeroes: AtomicU64,
    /// Requests answered `VIRTIO_BLK_S_UNSUPP`.
    pub unsupported: AtomicU64,
    /// Malformed descriptor chains (answered IOERR or with a zero-length used entry).
    pub invalid_requests: AtomicU64,
    /// Well-formed requests that failed on the host (IOERR).
    pub io_errors: AtomicU64,
    /// Queue or interrupt failures (guest rings unreadable, irqfd write failed, …).
    pub queue_errors: AtomicU64,
    /// Interrupts raised.
    pub interrupts: AtomicU64,
}

impl BlockMetrics {
    pub(crate) fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}
