use std::net::{Ipv4Addr, SocketAddrV4};

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    EthernetAddress, EthernetFrame, EthernetProtocol, EthernetRepr, IpAddress, IpProtocol,
    TcpControl, TcpPacket, TcpRepr, TcpSeqNumber,
};

use super::*;

const GW_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
const GUEST_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];
const GUEST: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 15);
const DST: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);

fn eth(ethertype: EthernetProtocol, payload: &[u8]) -> Vec<u8> {
    let repr = EthernetRepr {
        src_addr: EthernetAddress(GUEST_MAC),
        dst_addr: EthernetAddress(GW_MAC),
        ethertype,
    };
    let mut buf = vec![0u8; 14 + payload.len()];
    let mut f = EthernetFrame::new_unchecked(&mut buf);
    repr.emit(&mut f);
    f.payload_mut().copy_from_slice(payload);
    buf
}

fn tcp_ip(control: TcpControl, ack: bool) -> Vec<u8> {
    let repr = TcpRepr {
        src_port: 40000,
        dst_port: 80,
        control,
        seq_number: TcpSeqNumber(1),
        ack_number: ack.then_some(TcpSeqNumber(5)),
        window_len: 1000,
        window_scale: None,
        max_seg_size: None,
        sack_permitted: false,
        sack_ranges: [None; 3],
        timestamp: None,
        payload: b"hi",
    };
    let mut buf = vec![0u8; 20 + repr.buffer_len()];
    ipv4_header(&mut buf, IpProtocol::Tcp, GUEST, DST).unwrap();
    repr.emit(
        &mut TcpPacket::new_unchecked(&mut buf[20..]),
        &IpAddress::Ipv4(GUEST),
        &IpAddress::Ipv4(DST),
        &ChecksumCapabilities::default(),
    );
    buf
}

fn parse(frame: &[u8]) -> Result<GuestPacket<'_>, Malformed> {
    parse_guest_frame(frame, GW_MAC, GUEST, true).map(|f| f.packet)
}

#[test]
fn valid_frames() {
    let src = SocketAddrV4::new(GUEST, 40000);
    let dst = SocketAddrV4::new(DST, 80);
    let syn = eth(EthernetProtocol::Ipv4, &tcp_ip(TcpControl::Syn, false));
    assert_eq!(parse(&syn), Ok(GuestPacket::TcpSyn { src, dst }));
    let f = parse_guest_frame(&syn, GW_MAC, GUEST, true).unwrap();
    assert_eq!(f.src_mac, GUEST_MAC);
    let synack = eth(EthernetProtocol::Ipv4, &tcp_ip(TcpControl::Syn, true));
    assert_eq!(parse(&synack), Ok(GuestPacket::Tcp { src, dst }));
    let data = eth(EthernetProtocol::Ipv4, &tcp_ip(TcpControl::None, true));
    assert_eq!(parse(&data), Ok(GuestPacket::Tcp { src, dst }));

    let udp = build_udp(src, SocketAddrV4::new(DST, 53), b"query", true).unwrap();
    assert_eq!(
        parse(&eth(EthernetProtocol::Ipv4, &udp)),
        Ok(GuestPacket::Udp {
            src,
            dst: SocketAddrV4::new(DST, 53),
            payload: b"query"
        })
    );
    // UDP checksum 0 means "none" and is accepted.
    let udp0 = build_udp(src, SocketAddrV4::new(DST, 53), b"query", false).unwrap();
    let mut udp0 = udp0;
    Ipv4Packet::new_unchecked(&mut udp0).fill_checksum();
    assert!(matches!(
        parse(&eth(EthernetProtocol::Ipv4, &udp0)),
        Ok(GuestPacket::Udp { .. })
    ));

    // An echo *reply* built by us, turned into a request.
    let mut ping = build_echo_reply(GUEST, DST, 7, 9, b"abc").unwrap();
    {
        let mut icmp = Icmpv4Packet::new_unchecked(&mut ping[20..]);
        icmp.set_msg_type(Icmpv4Message::EchoRequest);
        icmp.fill_checksum();
    }
    assert_eq!(
        parse(&eth(EthernetProtocol::Ipv4, &ping)),
        Ok(GuestPacket::IcmpEcho {
            src: GUEST,
            dst: DST,
            ident: 7,
            seq: 9,
            data: b"abc"
        })
    );
    // Ethernet padding after the IP total length is ignored.
    let mut padded = eth(EthernetProtocol::Ipv4, &udp);
    padded.extend_from_slice(&[0xee; 20]);
    assert!(matches!(
        parse(&padded),
        Ok(GuestPacket::Udp {
            payload: b"query",
            ..
        })
    ));
}

#[test]
fn ignored_frames() {
    let ipv6 = eth(EthernetProtocol::Ipv6, &[0x60; 40]);
    assert_eq!(parse(&ipv6), Ok(GuestPacket::Ignored(Ignored::EtherType)));
    let mut other_mac = eth(EthernetProtocol::Ipv4, &tcp_ip(TcpControl::Syn, false));
    other_mac[..6].copy_from_slice(&[2, 9, 9, 9, 9, 9]);
    assert_eq!(
        parse(&other_mac),
        Ok(GuestPacket::Ignored(Ignored::NotForUs))
    );
    let mut frag = tcp_ip(TcpControl::Syn, false);
    {
        let mut ip = Ipv4Packet::new_unchecked(&mut frag);
        ip.set_more_frags(true);
        ip.fill_checksum();
    }
    assert_eq!(
        parse(&eth(EthernetProtocol::Ipv4, &frag)),
        Ok(GuestPacket::Ignored(Ignored::Fragment))
    );
    let mut gre = tcp_ip(TcpControl::Syn, false);
    {
        let mut ip = Ipv4Packet::new_unchecked(&mut gre);
        ip.set_next_header(IpProtocol::Unknown(47));
        ip.fill_checksum();
    }
    assert_eq!(
        parse(&eth(EthernetProtocol::Ipv4, &gre)),
        Ok(GuestPacket::Ignored(Ignored::Protocol))
    );
}

#[test]
fn malformed_frames_are_rejected() {
    let syn = tcp_ip(TcpControl::Syn, false);
    let udp = build_udp(
        SocketAddrV4::new(GUEST, 1),
        SocketAddrV4::new(DST, 2),
        b"xyz",
        true,
    )
    .unwrap();
    type Mutate = fn(&mut Vec<u8>);
    let cases: Vec<(&str, Vec<u8>, Mutate, Malformed)> = vec![
        ("empty ip", syn.clone(), |b| b.truncate(0), Malformed::Ipv4),
        (
            "short ip header",
            syn.clone(),
            |b| b.truncate(12),
            Malformed::Ipv4,
        ),
        (
            "total_len beyond buffer",
            syn.clone(),
            |b| b.truncate(30),
            Malformed::Ipv4,
        ),
        (
            "ihl too small",
            syn.clone(),
            |b| b[0] = 0x44,
            Malformed::Ipv4,
        ),
        (
            "version 6 in ipv4",
            syn.clone(),
            |b| b[0] = 0x65,
            Malformed::Ipv4,
        ),
        (
            "ip checksum",
            syn.clone(),
            |b| b[10] ^= 1,
            Malformed::Ipv4Checksum,
        ),
        (
            "tcp checksum",
            syn.clone(),
            |b| b[37] ^= 1,
            Malformed::Checksum,
        ),
        (
            "tcp data offset past end",
            syn.clone(),
            |b| {
                b[32] = 0xf0;
                refill_ip(b)
            },
            Malformed::Tcp,
        ),
        (
            "udp checksum",
            udp.clone(),
            |b| b[29] ^= 1,
            Malformed::Checksum,
        ),
        (
            "udp length too long",
            udp.clone(),
            |b| {
                b[25] = 200;
                refill_ip(b)
            },
            Malformed::Udp,
        ),
        (
            "udp length too short",
            udp.clone(),
            |b| {
                b[25] = 3;
                refill_ip(b)
            },
            Malformed::Udp,
        ),
        (
            "tcp truncated by total_len",
            syn.clone(),
            |b| {
                b.truncate(30);
                b[3] = 30;
                refill_ip(b)
            },
            Malformed::Tcp,
        ),
    ];
    for (name, mut ip, mutate, want) in cases {
        mutate(&mut ip);
        let frame = eth(EthernetProtocol::Ipv4, &ip);
        assert_eq!(parse(&frame), Err(want), "{name}");
    }
    assert_eq!(parse(&[0u8; 13]), Err(Malformed::Ethernet));
    assert_eq!(
        parse(&eth(EthernetProtocol::Arp, &[0u8; 10])),
        Err(Malformed::Arp)
    );
    // Without verification a bad checksum passes.
    let mut bad = syn.clone();
    bad[37] ^= 1;
    let frame = eth(EthernetProtocol::Ipv4, &bad);
    assert!(parse_guest_frame(&frame, GW_MAC, GUEST, false).is_ok());
}

fn refill_ip(b: &mut [u8]) {
    Ipv4Packet::new_unchecked(b).fill_checksum();
}

#[test]
fn arp_self_probe_is_ignored() {
    use smoltcp::wire::{ArpOperation, ArpPacket, ArpRepr};
    let probe = |target: Ipv4Addr| {
        let repr = ArpRepr::EthernetIpv4 {
            operation: ArpOperation::Request,
            source_hardware_addr: EthernetAddress(GUEST_MAC),
            source_protocol_addr: GUEST,
            target_hardware_addr: EthernetAddress([0; 6]),
            target_protocol_addr: target,
        };
        let mut buf = vec![0u8; repr.buffer_len()];
        repr.emit(&mut ArpPacket::new_unchecked(&mut buf));
        eth(EthernetProtocol::Arp, &buf)
    };
    assert_eq!(
        parse(&probe(GUEST)),
        Ok(GuestPacket::Ignored(Ignored::ArpSelf))
    );
    assert_eq!(parse(&probe(DST)), Ok(GuestPacket::Arp));
}

#[test]
fn never_panics_on_prefixes_and_bit_flips() {
    let frames = [
        eth(EthernetProtocol::Ipv4, &tcp_ip(TcpControl::Syn, false)),
        eth(
            EthernetProtocol::Ipv4,
            &build_echo_reply(GUEST, DST, 1, 2, &[7; 40]).unwrap(),
        ),
    ];
    for frame in frames {
        for len in 0..=frame.len() {
            let _ = parse(&frame[..len]);
        }
        for i in 0..frame.len() * 8 {
            let mut f = frame.clone();
            f[i / 8] ^= 1 << (i % 8);
            let _ = parse_guest_frame(&f, GW_MAC, GUEST, i % 2 == 0);
        }
    }
}
