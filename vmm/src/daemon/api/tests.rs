use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicUsize, Ordering};

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, StreamOwned};

use super::*;

/// A stand-in for dockerd behind the unix socket: answers every connection with `echo:<request>`
/// after the client half-closes, and counts connections.
fn fake_dockerd(dir: &Path) -> (PathBuf, Arc<AtomicUsize>) {
    slow_fake_dockerd(dir, Duration::ZERO)
}

/// Like [`fake_dockerd`], but each connection waits `delay` before reading (so the relay's
/// unix side backs up and the client's TLS records pile up in the TCP receive buffer).
fn slow_fake_dockerd(dir: &Path, delay: Duration) -> (PathBuf, Arc<AtomicUsize>) {
    let path = dir.join("docker.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let c = count.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut s) = conn else { continue };
            c.fetch_add(1, Ordering::SeqCst);
            std::thread::spawn(move || {
                std::thread::sleep(delay);
                let mut req = Vec::new();
                let _ = s.read_to_end(&mut req);
                let _ = s.write_all(b"echo:");
                let _ = s.write_all(&req);
            });
        }
    });
    (path, count)
}

fn local_api(tls: Option<TlsSettings>) -> TcpApi {
    TcpApi { listen: "127.0.0.1:0".parse().unwrap(), tls }
}

fn client_config(certs: &Path, with_cert: Option<(&Path, &Path)>) -> Arc<ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for c in load_certs(&certs.join(CA_CERT)).unwrap() {
        roots.add(c).unwrap();
    }
    let b = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    Arc::new(match with_cert {
        Some((cert, key)) => b
            .with_client_auth_cert(load_certs(cert).unwrap(), PrivateKeyDer::from_pem_file(key).unwrap())
            .unwrap(),
        None => b.with_no_client_auth(),
    })
}

/// Sends `msg`, half-closes (TLS close_notify), returns what came back.
fn tls_roundtrip(addr: SocketAddr, cfg: Arc<ClientConfig>, msg: &[u8]) -> io::Result<Vec<u8>> {
    let conn = ClientConnection::new(cfg, ServerName::try_from("localhost").unwrap()).unwrap();
    let tcp = TcpStream::connect(addr)?;
    tcp.set_read_timeout(Some(Duration::from_secs(20)))?;
    let mut s = StreamOwned::new(conn, tcp);
    s.write_all(msg)?;
    s.flush()?;
    s.conn.send_close_notify();
    s.conn.complete_io(&mut s.sock)?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    Ok(out)
}

#[test]
fn generated_certificates_are_complete_private_and_never_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    assert!(ensure_certs(&certs, &["dinv.example".into(), "192.0.2.7".into()]).unwrap());
    for (name, mode) in [
        (CA_CERT, 0o644),
        (CA_KEY, 0o600),
        (SERVER_CERT, 0o644),
        (SERVER_KEY, 0o600),
        (CLIENT_CERT, 0o644),
        (CLIENT_KEY, 0o600),
    ] {
        let meta = fs::metadata(certs.join(name)).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, mode, "{name}");
    }
    let before = fs::read(certs.join(SERVER_CERT)).unwrap();
    assert!(!ensure_certs(&certs, &[]).unwrap(), "an existing pair is reused");
    assert_eq!(fs::read(certs.join(SERVER_CERT)).unwrap(), before);

    // Half a pair is an error naming both files, not a silent regeneration.
    fs::remove_file(certs.join(SERVER_KEY)).unwrap();
    let e = ensure_certs(&certs, &[]).unwrap_err().to_string();
    assert!(e.contains(SERVER_CERT) && e.contains(SERVER_KEY), "{e}");
}

#[test]
fn sans_include_loopback_and_extras_without_duplicates() {
    let sans = default_sans(&["127.0.0.1".into(), "build.example".into(), " ".into()]);
    assert_eq!(sans.iter().filter(|s| *s == "127.0.0.1").count(), 1);
    assert!(sans.contains(&"localhost".to_string()) && sans.contains(&"build.example".to_string()));
    assert!(!sans.iter().any(|s| s.trim().is_empty()));
    for ok in ["build.example", "*.ci.example", "10.0.0.1", "fd00::1", "runner-7"] {
        assert!(check_san(ok).is_ok(), "{ok}");
    }
    for bad in ["", "not a dns name!", "a..b", "-x.example", "x_y.example", "a/b", &"a".repeat(254)] {
        assert!(check_san(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn tlsverify_accepts_the_generated_client_and_refuses_others() {
    let dir = tempfile::tempdir().unwrap();
    let (target, hits) = fake_dockerd(dir.path());
    let certs = dir.path().join("certs");
    let settings = TlsSettings { certs_dir: certs.clone(), verify: true, extra_sans: vec![] };
    let addr = serve(&local_api(Some(settings)), target).unwrap();

    // The generated client certificate works, data crosses both ways.
    let good = client_config(&certs, Some((&certs.join(CLIENT_CERT), &certs.join(CLIENT_KEY))));
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let out = tls_roundtrip(addr, good, &big).unwrap();
    assert_eq!(&out[..5], b"echo:");
    assert!(out[5..] == big[..], "payload changed in transit ({} bytes back)", out.len() - 5);
    assert_eq!(hits.load(Ordering::SeqCst), 1);

    // No client certificate: refused, nothing reaches dockerd.
    let none = client_config(&certs, None);
    assert!(tls_roundtrip(addr, none, b"GET /_ping").is_err());
    // A certificate from another CA: refused too.
    let other = dir.path().join("other");
    ensure_certs(&other, &[]).unwrap();
    let foreign = client_config(&certs, Some((&other.join(CLIENT_CERT), &other.join(CLIENT_KEY))));
    assert!(tls_roundtrip(addr, foreign, b"GET /_ping").is_err());
    // Not TLS at all.
    let mut raw = TcpStream::connect(addr).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let _ = raw.write_all(b"GET /_ping HTTP/1.0\r\n\r\n");
    let mut junk = Vec::new();
    let _ = raw.read_to_end(&mut junk);
    assert!(!junk.starts_with(b"echo:"));
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(hits.load(Ordering::SeqCst), 1, "a refused client reached dockerd");
}

#[test]
fn tls_relay_survives_a_backlog_of_records() {
    // Regression: plaintext was taken out of rustls only between socket reads, so a large read
    // of queued records overflowed rustls's plaintext buffer and the relay stalled.
    let dir = tempfile::tempdir().unwrap();
    let (target, _) = slow_fake_dockerd(dir.path(), Duration::from_millis(500));
    let certs = dir.path().join("certs");
    let addr =
        serve(&local_api(Some(TlsSettings { certs_dir: certs.clone(), verify: false, extra_sans: vec![] })), target)
            .unwrap();
    let big: Vec<u8> = (0..4_000_000u32).map(|i| (i % 253) as u8).collect();
    let out = tls_roundtrip(addr, client_config(&certs, None), &big).unwrap();
    assert!(out.len() == big.len() + 5 && out[5..] == big[..], "payload changed in transit");
}

#[test]
fn tls_without_verify_serves_any_client() {
    let dir = tempfile::tempdir().unwrap();
    let (target, _) = fake_dockerd(dir.path());
    let certs = dir.path().join("certs");
    let addr =
        serve(&local_api(Some(TlsSettings { certs_dir: certs.clone(), verify: false, extra_sans: vec![] })), target)
            .unwrap();
    assert_eq!(tls_roundtrip(addr, client_config(&certs, None), b"hi").unwrap(), b"echo:hi");
}

#[test]
fn tlsverify_needs_a_ca() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    ensure_certs(&certs, &[]).unwrap();
    fs::remove_file(certs.join(CA_CERT)).unwrap();
    let e = server_config(&TlsSettings { certs_dir: certs, verify: true, extra_sans: vec![] }).unwrap_err();
    assert!(matches!(e, ApiError::NoCa(_)), "{e}");
}

#[test]
fn plain_api_relays_both_directions() {
    let dir = tempfile::tempdir().unwrap();
    let (target, _) = fake_dockerd(dir.path());
    let addr = serve(&local_api(None), target).unwrap();
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /_ping").unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert_eq!(out, "echo:GET /_ping");
}

#[test]
fn a_busy_port_is_a_clear_error() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let api = TcpApi { listen: taken.local_addr().unwrap(), tls: None };
    let e = serve(&api, PathBuf::from("/nonexistent")).unwrap_err().to_string();
    assert!(e.starts_with("cannot listen on 127.0.0.1:"), "{e}");
}
