//! virtio-9p: the "9P transport" device (virtio device ID 9), exporting one host directory
//! through the in-process 9P2000.L server of the `p9` crate.
//!
//! The device is thin (crosvm/rust-p9 style): one request queue; every descriptor chain is
//! one T-message (its device-readable part) plus room for the R-message (its device-writable
//! part). The chain's [`virtio_queue::Reader`]/[`virtio_queue::Writer`], which copy straight
//! from/to the guest buffers, are handed to [`p9::Server::handle_message`]; the used length
//! is the size of the R-message.
//!
//! - [`device`]: [`P9Device`], the [`super::VirtioDevice`] (feature `VIRTIO_9P_MOUNT_TAG`,
//!   configuration space `struct virtio_9p_config { le16 tag_len; u8 tag[tag_len]; }`) and its
//!   `event_manager::MutEventSubscriber`. Events: the internal activate EventFd (registered at
//!   `init`), then, once the guest activates the device, the queue EventFd and the worker
//!   pool's completion EventFd.
//! - [`direct`]: [`direct::ChainIo`], the chain's guest buffers as iovecs: `Twrite` payloads
//!   and `Rread` data move between host files and guest memory with one `pwritev`/`preadv`.
//! - [`worker`]: the worker pool. Filesystem calls block (fsync, large reads), so the event
//!   loop only pops chains and queues them; N worker threads serve them concurrently and hand
//!   `(head, len)` back through a list plus an EventFd; the event loop adds the used entries
//!   and raises one interrupt per batch.
//!
//! Malformed chains (no writable part, a readable part shorter than a 9P header, buffers
//! outside guest memory, a reply that does not fit) complete with a zero-length used entry
//! and are counted; a well-framed but bad T-message is answered by the server with an
//! `Rlerror`. A reset stops new work at once, drops completions of the old activation, and
//! starts a fresh 9P session (a new [`p9::Server`] with an empty fid table).

pub mod device;
pub mod direct;
pub mod worker;

#[cfg(test)]
mod tests;

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

pub use device::P9Device;

/// Feature bit: the configuration space holds a mount tag (virtio 1.2 §5.7.3).
/// `virtio-bindings` 0.2 has no `virtio_9p` module, hence the local constant.
pub const VIRTIO_9P_MOUNT_TAG: u32 = 0;
/// Queue size. The Linux driver submits each request as one indirect descriptor whose
/// table holds its whole scatter list: up to 128 entries in stock kernels (msize 512000),
/// 1027 in dinv's guest kernel (patch 0006: msize 4 MiB = 1024 pages + 3). A chain may not
/// be longer than the queue (virtio 1.2 §2.7.5.3.1), hence 2048 (split rings are a power
/// of two). The guest allocates ~56 KiB for a ring this size.
pub const QUEUE_SIZE: u16 = 2048;
/// Longest mount tag: `tag_len` is a 16-bit field.
pub const MAX_TAG_LEN: usize = u16::MAX as usize;
/// Worker threads when [`P9Config::workers`] is 0.
pub const DEFAULT_WORKERS: usize = 4;
/// Most worker threads per device.
pub const MAX_WORKERS: usize = 64;

/// Configuration of one virtio-9p device (one export, one guest mount).
#[derive(Debug, Clone)]
pub struct P9Config {
    /// The mount tag the guest names in `mount -t 9p <tag> <dir>`; dinv uses the guest path.
    /// Non-empty, at most [`MAX_TAG_LEN`] bytes, no NUL.
    pub tag: String,
    /// The 9P server: export root, read-only, msize limit, ownership policy.
    pub server: p9::Config,
    /// Worker threads serving requests; 0 means [`DEFAULT_WORKERS`].
    pub workers: usize,
}

impl P9Config {
    /// Export `root` read-write under `tag` with the default worker count.
    pub fn new(tag: impl Into<String>, root: impl Into<std::path::PathBuf>) -> Self {
        Self {
            tag: tag.into(),
            server: p9::Config::new(root),
            workers: DEFAULT_WORKERS,
        }
    }
}

/// Errors creating a virtio-9p device.
#[derive(Debug, thiserror::Error)]
pub enum P9Error {
    /// The mount tag is empty.
    #[error("Mount tag is empty")]
    EmptyTag,
    /// The mount tag does not fit the 16-bit `tag_len`.
    #[error("Mount tag is {0} bytes, the maximum is 65535")]
    TagTooLong(usize),
    /// The mount tag contains a NUL byte.
    #[error("Mount tag contains a NUL byte")]
    TagNul,
    /// Too many worker threads requested.
    #[error("{0} worker threads requested, the maximum is {MAX_WORKERS}")]
    Workers(usize),
    /// The 9P server cannot export the directory.
    #[error("Cannot export the directory: {0}")]
    Server(#[source] p9::Error),
    /// Creating an EventFd failed.
    #[error("Failed to create an EventFd: {0}")]
    EventFd(#[source] io::Error),
}

/// Counters of one virtio-9p device.
#[derive(Debug, Default)]
pub struct P9Metrics {
    /// Queue notifications handled.
    pub queue_events: AtomicU64,
    /// Activations of the device.
    pub activations: AtomicU64,
    /// Chains handed to the worker pool.
    pub requests: AtomicU64,
    /// Requests answered with an R-message (`Rlerror` included).
    pub replies: AtomicU64,
    /// Bytes of T-messages read from the guest.
    pub request_bytes: AtomicU64,
    /// Bytes of R-messages written to the guest.
    pub reply_bytes: AtomicU64,
    /// Malformed chains (completed with a zero-length used entry).
    pub invalid_requests: AtomicU64,
    /// Completions dropped because the device was reset while they were in flight.
    pub stale_completions: AtomicU64,
    /// Queue or interrupt failures (guest rings unreadable, irqfd write failed, …).
    pub queue_errors: AtomicU64,
    /// Interrupts raised.
    pub interrupts: AtomicU64,
}

impl P9Metrics {
    pub(crate) fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// Check a mount tag: non-empty, fits `tag_len`, no NUL (the driver copies it as a C string).
pub fn validate_tag(tag: &str) -> Result<(), P9Error> {
    if tag.is_empty() {
        return Err(P9Error::EmptyTag);
    }
    if tag.len() > MAX_TAG_LEN {
        return Err(P9Error::TagTooLong(tag.len()));
    }
    if tag.as_bytes().contains(&0) {
        return Err(P9Error::TagNul);
    }
    Ok(())
}
