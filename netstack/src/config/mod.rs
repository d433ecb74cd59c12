//! Netstack configuration: the guest subnet and its well-known addresses, port forwards, limits.
//!
//! Also the parsers for the user-facing knobs: `DINV_SUBNET` ([`Ipv4Subnet`]'s `FromStr`),
//! `DINV_TCP_PORTS` / `DINV_UDP_PORTS` ([`parse_port_list`]), the host route check that refuses a
//! guest subnet overlapping a host route ([`check_host_routes`], reading `/proc/net/route`), and the
//! `resolv.conf` reader that picks the upstream DNS server ([`parse_resolv_conf`]).
//!
//! Default layout (slirp-like offsets inside the subnet, here [`DEFAULT_SUBNET`] = `10.234.0.0/24`,
//! chosen to collide with neither Docker's `172.17.0.0/16`, DinV's `172.19.0.0/16`, Docker's
//! `192.168.0.0/16` user-network pool, nor QEMU slirp's `10.0.2.0/24`):
//!
//! | offset | address        | role |
//! |--------|----------------|------|
//! | `.1`   | `10.234.0.1`   | gateway (ARP, default route) |
//! | `.2`   | `10.234.0.2`   | host loopback alias: TCP/UDP/ICMP to it reach the host's `127.0.0.1` |
//! | `.3`   | `10.234.0.3`   | DNS: UDP/TCP port 53 forwarded to the first `nameserver` of `resolv.conf` |
//! | `.15`  | `10.234.0.15`  | the guest |

use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

#[cfg(test)]
mod tests;

/// Errors found while building or validating a configuration.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// A port forward list entry is invalid.
    #[error("Invalid port forward entry {entry:?}: {reason}")]
    PortEntry {
        /// The offending entry, as written.
        entry: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// A subnet string is not `a.b.c.d/len`.
    #[error("Invalid subnet {0:?}: expected a.b.c.d/len with len between 8 and 27")]
    Subnet(String),
    /// The guest subnet overlaps a host route.
    #[error(
        "Guest subnet {subnet} overlaps host route {route} on {iface}; choose another DINV_SUBNET"
    )]
    RouteOverlap {
        /// The guest subnet.
        subnet: Ipv4Subnet,
        /// The overlapping host route.
        route: Ipv4Subnet,
        /// The interface of the host route.
        iface: String,
    },
    /// An address of the layout is outside the subnet or reused.
    #[error("Invalid address layout: {0}")]
    Layout(String),
    /// The MTU is out of range.
    #[error("Invalid MTU {0}: must be between 576 and 65521")]
    Mtu(usize),
}

/// An IPv4 network: address with the host bits cleared, and prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ipv4Subnet {
    network: Ipv4Addr,
    prefix: u8,
}

/// The default guest subnet (see the module docs for why this one).
pub const DEFAULT_SUBNET: Ipv4Subnet = Ipv4Subnet {
    network: Ipv4Addr::new(10, 234, 0, 0),
    prefix: 24,
};

impl Ipv4Subnet {
    /// A subnet from any address inside it and a prefix length (0..=32); host bits are cleared.
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Option<Self> {
        if prefix > 32 {
            return None;
        }
        Some(Self {
            network: Ipv4Addr::from(u32::from(addr) & mask(prefix)),
            prefix,
        })
    }

    /// The network address.
    pub fn network(&self) -> Ipv4Addr {
        self.network
    }

    /// The prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// The directed broadcast address.
    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) | !mask(self.prefix))
    }

    /// Whether `ip` lies inside the subnet.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & mask(self.prefix) == u32::from(self.network)
    }

    /// Whether the two subnets share at least one address.
    pub fn overlaps(&self, other: &Ipv4Subnet) -> bool {
        let m = mask(self.prefix.min(other.prefix));
        u32::from(self.network) & m == u32::from(other.network) & m
    }

    /// The address `offset` hosts above the network address, if it is a host address.
    pub fn host(&self, offset: u32) -> Option<Ipv4Addr> {
        let size = 1u64 << (32 - u32::from(self.prefix));
        if offset == 0 || u64::from(offset) >= size - 1 {
            return None;
        }
        Some(Ipv4Addr::from(u32::from(self.network) + offset))
    }
}

fn mask(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix))
    }
}

impl fmt::Display for Ipv4Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl FromStr for Ipv4Subnet {
    type Err = ConfigError;

    /// Parses `a.b.c.d/len`; `len` must leave room for the default layout (8..=27).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ConfigError::Subnet(s.to_string());
        let (addr, len) = s.trim().split_once('/').ok_or_else(err)?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| err())?;
        let len: u8 = len.parse().map_err(|_| err())?;
        if !(8..=27).contains(&len) {
            return Err(err());
        }
        Ipv4Subnet::new(addr, len).ok_or_else(err)
    }
}

/// One port forward: connections/datagrams to `host_port` on the host reach `guest_port` on the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PortForward {
    /// Port the netstack listens on, on the host.
    pub host_port: u16,
    /// Port on the guest IP the traffic is relayed to.
    pub guest_port: u16,
}

/// Parses a `DINV_TCP_PORTS`/`DINV_UDP_PORTS` value: semicolon-separated entries, each `P`
/// (same port on both sides) or `HOST:GUEST`. Whitespace around entries and empty entries
/// (`"80;"`) are ignored. Rejects non-numeric ports, 0, values above 65535 and duplicate host
/// ports, naming the entry.
pub fn parse_port_list(list: &str) -> Result<Vec<PortForward>, ConfigError> {
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    for entry in list.split(';').map(str::trim).filter(|e| !e.is_empty()) {
        let bad = |reason| ConfigError::PortEntry {
            entry: entry.to_string(),
            reason,
        };
        let (host, guest) = match entry.split_once(':') {
            Some((h, g)) => (
                parse_port(h.trim()).map_err(bad)?,
                parse_port(g.trim()).map_err(bad)?,
            ),
            None => {
                let p = parse_port(entry).map_err(bad)?;
                (p, p)
            }
        };
        if !seen.insert(host) {
            return Err(bad("host port listed twice"));
        }
        out.push(PortForward {
            host_port: host,
            guest_port: guest,
        });
    }
    Ok(out)
}

fn parse_port(s: &str) -> Result<u16, &'static str> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err("port is not a number");
    }
    match s.parse::<u32>() {
        Ok(0) => Err("port 0 is not allowed"),
        Ok(p) if p <= 65535 => Ok(p as u16),
        _ => Err("port is above 65535"),
    }
}

/// Checks `subnet` against the host's IPv4 routes in `/proc/net/route`.
pub fn check_host_routes(subnet: Ipv4Subnet) -> Result<(), ConfigError> {
    match std::fs::read_to_string("/proc/net/route") {
        Ok(table) => check_routes(subnet, &table),
        // No procfs (unusual sandbox): nothing to compare against.
        Err(_) => Ok(()),
    }
}

/// Checks `subnet` against a routing table in `/proc/net/route` format. Default routes
/// (mask 0) are ignored: they overlap everything by definition.
pub fn check_routes(subnet: Ipv4Subnet, table: &str) -> Result<(), ConfigError> {
    for line in table.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 8 {
            continue;
        }
        let (Ok(dest), Ok(mask_bits)) = (
            u32::from_str_radix(fields[1], 16),
            u32::from_str_radix(fields[7], 16),
        ) else {
            continue;
        };
        // The kernel prints each big-endian address as a native-endian integer.
        let dest = Ipv4Addr::from(dest.to_ne_bytes());
        let mask_v = u32::from_be_bytes(mask_bits.to_ne_bytes());
        if mask_v == 0 {
            continue;
        }
        let prefix = mask_v.leading_ones() as u8;
        let Some(route) = Ipv4Subnet::new(dest, prefix) else {
            continue;
        };
        if route.overlaps(&subnet) {
            return Err(ConfigError::RouteOverlap {
                subnet,
                route,
                iface: fields[0].to_string(),
            });
        }
    }
    Ok(())
}

/// The first IPv4 or IPv6 `nameserver` in a `resolv.conf` text.
pub fn parse_resolv_conf(text: &str) -> Option<IpAddr> {
    text.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        if words.next()? != "nameserver" {
            return None;
        }
        // Strip an IPv6 zone ("fe80::1%eth0"), which we cannot use.
        words.next()?.split('%').next()?.parse().ok()
    })
}

/// Which checksums the netstack computes and verifies. A virtio-net device that negotiated
/// checksum offload with the guest turns both off: the guest then trusts frames marked
/// `DATA_VALID` and sends frames whose checksums it left to the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checksums {
    /// Verify IPv4/TCP/UDP/ICMP checksums of guest frames; bad ones are counted and dropped.
    pub verify_rx: bool,
    /// Fill checksums of frames sent to the guest.
    pub compute_tx: bool,
}

impl Default for Checksums {
    fn default() -> Self {
        Self {
            verify_rx: true,
            compute_tx: true,
        }
    }
}

/// Resource limits and timeouts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Maximum simultaneous TCP connections (both directions, including pending connects).
    pub max_tcp_flows: usize,
    /// Maximum simultaneous UDP flows (including DNS) and ICMP echo flows.
    pub max_udp_flows: usize,
    /// Receive and send buffer size of each TCP connection, per direction.
    pub tcp_buffer_size: usize,
    /// A guest SYN whose host connect has not completed after this is answered with a RST.
    pub tcp_connect_timeout: Duration,
    /// UDP and ICMP flows idle for this long are closed.
    pub udp_idle_timeout: Duration,
    /// UDP flows to port 53 idle for this long are closed.
    pub dns_idle_timeout: Duration,
    /// Frames queued toward the guest before the stack stops producing (backpressure).
    pub max_tx_frames: usize,
    /// Frames from the guest queued before the next `poll`; more are dropped and counted.
    pub max_rx_frames: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_tcp_flows: 1024,
            max_udp_flows: 512,
            tcp_buffer_size: 256 * 1024,
            tcp_connect_timeout: Duration::from_secs(30),
            udp_idle_timeout: Duration::from_secs(60),
            dns_idle_timeout: Duration::from_secs(10),
            max_tx_frames: 1024,
            max_rx_frames: 1024,
        }
    }
}

/// Everything [`crate::NetStack::new`] needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The guest subnet.
    pub subnet: Ipv4Subnet,
    /// The gateway's (our) address.
    pub gateway_ip: Ipv4Addr,
    /// The gateway's (our) MAC address.
    pub gateway_mac: [u8; 6],
    /// The guest's address; the only source address NAT accepts.
    pub guest_ip: Ipv4Addr,
    /// The DNS address the guest uses; port 53 is forwarded to the upstream resolver.
    pub dns_ip: Ipv4Addr,
    /// The address that maps to the host's `127.0.0.1`.
    pub host_loopback_ip: Ipv4Addr,
    /// Where the upstream resolver is read from (the first `nameserver` line).
    pub resolv_conf: PathBuf,
    /// Host address the port forward listeners bind to.
    pub forward_bind: IpAddr,
    /// TCP port forwards (host → guest).
    pub tcp_forwards: Vec<PortForward>,
    /// UDP port forwards (host → guest).
    pub udp_forwards: Vec<PortForward>,
    /// IP MTU of the link (the ethernet frame may be 14 bytes longer).
    pub mtu: usize,
    /// Checksum computation/verification.
    pub checksums: Checksums,
    /// Limits and timeouts.
    pub limits: Limits,
}

/// Locally administered MAC of the gateway: `02:64:69:6e:76:01` ("dinv").
pub const DEFAULT_GATEWAY_MAC: [u8; 6] = [0x02, 0x64, 0x69, 0x6e, 0x76, 0x01];

impl Config {
    /// The default layout (see the module docs) inside `subnet`, everything else default.
    pub fn for_subnet(subnet: Ipv4Subnet) -> Result<Self, ConfigError> {
        let host = |n| {
            subnet
                .host(n)
                .ok_or_else(|| ConfigError::Layout(format!("{subnet} has no host .{n}")))
        };
        Ok(Self {
            subnet,
            gateway_ip: host(1)?,
            gateway_mac: DEFAULT_GATEWAY_MAC,
            guest_ip: host(15)?,
            dns_ip: host(3)?,
            host_loopback_ip: host(2)?,
            resolv_conf: PathBuf::from("/etc/resolv.conf"),
            forward_bind: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            tcp_forwards: Vec::new(),
            udp_forwards: Vec::new(),
            mtu: 1500,
            checksums: Checksums::default(),
            limits: Limits::default(),
        })
    }

    /// Checks the address layout and MTU.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let named = [
            ("gateway", self.gateway_ip),
            ("guest", self.guest_ip),
            ("dns", self.dns_ip),
            ("host loopback", self.host_loopback_ip),
        ];
        for (name, ip) in named {
            if !self.subnet.contains(ip)
                || ip == self.subnet.network()
                || ip == self.subnet.broadcast()
            {
                return Err(ConfigError::Layout(format!(
                    "{name} address {ip} is not a host address of {}",
                    self.subnet
                )));
            }
        }
        if self.guest_ip == self.gateway_ip
            || self.guest_ip == self.dns_ip
            || self.guest_ip == self.host_loopback_ip
        {
            return Err(ConfigError::Layout(format!(
                "guest address {} is also a gateway address",
                self.guest_ip
            )));
        }
        if self.host_loopback_ip == self.gateway_ip || self.host_loopback_ip == self.dns_ip {
            return Err(ConfigError::Layout(format!(
                "host loopback alias {} is also the gateway or DNS address",
                self.host_loopback_ip
            )));
        }
        if self.gateway_mac[0] & 1 != 0 || self.gateway_mac == [0; 6] {
            return Err(ConfigError::Layout("gateway MAC is not unicast".into()));
        }
        if !(576..=65521).contains(&self.mtu) {
            return Err(ConfigError::Mtu(self.mtu));
        }
        Ok(())
    }
}

impl Default for Config {
    fn default() -> Self {
        // DEFAULT_SUBNET is a /24: every default offset exists.
        match Config::for_subnet(DEFAULT_SUBNET) {
            Ok(c) => c,
            Err(e) => unreachable!("default layout: {e}"),
        }
    }
}
