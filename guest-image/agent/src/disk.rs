//! The docker disk (and extra volumes): probe, format once, mount.
//!
//! Rule: **never reformat data.** A device is formatted only when it is *blank*: no ext2/3/4
//! superblock magic (`0xEF53` at byte offset 0x438) and the first [`PROBE_LEN`] bytes all zero — a
//! fresh sparse file. A device with an ext filesystem is mounted as is (the ext4 journal replays an
//! unclean shutdown). Anything else (another filesystem, a partition table, leftovers) is
//! [`DiskState::Foreign`]: the agent refuses to touch it, logs why, and docker falls back to the
//! tmpfs-backed `/var` (nothing persists) until the host supplies a usable disk.
//!
//! Formatting runs `mkfs.ext4` with the arguments in `guest-image/mkfs-ext4.args` (shared with the
//! host daemon, which formats images it creates itself when it can: milliseconds on the host
//! against a minute in a PVM guest); the device is known to be zero, so nothing is discarded or
//! zeroed. Mounting uses
//! `-o discard,noinit_itable` so deleted images free host space and no background thread zeroes
//! inode tables into a sparse file.

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

#[cfg(test)]
mod tests;

/// Byte offset of the ext2/3/4 superblock magic (superblock at 1024 + `s_magic` at 0x38).
pub const EXT_MAGIC_OFFSET: usize = 0x438;
/// The ext2/3/4 magic, little-endian on disk.
pub const EXT_MAGIC: u16 = 0xEF53;
/// How much of the device start must be zero for it to count as blank (covers MBR/GPT, ext,
/// xfs, btrfs (64 KiB) and LVM/LUKS signatures).
pub const PROBE_LEN: usize = 1 << 20;

/// What a device holds, as far as the agent cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskState {
    /// ext2/3/4 superblock present: mount it.
    Ext4,
    /// All-zero probe area: safe to format.
    Blank,
    /// Data without an ext superblock: never touched.
    Foreign,
}

/// Classifies the start of a device (`buf` = its first bytes, up to [`PROBE_LEN`]; a device shorter
/// than that is passed whole).
pub fn classify(buf: &[u8]) -> DiskState {
    if buf.len() >= EXT_MAGIC_OFFSET + 2
        && u16::from_le_bytes([buf[EXT_MAGIC_OFFSET], buf[EXT_MAGIC_OFFSET + 1]]) == EXT_MAGIC
    {
        DiskState::Ext4
    } else if buf.iter().all(|&b| b == 0) {
        DiskState::Blank
    } else {
        DiskState::Foreign
    }
}

/// Reads the probe area of `dev` and classifies it.
pub fn probe(dev: &Path) -> io::Result<DiskState> {
    let mut f = File::open(dev)?;
    let mut buf = vec![0u8; PROBE_LEN];
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(n);
    Ok(classify(&buf))
}

/// Waits up to `timeout` for a device node to appear (devtmpfs is populated as drivers probe).
pub fn wait_for(dev: &Path, timeout: Duration) -> bool {
    let start = Instant::now();
    loop {
        if dev.exists() {
            return true;
        }
        if start.elapsed() >= timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The `mkfs.ext4` arguments shared with the host daemon, which formats the images it creates
/// itself when the host has `mkfs.ext4` (then the agent only ever sees [`DiskState::Ext4`]).
pub fn mkfs_args() -> impl Iterator<Item = &'static str> {
    include_str!("../../mkfs-ext4.args")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
}

/// Formats a blank device as ext4 with `label`. Callers must have seen [`DiskState::Blank`].
pub fn format(dev: &Path, label: &str) -> io::Result<()> {
    let status = Command::new("/sbin/mkfs.ext4")
        .args(mkfs_args())
        .args(["-L", label])
        .arg(dev)
        .status()?;
    if status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "mkfs.ext4 {} failed: {status}",
            dev.display()
        )))
    }
}

/// Makes sure `dev` holds an ext4 filesystem (formatting it only if blank) and mounts it on
/// `target` with `discard,noinit_itable`. Returns whether it was formatted now.
pub fn prepare_and_mount(dev: &Path, target: &Path, label: &str) -> io::Result<bool> {
    let formatted = match probe(dev)? {
        DiskState::Ext4 => false,
        DiskState::Blank => {
            crate::info!("{} is blank: formatting ext4 (label {label})", dev.display());
            let t = Instant::now();
            format(dev, label)?;
            crate::info!("formatted {} in {:.1}s", dev.display(), t.elapsed().as_secs_f64());
            true
        }
        DiskState::Foreign => {
            return Err(io::Error::other(format!(
                "{} holds data but no ext4 filesystem; refusing to format it (wipe it on the host to reuse)",
                dev.display()
            )))
        }
    };
    std::fs::create_dir_all(target)?;
    crate::sys::mount(Some(dev), target, "ext4", 0, Some("discard,noinit_itable"))?;
    Ok(formatted)
}
