//! Readiness probe: `GET /_ping` on `/run/docker.sock` (HTTP/1.1 with `Connection: close`, like
//! the docker CLI, over the unix socket; chunked bodies are decoded).

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// Sends `GET <path>` and returns (status code, body). `Connection: close`, so the body ends at EOF
/// (or is chunked).
pub fn get(sock: &Path, path: &str, timeout: Duration) -> io::Result<(u16, String)> {
    let mut s = UnixStream::connect(sock)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: docker\r\nUser-Agent: dinv-agent\r\nConnection: close\r\n\r\n").as_bytes())?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    parse_response(&String::from_utf8_lossy(&buf))
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "malformed HTTP response"))
}

/// Parses an HTTP/1.x response into (status, body), decoding `Transfer-Encoding: chunked`.
pub fn parse_response(text: &str) -> Option<(u16, String)> {
    let (head, body) = text.split_once("\r\n\r\n")?;
    let mut lines = head.lines();
    let status_line = lines.next()?;
    let mut parts = status_line.split_whitespace();
    if !parts.next()?.starts_with("HTTP/1.") {
        return None;
    }
    let code = parts.next()?.parse().ok()?;
    let chunked = lines.any(|l| {
        l.split_once(':').is_some_and(|(k, v)| {
            k.trim().eq_ignore_ascii_case("transfer-encoding")
                && v.trim().eq_ignore_ascii_case("chunked")
        })
    });
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_string()
    };
    Some((code, body))
}

/// Decodes a chunked body (chunk extensions and trailers ignored).
fn dechunk(mut rest: &str) -> Option<String> {
    let mut out = String::new();
    loop {
        let (size_line, after) = rest.split_once("\r\n")?;
        let size = usize::from_str_radix(size_line.split(';').next()?.trim(), 16).ok()?;
        if size == 0 {
            return Some(out);
        }
        out.push_str(after.get(..size)?);
        rest = after.get(size..)?.strip_prefix("\r\n")?;
    }
}

/// Whether a `/_ping` response means ready.
pub fn is_ready(resp: &(u16, String)) -> bool {
    resp.0 == 200 && resp.1.trim() == "OK"
}

/// Pulls `"Key":"value"` out of a flat JSON object without a JSON parser (for log lines only).
pub fn json_str_field(json: &str, key: &str) -> Option<String> {
    let pat = format!("\"{key}\":\"");
    let start = json.find(&pat)? + pat.len();
    let end = json[start..].find('"')?;
    Some(json[start..start + end].to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ping_responses() {
        let ok = "HTTP/1.0 200 OK\r\nApi-Version: 1.45\r\nContent-Length: 2\r\n\r\nOK";
        let r = parse_response(ok).unwrap();
        assert!(is_ready(&r));
        let busy = "HTTP/1.0 503 Service Unavailable\r\n\r\n";
        assert!(!is_ready(&parse_response(busy).unwrap()));
        assert_eq!(parse_response("garbage"), None);
        assert_eq!(parse_response("SSH-2.0\r\n\r\n"), None);
        let chunked = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n{\"a\"\r\n5;x=y\r\n:\"b\"}\r\n0\r\n\r\n";
        assert_eq!(
            parse_response(chunked),
            Some((200, "{\"a\":\"b\"}".to_string()))
        );
        let truncated = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\nabc";
        assert_eq!(parse_response(truncated), None);
    }

    #[test]
    fn json_fields() {
        let v = r#"{"Platform":{"Name":""},"Version":"26.1.5+dfsg1","ApiVersion":"1.45"}"#;
        assert_eq!(
            json_str_field(v, "Version").as_deref(),
            Some("26.1.5+dfsg1")
        );
        assert_eq!(json_str_field(v, "ApiVersion").as_deref(), Some("1.45"));
        assert_eq!(json_str_field(v, "Driver"), None);
    }

    #[test]
    fn get_over_unix_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("docker.sock");
        let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let t = std::thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            let mut req = [0u8; 256];
            let n = c.read(&mut req).unwrap();
            assert!(String::from_utf8_lossy(&req[..n]).starts_with("GET /_ping HTTP/1.1\r\n"));
            c.write_all(b"HTTP/1.0 200 OK\r\n\r\nOK").unwrap();
        });
        let r = get(&path, "/_ping", Duration::from_secs(5)).unwrap();
        assert!(is_ready(&r));
        t.join().unwrap();
    }
}
