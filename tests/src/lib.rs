//! Support for dinv's whole-system tests: where the artifacts are, how to run the `dinv`
//! binary with a deadline while watching its console, and hand-assembled guest payloads.
//!
//! Artifacts come from the environment, set by `.ci/run` (or by hand after running the
//! `guest-image` build scripts): `DINV_KERNEL` (vmlinux), `DINV_TEST_ROOTFS` (tiny ext4 root).
//! A missing artifact is a test failure with a message saying how to build it, never a skip.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub mod docker;
pub mod payload;

/// A required artifact named by environment variable `var`.
pub fn artifact(var: &str) -> PathBuf {
    match std::env::var_os(var) {
        Some(p) if Path::new(&p).exists() => PathBuf::from(p),
        Some(p) => panic!("{var}={} does not exist; run the guest-image build scripts (see .ci/run)", Path::new(&p).display()),
        None => panic!("{var} is not set; run the guest-image build scripts and export it (see .ci/run)"),
    }
}

/// The `dinv` binary: `DINV_BIN`, or the one cargo built next to this test executable.
pub fn dinv_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("DINV_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test> -> target/<profile>/dinv
    let candidate = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("dinv"))
        .expect("test executable has no grandparent directory");
    assert!(
        candidate.exists(),
        "{} not found: build it first (cargo build -p dinv-vmm) or set DINV_BIN",
        candidate.display()
    );
    candidate
}

/// Fails unless `/dev/kvm` is usable: whole-system tests need it and must not skip.
pub fn require_kvm() {
    if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        panic!("/dev/kvm is required for this test: {e}");
    }
}

/// A running `dinv` whose stdout (the guest console) and stderr are collected line by line.
#[derive(Debug)]
pub struct Running {
    child: Child,
    lines: mpsc::Receiver<String>,
    /// Everything seen so far (stdout and stderr interleaved as read).
    pub transcript: Vec<String>,
    started: Instant,
}

impl Running {
    /// Starts `dinv` with `args`.
    pub fn spawn<I, S>(args: I) -> Running
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        Self::spawn_program(dinv_bin(), args)
    }

    /// Starts any `program` with `args` (benchmarks run QEMU this way for comparison).
    pub fn spawn_program<P, I, S>(program: P, args: I) -> Running
    where
        P: AsRef<std::ffi::OsStr>,
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut child = Command::new(program.as_ref())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {:?}: {e}", program.as_ref()));
        let (tx, rx) = mpsc::channel();
        let out = child.stdout.take().expect("stdout");
        let err = child.stderr.take().expect("stderr");
        for (stream, prefix) in [(Box::new(out) as Box<dyn std::io::Read + Send>, ""), (Box::new(err), "[dinv] ")] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).split(b'\n') {
                    let Ok(line) = line else { break };
                    let text = String::from_utf8_lossy(&line).trim_end_matches('\r').to_string();
                    if tx.send(format!("{prefix}{text}")).is_err() {
                        break;
                    }
                }
            });
        }
        Running {
            child,
            lines: rx,
            transcript: Vec::new(),
            started: Instant::now(),
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Time since `spawn`.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    fn take_line(&mut self, timeout: Duration) -> Option<String> {
        match self.lines.recv_timeout(timeout) {
            Ok(line) => {
                if std::env::var_os("DINV_TEST_ECHO").is_some() {
                    eprintln!("{:>7.1}s | {line}", self.started.elapsed().as_secs_f64());
                }
                self.transcript.push(line.clone());
                Some(line)
            }
            Err(_) => None,
        }
    }

    /// Waits until a line containing `needle` appears; returns it. Panics with the transcript
    /// on timeout or when the process ends first.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                self.kill();
                panic!("timed out after {timeout:?} waiting for {needle:?}\n{}", self.tail());
            }
            match self.take_line(left.min(Duration::from_millis(500))) {
                Some(line) if line.contains(needle) => return line,
                Some(_) => {}
                None => {
                    if let Ok(Some(status)) = self.child.try_wait() {
                        // Drain what is left before giving up.
                        while let Some(line) = self.take_line(Duration::from_millis(200)) {
                            if line.contains(needle) {
                                return line;
                            }
                        }
                        panic!("dinv exited ({status}) before {needle:?}\n{}", self.tail());
                    }
                }
            }
        }
    }

    /// The first line containing `needle`, whether it was already read or is still to come
    /// (stdout and stderr are read by separate threads, so a line the program wrote to one
    /// stream before a line on the other may arrive after it). Panics like `wait_for`.
    pub fn seen_or_wait_for(&mut self, needle: &str, timeout: Duration) -> String {
        match self.lines_with(needle).first() {
            Some(line) => line.to_string(),
            None => self.wait_for(needle, timeout),
        }
    }

    /// Waits for the process to exit (draining output); panics on timeout.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                while self.take_line(Duration::from_millis(200)).is_some() {}
                return status;
            }
            if Instant::now() > deadline {
                self.kill();
                panic!("dinv did not exit within {timeout:?}\n{}", self.tail());
            }
            self.take_line(Duration::from_millis(200));
        }
    }

    /// The last lines of the transcript, for failure messages.
    pub fn tail(&self) -> String {
        let start = self.transcript.len().saturating_sub(60);
        self.transcript[start..].join("\n")
    }

    /// Lines seen so far that contain `needle`.
    pub fn lines_with(&self, needle: &str) -> Vec<&str> {
        self.transcript.iter().filter(|l| l.contains(needle)).map(String::as_str).collect()
    }

    /// Kills the process.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill();
        }
    }
}

/// Runs a host command, panicking with its output if it fails; returns stdout.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `N` distinct TCP ports that were free on 127.0.0.1 a moment ago. All `N` listeners are held
/// until every port is picked: ports taken one at a time can repeat (the kernel may hand the
/// same ephemeral port out again once its listener is closed).
pub fn free_tcp_ports<const N: usize>() -> [u16; N] {
    let listeners: Vec<std::net::TcpListener> =
        (0..N).map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port")).collect();
    std::array::from_fn(|i| listeners[i].local_addr().expect("local address").port())
}
