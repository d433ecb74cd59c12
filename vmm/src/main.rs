//! The `dinv` command.
//!
//! `dinv` (no subcommand) is the daemon: it boots the docker guest and serves the docker API
//! on a host unix socket (see `dinv_vmm::daemon`).
//! `dinv boot` runs the VMM alone: boot a kernel with disks and a console, exit when the guest
//! does (0 when it powered off cleanly, 1 on panic or fault, 2 on bad options).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::builder::FalseyValueParser;
use clap::{ArgAction, Args, Parser, Subcommand, ValueEnum};
use dinv_vmm::{Console, DiskConfig, EntryPreference, NetConfig, P9Config, PvmMode, Vm};

/// Smallest guest memory the daemon accepts (dockerd + containerd + a container).
const MIN_MEMORY: u64 = 256 << 20;
/// Smallest docker disk.
const MIN_DOCKER_DISK: u64 = 1 << 30;
/// Smallest extra volume.
const MIN_VOLUME: u64 = 16 << 20;

#[derive(Parser, Debug)]
#[command(
    name = "dinv",
    version,
    about = "Docker in a microVM: one unprivileged process, only /dev/kvm",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(flatten)]
    daemon: DaemonArgs,
    /// Log level (error, warn, info, debug, trace).
    #[arg(long, env = "DINV_LOG_LEVEL", default_value = "info", global = true)]
    log_level: String,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Boot a kernel under the VMM (no docker): for kernels, images and tests.
    Boot(Box<BootArgs>),
    /// Exit 0 when the docker API on the socket answers `/_ping` (a container HEALTHCHECK).
    Health(HealthArgs),
}

#[derive(Args, Debug)]
struct HealthArgs {
    /// Unix socket serving the docker API.
    #[arg(long, env = "DINV_DOCKER_SOCK", default_value = "/var/run/docker.sock")]
    docker_sock: PathBuf,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 10)]
    timeout: u64,
}

fn health(args: HealthArgs) -> anyhow::Result<ExitCode> {
    match dinv_vmm::daemon::ping(&args.docker_sock, std::time::Duration::from_secs(args.timeout)) {
        Ok(()) => {
            println!("docker API ready at unix://{}", args.docker_sock.display());
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            println!("docker API not ready at unix://{}: {e}", args.docker_sock.display());
            Ok(ExitCode::from(1))
        }
    }
}

#[derive(Args, Debug)]
struct DaemonArgs {
    /// Number of vCPUs.
    #[arg(long, env = "DINV_CPUS", default_value_t = 1)]
    cpus: u8,
    /// Guest memory (K/M/G suffixes).
    #[arg(long, env = "DINV_MEMORY", default_value = "512M")]
    memory: String,
    /// Size of the docker disk (sparse; K/M/G suffixes).
    #[arg(long, env = "DINV_DOCKER_SIZE", default_value = "64G")]
    docker_size: String,
    /// Docker disk image (created when missing; persists images and containers).
    #[arg(long, env = "DINV_DOCKER_IMAGE", default_value = "/docker/docker.img")]
    docker_image: PathBuf,
    /// Unix socket serving the docker API.
    #[arg(long, env = "DINV_DOCKER_SOCK", default_value = "/var/run/docker.sock")]
    docker_sock: PathBuf,
    /// Owner (uid) of the docker socket.
    #[arg(long, env = "DINV_DOCKER_SOCK_UID")]
    docker_sock_uid: Option<u32>,
    /// Group (gid) of the docker socket.
    #[arg(long, env = "DINV_DOCKER_SOCK_GID")]
    docker_sock_gid: Option<u32>,
    /// Seconds dockerd gets to stop on shutdown.
    #[arg(long, env = "DINV_SHUTDOWN_TIMEOUT", default_value_t = 5)]
    shutdown_timeout: u64,
    /// Guest kernel.
    #[arg(long, env = "DINV_KERNEL", default_value = "/usr/lib/dinv/vmlinux")]
    kernel: PathBuf,
    /// Guest root filesystem image.
    #[arg(long, env = "DINV_ROOTFS", default_value = "/usr/lib/dinv/rootfs.ext4")]
    rootfs: PathBuf,
    /// Write the guest console here instead of stderr.
    #[arg(long, env = "DINV_CONSOLE_LOG")]
    console_log: Option<PathBuf>,
    /// Debugging: sample where the guest spends its time, write the histogram here
    /// (`scripts/guest-profile` symbolizes it).
    #[arg(long, env = "DINV_GUEST_PROFILE", hide = true)]
    guest_profile: Option<PathBuf>,
    /// Extra guest kernel parameters.
    #[arg(long, env = "DINV_CMDLINE", default_value = "")]
    cmdline: String,
    /// TCP ports forwarded from the host to the guest: `P` or `HOST:GUEST`, `;`-separated.
    #[arg(long, env = "DINV_TCP_PORTS", default_value = "")]
    tcp_ports: String,
    /// UDP ports forwarded from the host to the guest: `P` or `HOST:GUEST`, `;`-separated.
    #[arg(long, env = "DINV_UDP_PORTS", default_value = "")]
    udp_ports: String,
    /// The guest's IPv4 subnet (gateway .1, host loopback alias .2, DNS .3, guest .15).
    #[arg(long, env = "DINV_SUBNET", default_value = "10.234.0.0/24")]
    subnet: String,
    /// Host directories shared with the guest: `HOST[:GUEST][:ro]`, `;`-separated.
    #[arg(long, env = "DINV_MOUNTS", default_value = "")]
    mounts: String,
    /// Also serve the docker API over plain TCP on 2375 (no authentication: prefer --tlsverify).
    #[arg(long, env = "DINV_TCP", conflicts_with = "local", action = ArgAction::SetTrue, value_parser = FalseyValueParser::new())]
    tcp: bool,
    /// Serve the docker API over TLS on 2376 (server certificate only).
    #[arg(long, env = "DINV_TLS", conflicts_with = "local", action = ArgAction::SetTrue, value_parser = FalseyValueParser::new())]
    tls: bool,
    /// Serve the docker API over TLS on 2376 and require client certificates signed by the CA.
    #[arg(long, env = "DINV_TLSVERIFY", conflicts_with = "local", action = ArgAction::SetTrue, value_parser = FalseyValueParser::new())]
    tlsverify: bool,
    /// Certificate directory (docker's names: ca.pem, server-cert.pem, server-key.pem, cert.pem,
    /// key.pem); generated with a new CA when the server pair is missing.
    #[arg(long, env = "DINV_CERTS_DIR", default_value = "/certs")]
    certs_dir: PathBuf,
    /// Extra subject alternative name (IP or DNS) for a generated server certificate; repeatable
    /// (env: comma-separated).
    #[arg(long = "tls-san", env = "DINV_TLS_SAN", value_delimiter = ',')]
    tls_san: Vec<String>,
    /// Address for the TCP API (default 0.0.0.0 on 2375, or 2376 with TLS).
    #[arg(long, env = "DINV_TCP_LISTEN", value_name = "ADDR:PORT")]
    tcp_listen: Option<std::net::SocketAddr>,
    /// Serve the docker API on the unix socket only (refuses --tcp/--tls/--tlsverify).
    #[arg(long, env = "DINV_LOCAL", action = ArgAction::SetTrue, value_parser = FalseyValueParser::new())]
    local: bool,
    /// Guest path of an extra ext4 volume (formatted on first use); unset: no volume.
    #[arg(long, env = "DINV_VOLUME_PATH")]
    volume_path: Option<String>,
    /// Size of a new volume image (sparse; K/M/G suffixes).
    #[arg(long, env = "DINV_VOLUME_SIZE", default_value = "64G")]
    volume_size: String,
    /// Owner (uid) of the volume's root directory in the guest.
    #[arg(long, env = "DINV_VOLUME_UID", default_value_t = 0)]
    volume_uid: u32,
    /// Group (gid) of the volume's root directory in the guest.
    #[arg(long, env = "DINV_VOLUME_GID", default_value_t = 0)]
    volume_gid: u32,
    /// Host image file of the volume.
    #[arg(long, env = "DINV_VOLUME_IMAGE", default_value = "/volume/volume.img")]
    volume_image: PathBuf,
    /// Registry dockerd may reach over plain HTTP (repeatable; env: comma-separated).
    #[arg(long = "insecure-registry", env = "DINV_INSECURE_REGISTRY", value_delimiter = ',')]
    insecure_registry: Vec<String>,
    /// dockerd storage driver (default overlay2).
    #[arg(long, env = "DINV_STORAGE_DRIVER")]
    storage_driver: Option<String>,
    /// Snapshot directory: a start with a new docker disk resumes the booted guest saved here
    /// (seconds instead of minutes) when it fits this configuration; otherwise dinv boots and
    /// saves one here once the docker API is ready. With DINV_MOUNTS, the guest paths must
    /// match; the host directories may differ.
    #[arg(long, env = "DINV_SNAPSHOT", value_name = "DIR")]
    snapshot: Option<PathBuf>,
    /// Debug output: dinv log level debug, verbose guest agent, dockerd --debug.
    #[arg(long, env = "DEBUG", action = ArgAction::SetTrue, value_parser = FalseyValueParser::new())]
    debug: bool,
    /// Check the options, print the resulting configuration (and the guest's kernel command
    /// line) and exit without booting.
    #[arg(long)]
    print_config: bool,
}

impl DaemonArgs {
    /// The TCP API the flags ask for, if any.
    fn tcp_api(&self) -> anyhow::Result<Option<dinv_vmm::daemon::api::TcpApi>> {
        use dinv_vmm::daemon::api::{check_san, TcpApi, TlsSettings};
        for san in &self.tls_san {
            check_san(san).map_err(|e| anyhow::anyhow!("--tls-san: {e}"))?;
        }
        let mut api = if self.tls || self.tlsverify {
            TcpApi::tls(TlsSettings {
                certs_dir: self.certs_dir.clone(),
                verify: self.tlsverify,
                extra_sans: self.tls_san.clone(),
            })
        } else if self.tcp {
            TcpApi::plain()
        } else {
            if self.tcp_listen.is_some() {
                anyhow::bail!("--tcp-listen: needs --tcp, --tls or --tlsverify");
            }
            return Ok(None);
        };
        if let Some(addr) = self.tcp_listen {
            api.listen = addr;
        }
        Ok(Some(api))
    }
}

#[derive(Args, Debug)]
struct BootArgs {
    /// Kernel image (ELF vmlinux or bzImage).
    #[arg(long)]
    kernel: PathBuf,
    /// Extra kernel command-line parameters.
    #[arg(long, default_value = "")]
    cmdline: String,
    /// Disk image, attached as virtio-blk in order (/dev/vda, /dev/vdb…). Append `,ro` for
    /// read-only.
    #[arg(long = "disk", value_name = "PATH[,ro]")]
    disks: Vec<String>,
    /// Number of vCPUs.
    #[arg(long, env = "DINV_CPUS", default_value_t = 1)]
    cpus: u8,
    /// Guest memory (K/M/G suffixes).
    #[arg(long, env = "DINV_MEMORY", default_value = "256M")]
    memory: String,
    /// Write the guest console to this file instead of stdout.
    #[arg(long)]
    console: Option<PathBuf>,
    /// Entry point for ELF kernels.
    #[arg(long, value_enum, default_value_t = Entry::Linux64)]
    entry: Entry,
    /// Sample where the guest spends its time; write the histogram here
    /// (`scripts/guest-profile` symbolizes it).
    #[arg(long, env = "DINV_GUEST_PROFILE")]
    guest_profile: Option<PathBuf>,
    /// PVM compatibility profile.
    #[arg(long, value_enum, default_value_t = Pvm::Auto)]
    pvm: Pvm,
    /// Share a host directory over virtio-9p under mount tag TAG; `,ro` for read-only
    /// (repeatable).
    #[arg(long = "share", value_name = "TAG=PATH[,ro]")]
    shares: Vec<String>,
    /// Debugging snapshots: after SECS seconds, capture the guest's KVM state and continue in a
    /// fresh KVM VM restored from it.
    #[arg(long, value_name = "SECS", hide = true)]
    relocate_after: Option<f64>,
    /// Write a snapshot of the running guest to DIR (which must not exist) after
    /// --snapshot-after seconds; the guest goes on.
    #[arg(long, value_name = "DIR", requires = "snapshot_after")]
    snapshot_to: Option<PathBuf>,
    /// When to take the --snapshot-to snapshot, in seconds after start.
    #[arg(long, value_name = "SECS", requires = "snapshot_to")]
    snapshot_after: Option<f64>,
    /// Resume the snapshot in DIR instead of booting: the other options must describe the
    /// same machine. A writable --disk that does not exist is created from the snapshot's copy.
    #[arg(long, value_name = "DIR")]
    restore: Option<PathBuf>,
    /// Attach virtio-net backed by the user-mode netstack on this subnet (guest .15, gateway
    /// .1, DNS .3, host loopback .2), e.g. 10.234.0.0/24. The guest configures its own address.
    #[arg(long, value_name = "SUBNET")]
    net: Option<String>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Entry {
    Linux64,
    Pvh,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Pvm {
    Auto,
    On,
    Off,
}

/// Splits `PATH[,ro|,rw]` into the path and whether it is read-only (`flag` names the option in
/// errors).
fn split_access<'a>(flag: &str, spec: &'a str) -> Result<(&'a str, bool), String> {
    match spec.rsplit_once(',') {
        Some((p, "ro")) => Ok((p, true)),
        Some((p, "rw")) => Ok((p, false)),
        Some((_, opt)) => Err(format!("{flag} {spec}: unknown option '{opt}' (use ro or rw)")),
        None => Ok((spec, false)),
    }
}

fn disk(spec: &str) -> Result<DiskConfig, String> {
    let (path, ro) = split_access("--disk", spec)?;
    let mut cfg = DiskConfig::new(path);
    cfg.read_only = ro;
    Ok(cfg)
}

fn share(spec: &str) -> Result<P9Config, String> {
    let (tag, rest) = spec.split_once('=').ok_or_else(|| format!("--share {spec}: expected TAG=PATH[,ro]"))?;
    let (path, ro) = split_access("--share", rest)?;
    if tag.is_empty() || path.is_empty() {
        return Err(format!("--share {spec}: expected TAG=PATH[,ro]"));
    }
    let mut cfg = P9Config::new(tag, path);
    cfg.server.read_only = ro;
    Ok(cfg)
}

fn boot(args: Box<BootArgs>) -> anyhow::Result<ExitCode> {
    let memory = dinv_vmm::size::parse_size(&args.memory).map_err(|e| anyhow::anyhow!("--memory: {e}"))?;
    let mut builder = Vm::builder()
        .kernel(&args.kernel)
        .cmdline(args.cmdline)
        .vcpus(args.cpus)
        .memory(memory)
        .entry(match args.entry {
            Entry::Linux64 => EntryPreference::Linux64,
            Entry::Pvh => EntryPreference::Pvh,
        })
        .pvm(match args.pvm {
            Pvm::Auto => PvmMode::Auto,
            Pvm::On => PvmMode::On,
            Pvm::Off => PvmMode::Off,
        });
    if let Some(path) = &args.guest_profile {
        builder = builder.guest_profile(path);
    }
    if let Some(secs) = args.relocate_after {
        let after = std::time::Duration::try_from_secs_f64(secs).map_err(|e| anyhow::anyhow!("--relocate-after: {e}"))?;
        builder = builder.relocate_after(after);
    }
    for (i, spec) in args.disks.iter().enumerate() {
        let cfg = disk(spec).map_err(anyhow::Error::msg)?;
        if let Some(dir) = &args.restore {
            if !cfg.read_only && !cfg.path.exists() {
                let copied = dinv_vmm::snapshot::install_disk(dir, i, &cfg.path)?;
                tracing::info!("disk {} created from the snapshot ({} MiB copied)", cfg.path.display(), copied >> 20);
            }
        }
        builder = builder.disk(cfg);
    }
    if let Some(dir) = &args.restore {
        builder = builder.restore_from(dir);
    }
    for spec in &args.shares {
        builder = builder.share(share(spec).map_err(anyhow::Error::msg)?);
    }
    if let Some(subnet) = &args.net {
        use anyhow::Context as _;
        let subnet: netstack::Ipv4Subnet = subnet.parse().map_err(|e| anyhow::anyhow!("--net {subnet:?}: {e}"))?;
        netstack::config::check_host_routes(subnet).context("--net")?;
        let cfg = dinv_vmm::daemon::guest_network(netstack::Config::for_subnet(subnet).context("--net")?);
        builder = builder.net(NetConfig::with_backend(Box::new(netstack::NetStack::new(cfg)?)));
    }
    if let Some(path) = args.console {
        builder = builder.console(Console::File(path));
    }
    let vm = builder.build()?;
    if let (Some(dir), Some(secs)) = (args.snapshot_to, args.snapshot_after) {
        let after = std::time::Duration::try_from_secs_f64(secs).map_err(|e| anyhow::anyhow!("--snapshot-after: {e}"))?;
        let handle = vm.handle();
        std::thread::spawn(move || {
            std::thread::sleep(after);
            // The outcome is logged by the VM's run loop.
            let _ = handle.snapshot(dir);
        });
    }
    let exit = vm.run()?;
    if exit.is_clean() {
        tracing::info!("{exit}");
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("dinv: {exit}");
        Ok(ExitCode::from(1))
    }
}

fn daemon(args: DaemonArgs) -> anyhow::Result<ExitCode> {
    use anyhow::Context as _;
    let size = |name: &str, v: &str| dinv_vmm::size::parse_size(v).map_err(|e| anyhow::anyhow!("{name}: {e}"));
    let subnet: netstack::Ipv4Subnet =
        args.subnet.parse().map_err(|e| anyhow::anyhow!("DINV_SUBNET {:?}: {e}", args.subnet))?;
    netstack::config::check_host_routes(subnet).context("DINV_SUBNET")?;
    let mut network = netstack::Config::for_subnet(subnet).context("DINV_SUBNET")?;
    network.tcp_forwards = netstack::parse_port_list(&args.tcp_ports).context("DINV_TCP_PORTS")?;
    network.udp_forwards = netstack::parse_port_list(&args.udp_ports).context("DINV_UDP_PORTS")?;
    let tcp_api = args.tcp_api()?;
    if let Some(api) = &tcp_api {
        // Forwards listen on every address, so any API address with the same port collides.
        if let Some(f) = network.tcp_forwards.iter().find(|f| f.host_port == api.listen.port()) {
            anyhow::bail!(
                "DINV_TCP_PORTS: host port {} is also the docker API's port ({}; see --tcp-listen)",
                f.host_port,
                api.listen
            );
        }
    }
    let host_cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if args.cpus == 0 || usize::from(args.cpus) > host_cpus {
        anyhow::bail!("DINV_CPUS={}: must be between 1 and this host's {host_cpus} CPUs", args.cpus);
    }
    let volume = match &args.volume_path {
        Some(path) => {
            let size = size("DINV_VOLUME_SIZE", &args.volume_size)?;
            if size < MIN_VOLUME {
                anyhow::bail!("DINV_VOLUME_SIZE={}: at least 16M", args.volume_size);
            }
            Some(
                dinv_vmm::daemon::Volume::new(&args.volume_image, size, path, args.volume_uid, args.volume_gid)
                    .map_err(|e| anyhow::anyhow!("DINV_VOLUME_PATH: {e}"))?,
            )
        }
        None => None,
    };
    for r in &args.insecure_registry {
        dinv_vmm::daemon::check_registry(r).map_err(|e| anyhow::anyhow!("--insecure-registry: {e}"))?;
    }
    if let Some(d) = &args.storage_driver {
        dinv_vmm::daemon::check_storage_driver(d).map_err(|e| anyhow::anyhow!("--storage-driver: {e}"))?;
    }
    let mut cfg = dinv_vmm::daemon::DaemonConfig::new(args.kernel, args.rootfs);
    cfg.tcp_api = tcp_api;
    cfg.volume = volume;
    cfg.insecure_registries = args.insecure_registry.clone();
    cfg.storage_driver = args.storage_driver.clone();
    cfg.debug = args.debug;
    cfg.memory = size("DINV_MEMORY", &args.memory)?;
    if cfg.memory < MIN_MEMORY {
        anyhow::bail!("DINV_MEMORY={}: dockerd needs at least 256M", args.memory);
    }
    cfg.docker_size = size("DINV_DOCKER_SIZE", &args.docker_size)?;
    if cfg.docker_size < MIN_DOCKER_DISK {
        anyhow::bail!("DINV_DOCKER_SIZE={}: at least 1G", args.docker_size);
    }
    cfg.docker_image = args.docker_image;
    cfg.docker_sock = args.docker_sock;
    cfg.docker_sock_uid = args.docker_sock_uid;
    cfg.docker_sock_gid = args.docker_sock_gid;
    cfg.cpus = args.cpus;
    cfg.shutdown_timeout = args.shutdown_timeout;
    cfg.console_log = args.console_log;
    cfg.guest_profile = args.guest_profile;
    cfg.extra_cmdline = args.cmdline;
    cfg.network = Some(dinv_vmm::daemon::guest_network(network));
    cfg.mounts = dinv_vmm::daemon::parse_mounts(&args.mounts)?;
    if let Some(dir) = &args.snapshot {
        if dir.exists() && !dir.is_dir() {
            anyhow::bail!("DINV_SNAPSHOT={}: not a directory", dir.display());
        }
    }
    cfg.snapshot = args.snapshot;

    if args.print_config {
        print!("{}", dinv_vmm::daemon::describe(&cfg));
        return Ok(ExitCode::SUCCESS);
    }
    let exit = dinv_vmm::daemon::run(cfg)?;
    if exit.is_clean() {
        tracing::info!("{exit}");
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("dinv: {exit}");
        Ok(ExitCode::from(1))
    }
}

/// The error and its causes on one line, each cause left out when the message before it already
/// says it (several of our error types print their source in their own message).
fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !line.contains(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
    }
    line
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let level = if cli.daemon.debug && cli.log_level == "info" { "debug" } else { cli.log_level.as_str() };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(level))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match cli.command {
        Some(Command::Boot(args)) => boot(args),
        Some(Command::Health(args)) => health(args),
        None => daemon(cli.daemon),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("dinv: {}", one_line(&e));
            ExitCode::from(2)
        }
    }
}
