//! The NAT table: which guest flow maps to which host socket, flow limits, idle expiry, and the
//! gateway-side ports used by port forwards.
//!
//! A plain data structure with no I/O so it can be tested on its own; the stack stores the host
//! sockets and smoltcp handles next to the [`FlowId`]s handed out here. Also holds the destination
//! policy ([`AddressPlan::translate`]): where a guest flow to a given address goes on the host.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Instant;

use crate::config::{Config, Ipv4Subnet};

#[cfg(test)]
mod tests;

/// Transport protocol of a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Proto {
    /// TCP connection.
    Tcp,
    /// UDP flow.
    Udp,
    /// ICMP echo flow (the "port" is the echo identifier).
    Icmp,
}

/// A flow as the guest sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// Protocol.
    pub proto: Proto,
    /// Guest side endpoint.
    pub guest: SocketAddrV4,
    /// Far side as the guest sees it: the original destination of outbound flows, or
    /// `gateway_ip:allocated port` for port-forwarded flows.
    pub peer: SocketAddrV4,
}

/// Identifies a flow; also its epoll token. Always `>= FIRST_FLOW_ID`.
pub type FlowId = u64;

/// Flow ids start here; smaller epoll tokens are reserved for the stack's own fds.
pub const FIRST_FLOW_ID: FlowId = 1 << 16;

/// Why a flow could not be added.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NatError {
    /// The per-protocol flow limit is reached.
    #[error("Flow limit reached")]
    Full,
    /// A flow with this key already exists.
    #[error("Flow already exists")]
    Exists,
    /// No free gateway port for a port-forwarded flow.
    #[error("No free gateway port")]
    NoPort,
}

#[derive(Debug)]
struct Entry {
    key: FlowKey,
    last_active: Instant,
    gateway_port: bool,
}

/// Flow limits for [`NatTable::new`].
#[derive(Debug, Clone, Copy)]
pub struct NatLimits {
    /// Maximum TCP flows.
    pub tcp: usize,
    /// Maximum UDP + ICMP flows.
    pub udp: usize,
}

/// First port handed out on the gateway side for port-forwarded flows.
pub const GATEWAY_PORT_FIRST: u16 = 32768;

/// The NAT table.
#[derive(Debug)]
pub struct NatTable {
    by_key: HashMap<FlowKey, FlowId>,
    entries: HashMap<FlowId, Entry>,
    limits: NatLimits,
    tcp_count: usize,
    udp_count: usize,
    next_id: FlowId,
    gateway_ports: HashSet<(Proto, u16)>,
    next_port: u16,
}

impl NatTable {
    /// An empty table.
    pub fn new(limits: NatLimits) -> Self {
        Self {
            by_key: HashMap::new(),
            entries: HashMap::new(),
            limits,
            tcp_count: 0,
            udp_count: 0,
            next_id: FIRST_FLOW_ID,
            gateway_ports: HashSet::new(),
            next_port: GATEWAY_PORT_FIRST,
        }
    }

    fn count_mut(&mut self, proto: Proto) -> (&mut usize, usize) {
        match proto {
            Proto::Tcp => (&mut self.tcp_count, self.limits.tcp),
            Proto::Udp | Proto::Icmp => (&mut self.udp_count, self.limits.udp),
        }
    }

    /// Adds a flow the guest started.
    pub fn insert(&mut self, key: FlowKey, now: Instant) -> Result<FlowId, NatError> {
        self.insert_inner(key, now, false)
    }

    fn insert_inner(
        &mut self,
        key: FlowKey,
        now: Instant,
        gateway_port: bool,
    ) -> Result<FlowId, NatError> {
        if self.by_key.contains_key(&key) {
            return Err(NatError::Exists);
        }
        let (count, limit) = self.count_mut(key.proto);
        if *count >= limit {
            return Err(NatError::Full);
        }
        *count += 1;
        let id = self.next_id;
        self.next_id += 1;
        self.by_key.insert(key, id);
        self.entries.insert(
            id,
            Entry {
                key,
                last_active: now,
                gateway_port,
            },
        );
        Ok(id)
    }

    /// Adds a port-forwarded flow toward `guest`: picks a free port on `gateway_ip` as the
    /// flow's peer. The port is released with the flow.
    pub fn insert_forwarded(
        &mut self,
        proto: Proto,
        gateway_ip: Ipv4Addr,
        guest: SocketAddrV4,
        now: Instant,
    ) -> Result<(FlowId, FlowKey), NatError> {
        let (count, limit) = self.count_mut(proto);
        if *count >= limit {
            return Err(NatError::Full);
        }
        let span = u32::from(u16::MAX - GATEWAY_PORT_FIRST) + 1;
        for _ in 0..span {
            let port = self.next_port;
            self.next_port = if port == u16::MAX {
                GATEWAY_PORT_FIRST
            } else {
                port + 1
            };
            let key = FlowKey {
                proto,
                guest,
                peer: SocketAddrV4::new(gateway_ip, port),
            };
            if self.gateway_ports.contains(&(proto, port)) || self.by_key.contains_key(&key) {
                continue;
            }
            let id = self.insert_inner(key, now, true)?;
            self.gateway_ports.insert((proto, port));
            return Ok((id, key));
        }
        Err(NatError::NoPort)
    }

    /// The flow with this key.
    pub fn lookup(&self, key: &FlowKey) -> Option<FlowId> {
        self.by_key.get(key).copied()
    }

    /// The key of a flow.
    pub fn key(&self, id: FlowId) -> Option<FlowKey> {
        self.entries.get(&id).map(|e| e.key)
    }

    /// Marks a flow active now (resets its idle timer).
    pub fn touch(&mut self, id: FlowId, now: Instant) {
        if let Some(e) = self.entries.get_mut(&id) {
            e.last_active = now;
        }
    }

    /// Removes a flow, releasing its gateway port; returns its key.
    pub fn remove(&mut self, id: FlowId) -> Option<FlowKey> {
        let e = self.entries.remove(&id)?;
        self.by_key.remove(&e.key);
        if e.gateway_port {
            self.gateway_ports.remove(&(e.key.proto, e.key.peer.port()));
        }
        let (count, _) = self.count_mut(e.key.proto);
        *count -= 1;
        Some(e.key)
    }

    /// Flows of `proto` idle for longer than `idle(key)` at `now`.
    pub fn idle_flows(
        &self,
        proto: Proto,
        now: Instant,
        idle: impl Fn(&FlowKey) -> std::time::Duration,
    ) -> Vec<FlowId> {
        self.entries
            .iter()
            .filter(|(_, e)| {
                e.key.proto == proto && now.saturating_duration_since(e.last_active) >= idle(&e.key)
            })
            .map(|(id, _)| *id)
            .collect()
    }

    /// The earliest instant a flow of `proto` becomes idle, if any.
    pub fn next_expiry(
        &self,
        proto: Proto,
        idle: impl Fn(&FlowKey) -> std::time::Duration,
    ) -> Option<Instant> {
        self.entries
            .values()
            .filter(|e| e.key.proto == proto)
            .map(|e| e.last_active + idle(&e.key))
            .min()
    }

    /// Number of flows of `proto` (UDP and ICMP share a count).
    pub fn len(&self, proto: Proto) -> usize {
        match proto {
            Proto::Tcp => self.tcp_count,
            Proto::Udp | Proto::Icmp => self.udp_count,
        }
    }

    /// Whether the table has no flow.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// The guest-visible addresses and where they lead; decides where a guest flow goes.
#[derive(Debug, Clone)]
pub struct AddressPlan {
    /// The guest subnet.
    pub subnet: Ipv4Subnet,
    /// Gateway address.
    pub gateway_ip: Ipv4Addr,
    /// DNS address.
    pub dns_ip: Ipv4Addr,
    /// Host loopback alias.
    pub host_loopback_ip: Ipv4Addr,
    /// Upstream resolver, if any.
    pub dns_upstream: Option<IpAddr>,
}

impl AddressPlan {
    /// The plan of a configuration with the given upstream resolver.
    pub fn new(config: &Config, dns_upstream: Option<IpAddr>) -> Self {
        Self {
            subnet: config.subnet,
            gateway_ip: config.gateway_ip,
            dns_ip: config.dns_ip,
            host_loopback_ip: config.host_loopback_ip,
            dns_upstream,
        }
    }

    /// Whether `ip` is one of the addresses the netstack itself answers for.
    pub fn is_service_ip(&self, ip: Ipv4Addr) -> bool {
        ip == self.gateway_ip || ip == self.dns_ip || ip == self.host_loopback_ip
    }

    /// The host address a guest TCP/UDP flow to `dst` is relayed to, or `None` to refuse it:
    /// the host loopback alias maps to `127.0.0.1`, DNS port 53 to the upstream resolver, other
    /// subnet, loopback, multicast, broadcast and unspecified addresses are refused, anything
    /// else goes to the destination itself.
    pub fn translate(&self, dst: SocketAddrV4) -> Option<SocketAddr> {
        let ip = *dst.ip();
        if dst.port() == 0 {
            return None;
        }
        if ip == self.host_loopback_ip {
            return Some(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), dst.port()));
        }
        if ip == self.dns_ip && dst.port() == 53 {
            return self.dns_upstream.map(|up| SocketAddr::new(up, 53));
        }
        if self.subnet.contains(ip)
            || ip.is_loopback()
            || ip.is_multicast()
            || ip.is_broadcast()
            || ip.is_unspecified()
            || ip.octets()[0] == 0
            || ip.octets()[0] >= 240
        {
            return None;
        }
        Some(SocketAddr::V4(dst))
    }
}
