//! Starting containerd and dockerd with their output on the console, and the command lines used.
//!
//! Each daemon's stdout and stderr share one pipe; a thread per daemon forwards complete lines to
//! the console as `[t] <name>: <line>`. Children are not waited on here: PID 1's main loop reaps
//! every child (`waitpid(-1)`) and matches pids. Nothing is restarted automatically.

use std::io::{BufRead, BufReader};
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::{Command, Stdio};

use crate::config::Config;

/// containerd's API socket.
pub const CONTAINERD_SOCK: &str = "/run/containerd/containerd.sock";
/// Where the agent is installed in the guest (the kernel's `init=`).
pub const AGENT_PATH: &str = "/sbin/dinv-agent";
/// dockerd's API socket, the target of the vsock proxy.
pub const DOCKER_SOCK: &str = "/run/docker.sock";

/// The system directories every daemon searches, as a literal (for `concat!`).
macro_rules! system_path {
    () => {
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    };
}

/// PATH of containerd (and so of shims and runc).
pub const PATH: &str = system_path!();
/// PATH of dockerd: [`PATH`] behind `/usr/libexec/dinv/dockerd-path`, whose `runc` answers
/// `--version` from the value recorded when the image was built and execs the real runc for
/// everything else (guest-image/rootfs/build.sh). dockerd execs `runc --version` for every
/// `/version` and `/info` request: a Go program start, ~20 s of guest CPU on PVM, so 50
/// concurrent `docker version` calls cost over 15 minutes; the recorded answer costs a `sh`.
pub const DOCKERD_PATH: &str = concat!("/usr/libexec/dinv/dockerd-path:", system_path!());

fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: fds is a valid 2-element array for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both fds were just created by pipe2 and are owned only here.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Spawns `program args` with `path` as its PATH and its output forwarded to the console under
/// `name`. Returns the pid.
pub fn spawn(
    name: &'static str,
    program: &str,
    args: &[String],
    path: &str,
) -> std::io::Result<libc::pid_t> {
    let (rd, wr) = pipe()?;
    let wr2 = wr.try_clone()?;
    let child = Command::new(program)
        .args(args)
        .env_clear()
        .env("PATH", path)
        .env("HOME", "/root")
        .env("LANG", "C.UTF-8")
        // Cooperative preemption is enough for daemons and saves a signal delivery (expensive
        // on PVM) every 10 ms per busy thread. Inherited by shims and runc, with the PVM
        // profile's AVX switches (see `runtime_env`).
        .envs(runtime_env(|k| std::env::var(k).ok()))
        .stdin(Stdio::null())
        .stdout(Stdio::from(wr))
        .stderr(Stdio::from(wr2))
        .spawn()?;
    let pid = child.id() as libc::pid_t;
    // Dropping `child` neither kills nor waits; the main loop reaps the pid.
    drop(child);
    let reader = std::fs::File::from(rd);
    std::thread::Builder::new()
        .name(format!("log-{name}"))
        .spawn(move || {
            let mut r = BufReader::new(reader);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match r.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let text = String::from_utf8_lossy(&buf);
                        crate::log::line(name, text.trim_end_matches(['\n', '\r']));
                    }
                }
            }
        })?;
    Ok(pid)
}

/// Go and glibc settings for the daemons: `GODEBUG` gets `asyncpreemptoff=1` added to what the
/// agent itself received; `GODEBUG` and `GLIBC_TUNABLES` from the kernel command line (the PVM
/// profile sets both to turn AVX off: on PVM the guest kernel cannot save YMM registers, see
/// guest-image/kernel/cmdline-pvm.txt) are passed on.
pub fn runtime_env(get: impl Fn(&str) -> Option<String>) -> Vec<(&'static str, String)> {
    let godebug = match get("GODEBUG").filter(|g| !g.is_empty()) {
        Some(g) => format!("{g},asyncpreemptoff=1"),
        None => "asyncpreemptoff=1".to_string(),
    };
    let mut env = vec![("GODEBUG", godebug)];
    if let Some(t) = get("GLIBC_TUNABLES").filter(|t| !t.is_empty()) {
        env.push(("GLIBC_TUNABLES", t));
    }
    env
}

/// containerd's arguments.
pub fn containerd_args(cfg: &Config) -> Vec<String> {
    let mut a = vec![
        "--config".to_string(),
        "/etc/containerd/config.toml".to_string(),
    ];
    a.push("--address".into());
    a.push(CONTAINERD_SOCK.into());
    if cfg.debug {
        a.push("--log-level".into());
        a.push("debug".into());
    }
    a
}

/// dockerd's arguments. Without a configured eth0 there is no bridge and no iptables.
pub fn dockerd_args(cfg: &Config, network: bool) -> Vec<String> {
    let mut a: Vec<String> = vec![format!("--host=unix://{DOCKER_SOCK}")];
    if let Some(port) = cfg.docker_tcp {
        a.push(format!("--host=tcp://0.0.0.0:{port}"));
    }
    a.extend([
        format!("--containerd={CONTAINERD_SOCK}"),
        format!("--storage-driver={}", cfg.storage_driver),
        "--data-root=/var/lib/docker".into(),
        "--exec-root=/run/docker".into(),
        "--pidfile=/run/docker.pid".into(),
        // Containers get a little less than the agent's own grace period.
        format!(
            "--shutdown-timeout={}",
            cfg.shutdown_timeout.saturating_sub(1).max(1)
        ),
    ]);
    if network {
        // Bridge networking, but no iptables rules from dockerd: each iptables exec costs
        // seconds on PVM and dockerd runs dozens at start-up (measured: ~7 minutes of a
        // 17-minute boot). The agent adds the one MASQUERADE rule containers need (net.rs);
        // published ports go through docker-proxy. Not set up: inter-network isolation rules.
        a.push("--iptables=false".into());
        // dinv-agent doubles as the userland proxy: docker-proxy (Go) cannot start within
        // dockerd's 16 s deadline on PVM (see proxy.rs).
        a.push(format!("--userland-proxy-path={AGENT_PATH}"));
    } else {
        a.extend(["--bridge=none", "--iptables=false", "--ip-masq=false"].map(String::from));
    }
    for r in &cfg.insecure_registries {
        a.push(format!("--insecure-registry={r}"));
    }
    if cfg.debug {
        a.push("--debug".into());
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtime_env_passes_pvm_switches_on() {
        assert_eq!(runtime_env(|_| None), vec![("GODEBUG", "asyncpreemptoff=1".to_string())]);
        let env = runtime_env(|k| match k {
            "GODEBUG" => Some("cpu.avx=off,cpu.avx2=off".into()),
            "GLIBC_TUNABLES" => Some("glibc.cpu.hwcaps=-AVX".into()),
            _ => None,
        });
        assert_eq!(
            env,
            vec![
                ("GODEBUG", "cpu.avx=off,cpu.avx2=off,asyncpreemptoff=1".to_string()),
                ("GLIBC_TUNABLES", "glibc.cpu.hwcaps=-AVX".to_string()),
            ]
        );
    }

    #[test]
    fn dockerd_path_puts_the_runc_version_wrapper_first() {
        let (first, rest) = DOCKERD_PATH.split_once(':').unwrap();
        assert_eq!(first, "/usr/libexec/dinv/dockerd-path");
        assert_eq!(rest, PATH, "otherwise the same PATH as containerd");
    }

    #[test]
    fn dockerd_flags() {
        let (cfg, _) =
            Config::parse("dinv.insecure_registry=10.0.2.2:5000 dinv.shutdown_timeout=10");
        let a = dockerd_args(&cfg, false);
        assert!(a.contains(&"--host=unix:///run/docker.sock".to_string()));
        assert!(a.contains(&"--storage-driver=overlay2".to_string()));
        assert!(a.contains(&"--bridge=none".to_string()));
        assert!(a.contains(&"--iptables=false".to_string()));
        assert!(a.contains(&"--insecure-registry=10.0.2.2:5000".to_string()));
        assert!(a.contains(&"--shutdown-timeout=9".to_string()));
        assert!(!a.iter().any(|x| x.starts_with("--host=tcp")));
        let (cfg, w) = Config::parse("dinv.docker_tcp=2375");
        assert!(w.is_empty(), "{w:?}");
        assert!(dockerd_args(&cfg, true).contains(&"--host=tcp://0.0.0.0:2375".to_string()));
        let (_, w) = Config::parse("dinv.docker_tcp=0 dinv.docker_tcp");
        assert_eq!(w.len(), 2, "{w:?}");
        let a = dockerd_args(&cfg, true);
        assert!(!a.iter().any(|x| x.starts_with("--bridge")));
        assert!(a.contains(&"--iptables=false".to_string()));
        assert!(a.contains(&"--userland-proxy-path=/sbin/dinv-agent".to_string()));
    }
}
