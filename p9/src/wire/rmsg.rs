//! R-messages (server to client) of 9P2000.L: typed values with an encoder
//! (used by the server) and a strict decoder (used by test clients).
//!
//! Layouts: diod `protocol.md` ("9P2000.L"), Linux `net/9p/client.c` format
//! strings. The server builds the hot `Rread`/`Rreaddir` replies in place
//! (see `Server`), the encoder here is the generic path.

use super::{msg, Decoder, Encoder, Qid, WireError, MAXWELEM};

/// `Rgetattr` fields after `valid`/`qid`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct Rgetattr {
    pub valid: u64,
    pub qid: Qid,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u64,
    pub rdev: u64,
    pub size: u64,
    pub blksize: u64,
    pub blocks: u64,
    pub atime_sec: u64,
    pub atime_nsec: u64,
    pub mtime_sec: u64,
    pub mtime_nsec: u64,
    pub ctime_sec: u64,
    pub ctime_nsec: u64,
    pub btime_sec: u64,
    pub btime_nsec: u64,
    pub gen: u64,
    pub data_version: u64,
}

/// `Rstatfs` body.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct Rstatfs {
    pub ty: u32,
    pub bsize: u32,
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub fsid: u64,
    pub namelen: u32,
}

/// `Rgetlock` body: the same fields as `Tgetlock`.
pub type Rgetlock<'a> = super::Tgetlock<'a>;

/// A decoded or to-be-encoded R-message.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Rmessage<'a> {
    Lerror { ecode: u32 },
    Version { msize: u32, version: &'a [u8] },
    Auth { aqid: Qid },
    Attach { qid: Qid },
    Flush,
    Walk { qids: Vec<Qid> },
    Read { data: &'a [u8] },
    Write { count: u32 },
    Clunk,
    Remove,
    Statfs(Rstatfs),
    Lopen { qid: Qid, iounit: u32 },
    Lcreate { qid: Qid, iounit: u32 },
    Symlink { qid: Qid },
    Mknod { qid: Qid },
    Rename,
    Readlink { target: &'a [u8] },
    Getattr(Box<Rgetattr>),
    Setattr,
    Xattrwalk { size: u64 },
    Xattrcreate,
    Readdir { data: &'a [u8] },
    Fsync,
    Lock { status: u8 },
    Getlock(Rgetlock<'a>),
    Link,
    Mkdir { qid: Qid },
    Renameat,
    Unlinkat,
}

impl<'a> Rmessage<'a> {
    /// The message type number.
    pub fn msg_type(&self) -> u8 {
        match self {
            Rmessage::Lerror { .. } => msg::RLERROR,
            Rmessage::Version { .. } => msg::RVERSION,
            Rmessage::Auth { .. } => msg::RAUTH,
            Rmessage::Attach { .. } => msg::RATTACH,
            Rmessage::Flush => msg::RFLUSH,
            Rmessage::Walk { .. } => msg::RWALK,
            Rmessage::Read { .. } => msg::RREAD,
            Rmessage::Write { .. } => msg::RWRITE,
            Rmessage::Clunk => msg::RCLUNK,
            Rmessage::Remove => msg::RREMOVE,
            Rmessage::Statfs(_) => msg::RSTATFS,
            Rmessage::Lopen { .. } => msg::RLOPEN,
            Rmessage::Lcreate { .. } => msg::RLCREATE,
            Rmessage::Symlink { .. } => msg::RSYMLINK,
            Rmessage::Mknod { .. } => msg::RMKNOD,
            Rmessage::Rename => msg::RRENAME,
            Rmessage::Readlink { .. } => msg::RREADLINK,
            Rmessage::Getattr(_) => msg::RGETATTR,
            Rmessage::Setattr => msg::RSETATTR,
            Rmessage::Xattrwalk { .. } => msg::RXATTRWALK,
            Rmessage::Xattrcreate => msg::RXATTRCREATE,
            Rmessage::Readdir { .. } => msg::RREADDIR,
            Rmessage::Fsync => msg::RFSYNC,
            Rmessage::Lock { .. } => msg::RLOCK,
            Rmessage::Getlock(_) => msg::RGETLOCK,
            Rmessage::Link => msg::RLINK,
            Rmessage::Mkdir { .. } => msg::RMKDIR,
            Rmessage::Renameat => msg::RRENAMEAT,
            Rmessage::Unlinkat => msg::RUNLINKAT,
        }
    }

    /// Append the encoded frame to `out`; returns its length.
    pub fn encode(&self, tag: u16, out: &mut Vec<u8>) -> Result<usize, WireError> {
        let mut e = Encoder::begin(out, self.msg_type(), tag);
        match self {
            Rmessage::Lerror { ecode } => {
                e.u32(*ecode);
            }
            Rmessage::Version { msize, version } => {
                e.u32(*msize).str(version)?;
            }
            Rmessage::Auth { aqid: qid }
            | Rmessage::Attach { qid }
            | Rmessage::Symlink { qid }
            | Rmessage::Mknod { qid }
            | Rmessage::Mkdir { qid } => {
                e.qid(qid);
            }
            Rmessage::Walk { qids } => {
                let n = u16::try_from(qids.len()).map_err(|_| WireError::TooLong)?;
                e.u16(n);
                for q in qids {
                    e.qid(q);
                }
            }
            Rmessage::Read { data } | Rmessage::Readdir { data } => {
                e.data(data)?;
            }
            Rmessage::Write { count } => {
                e.u32(*count);
            }
            Rmessage::Statfs(s) => {
                e.u32(s.ty)
                    .u32(s.bsize)
                    .u64(s.blocks)
                    .u64(s.bfree)
                    .u64(s.bavail);
                e.u64(s.files).u64(s.ffree).u64(s.fsid).u32(s.namelen);
            }
            Rmessage::Lopen { qid, iounit } | Rmessage::Lcreate { qid, iounit } => {
                e.qid(qid).u32(*iounit);
            }
            Rmessage::Readlink { target } => {
                e.str(target)?;
            }
            Rmessage::Getattr(a) => {
                e.u64(a.valid).qid(&a.qid).u32(a.mode).u32(a.uid).u32(a.gid);
                e.u64(a.nlink)
                    .u64(a.rdev)
                    .u64(a.size)
                    .u64(a.blksize)
                    .u64(a.blocks);
                e.u64(a.atime_sec)
                    .u64(a.atime_nsec)
                    .u64(a.mtime_sec)
                    .u64(a.mtime_nsec);
                e.u64(a.ctime_sec)
                    .u64(a.ctime_nsec)
                    .u64(a.btime_sec)
                    .u64(a.btime_nsec);
                e.u64(a.gen).u64(a.data_version);
            }
            Rmessage::Xattrwalk { size } => {
                e.u64(*size);
            }
            Rmessage::Lock { status } => {
                e.u8(*status);
            }
            Rmessage::Getlock(l) => {
                e.u8(l.ty)
                    .u64(l.start)
                    .u64(l.length)
                    .u32(l.proc_id)
                    .str(l.client_id)?;
            }
            Rmessage::Flush
            | Rmessage::Clunk
            | Rmessage::Remove
            | Rmessage::Rename
            | Rmessage::Setattr
            | Rmessage::Xattrcreate
            | Rmessage::Fsync
            | Rmessage::Link
            | Rmessage::Renameat
            | Rmessage::Unlinkat => {}
        }
        e.finish()
    }

    /// Decode the body of an R-message of type `ty`.
    pub fn decode(ty: u8, body: &'a [u8]) -> Result<Self, WireError> {
        let mut d = Decoder::new(body);
        let m = match ty {
            msg::RLERROR => Rmessage::Lerror { ecode: d.u32()? },
            msg::RVERSION => Rmessage::Version {
                msize: d.u32()?,
                version: d.str()?,
            },
            msg::RAUTH => Rmessage::Auth { aqid: d.qid()? },
            msg::RATTACH => Rmessage::Attach { qid: d.qid()? },
            msg::RFLUSH => Rmessage::Flush,
            msg::RWALK => {
                let n = d.u16()?;
                if n as usize > MAXWELEM {
                    return Err(WireError::BadCount(n.into()));
                }
                let qids = (0..n).map(|_| d.qid()).collect::<Result<_, _>>()?;
                Rmessage::Walk { qids }
            }
            msg::RREAD => Rmessage::Read { data: d.data()? },
            msg::RWRITE => Rmessage::Write { count: d.u32()? },
            msg::RCLUNK => Rmessage::Clunk,
            msg::RREMOVE => Rmessage::Remove,
            msg::RSTATFS => Rmessage::Statfs(Rstatfs {
                ty: d.u32()?,
                bsize: d.u32()?,
                blocks: d.u64()?,
                bfree: d.u64()?,
                bavail: d.u64()?,
                files: d.u64()?,
                ffree: d.u64()?,
                fsid: d.u64()?,
                namelen: d.u32()?,
            }),
            msg::RLOPEN => Rmessage::Lopen {
                qid: d.qid()?,
                iounit: d.u32()?,
            },
            msg::RLCREATE => Rmessage::Lcreate {
                qid: d.qid()?,
                iounit: d.u32()?,
            },
            msg::RSYMLINK => Rmessage::Symlink { qid: d.qid()? },
            msg::RMKNOD => Rmessage::Mknod { qid: d.qid()? },
            msg::RRENAME => Rmessage::Rename,
            msg::RREADLINK => Rmessage::Readlink { target: d.str()? },
            msg::RGETATTR => Rmessage::Getattr(Box::new(Rgetattr {
                valid: d.u64()?,
                qid: d.qid()?,
                mode: d.u32()?,
                uid: d.u32()?,
                gid: d.u32()?,
                nlink: d.u64()?,
                rdev: d.u64()?,
                size: d.u64()?,
                blksize: d.u64()?,
                blocks: d.u64()?,
                atime_sec: d.u64()?,
                atime_nsec: d.u64()?,
                mtime_sec: d.u64()?,
                mtime_nsec: d.u64()?,
                ctime_sec: d.u64()?,
                ctime_nsec: d.u64()?,
                btime_sec: d.u64()?,
                btime_nsec: d.u64()?,
                gen: d.u64()?,
                data_version: d.u64()?,
            })),
            msg::RSETATTR => Rmessage::Setattr,
            msg::RXATTRWALK => Rmessage::Xattrwalk { size: d.u64()? },
            msg::RXATTRCREATE => Rmessage::Xattrcreate,
            msg::RREADDIR => Rmessage::Readdir { data: d.data()? },
            msg::RFSYNC => Rmessage::Fsync,
            msg::RLOCK => Rmessage::Lock { status: d.u8()? },
            msg::RGETLOCK => Rmessage::Getlock(Rgetlock {
                ty: d.u8()?,
                start: d.u64()?,
                length: d.u64()?,
                proc_id: d.u32()?,
                client_id: d.str()?,
            }),
            msg::RLINK => Rmessage::Link,
            msg::RMKDIR => Rmessage::Mkdir { qid: d.qid()? },
            msg::RRENAMEAT => Rmessage::Renameat,
            msg::RUNLINKAT => Rmessage::Unlinkat,
            other => return Err(WireError::UnknownType(other)),
        };
        d.finish()?;
        Ok(m)
    }

    /// Decode a complete frame (`size type tag body`) into `(tag, message)`.
    pub fn decode_frame(frame: &'a [u8]) -> Result<(u16, Self), WireError> {
        let (ty, tag, body) = super::split_frame(frame)?;
        Ok((tag, Self::decode(ty, body)?))
    }
}
