//! Codec unit tests: every T- and R-message encodes and decodes to itself,
//! and the framing checks reject inconsistent frames.

use super::*;

fn qid(n: u64) -> Qid {
    Qid {
        ty: qt::DIR,
        version: 3,
        path: n,
    }
}

fn all_t() -> Vec<Tmessage<'static>> {
    vec![
        Tmessage::Version {
            msize: 1 << 20,
            version: b"9P2000.L",
        },
        Tmessage::Auth {
            afid: 1,
            uname: b"u",
            aname: b"a",
            n_uname: 5,
        },
        Tmessage::Attach {
            fid: 1,
            afid: NOFID,
            uname: b"u",
            aname: b"",
            n_uname: 0,
        },
        Tmessage::Flush { oldtag: 9 },
        Tmessage::Walk {
            fid: 1,
            newfid: 2,
            names: vec![b"a", b"bb", b"..", b""],
        },
        Tmessage::Read {
            fid: 1,
            offset: u64::MAX,
            count: 7,
        },
        Tmessage::Write {
            fid: 1,
            offset: 3,
            data: b"hello",
        },
        Tmessage::Clunk { fid: 4 },
        Tmessage::Remove { fid: 4 },
        Tmessage::Statfs { fid: 4 },
        Tmessage::Lopen {
            fid: 4,
            flags: oflags::RDWR | oflags::TRUNC,
        },
        Tmessage::Lcreate {
            fid: 4,
            name: b"n",
            flags: 2,
            mode: 0o644,
            gid: 7,
        },
        Tmessage::Symlink {
            fid: 4,
            name: b"l",
            target: b"/etc",
            gid: 7,
        },
        Tmessage::Mknod {
            dfid: 4,
            name: b"p",
            mode: 0o10644,
            major: 1,
            minor: 2,
            gid: 3,
        },
        Tmessage::Rename {
            fid: 4,
            dfid: 5,
            name: b"r",
        },
        Tmessage::Readlink { fid: 4 },
        Tmessage::Getattr {
            fid: 4,
            request_mask: getattr::ALL,
        },
        Tmessage::Setattr {
            fid: 4,
            attr: Tsetattr {
                valid: 0x1ff,
                mode: 1,
                uid: 2,
                gid: 3,
                size: 4,
                atime_sec: 5,
                atime_nsec: 6,
                mtime_sec: 7,
                mtime_nsec: 8,
            },
        },
        Tmessage::Xattrwalk {
            fid: 4,
            newfid: 5,
            name: b"user.x",
        },
        Tmessage::Xattrcreate {
            fid: 4,
            name: b"user.x",
            attr_size: 10,
            flags: 1,
        },
        Tmessage::Readdir {
            fid: 4,
            offset: 99,
            count: 4096,
        },
        Tmessage::Fsync {
            fid: 4,
            datasync: 1,
        },
        Tmessage::Lock {
            fid: 4,
            lock: Tlock {
                ty: 1,
                flags: 1,
                start: 2,
                length: 3,
                proc_id: 4,
                client_id: b"c",
            },
        },
        Tmessage::Getlock {
            fid: 4,
            lock: Tgetlock {
                ty: 1,
                start: 2,
                length: 3,
                proc_id: 4,
                client_id: b"c",
            },
        },
        Tmessage::Link {
            dfid: 4,
            fid: 5,
            name: b"h",
        },
        Tmessage::Mkdir {
            dfid: 4,
            name: b"d",
            mode: 0o755,
            gid: 1,
        },
        Tmessage::Renameat {
            olddirfid: 4,
            oldname: b"a",
            newdirfid: 5,
            newname: b"b",
        },
        Tmessage::Unlinkat {
            dirfid: 4,
            name: b"a",
            flags: AT_REMOVEDIR,
        },
    ]
}

fn all_r() -> Vec<Rmessage<'static>> {
    vec![
        Rmessage::Lerror { ecode: 2 },
        Rmessage::Version {
            msize: 8192,
            version: b"9P2000.L",
        },
        Rmessage::Auth { aqid: qid(1) },
        Rmessage::Attach { qid: qid(2) },
        Rmessage::Flush,
        Rmessage::Walk {
            qids: vec![qid(1), qid(2)],
        },
        Rmessage::Read { data: b"data" },
        Rmessage::Write { count: 4 },
        Rmessage::Clunk,
        Rmessage::Remove,
        Rmessage::Statfs(Rstatfs {
            ty: 1,
            bsize: 2,
            blocks: 3,
            bfree: 4,
            bavail: 5,
            files: 6,
            ffree: 7,
            fsid: 8,
            namelen: 9,
        }),
        Rmessage::Lopen {
            qid: qid(3),
            iounit: 0,
        },
        Rmessage::Lcreate {
            qid: qid(4),
            iounit: 1,
        },
        Rmessage::Symlink { qid: qid(5) },
        Rmessage::Mknod { qid: qid(6) },
        Rmessage::Rename,
        Rmessage::Readlink { target: b"/x" },
        Rmessage::Getattr(Box::new(Rgetattr {
            valid: getattr::BASIC,
            qid: qid(7),
            mode: 0o100644,
            size: 12,
            gen: 1,
            ..Default::default()
        })),
        Rmessage::Setattr,
        Rmessage::Xattrwalk { size: 12 },
        Rmessage::Xattrcreate,
        Rmessage::Readdir { data: b"" },
        Rmessage::Fsync,
        Rmessage::Lock {
            status: lock::BLOCKED,
        },
        Rmessage::Getlock(Rgetlock {
            ty: 2,
            start: 0,
            length: 0,
            proc_id: 1,
            client_id: b"x",
        }),
        Rmessage::Link,
        Rmessage::Mkdir { qid: qid(8) },
        Rmessage::Renameat,
        Rmessage::Unlinkat,
    ]
}

#[test]
fn t_messages_round_trip() {
    for m in all_t() {
        let mut buf = Vec::new();
        let n = m.encode(0x1234, &mut buf).unwrap();
        assert_eq!(n, buf.len());
        let (tag, back) = Tmessage::decode_frame(&buf).unwrap();
        assert_eq!(tag, 0x1234);
        assert_eq!(back, m);
    }
}

#[test]
fn r_messages_round_trip() {
    for m in all_r() {
        let mut buf = Vec::new();
        m.encode(7, &mut buf).unwrap();
        let (tag, back) = Rmessage::decode_frame(&buf).unwrap();
        assert_eq!(tag, 7);
        assert_eq!(back, m);
    }
}

#[test]
fn every_truncation_is_an_error() {
    for m in all_t() {
        let mut buf = Vec::new();
        m.encode(1, &mut buf).unwrap();
        for cut in HEADER_LEN..buf.len() {
            let body = &buf[HEADER_LEN..cut];
            let r = Tmessage::decode(m.msg_type(), body);
            // Tfsync without datasync is the one legal shorter form.
            if matches!(m, Tmessage::Fsync { .. }) && body.len() == 4 {
                assert_eq!(
                    r,
                    Ok(Tmessage::Fsync {
                        fid: 4,
                        datasync: 0
                    })
                );
                continue;
            }
            assert!(r.is_err(), "{m:?} cut at {cut}");
        }
    }
}

#[test]
fn framing_checks() {
    assert_eq!(split_frame(&[1, 2, 3]), Err(WireError::Truncated));
    assert_eq!(
        split_frame(&[3, 0, 0, 0, 120, 0, 0]),
        Err(WireError::SizeTooSmall(3))
    );
    assert_eq!(
        split_frame(&[8, 0, 0, 0, 120, 0, 0]),
        Err(WireError::Truncated)
    );
    assert_eq!(
        split_frame(&[7, 0, 0, 0, 120, 0, 0, 1]),
        Err(WireError::TrailingBytes)
    );
    assert_eq!(Tmessage::decode(99, &[]), Err(WireError::UnknownType(99)));
    assert_eq!(
        Tmessage::decode(msg::TCLUNK, &[1, 0, 0, 0, 0]),
        Err(WireError::TrailingBytes)
    );
    // A write whose count exceeds the data.
    let body = [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5, 0, 0, 0, b'a'];
    assert_eq!(
        Tmessage::decode(msg::TWRITE, &body),
        Err(WireError::BadCount(5))
    );
    // Errno mapping.
    assert_eq!(WireError::Truncated.errno(), libc::EPROTO as u32);
    assert_eq!(WireError::BadCount(1).errno(), libc::EINVAL as u32);
    assert_eq!(WireError::UnknownType(1).errno(), libc::EOPNOTSUPP as u32);
}

#[test]
fn encoder_refuses_oversized_fields() {
    let long = vec![b'a'; 70_000];
    let m = Tmessage::Clunk { fid: 1 };
    let mut buf = Vec::new();
    m.encode(1, &mut buf).unwrap();
    let bad = Tmessage::Mkdir {
        dfid: 1,
        name: &long,
        mode: 0,
        gid: 0,
    };
    assert_eq!(bad.encode(1, &mut Vec::new()), Err(WireError::TooLong));
    let names = vec![&b"a"[..]; 70_000];
    let bad = Tmessage::Walk {
        fid: 1,
        newfid: 2,
        names,
    };
    assert_eq!(bad.encode(1, &mut Vec::new()), Err(WireError::TooLong));
}

#[test]
fn dirents_round_trip() {
    let ents = [
        Dirent {
            qid: qid(1),
            offset: 10,
            ty: 4,
            name: b".",
        },
        Dirent {
            qid: qid(2),
            offset: 20,
            ty: 8,
            name: b"file",
        },
    ];
    let mut buf = Vec::new();
    for e in &ents {
        e.encode(&mut buf).unwrap();
    }
    assert_eq!(buf.len(), Dirent::encoded_len(1) + Dirent::encoded_len(4));
    assert_eq!(Dirent::decode_all(&buf).unwrap(), ents);
    assert_eq!(
        Dirent::decode_all(&buf[..buf.len() - 1]),
        Err(WireError::Truncated)
    );
}
