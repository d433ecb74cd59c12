//! Saving a 9P session and restoring it into a new server (what a VM snapshot with bind
//! mounts does): restored fids keep working, fids whose file went away are dropped, fids
//! that cannot be described by a path refuse the save, and a doctored saved session can
//! never name anything outside the export.

mod common;

use common::{Client, ROOT};
use p9::wire::{oflags, Tmessage};
use p9::{Config, FidState, Server, SessionState};

/// A server on the same export as `c`, with `state` restored into it.
fn resumed(c: Client, state: &SessionState) -> (Client, usize) {
    let srv = Server::new(Config::new(c.export())).unwrap();
    let n = srv.restore_session(state).unwrap();
    (Client::from_server(srv, c.tmp), n)
}

#[test]
fn restored_fids_keep_working() {
    let mut c = Client::new();
    c.version(256 << 10);
    c.attach(ROOT, b"").unwrap();
    std::fs::create_dir_all(c.export().join("dir/sub")).unwrap();
    std::fs::write(c.export().join("dir/file"), b"hello").unwrap();
    std::fs::write(c.export().join("dir/sub/x"), b"x").unwrap();
    c.walk_to(2, "dir/file").unwrap();
    c.lopen(2, oflags::RDWR | oflags::APPEND).unwrap();
    c.walk_to(3, "dir").unwrap();
    c.lopen(3, oflags::RDONLY).unwrap();
    c.walk_to(4, "dir/sub").unwrap(); // walked, not opened
    let state = c.srv.save_session().unwrap();
    assert_eq!(state.msize, 256 << 10);
    assert_eq!(
        state.fids.iter().map(|f| f.fid).collect::<Vec<_>>(),
        [ROOT, 2, 3, 4]
    );
    assert_eq!(state.fids[1].path, [b"dir".to_vec(), b"file".to_vec()]);

    let (mut c, n) = resumed(c, &state);
    assert_eq!(n, 4);
    assert_eq!(c.srv.msize(), 256 << 10);
    assert_eq!(c.read(2, 0, 100).unwrap(), b"hello");
    // Reopened with O_APPEND: the write lands at the end whatever the offset.
    c.write(2, 0, b" world").unwrap();
    assert_eq!(
        std::fs::read(c.export().join("dir/file")).unwrap(),
        b"hello world"
    );
    let mut names = c.list(3, 4096);
    names.retain(|n| n != b"." && n != b"..");
    assert_eq!(names, [b"file".to_vec(), b"sub".to_vec()]);
    c.walk(4, 5, &[b"x"]).unwrap();
    c.lopen(5, oflags::RDONLY).unwrap();
    assert_eq!(c.read(5, 0, 10).unwrap(), b"x");
    // Remove works through the restored (parent, name) location.
    c.unit(&Tmessage::Remove { fid: 5 }).unwrap();
    assert!(!c.export().join("dir/sub/x").exists());
    assert!(c.getattr(ROOT).is_ok());
}

#[test]
fn fids_whose_file_went_away_are_dropped() {
    let mut c = Client::attached();
    std::fs::write(c.export().join("a"), b"a").unwrap();
    std::fs::write(c.export().join("b"), b"b").unwrap();
    c.walk_to(2, "a").unwrap();
    c.walk_to(3, "b").unwrap();
    let state = c.srv.save_session().unwrap();
    // The resuming run's export differs: `a` is gone.
    std::fs::remove_file(c.export().join("a")).unwrap();
    let (mut c, n) = resumed(c, &state);
    assert_eq!(n, 2, "root and b");
    assert_eq!(c.getattr(2).unwrap_err(), libc::EBADF);
    assert!(c.getattr(3).is_ok());
}

#[test]
fn unsaveable_fids_refuse_the_save() {
    // An xattr fid.
    let mut c = Client::attached();
    c.call(&Tmessage::Xattrwalk {
        fid: ROOT,
        newfid: 2,
        name: b"",
    });
    let e = c.srv.save_session().unwrap_err();
    assert!(e.to_string().contains("fid 2"), "{e}");
    c.clunk(2).unwrap();
    assert!(c.srv.save_session().is_ok());

    // An open file the host deleted.
    std::fs::write(c.export().join("gone"), b"").unwrap();
    c.walk_to(3, "gone").unwrap();
    c.lopen(3, oflags::RDONLY).unwrap();
    std::fs::remove_file(c.export().join("gone")).unwrap();
    let e = c.srv.save_session().unwrap_err();
    assert!(e.to_string().contains("deleted or moved"), "{e}");
    c.clunk(3).unwrap();

    // A directory moved out of the export under a live fid.
    std::fs::create_dir(c.export().join("d")).unwrap();
    c.walk_to(4, "d").unwrap();
    std::fs::rename(c.export().join("d"), c.outside().join("d")).unwrap();
    let e = c.srv.save_session().unwrap_err();
    assert!(e.to_string().contains("no longer inside"), "{e}");
}

#[test]
fn doctored_sessions_stay_inside_the_export() {
    let c = Client::attached();
    std::fs::write(c.export().join("f"), b"f").unwrap();
    std::os::unix::fs::symlink(c.outside(), c.export().join("out")).unwrap();
    std::os::unix::fs::symlink("/etc", c.export().join("etc")).unwrap();
    let fid = |fid: u32, path: &[&[u8]], open: Option<i32>| FidState {
        fid,
        uid: 0,
        path: path.iter().map(|p| p.to_vec()).collect(),
        open,
    };
    let state = SessionState {
        msize: 64 << 20, // beyond the server's maximum: clamped
        fids: vec![
            fid(ROOT, &[], None),
            fid(2, &[b".."], None),
            fid(3, &[b"..", b"outside"], None),
            fid(4, &[b"out", b"secret"], Some(libc::O_RDONLY)),
            fid(5, &[b"etc", b"passwd"], Some(libc::O_RDONLY)),
            fid(6, &[b"a/b"], None),
            fid(7, &[b""], None),
            fid(8, &[b"."], None),
            fid(9, &[b"out"], Some(libc::O_RDONLY)), // the symlink itself, opened
            fid(1, &[b"f"], None),                   // ROOT again
            fid(p9::wire::NOFID, &[b"f"], None),
        ],
    };
    let (mut c, n) = resumed(c, &state);
    assert_eq!(n, 1, "only the root is restored");
    assert_eq!(c.srv.msize(), p9::DEFAULT_MSIZE_MAX);
    for f in 2..=9 {
        assert_eq!(c.getattr(f).unwrap_err(), libc::EBADF, "fid {f}");
    }
    // Restoring into a session that already has fids is refused.
    assert!(c.srv.restore_session(&state).is_err());
}

/// Open flags come back only as a save can hold them: access mode and status flags, never
/// O_TRUNC; on a read-only export a write-open fid is not restored.
#[test]
fn restored_open_flags_are_what_a_save_can_hold() {
    let c = Client::attached();
    std::fs::write(c.export().join("f"), b"keep me").unwrap();
    let state = SessionState {
        msize: 8192,
        fids: vec![
            FidState {
                fid: 2,
                uid: 0,
                path: vec![b"f".to_vec()],
                open: Some(libc::O_RDONLY | libc::O_TRUNC),
            },
            FidState {
                fid: 3,
                uid: 0,
                path: vec![b"f".to_vec()],
                open: Some(libc::O_WRONLY | libc::O_TRUNC),
            },
        ],
    };
    let srv = Server::new(Config::new(c.export())).unwrap();
    assert_eq!(srv.restore_session(&state).unwrap(), 2);
    assert_eq!(
        std::fs::read(c.export().join("f")).unwrap(),
        b"keep me",
        "O_TRUNC was applied"
    );
    let mut ro = Config::new(c.export());
    ro.read_only = true;
    let srv = Server::new(ro).unwrap();
    assert_eq!(
        srv.restore_session(&state).unwrap(),
        1,
        "the write-open fid on a read-only export"
    );
    let mut c = Client::from_server(srv, c.tmp);
    assert_eq!(c.read(2, 0, 100).unwrap(), b"keep me");
    assert_eq!(c.getattr(3).unwrap_err(), libc::EBADF);
}

/// A fid whose file was renamed inside the export after the walk is saved under its new
/// name; a file replaced under the old name is not mistaken for it.
#[test]
fn saved_paths_name_the_fids_own_inode() {
    let mut c = Client::attached();
    std::fs::write(c.export().join("old"), b"mine").unwrap();
    c.walk_to(2, "old").unwrap();
    std::fs::rename(c.export().join("old"), c.export().join("new")).unwrap();
    std::fs::write(c.export().join("old"), b"an impostor").unwrap();
    let state = c.srv.save_session().unwrap();
    assert_eq!(state.fids[1].path, [b"new".to_vec()]);
    // Unlinked while another link keeps it alive: its /proc link reads "new (deleted)".
    std::fs::hard_link(c.export().join("new"), c.export().join("other")).unwrap();
    std::fs::remove_file(c.export().join("new")).unwrap();
    std::fs::write(c.export().join("new (deleted)"), b"decoy").unwrap();
    let e = c.srv.save_session().unwrap_err();
    assert!(e.to_string().contains("deleted or moved"), "{e}");
}
