//! Guest networking: loopback always (ioctl, no exec); eth0 only if it exists, configured from
//! `dinv.ip`/`dinv.gw`/`dinv.dns` with `ip` from iproute2 (a few execs at boot; simplest reliable).

use std::path::Path;
use std::process::Command;

use crate::config::Config;

/// Whether a network interface exists.
pub fn has_interface(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

fn ip(args: &[&str]) -> bool {
    match Command::new("/sbin/ip").args(args).status() {
        Ok(s) if s.success() => true,
        Ok(s) => {
            crate::info!("ip {}: {s}", args.join(" "));
            false
        }
        Err(e) => {
            crate::info!("ip {}: {e}", args.join(" "));
            false
        }
    }
}

/// Renders /etc/resolv.conf for the given servers.
pub fn resolv_conf(dns: &[std::net::Ipv4Addr]) -> String {
    dns.iter().map(|d| format!("nameserver {d}\n")).collect()
}

/// Brings up `lo`, and eth0 when present. Returns whether eth0 is up with an address (dockerd's
/// bridge networking is enabled only then).
pub fn setup(cfg: &Config) -> bool {
    if let Err(e) = crate::sys::interface_up("lo") {
        crate::info!("loopback up failed: {e}");
    }
    if !has_interface("eth0") {
        crate::info!("no eth0: networking limited to loopback (dockerd --bridge=none)");
        return false;
    }
    let Some(addr) = cfg.ip else {
        crate::info!("eth0 present but no dinv.ip: leaving it down");
        return false;
    };
    let mut ok = ip(&["link", "set", "eth0", "up"]);
    ok &= ip(&["addr", "add", &addr.to_string(), "dev", "eth0"]);
    if let Some(gw) = cfg.gateway {
        ok &= ip(&[
            "route",
            "add",
            "default",
            "via",
            &gw.to_string(),
            "dev",
            "eth0",
        ]);
    }
    if !cfg.dns.is_empty() {
        if let Err(e) = std::fs::write("/etc/resolv.conf", resolv_conf(&cfg.dns)) {
            crate::info!("write /etc/resolv.conf: {e}");
        }
    }
    if ok {
        // Containers reach the outside through eth0; dockerd runs with --iptables=false (see
        // services::dockerd_args), so the agent owns the one NAT rule they need.
        if let Err(e) = std::fs::write("/proc/sys/net/ipv4/ip_forward", "1") {
            crate::info!("enable ip_forward: {e}");
        }
        let _ = std::thread::Builder::new().name("nat".into()).spawn(|| {
            let args = ["-w", "-t", "nat", "-A", "POSTROUTING", "-o", "eth0", "-j", "MASQUERADE"];
            match Command::new("/usr/sbin/iptables").args(args).status() {
                Ok(s) if s.success() => crate::info!("eth0: masquerading container traffic"),
                Ok(s) => crate::info!("iptables {}: {s}", args.join(" ")),
                Err(e) => crate::info!("iptables {}: {e}", args.join(" ")),
            }
        });
    }
    crate::info!(
        "eth0 {addr} gw {:?} dns {:?}: {}",
        cfg.gateway,
        cfg.dns,
        if ok { "up" } else { "errors" }
    );
    ok
}

#[cfg(test)]
mod tests {
    #[test]
    fn resolv() {
        let dns = ["10.0.2.3".parse().unwrap(), "1.1.1.1".parse().unwrap()];
        assert_eq!(
            super::resolv_conf(&dns),
            "nameserver 10.0.2.3\nnameserver 1.1.1.1\n"
        );
    }
}
