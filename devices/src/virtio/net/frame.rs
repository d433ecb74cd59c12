//! Parse, then execute, one virtio-net chain (virtio 1.2 §5.1.6).
//!
//! Every frame is preceded by `struct virtio_net_hdr_v1` (12 bytes, little-endian; with
//! `VERSION_1` `num_buffers` is always present). On the tx queue the whole chain is
//! device-readable and holds one header and one frame, split across descriptors any way the
//! driver likes (§5.1.6.2). On the rx queue each chain is one device-writable buffer; with
//! `MRG_RXBUF` a frame may span several, the first header's `num_buffers` telling how many
//! (§5.1.6.3, §5.1.6.4).
//!
//! [`TxFrame::parse`] walks a tx chain once, checks directions and bounds, copies header and
//! frame out and validates the header; [`RxChain::parse`] validates an rx buffer (directions,
//! guest memory bounds, room for a header) before [`write_frame`] fills a run of them. Also the
//! checksum helpers for the offload fallbacks. Handles no events.

use virtio_bindings::virtio_net::{
    VIRTIO_NET_HDR_F_DATA_VALID, VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_NONE,
};
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::{ETH_HLEN, HDR_LEN, MAX_DESCRIPTORS};

/// Why a descriptor chain is not a valid tx frame (or rx buffer).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The chain is longer than [`MAX_DESCRIPTORS`].
    #[error("Descriptor chain longer than {MAX_DESCRIPTORS}")]
    TooManyDescriptors,
    /// A writable descriptor on the tx queue, or a readable one on the rx queue.
    #[error("Descriptor with the wrong direction for this queue")]
    WrongDirection,
    /// A buffer lies (partly) outside guest memory.
    #[error("Buffer outside guest memory")]
    GuestMemory,
    /// Fewer bytes than a virtio header plus an ethernet header.
    #[error("Tx chain too short ({0} bytes)")]
    TooShort(usize),
    /// More bytes than a virtio header plus the largest frame the MTU allows.
    #[error("Tx chain too long ({0} bytes)")]
    TooLong(u64),
    /// A GSO type although no segmentation offload was negotiated.
    #[error("Unsupported GSO type {0}")]
    Gso(u8),
    /// `NEEDS_CSUM` with a checksum position outside the frame.
    #[error("Checksum at {start}+{offset} outside a {len}-byte frame")]
    ChecksumOffsets {
        /// `csum_start`.
        start: u16,
        /// `csum_offset`.
        offset: u16,
        /// Frame length.
        len: usize,
    },
    /// An rx buffer with room for less than a header.
    #[error("Rx buffer too small ({0} bytes)")]
    RxBufferTooSmall(u64),
}

/// `struct virtio_net_hdr_v1`, copied out of (or to be written into) guest memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetHeader {
    /// `VIRTIO_NET_HDR_F_*`.
    pub flags: u8,
    /// `VIRTIO_NET_HDR_GSO_*`.
    pub gso_type: u8,
    /// Length of the headers to copy into each segment (GSO only).
    pub hdr_len: u16,
    /// Segment size (GSO only).
    pub gso_size: u16,
    /// Where checksumming starts (`NEEDS_CSUM`), from the start of the frame.
    pub csum_start: u16,
    /// Where the checksum goes, from `csum_start`.
    pub csum_offset: u16,
    /// Number of rx buffers the frame spans (rx only).
    pub num_buffers: u16,
}

impl NetHeader {
    /// Decode the wire format.
    pub fn from_bytes(b: &[u8; HDR_LEN]) -> Self {
        let u16_at = |at: usize| u16::from_le_bytes([b[at], b[at + 1]]);
        NetHeader {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u16_at(2),
            gso_size: u16_at(4),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
            num_buffers: u16_at(10),
        }
    }

    /// Encode the wire format.
    pub fn to_bytes(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        b[10..12].copy_from_slice(&self.num_buffers.to_le_bytes());
        b
    }

    /// The header of a received frame spanning `num_buffers` buffers.
    pub fn rx(num_buffers: u16, data_valid: bool) -> Self {
        NetHeader {
            flags: if data_valid {
                VIRTIO_NET_HDR_F_DATA_VALID as u8
            } else {
                0
            },
            gso_type: VIRTIO_NET_HDR_GSO_NONE as u8,
            num_buffers,
            ..NetHeader::default()
        }
    }

    /// Whether the driver left the checksum to the device.
    pub fn needs_csum(&self) -> bool {
        self.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM as u8 != 0
    }
}

/// A validated frame from the guest, copied out of guest memory.
#[derive(Debug, PartialEq, Eq)]
pub struct TxFrame<'b> {
    /// The virtio header.
    pub header: NetHeader,
    /// The ethernet frame.
    pub frame: &'b mut [u8],
}

impl<'b> TxFrame<'b> {
    /// Validate a tx `chain` and copy it out: the frame lands in `buf` (reused between calls).
    /// Frames longer than `max_frame` bytes are refused.
    pub fn parse(
        chain: &DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
        max_frame: usize,
        buf: &'b mut Vec<u8>,
    ) -> Result<Self, FrameError> {
        let limit = (HDR_LEN + max_frame) as u64;
        let mut total = 0u64;
        for (i, desc) in chain.clone().enumerate() {
            if i == MAX_DESCRIPTORS {
                return Err(FrameError::TooManyDescriptors);
            }
            if desc.is_write_only() {
                return Err(FrameError::WrongDirection);
            }
            // At most MAX_DESCRIPTORS * u32::MAX: no overflow.
            total += u64::from(desc.len());
        }
        if total > limit {
            return Err(FrameError::TooLong(total));
        }
        // total <= HDR_LEN + max_frame.
        let total = total as usize;
        if total < HDR_LEN + ETH_HLEN {
            return Err(FrameError::TooShort(total));
        }
        buf.clear();
        buf.resize(total, 0);
        let mut at = 0;
        for desc in chain.clone() {
            let len = desc.len() as usize;
            let dst = buf.get_mut(at..at + len).ok_or(FrameError::GuestMemory)?;
            mem.read_slice(dst, desc.addr())
                .map_err(|_| FrameError::GuestMemory)?;
            at += len;
        }
        let (raw, frame) = buf.split_at_mut(HDR_LEN);
        let mut hb = [0u8; HDR_LEN];
        hb.copy_from_slice(raw);
        let header = NetHeader::from_bytes(&hb);
        if header.gso_type != VIRTIO_NET_HDR_GSO_NONE as u8 {
            return Err(FrameError::Gso(header.gso_type));
        }
        if header.needs_csum() {
            let end = usize::from(header.csum_start) + usize::from(header.csum_offset) + 2;
            if end > frame.len() {
                return Err(FrameError::ChecksumOffsets {
                    start: header.csum_start,
                    offset: header.csum_offset,
                    len: frame.len(),
                });
            }
        }
        Ok(TxFrame { header, frame })
    }

    /// For a `NEEDS_CSUM` frame, fill in the checksum the driver left to the device (§5.1.6.2:
    /// the ones' complement sum from `csum_start` to the end, stored at `csum_start +
    /// csum_offset`). Returns whether anything was done.
    pub fn complete_checksum(&mut self) -> bool {
        if !self.header.needs_csum() {
            return false;
        }
        let start = usize::from(self.header.csum_start);
        let at = start + usize::from(self.header.csum_offset);
        // Bounds were checked by `parse`.
        let Some(data) = self.frame.get(start..) else {
            return false;
        };
        let mut csum = !fold(sum_words(data, 0));
        if csum == 0 {
            csum = 0xffff;
        }
        match self.frame.get_mut(at..at + 2) {
            Some(field) => {
                field.copy_from_slice(&csum.to_be_bytes());
                true
            }
            None => false,
        }
    }
}

/// A validated rx buffer: its writable regions, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RxChain {
    head: u16,
    regions: Vec<(GuestAddress, usize)>,
    capacity: usize,
}

impl RxChain {
    /// Validate an rx `chain`: only device-writable descriptors inside guest memory, room for
    /// at least a header.
    pub fn parse(
        chain: &DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
    ) -> Result<Self, FrameError> {
        let mut regions = Vec::with_capacity(1);
        let mut total = 0u64;
        for (i, desc) in chain.clone().enumerate() {
            if i == MAX_DESCRIPTORS {
                return Err(FrameError::TooManyDescriptors);
            }
            if !desc.is_write_only() {
                return Err(FrameError::WrongDirection);
            }
            let len = desc.len() as usize;
            if !GuestMemoryBackend::check_range(mem, desc.addr(), len) {
                return Err(FrameError::GuestMemory);
            }
            total += u64::from(desc.len());
            if len > 0 {
                regions.push((desc.addr(), len));
            }
        }
        if total < HDR_LEN as u64 {
            return Err(FrameError::RxBufferTooSmall(total));
        }
        Ok(RxChain {
            head: chain.head_index(),
            regions,
            // Capped: a frame never needs more than 64 KiB + a header from one buffer.
            capacity: usize::try_from(total).unwrap_or(usize::MAX),
        })
    }

    /// The chain's head descriptor index.
    pub fn head(&self) -> u16 {
        self.head
    }

    /// Bytes the buffer can take, header included.
    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

/// Write `header` then `frame` across `bufs`, in order, filling each before the next. Pushes
/// the number of bytes written to each buffer to `used` (one entry per buffer of `bufs`).
pub fn write_frame(
    bufs: &[RxChain],
    mem: &GuestMemoryMmap,
    header: &NetHeader,
    frame: &[u8],
    used: &mut Vec<u32>,
) -> Result<(), FrameError> {
    let hdr = header.to_bytes();
    let total = HDR_LEN + frame.len();
    let mut pos = 0;
    for buf in bufs {
        let mut written = 0usize;
        for &(addr, len) in &buf.regions {
            let mut off = 0;
            while off < len && pos < total {
                // The next contiguous source piece, header or frame.
                let src = if pos < HDR_LEN {
                    &hdr[pos..]
                } else {
                    &frame[pos - HDR_LEN..]
                };
                let n = src.len().min(len - off);
                let dst = addr
                    .checked_add(off as u64)
                    .ok_or(FrameError::GuestMemory)?;
                mem.write_slice(&src[..n], dst)
                    .map_err(|_| FrameError::GuestMemory)?;
                off += n;
                pos += n;
            }
            written += off;
        }
        // written <= capacity of one chain <= MAX_DESCRIPTORS * u32::MAX, but also <= total
        // which is < 4 GiB.
        used.push(u32::try_from(written).unwrap_or(u32::MAX));
    }
    Ok(())
}

/// Sum big-endian 16-bit words of `data` (an odd last byte is padded with zero) onto `init`,
/// without folding.
pub fn sum_words(data: &[u8], init: u64) -> u64 {
    let mut sum = init;
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        sum += u64::from(u32::from_be_bytes([c[0], c[1], c[2], c[3]]));
    }
    let rest = chunks.remainder();
    let mut tail = [0u8; 4];
    tail[..rest.len()].copy_from_slice(rest);
    sum + u64::from(u32::from_be_bytes(tail))
}

/// Fold a wide ones' complement sum to 16 bits (not complemented).
pub fn fold(mut sum: u64) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// Compute and store the TCP or UDP checksum of an untagged IPv4 ethernet frame. Returns
/// whether the frame was one (other frames, and fragments, are left alone).
pub fn fill_l4_checksum(frame: &mut [u8]) -> bool {
    const ETHERTYPE_IPV4: [u8; 2] = [0x08, 0x00];
    if frame.get(12..14) != Some(&ETHERTYPE_IPV4[..]) {
        return false;
    }
    let Some(ip) = frame.get_mut(ETH_HLEN..) else {
        return false;
    };
    if ip.len() < 20 || ip[0] >> 4 != 4 {
        return false;
    }
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let frag = u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff;
    if ihl < 20 || total < ihl || total > ip.len() || frag != 0 {
        return false;
    }
    let proto = ip[9];
    let (field, min_len) = match proto {
        6 => (16, 20),
        17 => (6, 8),
        _ => return false,
    };
    let l4_len = total - ihl;
    if l4_len < min_len {
        return false;
    }
    let mut pseudo = [0u8; 12];
    pseudo[..8].copy_from_slice(&ip[12..20]);
    pseudo[9] = proto;
    // l4_len < 64 KiB (from a 16-bit total length).
    pseudo[10..12].copy_from_slice(&(l4_len as u16).to_be_bytes());
    let l4 = &mut ip[ihl..total];
    l4[field..field + 2].fill(0);
    let mut csum = !fold(sum_words(l4, sum_words(&pseudo, 0)));
    if csum == 0 && proto == 17 {
        csum = 0xffff;
    }
    l4[field..field + 2].copy_from_slice(&csum.to_be_bytes());
    true
}
