//! dockerd in the guest, driven by the host `docker` CLI through dinv's unix socket.
//!
//! One guest serves every check (guest boots take minutes on PVM); the only restart is the
//! persistence check. Needs `DINV_KERNEL`, `DINV_ROOTFS` (see `.ci/run`), `/dev/kvm`, the
//! host `docker` CLI, Debian's busybox-static (for a local test image) and e2fsprogs.

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use dinv_tests::{artifact, require_kvm, run_ok, Running};

/// Time to the docker API on PVM is ~10 minutes today; allow for a loaded machine.
const READY_TIMEOUT: Duration = Duration::from_secs(40 * 60);
const SHUTDOWN_TIMEOUT_SECS: u64 = 5;

struct Dinv {
    vm: Running,
    sock: PathBuf,
}

fn start(dir: &Path) -> Dinv {
    let sock = dir.join("docker.sock");
    let mut vm = Running::spawn([
        "--kernel".as_ref(),
        artifact("DINV_KERNEL").as_os_str(),
        "--rootfs".as_ref(),
        artifact("DINV_ROOTFS").as_os_str(),
        "--docker-image".as_ref(),
        dir.join("docker.img").as_os_str(),
        "--docker-size".as_ref(),
        "8G".as_ref(),
        "--docker-sock".as_ref(),
        sock.as_os_str(),
        "--shutdown-timeout".as_ref(),
        SHUTDOWN_TIMEOUT_SECS.to_string().as_ref(),
    ]);
    let ready = vm.wait_for("docker API ready", READY_TIMEOUT);
    eprintln!("{ready} (exec -> ready {:.1}s)", vm.elapsed().as_secs_f64());
    Dinv { vm, sock }
}

impl Dinv {
    fn docker(&self, args: &[&str]) -> Output {
        Command::new("docker")
            .env("DOCKER_HOST", format!("unix://{}", self.sock.display()))
            .env("DOCKER_BUILDKIT", "0")
            .args(args)
            .output()
            .expect("cannot run the docker CLI")
    }

    fn docker_ok(&mut self, args: &[&str]) -> String {
        let out = self.docker(args);
        assert!(
            out.status.success(),
            "docker {args:?} failed ({}):\n{}\n{}\n--- dinv ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.vm.tail()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// SIGTERM, then expect a clean exit within the shutdown timeout plus a margin.
    fn stop(mut self) {
        let pid = self.vm.pid() as i32;
        // SAFETY: plain kill(2) on our own child.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        let started = Instant::now();
        let status = self.vm.wait_exit(Duration::from_secs(SHUTDOWN_TIMEOUT_SECS + 120));
        assert!(status.success(), "dinv exited {status} after SIGTERM\n{}", self.vm.tail());
        eprintln!("SIGTERM -> exit {:.1}s", started.elapsed().as_secs_f64());
        assert!(!self.vm.lines_with("dinv-agent: powering off").is_empty(), "{}", self.vm.tail());
        assert!(
            self.vm.transcript.iter().any(|l| l.contains("dockerd") && (l.contains("stop") || l.contains("Stop"))),
            "guest did not log dockerd stopping\n{}",
            self.vm.tail()
        );
    }
}

/// A busybox root filesystem tarball from Debian's busybox-static, for `docker import`.
fn busybox_tarball(dir: &Path) -> PathBuf {
    let root = dir.join("busybox-root");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::copy("/bin/busybox", root.join("bin/busybox"))
        .expect("/bin/busybox (Debian busybox-static) is required");
    let list = run_ok(Command::new("/bin/busybox").arg("--list"));
    for applet in list.lines().filter(|a| *a != "busybox") {
        let _ = symlink("busybox", root.join("bin").join(applet));
    }
    for d in ["etc", "tmp", "proc", "sys", "dev"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    let tar = dir.join("busybox.tar");
    run_ok(Command::new("tar").arg("-C").arg(&root).arg("-cf").arg(&tar).arg("."));
    tar
}

#[test]
fn docker_cli_drives_dockerd_in_the_guest() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let tar = busybox_tarball(dir.path());
    let mut dinv = start(dir.path());

    // Client and server both answer.
    let version = dinv.docker_ok(&["version", "--format", "{{.Client.Version}} {{.Server.Version}}"]);
    assert_eq!(version.split_whitespace().count(), 2, "{version}");
    let info = dinv.docker_ok(&["info", "--format", "{{.Driver}} {{.NCPU}} {{.OSType}}"]);
    assert!(info.starts_with("overlay2 ") && info.trim_end().ends_with("linux"), "{info}");

    // A locally built image: import and run it. Every container start costs minutes on PVM
    // (runc and the shim are Go programs), so each run checks as much as it can.
    dinv.docker_ok(&["import", tar.to_str().unwrap(), "dinv-busybox:test"]);
    let out = dinv.docker_ok(&["run", "--rm", "dinv-busybox:test", "sh", "-c", "echo ok"]);
    assert_eq!(out.trim(), "ok");
    // docker build FROM that image; running the result checks the build and that a
    // container's exit code (3) comes back through `docker run`.
    let ctx = dir.path().join("ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM dinv-busybox:test\nLABEL org.dinv.test=1\nCMD [\"sh\", \"-c\", \"echo built; exit 3\"]\n",
    )
    .unwrap();
    dinv.docker_ok(&["build", "-t", "dinv-built:test", ctx.to_str().unwrap()]);
    let run = dinv.docker(&["run", "--rm", "dinv-built:test"]);
    assert_eq!(String::from_utf8_lossy(&run.stdout).trim(), "built", "{run:?}");
    assert_eq!(run.status.code(), Some(3), "container exit code must propagate: {run:?}");

    // 50 concurrent API calls through the vsock muxer.
    let sock = dinv.sock.clone();
    let calls: Vec<_> = (0..50)
        .map(|_| {
            let sock = sock.clone();
            std::thread::spawn(move || {
                Command::new("docker")
                    .env("DOCKER_HOST", format!("unix://{}", sock.display()))
                    .args(["version", "--format", "{{.Server.Version}}"])
                    .output()
                    .expect("docker")
            })
        })
        .collect();
    let failed: Vec<String> = calls
        .into_iter()
        .map(|t| t.join().unwrap())
        .filter(|o| !o.status.success() || o.stdout.is_empty())
        .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
        .collect();
    assert!(failed.is_empty(), "{} of 50 concurrent calls failed: {:?}", failed.len(), failed.first());

    // Graceful shutdown; the docker disk is clean afterwards.
    dinv.stop();
    run_ok(Command::new("e2fsck").arg("-fn").arg(dir.path().join("docker.img")));

    // Restart on the same disk: the images persisted.
    let mut dinv = start(dir.path());
    let images = dinv.docker_ok(&["images", "--format", "{{.Repository}}:{{.Tag}}"]);
    assert!(images.lines().any(|l| l == "dinv-busybox:test"), "{images}");
    assert!(images.lines().any(|l| l == "dinv-built:test"), "{images}");
    dinv.stop();
    run_ok(Command::new("e2fsck").arg("-fn").arg(dir.path().join("docker.img")));
}
