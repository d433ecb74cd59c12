//! The smoltcp `phy::Device` over the two frame queues.
//!
//! Guest→stack frames that the dispatcher hands to smoltcp wait in an [`RxQueue`]; frames smoltcp
//! emits go to the [`TxQueue`] the VMM drains with `NetStack::transmit_frame`. The TX queue is
//! bounded: when full, `transmit` returns `None` and smoltcp keeps the data in its socket buffers
//! (backpressure); the stack re-polls when the consumer has drained it below half.

use std::collections::VecDeque;

use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::time::Instant;

/// Frames waiting for smoltcp, plus recycled buffers.
#[derive(Debug, Default)]
pub struct RxQueue {
    pub frames: VecDeque<Vec<u8>>,
    free: Vec<Vec<u8>>,
}

impl RxQueue {
    /// Queues a copy of `frame`.
    pub fn push(&mut self, frame: &[u8]) {
        let mut buf = self.free.pop().unwrap_or_default();
        buf.clear();
        buf.extend_from_slice(frame);
        self.frames.push_back(buf);
    }
}

/// Frames for the guest.
#[derive(Debug)]
pub struct TxQueue {
    frames: VecDeque<Vec<u8>>,
    free: Vec<Vec<u8>>,
    limit: usize,
    /// Set when a producer found the queue full; cleared when drained below half.
    stalled: bool,
}

impl TxQueue {
    /// An empty queue holding at most `limit` frames.
    pub fn new(limit: usize) -> Self {
        Self {
            frames: VecDeque::new(),
            free: Vec::new(),
            limit: limit.max(2),
            stalled: false,
        }
    }

    /// Whether another frame fits; records a stall if not.
    pub fn has_room(&mut self) -> bool {
        if self.frames.len() >= self.limit {
            self.stalled = true;
            false
        } else {
            true
        }
    }

    /// A buffer for a new frame.
    pub fn buffer(&mut self, len: usize) -> Vec<u8> {
        let mut buf = self.free.pop().unwrap_or_default();
        buf.clear();
        buf.resize(len, 0);
        buf
    }

    /// Queues a frame.
    pub fn push(&mut self, frame: Vec<u8>) {
        self.frames.push_back(frame);
    }

    /// Takes the oldest frame; the flag tells whether a stall just ended (re-poll needed).
    pub fn pop(&mut self) -> Option<(Vec<u8>, bool)> {
        let frame = self.frames.pop_front()?;
        let unstalled = self.stalled && self.frames.len() <= self.limit / 2;
        if unstalled {
            self.stalled = false;
        }
        Some((frame, unstalled))
    }

    /// Length of the oldest frame.
    pub fn peek_len(&self) -> Option<usize> {
        self.frames.front().map(Vec::len)
    }

    /// Whether the queue is at its limit.
    pub fn is_full(&self) -> bool {
        self.frames.len() >= self.limit
    }

    /// Number of queued frames.
    pub fn len(&self) -> usize {
        self.frames.len()
    }

    /// Returns a frame buffer for reuse.
    pub fn recycle(&mut self, mut buf: Vec<u8>) {
        if self.free.len() < 64 {
            buf.clear();
            self.free.push(buf);
        }
    }
}

/// The device smoltcp polls: borrows the queues for one `poll` call.
#[derive(Debug)]
pub struct QueueDevice<'a> {
    pub rx: &'a mut RxQueue,
    pub tx: &'a mut TxQueue,
    pub caps: &'a DeviceCapabilities,
    /// Ignore the TX limit (used to inject one held SYN whatever the queue state).
    pub force: bool,
}

/// A received frame; the buffer goes back to the RX free list after use.
#[derive(Debug)]
pub struct RxToken<'a> {
    frame: Vec<u8>,
    free: &'a mut Vec<Vec<u8>>,
}

/// Permission to queue one frame for the guest.
#[derive(Debug)]
pub struct TxToken<'a> {
    tx: &'a mut TxQueue,
}

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        let r = f(&self.frame);
        if self.free.len() < 64 {
            self.free.push(self.frame);
        }
        r
    }
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut buf = self.tx.buffer(len);
        let r = f(&mut buf);
        self.tx.push(buf);
        r
    }
}

impl phy::Device for QueueDevice<'_> {
    type RxToken<'b>
        = RxToken<'b>
    where
        Self: 'b;
    type TxToken<'b>
        = TxToken<'b>
    where
        Self: 'b;

    fn receive(&mut self, _: Instant) -> Option<(RxToken<'_>, TxToken<'_>)> {
        // A reply needs room too; leave the frame queued until there is.
        if !self.force && !self.tx.has_room() {
            return None;
        }
        let frame = self.rx.frames.pop_front()?;
        Some((
            RxToken {
                frame,
                free: &mut self.rx.free,
            },
            TxToken { tx: self.tx },
        ))
    }

    fn transmit(&mut self, _: Instant) -> Option<TxToken<'_>> {
        if !self.force && !self.tx.has_room() {
            return None;
        }
        Some(TxToken { tx: self.tx })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        self.caps.clone()
    }
}

/// Device capabilities for an ethernet link of IP MTU `mtu`.
pub fn capabilities(mtu: usize, compute_tx: bool) -> DeviceCapabilities {
    let mut caps = DeviceCapabilities::default();
    caps.medium = Medium::Ethernet;
    caps.max_transmission_unit = mtu + 14;
    caps.max_burst_size = None;
    // Guest frames are verified once by the dispatcher (frame.rs), never again by smoltcp, so
    // every checksum is "compute on TX only". Offload covers TCP/UDP only: IPv4 headers and ICMP
    // always carry a checksum.
    let l4 = if compute_tx {
        phy::Checksum::Tx
    } else {
        phy::Checksum::None
    };
    caps.checksum.ipv4 = phy::Checksum::Tx;
    caps.checksum.icmpv4 = phy::Checksum::Tx;
    caps.checksum.tcp = l4;
    caps.checksum.udp = l4;
    caps
}
