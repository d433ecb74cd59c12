use super::*;

fn fwd(h: u16, g: u16) -> PortForward {
    PortForward {
        host_port: h,
        guest_port: g,
    }
}

#[test]
fn port_list_accepts_both_forms() {
    assert_eq!(
        parse_port_list("8080;9000:90").unwrap(),
        vec![fwd(8080, 8080), fwd(9000, 90)]
    );
    assert_eq!(
        parse_port_list(" 1 ; 65535:2 ;").unwrap(),
        vec![fwd(1, 1), fwd(65535, 2)]
    );
    assert_eq!(parse_port_list("").unwrap(), vec![]);
    // Same guest port behind two host ports is fine.
    assert_eq!(
        parse_port_list("81:80;82:80").unwrap(),
        vec![fwd(81, 80), fwd(82, 80)]
    );
}

#[test]
fn port_list_rejects_bad_entries_by_name() {
    let cases = [
        ("80;http", "http", "port is not a number"),
        ("0", "0", "port 0 is not allowed"),
        ("80:0", "80:0", "port 0 is not allowed"),
        ("65536", "65536", "port is above 65535"),
        ("99999999999", "99999999999", "port is above 65535"),
        ("80;8080:80;80", "80", "host port listed twice"),
        ("80:", "80:", "port is not a number"),
        ("-1", "-1", "port is not a number"),
        ("1:2:3", "1:2:3", "port is not a number"),
    ];
    for (input, entry, reason) in cases {
        let err = parse_port_list(input).unwrap_err();
        assert_eq!(
            err,
            ConfigError::PortEntry {
                entry: entry.into(),
                reason
            },
            "{input}"
        );
        assert!(err.to_string().contains(entry));
    }
}

#[test]
fn subnet_parse_and_layout() {
    let s: Ipv4Subnet = "10.234.0.77/24".parse().unwrap();
    assert_eq!(s, DEFAULT_SUBNET);
    assert_eq!(s.broadcast(), Ipv4Addr::new(10, 234, 0, 255));
    assert!(s.contains(Ipv4Addr::new(10, 234, 0, 1)));
    assert!(!s.contains(Ipv4Addr::new(10, 234, 1, 1)));
    for bad in [
        "10.0.0.0",
        "10.0.0.0/28",
        "10.0.0.0/7",
        "x/24",
        "10.0.0.0/a",
    ] {
        assert!(bad.parse::<Ipv4Subnet>().is_err(), "{bad}");
    }
    let c = Config::default();
    c.validate().unwrap();
    assert_eq!(c.gateway_ip, Ipv4Addr::new(10, 234, 0, 1));
    assert_eq!(c.host_loopback_ip, Ipv4Addr::new(10, 234, 0, 2));
    assert_eq!(c.dns_ip, Ipv4Addr::new(10, 234, 0, 3));
    assert_eq!(c.guest_ip, Ipv4Addr::new(10, 234, 0, 15));
    let docker: Ipv4Subnet = "172.17.0.0/16".parse().unwrap();
    let dinv: Ipv4Subnet = "172.19.0.0/16".parse().unwrap();
    assert!(!c.subnet.overlaps(&docker) && !c.subnet.overlaps(&dinv));
    assert!(docker.overlaps(&"172.17.5.0/24".parse().unwrap()));
    assert!("172.16.0.0/12"
        .parse::<Ipv4Subnet>()
        .unwrap()
        .overlaps(&docker));
}

#[test]
fn layout_validation() {
    let mut c = Config::default();
    c.guest_ip = c.gateway_ip;
    assert!(c.validate().is_err());
    let c = Config {
        dns_ip: Ipv4Addr::new(10, 0, 0, 1),
        ..Config::default()
    };
    assert!(c.validate().is_err());
    let c = Config {
        mtu: 100,
        ..Config::default()
    };
    assert_eq!(c.validate(), Err(ConfigError::Mtu(100)));
    let c = Config::for_subnet("10.9.8.0/27".parse().unwrap()).unwrap();
    c.validate().unwrap();
}

const ROUTES: &str =
    "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0
eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
docker0\t000011AC\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0
";

#[test]
fn route_overlap_is_detected() {
    check_routes(DEFAULT_SUBNET, ROUTES).unwrap();
    let err = check_routes("192.0.2.128/25".parse().unwrap(), ROUTES).unwrap_err();
    assert_eq!(
        err.to_string(),
        "Guest subnet 192.0.2.128/25 overlaps host route 192.0.2.0/24 on eth0; choose another DINV_SUBNET"
    );
    let err = check_routes("172.16.0.0/12".parse().unwrap(), ROUTES).unwrap_err();
    assert!(matches!(err, ConfigError::RouteOverlap { ref iface, .. } if iface == "docker0"));
    // Garbage lines are ignored.
    check_routes(DEFAULT_SUBNET, "header\nfoo bar\n").unwrap();
}

#[test]
fn resolv_conf() {
    let text = "# comment\nsearch example\nnameserver 127.0.0.53\nnameserver 1.1.1.1\n";
    assert_eq!(parse_resolv_conf(text), Some("127.0.0.53".parse().unwrap()));
    assert_eq!(
        parse_resolv_conf("nameserver fe80::1%eth0"),
        Some("fe80::1".parse().unwrap())
    );
    assert_eq!(parse_resolv_conf("nameserver\nnameserver bogus\n"), None);
}
