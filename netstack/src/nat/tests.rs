use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use super::*;
use crate::config::Config;

fn sa(s: &str) -> SocketAddrV4 {
    s.parse().unwrap()
}

fn key(proto: Proto, guest: &str, peer: &str) -> FlowKey {
    FlowKey {
        proto,
        guest: sa(guest),
        peer: sa(peer),
    }
}

#[test]
fn insert_lookup_remove() {
    let now = Instant::now();
    let mut t = NatTable::new(NatLimits { tcp: 2, udp: 1 });
    let k1 = key(Proto::Tcp, "10.0.0.15:1000", "1.2.3.4:80");
    let k2 = key(Proto::Tcp, "10.0.0.15:1001", "1.2.3.4:80");
    let k3 = key(Proto::Tcp, "10.0.0.15:1002", "1.2.3.4:80");
    let id1 = t.insert(k1, now).unwrap();
    assert!(id1 >= FIRST_FLOW_ID);
    assert_eq!(t.insert(k1, now), Err(NatError::Exists));
    let id2 = t.insert(k2, now).unwrap();
    assert_ne!(id1, id2);
    assert_eq!(t.insert(k3, now), Err(NatError::Full));
    assert_eq!(t.lookup(&k2), Some(id2));
    assert_eq!(t.key(id1), Some(k1));
    assert_eq!(t.len(Proto::Tcp), 2);
    // UDP has its own limit, shared with ICMP.
    t.insert(key(Proto::Udp, "10.0.0.15:5", "1.2.3.4:53"), now)
        .unwrap();
    assert_eq!(
        t.insert(key(Proto::Icmp, "10.0.0.15:7", "1.2.3.4:0"), now),
        Err(NatError::Full)
    );
    assert_eq!(t.remove(id1), Some(k1));
    assert_eq!(t.remove(id1), None);
    assert_eq!(t.lookup(&k1), None);
    let id3 = t.insert(k3, now).unwrap();
    assert!(id3 > id2, "ids are never reused");
}

#[test]
fn forwarded_flows_get_distinct_gateway_ports() {
    let now = Instant::now();
    let gw = Ipv4Addr::new(10, 0, 0, 1);
    let guest = sa("10.0.0.15:80");
    let mut t = NatTable::new(NatLimits { tcp: 10, udp: 10 });
    let (a, ka) = t.insert_forwarded(Proto::Tcp, gw, guest, now).unwrap();
    let (_, kb) = t.insert_forwarded(Proto::Tcp, gw, guest, now).unwrap();
    assert_ne!(ka.peer.port(), kb.peer.port());
    assert_eq!(ka.peer.ip(), &gw);
    assert!(ka.peer.port() >= GATEWAY_PORT_FIRST);
    assert_eq!(t.lookup(&ka), Some(a));
    t.remove(a);
    assert_eq!(t.len(Proto::Tcp), 1);
}

#[test]
fn gateway_ports_wrap_and_skip_used() {
    let now = Instant::now();
    let gw = Ipv4Addr::new(10, 0, 0, 1);
    let guest = sa("10.0.0.15:80");
    let mut t = NatTable::new(NatLimits {
        tcp: 100_000,
        udp: 1,
    });
    let span = usize::from(u16::MAX - GATEWAY_PORT_FIRST) + 1;
    let first = t.insert_forwarded(Proto::Tcp, gw, guest, now).unwrap();
    for _ in 1..span {
        t.insert_forwarded(Proto::Tcp, gw, guest, now).unwrap();
    }
    assert_eq!(
        t.insert_forwarded(Proto::Tcp, gw, guest, now),
        Err(NatError::NoPort)
    );
    t.remove(first.0);
    let again = t.insert_forwarded(Proto::Tcp, gw, guest, now).unwrap();
    assert_eq!(again.1.peer.port(), first.1.peer.port());
}

#[test]
fn idle_expiry() {
    let t0 = Instant::now();
    let mut t = NatTable::new(NatLimits { tcp: 10, udp: 10 });
    let dns = t
        .insert(key(Proto::Udp, "10.0.0.15:5000", "10.0.0.3:53"), t0)
        .unwrap();
    let other = t
        .insert(key(Proto::Udp, "10.0.0.15:5001", "1.1.1.1:9"), t0)
        .unwrap();
    t.insert(key(Proto::Tcp, "10.0.0.15:5001", "1.1.1.1:9"), t0)
        .unwrap();
    let idle = |k: &FlowKey| {
        if k.peer.port() == 53 {
            Duration::from_secs(10)
        } else {
            Duration::from_secs(60)
        }
    };
    assert_eq!(
        t.next_expiry(Proto::Udp, idle),
        Some(t0 + Duration::from_secs(10))
    );
    assert!(t
        .idle_flows(Proto::Udp, t0 + Duration::from_secs(5), idle)
        .is_empty());
    assert_eq!(
        t.idle_flows(Proto::Udp, t0 + Duration::from_secs(11), idle),
        vec![dns]
    );
    t.touch(other, t0 + Duration::from_secs(50));
    let mut late = t.idle_flows(Proto::Udp, t0 + Duration::from_secs(61), idle);
    late.sort();
    assert_eq!(late, vec![dns]);
}

#[test]
fn translate_policy() {
    let cfg = Config::default();
    let plan = AddressPlan::new(&cfg, Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 53))));
    let t = |s: &str| plan.translate(sa(s));
    assert_eq!(
        t("10.234.0.2:8080"),
        Some("127.0.0.1:8080".parse::<SocketAddr>().unwrap())
    );
    assert_eq!(t("10.234.0.3:53"), Some("127.0.0.53:53".parse().unwrap()));
    assert_eq!(t("10.234.0.3:54"), None);
    assert_eq!(t("10.234.0.1:80"), None);
    assert_eq!(t("10.234.0.99:80"), None);
    assert_eq!(t("127.0.0.1:80"), None);
    assert_eq!(t("224.0.0.1:80"), None);
    assert_eq!(t("255.255.255.255:67"), None);
    assert_eq!(t("0.0.0.0:80"), None);
    assert_eq!(t("93.184.216.34:0"), None);
    assert_eq!(
        t("93.184.216.34:443"),
        Some("93.184.216.34:443".parse().unwrap())
    );
    let no_dns = AddressPlan::new(&cfg, None);
    assert_eq!(no_dns.translate(sa("10.234.0.3:53")), None);
    assert!(plan.is_service_ip(cfg.gateway_ip) && !plan.is_service_ip(cfg.guest_ip));
}
