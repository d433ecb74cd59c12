//! `dinv-agent`: PID 1 of the dinv guest (`init=/sbin/dinv-agent`).
//!
//! Boot sequence: early mounts ([`mounts`]) → configuration from `/proc/cmdline` ([`config`]) →
//! hostname, loopback, eth0 if present ([`net`]) → docker disk on `/var/lib/docker`, formatted only
//! if blank ([`disk`]) → extra volumes and 9p shares → containerd → (its socket appears) → dockerd →
//! (`/_ping` answers `OK`) → `ready`. In parallel from the start: the vsock listener on port 2375
//! proxying to `/run/docker.sock` ([`vsock`]) and the control channel client to host port 1024
//! ([`control`]).
//!
//! The main thread is the PID 1 loop: it owns every child (reaps all with `waitpid(-1)`), handles
//! SIGTERM/SIGINT/SIGPWR (shutdown) and SIGCHLD via `sigtimedwait`, and receives [`Event`]s from
//! the other threads (woken by SIGUSR1). A daemon that dies is logged and reported as
//! `error <name> exited <status>`; nothing restarts automatically.
//!
//! Shutdown: `stopping` to the host → SIGTERM dockerd, wait `dinv.shutdown_timeout` s, SIGKILL →
//! same for containerd → SIGTERM then SIGKILL every remaining process → sync → unmount storage
//! (innermost first) → sync → `dinv-agent: powering off` → `reboot(RB_AUTOBOOT)` (the VMM runs the
//! guest with `reboot=k`, so this is an i8042 reset = clean VM exit). The agent never returns:
//! PID 1 exiting would panic the kernel.

mod config;
mod control;
mod disk;
mod log;
mod mounts;
mod net;
mod ping;
mod proxy;
mod services;
mod sys;
mod vsock;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use config::Config;
use control::{AgentMessage, Control};

/// Messages from the agent's threads to the main loop.
#[derive(Debug)]
pub enum Event {
    /// Begin graceful shutdown (reason).
    Shutdown(String),
    /// dockerd answered `/_ping`.
    Ready,
}

/// A daemon the agent started.
#[derive(Debug, Clone, Copy)]
struct Daemon {
    name: &'static str,
    pid: libc::pid_t,
    exited: bool,
}

#[derive(Debug)]
struct Agent {
    cfg: Config,
    control: Control,
    events_tx: Sender<Event>,
    events: Receiver<Event>,
    containerd: Option<Daemon>,
    dockerd: Option<Daemon>,
    network: bool,
    /// dockerd still has to be started once containerd's socket exists.
    dockerd_pending: bool,
    prober_stop: Arc<AtomicBool>,
    ready_at: Option<Instant>,
    /// When a daemon first died unexpectedly (arms `dinv.test_shutdown_after` too).
    failed_at: Option<Instant>,
    shutdown: Option<String>,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if proxy::is_proxy_invocation(&args) {
        proxy::main(&args);
    }
    if args.iter().any(|a| a == "--version") {
        println!("dinv-agent {}", control::VERSION);
        return;
    }
    // SAFETY: getpid has no preconditions.
    if unsafe { libc::getpid() } != 1 {
        eprintln!(
            "dinv-agent {}: the dinv guest's init; run it as PID 1 (kernel cmdline init=/sbin/dinv-agent)",
            control::VERSION
        );
        std::process::exit(2);
    }
    run_as_init();
}

fn run_as_init() -> ! {
    // Before any work: the exec -> first-instruction latency shows in the timestamp.
    info!("dinv-agent {} exec'd as PID 1", control::VERSION);
    if let Err(e) = sys::block_handled_signals() {
        info!("cannot set up signal handling: {e}");
    }
    let root = mounts::writable_root();
    mounts::early();
    match root {
        Ok(()) => info!("root: overlay of the read-only image and a tmpfs"),
        Err(e) => info!("root stays read-only (no writable overlay: {e}); shares need existing mount points"),
    }
    info!(
        "dinv-agent {} starting (uptime {:.3}s)",
        control::VERSION,
        log::uptime()
    );

    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let (cfg, warnings) = Config::parse(&cmdline);
    log::set_debug(cfg.debug);
    for w in &warnings {
        info!("cmdline: {w}");
    }
    debug!("config: {cfg:?}");

    let (events_tx, events) = channel();
    let control = Control::default();
    // The host may connect as soon as the guest runs: start listener and control client first.
    control.start(events_tx.clone());
    let _ = std::thread::Builder::new().name("vsock".into()).spawn(|| {
        let e = vsock::serve(vsock::DOCKER_PORT, services::DOCKER_SOCK.into());
        info!("vsock listener on port {} failed: {e}", vsock::DOCKER_PORT);
    });

    let mut agent = Agent {
        cfg,
        control,
        events_tx,
        events,
        containerd: None,
        dockerd: None,
        network: false,
        dockerd_pending: false,
        prober_stop: Arc::new(AtomicBool::new(false)),
        ready_at: None,
        failed_at: None,
        shutdown: None,
    };
    agent.setup_system();
    agent.start_containerd();
    agent.main_loop()
}

impl Agent {
    fn setup_system(&mut self) {
        if let Err(e) = sys::set_hostname("dinv") {
            info!("sethostname: {e}");
        }
        self.network = net::setup(&self.cfg);

        let dev = Path::new(&self.cfg.docker_disk).to_path_buf();
        if !disk::wait_for(&dev, Duration::from_secs(5)) {
            self.report_error(&format!(
                "docker disk {} not found; /var/lib/docker is on tmpfs (nothing persists)",
                dev.display()
            ));
        } else {
            match disk::prepare_and_mount(&dev, Path::new("/var/lib/docker"), "dinvdocker") {
                Ok(formatted) => info!(
                    "docker disk {} mounted on /var/lib/docker ({})",
                    dev.display(),
                    if formatted {
                        "new filesystem"
                    } else {
                        "existing filesystem"
                    }
                ),
                Err(e) => self.report_error(&format!(
                    "docker disk {}: {e}; /var/lib/docker is on tmpfs (nothing persists)",
                    dev.display()
                )),
            }
        }

        for vol in self.cfg.volumes.clone() {
            let dev = Path::new(&vol.device);
            if !disk::wait_for(dev, Duration::from_secs(2)) {
                self.report_error(&format!("volume {} not found", vol.device));
                continue;
            }
            match disk::prepare_and_mount(dev, Path::new(&vol.path), "dinvvol") {
                Ok(formatted) => {
                    // The configured owner applies on every boot, not only after formatting.
                    let c = std::ffi::CString::new(vol.path.clone()).unwrap_or_default();
                    // SAFETY: c is a valid NUL-terminated path.
                    if unsafe { libc::chown(c.as_ptr(), vol.uid, vol.gid) } != 0 {
                        self.report_error(&format!("volume {}: chown: {}", vol.path, std::io::Error::last_os_error()));
                    }
                    info!(
                        "volume {} mounted on {} (owner {}:{}{})",
                        vol.device,
                        vol.path,
                        vol.uid,
                        vol.gid,
                        if formatted { ", new filesystem" } else { "" }
                    );
                }
                Err(e) => self.report_error(&format!("volume {}: {e}", vol.device)),
            }
        }

        for share in self.cfg.mounts.clone() {
            let path = Path::new(&share.path);
            let _ = std::fs::create_dir_all(path);
            let flags = if share.read_only { libc::MS_RDONLY } else { 0 };
            let r = sys::mount(
                Some(Path::new(&share.tag)),
                path,
                "9p",
                flags,
                Some("trans=virtio,version=9p2000.L,msize=524288,cache=none"),
            );
            match r {
                Ok(()) => info!("9p share {} mounted on {}", share.tag, share.path),
                Err(e) => {
                    self.report_error(&format!("9p share {} on {}: {e}", share.tag, share.path))
                }
            }
        }
    }

    fn report_error(&self, msg: &str) {
        info!("error: {msg}");
        self.control.send(AgentMessage::Error(msg.to_string()));
    }

    fn start_containerd(&mut self) {
        match services::spawn(
            "containerd",
            "/usr/bin/containerd",
            &services::containerd_args(&self.cfg),
            services::PATH,
        ) {
            Ok(pid) => {
                info!("containerd started (pid {pid})");
                self.containerd = Some(Daemon {
                    name: "containerd",
                    pid,
                    exited: false,
                });
                self.dockerd_pending = true;
            }
            Err(e) => self.report_error(&format!("cannot start containerd: {e}")),
        }
    }

    fn start_dockerd(&mut self) {
        self.dockerd_pending = false;
        let args = services::dockerd_args(&self.cfg, self.network);
        debug!("dockerd {}", args.join(" "));
        match services::spawn("dockerd", "/usr/sbin/dockerd", &args, services::DOCKERD_PATH) {
            Ok(pid) => {
                info!("dockerd started (pid {pid})");
                self.dockerd = Some(Daemon {
                    name: "dockerd",
                    pid,
                    exited: false,
                });
                self.start_prober();
            }
            Err(e) => self.report_error(&format!("cannot start dockerd: {e}")),
        }
    }

    /// Polls `/_ping` until it answers `OK`, then sends [`Event::Ready`].
    fn start_prober(&self) {
        let tx = self.events_tx.clone();
        let stop = self.prober_stop.clone();
        let r = std::thread::Builder::new()
            .name("prober".into())
            .spawn(move || {
                let sock = Path::new(services::DOCKER_SOCK);
                let mut seen = false;
                while !stop.load(Ordering::Relaxed) {
                    if !seen && sock.exists() {
                        seen = true;
                        info!("{} appeared", sock.display());
                    }
                    if seen {
                        let last_err = match ping::get(sock, "/_ping", Duration::from_secs(30)) {
                            Ok(r) if ping::is_ready(&r) => {
                                let _ = tx.send(Event::Ready);
                                sys::wake_main();
                                log_versions(sock);
                                return;
                            }
                            Ok(r) => format!("HTTP {}", r.0),
                            Err(e) => e.to_string(),
                        };
                        debug!("/_ping not ready: {last_err}");
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
            });
        if let Err(e) = r {
            info!("cannot start readiness prober: {e}");
        }
    }

    fn main_loop(mut self) -> ! {
        loop {
            let tick = if self.dockerd_pending {
                Duration::from_millis(100)
            } else {
                Duration::from_secs(1)
            };
            if let Some(sig) = sys::wait_signal(tick) {
                match sig {
                    libc::SIGTERM | libc::SIGINT | libc::SIGPWR => {
                        self.request_shutdown(format!("signal {sig}"));
                    }
                    _ => {}
                }
            }
            self.reap();
            while let Ok(ev) = self.events.try_recv() {
                match ev {
                    Event::Shutdown(why) => self.request_shutdown(why),
                    Event::Ready => {
                        self.ready_at = Some(Instant::now());
                        info!("ready (docker API answers /_ping)");
                        self.control.send(AgentMessage::Ready);
                    }
                }
            }
            if self.dockerd_pending
                && self.shutdown.is_none()
                && Path::new(services::CONTAINERD_SOCK).exists()
            {
                info!("containerd socket {} up", services::CONTAINERD_SOCK);
                self.start_dockerd();
            }
            if let (Some(after), Some(at)) = (
                self.cfg.test_shutdown_after,
                self.ready_at.or(self.failed_at),
            ) {
                if self.shutdown.is_none() && at.elapsed() >= Duration::from_secs(after) {
                    self.request_shutdown(format!("dinv.test_shutdown_after={after}"));
                }
            }
            if let Some(why) = self.shutdown.clone() {
                self.shutdown_and_power_off(&why);
            }
        }
    }

    fn request_shutdown(&mut self, why: String) {
        if self.shutdown.is_none() {
            self.shutdown = Some(why);
        }
    }

    /// Reaps every exited child; reports unexpected daemon exits.
    fn reap(&mut self) {
        while let Some(exit) = sys::reap_one() {
            let stopping = self.shutdown.is_some();
            for d in [self.containerd.as_mut(), self.dockerd.as_mut()]
                .into_iter()
                .flatten()
            {
                if d.pid == exit.pid && !d.exited {
                    d.exited = true;
                    let st = sys::describe_status(exit.status);
                    if stopping {
                        info!("{} exited ({st})", d.name);
                    } else {
                        info!(
                            "error: {} exited unexpectedly ({st}); not restarting",
                            d.name
                        );
                        self.control
                            .send(AgentMessage::Error(format!("{} exited {st}", d.name)));
                    }
                }
            }
            if self.containerd.is_some_and(|d| d.exited) && self.dockerd_pending {
                self.dockerd_pending = false;
            }
            if self.dockerd.is_some_and(|d| d.exited) {
                self.prober_stop.store(true, Ordering::Relaxed);
            }
        }
    }

    /// SIGTERM, wait up to `timeout` (reaping), then SIGKILL and wait a little more.
    fn stop_daemon(&mut self, which: fn(&mut Agent) -> Option<Daemon>, timeout: Duration) {
        let Some(d) = which(self) else { return };
        if d.exited {
            return;
        }
        info!(
            "stopping {} (SIGTERM, {}s grace)",
            d.name,
            timeout.as_secs()
        );
        sys::kill(d.pid, libc::SIGTERM);
        if !self.wait_exit(which, timeout) {
            info!(
                "{} did not stop within {}s: SIGKILL",
                d.name,
                timeout.as_secs()
            );
            sys::kill(d.pid, libc::SIGKILL);
            self.wait_exit(which, Duration::from_secs(2));
        }
    }

    fn wait_exit(&mut self, which: fn(&mut Agent) -> Option<Daemon>, timeout: Duration) -> bool {
        let start = Instant::now();
        loop {
            self.reap();
            if which(self).is_none_or(|d| d.exited) {
                return true;
            }
            if start.elapsed() >= timeout {
                return false;
            }
            sys::wait_signal(Duration::from_millis(50));
        }
    }

    fn shutdown_and_power_off(&mut self, why: &str) -> ! {
        let t0 = Instant::now();
        info!("shutting down ({why})");
        self.control.send(AgentMessage::Stopping);
        self.prober_stop.store(true, Ordering::Relaxed);
        self.dockerd_pending = false;
        let timeout = Duration::from_secs(self.cfg.shutdown_timeout);
        self.stop_daemon(|a| a.dockerd, timeout);
        self.stop_daemon(|a| a.containerd, timeout);

        // Whatever is left (container shims, containers, helpers): TERM, a moment, KILL.
        sys::kill(-1, libc::SIGTERM);
        let start = Instant::now();
        while start.elapsed() < Duration::from_millis(500) {
            self.reap();
            sys::wait_signal(Duration::from_millis(50));
        }
        sys::kill(-1, libc::SIGKILL);
        // Killed processes release their files only when they finish exiting: wait for every
        // user process to be gone before unmounting (else the docker disk is busy).
        let start = Instant::now();
        loop {
            self.reap();
            let left = sys::user_processes();
            if left.is_empty() {
                break;
            }
            if start.elapsed() >= Duration::from_secs(5) {
                let left: Vec<String> = left.into_iter().map(sys::describe_pid).collect();
                info!("still exiting after SIGKILL: {}", left.join(", "));
                break;
            }
            sys::wait_signal(Duration::from_millis(50));
        }

        sys::sync();
        let busy = mounts::unmount_all();
        sys::sync();
        info!(
            "shutdown done in {:.1}s ({})",
            t0.elapsed().as_secs_f64(),
            if busy == 0 {
                "all filesystems unmounted".to_string()
            } else {
                format!("{busy} busy: remounted read-only or frozen")
            }
        );
        info!("powering off");
        loop {
            let e = sys::reboot();
            info!("reboot failed: {e}; retrying in 1s");
            std::thread::sleep(Duration::from_secs(1));
        }
    }
}

/// Logs dockerd's version, storage driver and cgroup setup once ready (also a first check that
/// API calls other than `/_ping` work).
fn log_versions(sock: &Path) {
    match ping::get(sock, "/version", Duration::from_secs(60)) {
        Ok((200, body)) => info!(
            "dockerd {} (API {})",
            ping::json_str_field(&body, "Version").unwrap_or_default(),
            ping::json_str_field(&body, "ApiVersion").unwrap_or_default()
        ),
        Ok((code, _)) => info!("GET /version: HTTP {code}"),
        Err(e) => info!("GET /version: {e}"),
    }
    match ping::get(sock, "/info", Duration::from_secs(120)) {
        Ok((200, body)) => info!(
            "docker info: storage driver {}, cgroup v{} ({} driver), kernel {}",
            ping::json_str_field(&body, "Driver").unwrap_or_default(),
            ping::json_str_field(&body, "CgroupVersion").unwrap_or_default(),
            ping::json_str_field(&body, "CgroupDriver").unwrap_or_default(),
            ping::json_str_field(&body, "KernelVersion").unwrap_or_default()
        ),
        Ok((code, _)) => info!("GET /info: HTTP {code}"),
        Err(e) => info!("GET /info: {e}"),
    }
}
