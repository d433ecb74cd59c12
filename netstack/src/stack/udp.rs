//! UDP NAT (including DNS) and ICMP echo.
//!
//! UDP never goes through smoltcp's sockets: guest datagrams are taken straight from the parsed
//! frame and sent on a connected host socket per flow (guest endpoint, destination); replies are
//! built as IPv4 packets and queued on a smoltcp raw socket, which handles ARP and framing.
//! DNS is ordinary NAT whose destination (`dns_ip:53`) translates to the upstream resolver.
//! Port-forwarded datagrams arrive on the host listener, get a flow per client address with a
//! gateway-side port, and guest replies to that port go back to the client. Flows expire when
//! idle. ICMP echo to the gateway's own addresses is answered locally; other destinations use an
//! unprivileged ICMP socket when `net.ipv4.ping_group_range` allows it, else they are dropped.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::time::Instant;

use smoltcp::iface::SocketHandle;
use smoltcp::socket::raw;
use smoltcp::wire::{Icmpv4Message, Icmpv4Packet};

use super::NetStack;
use crate::frame::{build_echo_reply, build_udp};
use crate::nat::{FlowId, FlowKey, Proto};
use crate::sys;

/// Datagrams read from one host socket per readiness event, to bound the work per poll.
const MAX_DATAGRAMS_PER_EVENT: usize = 64;

#[derive(Debug)]
pub(super) enum UdpFlow {
    /// Guest-initiated: a connected host socket.
    Outbound(UdpSocket),
    /// Port-forwarded: replies go out of listener `listener` to `client`.
    Forwarded { listener: usize, client: SocketAddr },
}

#[derive(Debug)]
pub(super) struct IcmpFlow {
    sock: UdpSocket,
}

impl NetStack {
    fn queue_raw(&mut self, handle: SocketHandle, packet: Option<Vec<u8>>) -> bool {
        let Some(packet) = packet else { return false };
        if packet.len() > self.config.mtu {
            return false;
        }
        self.sockets
            .get_mut::<raw::Socket>(handle)
            .send_slice(&packet)
            .is_ok()
    }

    /// A UDP datagram from the guest.
    pub(super) fn udp_from_guest(&mut self, src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) {
        let now = Instant::now();
        let key = FlowKey {
            proto: Proto::Udp,
            guest: src,
            peer: dst,
        };
        if let Some(id) = self.nat.lookup(&key) {
            self.nat.touch(id, now);
            let sent = match self.udp.get(&id) {
                Some(UdpFlow::Outbound(sock)) => sock.send(payload).is_ok(),
                Some(UdpFlow::Forwarded { listener, client }) => self
                    .udp_listeners
                    .get(*listener)
                    .is_some_and(|(l, _)| l.send_to(payload, client).is_ok()),
                None => false,
            };
            if !sent {
                self.stats.udp_dropped += 1;
            }
            return;
        }
        let Some(target) = self.plan.translate(dst) else {
            self.stats.udp_dropped += 1;
            return;
        };
        let id = match self.nat.insert(key, now) {
            Ok(id) => id,
            Err(_) => {
                self.stats.flow_limit += 1;
                return;
            }
        };
        let sock = match open_udp(target) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(%target, "UDP socket: {e}");
                self.nat.remove(id);
                self.stats.udp_dropped += 1;
                return;
            }
        };
        if self.epoll.add(&sock, sys::IN, id).is_err() {
            self.nat.remove(id);
            return;
        }
        if *dst.ip() == self.config.dns_ip && dst.port() == 53 {
            self.stats.dns_queries += 1;
        }
        self.stats.udp_flows += 1;
        if sock.send(payload).is_err() {
            self.stats.udp_dropped += 1;
        }
        self.udp.insert(id, UdpFlow::Outbound(sock));
    }

    /// Replies on a guest-initiated flow's host socket.
    pub(super) fn udp_readable(&mut self, id: FlowId, now: Instant) {
        let Some(key) = self.nat.key(id) else { return };
        for _ in 0..MAX_DATAGRAMS_PER_EVENT {
            let Some(UdpFlow::Outbound(sock)) = self.udp.get(&id) else {
                return;
            };
            let n = match sock.recv(&mut self.scratch) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                // ICMP errors surface as ECONNREFUSED etc.; keep the flow until it idles out.
                Err(_) => continue,
            };
            self.nat.touch(id, now);
            let packet = build_udp(
                key.peer,
                key.guest,
                &self.scratch[..n],
                self.config.checksums.compute_tx,
            );
            if !self.queue_raw(self.udp_raw, packet) {
                self.stats.udp_dropped += 1;
            }
        }
    }

    /// Datagrams on port-forward listener `idx`.
    pub(super) fn udp_listener_readable(&mut self, idx: usize, now: Instant) {
        for _ in 0..MAX_DATAGRAMS_PER_EVENT {
            let Some((sock, fwd)) = self.udp_listeners.get(idx) else {
                return;
            };
            let fwd = *fwd;
            let (n, client) = match sock.recv_from(&mut self.scratch) {
                Ok(v) => v,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => continue,
            };
            let id = match self.udp_clients.get(&(idx, client)) {
                Some(id) => *id,
                None => {
                    let guest = SocketAddrV4::new(self.config.guest_ip, fwd.guest_port);
                    match self
                        .nat
                        .insert_forwarded(Proto::Udp, self.config.gateway_ip, guest, now)
                    {
                        Ok((id, _)) => {
                            self.udp_clients.insert((idx, client), id);
                            self.udp.insert(
                                id,
                                UdpFlow::Forwarded {
                                    listener: idx,
                                    client,
                                },
                            );
                            self.stats.udp_flows += 1;
                            id
                        }
                        Err(_) => {
                            self.stats.flow_limit += 1;
                            continue;
                        }
                    }
                }
            };
            self.nat.touch(id, now);
            let Some(key) = self.nat.key(id) else {
                continue;
            };
            let packet = build_udp(
                key.peer,
                key.guest,
                &self.scratch[..n],
                self.config.checksums.compute_tx,
            );
            if !self.queue_raw(self.udp_raw, packet) {
                self.stats.udp_dropped += 1;
            }
        }
    }

    fn idle_timeout(&self, key: &FlowKey) -> std::time::Duration {
        if key.peer.port() == 53 && key.proto == Proto::Udp {
            self.config.limits.dns_idle_timeout
        } else {
            self.config.limits.udp_idle_timeout
        }
    }

    /// Closes idle UDP and ICMP flows.
    pub(super) fn expire_udp(&mut self, now: Instant) {
        for proto in [Proto::Udp, Proto::Icmp] {
            let idle = self.nat.idle_flows(proto, now, |k| self.idle_timeout(k));
            for id in idle {
                self.nat.remove(id);
                match self.udp.remove(&id) {
                    Some(UdpFlow::Outbound(sock)) => {
                        let _ = self.epoll.delete(&sock);
                    }
                    Some(UdpFlow::Forwarded { listener, client }) => {
                        self.udp_clients.remove(&(listener, client));
                    }
                    None => {}
                }
                if let Some(f) = self.icmp.remove(&id) {
                    let _ = self.epoll.delete(&f.sock);
                }
            }
        }
    }

    /// The earliest UDP/ICMP idle expiry.
    pub(super) fn next_udp_expiry(&self) -> Option<Instant> {
        let udp = self.nat.next_expiry(Proto::Udp, |k| self.idle_timeout(k));
        let icmp = self.nat.next_expiry(Proto::Icmp, |k| self.idle_timeout(k));
        match (udp, icmp) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// An ICMP echo request from the guest.
    pub(super) fn icmp_from_guest(&mut self, dst: Ipv4Addr, ident: u16, seq: u16, data: &[u8]) {
        let guest = self.config.guest_ip;
        if self.plan.is_service_ip(dst) {
            self.stats.icmp_echo += 1;
            let reply = build_echo_reply(dst, guest, ident, seq, data);
            self.queue_raw(self.icmp_raw, reply);
            return;
        }
        if self.icmp_unavailable || self.plan.translate(SocketAddrV4::new(dst, 1)).is_none() {
            return;
        }
        let now = Instant::now();
        let key = FlowKey {
            proto: Proto::Icmp,
            guest: SocketAddrV4::new(guest, ident),
            peer: SocketAddrV4::new(dst, 0),
        };
        let id = match self.nat.lookup(&key) {
            Some(id) => id,
            None => {
                let sock = match sys::icmp_socket() {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::info!("ICMP echo to the outside disabled: {e}");
                        self.icmp_unavailable = true;
                        return;
                    }
                };
                let Ok(id) = self.nat.insert(key, now) else {
                    self.stats.flow_limit += 1;
                    return;
                };
                if self.epoll.add(&sock, sys::IN, id).is_err() {
                    self.nat.remove(id);
                    return;
                }
                self.icmp.insert(id, IcmpFlow { sock });
                id
            }
        };
        self.nat.touch(id, now);
        let mut msg = vec![0u8; 8 + data.len()];
        let mut pkt = Icmpv4Packet::new_unchecked(&mut msg);
        pkt.set_msg_type(Icmpv4Message::EchoRequest);
        pkt.set_msg_code(0);
        pkt.set_echo_ident(ident);
        pkt.set_echo_seq_no(seq);
        pkt.data_mut().copy_from_slice(data);
        pkt.fill_checksum();
        if let Some(f) = self.icmp.get(&id) {
            if f.sock
                .send_to(&msg, SocketAddr::new(IpAddr::V4(dst), 0))
                .is_ok()
            {
                self.stats.icmp_echo += 1;
            }
        }
    }

    /// Echo replies on an ICMP flow's host socket.
    pub(super) fn icmp_readable(&mut self, id: FlowId, now: Instant) {
        let Some(key) = self.nat.key(id) else { return };
        for _ in 0..MAX_DATAGRAMS_PER_EVENT {
            let Some(f) = self.icmp.get(&id) else { return };
            let n = match f.sock.recv(&mut self.scratch) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => continue,
            };
            let Ok(pkt) = Icmpv4Packet::new_checked(&self.scratch[..n]) else {
                continue;
            };
            if pkt.msg_type() != Icmpv4Message::EchoReply {
                continue;
            }
            self.nat.touch(id, now);
            // The kernel rewrote the identifier; restore the guest's.
            let reply = build_echo_reply(
                *key.peer.ip(),
                *key.guest.ip(),
                key.guest.port(),
                pkt.echo_seq_no(),
                pkt.data(),
            );
            self.queue_raw(self.icmp_raw, reply);
        }
    }
}

fn open_udp(target: SocketAddr) -> io::Result<UdpSocket> {
    let bind: SocketAddr = match target {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let sock = UdpSocket::bind(bind)?;
    sock.connect(target)?;
    sock.set_nonblocking(true)?;
    Ok(sock)
}
