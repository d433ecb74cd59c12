//! Agent configuration from the kernel command line (`/proc/cmdline`): the one configuration
//! channel between the host and the guest agent.
//!
//! | parameter | meaning | default |
//! |---|---|---|
//! | `dinv.docker_disk=<dev>` | block device holding `/var/lib/docker` | `/dev/vdb` |
//! | `dinv.shutdown_timeout=<secs>` | grace period for dockerd (then containerd) on shutdown | `5` |
//! | `dinv.insecure_registry=<host:port>` | passed to dockerd as `--insecure-registry` (repeatable) | none |
//! | `dinv.storage_driver=<name>` | dockerd `--storage-driver` | `overlay2` |
//! | `dinv.debug=1` | verbose agent logs, dockerd `--debug`, containerd debug log level | off |
//! | `dinv.ip=<addr/prefix>` `dinv.gw=<addr>` `dinv.dns=<addr>` | eth0 configuration (only if eth0 exists) | none |
//! | `dinv.mount=<tag>:<guestpath>[:ro]` | 9p share to mount (repeatable) | none |
//! | `dinv.volume=<dev>:<path>:<uid>:<gid>` | extra ext4 volume (formatted if blank) | none |
//! | `dinv.docker_tcp=<port>` | dockerd also listens on plain TCP `0.0.0.0:<port>` (no vsock needed: for comparing with other VMMs, as the original DinV ran) | off |
//! | `dinv.test_shutdown_after=<secs>` | testing: begin shutdown this long after `ready` (or after a daemon died) | off |
//!
//! Unknown `dinv.*` parameters are logged and ignored; a bad value is logged and the default kept.
//! Parsing is pure ([`Config::parse`] returns the warnings) so it is unit-tested without a VM.

use std::net::Ipv4Addr;

#[cfg(test)]
mod tests;

/// Default docker disk device.
pub const DEFAULT_DOCKER_DISK: &str = "/dev/vdb";
/// Default shutdown grace period in seconds.
pub const DEFAULT_SHUTDOWN_TIMEOUT: u64 = 5;
/// Default dockerd storage driver.
pub const DEFAULT_STORAGE_DRIVER: &str = "overlay2";

/// An IPv4 address with prefix length (`dinv.ip=10.0.2.15/24`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Cidr {
    /// Interface address.
    pub addr: Ipv4Addr,
    /// Prefix length, 0..=32.
    pub prefix: u8,
}

impl std::fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// A 9p share (`dinv.mount=<tag>:<guestpath>[:ro]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Share {
    /// virtio-9p mount tag.
    pub tag: String,
    /// Absolute guest path.
    pub path: String,
    /// Mount read-only.
    pub read_only: bool,
}

/// An extra block volume (`dinv.volume=<dev>:<path>:<uid>:<gid>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    /// Block device, e.g. `/dev/vdc`.
    pub device: String,
    /// Absolute guest mount point.
    pub path: String,
    /// Owner of the volume root after formatting.
    pub uid: u32,
    /// Group of the volume root after formatting.
    pub gid: u32,
}

/// Everything the agent takes from the kernel command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Docker disk device.
    pub docker_disk: String,
    /// Shutdown grace period (seconds).
    pub shutdown_timeout: u64,
    /// `--insecure-registry` values.
    pub insecure_registries: Vec<String>,
    /// `--storage-driver` value.
    pub storage_driver: String,
    /// Verbose logging.
    pub debug: bool,
    /// eth0 address.
    pub ip: Option<Ipv4Cidr>,
    /// Default gateway.
    pub gateway: Option<Ipv4Addr>,
    /// DNS servers for /etc/resolv.conf.
    pub dns: Vec<Ipv4Addr>,
    /// 9p shares.
    pub mounts: Vec<Share>,
    /// Extra volumes.
    pub volumes: Vec<Volume>,
    /// Also serve the docker API on this TCP port (plain; benchmarks against other VMMs).
    pub docker_tcp: Option<u16>,
    /// Testing aid: shut down this many seconds after `ready`.
    pub test_shutdown_after: Option<u64>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            docker_disk: DEFAULT_DOCKER_DISK.to_string(),
            shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
            insecure_registries: Vec::new(),
            storage_driver: DEFAULT_STORAGE_DRIVER.to_string(),
            debug: false,
            ip: None,
            gateway: None,
            dns: Vec::new(),
            mounts: Vec::new(),
            volumes: Vec::new(),
            docker_tcp: None,
            test_shutdown_after: None,
        }
    }
}

/// Splits a kernel command line into words, honouring double quotes the way the kernel does
/// (`a="b c"` is one word `a=b c`).
pub fn split_cmdline(cmdline: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_quotes = false;
    let mut have = false;
    for c in cmdline.chars() {
        match c {
            '"' => {
                in_quotes = !in_quotes;
                have = true;
            }
            c if c.is_whitespace() && !in_quotes => {
                if have {
                    words.push(std::mem::take(&mut cur));
                    have = false;
                }
            }
            c => {
                cur.push(c);
                have = true;
            }
        }
    }
    if have {
        words.push(cur);
    }
    words
}

fn is_abs_path(s: &str) -> bool {
    s.starts_with('/') && !s.split('/').any(|c| c == "..")
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
}

fn valid_registry(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || ".-:[]/".contains(c))
}

fn parse_cidr(s: &str) -> Option<Ipv4Cidr> {
    let (a, p) = s.split_once('/')?;
    let addr: Ipv4Addr = a.parse().ok()?;
    let prefix: u8 = p.parse().ok()?;
    (prefix <= 32).then_some(Ipv4Cidr { addr, prefix })
}

fn parse_share(s: &str) -> Option<Share> {
    let mut it = s.split(':');
    let tag = it.next()?.to_string();
    let path = it.next()?.to_string();
    let read_only = match it.next() {
        None => false,
        Some("ro") => true,
        Some("rw") => false,
        Some(_) => return None,
    };
    if it.next().is_some() || tag.is_empty() || tag.len() > 36 || !is_abs_path(&path) {
        return None;
    }
    Some(Share {
        tag,
        path,
        read_only,
    })
}

fn parse_volume(s: &str) -> Option<Volume> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 4 || !is_abs_path(parts[0]) || !is_abs_path(parts[1]) {
        return None;
    }
    Some(Volume {
        device: parts[0].to_string(),
        path: parts[1].to_string(),
        uid: parts[2].parse().ok()?,
        gid: parts[3].parse().ok()?,
    })
}

fn parse_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "y" | "yes" | "true" | "on" => Some(true),
        "0" | "n" | "no" | "false" | "off" => Some(false),
        _ => None,
    }
}

impl Config {
    /// Parses a kernel command line. Returns the configuration and human-readable warnings (unknown
    /// `dinv.*` parameters, bad values) for the caller to log. Non-`dinv.` words are ignored.
    pub fn parse(cmdline: &str) -> (Config, Vec<String>) {
        let mut cfg = Config::default();
        let mut warnings = Vec::new();
        for word in split_cmdline(cmdline) {
            let Some(rest) = word.strip_prefix("dinv.") else {
                continue;
            };
            let (key, value) = match rest.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (rest, None),
            };
            let mut bad = |what: &str| {
                warnings.push(format!("bad value in '{word}' ({what}); using the default"));
            };
            match (key, value) {
                ("docker_disk", Some(v)) if is_abs_path(v) => cfg.docker_disk = v.to_string(),
                ("docker_disk", _) => bad("expected an absolute device path"),
                ("shutdown_timeout", Some(v)) => match v.parse::<u64>() {
                    Ok(n) if n <= 3600 => cfg.shutdown_timeout = n,
                    _ => bad("expected seconds, 0..=3600"),
                },
                ("insecure_registry", Some(v)) if valid_registry(v) => {
                    cfg.insecure_registries.push(v.to_string())
                }
                ("insecure_registry", _) => bad("expected host:port"),
                ("storage_driver", Some(v)) if valid_name(v) => cfg.storage_driver = v.to_string(),
                ("storage_driver", _) => bad("expected a driver name"),
                ("debug", None) => cfg.debug = true,
                ("debug", Some(v)) => match parse_bool(v) {
                    Some(b) => cfg.debug = b,
                    None => bad("expected 0 or 1"),
                },
                ("ip", Some(v)) => match parse_cidr(v) {
                    Some(c) => cfg.ip = Some(c),
                    None => bad("expected addr/prefix"),
                },
                ("gw", Some(v)) => match v.parse() {
                    Ok(a) => cfg.gateway = Some(a),
                    Err(_) => bad("expected an IPv4 address"),
                },
                ("dns", Some(v)) => match v.parse() {
                    Ok(a) => cfg.dns.push(a),
                    Err(_) => bad("expected an IPv4 address"),
                },
                ("mount", Some(v)) => match parse_share(v) {
                    Some(s) => cfg.mounts.push(s),
                    None => bad("expected tag:/guest/path[:ro]"),
                },
                ("volume", Some(v)) => match parse_volume(v) {
                    Some(vol) => cfg.volumes.push(vol),
                    None => bad("expected /dev/X:/path:uid:gid"),
                },
                ("docker_tcp", Some(v)) => match v.parse::<u16>() {
                    Ok(p) if p > 0 => cfg.docker_tcp = Some(p),
                    _ => bad("expected a port, 1..=65535"),
                },
                ("test_shutdown_after", Some(v)) => match v.parse() {
                    Ok(n) => cfg.test_shutdown_after = Some(n),
                    Err(_) => bad("expected seconds"),
                },
                (
                    "shutdown_timeout"
                    | "ip"
                    | "gw"
                    | "dns"
                    | "mount"
                    | "volume"
                    | "docker_tcp"
                    | "test_shutdown_after",
                    None,
                ) => bad("missing value"),
                _ => warnings.push(format!("unknown parameter '{word}' ignored")),
            }
        }
        (cfg, warnings)
    }
}
