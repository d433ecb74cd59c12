//! For the docker end-to-end test (`tests/tests/docker.rs`) and whatever else boots the docker
//! guest: a `dinv` daemon, the host `docker` CLI against its socket with deadlines, graceful
//! stop, a local busybox image.

use std::ffi::OsString;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use crate::{artifact, run_ok, Running};

/// Time to the docker API on PVM is ~4.5 minutes on a quiet machine (15 on a loaded one).
pub const READY_TIMEOUT: Duration = Duration::from_secs(20 * 60);
pub const SHUTDOWN_TIMEOUT_SECS: u64 = 5;
/// Deadline of one docker CLI call (a container start takes ~3 minutes on PVM, up to ~10 on a
/// loaded machine). Two hung calls must still fail within CI's 90 minutes.
pub const DOCKER_CALL_TIMEOUT: Duration = Duration::from_secs(20 * 60);

/// A running `dinv` daemon and its docker socket.
#[derive(Debug)]
pub struct Dinv {
    /// The daemon process (console transcript, deadlines).
    pub vm: Running,
    /// Its docker API socket.
    pub sock: PathBuf,
}

/// Starts `dinv` with its docker disk and socket in `dir` (plus `extra` options) and waits
/// for the docker API.
pub fn start(dir: &Path, extra: &[&str]) -> Dinv {
    let sock = dir.join("docker.sock");
    let mut args: Vec<OsString> = vec![
        "--kernel".into(),
        artifact("DINV_KERNEL").into(),
        "--rootfs".into(),
        artifact("DINV_ROOTFS").into(),
        "--docker-image".into(),
        dir.join("docker.img").into(),
        "--docker-size".into(),
        "8G".into(),
        "--docker-sock".into(),
        sock.clone().into(),
        "--shutdown-timeout".into(),
        SHUTDOWN_TIMEOUT_SECS.to_string().into(),
    ];
    args.extend(extra.iter().map(OsString::from));
    let mut vm = Running::spawn(args);
    let ready = vm.wait_for("docker API ready", READY_TIMEOUT);
    eprintln!("{ready} (exec -> ready {:.1}s)", vm.elapsed().as_secs_f64());
    Dinv { vm, sock }
}

impl Dinv {
    /// Runs the docker CLI against the daemon, with a deadline.
    pub fn docker(&self, args: &[&str]) -> Output {
        let started = Instant::now();
        // Never hang the suite: every CLI call gets a (generous, PVM-sized) deadline.
        let out = Command::new("timeout")
            .args(["--kill-after=10", &DOCKER_CALL_TIMEOUT.as_secs().to_string(), "docker"])
            .env("DOCKER_HOST", format!("unix://{}", self.sock.display()))
            .env("DOCKER_BUILDKIT", "0")
            .args(args)
            .output()
            .expect("cannot run the docker CLI");
        // Progress for the CI log: on PVM single calls take minutes.
        eprintln!(
            "[{:7.1}s] docker {}: {} in {:.1}s",
            self.vm.elapsed().as_secs_f64(),
            args.iter().take(2).copied().collect::<Vec<_>>().join(" "),
            out.status,
            started.elapsed().as_secs_f64()
        );
        out
    }

    /// [`Dinv::docker`], which must succeed; returns stdout.
    pub fn docker_ok(&mut self, args: &[&str]) -> String {
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
    pub fn stop(mut self) {
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
pub fn busybox_tarball(dir: &Path) -> PathBuf {
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
