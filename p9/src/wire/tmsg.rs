//! T-messages (client to server) of 9P2000.L: typed values borrowing their
//! strings and data from the request buffer, with a strict decoder (used by
//! the server) and an encoder (used by test clients and the fuzz target).
//!
//! Layouts: diod `protocol.md` ("9P2000.L"), Linux `net/9p/client.c` format
//! strings. `Tfsync`'s trailing `datasync[4]` is optional (older clients omit it).

use super::{msg, Decoder, Encoder, WireError, MAXWELEM};

/// `Tsetattr` fields after the fid.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tsetattr {
    /// `setattr::*` bits saying which fields apply.
    pub valid: u32,
    /// Permission bits (and type bits, ignored).
    pub mode: u32,
    /// New owner.
    pub uid: u32,
    /// New group.
    pub gid: u32,
    /// New size.
    pub size: u64,
    /// Access time, seconds.
    pub atime_sec: u64,
    /// Access time, nanoseconds.
    pub atime_nsec: u64,
    /// Modification time, seconds.
    pub mtime_sec: u64,
    /// Modification time, nanoseconds.
    pub mtime_nsec: u64,
}

/// `Tlock` fields after the fid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tlock<'a> {
    /// `lock::TYPE_*`.
    pub ty: u8,
    /// `lock::FLAGS_*`.
    pub flags: u32,
    /// First byte.
    pub start: u64,
    /// Length (0 = to end of file).
    pub length: u64,
    /// Guest process id.
    pub proc_id: u32,
    /// Client identifier.
    pub client_id: &'a [u8],
}

/// `Tgetlock` fields after the fid (and the body of `Rgetlock`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tgetlock<'a> {
    /// `lock::TYPE_*`.
    pub ty: u8,
    /// First byte.
    pub start: u64,
    /// Length (0 = to end of file).
    pub length: u64,
    /// Guest process id.
    pub proc_id: u32,
    /// Client identifier.
    pub client_id: &'a [u8],
}

/// A decoded T-message.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Tmessage<'a> {
    Version {
        msize: u32,
        version: &'a [u8],
    },
    Auth {
        afid: u32,
        uname: &'a [u8],
        aname: &'a [u8],
        n_uname: u32,
    },
    Attach {
        fid: u32,
        afid: u32,
        uname: &'a [u8],
        aname: &'a [u8],
        n_uname: u32,
    },
    Flush {
        oldtag: u16,
    },
    Walk {
        fid: u32,
        newfid: u32,
        names: Vec<&'a [u8]>,
    },
    Read {
        fid: u32,
        offset: u64,
        count: u32,
    },
    Write {
        fid: u32,
        offset: u64,
        data: &'a [u8],
    },
    Clunk {
        fid: u32,
    },
    Remove {
        fid: u32,
    },
    Statfs {
        fid: u32,
    },
    Lopen {
        fid: u32,
        flags: u32,
    },
    Lcreate {
        fid: u32,
        name: &'a [u8],
        flags: u32,
        mode: u32,
        gid: u32,
    },
    Symlink {
        fid: u32,
        name: &'a [u8],
        target: &'a [u8],
        gid: u32,
    },
    Mknod {
        dfid: u32,
        name: &'a [u8],
        mode: u32,
        major: u32,
        minor: u32,
        gid: u32,
    },
    Rename {
        fid: u32,
        dfid: u32,
        name: &'a [u8],
    },
    Readlink {
        fid: u32,
    },
    Getattr {
        fid: u32,
        request_mask: u64,
    },
    Setattr {
        fid: u32,
        attr: Tsetattr,
    },
    Xattrwalk {
        fid: u32,
        newfid: u32,
        name: &'a [u8],
    },
    Xattrcreate {
        fid: u32,
        name: &'a [u8],
        attr_size: u64,
        flags: u32,
    },
    Readdir {
        fid: u32,
        offset: u64,
        count: u32,
    },
    Fsync {
        fid: u32,
        datasync: u32,
    },
    Lock {
        fid: u32,
        lock: Tlock<'a>,
    },
    Getlock {
        fid: u32,
        lock: Tgetlock<'a>,
    },
    Link {
        dfid: u32,
        fid: u32,
        name: &'a [u8],
    },
    Mkdir {
        dfid: u32,
        name: &'a [u8],
        mode: u32,
        gid: u32,
    },
    Renameat {
        olddirfid: u32,
        oldname: &'a [u8],
        newdirfid: u32,
        newname: &'a [u8],
    },
    Unlinkat {
        dirfid: u32,
        name: &'a [u8],
        flags: u32,
    },
}

impl<'a> Tmessage<'a> {
    /// Decode the body of a T-message of type `ty`.
    pub fn decode(ty: u8, body: &'a [u8]) -> Result<Self, WireError> {
        let mut d = Decoder::new(body);
        let m = match ty {
            msg::TVERSION => Tmessage::Version {
                msize: d.u32()?,
                version: d.str()?,
            },
            msg::TAUTH => Tmessage::Auth {
                afid: d.u32()?,
                uname: d.str()?,
                aname: d.str()?,
                n_uname: d.u32()?,
            },
            msg::TATTACH => Tmessage::Attach {
                fid: d.u32()?,
                afid: d.u32()?,
                uname: d.str()?,
                aname: d.str()?,
                n_uname: d.u32()?,
            },
            msg::TFLUSH => Tmessage::Flush { oldtag: d.u16()? },
            msg::TWALK => {
                let fid = d.u32()?;
                let newfid = d.u32()?;
                let n = d.u16()?;
                if n as usize > MAXWELEM {
                    return Err(WireError::BadCount(n.into()));
                }
                let mut names = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    names.push(d.str()?);
                }
                Tmessage::Walk { fid, newfid, names }
            }
            msg::TREAD => Tmessage::Read {
                fid: d.u32()?,
                offset: d.u64()?,
                count: d.u32()?,
            },
            msg::TWRITE => Tmessage::Write {
                fid: d.u32()?,
                offset: d.u64()?,
                data: d.data()?,
            },
            msg::TCLUNK => Tmessage::Clunk { fid: d.u32()? },
            msg::TREMOVE => Tmessage::Remove { fid: d.u32()? },
            msg::TSTATFS => Tmessage::Statfs { fid: d.u32()? },
            msg::TLOPEN => Tmessage::Lopen {
                fid: d.u32()?,
                flags: d.u32()?,
            },
            msg::TLCREATE => Tmessage::Lcreate {
                fid: d.u32()?,
                name: d.str()?,
                flags: d.u32()?,
                mode: d.u32()?,
                gid: d.u32()?,
            },
            msg::TSYMLINK => Tmessage::Symlink {
                fid: d.u32()?,
                name: d.str()?,
                target: d.str()?,
                gid: d.u32()?,
            },
            msg::TMKNOD => Tmessage::Mknod {
                dfid: d.u32()?,
                name: d.str()?,
                mode: d.u32()?,
                major: d.u32()?,
                minor: d.u32()?,
                gid: d.u32()?,
            },
            msg::TRENAME => Tmessage::Rename {
                fid: d.u32()?,
                dfid: d.u32()?,
                name: d.str()?,
            },
            msg::TREADLINK => Tmessage::Readlink { fid: d.u32()? },
            msg::TGETATTR => Tmessage::Getattr {
                fid: d.u32()?,
                request_mask: d.u64()?,
            },
            msg::TSETATTR => Tmessage::Setattr {
                fid: d.u32()?,
                attr: Tsetattr {
                    valid: d.u32()?,
                    mode: d.u32()?,
                    uid: d.u32()?,
                    gid: d.u32()?,
                    size: d.u64()?,
                    atime_sec: d.u64()?,
                    atime_nsec: d.u64()?,
                    mtime_sec: d.u64()?,
                    mtime_nsec: d.u64()?,
                },
            },
            msg::TXATTRWALK => Tmessage::Xattrwalk {
                fid: d.u32()?,
                newfid: d.u32()?,
                name: d.str()?,
            },
            msg::TXATTRCREATE => Tmessage::Xattrcreate {
                fid: d.u32()?,
                name: d.str()?,
                attr_size: d.u64()?,
                flags: d.u32()?,
            },
            msg::TREADDIR => Tmessage::Readdir {
                fid: d.u32()?,
                offset: d.u64()?,
                count: d.u32()?,
            },
            msg::TFSYNC => {
                let fid = d.u32()?;
                let datasync = if d.remaining() == 0 { 0 } else { d.u32()? };
                Tmessage::Fsync { fid, datasync }
            }
            msg::TLOCK => Tmessage::Lock {
                fid: d.u32()?,
                lock: Tlock {
                    ty: d.u8()?,
                    flags: d.u32()?,
                    start: d.u64()?,
                    length: d.u64()?,
                    proc_id: d.u32()?,
                    client_id: d.str()?,
                },
            },
            msg::TGETLOCK => Tmessage::Getlock {
                fid: d.u32()?,
                lock: Tgetlock {
                    ty: d.u8()?,
                    start: d.u64()?,
                    length: d.u64()?,
                    proc_id: d.u32()?,
                    client_id: d.str()?,
                },
            },
            msg::TLINK => Tmessage::Link {
                dfid: d.u32()?,
                fid: d.u32()?,
                name: d.str()?,
            },
            msg::TMKDIR => Tmessage::Mkdir {
                dfid: d.u32()?,
                name: d.str()?,
                mode: d.u32()?,
                gid: d.u32()?,
            },
            msg::TRENAMEAT => Tmessage::Renameat {
                olddirfid: d.u32()?,
                oldname: d.str()?,
                newdirfid: d.u32()?,
                newname: d.str()?,
            },
            msg::TUNLINKAT => Tmessage::Unlinkat {
                dirfid: d.u32()?,
                name: d.str()?,
                flags: d.u32()?,
            },
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

    /// The message type number.
    pub fn msg_type(&self) -> u8 {
        match self {
            Tmessage::Version { .. } => msg::TVERSION,
            Tmessage::Auth { .. } => msg::TAUTH,
            Tmessage::Attach { .. } => msg::TATTACH,
            Tmessage::Flush { .. } => msg::TFLUSH,
            Tmessage::Walk { .. } => msg::TWALK,
            Tmessage::Read { .. } => msg::TREAD,
            Tmessage::Write { .. } => msg::TWRITE,
            Tmessage::Clunk { .. } => msg::TCLUNK,
            Tmessage::Remove { .. } => msg::TREMOVE,
            Tmessage::Statfs { .. } => msg::TSTATFS,
            Tmessage::Lopen { .. } => msg::TLOPEN,
            Tmessage::Lcreate { .. } => msg::TLCREATE,
            Tmessage::Symlink { .. } => msg::TSYMLINK,
            Tmessage::Mknod { .. } => msg::TMKNOD,
            Tmessage::Rename { .. } => msg::TRENAME,
            Tmessage::Readlink { .. } => msg::TREADLINK,
            Tmessage::Getattr { .. } => msg::TGETATTR,
            Tmessage::Setattr { .. } => msg::TSETATTR,
            Tmessage::Xattrwalk { .. } => msg::TXATTRWALK,
            Tmessage::Xattrcreate { .. } => msg::TXATTRCREATE,
            Tmessage::Readdir { .. } => msg::TREADDIR,
            Tmessage::Fsync { .. } => msg::TFSYNC,
            Tmessage::Lock { .. } => msg::TLOCK,
            Tmessage::Getlock { .. } => msg::TGETLOCK,
            Tmessage::Link { .. } => msg::TLINK,
            Tmessage::Mkdir { .. } => msg::TMKDIR,
            Tmessage::Renameat { .. } => msg::TRENAMEAT,
            Tmessage::Unlinkat { .. } => msg::TUNLINKAT,
        }
    }

    /// Append the encoded frame to `out`; returns its length.
    pub fn encode(&self, tag: u16, out: &mut Vec<u8>) -> Result<usize, WireError> {
        let mut e = Encoder::begin(out, self.msg_type(), tag);
        match self {
            Tmessage::Version { msize, version } => {
                e.u32(*msize).str(version)?;
            }
            Tmessage::Auth {
                afid,
                uname,
                aname,
                n_uname,
            } => {
                e.u32(*afid).str(uname)?.str(aname)?.u32(*n_uname);
            }
            Tmessage::Attach {
                fid,
                afid,
                uname,
                aname,
                n_uname,
            } => {
                e.u32(*fid).u32(*afid).str(uname)?.str(aname)?.u32(*n_uname);
            }
            Tmessage::Flush { oldtag } => {
                e.u16(*oldtag);
            }
            Tmessage::Walk { fid, newfid, names } => {
                let n = u16::try_from(names.len()).map_err(|_| WireError::TooLong)?;
                e.u32(*fid).u32(*newfid).u16(n);
                for name in names {
                    e.str(name)?;
                }
            }
            Tmessage::Read { fid, offset, count } | Tmessage::Readdir { fid, offset, count } => {
                e.u32(*fid).u64(*offset).u32(*count);
            }
            Tmessage::Write { fid, offset, data } => {
                e.u32(*fid).u64(*offset).data(data)?;
            }
            Tmessage::Clunk { fid }
            | Tmessage::Remove { fid }
            | Tmessage::Statfs { fid }
            | Tmessage::Readlink { fid } => {
                e.u32(*fid);
            }
            Tmessage::Lopen { fid, flags } => {
                e.u32(*fid).u32(*flags);
            }
            Tmessage::Lcreate {
                fid,
                name,
                flags,
                mode,
                gid,
            } => {
                e.u32(*fid).str(name)?.u32(*flags).u32(*mode).u32(*gid);
            }
            Tmessage::Symlink {
                fid,
                name,
                target,
                gid,
            } => {
                e.u32(*fid).str(name)?.str(target)?.u32(*gid);
            }
            Tmessage::Mknod {
                dfid,
                name,
                mode,
                major,
                minor,
                gid,
            } => {
                e.u32(*dfid)
                    .str(name)?
                    .u32(*mode)
                    .u32(*major)
                    .u32(*minor)
                    .u32(*gid);
            }
            Tmessage::Rename { fid, dfid, name } => {
                e.u32(*fid).u32(*dfid).str(name)?;
            }
            Tmessage::Getattr { fid, request_mask } => {
                e.u32(*fid).u64(*request_mask);
            }
            Tmessage::Setattr { fid, attr: a } => {
                e.u32(*fid)
                    .u32(a.valid)
                    .u32(a.mode)
                    .u32(a.uid)
                    .u32(a.gid)
                    .u64(a.size);
                e.u64(a.atime_sec)
                    .u64(a.atime_nsec)
                    .u64(a.mtime_sec)
                    .u64(a.mtime_nsec);
            }
            Tmessage::Xattrwalk { fid, newfid, name } => {
                e.u32(*fid).u32(*newfid).str(name)?;
            }
            Tmessage::Xattrcreate {
                fid,
                name,
                attr_size,
                flags,
            } => {
                e.u32(*fid).str(name)?.u64(*attr_size).u32(*flags);
            }
            Tmessage::Fsync { fid, datasync } => {
                e.u32(*fid).u32(*datasync);
            }
            Tmessage::Lock { fid, lock: l } => {
                e.u32(*fid)
                    .u8(l.ty)
                    .u32(l.flags)
                    .u64(l.start)
                    .u64(l.length)
                    .u32(l.proc_id);
                e.str(l.client_id)?;
            }
            Tmessage::Getlock { fid, lock: l } => {
                e.u32(*fid)
                    .u8(l.ty)
                    .u64(l.start)
                    .u64(l.length)
                    .u32(l.proc_id);
                e.str(l.client_id)?;
            }
            Tmessage::Link { dfid, fid, name } => {
                e.u32(*dfid).u32(*fid).str(name)?;
            }
            Tmessage::Mkdir {
                dfid,
                name,
                mode,
                gid,
            } => {
                e.u32(*dfid).str(name)?.u32(*mode).u32(*gid);
            }
            Tmessage::Renameat {
                olddirfid,
                oldname,
                newdirfid,
                newname,
            } => {
                e.u32(*olddirfid)
                    .str(oldname)?
                    .u32(*newdirfid)
                    .str(newname)?;
            }
            Tmessage::Unlinkat {
                dirfid,
                name,
                flags,
            } => {
                e.u32(*dirfid).str(name)?.u32(*flags);
            }
        }
        e.finish()
    }
}
