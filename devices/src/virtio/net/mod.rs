//! virtio-net (virtio 1.2 §5.1): one rx/tx queue pair, no control queue, frames exchanged with a
//! [`NetBackend`] (in production the user-mode TCP/IP stack, `netstack::NetStack`).
//!
//! - [`device`]: [`Net`], the [`super::VirtioDevice`] (device ID 1, queues rx 0 / tx 1 §5.1.2,
//!   configuration `mac`, `status`, `mtu` §5.1.4) and its `event_manager::MutEventSubscriber`.
//!   Events: the internal activate EventFd (registered at `init`), then, once the guest activates
//!   the device, the two queue EventFds and the backend's fd.
//! - [`frame`]: parse-then-execute of one chain (§5.1.6): [`TxFrame::parse`] checks a tx chain
//!   (directions, bounds, the 12-byte `virtio_net_hdr_v1`) and copies header and frame out once;
//!   [`RxChain::parse`] validates an rx buffer before anything is written to it; checksum helpers
//!   for the offload fallbacks.
//!
//! Offered features: `VERSION_1`, `MAC`, `MTU`, `STATUS` (link always up), `CSUM` and
//! `GUEST_CSUM` (checksum offload both ways), `MRG_RXBUF` (a 64 KiB frame spreads over several
//! small rx buffers), `RING_EVENT_IDX`, `RING_INDIRECT_DESC`. No TSO/UFO: with the 65520-byte
//! default MTU large TCP segments already cross as single frames, and segmenting guest GSO
//! frames before the backend is not implemented, so `HOST_TSO4`/`GUEST_TSO4` are not offered.
//!
//! Checksums: a guest that negotiated `CSUM` may send frames flagged `NEEDS_CSUM` whose TCP/UDP
//! checksum holds only the pseudo-header sum. They go to the backend as they are unless it
//! [verifies checksums](NetBackend::verifies_checksums), in which case the device completes
//! them first. Frames to a guest that negotiated `GUEST_CSUM` are flagged `DATA_VALID`; if it
//! did not and the backend [leaves checksums out](NetBackend::computes_checksums), the device
//! fills IPv4 TCP/UDP checksums itself.
//!
//! The device knows nothing of IP: it moves validated frames between the queues and the
//! backend, so tests drive it with a fake backend.

pub mod device;
pub mod frame;

#[cfg(test)]
mod tests;

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

pub use device::Net;
pub use frame::{FrameError, NetHeader, RxChain, TxFrame};

/// Size of `struct virtio_net_hdr_v1` (§5.1.6): with `VERSION_1` it always has `num_buffers`.
pub const HDR_LEN: usize = 12;
/// Ethernet header length.
pub const ETH_HLEN: usize = 14;
/// Room for one 802.1Q tag on top of the MTU.
pub const VLAN_HLEN: usize = 4;
/// Default (and maximum) size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Number of queues: rx, tx (§5.1.2; no control queue, no multiqueue).
pub const NUM_QUEUES: usize = 2;
/// Index of the receive queue (device → driver frames).
pub const RX_QUEUE: usize = 0;
/// Index of the transmit queue (driver → device frames).
pub const TX_QUEUE: usize = 1;
/// Largest descriptor chain accepted, indirect tables included.
pub const MAX_DESCRIPTORS: usize = 1024;
/// Default guest MAC: `02:64:69:6e:76:0f` (locally administered, "dinv", .15 like the guest IP).
pub const DEFAULT_MAC: [u8; 6] = [0x02, 0x64, 0x69, 0x6e, 0x76, 0x0f];
/// Default MTU: large enough that a 64 KiB TCP segment is one frame.
pub const DEFAULT_MTU: u16 = 65520;
/// Smallest MTU accepted (IPv4's minimum, §5.1.4.1 requires at least 68).
pub const MIN_MTU: u16 = 68;
/// Largest MTU accepted: an untagged frame must stay within 64 KiB.
pub const MAX_MTU: u16 = u16::MAX - ETH_HLEN as u16;

/// Configuration of one virtio-net device.
#[derive(Debug)]
pub struct NetConfig {
    /// The guest's MAC address (configuration field `mac`), unicast and non-zero.
    pub mac: [u8; 6],
    /// The link MTU offered to the guest (configuration field `mtu`), [`MIN_MTU`]..=[`MAX_MTU`].
    /// Must equal the backend's MTU when it reports one.
    pub mtu: u16,
    /// Where frames go and come from.
    pub backend: Box<dyn NetBackend + Send>,
}

impl NetConfig {
    /// The default MAC and MTU over `backend`.
    pub fn with_backend(backend: Box<dyn NetBackend + Send>) -> Self {
        Self {
            mac: DEFAULT_MAC,
            mtu: DEFAULT_MTU,
            backend,
        }
    }
}

/// Errors creating a virtio-net device.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The MAC is zero or multicast.
    #[error("Invalid guest MAC {0:02x?}: must be a non-zero unicast address")]
    InvalidMac([u8; 6]),
    /// The MTU is out of range.
    #[error("Invalid MTU {0}: must be between {MIN_MTU} and {MAX_MTU}")]
    InvalidMtu(u16),
    /// The backend runs with another MTU.
    #[error("Device MTU {device} differs from the backend's MTU {backend}")]
    MtuMismatch {
        /// The device's MTU.
        device: u16,
        /// The backend's MTU.
        backend: usize,
    },
    /// Creating an EventFd failed.
    #[error("Failed to create an EventFd: {0}")]
    EventFd(#[source] io::Error),
}

/// The host side of the link: takes the guest's frames, produces frames for it.
///
/// Frames are whole ethernet frames without the virtio header. The device drives the backend
/// from its event loop: [`send_frame`](Self::send_frame) for each guest frame of a tx batch,
/// then [`poll`](Self::poll), then [`peek_frame_len`](Self::peek_frame_len) /
/// [`recv_frame`](Self::recv_frame) while the guest has rx buffers. When the guest has none the
/// device stops taking frames; the backend must not rely on being drained to make its fd quiet.
pub trait NetBackend: fmt::Debug {
    /// One frame from the guest. The backend drops (and counts) what it cannot take.
    fn send_frame(&mut self, frame: &[u8]);

    /// Length of the next frame for the guest, if any.
    fn peek_frame_len(&self) -> Option<usize>;

    /// Take the next frame for the guest.
    fn recv_frame(&mut self) -> Option<Vec<u8>>;

    /// Give a buffer from [`recv_frame`](Self::recv_frame) back for reuse.
    fn recycle_frame(&mut self, _frame: Vec<u8>) {}

    /// The fd to watch for readability (level-triggered); when readable, call
    /// [`poll`](Self::poll). `None` if the backend only moves on guest activity.
    fn fd(&self) -> Option<RawFd>;

    /// Do pending work: the fd was readable, or a batch of guest frames was handed over.
    fn poll(&mut self);

    /// Whether the backend checks TCP/UDP checksums of guest frames; if so the device completes
    /// the partial checksums of `NEEDS_CSUM` frames before handing them over.
    fn verifies_checksums(&self) -> bool {
        false
    }

    /// Whether frames for the guest carry TCP/UDP checksums; if not and the guest did not
    /// negotiate `GUEST_CSUM`, the device fills them in.
    fn computes_checksums(&self) -> bool {
        true
    }

    /// The backend's IP MTU, if it has one; [`Net::new`] refuses a different device MTU.
    fn mtu(&self) -> Option<usize> {
        None
    }
}

/// The production backend. Build it with `Config { mtu: 65520, checksums: Checksums {
/// verify_rx: false, compute_tx: false }, .. }` so that it matches the device's MTU and relies
/// on the checksum offload negotiated with the guest.
impl NetBackend for netstack::NetStack {
    fn send_frame(&mut self, frame: &[u8]) {
        self.receive_frame(frame);
    }

    fn peek_frame_len(&self) -> Option<usize> {
        netstack::NetStack::peek_frame_len(self)
    }

    fn recv_frame(&mut self) -> Option<Vec<u8>> {
        self.transmit_frame()
    }

    fn recycle_frame(&mut self, frame: Vec<u8>) {
        netstack::NetStack::recycle_frame(self, frame);
    }

    fn fd(&self) -> Option<RawFd> {
        Some(self.as_raw_fd())
    }

    fn poll(&mut self) {
        netstack::NetStack::poll(self, Instant::now());
    }

    fn verifies_checksums(&self) -> bool {
        self.config().checksums.verify_rx
    }

    fn computes_checksums(&self) -> bool {
        self.config().checksums.compute_tx
    }

    fn mtu(&self) -> Option<usize> {
        Some(self.config().mtu)
    }
}

/// Counters of one virtio-net device.
#[derive(Debug, Default)]
pub struct NetMetrics {
    /// Activations of the device.
    pub activations: AtomicU64,
    /// Queue notifications handled (both queues).
    pub queue_events: AtomicU64,
    /// Backend fd events handled.
    pub backend_events: AtomicU64,
    /// Valid frames taken from the tx queue and handed to the backend.
    pub tx_frames: AtomicU64,
    /// Bytes of those frames (virtio header excluded).
    pub tx_bytes: AtomicU64,
    /// Malformed tx chains (completed, frame dropped).
    pub tx_malformed: AtomicU64,
    /// `NEEDS_CSUM` checksums the device completed for the backend.
    pub tx_csum_completed: AtomicU64,
    /// Frames written to the rx queue.
    pub rx_frames: AtomicU64,
    /// Bytes of those frames (virtio header excluded).
    pub rx_bytes: AtomicU64,
    /// Malformed rx buffers (completed with length 0).
    pub rx_malformed: AtomicU64,
    /// Frames for the guest dropped: larger than the MTU allows, or than the guest's buffers.
    pub rx_dropped: AtomicU64,
    /// Times delivery paused because the guest had no (or too few) rx buffers.
    pub rx_starved: AtomicU64,
    /// Queue, interrupt or event-loop registration failures.
    pub queue_errors: AtomicU64,
    /// Interrupts raised.
    pub interrupts: AtomicU64,
}

impl NetMetrics {
    pub(crate) fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Read a counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
