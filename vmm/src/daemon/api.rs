//! The docker API over TCP: plain (`--tcp`, port 2375) or TLS (`--tls`/`--tlsverify`, port
//! 2376), terminated in dinv with rustls. The guest never sees keys or certificates: each
//! accepted connection (after a completed handshake, for TLS) is relayed to dinv's own docker
//! unix socket, which the vsock muxer forwards to dockerd in the guest.
//!
//! Certificates live in a directory with docker's file names (`ca.pem`, `server-cert.pem`,
//! `server-key.pem`; client: `cert.pem`, `key.pem`). When the server pair is missing, dinv
//! generates a CA, a server certificate (SANs: `localhost`, 127.0.0.1, ::1, this host's name and
//! addresses, plus `--tls-san`) and a client certificate, as VMware VIC's DinV did. With
//! `--tlsverify` a client must present a certificate signed by `ca.pem`, or the handshake fails
//! and nothing reaches dockerd (VIC DinV accepted any client: vic-product#1903).
//!
//! Threads: one accept thread; per connection, one thread per direction. TLS state is shared
//! under a mutex that is never held across a blocking read.

use std::fs;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig, ServerConnection};

/// Port of the plain docker API (docker's convention).
pub const PLAIN_PORT: u16 = 2375;
/// Port of the TLS docker API (docker's convention).
pub const TLS_PORT: u16 = 2376;
/// A client must finish its TLS handshake within this time.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
const BUF: usize = 64 * 1024;

/// Docker's certificate file names.
pub const CA_CERT: &str = "ca.pem";
/// The CA's private key (only present when dinv generated the CA).
pub const CA_KEY: &str = "ca-key.pem";
/// Server certificate (chain).
pub const SERVER_CERT: &str = "server-cert.pem";
/// Server private key.
pub const SERVER_KEY: &str = "server-key.pem";
/// Client certificate, for `docker --tlsverify` (`DOCKER_CERT_PATH`).
pub const CLIENT_CERT: &str = "cert.pem";
/// Client private key.
pub const CLIENT_KEY: &str = "key.pem";

/// Where and how the docker API is served over TCP.
#[derive(Debug, Clone)]
pub struct TcpApi {
    /// Listening address (default `0.0.0.0:2375`, or `:2376` with TLS).
    pub listen: SocketAddr,
    /// TLS settings; `None`: plain HTTP.
    pub tls: Option<TlsSettings>,
}

/// TLS for the TCP API.
#[derive(Debug, Clone)]
pub struct TlsSettings {
    /// Directory with docker-named certificate files; generated when the server pair is missing.
    pub certs_dir: PathBuf,
    /// Require client certificates signed by `ca.pem` (`--tlsverify`).
    pub verify: bool,
    /// Extra subject alternative names for a generated server certificate (IPs or DNS names).
    pub extra_sans: Vec<String>,
}

/// TCP API errors.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// A certificate file could not be read.
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    /// A certificate file could not be written.
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    /// A PEM file held no usable item.
    #[error("{path}: {what}")]
    Pem { path: PathBuf, what: String },
    /// Only part of the server's certificate pair exists.
    #[error("{dir}: {present} exists but {missing} does not (remove both to have dinv generate new ones)")]
    Incomplete { dir: PathBuf, present: &'static str, missing: &'static str },
    /// `--tlsverify` without a CA to verify against.
    #[error("--tlsverify needs {0} (the CA that signs client certificates)")]
    NoCa(PathBuf),
    /// Certificate generation failed.
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// The client verifier could not be built from the CA.
    #[error("client certificate verifier: {0}")]
    Verifier(String),
    /// The listening socket could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: io::Error },
}

impl TcpApi {
    /// Plain API on `0.0.0.0:2375`.
    pub fn plain() -> Self {
        Self { listen: SocketAddr::from(([0, 0, 0, 0], PLAIN_PORT)), tls: None }
    }

    /// TLS API on `0.0.0.0:2376`.
    pub fn tls(settings: TlsSettings) -> Self {
        Self { listen: SocketAddr::from(([0, 0, 0, 0], TLS_PORT)), tls: Some(settings) }
    }
}

/// Binds the TCP API and serves it on a background thread, relaying to `target` (the docker
/// unix socket). Certificates are loaded or generated first. Returns the bound address.
pub fn serve(api: &TcpApi, target: PathBuf) -> Result<SocketAddr, ApiError> {
    let tls = match &api.tls {
        Some(settings) => {
            if ensure_certs(&settings.certs_dir, &settings.extra_sans)? {
                tracing::info!("generated TLS CA, server and client certificates in {}", settings.certs_dir.display());
            }
            Some(server_config(settings)?)
        }
        None => None,
    };
    let listener = TcpListener::bind(api.listen).map_err(|source| ApiError::Listen { addr: api.listen, source })?;
    let addr = listener.local_addr().map_err(|source| ApiError::Listen { addr: api.listen, source })?;
    match &api.tls {
        None => tracing::warn!(
            "docker API on tcp://{addr} WITHOUT TLS: anyone who can reach this port controls dockerd (use --tlsverify)"
        ),
        Some(s) if s.verify => tracing::info!("docker API on tcp://{addr} (TLS, client certificates required)"),
        Some(_) => tracing::warn!("docker API on tcp://{addr} (TLS without client verification: use --tlsverify)"),
    }
    std::thread::Builder::new()
        .name("tcp-api".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(tcp) = conn else { continue };
                let (tls, target) = (tls.clone(), target.clone());
                let _ = std::thread::Builder::new().name("tcp-api-conn".into()).spawn(move || {
                    let peer = tcp.peer_addr().ok();
                    let result = match tls {
                        Some(cfg) => serve_tls(tcp, cfg, &target),
                        None => serve_plain(tcp, &target),
                    };
                    if let Err(e) = result {
                        tracing::debug!("docker API connection from {peer:?}: {e}");
                    }
                });
            }
        })
        .map_err(|source| ApiError::Listen { addr, source })?;
    Ok(addr)
}

fn serve_plain(tcp: TcpStream, target: &Path) -> io::Result<()> {
    let unix = UnixStream::connect(target)?;
    let (tcp2, unix2) = (tcp.try_clone()?, unix.try_clone()?);
    let up = std::thread::spawn(move || pipe(tcp2, unix2, |s| s.shutdown(Shutdown::Write)));
    pipe(unix, tcp, |s| s.shutdown(Shutdown::Write));
    let _ = up.join();
    Ok(())
}

fn pipe<R: Read, W: Write>(mut from: R, mut to: W, close: impl Fn(&W) -> io::Result<()>) {
    let _ = io::copy(&mut from, &mut to);
    let _ = close(&to);
}

fn lock(conn: &Mutex<ServerConnection>) -> MutexGuard<'_, ServerConnection> {
    conn.lock().unwrap_or_else(|p| p.into_inner())
}

/// Moves the decrypted plaintext `conn` holds into `out`; true once the peer sent close_notify.
fn drain(conn: &mut ServerConnection, out: &mut Vec<u8>) -> io::Result<bool> {
    let mut plain = [0u8; 16 * 1024];
    loop {
        match conn.reader().read(&mut plain) {
            Ok(0) => return Ok(true),
            Ok(k) => out.extend_from_slice(&plain[..k]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) => return Err(e),
        }
    }
}

/// Writes every pending TLS record to `tcp`.
fn flush(conn: &mut ServerConnection, tcp: &mut TcpStream) -> io::Result<()> {
    while conn.wants_write() {
        conn.write_tls(tcp)?;
    }
    Ok(())
}

fn serve_tls(mut tcp: TcpStream, cfg: Arc<ServerConfig>, target: &Path) -> io::Result<()> {
    let mut conn = ServerConnection::new(cfg).map_err(io::Error::other)?;
    // Every write below is flushed to the socket at once, so memory stays bounded by BUF; the
    // default 64 KiB limit on unsent records could refuse part of a 64 KiB chunk (WriteZero).
    conn.set_buffer_limit(None);
    // Handshake first: nothing reaches dockerd from a client that fails it.
    tcp.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    while conn.is_handshaking() {
        if let Err(e) = conn.complete_io(&mut tcp) {
            // Send the alert rustls queued (e.g. bad or missing client certificate).
            let _ = flush(&mut conn, &mut tcp);
            return Err(e);
        }
    }
    tcp.set_read_timeout(None)?;
    let unix = UnixStream::connect(target)?;
    let unix_ctl = unix.try_clone()?;
    let conn = Arc::new(Mutex::new(conn));

    // dockerd → client.
    let down = {
        let (conn, mut tcp, mut unix) = (conn.clone(), tcp.try_clone()?, unix.try_clone()?);
        std::thread::spawn(move || -> io::Result<()> {
            let mut buf = vec![0u8; BUF];
            loop {
                let n = unix.read(&mut buf)?;
                let mut c = lock(&conn);
                if n == 0 {
                    c.send_close_notify();
                    flush(&mut c, &mut tcp)?;
                    return tcp.shutdown(Shutdown::Write);
                }
                c.writer().write_all(&buf[..n])?;
                flush(&mut c, &mut tcp)?;
            }
        })
    };

    // client → dockerd. Plaintext may already be buffered: a client's first request often
    // arrives in the same segment as its last handshake message.
    let up = (|| -> io::Result<()> {
        let mut unix = unix;
        let mut buf = vec![0u8; BUF];
        let mut out = Vec::new();
        let mut closed = drain(&mut lock(&conn), &mut out)?;
        loop {
            if !out.is_empty() {
                unix.write_all(&out)?;
                out.clear();
            }
            if closed {
                return unix.shutdown(Shutdown::Write);
            }
            let n = tcp.read(&mut buf)?;
            if n == 0 {
                return unix.shutdown(Shutdown::Write);
            }
            let mut c = lock(&conn);
            let mut rd = &buf[..n];
            // Decrypt record by record, taking the plaintext out each time: rustls buffers only
            // a bounded amount of plaintext and refuses more ciphertext once that is full.
            while !rd.is_empty() {
                c.read_tls(&mut rd)?;
                if let Err(e) = c.process_new_packets() {
                    let _ = flush(&mut c, &mut tcp);
                    return Err(io::Error::other(e));
                }
                closed |= drain(&mut c, &mut out)?;
            }
            flush(&mut c, &mut tcp)?;
        }
    })();
    // A broken client side ends both directions (a clean half-close does not: the response is
    // still coming): dockerd sees EOF and the other thread's read returns.
    if up.is_err() {
        let _ = tcp.shutdown(Shutdown::Both);
        let _ = unix_ctl.shutdown(Shutdown::Both);
    }
    let _ = down.join();
    up
}

/// Loads the rustls server configuration from `settings.certs_dir`.
pub fn server_config(settings: &TlsSettings) -> Result<Arc<ServerConfig>, ApiError> {
    let dir = &settings.certs_dir;
    let chain = load_certs(&dir.join(SERVER_CERT))?;
    let key_path = dir.join(SERVER_KEY);
    let key = PrivateKeyDer::from_pem_file(&key_path)
        .map_err(|e| ApiError::Pem { path: key_path.clone(), what: format!("no private key: {e}") })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone()).with_safe_default_protocol_versions()?;
    let builder = if settings.verify {
        let ca_path = dir.join(CA_CERT);
        if !ca_path.exists() {
            return Err(ApiError::NoCa(ca_path));
        }
        let mut roots = RootCertStore::empty();
        for cert in load_certs(&ca_path)? {
            roots.add(cert).map_err(|e| ApiError::Pem { path: ca_path.clone(), what: e.to_string() })?;
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| ApiError::Verifier(e.to_string()))?;
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    Ok(Arc::new(builder.with_single_cert(chain, key)?))
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, ApiError> {
    let pem = fs::read(path).map_err(|source| ApiError::Read { path: path.to_path_buf(), source })?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| ApiError::Pem { path: path.to_path_buf(), what: e.to_string() })?;
    if certs.is_empty() {
        return Err(ApiError::Pem { path: path.to_path_buf(), what: "no certificate".into() });
    }
    Ok(certs)
}

/// Generates CA, server and client certificates in `dir` unless the server pair exists.
/// Returns whether it generated them. Never overwrites an existing file.
pub fn ensure_certs(dir: &Path, extra_sans: &[String]) -> Result<bool, ApiError> {
    let (cert, key) = (dir.join(SERVER_CERT), dir.join(SERVER_KEY));
    match (cert.exists(), key.exists()) {
        (true, true) => return Ok(false),
        (true, false) => {
            return Err(ApiError::Incomplete { dir: dir.to_path_buf(), present: SERVER_CERT, missing: SERVER_KEY })
        }
        (false, true) => {
            return Err(ApiError::Incomplete { dir: dir.to_path_buf(), present: SERVER_KEY, missing: SERVER_CERT })
        }
        (false, false) => {}
    }
    fs::create_dir_all(dir).map_err(|source| ApiError::Write { path: dir.to_path_buf(), source })?;
    let set = generate(&default_sans(extra_sans))?;
    for (name, pem, private) in [
        (CA_CERT, &set.ca_cert, false),
        (CA_KEY, &set.ca_key, true),
        (SERVER_CERT, &set.server_cert, false),
        (SERVER_KEY, &set.server_key, true),
        (CLIENT_CERT, &set.client_cert, false),
        (CLIENT_KEY, &set.client_key, true),
    ] {
        write_new(&dir.join(name), pem, if private { 0o600 } else { 0o644 })?;
    }
    Ok(true)
}

fn write_new(path: &Path, contents: &str, mode: u32) -> Result<(), ApiError> {
    let err = |source| ApiError::Write { path: path.to_path_buf(), source };
    let mut f = fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(path).map_err(err)?;
    f.write_all(contents.as_bytes()).map_err(err)?;
    f.sync_all().map_err(err)
}

/// A generated certificate set (PEM).
#[derive(Debug)]
pub struct CertSet {
    /// CA certificate.
    pub ca_cert: String,
    /// CA key.
    pub ca_key: String,
    /// Server certificate (signed by the CA).
    pub server_cert: String,
    /// Server key.
    pub server_key: String,
    /// Client certificate (signed by the CA).
    pub client_cert: String,
    /// Client key.
    pub client_key: String,
}

/// `localhost`, the loopback addresses, this host's name and addresses, then `extra`.
pub fn default_sans(extra: &[String]) -> Vec<String> {
    let mut sans = vec!["localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string()];
    if let Ok(name) = fs::read_to_string("/proc/sys/kernel/hostname") {
        let name = name.trim();
        if !name.is_empty() {
            sans.push(name.to_string());
        }
    }
    sans.extend(host_addresses().into_iter().map(|a| a.to_string()));
    sans.extend(extra.iter().map(|s| s.trim().to_string()).filter(|s| !s.is_empty()));
    let mut seen = std::collections::HashSet::new();
    sans.retain(|s| seen.insert(s.clone()));
    sans
}

/// Addresses of this host's interfaces (the container's addresses when dinv runs in one).
fn host_addresses() -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills a list we free below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut ifap) } != 0 {
        return out;
    }
    let mut p = ifap;
    while !p.is_null() {
        // SAFETY: p walks the list getifaddrs returned; entries stay valid until freeifaddrs.
        let ifa = unsafe { &*p };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: ifa_addr points to a sockaddr whose family says which struct it is.
            let family = i32::from(unsafe { (*ifa.ifa_addr).sa_family });
            if family == libc::AF_INET {
                // SAFETY: AF_INET addresses are sockaddr_in.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                out.push(IpAddr::from(u32::from_be(sin.sin_addr.s_addr).to_be_bytes()));
            } else if family == libc::AF_INET6 {
                // SAFETY: AF_INET6 addresses are sockaddr_in6.
                let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                out.push(IpAddr::from(sin6.sin6_addr.s6_addr));
            }
        }
        p = ifa.ifa_next;
    }
    // SAFETY: ifap came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(ifap) };
    out.retain(|a| !a.is_loopback() && !matches!(a, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80));
    out
}

/// Checks a `--tls-san` entry: an IP address or a DNS name (optionally `*.` wildcard).
pub fn check_san(s: &str) -> Result<(), String> {
    if s.parse::<IpAddr>().is_ok() {
        return Ok(());
    }
    let name = s.strip_prefix("*.").unwrap_or(s);
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    if s.len() > 253 || !name.split('.').all(label_ok) {
        return Err(format!("{s:?} is neither an IP address nor a DNS name"));
    }
    Ok(())
}

fn san(s: &str) -> Result<SanType, rcgen::Error> {
    Ok(match s.parse::<IpAddr>() {
        Ok(ip) => SanType::IpAddress(ip),
        Err(_) => SanType::DnsName(s.to_string().try_into()?),
    })
}

/// Generates a CA and a server and a client certificate signed by it (ECDSA P-256, 10 years).
pub fn generate(sans: &[String]) -> Result<CertSet, rcgen::Error> {
    let name = |cn: &str| {
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "dinv");
        dn.push(DnType::CommonName, cn);
        dn
    };
    let validity = |p: &mut CertificateParams| {
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now - time::Duration::days(1);
        p.not_after = now + time::Duration::days(3650);
    };

    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name = name("dinv CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    validity(&mut ca);
    let ca_cert = ca.self_signed(&ca_key)?;

    let server_key = KeyPair::generate()?;
    let mut server = CertificateParams::new(Vec::<String>::new())?;
    server.distinguished_name = name("dinv docker API");
    server.subject_alt_names = sans.iter().map(|s| san(s)).collect::<Result<_, _>>()?;
    server.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    server.use_authority_key_identifier_extension = true;
    validity(&mut server);
    let server_cert = server.signed_by(&server_key, &ca_cert, &ca_key)?;

    let client_key = KeyPair::generate()?;
    let mut client = CertificateParams::new(Vec::<String>::new())?;
    client.distinguished_name = name("dinv client");
    client.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    client.use_authority_key_identifier_extension = true;
    validity(&mut client);
    let client_cert = client.signed_by(&client_key, &ca_cert, &ca_key)?;

    Ok(CertSet {
        ca_cert: ca_cert.pem(),
        ca_key: ca_key.serialize_pem(),
        server_cert: server_cert.pem(),
        server_key: server_key.serialize_pem(),
        client_cert: client_cert.pem(),
        client_key: client_key.serialize_pem(),
    })
}

#[cfg(test)]
mod tests;
