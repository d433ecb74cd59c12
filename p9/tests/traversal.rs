//! Path-traversal suite: a hostile client tries to reach `<tmp>/outside`
//! (and `/etc`) from the export `<tmp>/export`. Every attempt must be
//! answered with an error (or stay inside), and the outside must be untouched.

mod common;

use std::os::unix::fs::{symlink, MetadataExt};

use common::{snapshot, Client, ROOT};
use p9::wire::{oflags, qt, Rmessage, Tmessage};

/// Fixture with symlinks pointing out of the export.
fn fixture() -> (Client, Vec<(std::path::PathBuf, u64, u64)>) {
    let c = Client::attached();
    symlink("/etc", c.export().join("etc")).unwrap();
    symlink(c.outside(), c.export().join("abs")).unwrap();
    symlink(c.outside().join("secret"), c.export().join("abs_file")).unwrap();
    symlink("../outside", c.export().join("rel")).unwrap();
    std::fs::create_dir(c.export().join("sub")).unwrap();
    std::fs::write(c.export().join("sub/inside"), b"inside").unwrap();
    let before = snapshot(&c.outside());
    (c, before)
}

fn assert_outside_untouched(c: &Client, before: &[(std::path::PathBuf, u64, u64)]) {
    assert_eq!(
        snapshot(&c.outside()),
        before,
        "the outside directory changed"
    );
    assert_eq!(
        std::fs::read(c.outside().join("secret")).unwrap(),
        b"top secret"
    );
}

#[test]
fn dotdot_past_the_root_stays_at_the_root() {
    let (mut c, before) = fixture();
    let root = c.getattr(ROOT).unwrap().qid;
    let qids = c.walk(ROOT, 2, &[b"..", b"..", b".."]).unwrap();
    assert!(qids.iter().all(|q| *q == root), "{qids:?}");
    assert_eq!(c.getattr(2).unwrap().qid, root);
    let qids = c
        .walk(ROOT, 3, &[b"sub", b"..", b"..", b"..", b"sub"])
        .unwrap();
    assert_eq!(qids.len(), 5);
    assert_eq!(qids[2], root);
    // From a fid at the root, `../outside` does not exist.
    assert_eq!(
        c.walk(2, 4, &[b"..", b"outside"]).unwrap().len(),
        1,
        "partial: stays at root"
    );
    assert_eq!(
        c.walk(ROOT, 4, &[b"..", b"..", b"outside", b"secret"])
            .unwrap()
            .len(),
        2
    );
    assert_eq!(c.getattr(4), Err(libc::EBADF));
    // Readdir of the root does not reveal the parent's inode.
    c.walk(ROOT, 5, &[]).unwrap();
    c.lopen(5, oflags::RDONLY).unwrap();
    let parent_ino = std::fs::metadata(c.tmp.path()).unwrap().ino();
    let r = c.call(&Tmessage::Readdir {
        fid: 5,
        offset: 0,
        count: 8192,
    });
    let Rmessage::Readdir { data } = r.msg() else {
        panic!()
    };
    for d in p9::wire::Dirent::decode_all(data).unwrap() {
        assert_ne!(d.qid.path, parent_ino, "{:?}", d.name);
    }
    assert_outside_untouched(&c, &before);
}

#[test]
fn symlink_to_etc_is_readable_but_not_followed() {
    let (mut c, before) = fixture();
    let qids = c.walk(ROOT, 2, &[b"etc"]).unwrap();
    assert_eq!(qids[0].ty, qt::SYMLINK);
    assert_eq!(c.readlink(2).unwrap(), b"/etc");
    // Walking through it stops at the link (partial walk) or fails outright.
    assert_eq!(c.walk(ROOT, 3, &[b"etc", b"passwd"]).unwrap().len(), 1);
    assert_eq!(c.getattr(3), Err(libc::EBADF));
    assert_eq!(c.walk(2, 3, &[b"passwd"]), Err(libc::ENOTDIR));
    // Opening it is refused; its attributes are the link's own.
    assert_eq!(c.lopen(2, oflags::RDONLY), Err(libc::ELOOP));
    assert_eq!(
        c.lopen(2, oflags::RDONLY | oflags::DIRECTORY),
        Err(libc::ELOOP)
    );
    assert_eq!(c.getattr(2).unwrap().mode & libc::S_IFMT, libc::S_IFLNK);
    // Nothing can be created "inside" it.
    assert_eq!(c.mkdir(2, b"x", 0o755), Err(libc::ENOTDIR));
    assert_eq!(c.lcreate(2, b"x", oflags::RDWR, 0o644), Err(libc::ENOTDIR));
    let e = c.err(&Tmessage::Xattrwalk {
        fid: 2,
        newfid: 3,
        name: b"user.x",
    });
    assert_eq!(e, libc::ENODATA);
    assert_outside_untouched(&c, &before);
}

#[test]
fn absolute_and_relative_symlinks_out_of_the_export() {
    let (mut c, before) = fixture();
    for link in [&b"abs"[..], b"rel", b"abs_file"] {
        c.walk(ROOT, 2, &[link]).unwrap();
        assert_eq!(c.walk(ROOT, 3, &[link, b"secret"]).unwrap().len(), 1);
        assert_eq!(c.lopen(2, oflags::RDONLY), Err(libc::ELOOP));
        assert_eq!(c.lopen(2, oflags::RDWR | oflags::TRUNC), Err(libc::ELOOP));
        // lcreate over the link's name must not create through it.
        c.walk(ROOT, 4, &[]).unwrap();
        assert_eq!(c.lcreate(4, link, oflags::RDWR, 0o644), Err(libc::ELOOP));
        assert_eq!(
            c.lcreate(4, link, oflags::RDWR | oflags::EXCL, 0o644),
            Err(libc::EEXIST)
        );
        // Truncating or chmod-ing the link fid does not touch the target.
        let t = p9::wire::Tsetattr {
            valid: p9::wire::setattr::SIZE,
            ..Default::default()
        };
        assert_eq!(
            c.unit(&Tmessage::Setattr { fid: 2, attr: t }),
            Err(libc::EINVAL)
        );
        for fid in [2, 4] {
            c.clunk(fid).unwrap();
        }
    }
    // A setattr of times on the link changes the link, not the target.
    let mtime = std::fs::metadata(c.outside().join("secret"))
        .unwrap()
        .mtime();
    c.walk(ROOT, 2, &[b"abs_file"]).unwrap();
    let t = p9::wire::Tsetattr {
        valid: p9::wire::setattr::MTIME | p9::wire::setattr::MTIME_SET,
        mtime_sec: 1,
        ..Default::default()
    };
    c.unit(&Tmessage::Setattr { fid: 2, attr: t }).unwrap();
    assert_eq!(
        std::fs::metadata(c.outside().join("secret"))
            .unwrap()
            .mtime(),
        mtime
    );
    assert_outside_untouched(&c, &before);
}

#[test]
fn symlink_swapped_in_after_walk() {
    let (mut c, before) = fixture();
    // Walk to a directory and to a file, then replace both on the host with
    // symlinks pointing outside (the classic TOCTOU race, simulated).
    c.walk_to(2, "sub").unwrap();
    c.walk_to(3, "sub/inside").unwrap();
    std::fs::rename(c.export().join("sub"), c.export().join("sub_old")).unwrap();
    symlink(c.outside(), c.export().join("sub")).unwrap();
    std::fs::rename(
        c.export().join("sub_old/inside"),
        c.export().join("sub_old/inside_old"),
    )
    .unwrap();
    symlink(
        c.outside().join("secret"),
        c.export().join("sub_old/inside"),
    )
    .unwrap();
    // The file fid still opens the inode it was walked to.
    c.lopen(3, oflags::RDWR).unwrap();
    assert_eq!(c.read(3, 0, 100).unwrap(), b"inside");
    c.write(3, 0, b"INSIDE").unwrap();
    // The directory fid still names the real directory.
    assert_eq!(c.walk(2, 4, &[b"secret"]), Err(libc::ENOENT));
    c.walk(2, 4, &[b"inside"]).unwrap();
    assert_eq!(
        c.lopen(4, oflags::RDONLY),
        Err(libc::ELOOP),
        "now a symlink"
    );
    c.walk(2, 5, &[b"inside_old"]).unwrap();
    c.lopen(5, oflags::RDONLY).unwrap();
    assert_eq!(c.read(5, 0, 100).unwrap(), b"INSIDE");
    // Creating through the directory fid lands in the real directory.
    c.walk(2, 6, &[]).unwrap();
    c.lcreate(6, b"new", oflags::RDWR, 0o644).unwrap();
    assert!(c.export().join("sub_old/new").exists());
    // A fresh walk through the swapped name fails.
    assert_eq!(c.walk(ROOT, 7, &[b"sub", b"secret"]).unwrap().len(), 1);
    // Remove via the stale file fid refuses to delete the symlink now at its name.
    assert_eq!(c.unit(&Tmessage::Remove { fid: 3 }), Err(libc::ENOENT));
    assert!(std::fs::symlink_metadata(c.export().join("sub_old/inside")).is_ok());
    assert_outside_untouched(&c, &before);
}

#[test]
fn directory_moved_out_by_the_host_is_not_an_exit() {
    let (mut c, before) = fixture();
    std::fs::create_dir_all(c.export().join("m/n")).unwrap();
    c.walk_to(2, "m/n").unwrap();
    // The host moves the directory out of the export under a live fid.
    std::fs::rename(c.export().join("m"), c.outside().join("m")).unwrap();
    assert_eq!(c.walk(2, 3, &[b".."]), Err(libc::EACCES));
    assert_eq!(c.walk(2, 3, &[b"..", b".."]), Err(libc::EACCES));
    std::fs::rename(c.outside().join("m"), c.export().join("m")).unwrap();
    c.walk(2, 3, &[b"..", b".."]).unwrap();
    assert_eq!(c.getattr(3).unwrap().qid, c.getattr(ROOT).unwrap().qid);
    assert_outside_untouched(&c, &before);
}

#[test]
fn hard_links_to_outside_are_impossible() {
    let (mut c, before) = fixture();
    // The only way to name a source is a fid; a fid on a symlink links the
    // symlink itself, never its target.
    c.walk(ROOT, 2, &[b"abs_file"]).unwrap();
    c.unit(&Tmessage::Link {
        dfid: ROOT,
        fid: 2,
        name: b"hl",
    })
    .unwrap();
    let md = std::fs::symlink_metadata(c.export().join("hl")).unwrap();
    assert!(md.file_type().is_symlink());
    assert_eq!(
        std::fs::metadata(c.outside().join("secret"))
            .unwrap()
            .nlink(),
        1
    );
    // Names that try to point elsewhere are rejected.
    c.walk_to(3, "sub/inside").unwrap();
    for name in [&b"../hl2"[..], b"/tmp/hl2", b"..", b".", b""] {
        let e = c.err(&Tmessage::Link {
            dfid: ROOT,
            fid: 3,
            name,
        });
        assert_eq!(e, libc::EINVAL, "{name:?}");
    }
    // A directory fid on the symlink is not a directory.
    c.walk(ROOT, 4, &[b"abs"]).unwrap();
    assert_eq!(
        c.err(&Tmessage::Link {
            dfid: 4,
            fid: 3,
            name: b"x"
        }),
        libc::ENOTDIR
    );
    assert_outside_untouched(&c, &before);
}

#[test]
fn rename_out_of_the_export_is_refused() {
    let (mut c, before) = fixture();
    c.walk_to(2, "sub/inside").unwrap();
    c.walk_to(3, "sub").unwrap();
    for name in [&b"../../outside/x"[..], b"/tmp/x", b"..", b"../x", b"a/b"] {
        assert_eq!(
            c.err(&Tmessage::Rename {
                fid: 2,
                dfid: ROOT,
                name
            }),
            libc::EINVAL
        );
        let m = Tmessage::Renameat {
            olddirfid: 3,
            oldname: b"inside",
            newdirfid: ROOT,
            newname: name,
        };
        assert_eq!(c.err(&m), libc::EINVAL, "{name:?}");
        let m = Tmessage::Renameat {
            olddirfid: 3,
            oldname: name,
            newdirfid: ROOT,
            newname: b"x",
        };
        assert_eq!(c.err(&m), libc::EINVAL, "{name:?}");
    }
    // Renaming into a symlinked "directory" fails: it is not a directory.
    c.walk(ROOT, 4, &[b"abs"]).unwrap();
    assert_eq!(
        c.err(&Tmessage::Rename {
            fid: 2,
            dfid: 4,
            name: b"x"
        }),
        libc::ENOTDIR
    );
    let m = Tmessage::Renameat {
        olddirfid: 3,
        oldname: b"inside",
        newdirfid: 4,
        newname: b"x",
    };
    assert_eq!(c.err(&m), libc::ENOTDIR);
    // Renaming the root itself is refused.
    assert_eq!(
        c.err(&Tmessage::Rename {
            fid: ROOT,
            dfid: 3,
            name: b"x"
        }),
        libc::EBUSY
    );
    // Renaming a symlink moves the link, not its target.
    c.unit(&Tmessage::Renameat {
        olddirfid: ROOT,
        oldname: b"abs",
        newdirfid: 3,
        newname: b"abs2",
    })
    .unwrap();
    assert!(std::fs::symlink_metadata(c.export().join("sub/abs2"))
        .unwrap()
        .file_type()
        .is_symlink());
    assert!(std::fs::read(c.export().join("sub/inside")).is_ok());
    assert_outside_untouched(&c, &before);
}

#[test]
fn long_names_are_refused() {
    let (mut c, before) = fixture();
    let long = vec![b'a'; 256];
    let ok = vec![b'b'; 255];
    assert_eq!(c.walk(ROOT, 2, &[&long]), Err(libc::ENAMETOOLONG));
    c.walk(ROOT, 2, &[]).unwrap();
    assert_eq!(
        c.lcreate(2, &long, oflags::RDWR, 0o644),
        Err(libc::ENAMETOOLONG)
    );
    assert_eq!(c.mkdir(ROOT, &long, 0o755), Err(libc::ENAMETOOLONG));
    let m = Tmessage::Symlink {
        fid: ROOT,
        name: &long,
        target: b"x",
        gid: 0,
    };
    assert_eq!(c.err(&m), libc::ENAMETOOLONG);
    let m = Tmessage::Symlink {
        fid: ROOT,
        name: b"x",
        target: &vec![b'x'; 5000],
        gid: 0,
    };
    assert_eq!(c.err(&m), libc::ENAMETOOLONG);
    let m = Tmessage::Renameat {
        olddirfid: ROOT,
        oldname: b"sub",
        newdirfid: ROOT,
        newname: &long,
    };
    assert_eq!(c.err(&m), libc::ENAMETOOLONG);
    assert_eq!(
        c.err(&Tmessage::Unlinkat {
            dirfid: ROOT,
            name: &long,
            flags: 0
        }),
        libc::ENAMETOOLONG
    );
    // 255 bytes is fine.
    c.mkdir(ROOT, &ok, 0o755).unwrap();
    c.walk(ROOT, 3, &[&ok]).unwrap();
    assert_outside_untouched(&c, &before);
}

#[test]
fn slashes_nul_dot_and_empty_names_are_refused() {
    let (mut c, before) = fixture();
    let bad: [&[u8]; 7] = [
        b"sub/inside",
        b"/etc",
        b"a\0b",
        b"\0",
        b".",
        b"",
        b"../outside",
    ];
    for name in bad {
        assert_eq!(c.walk(ROOT, 2, &[name]), Err(libc::EINVAL), "{name:?}");
        c.walk(ROOT, 3, &[]).unwrap();
        assert_eq!(
            c.lcreate(3, name, oflags::RDWR, 0o644),
            Err(libc::EINVAL),
            "{name:?}"
        );
        c.clunk(3).unwrap();
        assert_eq!(c.mkdir(ROOT, name, 0o755), Err(libc::EINVAL));
        let m = Tmessage::Mknod {
            dfid: ROOT,
            name,
            mode: libc::S_IFIFO | 0o644,
            major: 0,
            minor: 0,
            gid: 0,
        };
        assert_eq!(c.err(&m), libc::EINVAL);
        let m = Tmessage::Symlink {
            fid: ROOT,
            name,
            target: b"t",
            gid: 0,
        };
        assert_eq!(c.err(&m), libc::EINVAL);
        assert_eq!(
            c.err(&Tmessage::Unlinkat {
                dirfid: ROOT,
                name,
                flags: 0
            }),
            libc::EINVAL
        );
    }
    // `..` is only a walk name.
    assert_eq!(c.mkdir(ROOT, b"..", 0o755), Err(libc::EINVAL));
    assert_eq!(
        c.err(&Tmessage::Unlinkat {
            dirfid: ROOT,
            name: b"..",
            flags: 0x200
        }),
        libc::EINVAL
    );
    // Symlink text with NUL.
    let m = Tmessage::Symlink {
        fid: ROOT,
        name: b"s",
        target: b"/etc\0/passwd",
        gid: 0,
    };
    assert_eq!(c.err(&m), libc::EINVAL);
    // Attach names are checked the same way.
    assert_eq!(c.attach(9, b"../outside"), Err(libc::EINVAL));
    assert_eq!(c.attach(9, b"etc"), Err(libc::ENOTDIR));
    assert_outside_untouched(&c, &before);
    assert_eq!(
        std::fs::read_dir(c.export()).unwrap().count(),
        5,
        "nothing created"
    );
}

#[test]
fn special_files_cannot_reach_host_devices() {
    let (mut c, before) = fixture();
    let m = Tmessage::Mknod {
        dfid: ROOT,
        name: b"mem",
        mode: libc::S_IFCHR | 0o666,
        major: 1,
        minor: 1,
        gid: 0,
    };
    assert_eq!(c.err(&m), libc::EPERM);
    assert!(!c.export().join("mem").exists());
    if common::euid() == 0 {
        // A device node the host placed in the export is not opened for I/O.
        let p =
            std::ffi::CString::new(c.export().join("null").as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: valid NUL-terminated path.
        let r = unsafe { libc::mknod(p.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(1, 3)) };
        assert_eq!(r, 0);
        c.walk(ROOT, 2, &[b"null"]).unwrap();
        assert_eq!(c.lopen(2, oflags::RDWR), Err(libc::ENXIO));
    }
    assert_outside_untouched(&c, &before);
}
