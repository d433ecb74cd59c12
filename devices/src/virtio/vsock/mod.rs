//! virtio-vsock (virtio 1.2 §5.10, the socket device), stream sockets only.
//!
//! - [`device`]: [`Vsock`], the [`super::VirtioDevice`] (device ID 19, three queues rx / tx /
//!   event §5.10.2, configuration `guest_cid` §5.10.4) and its
//!   `event_manager::MutEventSubscriber`. Events: the internal activate EventFd (registered at
//!   `init`), then, once the guest activates the device, the three queue EventFds and every fd
//!   the backend asks for (unix listeners and connection streams).
//! - [`packet`]: parse-then-execute of one packet (§5.10.6): the 44-byte `virtio_vsock_hdr`
//!   is copied and validated once by [`TxPacket::parse`] (type STREAM, CIDs, length bounds,
//!   descriptor directions), its payload copied out; rx chains are validated by
//!   [`RxBuffer::parse`] before anything is written to them.
//! - [`unix`]: [`UnixMuxer`], the production [`VsockBackend`]: host unix sockets ⇄ guest
//!   stream connections, with the per-connection state machine and credit-based flow control
//!   (§5.10.6.3) in [`unix::connection`].
//!
//! The device knows nothing about connections: it moves validated packets between the queues
//! and a [`VsockBackend`], so tests can drive it with a fake backend.
//!
//! `virtio-bindings` 0.2 carries no `virtio_vsock.h`, so the wire constants below are defined
//! here from §5.10.6 (they match Linux's `include/uapi/linux/virtio_vsock.h`).

pub mod device;
pub mod packet;
pub mod unix;

#[cfg(test)]
mod tests;

use std::fmt;
use std::io;
use std::os::fd::{OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use event_manager::EventSet;

pub use device::Vsock;
pub use packet::{PacketError, PacketHeader, RxBuffer, TxPacket};
pub use unix::UnixMuxer;

/// The host's CID (`VMADDR_CID_HOST`, §5.10.4).
pub const HOST_CID: u64 = 2;
/// Size of `struct virtio_vsock_hdr` (§5.10.6).
pub const HDR_LEN: usize = 44;
/// Largest payload accepted from or sent to the guest in one packet.
pub const MAX_PKT_LEN: u32 = 64 * 1024;
/// Default (and maximum) size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Number of queues: rx, tx, event (§5.10.2).
pub const NUM_QUEUES: usize = 3;
/// Index of the receive queue (device → driver packets).
pub const RX_QUEUE: usize = 0;
/// Index of the transmit queue (driver → device packets).
pub const TX_QUEUE: usize = 1;
/// Index of the event queue (§5.10.6.5; the device posts one event: a transport reset after
/// a snapshot restore).
pub const EVENT_QUEUE: usize = 2;
/// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET` (§5.10.6.5): every connection is gone; the driver
/// resets its connected sockets and re-reads the guest CID.
pub const EVENT_TRANSPORT_RESET: u32 = 0;
/// Largest descriptor chain accepted, indirect tables included.
pub const MAX_DESCRIPTORS: usize = 1024;

/// `VIRTIO_VSOCK_TYPE_STREAM` (§5.10.6).
pub const TYPE_STREAM: u16 = 1;

/// Packet operations (`VIRTIO_VSOCK_OP_*`, §5.10.6).
pub mod op {
    /// `VIRTIO_VSOCK_OP_INVALID`.
    pub const INVALID: u16 = 0;
    /// `VIRTIO_VSOCK_OP_REQUEST`: connect.
    pub const REQUEST: u16 = 1;
    /// `VIRTIO_VSOCK_OP_RESPONSE`: connection accepted.
    pub const RESPONSE: u16 = 2;
    /// `VIRTIO_VSOCK_OP_RST`: connection refused or reset.
    pub const RST: u16 = 3;
    /// `VIRTIO_VSOCK_OP_SHUTDOWN`: no more data in the directions given by the flags.
    pub const SHUTDOWN: u16 = 4;
    /// `VIRTIO_VSOCK_OP_RW`: payload.
    pub const RW: u16 = 5;
    /// `VIRTIO_VSOCK_OP_CREDIT_UPDATE`: `buf_alloc` / `fwd_cnt` changed.
    pub const CREDIT_UPDATE: u16 = 6;
    /// `VIRTIO_VSOCK_OP_CREDIT_REQUEST`: please send a credit update.
    pub const CREDIT_REQUEST: u16 = 7;
}

/// `VIRTIO_VSOCK_SHUTDOWN_RCV`: the sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// `VIRTIO_VSOCK_SHUTDOWN_SEND`: the sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;

/// Configuration of the vsock device and its unix-socket muxer.
#[derive(Debug)]
pub struct VsockConfig {
    /// The guest's CID (3 ..= `u32::MAX - 1`).
    pub guest_cid: u64,
    /// Host listeners: every connection accepted on one becomes a guest stream connection to
    /// the given guest port.
    pub listeners: Vec<(UnixListener, u32)>,
    /// Host ports the guest may connect to, each forwarded to a unix socket path.
    pub host_ports: Vec<(u32, PathBuf)>,
}

/// Errors creating a vsock device.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The guest CID is reserved (0, 1, 2, `u32::MAX`) or does not fit 32 bits.
    #[error("Invalid guest CID {0}")]
    InvalidCid(u64),
    /// Two `host_ports` entries share a port.
    #[error("Host port {0} is configured twice")]
    DuplicateHostPort(u32),
    /// Making a listener non-blocking failed.
    #[error("Failed to configure a unix listener: {0}")]
    Listener(#[source] io::Error),
    /// Creating an EventFd failed.
    #[error("Failed to create an EventFd: {0}")]
    EventFd(#[source] io::Error),
}

/// A change to the set of backend fds the device's event loop watches, applied in order.
#[derive(Debug)]
pub enum FdOp {
    /// Start watching `fd` for `events`.
    Add(RawFd, EventSet),
    /// Change the events watched on `fd`.
    Modify(RawFd, EventSet),
    /// Stop watching `fd`.
    Remove(RawFd),
    /// Close this fd (after any preceding `Remove` of it was applied).
    Close(OwnedFd),
}

/// Why the backend could not take a packet now; the device retries it later.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("Backend cannot accept packets until the guest drains the rx queue")]
pub struct Backpressure;

/// The host side of the device: what the guest's packets mean, and what to send it.
///
/// The device stamps CIDs, type and length on the headers the backend returns; the backend
/// only deals in ports, operations, flags and credit.
pub trait VsockBackend: Send + fmt::Debug {
    /// The guest activated the device: start (e.g. watch listeners).
    fn activate(&mut self);

    /// The guest reset the device: drop every connection and stop watching fds.
    fn reset(&mut self);

    /// Handle one validated packet from the guest. `Err(Backpressure)` leaves the packet
    /// unconsumed; the device stops reading the tx queue until rx packets were delivered.
    fn send_pkt(&mut self, pkt: &TxPacket) -> Result<(), Backpressure>;

    /// The guest sent a malformed packet whose header could be read: reset the connection it
    /// belongs to (if any) and answer RST unless it was an RST.
    fn reject(&mut self, hdr: &PacketHeader);

    /// Whether [`Self::recv_pkt`] may produce a packet.
    fn has_pending_rx(&self) -> bool;

    /// The next packet for the guest, its payload (at most `buf.len()` bytes) written to the
    /// front of `buf`; returns the header and payload length. `None` if there is nothing.
    fn recv_pkt(&mut self, buf: &mut [u8]) -> Option<(PacketHeader, usize)>;

    /// A watched fd is ready.
    fn handle_fd_event(&mut self, fd: RawFd, events: EventSet);

    /// Take the fd watch changes accumulated since the last call.
    fn take_fd_ops(&mut self, out: &mut Vec<FdOp>);
}

/// Counters of one vsock device, shared by the device and its backend.
#[derive(Debug, Default)]
pub struct VsockMetrics {
    /// Activations of the device.
    pub activations: AtomicU64,
    /// Queue notifications handled (all queues).
    pub queue_events: AtomicU64,
    /// Backend fd events handled.
    pub fd_events: AtomicU64,
    /// Valid packets taken from the tx queue.
    pub tx_packets: AtomicU64,
    /// Payload bytes taken from the tx queue.
    pub tx_bytes: AtomicU64,
    /// Packets written to the rx queue.
    pub rx_packets: AtomicU64,
    /// Payload bytes written to the rx queue.
    pub rx_bytes: AtomicU64,
    /// Malformed tx packets or rx buffers (dropped, answered RST where it makes sense).
    pub invalid_packets: AtomicU64,
    /// RST packets queued towards the guest.
    pub rst_sent: AtomicU64,
    /// Connections established (either direction).
    pub conns_opened: AtomicU64,
    /// Connections removed (any reason).
    pub conns_closed: AtomicU64,
    /// Connections refused: no listener / host port, connect failure, or limit reached.
    pub conns_refused: AtomicU64,
    /// Guest packets that broke the protocol (credit overrun, unexpected op for the state).
    pub protocol_errors: AtomicU64,
    /// Host socket I/O errors that reset a connection.
    pub io_errors: AtomicU64,
    /// Times tx processing paused because the backend pushed back.
    pub tx_backpressure: AtomicU64,
    /// Queue, interrupt or event-loop registration failures.
    pub queue_errors: AtomicU64,
    /// Interrupts raised.
    pub interrupts: AtomicU64,
}

impl VsockMetrics {
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
