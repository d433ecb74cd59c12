//! 9P2000.L wire format: little-endian primitives, message framing and the
//! typed T-/R-message codecs.
//!
//! Every message is `size[4] type[1] tag[2] body`, integers little-endian,
//! strings `len[2] bytes[len]` (not NUL terminated), qids `type[1] version[4]
//! path[8]`. The message layouts follow the 9P2000.L description in diod's
//! `protocol.md` and the Linux client (`net/9p/client.c`, `include/net/9p/9p.h`).
//!
//! Decoding is strict and never panics: every length is checked against the
//! remaining buffer, counts are bounded (`nwname <= 16`), a body must be
//! consumed exactly, and a failure is a [`WireError`] that maps to the errno
//! the server puts in an `Rlerror`.

mod rmsg;
mod tmsg;

pub use rmsg::{Rgetattr, Rgetlock, Rmessage, Rstatfs};
pub use tmsg::{Tgetlock, Tlock, Tmessage, Tsetattr};

use thiserror::Error;

/// Bytes in `size[4] type[1] tag[2]`.
pub const HEADER_LEN: usize = 7;
/// Header bytes in front of the data of an `Rread` (`size type tag count[4]`).
pub const RREAD_HEADER_LEN: usize = HEADER_LEN + 4;
/// Header bytes in front of the data of a `Twrite` (`... fid[4] offset[8] count[4]`).
pub const TWRITE_HEADER_LEN: usize = HEADER_LEN + 16;
/// Upper bound on the I/O header of any read/write-like message (`P9_IOHDRSZ`).
pub const IOHDRSZ: u32 = 24;
/// Maximum number of names in one `Twalk` (`P9_MAXWELEM`).
pub const MAXWELEM: usize = 16;
/// The tag used by `Tversion`.
pub const NOTAG: u16 = 0xffff;
/// "No fid" (e.g. `afid` of an attach without authentication).
pub const NOFID: u32 = 0xffff_ffff;
/// The only protocol version this crate speaks.
pub const VERSION_9P2000_L: &[u8] = b"9P2000.L";
/// The answer to a version we do not speak.
pub const VERSION_UNKNOWN: &[u8] = b"unknown";

/// Message type numbers (`enum p9_msg_t`).
#[allow(missing_docs)]
pub mod msg {
    pub const TLERROR: u8 = 6;
    pub const RLERROR: u8 = 7;
    pub const TSTATFS: u8 = 8;
    pub const RSTATFS: u8 = 9;
    pub const TLOPEN: u8 = 12;
    pub const RLOPEN: u8 = 13;
    pub const TLCREATE: u8 = 14;
    pub const RLCREATE: u8 = 15;
    pub const TSYMLINK: u8 = 16;
    pub const RSYMLINK: u8 = 17;
    pub const TMKNOD: u8 = 18;
    pub const RMKNOD: u8 = 19;
    pub const TRENAME: u8 = 20;
    pub const RRENAME: u8 = 21;
    pub const TREADLINK: u8 = 22;
    pub const RREADLINK: u8 = 23;
    pub const TGETATTR: u8 = 24;
    pub const RGETATTR: u8 = 25;
    pub const TSETATTR: u8 = 26;
    pub const RSETATTR: u8 = 27;
    pub const TXATTRWALK: u8 = 30;
    pub const RXATTRWALK: u8 = 31;
    pub const TXATTRCREATE: u8 = 32;
    pub const RXATTRCREATE: u8 = 33;
    pub const TREADDIR: u8 = 40;
    pub const RREADDIR: u8 = 41;
    pub const TFSYNC: u8 = 50;
    pub const RFSYNC: u8 = 51;
    pub const TLOCK: u8 = 52;
    pub const RLOCK: u8 = 53;
    pub const TGETLOCK: u8 = 54;
    pub const RGETLOCK: u8 = 55;
    pub const TLINK: u8 = 70;
    pub const RLINK: u8 = 71;
    pub const TMKDIR: u8 = 72;
    pub const RMKDIR: u8 = 73;
    pub const TRENAMEAT: u8 = 74;
    pub const RRENAMEAT: u8 = 75;
    pub const TUNLINKAT: u8 = 76;
    pub const RUNLINKAT: u8 = 77;
    pub const TVERSION: u8 = 100;
    pub const RVERSION: u8 = 101;
    pub const TAUTH: u8 = 102;
    pub const RAUTH: u8 = 103;
    pub const TATTACH: u8 = 104;
    pub const RATTACH: u8 = 105;
    pub const TFLUSH: u8 = 108;
    pub const RFLUSH: u8 = 109;
    pub const TWALK: u8 = 110;
    pub const RWALK: u8 = 111;
    pub const TREAD: u8 = 116;
    pub const RREAD: u8 = 117;
    pub const TWRITE: u8 = 118;
    pub const RWRITE: u8 = 119;
    pub const TCLUNK: u8 = 120;
    pub const RCLUNK: u8 = 121;
    pub const TREMOVE: u8 = 122;
    pub const RREMOVE: u8 = 123;
}

/// Qid types (`P9_QT*`).
#[allow(missing_docs)]
pub mod qt {
    pub const DIR: u8 = 0x80;
    pub const APPEND: u8 = 0x40;
    pub const EXCL: u8 = 0x20;
    pub const AUTH: u8 = 0x08;
    pub const SYMLINK: u8 = 0x02;
    pub const FILE: u8 = 0x00;
}

/// `Tgetattr` request / `Rgetattr` valid bits (`P9_STATS_*`).
#[allow(missing_docs)]
pub mod getattr {
    pub const MODE: u64 = 0x1;
    pub const NLINK: u64 = 0x2;
    pub const UID: u64 = 0x4;
    pub const GID: u64 = 0x8;
    pub const RDEV: u64 = 0x10;
    pub const ATIME: u64 = 0x20;
    pub const MTIME: u64 = 0x40;
    pub const CTIME: u64 = 0x80;
    pub const INO: u64 = 0x100;
    pub const SIZE: u64 = 0x200;
    pub const BLOCKS: u64 = 0x400;
    pub const BASIC: u64 = 0x7ff;
    pub const ALL: u64 = 0x3fff;
}

/// `Tsetattr` valid bits (`P9_ATTR_*`).
#[allow(missing_docs)]
pub mod setattr {
    pub const MODE: u32 = 0x1;
    pub const UID: u32 = 0x2;
    pub const GID: u32 = 0x4;
    pub const SIZE: u32 = 0x8;
    pub const ATIME: u32 = 0x10;
    pub const MTIME: u32 = 0x20;
    pub const CTIME: u32 = 0x40;
    pub const ATIME_SET: u32 = 0x80;
    pub const MTIME_SET: u32 = 0x100;
}

/// `Tlopen`/`Tlcreate` flags (`P9_DOTL_*`, octal like Linux on x86).
#[allow(missing_docs)]
pub mod oflags {
    pub const RDONLY: u32 = 0o0;
    pub const WRONLY: u32 = 0o1;
    pub const RDWR: u32 = 0o2;
    pub const NOACCESS: u32 = 0o3;
    pub const ACCMODE: u32 = 0o3;
    pub const CREATE: u32 = 0o100;
    pub const EXCL: u32 = 0o200;
    pub const NOCTTY: u32 = 0o400;
    pub const TRUNC: u32 = 0o1000;
    pub const APPEND: u32 = 0o2000;
    pub const NONBLOCK: u32 = 0o4000;
    pub const DSYNC: u32 = 0o10000;
    pub const FASYNC: u32 = 0o20000;
    pub const DIRECT: u32 = 0o40000;
    pub const LARGEFILE: u32 = 0o100000;
    pub const DIRECTORY: u32 = 0o200000;
    pub const NOFOLLOW: u32 = 0o400000;
    pub const NOATIME: u32 = 0o1000000;
    pub const CLOEXEC: u32 = 0o2000000;
    pub const SYNC: u32 = 0o4000000;
}

/// Lock constants for `Tlock`/`Tgetlock` (`P9_LOCK_*`).
#[allow(missing_docs)]
pub mod lock {
    pub const TYPE_RDLCK: u8 = 0;
    pub const TYPE_WRLCK: u8 = 1;
    pub const TYPE_UNLCK: u8 = 2;
    pub const FLAGS_BLOCK: u32 = 1;
    pub const FLAGS_RECLAIM: u32 = 2;
    pub const SUCCESS: u8 = 0;
    pub const BLOCKED: u8 = 1;
    pub const ERROR: u8 = 2;
    pub const GRACE: u8 = 3;
}

/// `Tunlinkat` flag asking to remove a directory (`P9_DOTL_AT_REMOVEDIR`).
pub const AT_REMOVEDIR: u32 = 0x200;

/// A malformed message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum WireError {
    /// The message ends before a field it announces.
    #[error("Message truncated")]
    Truncated,
    /// The body holds bytes after its last field.
    #[error("Trailing bytes after message body")]
    TrailingBytes,
    /// The size field is below the header length.
    #[error("Size field {0} is too small")]
    SizeTooSmall(u32),
    /// The size field is above the negotiated msize.
    #[error("Size field {0} exceeds msize")]
    SizeTooLarge(u32),
    /// A count inside the message is out of range.
    #[error("Count {0} out of range")]
    BadCount(u32),
    /// The message type is not one we know.
    #[error("Unknown message type {0}")]
    UnknownType(u8),
    /// An encoded message would not fit a 32-bit size or a 16-bit length.
    #[error("Field too long to encode")]
    TooLong,
}

impl WireError {
    /// The errno an `Rlerror` carries for this error.
    pub fn errno(self) -> u32 {
        (match self {
            WireError::Truncated | WireError::TrailingBytes | WireError::SizeTooSmall(_) => {
                libc::EPROTO
            }
            WireError::SizeTooLarge(_) | WireError::TooLong => libc::EMSGSIZE,
            WireError::BadCount(_) => libc::EINVAL,
            WireError::UnknownType(_) => libc::EOPNOTSUPP,
        }) as u32
    }
}

/// A server's unique identification of a file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Qid {
    /// `qt::*` bits.
    pub ty: u8,
    /// Version (changes when the file does; 0 when unknown).
    pub version: u32,
    /// Unique path number (inode-derived).
    pub path: u64,
}

impl Qid {
    /// Encoded length of a qid.
    pub const LEN: usize = 13;
}

/// A bounded little-endian decoder over one message body.
#[derive(Debug)]
pub struct Decoder<'a> {
    buf: &'a [u8],
}

impl<'a> Decoder<'a> {
    /// Decode from `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Decoder { buf }
    }

    /// Bytes left.
    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    /// Take `n` raw bytes.
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if n > self.buf.len() {
            return Err(WireError::Truncated);
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let b = self.bytes(N)?;
        let mut out = [0u8; N];
        out.copy_from_slice(b);
        Ok(out)
    }

    /// One byte.
    pub fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.array::<1>()?[0])
    }
    /// Two bytes, little-endian.
    pub fn u16(&mut self) -> Result<u16, WireError> {
        self.array().map(u16::from_le_bytes)
    }
    /// Four bytes, little-endian.
    pub fn u32(&mut self) -> Result<u32, WireError> {
        self.array().map(u32::from_le_bytes)
    }
    /// Eight bytes, little-endian.
    pub fn u64(&mut self) -> Result<u64, WireError> {
        self.array().map(u64::from_le_bytes)
    }
    /// A string: `len[2] bytes[len]` (raw bytes; names are validated later).
    pub fn str(&mut self) -> Result<&'a [u8], WireError> {
        let n = self.u16()? as usize;
        self.bytes(n)
    }
    /// A qid.
    pub fn qid(&mut self) -> Result<Qid, WireError> {
        Ok(Qid {
            ty: self.u8()?,
            version: self.u32()?,
            path: self.u64()?,
        })
    }
    /// Data with a 4-byte count: `count[4] data[count]`.
    pub fn data(&mut self) -> Result<&'a [u8], WireError> {
        let n = self.u32()?;
        if n as usize > self.buf.len() {
            return Err(WireError::BadCount(n));
        }
        self.bytes(n as usize)
    }
    /// Fail unless the whole body was consumed.
    pub fn finish(&self) -> Result<(), WireError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(WireError::TrailingBytes)
        }
    }
}

/// A little-endian encoder appending to a `Vec`.
#[derive(Debug)]
pub struct Encoder<'a> {
    buf: &'a mut Vec<u8>,
    start: usize,
}

impl<'a> Encoder<'a> {
    /// Start a message of type `ty` with `tag` at the end of `buf`; the size
    /// field is written by [`Encoder::finish`].
    pub fn begin(buf: &'a mut Vec<u8>, ty: u8, tag: u16) -> Self {
        let start = buf.len();
        buf.extend_from_slice(&[0, 0, 0, 0, ty]);
        buf.extend_from_slice(&tag.to_le_bytes());
        Encoder { buf, start }
    }
    /// Append one byte.
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.buf.push(v);
        self
    }
    /// Append two bytes.
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Append four bytes.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Append eight bytes.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Append a string (`len[2] bytes`).
    pub fn str(&mut self, s: &[u8]) -> Result<&mut Self, WireError> {
        let n = u16::try_from(s.len()).map_err(|_| WireError::TooLong)?;
        self.u16(n);
        self.buf.extend_from_slice(s);
        Ok(self)
    }
    /// Append a qid.
    pub fn qid(&mut self, q: &Qid) -> &mut Self {
        self.u8(q.ty).u32(q.version).u64(q.path)
    }
    /// Append `count[4] data`.
    pub fn data(&mut self, d: &[u8]) -> Result<&mut Self, WireError> {
        let n = u32::try_from(d.len()).map_err(|_| WireError::TooLong)?;
        self.u32(n);
        self.buf.extend_from_slice(d);
        Ok(self)
    }
    /// Write the size field; returns the message length.
    pub fn finish(self) -> Result<usize, WireError> {
        let len = self.buf.len() - self.start;
        let size = u32::try_from(len).map_err(|_| WireError::TooLong)?;
        self.buf[self.start..self.start + 4].copy_from_slice(&size.to_le_bytes());
        Ok(len)
    }
}

/// Split a complete frame into `(type, tag, body)`, checking the size field
/// against the frame length.
pub fn split_frame(frame: &[u8]) -> Result<(u8, u16, &[u8]), WireError> {
    if frame.len() < HEADER_LEN {
        return Err(WireError::Truncated);
    }
    let size = u32::from_le_bytes([frame[0], frame[1], frame[2], frame[3]]);
    if (size as usize) < HEADER_LEN {
        return Err(WireError::SizeTooSmall(size));
    }
    if size as usize > frame.len() {
        return Err(WireError::Truncated);
    }
    if (size as usize) < frame.len() {
        return Err(WireError::TrailingBytes);
    }
    let ty = frame[4];
    let tag = u16::from_le_bytes([frame[5], frame[6]]);
    Ok((ty, tag, &frame[HEADER_LEN..]))
}

/// One directory entry inside `Rreaddir` data: `qid[13] offset[8] type[1] name[s]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dirent<'a> {
    /// The entry's qid.
    pub qid: Qid,
    /// Offset to pass to the next `Treaddir` to continue after this entry.
    pub offset: u64,
    /// `DT_*` type.
    pub ty: u8,
    /// Entry name.
    pub name: &'a [u8],
}

impl Dirent<'_> {
    /// Encoded length of an entry with a name of `name_len` bytes.
    pub const fn encoded_len(name_len: usize) -> usize {
        Qid::LEN + 8 + 1 + 2 + name_len
    }

    /// Append this entry to `out` (raw, no message header).
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        let n = u16::try_from(self.name.len()).map_err(|_| WireError::TooLong)?;
        out.push(self.qid.ty);
        out.extend_from_slice(&self.qid.version.to_le_bytes());
        out.extend_from_slice(&self.qid.path.to_le_bytes());
        out.extend_from_slice(&self.offset.to_le_bytes());
        out.push(self.ty);
        out.extend_from_slice(&n.to_le_bytes());
        out.extend_from_slice(self.name);
        Ok(())
    }

    /// Decode all entries of `Rreaddir` data.
    pub fn decode_all(data: &[u8]) -> Result<Vec<Dirent<'_>>, WireError> {
        let mut d = Decoder::new(data);
        let mut out = Vec::new();
        while d.remaining() > 0 {
            out.push(Dirent {
                qid: d.qid()?,
                offset: d.u64()?,
                ty: d.u8()?,
                name: d.str()?,
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests;
