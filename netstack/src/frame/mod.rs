//! Parsing of untrusted guest frames and building of the IPv4 packets the stack itself
//! originates (UDP and ICMP echo replies).
//!
//! [`parse_guest_frame`] is the single entry point for guest bytes: every layer is opened with
//! smoltcp's `new_checked`, lengths are bounded by the IPv4 total length, and checksums are
//! verified when asked. It never panics; a frame it cannot accept comes back as a [`Malformed`]
//! reason (counted by the stack) or [`GuestPacket::Ignored`] (well-formed but unsupported).

use std::net::{Ipv4Addr, SocketAddrV4};

use smoltcp::wire::{
    ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol, Icmpv4Message,
    Icmpv4Packet, IpAddress, IpProtocol, Ipv4Packet, TcpPacket, UdpPacket,
};

#[cfg(test)]
mod tests;

/// Why a guest frame was dropped as malformed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    /// Shorter than an ethernet header.
    #[error("Truncated ethernet header")]
    Ethernet,
    /// ARP packet truncated or not Ethernet/IPv4.
    #[error("Bad ARP packet")]
    Arp,
    /// IPv4 header truncated, wrong version or inconsistent lengths.
    #[error("Bad IPv4 header")]
    Ipv4,
    /// IPv4 header checksum mismatch.
    #[error("Bad IPv4 header checksum")]
    Ipv4Checksum,
    /// TCP header truncated or inconsistent.
    #[error("Bad TCP header")]
    Tcp,
    /// UDP header truncated or inconsistent.
    #[error("Bad UDP header")]
    Udp,
    /// ICMP message truncated.
    #[error("Bad ICMP message")]
    Icmp,
    /// TCP, UDP or ICMP checksum mismatch.
    #[error("Bad transport checksum")]
    Checksum,
}

/// Why a well-formed guest frame is not handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ignored {
    /// Not ARP or IPv4 (IPv6, LLDP, ...).
    EtherType,
    /// Not addressed to the gateway MAC or broadcast.
    NotForUs,
    /// IPv4 fragment (not reassembled).
    Fragment,
    /// Protocol other than TCP, UDP, ICMP.
    Protocol,
    /// ICMP other than echo request.
    IcmpType,
    /// ARP probe or announcement for the guest's own address.
    ArpSelf,
}

/// What a guest frame is, as far as the stack's dispatch cares.
#[derive(Debug, PartialEq, Eq)]
pub enum GuestPacket<'a> {
    /// ARP for smoltcp.
    Arp,
    /// TCP segment opening a connection: SYN without ACK.
    TcpSyn {
        /// Guest endpoint.
        src: SocketAddrV4,
        /// Destination the guest wants.
        dst: SocketAddrV4,
    },
    /// Any other TCP segment (for smoltcp).
    Tcp {
        /// Guest endpoint.
        src: SocketAddrV4,
        /// Destination.
        dst: SocketAddrV4,
    },
    /// UDP datagram.
    Udp {
        /// Guest endpoint.
        src: SocketAddrV4,
        /// Destination.
        dst: SocketAddrV4,
        /// Datagram payload.
        payload: &'a [u8],
    },
    /// ICMP echo request.
    IcmpEcho {
        /// Guest address.
        src: Ipv4Addr,
        /// Pinged address.
        dst: Ipv4Addr,
        /// Echo identifier.
        ident: u16,
        /// Echo sequence number.
        seq: u16,
        /// Echo data.
        data: &'a [u8],
    },
    /// Well-formed but not handled.
    Ignored(Ignored),
}

/// A parsed guest frame.
#[derive(Debug, PartialEq, Eq)]
pub struct GuestFrame<'a> {
    /// Source MAC (the guest's).
    pub src_mac: [u8; 6],
    /// What it carries.
    pub packet: GuestPacket<'a>,
}

/// Parses one frame from the guest. `gateway_mac` filters unicast frames for other stations;
/// `guest_ip` is used to recognise ARP probes for the guest's own address. `verify_l4` verifies
/// TCP and UDP checksums (off when the guest offloads them to the device).
pub fn parse_guest_frame(
    frame: &[u8],
    gateway_mac: [u8; 6],
    guest_ip: Ipv4Addr,
    verify_l4: bool,
) -> Result<GuestFrame<'_>, Malformed> {
    let eth = EthernetFrame::new_checked(frame).map_err(|_| Malformed::Ethernet)?;
    let src_mac = eth.src_addr().0;
    let dst = eth.dst_addr();
    let packet = if dst != EthernetAddress(gateway_mac) && !dst.is_broadcast() {
        GuestPacket::Ignored(Ignored::NotForUs)
    } else {
        match eth.ethertype() {
            EthernetProtocol::Arp => parse_arp(eth.payload(), guest_ip)?,
            EthernetProtocol::Ipv4 => parse_ipv4(eth.payload(), verify_l4)?,
            _ => GuestPacket::Ignored(Ignored::EtherType),
        }
    };
    Ok(GuestFrame { src_mac, packet })
}

fn parse_arp(payload: &[u8], guest_ip: Ipv4Addr) -> Result<GuestPacket<'_>, Malformed> {
    let arp = ArpPacket::new_checked(payload).map_err(|_| Malformed::Arp)?;
    match ArpRepr::parse(&arp).map_err(|_| Malformed::Arp)? {
        // With AnyIP smoltcp would answer for every address, including the guest's own.
        ArpRepr::EthernetIpv4 {
            target_protocol_addr,
            ..
        } if target_protocol_addr == guest_ip => Ok(GuestPacket::Ignored(Ignored::ArpSelf)),
        _ => Ok(GuestPacket::Arp),
    }
}

fn parse_ipv4(payload: &[u8], verify: bool) -> Result<GuestPacket<'_>, Malformed> {
    let ip = Ipv4Packet::new_checked(payload).map_err(|_| Malformed::Ipv4)?;
    if ip.version() != 4 {
        return Err(Malformed::Ipv4);
    }
    // Offload covers TCP/UDP only: the IPv4 header and ICMP checksums are always filled.
    if !ip.verify_checksum() {
        return Err(Malformed::Ipv4Checksum);
    }
    if ip.more_frags() || ip.frag_offset() != 0 {
        return Ok(GuestPacket::Ignored(Ignored::Fragment));
    }
    let (src_ip, dst_ip) = (ip.src_addr(), ip.dst_addr());
    let (src_a, dst_a) = (IpAddress::Ipv4(src_ip), IpAddress::Ipv4(dst_ip));
    let body = ip.payload();
    match ip.next_header() {
        IpProtocol::Tcp => {
            let tcp = TcpPacket::new_checked(body).map_err(|_| Malformed::Tcp)?;
            if verify && !tcp.verify_checksum(&src_a, &dst_a) {
                return Err(Malformed::Checksum);
            }
            let src = SocketAddrV4::new(src_ip, tcp.src_port());
            let dst = SocketAddrV4::new(dst_ip, tcp.dst_port());
            if tcp.syn() && !tcp.ack() && !tcp.rst() {
                Ok(GuestPacket::TcpSyn { src, dst })
            } else {
                Ok(GuestPacket::Tcp { src, dst })
            }
        }
        IpProtocol::Udp => {
            let udp = UdpPacket::new_checked(body).map_err(|_| Malformed::Udp)?;
            if verify && !udp.verify_checksum(&src_a, &dst_a) {
                return Err(Malformed::Checksum);
            }
            Ok(GuestPacket::Udp {
                src: SocketAddrV4::new(src_ip, udp.src_port()),
                dst: SocketAddrV4::new(dst_ip, udp.dst_port()),
                payload: udp.payload(),
            })
        }
        IpProtocol::Icmp => {
            let icmp = Icmpv4Packet::new_checked(body).map_err(|_| Malformed::Icmp)?;
            if !icmp.verify_checksum() {
                return Err(Malformed::Checksum);
            }
            if icmp.msg_type() != Icmpv4Message::EchoRequest || icmp.msg_code() != 0 {
                return Ok(GuestPacket::Ignored(Ignored::IcmpType));
            }
            Ok(GuestPacket::IcmpEcho {
                src: src_ip,
                dst: dst_ip,
                ident: icmp.echo_ident(),
                seq: icmp.echo_seq_no(),
                data: icmp.data(),
            })
        }
        _ => Ok(GuestPacket::Ignored(Ignored::Protocol)),
    }
}

const IPV4_HEADER: usize = 20;
const UDP_HEADER: usize = 8;
const ICMP_ECHO_HEADER: usize = 8;

fn ipv4_header(buf: &mut [u8], proto: IpProtocol, src: Ipv4Addr, dst: Ipv4Addr) -> Option<()> {
    let total = u16::try_from(buf.len()).ok()?;
    let mut ip = Ipv4Packet::new_unchecked(buf);
    ip.set_version(4);
    ip.set_header_len(IPV4_HEADER as u8);
    ip.set_dscp(0);
    ip.set_ecn(0);
    ip.set_total_len(total);
    ip.set_ident(0);
    ip.clear_flags();
    ip.set_dont_frag(true);
    ip.set_frag_offset(0);
    ip.set_hop_limit(64);
    ip.set_next_header(proto);
    ip.set_src_addr(src);
    ip.set_dst_addr(dst);
    // The header checksum is never offloaded.
    ip.fill_checksum();
    Some(())
}

/// An IPv4 + UDP packet from `src` to `dst`, or `None` if it would exceed 65535 bytes.
pub fn build_udp(
    src: SocketAddrV4,
    dst: SocketAddrV4,
    payload: &[u8],
    checksum: bool,
) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; IPV4_HEADER + UDP_HEADER + payload.len()];
    ipv4_header(&mut buf, IpProtocol::Udp, *src.ip(), *dst.ip())?;
    let udp_len = u16::try_from(UDP_HEADER + payload.len()).ok()?;
    let mut udp = UdpPacket::new_unchecked(&mut buf[IPV4_HEADER..]);
    udp.set_src_port(src.port());
    udp.set_dst_port(dst.port());
    udp.set_len(udp_len);
    udp.payload_mut().copy_from_slice(payload);
    if checksum {
        udp.fill_checksum(&IpAddress::Ipv4(*src.ip()), &IpAddress::Ipv4(*dst.ip()));
    } else {
        udp.set_checksum(0);
    }
    Some(buf)
}

/// An IPv4 ICMP echo reply from `src` to `dst`, or `None` if it would exceed 65535 bytes.
pub fn build_echo_reply(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    ident: u16,
    seq: u16,
    data: &[u8],
) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; IPV4_HEADER + ICMP_ECHO_HEADER + data.len()];
    ipv4_header(&mut buf, IpProtocol::Icmp, src, dst)?;
    let mut icmp = Icmpv4Packet::new_unchecked(&mut buf[IPV4_HEADER..]);
    icmp.set_msg_type(Icmpv4Message::EchoReply);
    icmp.set_msg_code(0);
    icmp.set_echo_ident(ident);
    icmp.set_echo_seq_no(seq);
    icmp.data_mut().copy_from_slice(data);
    // Echo replies always carry a checksum: offload does not cover ICMP.
    icmp.fill_checksum();
    Some(buf)
}
