//! Parse, then execute, one virtio-vsock packet (virtio 1.2 §5.10.6).
//!
//! A packet is `struct virtio_vsock_hdr` (44 bytes, little-endian, packed) followed by `len`
//! payload bytes. On the tx queue the whole chain is device-readable; on the rx queue it is
//! device-writable. [`TxPacket::parse`] walks a tx chain once, checks descriptor directions,
//! copies and validates the header (type STREAM, source = the guest's CID, destination = the
//! host, `len` bounded by [`MAX_PKT_LEN`] and by the chain) and copies the payload out, so
//! the backend never touches guest memory. [`RxBuffer::parse`] validates an rx chain before
//! [`RxBuffer::write`] fills it. Handles no events.

use std::io::{Read, Write};

use virtio_queue::{DescriptorChain, Reader, Writer};
use vm_memory::GuestMemoryMmap;

use super::{HDR_LEN, HOST_CID, MAX_DESCRIPTORS, MAX_PKT_LEN, TYPE_STREAM};

/// Why a descriptor chain is not a valid packet (or rx buffer).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    /// The chain is longer than [`MAX_DESCRIPTORS`].
    #[error("Descriptor chain longer than {MAX_DESCRIPTORS}")]
    TooManyDescriptors,
    /// A writable descriptor on the tx queue, or a readable one on the rx queue.
    #[error("Descriptor with the wrong direction for this queue")]
    WrongDirection,
    /// A buffer lies (partly) outside guest memory, or copying failed.
    #[error("Guest memory error: {0}")]
    GuestMemory(String),
    /// Fewer than 44 readable bytes for the header.
    #[error("Packet header too short ({0} bytes)")]
    HeaderTooShort(u64),
    /// An rx buffer with room for less than a header.
    #[error("Rx buffer too small ({0} bytes)")]
    RxBufferTooSmall(u64),
    /// The socket type is not `VIRTIO_VSOCK_TYPE_STREAM`.
    #[error("Unsupported socket type {}", .0.type_)]
    BadType(PacketHeader),
    /// `src_cid` is not the guest's CID.
    #[error("Source CID {0} is not the guest's")]
    SrcCid(u64),
    /// `dst_cid` is not the host.
    #[error("Destination CID {0} is not the host")]
    DstCid(u64),
    /// `len` is larger than [`MAX_PKT_LEN`].
    #[error("Payload length {} exceeds the maximum", .0.len)]
    TooLong(PacketHeader),
    /// `len` is larger than the chain's payload bytes.
    #[error("Payload length {} exceeds the {avail} bytes in the chain", .hdr.len)]
    LenBeyondChain {
        /// The header.
        hdr: PacketHeader,
        /// Payload bytes the chain holds.
        avail: u64,
    },
}

impl PacketError {
    /// The header to answer with RST, for errors where a reply makes sense (the packet is
    /// addressed correctly but unusable). Spoofed or misaddressed packets get no reply.
    pub fn reply_to(&self) -> Option<&PacketHeader> {
        match self {
            PacketError::BadType(hdr)
            | PacketError::TooLong(hdr)
            | PacketError::LenBeyondChain { hdr, .. } => Some(hdr),
            _ => None,
        }
    }
}

/// `struct virtio_vsock_hdr`, copied out of (or to be written into) guest memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PacketHeader {
    /// Source CID.
    pub src_cid: u64,
    /// Destination CID.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Socket type (`VIRTIO_VSOCK_TYPE_*`).
    pub type_: u16,
    /// Operation ([`super::op`]).
    pub op: u16,
    /// Operation flags (SHUTDOWN: [`super::SHUTDOWN_RCV`] / [`super::SHUTDOWN_SEND`]).
    pub flags: u32,
    /// The sender's receive buffer size for this connection.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer (wrapping).
    pub fwd_cnt: u32,
}

impl PacketHeader {
    /// Decode the wire format.
    pub fn from_bytes(b: &[u8; HDR_LEN]) -> Self {
        let u64_at = |at: usize| {
            let mut v = [0u8; 8];
            v.copy_from_slice(&b[at..at + 8]);
            u64::from_le_bytes(v)
        };
        let u32_at = |at: usize| {
            let mut v = [0u8; 4];
            v.copy_from_slice(&b[at..at + 4]);
            u32::from_le_bytes(v)
        };
        let u16_at = |at: usize| u16::from_le_bytes([b[at], b[at + 1]]);
        PacketHeader {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    /// Encode the wire format.
    pub fn to_bytes(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// A validated packet from the guest: header and payload, copied out of guest memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxPacket {
    /// The header; `len == data.len()`.
    pub hdr: PacketHeader,
    /// The payload.
    pub data: Vec<u8>,
}

impl TxPacket {
    /// Validate a tx `chain` sent by the guest with CID `guest_cid` and copy it out.
    pub fn parse(
        chain: &DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
        guest_cid: u64,
    ) -> Result<Self, PacketError> {
        let total = chain_len(chain, false)?;
        if total < HDR_LEN as u64 {
            return Err(PacketError::HeaderTooShort(total));
        }
        let mut reader: Reader<'_> = chain
            .clone()
            .reader(mem)
            .map_err(|e| PacketError::GuestMemory(e.to_string()))?;
        let mut raw = [0u8; HDR_LEN];
        reader
            .read_exact(&mut raw)
            .map_err(|e| PacketError::GuestMemory(e.to_string()))?;
        let hdr = PacketHeader::from_bytes(&raw);
        if hdr.src_cid != guest_cid {
            return Err(PacketError::SrcCid(hdr.src_cid));
        }
        if hdr.dst_cid != HOST_CID {
            return Err(PacketError::DstCid(hdr.dst_cid));
        }
        if hdr.type_ != TYPE_STREAM {
            return Err(PacketError::BadType(hdr));
        }
        if hdr.len > MAX_PKT_LEN {
            return Err(PacketError::TooLong(hdr));
        }
        let avail = total - HDR_LEN as u64;
        if u64::from(hdr.len) > avail {
            return Err(PacketError::LenBeyondChain { hdr, avail });
        }
        // len <= MAX_PKT_LEN: the allocation is bounded.
        let mut data = vec![0u8; hdr.len as usize];
        reader
            .read_exact(&mut data)
            .map_err(|e| PacketError::GuestMemory(e.to_string()))?;
        Ok(TxPacket { hdr, data })
    }
}

/// A validated rx chain, ready to receive one packet.
pub struct RxBuffer<'a> {
    writer: Writer<'a>,
    payload_room: usize,
}

impl std::fmt::Debug for RxBuffer<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RxBuffer")
            .field("payload_room", &self.payload_room)
            .finish_non_exhaustive()
    }
}

impl<'a> RxBuffer<'a> {
    /// Validate an rx `chain`: only device-writable descriptors, room for a header.
    pub fn parse(
        chain: &DescriptorChain<&GuestMemoryMmap>,
        mem: &'a GuestMemoryMmap,
    ) -> Result<Self, PacketError> {
        let total = chain_len(chain, true)?;
        if total < HDR_LEN as u64 {
            return Err(PacketError::RxBufferTooSmall(total));
        }
        let writer = chain
            .clone()
            .writer(mem)
            .map_err(|e| PacketError::GuestMemory(e.to_string()))?;
        let room = (total - HDR_LEN as u64).min(u64::from(MAX_PKT_LEN));
        Ok(RxBuffer {
            writer,
            // room <= MAX_PKT_LEN fits any usize we run on.
            payload_room: usize::try_from(room).unwrap_or(0),
        })
    }

    /// Payload bytes this buffer can take (at most [`MAX_PKT_LEN`]).
    pub fn payload_room(&self) -> usize {
        self.payload_room
    }

    /// Write `hdr` (its `len` must equal `data.len()`) and `data`; return the used length.
    pub fn write(mut self, hdr: &PacketHeader, data: &[u8]) -> Result<u32, PacketError> {
        let err = |e: std::io::Error| PacketError::GuestMemory(e.to_string());
        self.writer.write_all(&hdr.to_bytes()).map_err(err)?;
        self.writer.write_all(data).map_err(err)?;
        // HDR_LEN + data.len() <= HDR_LEN + MAX_PKT_LEN.
        Ok(u32::try_from(HDR_LEN + data.len()).unwrap_or(u32::MAX))
    }
}

/// Sum the chain's descriptor lengths, checking every descriptor's direction.
fn chain_len(
    chain: &DescriptorChain<&GuestMemoryMmap>,
    writable: bool,
) -> Result<u64, PacketError> {
    let mut total = 0u64;
    for (i, desc) in chain.clone().enumerate() {
        if i == MAX_DESCRIPTORS {
            return Err(PacketError::TooManyDescriptors);
        }
        if desc.is_write_only() != writable {
            return Err(PacketError::WrongDirection);
        }
        // At most MAX_DESCRIPTORS * u32::MAX: no overflow.
        total += u64::from(desc.len());
    }
    Ok(total)
}
