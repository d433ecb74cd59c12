//! `DINV_SNAPSHOT`: start in seconds from a snapshot of a booted docker guest.
//!
//! A dinv that boots a new docker disk with `DINV_SNAPSHOT=DIR` set writes a snapshot of the
//! guest to DIR the moment dockerd first answers (before it announces readiness, so no client
//! request is in it): guest memory, the docker disk (and extra volume) as they are then, the
//! machine state. The next dinv with the same configuration and a docker disk that does not
//! exist yet puts the snapshot's disks in place and resumes the guest instead of booting it.
//! The resumed agent reconnects (virtio-vsock transport reset), gets the host's clock and a
//! fresh random seed, and reports ready.
//!
//! Not used (the guest boots, and no snapshot is written) when the docker disk or the volume
//! already exists (their contents would not match). A snapshot that does not fit the
//! configuration (another dinv, kernel, root filesystem, memory size, option on the kernel
//! command line — which names the `DINV_MOUNTS` guest paths —, disk size, a share's
//! writability, host CPU) is replaced by the boot's own. Bind mounts resume with the guest's
//! 9P fids reopened by path below each share's host directory, which may be another
//! directory than the saving run's (a new checkout): only the guest paths must match.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::DaemonConfig;
use crate::snapshot::{self, SnapshotError, SnapshotInfo};
use crate::VmHandle;

/// Attach order of the daemon's disks: root file system, docker disk, volume.
const DOCKER_DISK: usize = 1;
const VOLUME_DISK: usize = 2;

/// What this start does with the snapshot directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// No snapshot configured, or it cannot apply to this start.
    Off,
    /// Boot, then write a snapshot to this directory when dockerd is ready.
    Take(PathBuf),
    /// Resume the snapshot in this directory (disks not yet installed).
    Resume(PathBuf),
}

/// Decides what to do with `cfg.snapshot` before anything is created.
pub fn plan(cfg: &DaemonConfig) -> Plan {
    let Some(dir) = &cfg.snapshot else {
        return Plan::Off;
    };
    let existing = std::iter::once(&cfg.docker_image)
        .chain(cfg.volume.as_ref().map(|v| &v.image))
        .find(|p| p.exists());
    if let Some(p) = existing {
        tracing::info!("{} exists: booting (a snapshot only starts new disks)", p.display());
        return Plan::Off;
    }
    if !dir.join(snapshot::STATE_FILE).exists() {
        return Plan::Take(dir.clone());
    }
    // The disks' sizes are not on the kernel command line: compare them here.
    let sized = |index: usize, want: u64| {
        fs::metadata(snapshot::disk_file(dir, index)).map(|m| m.len() == want).unwrap_or(false)
    };
    let fits = sized(DOCKER_DISK, cfg.docker_size) && cfg.volume.as_ref().is_none_or(|v| sized(VOLUME_DISK, v.size));
    if fits {
        Plan::Resume(dir.clone())
    } else {
        tracing::info!("the snapshot in {} has other disk sizes: booting, then replacing it", dir.display());
        Plan::Take(dir.clone())
    }
}

/// An advisory lock beside a snapshot directory (`.NAME.lock` in its parent): shared while a
/// start reads the snapshot (state, disks, memory mapping), exclusive while a save swaps a new
/// one in — CI runners that share one snapshot volume must never resume half of one snapshot
/// and half of another. Released on drop.
#[derive(Debug)]
pub struct SnapshotLock(#[allow(dead_code)] fs::File);

/// Takes the lock of `dir` (blocking).
pub fn lock(dir: &Path, exclusive: bool) -> io::Result<SnapshotLock> {
    use std::os::fd::AsRawFd;
    let (parent, name) = snapshot::parent_and_name(dir);
    fs::create_dir_all(parent)?;
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(parent.join(format!(".{name}.lock")))?;
    let op = if exclusive { libc::LOCK_EX } else { libc::LOCK_SH };
    loop {
        // SAFETY: flock on an fd we own.
        if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
            return Ok(SnapshotLock(file));
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Puts the snapshot's docker disk (and volume) where the configuration wants them.
pub fn install(cfg: &DaemonConfig, dir: &Path) -> Result<(), SnapshotError> {
    let mut targets = vec![(DOCKER_DISK, &cfg.docker_image)];
    if let Some(v) = &cfg.volume {
        targets.push((VOLUME_DISK, &v.image));
    }
    for (index, path) in targets {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::create_dir_all(parent).map_err(|source| SnapshotError::Io { path: parent.to_path_buf(), source })?;
        }
        let copied = snapshot::install_disk(dir, index, path)?;
        tracing::debug!("{} from the snapshot ({} MiB copied)", path.display(), copied >> 20);
    }
    Ok(())
}

/// Removes the disks [`install`] created (the snapshot did not fit after all).
pub fn uninstall(cfg: &DaemonConfig) {
    for path in std::iter::once(&cfg.docker_image).chain(cfg.volume.as_ref().map(|v| &v.image)) {
        if let Err(e) = fs::remove_file(path) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!("cannot remove {}: {e}", path.display());
            }
        }
    }
}

/// Writes a snapshot of the running guest to `dir`, replacing what is there only once the new
/// one is complete.
pub fn save(handle: &VmHandle, dir: &Path) -> Result<SnapshotInfo, SnapshotError> {
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| SnapshotError::Io { path, source }
    };
    let (parent, name) = snapshot::parent_and_name(dir);
    fs::create_dir_all(parent).map_err(io_err(parent))?;
    let fresh = parent.join(format!(".{name}.new-{}", std::process::id()));
    let old = parent.join(format!(".{name}.old-{}", std::process::id()));
    let info = handle.snapshot(&fresh)?;
    let _lock = lock(dir, true).map_err(io_err(dir))?;
    if dir.exists() {
        fs::rename(dir, &old).map_err(io_err(dir))?;
    }
    fs::rename(&fresh, dir).map_err(io_err(dir))?;
    if old.exists() {
        if let Err(e) = fs::remove_dir_all(&old) {
            tracing::warn!("cannot remove the replaced snapshot {}: {e}", old.display());
        }
    }
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path) -> DaemonConfig {
        let mut cfg = DaemonConfig::new("/k", "/r");
        cfg.docker_image = dir.join("docker.img");
        cfg.docker_size = 1 << 30;
        cfg.snapshot = Some(dir.join("snap"));
        cfg
    }

    fn fake_snapshot(dir: &Path, docker_size: u64) {
        let snap = dir.join("snap");
        fs::create_dir_all(&snap).unwrap();
        fs::write(snap.join(snapshot::STATE_FILE), b"x").unwrap();
        fs::File::create(snapshot::disk_file(&snap, DOCKER_DISK)).unwrap().set_len(docker_size).unwrap();
    }

    #[test]
    fn plans() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path());
        assert_eq!(plan(&cfg), Plan::Take(dir.path().join("snap")), "nothing saved yet");
        fake_snapshot(dir.path(), 1 << 30);
        assert_eq!(plan(&cfg), Plan::Resume(dir.path().join("snap")));
        cfg.docker_size = 2 << 30;
        assert_eq!(plan(&cfg), Plan::Take(dir.path().join("snap")), "another docker disk size");
        cfg.docker_size = 1 << 30;
        cfg.mounts = crate::daemon::parse_mounts(&dir.path().display().to_string()).unwrap();
        assert_eq!(plan(&cfg), Plan::Resume(dir.path().join("snap")), "9P shares: the machine spec decides");
        cfg.mounts.clear();
        fs::write(&cfg.docker_image, b"").unwrap();
        assert_eq!(plan(&cfg), Plan::Off, "the docker disk exists");
        fs::remove_file(&cfg.docker_image).unwrap();
        cfg.snapshot = None;
        assert_eq!(plan(&cfg), Plan::Off);
    }

    #[test]
    fn readers_share_the_lock_and_a_swap_waits_for_them() {
        use std::os::fd::AsRawFd;
        let dir = tempfile::tempdir().unwrap();
        let snap = dir.path().join("snap");
        let a = lock(&snap, false).unwrap();
        let b = lock(&snap, false).unwrap();
        let probe = fs::File::open(dir.path().join(".snap.lock")).unwrap();
        // SAFETY: flock on an fd we own.
        let try_ex = || unsafe { libc::flock(probe.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        assert_ne!(try_ex(), 0, "a save must wait for readers");
        drop((a, b));
        assert_eq!(try_ex(), 0);
        // SAFETY: as above.
        unsafe { libc::flock(probe.as_raw_fd(), libc::LOCK_UN) };
        let w = lock(&snap, true).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let snap2 = snap.clone();
        let reader = std::thread::spawn(move || {
            let _r = lock(&snap2, false).unwrap();
            tx.send(()).unwrap();
        });
        assert!(rx.recv_timeout(std::time::Duration::from_millis(200)).is_err(), "a reader must wait for a swap");
        drop(w);
        rx.recv_timeout(std::time::Duration::from_secs(5)).unwrap();
        reader.join().unwrap();
    }

    #[test]
    fn install_and_uninstall_the_disks() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path());
        cfg.docker_image = dir.path().join("sub/docker.img");
        fake_snapshot(dir.path(), 1 << 30);
        install(&cfg, &dir.path().join("snap")).unwrap();
        assert_eq!(fs::metadata(&cfg.docker_image).unwrap().len(), 1 << 30);
        assert!(install(&cfg, &dir.path().join("snap")).is_err(), "never over an existing disk");
        uninstall(&cfg);
        assert!(!cfg.docker_image.exists());
    }
}
