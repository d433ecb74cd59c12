//! Every 9P2000.L message served by `p9::Server`, round-tripped through the
//! test client against a temporary directory (no VM).

mod common;

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};

use common::{Client, ROOT};
use p9::wire::{self, lock, oflags, qt, setattr, Rmessage, Tgetlock, Tlock, Tmessage, Tsetattr};
use p9::{Config, Server};

#[test]
fn version_negotiates_msize_down_and_resets_fids() {
    let mut c = Client::new();
    assert_eq!(
        c.version(64 << 20),
        (p9::DEFAULT_MSIZE_MAX, b"9P2000.L".to_vec())
    );
    assert_eq!(c.version(8192).0, 8192);
    assert_eq!(c.srv.msize(), 8192);
    c.attach(ROOT, b"").unwrap();
    assert_eq!(c.srv.fid_count(), 1);
    let r = c.call(&Tmessage::Version {
        msize: 1 << 20,
        version: b"9P2000.u",
    });
    assert_eq!(
        r.msg(),
        Rmessage::Version {
            msize: 1 << 20,
            version: b"unknown"
        }
    );
    assert_eq!(c.srv.fid_count(), 0, "Tversion clunks all fids");
    assert_eq!(
        c.err(&Tmessage::Version {
            msize: 100,
            version: b"9P2000.L"
        }),
        libc::EINVAL
    );
}

#[test]
fn auth_is_refused_and_attach_selects_root_or_subdir() {
    let mut c = Client::new();
    c.version(1 << 20);
    let e = c.err(&Tmessage::Auth {
        afid: 5,
        uname: b"u",
        aname: b"",
        n_uname: 0,
    });
    assert_eq!(e, libc::EOPNOTSUPP);
    let q = c.attach(ROOT, b"").unwrap();
    assert_eq!(q.ty, qt::DIR);
    assert_eq!(q.path, std::fs::metadata(c.export()).unwrap().ino());
    assert_eq!(c.attach(ROOT, b""), Err(libc::EBADF), "fid in use");
    std::fs::create_dir_all(c.export().join("a/b")).unwrap();
    let q = c.attach(2, b"/a/b").unwrap();
    assert_eq!(
        q.path,
        std::fs::metadata(c.export().join("a/b")).unwrap().ino()
    );
    assert_eq!(c.attach(3, b"nope"), Err(libc::ENOENT));
    assert_eq!(c.attach(3, b"a/../.."), Err(libc::EINVAL));
}

#[test]
fn flush_is_answered() {
    let mut c = Client::attached();
    assert_eq!(
        c.call(&Tmessage::Flush { oldtag: 3 }).msg(),
        Rmessage::Flush
    );
}

#[test]
fn walk_clone_multi_and_partial() {
    let mut c = Client::attached();
    std::fs::create_dir_all(c.export().join("a/b")).unwrap();
    std::fs::write(c.export().join("a/b/f"), b"x").unwrap();
    assert_eq!(c.walk(ROOT, 2, &[]).unwrap(), vec![]);
    assert_eq!(c.getattr(2).unwrap().qid, c.getattr(ROOT).unwrap().qid);
    let qids = c.walk(ROOT, 3, &[b"a", b"b", b"f"]).unwrap();
    assert_eq!(qids.len(), 3);
    assert_eq!(qids[0].ty, qt::DIR);
    assert_eq!(qids[2].ty, qt::FILE);
    assert_eq!(
        qids[2].path,
        std::fs::metadata(c.export().join("a/b/f")).unwrap().ino()
    );
    // Partial walk: the qids of the successful prefix, no newfid.
    assert_eq!(c.walk(ROOT, 4, &[b"a", b"zz", b"f"]).unwrap().len(), 1);
    assert_eq!(c.getattr(4), Err(libc::EBADF));
    assert_eq!(c.walk(ROOT, 4, &[b"zz"]), Err(libc::ENOENT));
    // newfid in use, walking a fid onto itself.
    assert_eq!(c.walk(ROOT, 3, &[b"a"]), Err(libc::EBADF));
    c.walk(2, 2, &[b"a"]).unwrap();
    assert_eq!(c.getattr(2).unwrap().qid, qids[0]);
    // Through a file.
    assert_eq!(c.walk(3, 5, &[b"x"]), Err(libc::ENOTDIR));
    // 16 names is the maximum and allowed.
    let names: Vec<&[u8]> = vec![b".."; 16];
    assert_eq!(c.walk(ROOT, 6, &names).unwrap().len(), 16);
}

#[test]
fn lopen_read_write_clunk() {
    let mut c = Client::attached();
    std::fs::write(c.export().join("f"), b"hello world").unwrap();
    c.walk_to(2, "f").unwrap();
    assert_eq!(c.read(2, 0, 10), Err(libc::EBADF), "read before open");
    let q = c.lopen(2, oflags::RDWR).unwrap();
    assert_eq!(q.ty, qt::FILE);
    assert_eq!(
        c.lopen(2, oflags::RDONLY),
        Err(libc::EINVAL),
        "already open"
    );
    assert_eq!(c.read(2, 0, 5).unwrap(), b"hello");
    assert_eq!(c.read(2, 6, 100).unwrap(), b"world");
    assert_eq!(c.read(2, 100, 100).unwrap(), b"");
    assert_eq!(c.write(2, 6, b"there").unwrap(), 5);
    assert_eq!(std::fs::read(c.export().join("f")).unwrap(), b"hello there");
    c.clunk(2).unwrap();
    assert_eq!(c.clunk(2), Err(libc::EBADF));
    // Directories open read-only only; lopen with O_TRUNC truncates.
    c.walk(ROOT, 3, &[]).unwrap();
    assert_eq!(c.lopen(3, oflags::WRONLY), Err(libc::EISDIR));
    c.walk_to(4, "f").unwrap();
    c.lopen(4, oflags::WRONLY | oflags::TRUNC).unwrap();
    assert_eq!(std::fs::metadata(c.export().join("f")).unwrap().len(), 0);
    assert_eq!(c.read(4, 0, 1), Err(libc::EBADF), "write-only fd");
    assert_eq!(c.lopen(ROOT, oflags::NOACCESS), Err(libc::EINVAL));
}

#[test]
fn big_reads_and_writes_use_the_whole_msize() {
    let mut c = Client::new();
    assert_eq!(c.version(4 << 20).0, 4 << 20);
    c.attach(ROOT, b"").unwrap();
    let data: Vec<u8> = (0..(5u32 << 20))
        .map(|i| (i * 7 + i / 4096) as u8)
        .collect();
    std::fs::write(c.export().join("big"), &data).unwrap();
    c.walk_to(2, "big").unwrap();
    c.lopen(2, oflags::RDWR).unwrap();
    let chunk = c.read(2, 0, u32::MAX).unwrap();
    assert_eq!(
        chunk.len(),
        (4 << 20) - wire::RREAD_HEADER_LEN,
        "capped to msize"
    );
    assert_eq!(chunk, &data[..chunk.len()]);
    let payload = vec![0xabu8; (4 << 20) - wire::TWRITE_HEADER_LEN];
    assert_eq!(c.write(2, 1, &payload).unwrap() as usize, payload.len());
    let back = std::fs::read(c.export().join("big")).unwrap();
    assert_eq!(&back[1..1 + payload.len()], &payload[..]);
    assert_eq!(back[0], data[0]);
}

/// The copying path (`handle_message`) and the direct one (`handle_direct`, the default of
/// the test client) give byte-identical replies and files for the same I/O.
#[test]
fn copying_and_direct_paths_agree() {
    let data: Vec<u8> = (0..(600u32 << 10))
        .map(|i| (i * 13 + i / 511) as u8)
        .collect();
    let mut replies = Vec::new();
    let mut files = Vec::new();
    for copying in [false, true] {
        let mut c = Client::new();
        if copying {
            c = c.copying();
        }
        c.version(256 << 10);
        c.attach(ROOT, b"").unwrap();
        std::fs::write(c.export().join("f"), &data).unwrap();
        c.walk_to(2, "f").unwrap();
        c.lopen(2, oflags::RDWR).unwrap();
        let mut out = Vec::new();
        for (offset, count) in [
            (0u64, 100u32),
            (5000, 200_000),
            (590 << 10, 65536),
            (700 << 10, 10),
            (1, u32::MAX),
        ] {
            out.push(c.read(2, offset, count).unwrap());
        }
        for (offset, len) in [(3u64, 1000usize), (650 << 10, 100_000), (0, 0)] {
            out.push(
                c.write(2, offset, &data[..len])
                    .unwrap()
                    .to_le_bytes()
                    .to_vec(),
            );
        }
        // Zero-length I/O still checks the fd: reading a write-only file, writing a read-only
        // one, reading a directory, an offset beyond i64.
        c.walk_to(3, "f").unwrap();
        c.lopen(3, oflags::WRONLY).unwrap();
        c.walk_to(4, "f").unwrap();
        c.lopen(4, oflags::RDONLY).unwrap();
        c.walk(ROOT, 5, &[]).unwrap();
        c.lopen(5, oflags::RDONLY).unwrap();
        for m in [
            Tmessage::Read {
                fid: 3,
                offset: 0,
                count: 0,
            },
            Tmessage::Write {
                fid: 4,
                offset: 0,
                data: b"",
            },
            Tmessage::Read {
                fid: 5,
                offset: 0,
                count: 0,
            },
            Tmessage::Read {
                fid: 4,
                offset: u64::MAX,
                count: 10,
            },
            Tmessage::Write {
                fid: 3,
                offset: u64::MAX,
                data: b"x",
            },
        ] {
            out.push(c.call(&m).buf);
        }
        replies.push(out);
        files.push(std::fs::read(c.export().join("f")).unwrap());
    }
    assert_eq!(replies[0], replies[1]);
    assert_eq!(files[0], files[1]);
    assert_eq!(files[0].len(), (650 << 10) + 100_000);
}

#[test]
fn lcreate_creates_and_opens() {
    let mut c = Client::attached();
    c.walk(ROOT, 2, &[]).unwrap();
    let q = c.lcreate(2, b"new", oflags::RDWR, 0o640).unwrap();
    assert_eq!(q.ty, qt::FILE);
    assert_eq!(c.write(2, 0, b"abc").unwrap(), 3);
    assert_eq!(c.read(2, 0, 10).unwrap(), b"abc");
    let md = std::fs::metadata(c.export().join("new")).unwrap();
    assert_eq!(md.permissions().mode() & 0o7777, 0o640);
    assert_eq!(md.uid(), common::euid(), "owned by the server's user");
    // The fid now names the file: its getattr matches.
    assert_eq!(c.getattr(2).unwrap().qid, q);
    // Exclusive create of an existing name fails; plain create opens it.
    c.walk(ROOT, 3, &[]).unwrap();
    assert_eq!(
        c.lcreate(3, b"new", oflags::RDWR | oflags::EXCL, 0o600),
        Err(libc::EEXIST)
    );
    c.lcreate(3, b"new", oflags::RDONLY, 0o600).unwrap();
    assert_eq!(c.read(3, 0, 10).unwrap(), b"abc");
    // Umask of the server does not eat the guest's mode; set-id bits are dropped.
    c.walk(ROOT, 4, &[]).unwrap();
    c.lcreate(4, b"g", oflags::WRONLY, 0o6777).unwrap();
    let mode = std::fs::metadata(c.export().join("g"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o777);
    // Creating in a file fid fails.
    assert_eq!(
        c.lcreate(4, b"x", oflags::RDWR, 0o600),
        Err(libc::EINVAL),
        "fid is open"
    );
    c.walk_to(5, "g").unwrap();
    assert_eq!(c.lcreate(5, b"x", oflags::RDWR, 0o600), Err(libc::ENOTDIR));
}

#[test]
fn remove_clunks_and_removes() {
    let mut c = Client::attached();
    std::fs::write(c.export().join("f"), b"").unwrap();
    std::fs::create_dir(c.export().join("d")).unwrap();
    c.walk_to(2, "f").unwrap();
    c.unit(&Tmessage::Remove { fid: 2 }).unwrap();
    assert!(!c.export().join("f").exists());
    assert_eq!(c.getattr(2), Err(libc::EBADF));
    c.walk_to(3, "d").unwrap();
    c.unit(&Tmessage::Remove { fid: 3 }).unwrap();
    assert!(!c.export().join("d").exists());
    // The root cannot be removed, and the fid is clunked anyway.
    c.walk(ROOT, 4, &[]).unwrap();
    assert_eq!(c.unit(&Tmessage::Remove { fid: 4 }), Err(libc::EBUSY));
    assert_eq!(c.getattr(4), Err(libc::EBADF));
}

#[test]
fn getattr_and_setattr() {
    let mut c = Client::attached();
    std::fs::write(c.export().join("f"), b"0123456789").unwrap();
    c.walk_to(2, "f").unwrap();
    let a = c.getattr(2).unwrap();
    let md = std::fs::metadata(c.export().join("f")).unwrap();
    assert_eq!(a.valid, wire::getattr::BASIC);
    assert_eq!(a.mode, md.mode());
    assert_eq!((a.uid, a.gid, a.size, a.nlink), (md.uid(), md.gid(), 10, 1));
    assert_eq!(a.mtime_sec as i64, md.mtime());
    let set = |valid, mode, size| Tsetattr {
        valid,
        mode,
        size,
        ..Default::default()
    };
    c.unit(&Tmessage::Setattr {
        fid: 2,
        attr: set(setattr::MODE, 0o4600, 0),
    })
    .unwrap();
    assert_eq!(
        c.getattr(2).unwrap().mode & 0o7777,
        0o600,
        "set-uid dropped"
    );
    c.unit(&Tmessage::Setattr {
        fid: 2,
        attr: set(setattr::SIZE, 0, 4),
    })
    .unwrap();
    assert_eq!(std::fs::read(c.export().join("f")).unwrap(), b"0123");
    let t = Tsetattr {
        valid: setattr::ATIME | setattr::ATIME_SET | setattr::MTIME | setattr::MTIME_SET,
        atime_sec: 1_000_000,
        atime_nsec: 5,
        mtime_sec: 2_000_000,
        mtime_nsec: 7,
        ..Default::default()
    };
    c.unit(&Tmessage::Setattr { fid: 2, attr: t }).unwrap();
    let a = c.getattr(2).unwrap();
    assert_eq!(
        (a.atime_sec, a.atime_nsec, a.mtime_sec, a.mtime_nsec),
        (1_000_000, 5, 2_000_000, 7)
    );
    // MTIME without MTIME_SET means "now".
    c.unit(&Tmessage::Setattr {
        fid: 2,
        attr: set(setattr::MTIME, 0, 0),
    })
    .unwrap();
    assert!(c.getattr(2).unwrap().mtime_sec > 2_000_000);
    // chown is accepted and ignored under the default ownership policy.
    let chown = Tsetattr {
        valid: setattr::UID | setattr::GID,
        uid: 4242,
        gid: 4242,
        ..Default::default()
    };
    c.unit(&Tmessage::Setattr {
        fid: 2,
        attr: chown,
    })
    .unwrap();
    assert_ne!(c.getattr(2).unwrap().uid, 4242);
    // Truncating a directory fails.
    assert_eq!(
        c.unit(&Tmessage::Setattr {
            fid: ROOT,
            attr: set(setattr::SIZE, 0, 0)
        }),
        Err(libc::EISDIR)
    );
    // Symlink times are set on the link itself.
    std::os::unix::fs::symlink("/nonexistent", c.export().join("l")).unwrap();
    c.walk_to(3, "l").unwrap();
    c.unit(&Tmessage::Setattr { fid: 3, attr: t }).unwrap();
    assert_eq!(
        std::fs::symlink_metadata(c.export().join("l"))
            .unwrap()
            .mtime(),
        2_000_000
    );
    assert_eq!(
        c.unit(&Tmessage::Setattr {
            fid: 3,
            attr: set(setattr::MODE, 0o777, 0)
        }),
        Err(libc::EOPNOTSUPP)
    );
}

#[test]
fn readdir_lists_everything_across_batches() {
    let mut c = Client::attached();
    let mut want = vec![b".".to_vec(), b"..".to_vec()];
    for i in 0..300 {
        let name = format!("file-with-a-longish-name-{i:04}");
        std::fs::write(c.export().join(&name), b"").unwrap();
        want.push(name.into_bytes());
    }
    std::fs::create_dir(c.export().join("sub")).unwrap();
    want.push(b"sub".to_vec());
    want.sort();
    c.walk(ROOT, 2, &[]).unwrap();
    assert_eq!(c.readdir(2, 0, 4096), Err(libc::EBADF), "not opened");
    c.lopen(2, oflags::RDONLY | oflags::DIRECTORY).unwrap();
    // Small batches (one page) and one big batch give the same listing.
    assert_eq!(c.list(2, 512), want);
    assert_eq!(c.list(2, 1 << 20), want);
    let all = c.readdir(2, 0, 1 << 20).unwrap();
    let sub = all.iter().find(|e| e.0 == b"sub").unwrap();
    assert_eq!(sub.2, libc::DT_DIR);
    // A count too small for any entry is an error, not end-of-directory.
    assert_eq!(c.readdir(2, 0, 10), Err(libc::EINVAL));
    // Readdir of a file fails.
    c.walk_to(3, "sub").unwrap();
    c.walk(ROOT, 4, &[b"file-with-a-longish-name-0000"])
        .unwrap();
    c.lopen(4, oflags::RDONLY).unwrap();
    assert_eq!(c.readdir(4, 0, 4096), Err(libc::ENOTDIR));
}

#[test]
fn statfs_reports_the_host_filesystem() {
    let mut c = Client::attached();
    let r = c.call(&Tmessage::Statfs { fid: ROOT });
    let Rmessage::Statfs(s) = r.msg() else {
        panic!("{:?}", r.msg())
    };
    assert!(s.bsize > 0 && s.blocks > 0);
    assert_eq!(s.namelen, 255);
}

#[test]
fn symlink_and_readlink() {
    let mut c = Client::attached();
    let r = c.call(&Tmessage::Symlink {
        fid: ROOT,
        name: b"l",
        target: b"../../etc/passwd",
        gid: 0,
    });
    let Rmessage::Symlink { qid } = r.msg() else {
        panic!("{:?}", r.msg())
    };
    assert_eq!(qid.ty, qt::SYMLINK);
    assert_eq!(
        std::fs::read_link(c.export().join("l"))
            .unwrap()
            .as_os_str()
            .as_encoded_bytes(),
        b"../../etc/passwd"
    );
    c.walk_to(2, "l").unwrap();
    assert_eq!(c.readlink(2).unwrap(), b"../../etc/passwd");
    assert_eq!(c.readlink(ROOT), Err(libc::EINVAL));
    let e = c.err(&Tmessage::Symlink {
        fid: ROOT,
        name: b"l",
        target: b"x",
        gid: 0,
    });
    assert_eq!(e, libc::EEXIST);
    let e = c.err(&Tmessage::Symlink {
        fid: ROOT,
        name: b"e",
        target: b"",
        gid: 0,
    });
    assert_eq!(e, libc::ENOENT);
}

#[test]
fn mknod_makes_fifos_and_sockets_but_no_devices() {
    let mut c = Client::attached();
    let mk = |name: &'static [u8], mode, major, minor| Tmessage::Mknod {
        dfid: ROOT,
        name,
        mode,
        major,
        minor,
        gid: 0,
    };
    let r = c.call(&mk(b"fifo", libc::S_IFIFO | 0o600, 0, 0));
    assert!(matches!(r.msg(), Rmessage::Mknod { .. }), "{:?}", r.msg());
    assert!(std::fs::metadata(c.export().join("fifo"))
        .unwrap()
        .file_type()
        .is_fifo());
    assert!(c
        .call(&mk(b"sock", libc::S_IFSOCK | 0o600, 0, 0))
        .errno()
        .is_none());
    assert!(c
        .call(&mk(b"reg", libc::S_IFREG | 0o600, 0, 0))
        .errno()
        .is_none());
    assert!(c
        .call(&mk(b"whiteout", libc::S_IFCHR, 0, 0))
        .errno()
        .is_none());
    assert_eq!(
        c.err(&mk(b"null", libc::S_IFCHR | 0o666, 1, 3)),
        libc::EPERM
    );
    assert_eq!(c.err(&mk(b"sda", libc::S_IFBLK | 0o666, 8, 0)), libc::EPERM);
    assert_eq!(
        c.err(&mk(b"dir", libc::S_IFDIR | 0o666, 0, 0)),
        libc::EINVAL
    );
    // Opening special files for I/O is refused (a FIFO would block a worker).
    c.walk_to(2, "fifo").unwrap();
    assert_eq!(c.lopen(2, oflags::RDONLY), Err(libc::ENXIO));
}

#[test]
fn mkdir_rename_renameat_unlinkat_link() {
    let mut c = Client::attached();
    let q = c.mkdir(ROOT, b"d", 0o775).unwrap();
    assert_eq!(q.ty, qt::DIR);
    let md = std::fs::metadata(c.export().join("d")).unwrap();
    assert_eq!(md.permissions().mode() & 0o7777, 0o775);
    assert_eq!(c.mkdir(ROOT, b"d", 0o755), Err(libc::EEXIST));
    std::fs::write(c.export().join("f"), b"data").unwrap();
    // Trename moves the fid's file and the fid follows it.
    c.walk_to(2, "f").unwrap();
    c.walk_to(3, "d").unwrap();
    c.unit(&Tmessage::Rename {
        fid: 2,
        dfid: 3,
        name: b"g",
    })
    .unwrap();
    assert!(c.export().join("d/g").exists());
    c.unit(&Tmessage::Rename {
        fid: 2,
        dfid: ROOT,
        name: b"h",
    })
    .unwrap();
    assert_eq!(std::fs::read(c.export().join("h")).unwrap(), b"data");
    // Trenameat by names.
    c.unit(&Tmessage::Renameat {
        olddirfid: ROOT,
        oldname: b"h",
        newdirfid: 3,
        newname: b"i",
    })
    .unwrap();
    assert!(c.export().join("d/i").exists());
    // Tlink: a second name for the same inode.
    c.walk_to(4, "d/i").unwrap();
    c.unit(&Tmessage::Link {
        dfid: ROOT,
        fid: 4,
        name: b"j",
    })
    .unwrap();
    assert_eq!(std::fs::metadata(c.export().join("j")).unwrap().nlink(), 2);
    assert_eq!(
        c.unit(&Tmessage::Link {
            dfid: ROOT,
            fid: 3,
            name: b"k"
        }),
        Err(libc::EPERM),
        "dir"
    );
    // Tunlinkat: files, then directories with AT_REMOVEDIR.
    c.unit(&Tmessage::Unlinkat {
        dirfid: ROOT,
        name: b"j",
        flags: 0,
    })
    .unwrap();
    assert_eq!(
        c.unit(&Tmessage::Unlinkat {
            dirfid: ROOT,
            name: b"d",
            flags: 0
        }),
        Err(libc::EISDIR)
    );
    let rmdir = Tmessage::Unlinkat {
        dirfid: ROOT,
        name: b"d",
        flags: wire::AT_REMOVEDIR,
    };
    assert_eq!(c.unit(&rmdir), Err(libc::ENOTEMPTY));
    c.unit(&Tmessage::Unlinkat {
        dirfid: 3,
        name: b"i",
        flags: 0,
    })
    .unwrap();
    c.unit(&rmdir).unwrap();
    assert!(!c.export().join("d").exists());
    assert_eq!(
        c.unit(&Tmessage::Unlinkat {
            dirfid: ROOT,
            name: b"x",
            flags: 1
        }),
        Err(libc::EINVAL)
    );
    // A stale fid (file renamed behind its back) cannot be renamed/removed by old name.
    std::fs::write(c.export().join("s"), b"").unwrap();
    c.walk_to(5, "s").unwrap();
    std::fs::rename(c.export().join("s"), c.export().join("s2")).unwrap();
    std::fs::write(c.export().join("s"), b"other").unwrap();
    assert_eq!(c.unit(&Tmessage::Remove { fid: 5 }), Err(libc::ENOENT));
    assert!(c.export().join("s").exists());
}

#[test]
fn fsync_lock_getlock() {
    let mut c = Client::attached();
    std::fs::write(c.export().join("f"), b"data").unwrap();
    c.walk_to(2, "f").unwrap();
    assert_eq!(
        c.unit(&Tmessage::Fsync {
            fid: 2,
            datasync: 0
        }),
        Err(libc::EBADF)
    );
    c.lopen(2, oflags::RDWR).unwrap();
    c.unit(&Tmessage::Fsync {
        fid: 2,
        datasync: 0,
    })
    .unwrap();
    c.unit(&Tmessage::Fsync {
        fid: 2,
        datasync: 1,
    })
    .unwrap();
    c.walk_to(3, "f").unwrap();
    c.lopen(3, oflags::RDWR).unwrap();
    let lk = |ty| Tlock {
        ty,
        flags: 0,
        start: 0,
        length: 0,
        proc_id: 7,
        client_id: b"guest",
    };
    let status = |r: &common::Resp| match r.msg() {
        Rmessage::Lock { status } => status,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        status(&c.call(&Tmessage::Lock {
            fid: 2,
            lock: lk(lock::TYPE_WRLCK)
        })),
        lock::SUCCESS
    );
    // Another fid (another open file description) conflicts and is told to retry.
    assert_eq!(
        status(&c.call(&Tmessage::Lock {
            fid: 3,
            lock: lk(lock::TYPE_WRLCK)
        })),
        lock::BLOCKED
    );
    let gl = Tgetlock {
        ty: lock::TYPE_WRLCK,
        start: 0,
        length: 0,
        proc_id: 9,
        client_id: b"guest",
    };
    match c.call(&Tmessage::Getlock { fid: 3, lock: gl }).msg() {
        Rmessage::Getlock(l) => assert_eq!(l.ty, lock::TYPE_WRLCK),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        status(&c.call(&Tmessage::Lock {
            fid: 2,
            lock: lk(lock::TYPE_UNLCK)
        })),
        lock::SUCCESS
    );
    match c.call(&Tmessage::Getlock { fid: 3, lock: gl }).msg() {
        Rmessage::Getlock(l) => assert_eq!(
            (l.ty, l.proc_id, l.client_id),
            (lock::TYPE_UNLCK, 9, &b"guest"[..])
        ),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        status(&c.call(&Tmessage::Lock {
            fid: 3,
            lock: lk(lock::TYPE_WRLCK)
        })),
        lock::SUCCESS
    );
    assert_eq!(
        c.err(&Tmessage::Lock {
            fid: 3,
            lock: lk(9)
        }),
        libc::EINVAL
    );
}

#[test]
fn xattrs_are_readable_not_writable() {
    let mut c = Client::attached();
    let path = c.export().join("f");
    std::fs::write(&path, b"").unwrap();
    let cpath = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: valid NUL-terminated strings and value buffer.
    let r = unsafe {
        libc::setxattr(
            cpath.as_ptr(),
            c"user.color".as_ptr(),
            b"blue".as_ptr().cast(),
            4,
            0,
        )
    };
    assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
    c.walk_to(2, "f").unwrap();
    let size = |r: common::Resp| match r.msg() {
        Rmessage::Xattrwalk { size } => size,
        other => panic!("{other:?}"),
    };
    let n = size(c.call(&Tmessage::Xattrwalk {
        fid: 2,
        newfid: 3,
        name: b"",
    }));
    let list = c.read(3, 0, n as u32).unwrap();
    assert!(
        list.split(|&b| b == 0).any(|n| n == b"user.color"),
        "{list:?}"
    );
    let n = size(c.call(&Tmessage::Xattrwalk {
        fid: 2,
        newfid: 4,
        name: b"user.color",
    }));
    assert_eq!(n, 4);
    assert_eq!(c.read(4, 0, 100).unwrap(), b"blue");
    assert_eq!(c.read(4, 2, 100).unwrap(), b"ue");
    c.clunk(4).unwrap();
    assert_eq!(
        c.err(&Tmessage::Xattrwalk {
            fid: 2,
            newfid: 4,
            name: b"user.none"
        }),
        libc::ENODATA
    );
    let e = c.err(&Tmessage::Xattrcreate {
        fid: 2,
        name: b"user.x",
        attr_size: 1,
        flags: 0,
    });
    assert_eq!(e, libc::EOPNOTSUPP);
}

#[test]
fn read_only_export_refuses_every_change() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("f"), b"ro").unwrap();
    std::fs::create_dir(tmp.path().join("d")).unwrap();
    let srv = Server::new(Config {
        read_only: true,
        ..Config::new(tmp.path())
    })
    .unwrap();
    let mut c = Client::from_server(srv, tmp);
    c.version(1 << 20);
    c.attach(ROOT, b"").unwrap();
    c.walk_to(2, "f").unwrap();
    assert_eq!(c.lopen(2, oflags::RDWR), Err(libc::EROFS));
    assert_eq!(c.lopen(2, oflags::RDONLY | oflags::TRUNC), Err(libc::EROFS));
    c.lopen(2, oflags::RDONLY).unwrap();
    assert_eq!(c.read(2, 0, 10).unwrap(), b"ro");
    assert_eq!(c.write(2, 0, b"x"), Err(libc::EROFS));
    c.walk(ROOT, 3, &[]).unwrap();
    assert_eq!(c.lcreate(3, b"n", oflags::RDWR, 0o644), Err(libc::EROFS));
    assert_eq!(c.mkdir(ROOT, b"n", 0o755), Err(libc::EROFS));
    let erofs = [
        Tmessage::Symlink {
            fid: ROOT,
            name: b"n",
            target: b"t",
            gid: 0,
        },
        Tmessage::Mknod {
            dfid: ROOT,
            name: b"n",
            mode: libc::S_IFIFO | 0o600,
            major: 0,
            minor: 0,
            gid: 0,
        },
        Tmessage::Rename {
            fid: 2,
            dfid: ROOT,
            name: b"n",
        },
        Tmessage::Renameat {
            olddirfid: ROOT,
            oldname: b"f",
            newdirfid: ROOT,
            newname: b"n",
        },
        Tmessage::Unlinkat {
            dirfid: ROOT,
            name: b"f",
            flags: 0,
        },
        Tmessage::Link {
            dfid: ROOT,
            fid: 2,
            name: b"n",
        },
        Tmessage::Setattr {
            fid: 2,
            attr: Tsetattr {
                valid: setattr::SIZE,
                ..Default::default()
            },
        },
        Tmessage::Remove { fid: 2 },
    ];
    for m in &erofs {
        assert_eq!(c.err(m), libc::EROFS, "{m:?}");
    }
    assert_eq!(std::fs::read(c.tmp.path().join("f")).unwrap(), b"ro");
    assert_eq!(std::fs::read_dir(c.tmp.path()).unwrap().count(), 2);
}

#[test]
fn guest_ids_policy_chowns_new_files() {
    if common::euid() != 0 {
        return; // chown to other users needs root
    }
    let mut c = Client::with(|cfg| cfg.ownership = p9::Ownership::GuestIds);
    c.version(1 << 20);
    let r = c.call(&Tmessage::Attach {
        fid: ROOT,
        afid: wire::NOFID,
        uname: b"",
        aname: b"",
        n_uname: 1234,
    });
    assert!(r.errno().is_none());
    c.unit(&Tmessage::Mkdir {
        dfid: ROOT,
        name: b"d",
        mode: 0o755,
        gid: 4321,
    })
    .unwrap();
    let md = std::fs::metadata(c.export().join("d")).unwrap();
    assert_eq!((md.uid(), md.gid()), (1234, 4321));
    c.walk_to(2, "d").unwrap();
    let chown = Tsetattr {
        valid: setattr::UID,
        uid: 99,
        ..Default::default()
    };
    c.unit(&Tmessage::Setattr {
        fid: 2,
        attr: chown,
    })
    .unwrap();
    assert_eq!(std::fs::metadata(c.export().join("d")).unwrap().uid(), 99);
}

#[test]
fn concurrent_requests_from_threads() {
    let mut c = Client::attached();
    for i in 0..8 {
        std::fs::write(c.export().join(format!("f{i}")), vec![i as u8; 100_000]).unwrap();
    }
    let srv = &c.srv;
    std::thread::scope(|s| {
        for i in 0..8u32 {
            s.spawn(move || {
                let call = |m: Tmessage<'_>| {
                    let mut f = Vec::new();
                    m.encode(i as u16, &mut f).unwrap();
                    let mut out = Vec::new();
                    srv.handle_message(&mut &f[..], &mut out).unwrap();
                    out
                };
                let name = format!("f{i}");
                let fid = 100 + i;
                call(Tmessage::Walk {
                    fid: ROOT,
                    newfid: fid,
                    names: vec![name.as_bytes()],
                });
                call(Tmessage::Lopen {
                    fid,
                    flags: oflags::RDONLY,
                });
                for _ in 0..20 {
                    let out = call(Tmessage::Read {
                        fid,
                        offset: 0,
                        count: 200_000,
                    });
                    match Rmessage::decode_frame(&out).unwrap().1 {
                        Rmessage::Read { data } => {
                            assert!(data.len() == 100_000 && data.iter().all(|&b| b == i as u8))
                        }
                        other => panic!("{other:?}"),
                    }
                }
            });
        }
    });
    assert_eq!(c.srv.fid_count(), 9);
    c.clunk(100).unwrap();
}

#[test]
fn fid_limit_and_self_clone() {
    let mut c = Client::with(|cfg| cfg.max_fids = 3);
    c.version(1 << 20);
    c.attach(ROOT, b"").unwrap();
    std::fs::write(c.export().join("f"), b"x").unwrap();
    c.walk_to(2, "f").unwrap();
    c.lopen(2, oflags::RDONLY).unwrap();
    // Cloning a fid onto itself keeps it open.
    assert_eq!(c.walk(2, 2, &[]).unwrap(), vec![]);
    assert_eq!(c.read(2, 0, 10).unwrap(), b"x");
    c.walk(ROOT, 3, &[]).unwrap();
    assert_eq!(c.walk(ROOT, 4, &[]), Err(libc::EMFILE));
    c.clunk(3).unwrap();
    c.walk(ROOT, 4, &[]).unwrap();
}
