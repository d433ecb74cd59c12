//! `dinv` configuration: every option is a flag and an environment variable, and every invalid
//! value stops dinv before it boots anything, with one line naming the option, exit status 2.
//! Valid values are checked through `dinv --print-config` (the resolved configuration and the
//! guest kernel command line); their effects inside the guest are checked by the docker
//! end-to-end test's boot (memory, CPUs, volume owner, socket group, TLS, insecure registry).

use std::process::{Command, Output};

use dinv_tests::dinv_bin;

/// Runs `dinv` with `env` and `args`, a kernel/rootfs that exist (so only the option under test
/// can be wrong) and a socket path in a temp dir; nothing may boot.
fn dinv(env: &[(&str, &str)], args: &[&str]) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    let mut cmd = Command::new(dinv_bin());
    for (k, _) in std::env::vars() {
        if k.starts_with("DINV_") || k == "DEBUG" {
            cmd.env_remove(k);
        }
    }
    cmd.env("DINV_KERNEL", &file)
        .env("DINV_ROOTFS", &file)
        .env("DINV_DOCKER_IMAGE", dir.path().join("docker.img"))
        .env("DINV_DOCKER_SOCK", dir.path().join("docker.sock"))
        .env("DINV_VOLUME_IMAGE", dir.path().join("volume.img"))
        .env("DINV_CERTS_DIR", dir.path().join("certs"));
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.args(args).output().expect("run dinv");
    assert!(!dir.path().join("docker.img").exists(), "dinv created the docker disk for a bad option");
    out
}

/// Environment, flags, what the error line must name.
type Case<'a> = (&'a [(&'a str, &'a str)], &'a [&'a str], &'a str);

#[test]
fn every_invalid_value_is_one_line_naming_the_option_and_exit_2() {
    let too_many_cpus = (std::thread::available_parallelism().unwrap().get() + 1).to_string();
    // (environment, flags, what the message must name)
    let cases: &[Case] = &[
        (&[("DINV_CPUS", "0")], &[], "DINV_CPUS"),
        (&[("DINV_CPUS", &too_many_cpus)], &[], "DINV_CPUS"),
        (&[("DINV_CPUS", "two")], &[], "--cpus"),
        (&[], &["--cpus=-1"], "--cpus"),
        (&[("DINV_MEMORY", "12Q")], &[], "DINV_MEMORY"),
        (&[("DINV_MEMORY", "64M")], &[], "DINV_MEMORY"),
        (&[], &["--memory", ""], "DINV_MEMORY"),
        (&[("DINV_DOCKER_SIZE", "lots")], &[], "DINV_DOCKER_SIZE"),
        (&[("DINV_DOCKER_SIZE", "10M")], &[], "DINV_DOCKER_SIZE"),
        (&[("DINV_TCP_PORTS", "0")], &[], "DINV_TCP_PORTS"),
        (&[("DINV_TCP_PORTS", "http")], &[], "DINV_TCP_PORTS"),
        (&[("DINV_TCP_PORTS", "8080;8080")], &[], "DINV_TCP_PORTS"),
        (&[("DINV_UDP_PORTS", "70000")], &[], "DINV_UDP_PORTS"),
        (&[("DINV_SUBNET", "10.1.2.0/33")], &[], "DINV_SUBNET"),
        (&[("DINV_MOUNTS", "/nonexistent-dinv-dir")], &[], "DINV_MOUNTS"),
        (&[("DINV_MOUNTS", "relative/dir")], &[], "DINV_MOUNTS"),
        (&[("DINV_VOLUME_PATH", "/vol"), ("DINV_VOLUME_SIZE", "1M")], &[], "DINV_VOLUME_SIZE"),
        (&[("DINV_VOLUME_PATH", "/vol"), ("DINV_VOLUME_SIZE", "big")], &[], "DINV_VOLUME_SIZE"),
        (&[("DINV_VOLUME_PATH", "vol")], &[], "DINV_VOLUME_PATH"),
        (&[("DINV_VOLUME_PATH", "/etc")], &[], "DINV_VOLUME_PATH"),
        (&[("DINV_VOLUME_PATH", "/a:b")], &[], "DINV_VOLUME_PATH"),
        (&[("DINV_VOLUME_UID", "-1")], &[], "--volume-uid"),
        (&[("DINV_VOLUME_GID", "x")], &[], "--volume-gid"),
        (&[("DINV_DOCKER_SOCK_UID", "root")], &[], "--docker-sock-uid"),
        (&[("DINV_SHUTDOWN_TIMEOUT", "soon")], &[], "--shutdown-timeout"),
        (&[], &["--insecure-registry=-x"], "--insecure-registry"),
        (&[], &["--insecure-registry", "a b"], "--insecure-registry"),
        (&[("DINV_STORAGE_DRIVER", "Over Lay")], &[], "--storage-driver"),
        (&[], &["--tls-san", "not a name"], "--tls-san"),
        (&[], &["--tcp-listen", "127.0.0.1:2375"], "--tcp-listen"),
        (&[], &["--tcp-listen", "nowhere"], "--tcp-listen"),
        (&[], &["--local", "--tlsverify"], "--local"),
        (&[("DINV_TCP_PORTS", "2376")], &["--tlsverify"], "DINV_TCP_PORTS"),
        (&[("DINV_TCP_PORTS", "9000:80")], &["--tcp", "--tcp-listen", "127.0.0.1:9000"], "DINV_TCP_PORTS"),
        (&[("DINV_SNAPSHOT", "/etc/hostname")], &[], "DINV_SNAPSHOT"),
        (&[("DINV_KERNEL", "/nonexistent-dinv-kernel")], &[], "kernel"),
        (&[("DINV_ROOTFS", "/nonexistent-dinv-rootfs")], &[], "root filesystem"),
    ];
    let mut failures = Vec::new();
    for (env, args, name) in cases {
        let out = dinv(env, args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let first = stderr.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
        // clap's own usage errors add a usage hint after the first line; ours are one line.
        let ours = stderr.starts_with("dinv: ");
        let ok = out.status.code() == Some(2)
            && first.contains(name)
            && (!ours || stderr.trim_end().lines().count() == 1);
        if !ok {
            failures.push(format!("{env:?} {args:?}: exit {:?}, stderr {stderr:?}", out.status.code()));
        }
    }
    assert!(failures.is_empty(), "{} case(s) wrong:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn help_documents_every_option_with_its_environment_variable() {
    let out = Command::new(dinv_bin()).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for var in [
        "DINV_CPUS",
        "DINV_MEMORY",
        "DINV_TCP_PORTS",
        "DINV_UDP_PORTS",
        "DINV_MOUNTS",
        "DINV_DOCKER_SIZE",
        "DINV_VOLUME_PATH",
        "DINV_VOLUME_SIZE",
        "DINV_VOLUME_UID",
        "DINV_VOLUME_GID",
        "DINV_DOCKER_SOCK_UID",
        "DINV_DOCKER_SOCK_GID",
        "DINV_SHUTDOWN_TIMEOUT",
        "DINV_TLS",
        "DINV_TLSVERIFY",
        "DINV_INSECURE_REGISTRY",
        "DINV_STORAGE_DRIVER",
        "DINV_LOCAL",
        "DINV_LOG_LEVEL",
        "DINV_SNAPSHOT",
        "DEBUG",
    ] {
        assert!(help.contains(&format!("env: {var}=")), "--help does not document {var}");
    }
    for flag in ["--tls", "--tlsverify", "--insecure-registry", "--storage-driver", "--local", "--log-level", "--tcp"] {
        assert!(help.contains(flag), "--help does not document {flag}");
    }
}

/// `dinv --print-config` with `env` and `args`: the resolved configuration lines.
fn resolved(env: &[(&str, &str)], args: &[&str]) -> String {
    let mut all = vec!["--print-config"];
    all.extend_from_slice(args);
    let out = dinv(env, &all);
    assert!(out.status.success(), "{env:?} {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn every_option_reaches_the_configuration_as_env_and_as_flag() {
    // (environment variable, flag, value, what the resolved configuration must contain)
    let cases: &[(&str, &str, &str, &[&str])] = &[
        ("DINV_CPUS", "--cpus", "1", &["cpus=1"]),
        ("DINV_MEMORY", "--memory", "1G", &["memory=1073741824"]),
        ("DINV_MEMORY", "--memory", "768M", &["memory=805306368"]),
        ("DINV_MEMORY", "--memory", "524288K", &["memory=536870912"]),
        ("DINV_DOCKER_SIZE", "--docker-size", "2G", &["docker_size=2147483648"]),
        ("DINV_DOCKER_SOCK_UID", "--docker-sock-uid", "1000", &["docker_sock_owner=Some(1000):None"]),
        ("DINV_DOCKER_SOCK_GID", "--docker-sock-gid", "999", &["docker_sock_owner=None:Some(999)"]),
        ("DINV_SHUTDOWN_TIMEOUT", "--shutdown-timeout", "30", &["shutdown_timeout=30", "dinv.shutdown_timeout=30"]),
        ("DINV_TCP_PORTS", "--tcp-ports", "80;8080:81", &["tcp_ports=80:80;8080:81"]),
        ("DINV_UDP_PORTS", "--udp-ports", "53:5353", &["udp_ports=53:5353"]),
        ("DINV_SUBNET", "--subnet", "10.99.0.0/24", &["subnet=10.99.0.0/24", "dinv.ip=10.99.0.15/24", "dinv.gw=10.99.0.1"]),
        ("DINV_MOUNTS", "--mounts", "/tmp:/host-tmp:ro", &["mount=/tmp:/host-tmp:ro", "dinv.mount=dinv0:/host-tmp:ro"]),
        ("DINV_VOLUME_PATH", "--volume-path", "/work", &["dinv.volume=/dev/vdc:/work:0:0"]),
        ("DINV_STORAGE_DRIVER", "--storage-driver", "vfs", &["dinv.storage_driver=vfs"]),
        ("DINV_INSECURE_REGISTRY", "--insecure-registry", "reg.example:5000", &["dinv.insecure_registry=reg.example:5000"]),
        ("DINV_CMDLINE", "--cmdline", "quiet", &[" quiet"]),
        ("DINV_SNAPSHOT", "--snapshot", "/var/cache/dinv-snapshot", &["snapshot=/var/cache/dinv-snapshot"]),
    ];
    for (var, flag, value, expect) in cases {
        for out in [resolved(&[(var, value)], &[]), resolved(&[], &[&format!("{flag}={value}")])] {
            for e in *expect {
                assert!(out.contains(e), "{var}/{flag}={value}: expected {e:?} in\n{out}");
            }
        }
    }
    // Booleans and combinations.
    let vol = [("DINV_VOLUME_PATH", "/v"), ("DINV_VOLUME_SIZE", "2G"), ("DINV_VOLUME_UID", "7"), ("DINV_VOLUME_GID", "8")];
    assert!(resolved(&vol, &[]).contains(":2147483648:/v:7:8"));
    assert!(resolved(&[("DEBUG", "1")], &[]).contains("dinv.debug=1"));
    assert!(!resolved(&[("DEBUG", "0")], &[]).contains("dinv.debug"));
    assert!(resolved(&[], &["--debug"]).contains("dinv.debug=1"));
    assert!(resolved(&[("DINV_INSECURE_REGISTRY", "a.example,b.example:5000")], &[])
        .contains("dinv.insecure_registry=a.example dinv.insecure_registry=b.example:5000"));
    assert!(resolved(&[], &[]).contains("tcp_api=none"));
    assert!(resolved(&[("DINV_TCP", "1")], &[]).contains("tcp_api=plain 0.0.0.0:2375"));
    assert!(resolved(&[], &["--tls"]).contains("tcp_api=tls 0.0.0.0:2376 verify=false"));
    let tls = resolved(&[("DINV_TLSVERIFY", "true"), ("DINV_TLS_SAN", "ci.example,10.1.2.3")], &["--tcp-listen", "127.0.0.1:12376"]);
    assert!(tls.contains("tcp_api=tls 127.0.0.1:12376 verify=true") && tls.contains("sans=ci.example,10.1.2.3"), "{tls}");
    assert!(resolved(&[("DINV_LOCAL", "1")], &[]).contains("tcp_api=none"));
    // Nothing on the guest command line escapes its parameter (no spaces smuggled in).
    let line = resolved(&[("DINV_MOUNTS", "/tmp:/host-tmp")], &[]);
    let cmdline = line.lines().find_map(|l| l.strip_prefix("cmdline=")).unwrap();
    assert!(cmdline.split_whitespace().all(|w| !w.is_empty()));
}
