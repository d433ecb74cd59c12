//! The docker API over TLS, against the real host `docker` CLI (Go's TLS stack), no VM: dinv's
//! TCP API (`dinv_vmm::daemon::api`, the code `dinv --tlsverify` runs) relays to a stand-in
//! dockerd on a unix socket that answers `/_ping` and `/version`.
//!
//! Checks: certificates generated on first use; `docker --tlsverify` with the generated client
//! certificate works; without a client certificate, with one from another CA, or trusting
//! another CA, the CLI fails and nothing reaches the stand-in; `--tls` (no client auth) serves a
//! client that only verifies the server; plain `--tcp` works without TLS.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use dinv_vmm::daemon::api::{self, TcpApi, TlsSettings};

const FAKE_VERSION: &str = "26.1.5-dinv-fake";

/// Serves `/_ping` and `/version` like dockerd; counts requests.
fn fake_dockerd(dir: &Path) -> (PathBuf, Arc<AtomicUsize>) {
    let path = dir.join("docker.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(stream) = conn else { continue };
            let h = h.clone();
            std::thread::spawn(move || {
                let mut w = stream.try_clone().unwrap();
                let mut r = BufReader::new(stream);
                loop {
                    let mut request = String::new();
                    if r.read_line(&mut request).unwrap_or(0) == 0 {
                        return;
                    }
                    // Skip headers (requests here carry no body).
                    loop {
                        let mut line = String::new();
                        if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                            break;
                        }
                    }
                    h.fetch_add(1, Ordering::SeqCst);
                    let path = request.split_whitespace().nth(1).unwrap_or("");
                    let (ctype, body) = if path.ends_with("/_ping") {
                        ("text/plain", "OK".to_string())
                    } else if path.ends_with("/version") {
                        (
                            "application/json",
                            format!(
                                r#"{{"Version":"{FAKE_VERSION}","ApiVersion":"1.45","MinAPIVersion":"1.24","Os":"linux","Arch":"amd64","GitCommit":"0","GoVersion":"go","KernelVersion":"6.1","BuildTime":""}}"#
                            ),
                        )
                    } else {
                        ("text/plain", "not found".to_string())
                    };
                    let status = if ctype == "text/plain" && body == "not found" { "404 Not Found" } else { "200 OK" };
                    let head = format!(
                        "HTTP/1.1 {status}\r\nApi-Version: 1.45\r\nOstype: linux\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n\r\n",
                        body.len()
                    );
                    let body = if request.starts_with("HEAD ") { String::new() } else { body };
                    if w.write_all(head.as_bytes()).and_then(|()| w.write_all(body.as_bytes())).is_err() {
                        return;
                    }
                }
            });
        }
    });
    (path, hits)
}

fn docker(host: &str, args: &[&str]) -> Output {
    Command::new("docker")
        .env_remove("DOCKER_CERT_PATH")
        .env_remove("DOCKER_TLS_VERIFY")
        .env("DOCKER_CONFIG", "/nonexistent-dinv-test")
        .args(["-H", host])
        .args(args)
        .args(["version", "--format", "{{.Server.Version}}"])
        .output()
        .expect("the docker CLI is required (apt-get install docker.io or docker-ce-cli)")
}

fn server_version(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn certs(dir: &Path, a: &str) -> String {
    dir.join(a).display().to_string()
}

#[test]
fn docker_cli_over_tlsverify_and_refusals() {
    let tmp = tempfile::tempdir().unwrap();
    let (target, hits) = fake_dockerd(tmp.path());
    let dir = tmp.path().join("certs");
    let settings = TlsSettings { certs_dir: dir.clone(), verify: true, extra_sans: vec![] };
    let mut tcp = TcpApi::tls(settings);
    tcp.listen = "127.0.0.1:0".parse().unwrap();
    let addr = api::serve(&tcp, target).expect("serve");
    let host = format!("tcp://127.0.0.1:{}", addr.port());
    for f in [api::CA_CERT, api::SERVER_CERT, api::SERVER_KEY, api::CLIENT_CERT, api::CLIENT_KEY] {
        assert!(dir.join(f).is_file(), "{f} was not generated");
    }

    // The generated client certificate: works.
    let (ca, cert, key) = (certs(&dir, api::CA_CERT), certs(&dir, api::CLIENT_CERT), certs(&dir, api::CLIENT_KEY));
    let ok = docker(&host, &["--tlsverify", "--tlscacert", &ca, "--tlscert", &cert, "--tlskey", &key]);
    assert!(ok.status.success(), "{ok:?}");
    assert_eq!(server_version(&ok), FAKE_VERSION);
    // `DOCKER_CERT_PATH` style (the files' default names) works too.
    let env_ok = Command::new("docker")
        .env("DOCKER_CERT_PATH", &dir)
        .env("DOCKER_TLS_VERIFY", "1")
        .env("DOCKER_HOST", &host)
        .env("DOCKER_CONFIG", "/nonexistent-dinv-test")
        .args(["version", "--format", "{{.Server.Version}}"])
        .output()
        .unwrap();
    assert_eq!(server_version(&env_ok), FAKE_VERSION, "{env_ok:?}");
    let served = hits.load(Ordering::SeqCst);

    // No client certificate: refused.
    let no_cert = docker(&host, &["--tlsverify", "--tlscacert", &ca]);
    assert!(!no_cert.status.success() && server_version(&no_cert).is_empty(), "{no_cert:?}");
    // A client certificate from another CA: refused.
    let other = tmp.path().join("other");
    api::ensure_certs(&other, &[]).unwrap();
    let (ocert, okey) = (certs(&other, api::CLIENT_CERT), certs(&other, api::CLIENT_KEY));
    let foreign = docker(&host, &["--tlsverify", "--tlscacert", &ca, "--tlscert", &ocert, "--tlskey", &okey]);
    assert!(!foreign.status.success() && server_version(&foreign).is_empty(), "{foreign:?}");
    // A client that trusts another CA refuses our server.
    let oca = certs(&other, api::CA_CERT);
    let wrong_ca = docker(&host, &["--tlsverify", "--tlscacert", &oca, "--tlscert", &cert, "--tlskey", &key]);
    assert!(!wrong_ca.status.success(), "{wrong_ca:?}");
    // Plain HTTP to the TLS port: refused.
    let plain = docker(&host, &[]);
    assert!(!plain.status.success() && server_version(&plain).is_empty(), "{plain:?}");
    assert_eq!(hits.load(Ordering::SeqCst), served, "a refused client reached dockerd");
}

#[test]
fn docker_cli_over_tls_without_client_auth_and_plain_tcp() {
    let tmp = tempfile::tempdir().unwrap();
    let (target, _) = fake_dockerd(tmp.path());
    let dir = tmp.path().join("certs");
    let mut tls = TcpApi::tls(TlsSettings { certs_dir: dir.clone(), verify: false, extra_sans: vec![] });
    tls.listen = "127.0.0.1:0".parse().unwrap();
    let addr = api::serve(&tls, target.clone()).unwrap();
    let out = docker(&format!("tcp://127.0.0.1:{}", addr.port()), &["--tlsverify", "--tlscacert", &certs(&dir, api::CA_CERT)]);
    assert_eq!(server_version(&out), FAKE_VERSION, "{out:?}");

    let mut plain = TcpApi::plain();
    plain.listen = "127.0.0.1:0".parse().unwrap();
    let addr = api::serve(&plain, target).unwrap();
    let out = docker(&format!("tcp://127.0.0.1:{}", addr.port()), &[]);
    assert_eq!(server_version(&out), FAKE_VERSION, "{out:?}");
}
