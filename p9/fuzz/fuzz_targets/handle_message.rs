//! Fuzz `Server::handle_message` on a temporary export: the input is a
//! stream of T-messages served one after another. The server must never
//! panic, every answer must be a well-formed R-message, and nothing outside
//! the export may change.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use p9::wire::{Rmessage, Tmessage, NOFID};
use p9::{Config, Server};

struct Fixture {
    _tmp: tempfile::TempDir,
    outside: PathBuf,
    srv: Server,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let tmp = tempfile::tempdir().unwrap();
        let export = tmp.path().join("export");
        let outside = tmp.path().join("outside");
        std::fs::create_dir_all(export.join("d/e")).unwrap();
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("secret"), b"secret").unwrap();
        std::fs::write(export.join("f"), b"file").unwrap();
        std::os::unix::fs::symlink("/etc", export.join("etc")).unwrap();
        std::os::unix::fs::symlink(&outside, export.join("out")).unwrap();
        let srv = Server::new(Config::new(&export)).unwrap();
        Fixture {
            _tmp: tmp,
            outside,
            srv,
        }
    })
}

fn send(srv: &Server, m: Tmessage<'_>) {
    let mut f = Vec::new();
    m.encode(1, &mut f).unwrap();
    srv.handle_message(&mut &f[..], &mut Vec::new()).unwrap();
}

fuzz_target!(|data: &[u8]| {
    let fx = fixture();
    // Restore what earlier inputs may have removed (all inside the export).
    let export = fx.outside.with_file_name("export");
    let _ = std::fs::create_dir_all(export.join("d/e"));
    if std::fs::symlink_metadata(export.join("f")).is_err() {
        let _ = std::fs::write(export.join("f"), b"file");
    }
    // A fresh session with fid 0 at the root for every input.
    send(
        &fx.srv,
        Tmessage::Version {
            msize: 1 << 16,
            version: b"9P2000.L",
        },
    );
    let attach = Tmessage::Attach {
        fid: 0,
        afid: NOFID,
        uname: b"",
        aname: b"",
        n_uname: 0,
    };
    send(&fx.srv, attach);
    let mut input = data;
    for _ in 0..64 {
        if input.is_empty() {
            break;
        }
        let mut out = Vec::new();
        if fx.srv.handle_message(&mut input, &mut out).is_err() {
            break;
        }
        Rmessage::decode_frame(&out).expect("well-formed reply");
    }
    assert_eq!(std::fs::read(fx.outside.join("secret")).unwrap(), b"secret");
    assert_eq!(std::fs::read_dir(&fx.outside).unwrap().count(), 1);
});
