//! `DINV_SNAPSHOT`: the first dinv boots the docker guest and saves it when dockerd is ready;
//! the next, with a new docker disk, resumes it instead of booting, and the host `docker` CLI
//! drives the resumed dockerd: version, an empty image list (the snapshot holds no client's
//! work), import, and a container whose clock is the host's (the agent set it on reconnection).
//! Both starts have a bind mount at the guest's `/data`, from a different host directory
//! each: the resumed guest's 9P session (its fids, reopened by path) serves a container's
//! `-v /data:/data` from the second directory, both ways.
//! A snapshot that does not fit the configuration is not resumed.
//!
//! In every test run (CI). On PVM: one boot (~5 minutes), one container start (~3 minutes).
//! Needs what `tests/tests/docker.rs` needs.

use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dinv_tests::docker::{busybox_tarball, start};
use dinv_tests::{artifact, require_kvm, run_ok, Running};

#[test]
fn a_new_docker_disk_resumes_the_saved_guest() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("snapshot");
    let snap_arg = snap.to_str().unwrap();
    let tar = busybox_tarball(dir.path());

    // First start: boots, saves the snapshot before it announces readiness.
    let first = dir.path().join("first");
    std::fs::create_dir_all(&first).unwrap();
    let share = |run: &std::path::Path| {
        let dir = run.join("share");
        std::fs::create_dir_all(&dir).unwrap();
        format!("{}:/data", dir.display())
    };
    let mounts = share(&first);
    let mut dinv = start(&first, &["--snapshot", snap_arg, "--mounts", &mounts]);
    // Logged (stderr) before readiness is printed (stdout); the streams are read apart.
    dinv.vm.seen_or_wait_for("snapshot saved to", Duration::from_secs(60));
    assert!(dinv.vm.lines_with("resuming the snapshot").is_empty(), "{}", dinv.vm.tail());
    let version = dinv.docker_ok(&["version", "--format", "{{.Server.Version}}"]);
    // Work done after readiness is not in the snapshot.
    dinv.docker_ok(&["import", tar.to_str().unwrap(), "after-the-snapshot:1"]);
    dinv.stop();
    assert!(snap.join("state").is_file() && snap.join("memory").is_file() && snap.join("disk-1.img").is_file());

    // Second start, new disk: resumes.
    let second = dir.path().join("second");
    std::fs::create_dir_all(&second).unwrap();
    let mounts = share(&second);
    std::fs::write(second.join("share/from-host.txt"), "written by the host\n").unwrap();
    let mut dinv = start(&second, &["--snapshot", snap_arg, "--mounts", &mounts]);
    dinv.vm.seen_or_wait_for("resuming the snapshot", Duration::from_secs(60));
    dinv.vm.seen_or_wait_for("resumed the snapshot", Duration::from_secs(60));
    assert!(dinv.vm.lines_with("snapshot saved to").is_empty(), "a resumed guest must not be saved again");
    assert_eq!(dinv.docker_ok(&["version", "--format", "{{.Server.Version}}"]), version);
    let images = dinv.docker_ok(&["images", "--format", "{{.Repository}}"]);
    assert!(images.trim().is_empty(), "the snapshot holds the first start's later work: {images}");
    dinv.docker_ok(&["import", tar.to_str().unwrap(), "dinv-busybox:resumed"]);
    let out = dinv.docker_ok(&[
        "run",
        "--rm",
        "-v",
        "/data:/data",
        "dinv-busybox:resumed",
        "sh",
        "-c",
        "echo resumed-ok; cat /data/from-host.txt; echo from the guest > /data/from-guest.txt; date +%s",
    ]);
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("resumed-ok"), "{out}");
    assert_eq!(lines.next(), Some("written by the host"), "the bind mount after resume: {out}");
    assert_eq!(
        std::fs::read_to_string(second.join("share/from-guest.txt")).unwrap(),
        "from the guest\n",
        "the container's write through the resumed 9P session"
    );
    assert!(!first.join("share/from-guest.txt").exists(), "the first run's directory must not be used");
    let guest_now: u64 = lines.next().and_then(|l| l.trim().parse().ok()).unwrap_or_else(|| panic!("{out}"));
    let host_now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    assert!(
        host_now.abs_diff(guest_now) < 120,
        "the resumed guest's clock is {guest_now}, the host's {host_now}: it was not set on resume"
    );
    dinv.stop();
    run_ok(Command::new("e2fsck").arg("-fn").arg(second.join("docker.img")));

    // A start that does not fit the snapshot (another memory size) boots instead (and would
    // replace the snapshot with its own once ready): the decision comes before the boot.
    let third = dir.path().join("third");
    let mut vm = Running::spawn([
        "--kernel",
        artifact("DINV_KERNEL").to_str().unwrap(),
        "--rootfs",
        artifact("DINV_ROOTFS").to_str().unwrap(),
        "--docker-image",
        third.join("docker.img").to_str().unwrap(),
        "--docker-sock",
        third.join("docker.sock").to_str().unwrap(),
        "--docker-size",
        "8G",
        "--memory",
        "768M",
        "--snapshot",
        snap_arg,
    ]);
    let line = vm.wait_for("the snapshot in", Duration::from_secs(120));
    assert!(line.contains("does not fit") && line.contains("different memory size"), "{line}");
    vm.wait_for("kernel ", Duration::from_secs(120));
    vm.kill();
}
