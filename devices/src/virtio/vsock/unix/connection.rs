//! One guest stream connection bridged to a host unix stream: the connection state machine
//! and credit-based flow control of virtio 1.2 §5.10.6.3 (stream sockets) as seen from the
//! host.
//!
//! Directions are named from the host: *to the guest* (read from the unix stream, sent as RW
//! packets, bounded by the guest's credit `peer_buf_alloc - (tx_cnt - peer_fwd_cnt)`) and
//! *from the guest* (RW payload buffered until written to the unix stream, bounded by our
//! advertised [`CONN_BUF_ALLOC`]; `fwd_cnt` counts bytes written out).
//!
//! The connection never blocks: the muxer calls [`Connection::on_readable`] /
//! [`Connection::on_writable`] on epoll readiness, [`Connection::handle_pkt`] for guest
//! packets, and [`Connection::next_pkt`] when the guest has an rx buffer. Host → guest data
//! is read from the stream only then, straight into the packet, so nothing is buffered on
//! that side. Each returns a [`Verdict`]; the muxer removes the connection on `Rst`/`Gone`.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;

use event_manager::EventSet;
use tracing::debug;

use crate::virtio::vsock::{op, PacketHeader, TxPacket, SHUTDOWN_RCV, SHUTDOWN_SEND};

/// Receive buffer advertised to the guest for each connection (`buf_alloc`).
pub const CONN_BUF_ALLOC: u32 = 256 * 1024;
/// Bytes forwarded since the last report that trigger an explicit CREDIT_UPDATE.
pub const CREDIT_UPDATE_THRESHOLD: u32 = CONN_BUF_ALLOC / 4;

/// What the muxer must do with a connection after an operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Keep it.
    Keep,
    /// Remove it and send the guest an RST (error, or orderly close of both directions).
    Rst,
    /// Remove it silently (the guest reset it).
    Gone,
}

/// Where the connection stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Host-initiated: REQUEST sent (or pending), waiting for the guest's RESPONSE.
    Connecting,
    /// Data may flow.
    Established,
}

/// Control packets waiting for an rx buffer.
#[derive(Debug, Default, Clone, Copy)]
struct Pending {
    request: bool,
    response: bool,
    credit_update: bool,
    credit_request: bool,
    /// SHUTDOWN flags not yet sent.
    shutdown: u32,
}

impl Pending {
    fn any(&self) -> bool {
        self.request
            || self.response
            || self.credit_update
            || self.credit_request
            || self.shutdown != 0
    }
}

/// The next packet a connection has for the guest.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// A packet with `usize` payload bytes at the front of the caller's buffer.
    Pkt(PacketHeader, usize),
    /// Nothing to send now.
    Nothing,
    /// The connection must be reset.
    Rst,
}

/// A guest stream connection bridged to a host unix stream.
#[derive(Debug)]
pub struct Connection {
    stream: UnixStream,
    local_port: u32,
    peer_port: u32,
    state: State,
    pending: Pending,
    /// SHUTDOWN flags the guest sent.
    peer_shutdown: u32,
    /// The stream may have data (readiness seen, no EAGAIN since).
    readable: bool,
    /// Read returned EOF: the host peer sends no more.
    stream_eof: bool,
    /// Our write side of the stream is shut (guest sent SHUTDOWN SEND and we flushed).
    stream_write_shut: bool,
    /// Bytes sent to the guest (wrapping).
    tx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// A CREDIT_REQUEST went out and no credit information came back since.
    credit_requested: bool,
    /// Guest → host bytes not yet written to the stream.
    buf: VecDeque<u8>,
    /// Bytes received from the guest (wrapping).
    rx_cnt: u32,
    /// Bytes written to the stream (wrapping).
    fwd_cnt: u32,
    /// `fwd_cnt` as last told to the guest.
    last_fwd_cnt_sent: u32,
    /// Events currently registered with the event loop (`None`: not registered).
    pub(super) registered: Option<EventSet>,
    /// In the muxer's rx queue.
    pub(super) queued: bool,
}

impl Connection {
    /// A connection accepted on a host listener: REQUEST to the guest's `peer_port`.
    pub fn new_local(stream: UnixStream, local_port: u32, peer_port: u32) -> Self {
        let mut c = Self::new(stream, local_port, peer_port, State::Connecting);
        c.pending.request = true;
        c
    }

    /// A guest REQUEST (`hdr`) whose host socket connected: RESPONSE to the guest.
    pub fn new_peer(stream: UnixStream, hdr: &PacketHeader) -> Self {
        let mut c = Self::new(stream, hdr.dst_port, hdr.src_port, State::Established);
        c.update_peer_credit(hdr);
        c.pending.response = true;
        c
    }

    fn new(stream: UnixStream, local_port: u32, peer_port: u32, state: State) -> Self {
        Connection {
            stream,
            local_port,
            peer_port,
            state,
            pending: Pending::default(),
            peer_shutdown: 0,
            readable: false,
            stream_eof: false,
            stream_write_shut: false,
            tx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            credit_requested: false,
            buf: VecDeque::new(),
            rx_cnt: 0,
            fwd_cnt: 0,
            last_fwd_cnt_sent: 0,
            registered: None,
            queued: false,
        }
    }

    /// The unix stream.
    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Give up the unix stream (to close it after deregistering it).
    pub fn into_stream(self) -> UnixStream {
        self.stream
    }

    /// The connection state.
    pub fn state(&self) -> State {
        self.state
    }

    /// Guest → host bytes waiting for the stream.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// How many bytes the guest can take now.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn update_peer_credit(&mut self, hdr: &PacketHeader) {
        if hdr.buf_alloc != self.peer_buf_alloc || hdr.fwd_cnt != self.peer_fwd_cnt {
            self.credit_requested = false;
        }
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = hdr.fwd_cnt;
    }

    /// Whether host → guest data may still flow.
    fn can_send_data(&self) -> bool {
        self.state == State::Established
            && !self.stream_eof
            && self.peer_shutdown & SHUTDOWN_RCV == 0
    }

    /// The epoll events this connection needs now (empty: do not watch it).
    pub fn interest(&self) -> EventSet {
        let mut set = EventSet::empty();
        if self.can_send_data() && !self.readable {
            set |= EventSet::IN;
        }
        if !self.buf.is_empty() {
            set |= EventSet::OUT;
        }
        set
    }

    /// Whether [`Self::next_pkt`] may produce a packet.
    pub fn wants_rx(&self) -> bool {
        self.pending.any()
            || (self.can_send_data()
                && self.readable
                && (self.peer_credit() > 0 || !self.credit_requested))
    }

    /// The stream became readable (or hung up).
    pub fn on_readable(&mut self) {
        self.readable = true;
    }

    /// The stream became writable: flush buffered guest data.
    pub fn on_writable(&mut self) -> Verdict {
        if let Err(e) = self.flush() {
            debug!(
                self.local_port,
                self.peer_port, "virtio-vsock: write failed: {e}"
            );
            return Verdict::Rst;
        }
        self.after_forward()
    }

    /// A packet from the guest for this connection.
    pub fn handle_pkt(&mut self, pkt: &TxPacket) -> Result<Verdict, ProtocolError> {
        let hdr = &pkt.hdr;
        if hdr.op == op::RST {
            return Ok(Verdict::Gone);
        }
        self.update_peer_credit(hdr);
        match (self.state, hdr.op) {
            (State::Connecting, op::RESPONSE) => {
                self.state = State::Established;
                Ok(Verdict::Keep)
            }
            (State::Connecting, other) => Err(ProtocolError::UnexpectedOp(other)),
            (State::Established, op::RW) => self.handle_rw(&pkt.data),
            (State::Established, op::SHUTDOWN) => {
                self.peer_shutdown |= hdr.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND);
                Ok(self.after_forward())
            }
            (State::Established, op::CREDIT_UPDATE) => Ok(Verdict::Keep),
            (State::Established, op::CREDIT_REQUEST) => {
                self.pending.credit_update = true;
                Ok(Verdict::Keep)
            }
            (State::Established, other) => Err(ProtocolError::UnexpectedOp(other)),
        }
    }

    fn handle_rw(&mut self, data: &[u8]) -> Result<Verdict, ProtocolError> {
        if self.peer_shutdown & SHUTDOWN_SEND != 0 {
            return Err(ProtocolError::DataAfterShutdown);
        }
        let buffered = self.rx_cnt.wrapping_sub(self.fwd_cnt);
        // data.len() <= MAX_PKT_LEN.
        let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
        if buffered.saturating_add(len) > CONN_BUF_ALLOC {
            return Err(ProtocolError::CreditOverrun);
        }
        self.rx_cnt = self.rx_cnt.wrapping_add(len);
        let mut rest = data;
        if self.buf.is_empty() && !self.stream_write_shut {
            match self.stream.write(data) {
                Ok(n) => {
                    rest = data.get(n..).unwrap_or_default();
                    self.forwarded(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    debug!(
                        self.local_port,
                        self.peer_port, "virtio-vsock: write failed: {e}"
                    );
                    return Ok(Verdict::Rst);
                }
            }
        }
        self.buf.extend(rest);
        Ok(self.after_forward())
    }

    fn forwarded(&mut self, n: usize) {
        // n <= CONN_BUF_ALLOC.
        self.fwd_cnt = self
            .fwd_cnt
            .wrapping_add(u32::try_from(n).unwrap_or(u32::MAX));
    }

    /// Write out as much buffered data as the stream takes.
    fn flush(&mut self) -> io::Result<()> {
        while !self.buf.is_empty() {
            let (front, _) = self.buf.as_slices();
            match self.stream.write(front) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.buf.drain(..n);
                    self.forwarded(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// After guest data moved or shutdown flags changed: credit update, half-close, close.
    fn after_forward(&mut self) -> Verdict {
        if self.fwd_cnt.wrapping_sub(self.last_fwd_cnt_sent) >= CREDIT_UPDATE_THRESHOLD {
            self.pending.credit_update = true;
        }
        if !self.buf.is_empty() {
            return Verdict::Keep;
        }
        let guest_done_sending = self.peer_shutdown & SHUTDOWN_SEND != 0;
        if guest_done_sending && !self.stream_write_shut {
            // Half-close: the host peer reads EOF. It may have gone already.
            if let Err(e) = self.stream.shutdown(Shutdown::Write) {
                debug!("virtio-vsock: shutdown(write) failed: {e}");
            }
            self.stream_write_shut = true;
        }
        let to_guest_done = self.stream_eof || self.peer_shutdown & SHUTDOWN_RCV != 0;
        if guest_done_sending && to_guest_done {
            // Both directions are finished: close. RST tells the guest we are gone.
            return Verdict::Rst;
        }
        Verdict::Keep
    }

    fn header(&mut self, op: u16) -> PacketHeader {
        self.last_fwd_cnt_sent = self.fwd_cnt;
        self.pending.credit_update = false;
        PacketHeader {
            src_port: self.local_port,
            dst_port: self.peer_port,
            op,
            buf_alloc: CONN_BUF_ALLOC,
            fwd_cnt: self.fwd_cnt,
            ..PacketHeader::default()
        }
    }

    /// The next packet for the guest; RW payload is read from the stream into `buf`.
    pub fn next_pkt(&mut self, buf: &mut [u8]) -> Next {
        if std::mem::take(&mut self.pending.request) {
            return Next::Pkt(self.header(op::REQUEST), 0);
        }
        if std::mem::take(&mut self.pending.response) {
            return Next::Pkt(self.header(op::RESPONSE), 0);
        }
        if self.can_send_data() && self.readable {
            match self.read_data(buf) {
                Ok(Some(n)) => return Next::Pkt(self.header(op::RW), n),
                Ok(None) => {}
                Err(e) => {
                    debug!(
                        self.local_port,
                        self.peer_port, "virtio-vsock: read failed: {e}"
                    );
                    return Next::Rst;
                }
            }
            if self.stream_eof && self.after_forward() == Verdict::Rst {
                return Next::Rst;
            }
        }
        if std::mem::take(&mut self.pending.credit_request) {
            return Next::Pkt(self.header(op::CREDIT_REQUEST), 0);
        }
        if self.pending.shutdown != 0 {
            let flags = std::mem::take(&mut self.pending.shutdown);
            let mut hdr = self.header(op::SHUTDOWN);
            hdr.flags = flags;
            return Next::Pkt(hdr, 0);
        }
        if self.pending.credit_update {
            return Next::Pkt(self.header(op::CREDIT_UPDATE), 0);
        }
        Next::Nothing
    }

    /// Read at most the guest's credit. `Ok(None)`: nothing read (EAGAIN, EOF, or no credit;
    /// the matching state is updated).
    fn read_data(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        let credit = usize::try_from(self.peer_credit()).unwrap_or(usize::MAX);
        if credit == 0 {
            if !self.credit_requested {
                self.credit_requested = true;
                self.pending.credit_request = true;
            }
            return Ok(None);
        }
        let want = credit.min(buf.len());
        let Some(dst) = buf.get_mut(..want) else {
            return Ok(None);
        };
        if dst.is_empty() {
            return Ok(None);
        }
        loop {
            return match self.stream.read(dst) {
                Ok(0) => {
                    self.stream_eof = true;
                    self.readable = false;
                    self.pending.shutdown |= SHUTDOWN_SEND;
                    Ok(None)
                }
                Ok(n) => {
                    // n <= credit <= u32::MAX.
                    self.tx_cnt = self
                        .tx_cnt
                        .wrapping_add(u32::try_from(n).unwrap_or(u32::MAX));
                    Ok(Some(n))
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.readable = false;
                    Ok(None)
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => Err(e),
            };
        }
    }
}

/// A guest packet that breaks the protocol for the connection's state. Answered with RST.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// An operation not valid in the current state.
    #[error("Unexpected operation {0}")]
    UnexpectedOp(u16),
    /// More data than the credit we advertised.
    #[error("Guest exceeded its credit")]
    CreditOverrun,
    /// RW after the guest shut down its sending side.
    #[error("Data after SHUTDOWN(SEND)")]
    DataAfterShutdown,
}
