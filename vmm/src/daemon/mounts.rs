//! `DINV_MOUNTS`: host directories shared with the guest over virtio-9p (bind mounts).
//!
//! Syntax: semicolon-separated entries, each `HOST`, `HOST:ro`, `HOST:GUEST` or
//! `HOST:GUEST:ro|rw`. The guest path defaults to the host path, so that
//! `docker run -v /data:/data` inside dinv sees the host's `/data`. Each entry becomes one
//! virtio-9p device with the mount tag `dinvN`; the guest agent mounts it from the kernel
//! parameter `dinv.mount=dinvN:<guest path>[:ro]`.
//!
//! Ownership: the 9P server runs as the dinv process's user. Files the guest creates are owned
//! on the host by that user (whatever uid the guest process had); the guest sees host owners
//! as they are. Read-only shares are refused writes by the server itself (`EROFS`), not only by
//! the guest's mount flags.

use std::path::{Component, Path, PathBuf};

/// Guest paths a share must not hide.
const RESERVED: &[&str] = &["/", "/proc", "/sys", "/dev", "/run", "/tmp", "/etc", "/usr", "/var", "/var/lib/docker", "/sbin", "/bin", "/lib"];

/// One shared directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// Host directory (canonical, absolute).
    pub host: PathBuf,
    /// Absolute guest path it is mounted on.
    pub guest: String,
    /// Read-only share.
    pub read_only: bool,
}

/// A bad `DINV_MOUNTS` entry.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("DINV_MOUNTS entry {entry:?}: {why}")]
pub struct MountError {
    /// The entry as written.
    pub entry: String,
    /// What is wrong with it.
    pub why: String,
}

/// Parses a `DINV_MOUNTS` list and checks that every host directory exists.
pub fn parse_mounts(list: &str) -> Result<Vec<Mount>, MountError> {
    let mut mounts: Vec<Mount> = Vec::new();
    for entry in list.split(';').map(str::trim).filter(|e| !e.is_empty()) {
        let err = |why: String| MountError { entry: entry.to_string(), why };
        let parts: Vec<&str> = entry.split(':').collect();
        let (host, guest, mode) = match parts.as_slice() {
            [h] => (*h, *h, None),
            [h, m @ ("ro" | "rw")] => (*h, *h, Some(*m)),
            [h, g] => (*h, *g, None),
            [h, g, m] => (*h, *g, Some(*m)),
            _ => return Err(err("expected HOST[:GUEST][:ro|rw]".into())),
        };
        let read_only = match mode {
            None | Some("rw") => false,
            Some("ro") => true,
            Some(m) => return Err(err(format!("unknown mode {m:?} (ro or rw)"))),
        };
        if !host.starts_with('/') {
            return Err(err(format!("host path {host:?} is not absolute")));
        }
        let canonical = std::fs::canonicalize(host).map_err(|e| err(format!("host path {host}: {e}")))?;
        if !canonical.is_dir() {
            return Err(err(format!("host path {host} is not a directory")));
        }
        let guest = check_guest_path(guest).map_err(err)?;
        if let Some(other) = mounts.iter().find(|m| m.guest == guest) {
            return Err(err(format!("guest path {guest} is already shared from {}", other.host.display())));
        }
        mounts.push(Mount { host: canonical, guest, read_only });
    }
    Ok(mounts)
}

/// A guest path must be absolute, normal (no `.`/`..`), fit on the kernel command line (no
/// whitespace, `:` or control characters) and not hide a system directory.
pub(crate) fn check_guest_path(path: &str) -> Result<String, String> {
    if !path.starts_with('/') {
        return Err(format!("guest path {path:?} is not absolute"));
    }
    if path.chars().any(|c| c.is_whitespace() || c.is_control() || c == '"' || c == ':') {
        return Err(format!("guest path {path:?} contains whitespace, quotes, colons or control characters"));
    }
    let mut normal = PathBuf::from("/");
    for c in Path::new(path).components() {
        match c {
            Component::RootDir => {}
            Component::Normal(n) => normal.push(n),
            _ => return Err(format!("guest path {path:?} contains . or ..")),
        }
    }
    let normal = normal.to_string_lossy().into_owned();
    if RESERVED.contains(&normal.as_str()) {
        return Err(format!("guest path {normal} is a system directory of the guest"));
    }
    Ok(normal)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms() {
        let dir = tempfile::tempdir().unwrap();
        let d = std::fs::canonicalize(dir.path()).unwrap();
        let ds = d.to_str().unwrap();
        let list = format!("{ds} ; {ds}:/data:ro;{ds}:/w:rw ;;{ds}/:/x/../y/");
        let m = parse_mounts(&list).unwrap_err();
        assert!(m.why.contains(". or .."), "{m}");
        let list = format!("{ds} ; {ds}:/data:ro;{ds}:/w:rw ;;{ds}/:/x/y/");
        let m = parse_mounts(&list).unwrap();
        assert_eq!(m.len(), 4);
        assert_eq!((m[0].guest.as_str(), m[0].read_only), (ds, false));
        assert_eq!((m[1].guest.as_str(), m[1].read_only), ("/data", true));
        assert_eq!((m[2].guest.as_str(), m[2].read_only), ("/w", false));
        assert_eq!(m[3].guest, "/x/y");
        assert!(m.iter().all(|x| x.host == d));
        let ro = parse_mounts(&format!("{ds}:ro")).unwrap();
        assert_eq!((ro[0].guest.as_str(), ro[0].read_only), (ds, true));
        assert_eq!(parse_mounts(" ; ").unwrap(), vec![]);
    }

    #[test]
    fn bad_entries_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let ds = dir.path().to_str().unwrap().to_string();
        let file = dir.path().join("f");
        std::fs::write(&file, b"").unwrap();
        let cases = [
            ("host path \"relative\" is not absolute", "relative".to_string()),
            ("No such file", "/nonexistent/dinv/dir".into()),
            ("not a directory", file.to_str().unwrap().into()),
            ("not absolute", format!("{ds}:data")),
            ("system directory", format!("{ds}:/var/lib/docker")),
            ("system directory", format!("{ds}:/")),
            ("unknown mode", format!("{ds}:/d:rx")),
            ("expected", format!("{ds}:/d:ro:x")),
            ("whitespace", format!("{ds}:/a b")),
            ("already shared", format!("{ds}:/d;{ds}:/d/")),
        ];
        for (want, list) in cases {
            let e = parse_mounts(&list).unwrap_err();
            assert!(e.to_string().contains(want), "{list}: {e}");
            assert!(list.contains(&e.entry) || e.entry.is_empty(), "{e}");
        }
    }
}
