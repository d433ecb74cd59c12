//! `dinv` as a daemon: boot the docker guest, serve the docker API on a host unix socket,
//! report readiness, and shut down gracefully on SIGTERM/SIGINT.
//!
//! Data path: host docker CLI → unix socket (listened on by the vsock muxer) → virtio-vsock →
//! guest port [`control::DOCKER_PORT`] → guest agent → `/run/docker.sock` → dockerd.
//! Control path: guest agent → host port [`control::CONTROL_PORT`] → a private unix socket
//! served by [`control::AgentLink`] (readiness, shutdown requests).
//!
//! Signals: the first SIGTERM/SIGINT asks the agent to shut down (it stops dockerd within
//! `shutdown_timeout`, syncs, unmounts and powers off); if the guest is not gone after the
//! timeout plus [`SHUTDOWN_MARGIN`], or a second signal arrives, the VM is stopped hard. A hard
//! stop loses at most writes the guest never flushed: every virtio-blk flush is an fdatasync.

pub mod api;
pub mod control;
pub mod mounts;
pub mod snapshots;

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::{Console, DiskConfig, NetConfig, P9Config, Vm, VmExit, VsockConfig};
use control::{AgentEvent, AgentLink, CONTROL_PORT, DOCKER_PORT};
pub use mounts::{parse_mounts, Mount, MountError};

/// Extra time, beyond the guest's own shutdown timeout, for the guest to sync, unmount and
/// power off (PVM hosts are slow) before the VM is stopped hard.
pub const SHUTDOWN_MARGIN: Duration = Duration::from_secs(60);
/// Label of the docker disk's filesystem (the guest agent uses the same).
pub const DOCKER_DISK_LABEL: &str = "dinvdocker";
/// Label of the extra volume's filesystem.
pub const VOLUME_LABEL: &str = "dinvvol";
/// Guest context ID (host is 2).
pub const GUEST_CID: u64 = 3;

/// What the daemon needs to know.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// Guest kernel (vmlinux or bzImage).
    pub kernel: PathBuf,
    /// Guest root filesystem image (read-only).
    pub rootfs: PathBuf,
    /// Docker disk image (sparse; created when missing).
    pub docker_image: PathBuf,
    /// Size of a newly created docker disk, in bytes.
    pub docker_size: u64,
    /// Host unix socket serving the docker API.
    pub docker_sock: PathBuf,
    /// Owner of the docker socket.
    pub docker_sock_uid: Option<u32>,
    /// Group of the docker socket.
    pub docker_sock_gid: Option<u32>,
    /// vCPUs.
    pub cpus: u8,
    /// Guest memory in bytes.
    pub memory: u64,
    /// Seconds dockerd gets to stop.
    pub shutdown_timeout: u64,
    /// Guest console destination (None: the daemon's stderr).
    pub console_log: Option<PathBuf>,
    /// Debugging: write a guest profile here ([`crate::profile`]).
    pub guest_profile: Option<PathBuf>,
    /// Extra kernel parameters.
    pub extra_cmdline: String,
    /// The guest's network (subnet layout, port forwards); `None`: no network device.
    pub network: Option<netstack::Config>,
    /// Host directories shared with the guest (virtio-9p).
    pub mounts: Vec<Mount>,
    /// The docker API over TCP (plain or TLS), besides the unix socket; `None`: unix only.
    pub tcp_api: Option<api::TcpApi>,
    /// An extra ext4 volume for the guest (`DINV_VOLUME_*`), attached as `/dev/vdc`.
    pub volume: Option<Volume>,
    /// dockerd `--insecure-registry` entries.
    pub insecure_registries: Vec<String>,
    /// dockerd `--storage-driver` (`None`: dockerd's choice, overlay2).
    pub storage_driver: Option<String>,
    /// Verbose guest agent, dockerd `--debug`.
    pub debug: bool,
    /// Snapshot directory (`DINV_SNAPSHOT`, see [`snapshots`]); `None`: always boot.
    pub snapshot: Option<PathBuf>,
}

/// An extra sparse ext4 disk, formatted by the agent on first use and mounted in the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    /// Host image file (sparse; created when missing, grown never shrunk).
    pub image: PathBuf,
    /// Size of a new image, in bytes.
    pub size: u64,
    /// Absolute guest path it is mounted on.
    pub guest_path: String,
    /// Owner of the volume's root directory in the guest.
    pub uid: u32,
    /// Group of the volume's root directory in the guest.
    pub gid: u32,
}

impl Volume {
    /// A volume mounted at `guest_path` (checked like a `DINV_MOUNTS` guest path).
    pub fn new(image: impl Into<PathBuf>, size: u64, guest_path: &str, uid: u32, gid: u32) -> Result<Self, String> {
        let guest_path = mounts::check_guest_path(guest_path)?;
        Ok(Self { image: image.into(), size, guest_path, uid, gid })
    }
}

/// Checks a dockerd `--insecure-registry` value: `host[:port]` or a CIDR, nothing else.
pub fn check_registry(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 255
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b".-:/[]_".contains(&b))
        && !s.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!("{s:?} is not a registry address (host[:port] or CIDR)"))
    }
}

/// Checks a dockerd `--storage-driver` name.
pub fn check_storage_driver(s: &str) -> Result<(), String> {
    if !s.is_empty() && s.len() <= 32 && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_') {
        Ok(())
    } else {
        Err(format!("{s:?} is not a storage driver name (e.g. overlay2, vfs)"))
    }
}

impl DaemonConfig {
    /// The defaults of the `dinv` command for the given kernel and root filesystem.
    pub fn new(kernel: impl Into<PathBuf>, rootfs: impl Into<PathBuf>) -> Self {
        Self {
            kernel: kernel.into(),
            rootfs: rootfs.into(),
            docker_image: PathBuf::from("/docker/docker.img"),
            docker_size: 64 << 30,
            docker_sock: PathBuf::from("/var/run/docker.sock"),
            docker_sock_uid: None,
            docker_sock_gid: None,
            cpus: 1,
            memory: 512 << 20,
            shutdown_timeout: 5,
            console_log: None,
            guest_profile: None,
            extra_cmdline: String::new(),
            network: Some(guest_network(netstack::Config::default())),
            mounts: Vec::new(),
            tcp_api: None,
            volume: None,
            insecure_registries: Vec::new(),
            storage_driver: None,
            debug: false,
            snapshot: None,
        }
    }
}

/// The netstack settings the virtio-net device needs: a 64 KiB MTU with checksum offload, so
/// large segments cross in one frame and nobody computes checksums inside this host.
pub fn guest_network(mut cfg: netstack::Config) -> netstack::Config {
    cfg.mtu = usize::from(devices::virtio::net::DEFAULT_MTU);
    cfg.checksums = netstack::Checksums { verify_rx: false, compute_tx: false };
    cfg
}

/// The resolved configuration as `key=value` lines (`dinv --print-config`).
pub fn describe(cfg: &DaemonConfig) -> String {
    let mut out = String::new();
    let mut line = |k: &str, v: String| out.push_str(&format!("{k}={v}\n"));
    line("kernel", cfg.kernel.display().to_string());
    line("rootfs", cfg.rootfs.display().to_string());
    line("cpus", cfg.cpus.to_string());
    line("memory", cfg.memory.to_string());
    line("docker_image", cfg.docker_image.display().to_string());
    line("docker_size", cfg.docker_size.to_string());
    line("docker_sock", cfg.docker_sock.display().to_string());
    line("docker_sock_owner", format!("{:?}:{:?}", cfg.docker_sock_uid, cfg.docker_sock_gid));
    line("shutdown_timeout", cfg.shutdown_timeout.to_string());
    if let Some(net) = &cfg.network {
        line("subnet", net.subnet.to_string());
        let ports = |f: &[netstack::PortForward]| f.iter().map(|p| format!("{}:{}", p.host_port, p.guest_port)).collect::<Vec<_>>().join(";");
        line("tcp_ports", ports(&net.tcp_forwards));
        line("udp_ports", ports(&net.udp_forwards));
    }
    for m in &cfg.mounts {
        line("mount", format!("{}:{}{}", m.host.display(), m.guest, if m.read_only { ":ro" } else { "" }));
    }
    if let Some(v) = &cfg.volume {
        line("volume", format!("{}:{}:{}:{}:{}", v.image.display(), v.size, v.guest_path, v.uid, v.gid));
    }
    match &cfg.tcp_api {
        None => line("tcp_api", "none".into()),
        Some(api) => match &api.tls {
            None => line("tcp_api", format!("plain {}", api.listen)),
            Some(t) => line(
                "tcp_api",
                format!(
                    "tls {} verify={} certs={} sans={}",
                    api.listen,
                    t.verify,
                    t.certs_dir.display(),
                    t.extra_sans.join(",")
                ),
            ),
        },
    }
    line("snapshot", cfg.snapshot.as_ref().map_or("none".into(), |d| d.display().to_string()));
    line("cmdline", agent_cmdline(cfg));
    out
}

/// The agent's kernel parameters for `cfg` (see guest-image/agent/src/config.rs).
fn agent_cmdline(cfg: &DaemonConfig) -> String {
    let mut c = format!(
        "root=/dev/vda ro init=/sbin/dinv-agent dinv.docker_disk=/dev/vdb dinv.shutdown_timeout={}",
        cfg.shutdown_timeout
    );
    if let Some(net) = &cfg.network {
        c += &format!(
            " dinv.ip={}/{} dinv.gw={} dinv.dns={}",
            net.guest_ip,
            net.subnet.prefix(),
            net.gateway_ip,
            net.dns_ip
        );
    }
    for (i, m) in cfg.mounts.iter().enumerate() {
        c += &format!(" dinv.mount={}:{}{}", share_tag(i), m.guest, if m.read_only { ":ro" } else { "" });
    }
    if let Some(v) = &cfg.volume {
        c += &format!(" dinv.volume=/dev/vdc:{}:{}:{}", v.guest_path, v.uid, v.gid);
    }
    for r in &cfg.insecure_registries {
        c += &format!(" dinv.insecure_registry={r}");
    }
    if let Some(d) = &cfg.storage_driver {
        c += &format!(" dinv.storage_driver={d}");
    }
    if cfg.debug {
        c += " dinv.debug=1";
    }
    if !cfg.extra_cmdline.trim().is_empty() {
        c += " ";
        c += cfg.extra_cmdline.trim();
    }
    c
}

/// The virtio-9p mount tag of the `i`th share.
fn share_tag(i: usize) -> String {
    format!("dinv{i}")
}

/// Errors that stop the daemon before the guest runs.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// An input file is missing.
    #[error("{what} {path} is not readable: {source}")]
    Input {
        /// Which input.
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The docker disk could not be created.
    #[error("Cannot create disk image {path}: {source}")]
    DockerDisk {
        /// Image path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A socket could not be set up.
    #[error("Cannot listen on {path}: {source}")]
    Socket {
        /// Socket path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The TCP API could not be set up.
    #[error("Docker API over TCP: {0}")]
    TcpApi(#[from] api::ApiError),
    /// Signal handling could not be installed.
    #[error("Signal handling: {0}")]
    Signals(io::Error),
    /// A helper thread could not be started.
    #[error("Cannot start a thread: {0}")]
    Thread(io::Error),
    /// The network could not be set up.
    #[error("Network: {0}")]
    Network(#[from] netstack::Error),
    /// The VM failed.
    #[error(transparent)]
    Vm(#[from] crate::Error),
}

/// Creates a sparse disk image (docker disk, extra volume) if missing, or grows it to `size`
/// (never shrinks). Returns whether the image was created now.
pub fn prepare_disk_image(path: &Path, size: u64) -> io::Result<bool> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir)?;
    }
    let (file, created) = match OpenOptions::new().read(true).write(true).create_new(true).open(path) {
        Ok(f) => (f, true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            (OpenOptions::new().read(true).write(true).open(path)?, false)
        }
        Err(e) => return Err(e),
    };
    if file.metadata()?.len() < size {
        file.set_len(size)?;
    }
    Ok(created)
}

/// The `mkfs.ext4` arguments shared with the guest agent (before `-L LABEL DEVICE`).
pub fn mkfs_args() -> impl Iterator<Item = &'static str> {
    include_str!("../../../guest-image/mkfs-ext4.args")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
}

/// Where `mkfs.ext4` is on this host, if anywhere (`PATH`, then the sbin directories an
/// unprivileged user's `PATH` often lacks).
fn find_mkfs() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join("mkfs.ext4"))
        .find(|p| p.is_file())
}

/// Formats a just-created (all-zero, sparse) image as ext4 on the host, which takes
/// milliseconds instead of the minute the guest needs on PVM. Returns `Ok(false)` when this host
/// has no `mkfs.ext4`: the image stays blank and the guest agent formats it on first boot (same
/// arguments). A failed run leaves the image blank again, so the guest can still format it.
pub fn format_on_host(path: &Path, label: &str) -> io::Result<bool> {
    let Some(mkfs) = find_mkfs() else {
        tracing::debug!("no mkfs.ext4 on this host: the guest formats {}", path.display());
        return Ok(false);
    };
    let t = Instant::now();
    let out = std::process::Command::new(&mkfs)
        .args(mkfs_args())
        .arg("-L")
        .arg(label)
        .arg(path)
        .stdin(std::process::Stdio::null())
        .output()?;
    if !out.status.success() {
        let file = OpenOptions::new().write(true).open(path)?;
        let len = file.metadata()?.len();
        file.set_len(0)?;
        file.set_len(len)?;
        return Err(io::Error::other(format!(
            "{} failed ({}): {}",
            mkfs.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    tracing::info!("formatted {} as ext4 on the host in {:.2}s", path.display(), t.elapsed().as_secs_f64());
    Ok(true)
}

/// Creates or grows an image; formats a newly created one on the host when possible (failures
/// are logged: the guest then formats it).
fn prepare_and_format(path: &Path, size: u64, label: &str) -> io::Result<()> {
    if prepare_disk_image(path, size)? {
        if let Err(e) = format_on_host(path, label) {
            tracing::warn!("host formatting of {} failed, the guest will format it: {e}", path.display());
        }
    }
    Ok(())
}

/// Creates (and formats) the docker disk and the volume where they do not exist.
fn prepare_disks(cfg: &DaemonConfig) -> Result<(), DaemonError> {
    prepare_and_format(&cfg.docker_image, cfg.docker_size, DOCKER_DISK_LABEL)
        .map_err(|source| DaemonError::DockerDisk { path: cfg.docker_image.clone(), source })?;
    if let Some(v) = &cfg.volume {
        prepare_and_format(&v.image, v.size, VOLUME_LABEL)
            .map_err(|source| DaemonError::DockerDisk { path: v.image.clone(), source })?;
    }
    Ok(())
}

/// Binds a unix socket at `path`, replacing a stale socket file (one nobody answers on).
pub fn bind_socket(path: &Path, uid: Option<u32>, gid: Option<u32>) -> io::Result<UnixListener> {
    if let Ok(meta) = fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(io::Error::new(io::ErrorKind::AlreadyExists, "exists and is not a socket"));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(io::Error::new(io::ErrorKind::AddrInUse, "another daemon is serving it"));
        }
        fs::remove_file(path)?;
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir)?;
    }
    let listener = UnixListener::bind(path)?;
    if uid.is_some() || gid.is_some() {
        std::os::unix::fs::chown(path, uid, gid)?;
    }
    fs::set_permissions(path, fs::Permissions::from_mode(0o660))?;
    Ok(listener)
}

fn readable(what: &'static str, path: &Path) -> Result<(), DaemonError> {
    fs::File::open(path).map(drop).map_err(|source| DaemonError::Input {
        what,
        path: path.to_owned(),
        source,
    })
}

/// Asks the docker API on `sock` for `/_ping`; `Ok` when it answers `200 OK`.
pub fn ping(sock: &Path, timeout: Duration) -> io::Result<()> {
    use std::io::Read as _;
    let mut s = UnixStream::connect(sock)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.write_all(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")?;
    let mut head = [0u8; 64];
    let mut n = 0;
    while n < head.len() {
        match s.read(&mut head[n..])? {
            0 => break,
            k => n += k,
        }
        if head[..n].contains(&b'\n') {
            break;
        }
    }
    let line = String::from_utf8_lossy(&head[..n]);
    let status = line.lines().next().unwrap_or("").to_string();
    if status.split_whitespace().nth(1) == Some("200") {
        Ok(())
    } else {
        Err(io::Error::other(format!("unexpected answer {status:?}")))
    }
}

/// Runs the daemon until the guest ends. Returns how it ended.
pub fn run(cfg: DaemonConfig) -> Result<VmExit, DaemonError> {
    let started = Instant::now();
    readable("kernel", &cfg.kernel)?;
    readable("root filesystem", &cfg.rootfs)?;
    let mut plan = snapshots::plan(&cfg);
    // Held while this start reads the snapshot (until its memory is mapped).
    let mut snapshot_lock = None;
    if let snapshots::Plan::Resume(dir) = &plan {
        match snapshots::lock(dir, false) {
            Ok(l) => snapshot_lock = Some(l),
            Err(e) => tracing::warn!("cannot lock the snapshot in {}: {e}", dir.display()),
        }
        if let Err(e) = snapshots::install(&cfg, dir) {
            tracing::warn!("cannot use the snapshot in {}: {e}; booting", dir.display());
            snapshots::uninstall(&cfg);
            plan = snapshots::Plan::Take(dir.clone());
        }
    }
    if !matches!(plan, snapshots::Plan::Resume(_)) {
        prepare_disks(&cfg)?;
    }

    let runtime = tempfile::Builder::new()
        .prefix("dinv-")
        .tempdir()
        .map_err(|source| DaemonError::Socket { path: std::env::temp_dir(), source })?;
    let control_path = runtime.path().join("control.sock");
    let control = UnixListener::bind(&control_path).map_err(|source| DaemonError::Socket {
        path: control_path.clone(),
        source,
    })?;
    let docker = bind_socket(&cfg.docker_sock, cfg.docker_sock_uid, cfg.docker_sock_gid)
        .map_err(|source| DaemonError::Socket { path: cfg.docker_sock.clone(), source })?;
    // TCP clients are relayed to the unix socket (TLS terminates here, never in the guest).
    let tcp_addr = match &cfg.tcp_api {
        Some(tcp) => Some((api::serve(tcp, cfg.docker_sock.clone())?, tcp.tls.is_some())),
        None => None,
    };

    let console = match &cfg.console_log {
        Some(path) => Console::File(path.clone()),
        None => Console::Writer(Box::new(io::stderr())),
    };
    let mut root = DiskConfig::new(&cfg.rootfs);
    root.read_only = true;
    let mut builder = Vm::builder()
        .kernel(&cfg.kernel)
        .cmdline(agent_cmdline(&cfg))
        .vcpus(cfg.cpus)
        .memory(cfg.memory)
        .disk(root)
        .disk(DiskConfig::new(&cfg.docker_image))
        .vsock(VsockConfig {
            guest_cid: GUEST_CID,
            listeners: vec![(docker, DOCKER_PORT)],
            host_ports: vec![(CONTROL_PORT, control_path)],
        })
        .console(console);
    if let Some(path) = &cfg.guest_profile {
        builder = builder.guest_profile(path);
    }
    if let Some(v) = &cfg.volume {
        builder = builder.disk(DiskConfig::new(&v.image));
    }
    if let Some(net) = &cfg.network {
        let stack = netstack::NetStack::new(net.clone())?;
        let (tcp, udp) = stack.forward_addrs();
        for a in tcp {
            tracing::info!("forwarding tcp {a} to the guest");
        }
        for a in udp {
            tracing::info!("forwarding udp {a} to the guest");
        }
        builder = builder.net(NetConfig::with_backend(Box::new(stack)));
    }
    for (i, m) in cfg.mounts.iter().enumerate() {
        let mut share = P9Config::new(share_tag(i), &m.host);
        share.server.read_only = m.read_only;
        tracing::info!("sharing {} as {}{}", m.host.display(), m.guest, if m.read_only { " (read-only)" } else { "" });
        builder = builder.share(share);
    }
    if let snapshots::Plan::Resume(dir) = &plan {
        match builder.check_snapshot(dir) {
            Ok(()) => {
                tracing::info!("resuming the snapshot in {}", dir.display());
                builder = builder.restore_from(dir);
            }
            Err(e) => {
                tracing::info!("the snapshot in {} does not fit: {e}; booting, then replacing it", dir.display());
                snapshots::uninstall(&cfg);
                prepare_disks(&cfg)?;
                plan = snapshots::Plan::Take(dir.clone());
            }
        }
    }
    let vm = builder.build()?;
    drop(snapshot_lock);
    let handle = vm.handle();

    // Control channel: readiness and shutdown.
    let link = AgentLink::default();
    {
        let link = link.clone();
        let sock = cfg.docker_sock.clone();
        let mut announced = false;
        let mut take = match &plan {
            snapshots::Plan::Take(dir) => Some((dir.clone(), handle.clone())),
            _ => None,
        };
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                link.serve(control, move |event| match event {
                    AgentEvent::Hello(v) => tracing::info!("guest agent connected ({v})"),
                    // The agent replays `ready` when it reconnects: announce once.
                    AgentEvent::Ready if !announced => {
                        announced = true;
                        // Before announcing: no client request may be in the snapshot.
                        if let Some((dir, handle)) = take.take() {
                            match snapshots::save(&handle, &dir) {
                                Ok(info) => tracing::info!("snapshot saved to {} ({info}): the next start with new disks resumes it", dir.display()),
                                Err(e) => tracing::warn!("no snapshot saved: {e}"),
                            }
                        }
                        let tcp = match tcp_addr {
                            Some((addr, true)) => format!(" and tcp://{addr} (TLS)"),
                            Some((addr, false)) => format!(" and tcp://{addr}"),
                            None => String::new(),
                        };
                        println!(
                            "dinv: docker API ready at unix://{}{tcp} ({:.1}s)",
                            sock.display(),
                            started.elapsed().as_secs_f64()
                        );
                        let _ = io::stdout().flush();
                    }
                    AgentEvent::Ready => {}
                    AgentEvent::Stopping => tracing::info!("guest is shutting down"),
                    AgentEvent::Error(e) => tracing::error!("guest: {e}"),
                    AgentEvent::Unknown(l) => tracing::debug!("guest agent said {l:?}"),
                })
            })
            .map_err(DaemonError::Thread)?;
    }

    // Signals: graceful, then hard.
    let mut signals = Signals::new([SIGTERM, SIGINT]).map_err(DaemonError::Signals)?;
    let signals_handle = signals.handle();
    let shutdown_timeout = Duration::from_secs(cfg.shutdown_timeout);
    let stopping = Arc::new(AtomicBool::new(false));
    {
        let (link, handle, stopping) = (link.clone(), handle.clone(), stopping.clone());
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                for signal in signals.forever() {
                    if stopping.swap(true, Ordering::SeqCst) {
                        tracing::warn!("second signal ({signal}): stopping the VM now");
                        handle.stop();
                        continue;
                    }
                    if !link.request_shutdown() {
                        tracing::warn!("signal {signal} before the guest agent connected: stopping the VM now");
                        handle.stop();
                        continue;
                    }
                    tracing::info!("signal {signal}: asking the guest to shut down (timeout {}s)", shutdown_timeout.as_secs());
                    let handle = handle.clone();
                    std::thread::spawn(move || {
                        std::thread::sleep(shutdown_timeout + SHUTDOWN_MARGIN);
                        tracing::warn!("guest did not power off in time: stopping the VM");
                        handle.stop();
                    });
                }
            })
            .map_err(DaemonError::Thread)?;
    }

    let exit = vm.run();
    signals_handle.close();
    let _ = fs::remove_file(&cfg.docker_sock);
    let exit = exit?;
    // A hard stop requested by a signal is still the shutdown the user asked for.
    Ok(match exit {
        VmExit::Stopped if stopping.load(Ordering::SeqCst) => VmExit::Reset,
        other => other,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ping_wants_200_from_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let serve = |name: &str, answer: &'static [u8]| {
            let path = dir.path().join(name);
            let l = UnixListener::bind(&path).unwrap();
            std::thread::spawn(move || {
                let (mut c, _) = l.accept().unwrap();
                let mut buf = [0u8; 256];
                let _ = std::io::Read::read(&mut c, &mut buf);
                let _ = c.write_all(answer);
            });
            path
        };
        let t = Duration::from_secs(5);
        ping(&serve("ok.sock", b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nOK"), t).unwrap();
        assert!(ping(&serve("bad.sock", b"HTTP/1.0 503 Service Unavailable\r\n\r\n"), t).is_err());
        assert!(ping(&serve("mute.sock", b""), t).is_err());
        assert!(ping(&dir.path().join("none.sock"), t).is_err());
    }

    #[test]
    fn docker_disk_is_sparse_and_never_shrinks() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("sub/docker.img");
        assert!(prepare_disk_image(&img, 1 << 30).unwrap(), "created");
        let meta = fs::metadata(&img).unwrap();
        assert_eq!(meta.len(), 1 << 30);
        assert!(std::os::unix::fs::MetadataExt::blocks(&meta) < 64, "sparse");
        assert!(!prepare_disk_image(&img, 1 << 20).unwrap(), "exists");
        assert_eq!(fs::metadata(&img).unwrap().len(), 1 << 30);
        prepare_disk_image(&img, 2 << 30).unwrap();
        assert_eq!(fs::metadata(&img).unwrap().len(), 2 << 30);
    }

    /// The host formats a new image with the shared arguments: a clean ext4 with the label, the
    /// fixed feature set and a root directory owned by root, still sparse. (mkfs.ext4 is a CI
    /// prerequisite: scripts/setup installs e2fsprogs.)
    #[test]
    fn new_images_are_formatted_on_the_host() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("docker.img");
        assert!(prepare_disk_image(&img, 2 << 30).unwrap());
        assert!(format_on_host(&img, DOCKER_DISK_LABEL).unwrap(), "mkfs.ext4 must be installed");
        let fsck = std::process::Command::new(find_mkfs().unwrap().with_file_name("e2fsck"))
            .arg("-fn")
            .arg(&img)
            .output()
            .unwrap();
        assert!(fsck.status.success(), "{}", String::from_utf8_lossy(&fsck.stdout));
        let dump = std::process::Command::new(find_mkfs().unwrap().with_file_name("dumpe2fs"))
            .arg("-h")
            .arg(&img)
            .output()
            .unwrap();
        let dump = String::from_utf8_lossy(&dump.stdout);
        assert!(dump.contains("Filesystem volume name:   dinvdocker"), "{dump}");
        assert!(dump.contains("metadata_csum") && !dump.contains("orphan_file"), "{dump}");
        assert!(dump.contains("Reserved block count:     0"), "{dump}");
        let blocks = std::os::unix::fs::MetadataExt::blocks(&fs::metadata(&img).unwrap());
        assert!(blocks * 512 < 64 << 20, "still sparse: {blocks} blocks");
        // A failed run leaves a blank image for the guest.
        let bad = dir.path().join("bad.img");
        assert!(prepare_disk_image(&bad, 64 << 10).unwrap());
        fs::write(&bad, vec![7u8; 64 << 10]).unwrap();
        let err = format_on_host(&bad, DOCKER_DISK_LABEL).unwrap_err().to_string();
        assert!(err.contains("Not enough space"), "{err}");
        let data = fs::read(&bad).unwrap();
        assert_eq!(data.len(), 64 << 10);
        assert!(data.iter().all(|&b| b == 0));
    }

    #[test]
    fn stale_sockets_are_replaced_live_ones_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("docker.sock");
        let live = bind_socket(&path, None, None).unwrap();
        assert!(bind_socket(&path, None, None).is_err(), "someone answers there");
        drop(live);
        let _again = bind_socket(&path, None, None).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o660);
        let file = dir.path().join("file");
        fs::write(&file, b"x").unwrap();
        assert!(bind_socket(&file, None, None).is_err(), "not a socket: left alone");
    }
}
