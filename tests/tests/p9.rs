//! Bind mounts in the VM: dinv's 9P2000.L server behind virtio-9p, driven by the Linux
//! kernel's v9fs client in the tiny test guest (`dinv.test=p9` in guest-image/test-rootfs/init).
//! The guest reads what the host wrote (contents, size, mode, a 1 MiB checksum, the directory
//! listing), creates, renames, copies, links, changes attributes, makes a FIFO and removes
//! entries; the host then finds exactly that in its directory. A share exported read-only is
//! mounted read-write in the guest, so its writes reach the server, which must refuse them.
//!
//! The path-traversal suite (hostile 9P messages) is the server's own (`p9/tests`): a kernel
//! client resolves `..` and symlinks in the guest, so it cannot send them. Docker's `-v` over
//! the same shares is checked by `tests/tests/docker.rs`.
//!
//! Needs `DINV_KERNEL` and `DINV_TEST_ROOTFS` (see `scripts/test`), `/dev/kvm` and `md5sum`.

use std::collections::HashMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use dinv_tests::{artifact, require_kvm, run_ok, Running};

const BOOT_TIMEOUT: Duration = Duration::from_secs(900);
const STEP_TIMEOUT: Duration = Duration::from_secs(600);

/// 1 MiB that no run of zeros or short pattern would match by accident.
fn blob() -> Vec<u8> {
    let mut x: u32 = 0x1234_5678;
    (0..1 << 20)
        .map(|_| {
            // xorshift32
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

fn md5(path: &Path) -> String {
    let out = run_ok(Command::new("md5sum").arg(path));
    out.split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn kernel_9p_client_reads_and_writes_host_directories() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let rw = dir.path().join("rw");
    let ro = dir.path().join("ro");
    std::fs::create_dir_all(rw.join("empty-dir")).unwrap();
    std::fs::create_dir_all(&ro).unwrap();
    std::fs::write(rw.join("host.txt"), "written-by-host\n").unwrap();
    std::fs::set_permissions(rw.join("host.txt"), std::fs::Permissions::from_mode(0o640)).unwrap();
    std::fs::write(rw.join("blob.bin"), blob()).unwrap();
    std::fs::write(rw.join("delete-me.txt"), "x").unwrap();
    std::fs::write(ro.join("ro.txt"), "read-only-share\n").unwrap();

    let mut vm = Running::spawn([
        "boot".as_ref(),
        "--kernel".as_ref(),
        artifact("DINV_KERNEL").as_os_str(),
        "--memory".as_ref(),
        "128M".as_ref(),
        "--disk".as_ref(),
        format!("{},ro", artifact("DINV_TEST_ROOTFS").display()).as_ref(),
        "--share".as_ref(),
        format!("rw={}", rw.display()).as_ref(),
        "--share".as_ref(),
        format!("ro={},ro", ro.display()).as_ref(),
        "--cmdline".as_ref(),
        "root=/dev/vda ro init=/init dinv.test=p9".as_ref(),
    ]);
    vm.wait_for("DINV-TEST-INIT-OK", BOOT_TIMEOUT);
    vm.wait_for("DINV-TEST-DONE", STEP_TIMEOUT);
    let status = vm.wait_exit(STEP_TIMEOUT);
    assert!(status.success(), "dinv exited {status}\n{}", vm.tail());
    assert!(vm.lines_with("DINV-TEST-FAIL").is_empty(), "{}", vm.tail());

    // "DINV-P9 <check> <result>" -> check -> result
    let got: HashMap<String, String> = vm
        .lines_with("DINV-P9 ")
        .iter()
        .filter_map(|l| l.split_once("DINV-P9 ")?.1.split_once(' '))
        .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        .collect();
    let expect = [
        ("read", "written-by-host".to_string()),
        ("stat", "16 640".to_string()),
        ("md5", md5(&rw.join("blob.bin"))),
        (
            "readdir",
            ". .. blob.bin delete-me.txt empty-dir host.txt".to_string(),
        ),
        ("create-rename", "ok".to_string()),
        ("copy", "ok".to_string()),
        ("symlink", "../host.txt written-by-host".to_string()),
        ("hardlink", "2".to_string()),
        ("setattr", "1000 600".to_string()),
        ("mknod", "fifo".to_string()),
        ("unlink", "ok".to_string()),
        // Rstatfs carries the host file system's type, which the client passes on.
        (
            "statfs",
            run_ok(Command::new("stat").args(["-f", "-c", "%t"]).arg(&rw))
                .trim()
                .to_string(),
        ),
        ("dotdot", "ro rw".to_string()),
        ("ro-read", "read-only-share".to_string()),
        ("ro-write", "refused".to_string()),
        ("ro-unlink", "refused".to_string()),
    ];
    for (check, want) in &expect {
        assert_eq!(
            got.get(*check).map(String::as_str),
            Some(want.as_str()),
            "{check}\n{}",
            vm.tail()
        );
    }

    // What the guest did is on the host, owned by the user dinv runs as.
    let renamed = rw.join("dir/sub/renamed.txt");
    assert_eq!(std::fs::read_to_string(&renamed).unwrap(), "guest-wrote\n");
    assert!(!rw.join("guest.txt").exists());
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(std::fs::metadata(&renamed).unwrap().uid(), euid);
    let copy = std::fs::read(rw.join("dir/copy.bin")).unwrap();
    assert_eq!(copy, blob()[..1000], "copy, then truncate to 1000 bytes");
    assert_eq!(
        std::fs::metadata(rw.join("dir/copy.bin")).unwrap().mode() & 0o777,
        0o600
    );
    assert_eq!(
        std::fs::read_link(rw.join("dir/link")).unwrap(),
        Path::new("../host.txt")
    );
    let hard = std::fs::metadata(rw.join("hard.txt")).unwrap();
    assert_eq!(
        (hard.ino(), hard.nlink()),
        (std::fs::metadata(&renamed).unwrap().ino(), 2)
    );
    assert!(std::fs::symlink_metadata(rw.join("dir/fifo"))
        .unwrap()
        .file_type()
        .is_fifo());
    assert!(!rw.join("delete-me.txt").exists() && !rw.join("empty-dir").exists());
    // The read-only export is untouched.
    let ro_entries: Vec<_> = std::fs::read_dir(&ro)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(ro_entries, ["ro.txt"]);
}
