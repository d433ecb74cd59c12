//! Early mounts (PID 1 duty) and the unmount pass at shutdown.
//!
//! Layout (the root filesystem `/dev/vda` stays read-only):
//!
//! | path | what |
//! |---|---|
//! | `/proc`, `/sys`, `/dev` (devtmpfs), `/dev/pts`, `/dev/shm` | kernel filesystems |
//! | `/sys/fs/cgroup` | cgroup2 (unified hierarchy; dockerd uses the cgroupfs driver on it) |
//! | `/run`, `/tmp` | tmpfs |
//! | `/etc`, `/var` | overlayfs: lower = the image's directory, upper/work on a tmpfs at `/run/dinv/<dir>` (changes vanish at shutdown) |
//! | `/var/lib/docker` | the docker disk (ext4, see [`crate::disk`]) on top of the `/var` overlay |
//!
//! If the `/var` overlay cannot be mounted, `/var` becomes a plain tmpfs with the directories the
//! daemons need; if the `/etc` overlay fails, `/etc` stays read-only (dockerd does not write it).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::sys::mount;

const NOSUID: libc::c_ulong = libc::MS_NOSUID;
const NODEV: libc::c_ulong = libc::MS_NODEV;
const NOEXEC: libc::c_ulong = libc::MS_NOEXEC;

fn busy_ok(r: io::Result<()>) -> io::Result<()> {
    match r {
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Ok(()),
        other => other,
    }
}

fn try_mount(what: &str, r: io::Result<()>) {
    if let Err(e) = busy_ok(r) {
        crate::info!("mount {what} failed: {e}");
    }
}

/// Where the writable root is assembled before `pivot_root` (must exist in the image).
const ROOT_STAGING: &str = "/mnt";

/// Makes `/` writable without touching the read-only root image: an overlay of the image
/// (lower) and a tmpfs (upper) becomes the new root (`pivot_root`), so mount points for 9p
/// shares and volumes can be created at any path, as `DINV_MOUNTS` promises. Changes live in
/// RAM only and are gone at the next boot. Runs first, before any other mount; on failure the
/// root stays read-only and the error is returned for the log.
pub fn writable_root() -> io::Result<()> {
    let staging = Path::new(ROOT_STAGING);
    mount(None, staging, "tmpfs", NOSUID | NODEV, Some("mode=0755"))?;
    let mut pivoted = false;
    let result = (|| {
        for d in ["upper", "work", "root"] {
            fs::create_dir(staging.join(d))?;
        }
        let new_root = staging.join("root");
        mount(
            Some(Path::new("overlay")),
            &new_root,
            "overlay",
            0,
            Some(&format!("lowerdir=/,upperdir={ROOT_STAGING}/upper,workdir={ROOT_STAGING}/work")),
        )?;
        // The old root moves to the new root's /mnt (an empty directory of the image), then
        // goes away; the overlay keeps what it needs referenced.
        let put_old = new_root.join(ROOT_STAGING.trim_start_matches('/'));
        if let Err(e) = crate::sys::pivot_root(&new_root, &put_old) {
            let _ = crate::sys::umount(&new_root, 0);
            return Err(e);
        }
        pivoted = true;
        std::env::set_current_dir("/")?;
        crate::sys::umount(staging, libc::MNT_DETACH)?;
        Ok(())
    })();
    if result.is_err() && !pivoted {
        // Still on the old root: drop the staging tmpfs again.
        let _ = crate::sys::umount(staging, libc::MNT_DETACH);
    }
    result
}

/// Mounts the kernel filesystems and tmpfs dirs, and overlays `/etc` and `/var`.
pub fn early() {
    let p = Path::new;
    try_mount(
        "/proc",
        mount(None, p("/proc"), "proc", NOSUID | NODEV | NOEXEC, None),
    );
    try_mount(
        "/sys",
        mount(None, p("/sys"), "sysfs", NOSUID | NODEV | NOEXEC, None),
    );
    // The kernel mounts devtmpfs itself with CONFIG_DEVTMPFS_MOUNT (EBUSY then).
    try_mount(
        "/dev",
        mount(None, p("/dev"), "devtmpfs", NOSUID, Some("mode=0755")),
    );
    let _ = fs::create_dir_all("/dev/pts");
    let _ = fs::create_dir_all("/dev/shm");
    try_mount(
        "/dev/pts",
        mount(
            None,
            p("/dev/pts"),
            "devpts",
            NOSUID | NOEXEC,
            Some("gid=5,mode=620,ptmxmode=666"),
        ),
    );
    try_mount(
        "/dev/shm",
        mount(
            None,
            p("/dev/shm"),
            "tmpfs",
            NOSUID | NODEV,
            Some("mode=1777"),
        ),
    );
    for (link, target) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        if fs::symlink_metadata(link).is_err() {
            let _ = std::os::unix::fs::symlink(target, link);
        }
    }
    if fs::symlink_metadata("/dev/ptmx").is_err() {
        let _ = std::os::unix::fs::symlink("pts/ptmx", "/dev/ptmx");
    }
    try_mount(
        "/run",
        mount(None, p("/run"), "tmpfs", NOSUID | NODEV, Some("mode=0755")),
    );
    try_mount(
        "/tmp",
        mount(None, p("/tmp"), "tmpfs", NOSUID | NODEV, Some("mode=1777")),
    );
    try_mount(
        "/sys/fs/cgroup",
        mount(
            None,
            p("/sys/fs/cgroup"),
            "cgroup2",
            NOSUID | NODEV | NOEXEC,
            Some("nsdelegate"),
        ),
    );
    let _ = fs::create_dir_all("/run/lock");

    if let Err(e) = overlay("/etc") {
        crate::info!("overlay on /etc failed ({e}); /etc stays read-only");
    }
    if let Err(e) = overlay("/var") {
        crate::info!("overlay on /var failed ({e}); using a plain tmpfs");
        try_mount(
            "/var",
            mount(None, p("/var"), "tmpfs", NOSUID | NODEV, Some("mode=0755")),
        );
        for d in [
            "/var/lib/docker",
            "/var/lib/containerd",
            "/var/log",
            "/var/tmp",
            "/var/cache",
        ] {
            let _ = fs::create_dir_all(d);
        }
        let _ = std::os::unix::fs::symlink("/run", "/var/run");
        let _ = std::os::unix::fs::symlink("/run/lock", "/var/lock");
    }
}

/// Overlays `dir` with a writable tmpfs upper layer under `/run/dinv/<name>`.
fn overlay(dir: &str) -> io::Result<()> {
    let name = dir.trim_start_matches('/');
    let base = PathBuf::from("/run/dinv").join(name);
    let upper = base.join("upper");
    let work = base.join("work");
    fs::create_dir_all(&upper)?;
    fs::create_dir_all(&work)?;
    let opts = format!(
        "lowerdir={dir},upperdir={},workdir={}",
        upper.display(),
        work.display()
    );
    mount(
        Some(Path::new("overlay")),
        Path::new(dir),
        "overlay",
        0,
        Some(&opts),
    )
}

/// One line of `/proc/self/mounts`: mount point and filesystem type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// Mount point (octal escapes decoded).
    pub target: String,
    /// Filesystem type.
    pub fstype: String,
}

/// Decodes the `\040`-style escapes of `/proc/mounts`.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses `/proc/self/mounts` text.
pub fn parse_mounts(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let _src = f.next()?;
            let target = unescape(f.next()?);
            let fstype = f.next()?.to_string();
            Some(MountEntry { target, fstype })
        })
        .collect()
}

/// Filesystem types that hold no data worth flushing; left mounted at power-off.
const VOLATILE: [&str; 9] = [
    "proc", "sysfs", "devtmpfs", "devpts", "tmpfs", "cgroup2", "mqueue", "nsfs", "bpf",
];

/// Which mounts to unmount at shutdown, innermost first: everything backed by storage (ext4, 9p,
/// container overlays, …) except `/` itself.
pub fn unmount_order(entries: &[MountEntry]) -> Vec<String> {
    entries
        .iter()
        .rev()
        .filter(|e| e.target != "/" && !VOLATILE.contains(&e.fstype.as_str()))
        .map(|e| e.target.clone())
        .collect()
}

/// Unmounts every storage-backed mount (innermost first). A mount that stays busy is remounted
/// read-only, or failing that frozen (`FIFREEZE`: ext4 flushes its journal and clears
/// `needs_recovery`, so the disk image is clean even though a process still holds a file open —
/// process exit is slow on PVM). Returns how many could not be unmounted.
pub fn unmount_all() -> usize {
    let text = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mut failed = 0;
    for target in unmount_order(&parse_mounts(&text)) {
        let path = Path::new(&target);
        let Err(e) = crate::sys::umount(path, 0) else {
            crate::debug!("unmounted {target}");
            continue;
        };
        failed += 1;
        let fallback = match mount(None, path, "", libc::MS_REMOUNT | libc::MS_RDONLY, None) {
            Ok(()) => "remounted read-only".to_string(),
            Err(_) => match crate::sys::freeze(path) {
                Ok(()) => "frozen (journal flushed)".to_string(),
                Err(fe) => format!("cannot remount read-only or freeze: {fe}"),
            },
        };
        crate::info!("unmount {target}: {e}; {fallback}");
    }
    failed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unmount_order_skips_volatile_and_root() {
        let text = "/dev/root / ext4 ro,relatime 0 0\n\
                    proc /proc proc rw 0 0\n\
                    overlay /etc overlay rw 0 0\n\
                    overlay /var overlay rw 0 0\n\
                    /dev/vdb /var/lib/docker ext4 rw,discard 0 0\n\
                    overlay /var/lib/docker/overlay2/abc/merged overlay rw 0 0\n\
                    tmpfs /run tmpfs rw 0 0\n\
                    share0 /mnt/my\\040dir 9p rw 0 0\n";
        let order = unmount_order(&parse_mounts(text));
        assert_eq!(
            order,
            vec![
                "/mnt/my dir",
                "/var/lib/docker/overlay2/abc/merged",
                "/var/lib/docker",
                "/var",
                "/etc"
            ]
        );
    }
}
