use super::*;

#[test]
fn defaults_when_absent() {
    let (cfg, warn) =
        Config::parse("console=ttyS0 reboot=k root=/dev/vda ro init=/sbin/dinv-agent");
    assert_eq!(cfg, Config::default());
    assert!(warn.is_empty());
    assert_eq!(cfg.docker_disk, "/dev/vdb");
    assert_eq!(cfg.shutdown_timeout, 5);
    assert_eq!(cfg.storage_driver, "overlay2");
}

#[test]
fn all_parameters() {
    let (cfg, warn) = Config::parse(
        "dinv.docker_disk=/dev/vdc dinv.shutdown_timeout=30 dinv.insecure_registry=10.0.2.2:5000 \
         dinv.insecure_registry=reg.local:443 dinv.storage_driver=vfs dinv.debug=1 \
         dinv.ip=10.0.2.15/24 dinv.gw=10.0.2.2 dinv.dns=10.0.2.3 dinv.mount=share0:/mnt/host:ro \
         dinv.mount=s1:/data dinv.volume=/dev/vdc:/vol:1000:1000 dinv.test_shutdown_after=7\n",
    );
    assert!(warn.is_empty(), "{warn:?}");
    assert_eq!(cfg.docker_disk, "/dev/vdc");
    assert_eq!(cfg.shutdown_timeout, 30);
    assert_eq!(
        cfg.insecure_registries,
        vec!["10.0.2.2:5000", "reg.local:443"]
    );
    assert_eq!(cfg.storage_driver, "vfs");
    assert!(cfg.debug);
    assert_eq!(
        cfg.ip,
        Some(Ipv4Cidr {
            addr: Ipv4Addr::new(10, 0, 2, 15),
            prefix: 24
        })
    );
    assert_eq!(cfg.gateway, Some(Ipv4Addr::new(10, 0, 2, 2)));
    assert_eq!(cfg.dns, vec![Ipv4Addr::new(10, 0, 2, 3)]);
    assert_eq!(
        cfg.mounts,
        vec![
            Share {
                tag: "share0".into(),
                path: "/mnt/host".into(),
                read_only: true
            },
            Share {
                tag: "s1".into(),
                path: "/data".into(),
                read_only: false
            },
        ]
    );
    assert_eq!(
        cfg.volumes,
        vec![Volume {
            device: "/dev/vdc".into(),
            path: "/vol".into(),
            uid: 1000,
            gid: 1000
        }]
    );
    assert_eq!(cfg.test_shutdown_after, Some(7));
}

#[test]
fn bad_values_keep_defaults_and_warn() {
    let (cfg, warn) = Config::parse(
        "dinv.shutdown_timeout=abc dinv.docker_disk=vdb dinv.ip=10.0.2.15 dinv.gw=x \
         dinv.storage_driver=a;b dinv.mount=tag:relative dinv.volume=/dev/vdc:/v:x:0 dinv.debug=maybe \
         dinv.shutdown_timeout",
    );
    assert_eq!(cfg, Config::default());
    assert_eq!(warn.len(), 9, "{warn:?}");
    assert!(warn.iter().all(|w| w.contains("bad value")));
}

#[test]
fn unknown_parameters_are_reported() {
    let (cfg, warn) = Config::parse("dinv.frobnicate=1 dinvx=2 dinv.debug");
    assert!(cfg.debug);
    assert_eq!(
        warn,
        vec!["unknown parameter 'dinv.frobnicate=1' ignored".to_string()]
    );
}

#[test]
fn last_scalar_wins_and_quotes_group() {
    let (cfg, warn) =
        Config::parse("dinv.shutdown_timeout=1 \"dinv.shutdown_timeout=9\" dinv.debug=0 x=\"a b\"");
    assert!(warn.is_empty());
    assert_eq!(cfg.shutdown_timeout, 9);
    assert!(!cfg.debug);
    assert_eq!(split_cmdline(" a  x=\"b c\" d\n"), vec!["a", "x=b c", "d"]);
}

#[test]
fn path_traversal_rejected() {
    let (cfg, warn) = Config::parse("dinv.mount=t:/a/../etc");
    assert!(cfg.mounts.is_empty());
    assert_eq!(warn.len(), 1);
}
