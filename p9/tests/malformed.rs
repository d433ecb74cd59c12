//! Malformed T-messages: each one is answered with an error (an `Rlerror`
//! when the tag is readable) and the server keeps serving afterwards.

mod common;

use common::{Client, ROOT};
use p9::wire::{msg, Rmessage, Tmessage};

fn frame(ty: u8, tag: u16, body: &[u8]) -> Vec<u8> {
    let mut f = ((7 + body.len()) as u32).to_le_bytes().to_vec();
    f.push(ty);
    f.extend_from_slice(&tag.to_le_bytes());
    f.extend_from_slice(body);
    f
}

/// Send raw bytes, expect an `Rlerror` with `tag`; returns the errno. The direct and the
/// copying paths must give the same answer.
fn lerror(c: &Client, bytes: &[u8], tag: u16) -> i32 {
    let out = c.raw(bytes).expect("a readable tag must get an answer");
    let copied = c
        .raw_copying(bytes)
        .expect("a readable tag must get an answer");
    assert_eq!(
        out, copied,
        "direct and copying paths answer {bytes:?} differently"
    );
    let (t, m) = Rmessage::decode_frame(&out).unwrap();
    assert_eq!(t, tag);
    match m {
        Rmessage::Lerror { ecode } => ecode as i32,
        other => panic!("expected Rlerror, got {other:?}"),
    }
}

fn still_serving(c: &mut Client) {
    assert!(c.getattr(ROOT).is_ok(), "server stopped serving");
}

#[test]
fn too_short_for_a_tag_is_an_io_error() {
    let mut c = Client::attached();
    for bytes in [&[][..], &[9, 0, 0], &[7, 0, 0, 0, 100, 1]] {
        let e = c.raw(bytes).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
        let e = c.raw_copying(bytes).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
    }
    still_serving(&mut c);
}

#[test]
fn lying_size_fields() {
    let mut c = Client::attached();
    // Smaller than the header.
    assert_eq!(
        lerror(&c, &[3, 0, 0, 0, msg::TCLUNK, 5, 0], 5),
        libc::EPROTO
    );
    // Larger than msize.
    let mut f = frame(msg::TCLUNK, 6, &1u32.to_le_bytes());
    f[..4].copy_from_slice(&u32::MAX.to_le_bytes());
    assert_eq!(lerror(&c, &f, 6), libc::EMSGSIZE);
    // Larger than the bytes actually there.
    let mut f = frame(msg::TCLUNK, 7, &1u32.to_le_bytes());
    f[..4].copy_from_slice(&100u32.to_le_bytes());
    assert_eq!(lerror(&c, &f, 7), libc::EPROTO);
    // Smaller than the body: the body is cut, the fields are missing.
    let mut f = frame(
        msg::TGETATTR,
        8,
        &[1, 0, 0, 0, 0xff, 0xff, 0, 0, 0, 0, 0, 0],
    );
    f[..4].copy_from_slice(&11u32.to_le_bytes());
    assert_eq!(lerror(&c, &f, 8), libc::EPROTO);
    still_serving(&mut c);
}

#[test]
fn truncated_bodies_of_every_message() {
    let mut c = Client::attached();
    let samples: Vec<Tmessage<'_>> = vec![
        Tmessage::Version {
            msize: 8192,
            version: b"9P2000.L",
        },
        Tmessage::Attach {
            fid: 9,
            afid: !0,
            uname: b"u",
            aname: b"",
            n_uname: 0,
        },
        Tmessage::Walk {
            fid: ROOT,
            newfid: 9,
            names: vec![b"a", b"b"],
        },
        Tmessage::Read {
            fid: ROOT,
            offset: 0,
            count: 10,
        },
        Tmessage::Write {
            fid: ROOT,
            offset: 0,
            data: b"abc",
        },
        Tmessage::Lcreate {
            fid: ROOT,
            name: b"n",
            flags: 0,
            mode: 0,
            gid: 0,
        },
        Tmessage::Symlink {
            fid: ROOT,
            name: b"n",
            target: b"t",
            gid: 0,
        },
        Tmessage::Setattr {
            fid: ROOT,
            attr: Default::default(),
        },
        Tmessage::Renameat {
            olddirfid: ROOT,
            oldname: b"a",
            newdirfid: ROOT,
            newname: b"b",
        },
        Tmessage::Lock {
            fid: ROOT,
            lock: p9::wire::Tlock {
                ty: 0,
                flags: 0,
                start: 0,
                length: 0,
                proc_id: 0,
                client_id: b"c",
            },
        },
    ];
    for m in &samples {
        let mut full = Vec::new();
        m.encode(42, &mut full).unwrap();
        for cut in 7..full.len() {
            let body = &full[7..cut];
            let e = lerror(&c, &frame(m.msg_type(), 42, body), 42);
            assert!(
                e == libc::EPROTO || e == libc::EINVAL,
                "{m:?} cut at {cut}: errno {e}"
            );
        }
        // Trailing garbage is refused too.
        let mut long = full[7..].to_vec();
        long.push(0);
        assert_eq!(
            lerror(&c, &frame(m.msg_type(), 43, &long), 43),
            libc::EPROTO,
            "{m:?}"
        );
    }
    still_serving(&mut c);
}

/// A Twrite whose transport holds less than its size field says is a truncated message
/// (`EPROTO`) before anything else: also for a bad fid, and on both paths (`lerror`).
#[test]
fn twrite_shorter_than_its_size_field() {
    let c = Client::attached();
    for fid in [ROOT, 99] {
        let mut full = Vec::new();
        Tmessage::Write {
            fid,
            offset: 0,
            data: &[7u8; 100],
        }
        .encode(44, &mut full)
        .unwrap();
        for cut in [23, 24, 60, full.len() - 1] {
            assert_eq!(
                lerror(&c, &full[..cut], 44),
                libc::EPROTO,
                "fid {fid} cut at {cut}"
            );
        }
    }
}

#[test]
fn string_length_beyond_the_buffer() {
    let mut c = Client::attached();
    let mut body = ROOT.to_le_bytes().to_vec();
    body.extend_from_slice(&9u32.to_le_bytes());
    body.extend_from_slice(&1u16.to_le_bytes());
    body.extend_from_slice(&60000u16.to_le_bytes()); // name length far beyond the end
    body.extend_from_slice(b"abc");
    assert_eq!(lerror(&c, &frame(msg::TWALK, 3, &body), 3), libc::EPROTO);
    still_serving(&mut c);
}

#[test]
fn huge_counts() {
    let mut c = Client::attached();
    // nwname above 16.
    let mut body = ROOT.to_le_bytes().to_vec();
    body.extend_from_slice(&9u32.to_le_bytes());
    body.extend_from_slice(&17u16.to_le_bytes());
    for _ in 0..17 {
        body.extend_from_slice(&[1, 0, b'a']);
    }
    assert_eq!(lerror(&c, &frame(msg::TWALK, 1, &body), 1), libc::EINVAL);
    let mut body = ROOT.to_le_bytes().to_vec();
    body.extend_from_slice(&9u32.to_le_bytes());
    body.extend_from_slice(&u16::MAX.to_le_bytes());
    assert_eq!(lerror(&c, &frame(msg::TWALK, 2, &body), 2), libc::EINVAL);
    // Twrite count larger than the data.
    let mut body = ROOT.to_le_bytes().to_vec();
    body.extend_from_slice(&0u64.to_le_bytes());
    body.extend_from_slice(&u32::MAX.to_le_bytes());
    body.extend_from_slice(b"abc");
    assert_eq!(lerror(&c, &frame(msg::TWRITE, 3, &body), 3), libc::EINVAL);
    // Tread / Treaddir counts far above msize are clamped, not trusted.
    std::fs::write(c.export().join("f"), b"abc").unwrap();
    c.walk_to(2, "f").unwrap();
    c.lopen(2, 0).unwrap();
    assert_eq!(c.read(2, 0, u32::MAX).unwrap(), b"abc");
    assert_eq!(c.read(2, u64::MAX, 10), Err(libc::EINVAL));
    c.walk(ROOT, 3, &[]).unwrap();
    c.lopen(3, 0).unwrap();
    assert!(c.readdir(3, 0, u32::MAX).unwrap().len() >= 3);
    still_serving(&mut c);
}

#[test]
fn unknown_and_reply_types() {
    let mut c = Client::attached();
    for ty in [
        0u8,
        1,
        6,
        7,
        10,
        28,
        100 + 13,
        101,
        106,
        112,
        114,
        124,
        126,
        200,
        255,
    ] {
        let e = lerror(&c, &frame(ty, 77, &[0; 8]), 77);
        assert!(e == libc::EOPNOTSUPP || e == libc::EPROTO, "type {ty}: {e}");
    }
    still_serving(&mut c);
}

#[test]
fn bad_fids() {
    let mut c = Client::attached();
    for m in [
        Tmessage::Walk {
            fid: 99,
            newfid: 100,
            names: vec![],
        },
        Tmessage::Read {
            fid: 99,
            offset: 0,
            count: 1,
        },
        Tmessage::Lopen { fid: 99, flags: 0 },
        Tmessage::Getattr {
            fid: 99,
            request_mask: 0,
        },
        Tmessage::Clunk { fid: 99 },
        Tmessage::Mkdir {
            dfid: 99,
            name: b"x",
            mode: 0,
            gid: 0,
        },
        Tmessage::Attach {
            fid: !0,
            afid: !0,
            uname: b"",
            aname: b"",
            n_uname: 0,
        },
    ] {
        assert_eq!(c.err(&m), libc::EBADF, "{m:?}");
    }
    // An xattr fid is not a file.
    c.call(&Tmessage::Xattrwalk {
        fid: ROOT,
        newfid: 5,
        name: b"",
    });
    assert_eq!(
        c.err(&Tmessage::Walk {
            fid: 5,
            newfid: 6,
            names: vec![]
        }),
        libc::EBADF
    );
    assert_eq!(c.err(&Tmessage::Lopen { fid: 5, flags: 0 }), libc::EBADF);
    still_serving(&mut c);
}

/// Deterministic pseudo-random frames (a tiny in-test fuzzer): no panic, and
/// every answer is a well-formed R-message.
#[test]
fn random_frames_never_break_the_server() {
    let mut c = Client::attached();
    std::fs::write(c.export().join("f"), b"abc").unwrap();
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let types = [
        8u8, 12, 14, 16, 18, 20, 22, 24, 26, 30, 32, 40, 50, 52, 54, 70, 72, 74, 76, 104, 108, 110,
        116, 118, 120, 122,
    ];
    for _ in 0..20_000 {
        let ty = types[(next() % types.len() as u64) as usize];
        let len = (next() % 40) as usize;
        let mut body: Vec<u8> = (0..len).map(|_| (next() % 4) as u8).collect();
        if !body.is_empty() && next() % 2 == 0 {
            body[0] = 1; // often a valid fid
        }
        let f = frame(ty, 5, &body);
        // Alternate the direct and the copying path.
        c.direct = next() % 2 == 0;
        let out = c.raw(&f).unwrap();
        let (tag, _) = Rmessage::decode_frame(&out).expect("malformed reply");
        assert_eq!(tag, 5);
    }
    // Re-attach in case the random stream clunked the root fid.
    c.direct = true;
    let _ = c.clunk(ROOT);
    c.attach(ROOT, b"").unwrap();
    still_serving(&mut c);
}
