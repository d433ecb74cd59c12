//! dockerd in the guest, driven by the host `docker` CLI through dinv's unix socket.
//!
//! One guest serves every check (guest boots take minutes on PVM), including the in-VM parts of
//! port forwarding (`DINV_TCP_PORTS`), the gateway's host-loopback alias, bind mounts
//! (`DINV_MOUNTS`, virtio-9p), the TLS API (`--tlsverify`), the extra volume and the options
//! `docker info` shows; two container starts; the only restart is the persistence check.
//! In every test run (CI). On PVM it takes about 20 minutes (two boots, two container starts);
//! `scripts/test-docker` runs it alone with the guest console echoed.
//! Needs `DINV_KERNEL`, `DINV_ROOTFS` (see `scripts/test`), `/dev/kvm`, root (the socket's
//! owner), the host `docker` CLI, Debian's busybox-static (for a local test image) and e2fsprogs.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use dinv_tests::docker::{busybox_tarball, start, DOCKER_CALL_TIMEOUT};
use dinv_tests::{free_tcp_ports, require_kvm, run_ok};


/// An HTTP/1.0 server on 127.0.0.1 answering every request with `body`; returns its port and
/// a request counter.
fn serve_http_once_per_request(body: &'static str) -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = hits.clone();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf);
            let _ = write!(conn, "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len());
        }
    });
    (port, hits)
}

/// GET `path` from 127.0.0.1:`port`, retrying until a 200 answer or `timeout`; returns the body.
fn http_get_retry(port: u16, path: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    while Instant::now() < deadline {
        match TcpStream::connect(("127.0.0.1", port)).and_then(|mut c| {
            c.set_read_timeout(Some(Duration::from_secs(60)))?;
            write!(c, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
            let mut resp = String::new();
            c.read_to_string(&mut resp)?;
            Ok(resp)
        }) {
            Ok(resp) if resp.starts_with("HTTP/1.0 200") || resp.starts_with("HTTP/1.1 200") => {
                return resp.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
            }
            Ok(resp) => last = resp,
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    panic!("no HTTP 200 from forwarded port {port} within {timeout:?}; last: {last}");
}


#[test]
fn docker_cli_drives_dockerd_in_the_guest() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let tar = busybox_tarball(dir.path());

    // Bind mounts: a read-write share the host writes into, and a read-only one.
    let share = dir.path().join("share");
    let ro_share = dir.path().join("ro-share");
    std::fs::create_dir_all(&share).unwrap();
    std::fs::create_dir_all(&ro_share).unwrap();
    std::fs::write(share.join("hello.txt"), "written-by-host\n").unwrap();
    std::fs::write(ro_share.join("ro.txt"), "read-only-share\n").unwrap();
    // An HTTP server on the host's loopback, for the gateway's host-loopback alias.
    let (loopback_port, loopback_hits) = serve_http_once_per_request("host-loopback-ok");
    // Free host ports: one forwarded to the guest's 8080, one for the docker API over TLS.
    let [fwd_port, tls_port] = free_tcp_ports();
    let mounts = format!("{}:/data;{}:/ro:ro", share.display(), ro_share.display());
    let tcp_ports = format!("{fwd_port}:8080");
    // The docker API over TLS with client verification, on its free loopback port.
    let tls_listen = format!("127.0.0.1:{tls_port}");
    let certs = dir.path().join("certs");
    let volume_img = dir.path().join("volume.img");
    let mut dinv = start(
        dir.path(),
        &[
            "--mounts", &mounts, "--tcp-ports", &tcp_ports,
            "--tlsverify", "--certs-dir", certs.to_str().unwrap(), "--tcp-listen", &tls_listen,
            "--memory", "640M",
            "--volume-path", "/vol", "--volume-size", "256M", "--volume-uid", "1234", "--volume-gid", "2345",
            "--volume-image", volume_img.to_str().unwrap(),
            "--docker-sock-uid", "4320", "--docker-sock-gid", "4321",
            "--insecure-registry", "registry.dinv.test:5000",
            "--storage-driver", "overlay2",
        ],
    );
    assert!(
        !dinv.vm.lines_with("formatted").is_empty()
            && dinv.vm.lines_with("is blank: formatting").is_empty(),
        "the host formats the new docker disk, not the guest\n{}",
        dinv.vm.tail()
    );
    // The socket's owner (DINV_DOCKER_SOCK_UID/GID); root still reaches it.
    {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(&dinv.sock).unwrap();
        assert_eq!((meta.uid(), meta.gid(), meta.mode() & 0o777), (4320, 4321, 0o660), "docker socket owner/mode");
    }

    // Client and server both answer.
    let version = dinv.docker_ok(&["version", "--format", "{{.Client.Version}} {{.Server.Version}}"]);
    assert_eq!(version.split_whitespace().count(), 2, "{version}");
    // dockerd's runc answers `--version` from the image's record (rootfs/build.sh): the server
    // still reports runc's real version.
    let components =
        dinv.docker_ok(&["version", "--format", "{{range .Server.Components}}{{.Name}}={{.Version}} {{end}}"]);
    assert!(
        components.split_whitespace().any(|c| c.strip_prefix("runc=").is_some_and(|v| v.starts_with(char::is_numeric))),
        "runc version missing from the server's components: {components}"
    );
    let info = dinv.docker_ok(&["info", "--format", "{{.Driver}} {{.NCPU}} {{.OSType}} {{.MemTotal}}"]);
    let f: Vec<&str> = info.split_whitespace().collect();
    assert_eq!(f.len(), 4, "{info}");
    assert_eq!((f[0], f[2]), ("overlay2", "linux"), "{info}");
    // One vCPU (the default; PVM hosts are clamped to 1 anyway); 640M of guest memory, less
    // what the kernel keeps.
    assert_eq!(f[1], "1", "{info}");
    let mem: u64 = f[3].parse().unwrap();
    assert!((576 << 20..=640 << 20).contains(&mem), "MemTotal {mem} for --memory 640M");
    let info = dinv.docker_ok(&["info"]);
    assert!(info.contains("registry.dinv.test:5000"), "insecure registry missing:\n{info}");

    // The same API over TLS: the generated client certificate works, no certificate does not.
    let tls = |extra: &[&str]| {
        Command::new("docker")
            .env("DOCKER_CONFIG", dir.path().join("no-config"))
            .args(["-H", &format!("tcp://127.0.0.1:{tls_port}"), "--tlsverify"])
            .args(["--tlscacert", certs.join("ca.pem").to_str().unwrap()])
            .args(extra)
            .args(["version", "--format", "{{.Server.Version}}"])
            .output()
            .unwrap()
    };
    let ok = tls(&["--tlscert", certs.join("cert.pem").to_str().unwrap(), "--tlskey", certs.join("key.pem").to_str().unwrap()]);
    assert_eq!(String::from_utf8_lossy(&ok.stdout).trim(), version.split_whitespace().nth(1).unwrap(), "{ok:?}");
    let refused = tls(&[]);
    assert!(!refused.status.success() && String::from_utf8_lossy(&refused.stdout).trim().is_empty(), "{refused:?}");

    // A locally built image: import and run it. Every container start costs minutes on PVM
    // (runc and the shim are Go programs), so the test starts two containers and each checks
    // as much as it can. The first: output and a non-zero exit code (3) through `docker run`.
    dinv.docker_ok(&["import", tar.to_str().unwrap(), "dinv-busybox:test"]);
    let run = dinv.docker(&["run", "--rm", "dinv-busybox:test", "sh", "-c", "echo ok; exit 3"]);
    assert_eq!(String::from_utf8_lossy(&run.stdout).trim(), "ok", "{run:?}\n{}", dinv.vm.tail());
    assert_eq!(run.status.code(), Some(3), "container exit code must propagate: {run:?}");

    // The second: `docker build` FROM that image; its CMD checks the bind mounts (read the
    // host's file, write one back, a refused write on the read-only share), the extra volume's
    // owner and the gateway's host-loopback alias (10.234.0.2 is the host's 127.0.0.1), then
    // serves the share with httpd, published with -p 8080:80 and reached from the host through
    // DINV_TCP_PORTS (host port -> dinv -> guest 8080 -> docker proxy -> container 80).
    let ctx = dir.path().join("ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    let script = format!(
        "echo built; cat /data/hello.txt; echo written-by-guest > /data/from-guest.txt; \
         cat /ro/ro.txt; if echo x > /ro/x; then echo ro-writable; else echo ro-refused; fi; \
         wget -qO- http://10.234.0.2:{loopback_port}/; echo; stat -c vol=%u:%g /vol; \
         exec httpd -f -p 80 -h /data"
    );
    std::fs::write(
        ctx.join("Dockerfile"),
        format!("FROM dinv-busybox:test\nLABEL org.dinv.test=1\nCMD [\"sh\", \"-c\", {script:?}]\n"),
    )
    .unwrap();
    dinv.docker_ok(&["build", "-t", "dinv-built:test", ctx.to_str().unwrap()]);
    dinv.docker_ok(&[
        "run", "-d", "--name", "web", "-p", "8080:80", "-v", "/data:/data", "-v", "/ro:/ro", "-v", "/vol:/vol",
        "dinv-built:test",
    ]);
    let body = http_get_retry(fwd_port, "/hello.txt", Duration::from_secs(600));
    assert_eq!(body, "written-by-host\n", "{}", dinv.vm.tail());
    let logs = dinv.docker_ok(&["logs", "web"]);
    let lines: Vec<&str> = logs.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    assert_eq!(
        lines,
        ["built", "written-by-host", "read-only-share", "ro-refused", "host-loopback-ok", "vol=1234:2345"],
        "{logs}\n{}",
        dinv.vm.tail()
    );
    assert_eq!(std::fs::read_to_string(share.join("from-guest.txt")).unwrap(), "written-by-guest\n");
    assert!(!ro_share.join("x").exists(), "the read-only share was written");
    assert!(loopback_hits.load(std::sync::atomic::Ordering::SeqCst) >= 1);
    dinv.docker_ok(&["rm", "-f", "web"]);

    // 50 concurrent API calls through the vsock muxer.
    let started = Instant::now();
    let sock = dinv.sock.clone();
    let calls: Vec<_> = (0..50)
        .map(|_| {
            let sock = sock.clone();
            std::thread::spawn(move || {
                Command::new("timeout")
                    .args(["--kill-after=10", &DOCKER_CALL_TIMEOUT.as_secs().to_string(), "docker"])
                    .env("DOCKER_HOST", format!("unix://{}", sock.display()))
                    .args(["version", "--format", "{{.Server.Version}}"])
                    .output()
                    .expect("docker")
            })
        })
        .collect();
    let failed: Vec<String> = calls
        .into_iter()
        .map(|t| t.join().unwrap())
        .filter(|o| !o.status.success() || o.stdout.is_empty())
        .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
        .collect();
    eprintln!("50 concurrent docker version: {:.1}s", started.elapsed().as_secs_f64());
    assert!(failed.is_empty(), "{} of 50 concurrent calls failed: {:?}", failed.len(), failed.first());

    // Graceful shutdown; the docker disk is clean afterwards.
    dinv.stop();
    run_ok(Command::new("e2fsck").arg("-fn").arg(dir.path().join("docker.img")));

    // Restart on the same disk: the images persisted.
    let mut dinv = start(dir.path(), &[]);
    let images = dinv.docker_ok(&["images", "--format", "{{.Repository}}:{{.Tag}}"]);
    assert!(images.lines().any(|l| l == "dinv-busybox:test"), "{images}");
    assert!(images.lines().any(|l| l == "dinv-built:test"), "{images}");
    dinv.stop();
    run_ok(Command::new("e2fsck").arg("-fn").arg(dir.path().join("docker.img")));
}
