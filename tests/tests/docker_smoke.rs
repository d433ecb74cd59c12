//! The docker guest in every test run (CI): dinv boots the real docker rootfs with a fresh docker
//! disk (formatted on the host), and the host `docker` CLI drives dockerd through the vsock
//! socket: client and server versions, `docker info`, `docker import` of a local busybox image,
//! `docker run --rm` with its output and exit code, then SIGTERM (dinv exits 0 within the
//! shutdown timeout, the guest logs dockerd stopping) and a clean e2fsck of the docker disk.
//!
//! The full end-to-end test (`tests/tests/docker.rs`: build, bind mounts, ports, TLS, volume,
//! 50 concurrent calls, restart/persistence) needs feature `docker-e2e` (`scripts/test-docker`):
//! on PVM it takes about an hour. Needs `DINV_KERNEL`, `DINV_ROOTFS`, `/dev/kvm`, the host
//! `docker` CLI, Debian's busybox-static and e2fsprogs.

use std::process::Command;

use dinv_tests::docker::{busybox_tarball, start};
use dinv_tests::{require_kvm, run_ok};

#[test]
fn docker_cli_runs_a_container_in_the_guest() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let tar = busybox_tarball(dir.path());
    let mut dinv = start(dir.path(), &[]);
    assert!(
        !dinv.vm.lines_with("formatted").is_empty()
            && dinv.vm.lines_with("is blank: formatting").is_empty(),
        "the host formats the new docker disk, not the guest\n{}",
        dinv.vm.tail()
    );

    let versions = dinv.docker_ok(&["version", "--format", "{{.Client.Version}} {{.Server.Version}}"]);
    let mut v = versions.split_whitespace();
    let (client, server) = (v.next().unwrap_or(""), v.next().unwrap_or(""));
    assert!(!client.is_empty() && server.starts_with(char::is_numeric), "{versions}");

    let info = dinv.docker_ok(&["info", "--format", "{{.Driver}} {{.CgroupVersion}}"]);
    assert!(info.starts_with("overlay2 "), "{info}");
    assert!(info.trim_end().ends_with(" 2"), "cgroup v2: {info}");

    dinv.docker_ok(&["import", tar.to_str().unwrap(), "dinv-busybox:smoke"]);
    // Default (bridge) networking, as a user's `docker run` gets.
    let out = dinv.docker(&["run", "--rm", "dinv-busybox:smoke", "sh", "-c", "echo ok; exit 3"]);
    assert_eq!(out.status.code(), Some(3), "exit code propagated\n{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ok\n");

    dinv.stop();
    run_ok(Command::new("e2fsck").arg("-fn").arg(dir.path().join("docker.img")));
}
