//! User-mode TCP/IP for dinv guests: the guest's ethernet frames are terminated inside the VMM
//! process by a [smoltcp] gateway, and every guest TCP connection, UDP flow (DNS included) and
//! ICMP echo becomes an ordinary host socket (NAT). Port forwards relay host listeners to the
//! guest. No TAP device, no privileges, no threads.
//!
//! # Driving it from an event loop
//!
//! ```no_run
//! # use std::os::fd::AsRawFd;
//! # use std::time::Instant;
//! # fn guest_tx_frames() -> Vec<Vec<u8>> { vec![] }
//! # fn guest_rx_has_room(_: usize) -> bool { true }
//! # fn deliver_to_guest(_: &[u8]) {}
//! let mut net = netstack::NetStack::new(netstack::Config::default())?;
//! let fd = net.as_raw_fd(); // add to the VMM's epoll set (level-triggered, readable)
//! # let _ = fd;
//! // On any of: guest TX queue notification, `fd` readable, guest RX buffers refilled:
//! for frame in guest_tx_frames() {
//!     net.receive_frame(&frame); // parse + dispatch, cheap
//! }
//! net.poll(Instant::now()); // host sockets, smoltcp, timers
//! while let Some(len) = net.peek_frame_len() {
//!     if !guest_rx_has_room(len) {
//!         break; // the stack wakes `fd` again once drained below half
//!     }
//!     let frame = net.transmit_frame().unwrap();
//!     deliver_to_guest(&frame);
//!     net.recycle_frame(frame);
//! }
//! # Ok::<(), netstack::Error>(())
//! ```
//!
//! The single fd ([`NetStack`] implements `AsRawFd`) is an epoll set holding every host socket,
//! an internal timerfd armed at smoltcp's and the NAT's next deadline, and an eventfd signalled
//! when the guest-bound queue drains; whenever it is readable, call [`NetStack::poll`]. Frames
//! may be queued by `receive_frame` at any time; they are processed by the next `poll`.
//! [`NetStack::poll_delay`] reports the next deadline for loops that prefer their own timer.
//!
//! # Addresses
//!
//! See [`config`] for the default layout (`10.234.0.0/24`: gateway `.1`, host loopback alias
//! `.2`, DNS `.3`, guest `.15`), [`config::parse_port_list`] for `DINV_TCP_PORTS` /
//! `DINV_UDP_PORTS`, and [`config::check_host_routes`] for the subnet overlap check.
//!
//! # Checksum offload
//!
//! With [`Checksums`] `{ verify_rx: false, compute_tx: false }` guest TCP/UDP checksums are not
//! verified and frames to the guest carry none: a virtio-net device that negotiated
//! `VIRTIO_NET_F_CSUM`/`VIRTIO_NET_F_GUEST_CSUM` must mark them `VIRTIO_NET_HDR_F_DATA_VALID`.
//!
//! # Limits
//!
//! IPv4 only (IPv6 frames are counted as ignored); IPv4 fragments from the guest are dropped;
//! UDP replies larger than the MTU are dropped.

pub mod config;
mod device;
pub mod frame;
pub mod nat;
mod stack;
mod sys;

use std::io;
use std::net::SocketAddr;

pub use config::{
    parse_port_list, Checksums, Config, ConfigError, Ipv4Subnet, Limits, PortForward,
};
pub use stack::{NetStack, Stats};

/// Errors from [`NetStack::new`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A port-forward listener could not be bound.
    #[error("Cannot listen on {proto} {addr}: {source}")]
    Bind {
        /// "TCP" or "UDP".
        proto: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: io::Error,
    },
    /// A system call needed to set up the stack failed.
    #[error("{what} failed: {source}")]
    Io {
        /// The call.
        what: &'static str,
        /// The OS error.
        source: io::Error,
    },
}
