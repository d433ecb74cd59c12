//! VM snapshots: a paused VM written to a directory, and a VM built from one.
//!
//! A snapshot directory holds:
//! - `memory`: guest RAM, its regions back to back; all-zero 64 KiB chunks are holes.
//! - `disk-N.img`: the Nth virtio-blk disk, when it is writable, as it was at the pause
//!   (a sparse copy or a reflink).
//! - `state`: a [`Snapshot`] (bincode): format version, the [`MachineSpec`] a restore must
//!   match, the KVM state ([`machine`]), the UART and every virtio-mmio transport.
//!
//! `state` is written last, after the other files are on disk, so a directory with a `state`
//! is complete; [`Vm::snapshot`](crate::Vm) writes into a temporary directory beside the
//! target and renames it into place.
//!
//! A restore maps `memory` copy-on-write (`MAP_PRIVATE`): pages are read when the guest first
//! touches them and the file is never written. The writable disks must hold what the snapshot's
//! `disk-N.img` hold ([`install_disk`]); read-only disks are checked by size and modification
//! time. Not saved: host-side connections — virtio-vsock tells the driver with a transport
//! reset, the netstack starts without flows — and 9P fids: a VM with virtio-9p shares cannot be
//! snapshotted.

pub mod machine;

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{Address, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap};

use boot::GuestMemoryMmap;
use devices::legacy::serial::SerialSnapshot;
use devices::virtio::mmio::MmioSnapshot;

pub use machine::{msr_indices, StateError, VcpuState, VmState};

/// Version of the `state` file's layout; a snapshot of another version is refused. 2: virtio
/// transports carry their device's own state (9P sessions).
pub const FORMAT_VERSION: u32 = 2;
/// The state file's name.
pub const STATE_FILE: &str = "state";
/// The memory file's name.
pub const MEMORY_FILE: &str = "memory";
/// Largest `state` file read: far above a real one (~11 KiB per vCPU and device set), so a
/// corrupt length prefix is an error, not a huge allocation.
const STATE_LIMIT: u64 = 16 << 20;
/// Granularity of holes in the memory file.
const CHUNK: usize = 64 << 10;
static ZEROS: [u8; CHUNK] = [0; CHUNK];

/// Errors reading or writing snapshots.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The state file is not a snapshot this dinv can read.
    #[error("{path}: not a dinv snapshot of format {FORMAT_VERSION}: {reason}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The snapshot was taken of a different machine.
    #[error("Snapshot taken with a different {what} ({found}; this VM: {expected})")]
    Mismatch {
        /// Which part differs.
        what: &'static str,
        /// The snapshot's.
        found: String,
        /// This VM's.
        expected: String,
    },
    /// The VM cannot be snapshotted.
    #[error("Cannot snapshot this VM: {0}")]
    Unsupported(String),
    /// KVM state could not be captured or restored.
    #[error(transparent)]
    State(#[from] StateError),
    /// A device's state could not be restored.
    #[error("Device state: {0}")]
    Device(String),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io { path: path.to_path_buf(), source }
}

/// Everything about the machine the guest relies on: a restore must describe the same.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineSpec {
    /// dinv's version (device state semantics).
    pub dinv: String,
    /// Guest RAM in bytes.
    pub memory: u64,
    /// vCPU count.
    pub vcpus: u8,
    /// The whole kernel command line (device windows, agent configuration).
    pub cmdline: String,
    /// One line per device, in attach order (type, disk size, read-only disks' identity).
    pub devices: Vec<String>,
    /// CPUID as given to vCPU 0 (a guest kernel patches itself for the features it saw).
    pub cpuid: Vec<[u32; 6]>,
}

impl MachineSpec {
    /// The first difference from `other` (the snapshot's), if any.
    pub fn check(&self, snap: &MachineSpec) -> Result<(), SnapshotError> {
        let mismatch = |what, found: String, expected: String| Err(SnapshotError::Mismatch { what, found, expected });
        if self.dinv != snap.dinv {
            return mismatch("dinv version", snap.dinv.clone(), self.dinv.clone());
        }
        if self.memory != snap.memory {
            return mismatch("memory size", snap.memory.to_string(), self.memory.to_string());
        }
        if self.vcpus != snap.vcpus {
            return mismatch("vCPU count", snap.vcpus.to_string(), self.vcpus.to_string());
        }
        if self.cmdline != snap.cmdline {
            return mismatch("kernel command line", snap.cmdline.clone(), self.cmdline.clone());
        }
        if self.devices != snap.devices {
            return mismatch("device list", snap.devices.join(", "), self.devices.join(", "));
        }
        if self.cpuid != snap.cpuid {
            let leaf = |l: Option<&[u32; 6]>| l.map_or("none".to_string(), |l| format!("leaf {:#x}.{}: {:08x?}", l[0], l[1], &l[2..]));
            let i = self.cpuid.iter().zip(&snap.cpuid).position(|(a, b)| a != b).unwrap_or(self.cpuid.len().min(snap.cpuid.len()));
            return mismatch("host CPU (CPUID)", leaf(snap.cpuid.get(i)), leaf(self.cpuid.get(i)));
        }
        Ok(())
    }
}

/// How a disk appears in [`MachineSpec::devices`]: its size, and for a read-only disk (whose
/// contents the guest's page cache holds) its modification time too.
pub fn describe_disk(path: &Path, read_only: bool) -> io::Result<String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path)?;
    Ok(if read_only {
        format!("blk ro {} bytes mtime {}.{:09}", meta.len(), meta.mtime(), meta.mtime_nsec())
    } else {
        format!("blk rw {} bytes", meta.len())
    })
}

/// The `state` file.
#[derive(Debug, Serialize, Deserialize)]
pub struct Snapshot {
    /// [`FORMAT_VERSION`].
    pub version: u32,
    /// What the guest saw.
    pub machine: MachineSpec,
    /// Guest RAM regions (guest address, length), in `memory` file order.
    pub regions: Vec<(u64, u64)>,
    /// Each vCPU.
    pub vcpus: Vec<VcpuState>,
    /// irqchip, PIT, clock.
    pub vm: VmState,
    /// COM1.
    pub serial: SerialSnapshot,
    /// Each virtio-mmio transport, in attach order.
    pub transports: Vec<MmioSnapshot>,
    /// Indices (attach order) of the disks saved as `disk-N.img`.
    pub saved_disks: Vec<usize>,
}

/// The `state` file's encoding: fixed-width integers, at most [`STATE_LIMIT`] bytes.
fn codec() -> impl bincode::Options {
    use bincode::Options;
    bincode::DefaultOptions::new().with_fixint_encoding().allow_trailing_bytes().with_limit(STATE_LIMIT)
}

impl Snapshot {
    /// Reads `dir/state`.
    pub fn load(dir: &Path) -> Result<Self, SnapshotError> {
        use bincode::Options;
        let path = dir.join(STATE_FILE);
        let len = std::fs::metadata(&path).map_err(io_err(&path))?.len();
        if len > STATE_LIMIT {
            return Err(SnapshotError::Format { path, reason: format!("{len} bytes") });
        }
        let bytes = std::fs::read(&path).map_err(io_err(&path))?;
        // The version comes first; check it before decoding the rest.
        let version: u32 = codec()
            .deserialize(&bytes)
            .map_err(|e| SnapshotError::Format { path: path.clone(), reason: e.to_string() })?;
        if version != FORMAT_VERSION {
            return Err(SnapshotError::Format { path, reason: format!("format {version}") });
        }
        codec().deserialize(&bytes).map_err(|e| SnapshotError::Format { path, reason: e.to_string() })
    }

    /// Writes `dir/state` and flushes it.
    pub fn store(&self, dir: &Path) -> Result<(), SnapshotError> {
        use bincode::Options;
        let path = dir.join(STATE_FILE);
        let bytes = codec()
            .serialize(self)
            .map_err(|e| SnapshotError::Format { path: path.clone(), reason: e.to_string() })?;
        let file = File::create(&path).map_err(io_err(&path))?;
        file.write_all_at(&bytes, 0).map_err(io_err(&path))?;
        file.sync_all().map_err(io_err(&path))
    }
}

/// What [`VmHandle::snapshot`](crate::VmHandle::snapshot) did.
#[derive(Clone, Debug, Default)]
pub struct SnapshotInfo {
    /// How long the guest stood still.
    pub paused: std::time::Duration,
    /// Guest RAM in the memory file (holes excluded), bytes.
    pub memory_bytes: u64,
    /// Writable disks saved.
    pub disks: usize,
    /// Disk data copied (0 for reflinks), bytes.
    pub disk_bytes: u64,
}

impl std::fmt::Display for SnapshotInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "guest paused {:.2}s, {} MiB of memory, {} disk(s) with {} MiB of data",
            self.paused.as_secs_f64(),
            self.memory_bytes >> 20,
            self.disks,
            self.disk_bytes >> 20
        )
    }
}

/// The directory a snapshot directory `dir` lives in, and `dir`'s name: its temporary and lock
/// files are hidden siblings (`.NAME.…`), on the same filesystem so a rename swaps them in.
pub fn parent_and_name(dir: &Path) -> (&Path, String) {
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = dir.file_name().map_or_else(|| "snapshot".into(), |n| n.to_string_lossy().into_owned());
    (parent, name)
}

/// The file of the `index`th disk in a snapshot directory.
pub fn disk_file(dir: &Path, index: usize) -> PathBuf {
    dir.join(format!("disk-{index}.img"))
}

/// Writes guest RAM to `path` (all-zero chunks stay holes); returns the regions written and
/// the bytes of data. The guest must not be running.
pub fn write_memory(mem: &GuestMemoryMmap, path: &Path) -> Result<(Vec<(u64, u64)>, u64), SnapshotError> {
    let file = File::create(path).map_err(io_err(path))?;
    let total: u64 = mem.iter().map(|r| r.len()).sum();
    file.set_len(total).map_err(io_err(path))?;
    let mut regions = Vec::new();
    let mut offset = 0u64;
    let mut data = 0u64;
    for region in mem.iter() {
        let host = mem
            .get_host_address(region.start_addr())
            .map_err(|e| SnapshotError::Unsupported(format!("guest memory: {e}")))?;
        let len = usize::try_from(region.len()).map_err(|_| SnapshotError::Unsupported("region too large".into()))?;
        // SAFETY: `host..host+len` is this region's live mapping, owned by `mem` for the whole
        // call; no vCPU runs and no device touches guest memory while a snapshot is written.
        let bytes = unsafe { std::slice::from_raw_parts(host.cast_const(), len) };
        for (i, chunk) in bytes.chunks(CHUNK).enumerate() {
            // Slice equality is a memcmp: fast even in debug builds.
            if chunk != &ZEROS[..chunk.len()] {
                file.write_all_at(chunk, offset + (i * CHUNK) as u64).map_err(io_err(path))?;
                data += chunk.len() as u64;
            }
        }
        regions.push((region.start_addr().raw_value(), region.len()));
        offset += region.len();
    }
    file.sync_all().map_err(io_err(path))?;
    Ok((regions, data))
}

/// Maps `path` as guest RAM laid out as `regions`, copy-on-write: the guest's writes never
/// reach the file.
pub fn map_memory(path: &Path, regions: &[(u64, u64)]) -> Result<GuestMemoryMmap, SnapshotError> {
    let file = File::open(path).map_err(io_err(path))?;
    let total: u64 = regions.iter().map(|r| r.1).sum();
    let len = file.metadata().map_err(io_err(path))?.len();
    if len != total {
        return Err(SnapshotError::Format {
            path: path.to_path_buf(),
            reason: format!("{len} bytes, the regions need {total}"),
        });
    }
    let mut mapped = Vec::with_capacity(regions.len());
    let mut offset = 0u64;
    for &(start, size) in regions {
        let size_usize = usize::try_from(size).map_err(|_| SnapshotError::Unsupported("region too large".into()))?;
        let fd = file.try_clone().map_err(io_err(path))?;
        let mapping = MmapRegionBuilder::new(size_usize)
            .with_file_offset(FileOffset::new(fd, offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| SnapshotError::Io { path: path.to_path_buf(), source: io::Error::other(e.to_string()) })?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(start))
            .ok_or_else(|| SnapshotError::Format { path: path.to_path_buf(), reason: "region overflows".into() })?;
        mapped.push(region);
        offset += size;
    }
    GuestMemoryMmap::from_regions(mapped).map_err(|e| SnapshotError::Format {
        path: path.to_path_buf(),
        reason: format!("regions: {e}"),
    })
}

/// Copies `src` to a new file `dst` without filling holes: a reflink where the filesystem has
/// them, else the data extents only. Returns the bytes of data copied (0 for a reflink).
pub fn copy_sparse(src: &Path, dst: &Path) -> io::Result<u64> {
    let from = File::open(src)?;
    let len = from.metadata()?.len();
    let to = OpenOptions::new().write(true).create_new(true).open(dst)?;
    // SAFETY: FICLONE takes the source fd as its argument; both fds are open.
    if unsafe { libc::ioctl(to.as_raw_fd(), libc::FICLONE, from.as_raw_fd()) } == 0 {
        return Ok(0);
    }
    to.set_len(len)?;
    let mut copied = 0u64;
    let mut pos: i64 = 0;
    let end = i64::try_from(len).map_err(|_| io::Error::other("file too large"))?;
    while pos < end {
        // SAFETY: lseek on an open fd.
        let data = unsafe { libc::lseek(from.as_raw_fd(), pos, libc::SEEK_DATA) };
        if data < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // only a hole is left
            }
            return Err(e);
        }
        // SAFETY: lseek on an open fd.
        let hole = unsafe { libc::lseek(from.as_raw_fd(), data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(io::Error::last_os_error());
        }
        let (mut off_in, mut off_out) = (data, data);
        while off_in < hole {
            let want = usize::try_from(hole - off_in).unwrap_or(usize::MAX).min(1 << 30);
            // SAFETY: both fds are open; the offsets are ours.
            let n = unsafe {
                libc::copy_file_range(from.as_raw_fd(), &mut off_in, to.as_raw_fd(), &mut off_out, want, 0)
            };
            match n {
                n if n > 0 => copied += n as u64,
                0 => return Err(io::Error::other("copy_file_range: source ended early")),
                _ => return Err(io::Error::last_os_error()),
            }
        }
        pos = hole;
    }
    to.sync_all()?;
    Ok(copied)
}

/// Puts the snapshot's copy of disk `index` at `dst` (which must not exist yet).
pub fn install_disk(dir: &Path, index: usize, dst: &Path) -> Result<u64, SnapshotError> {
    let src = disk_file(dir, index);
    copy_sparse(&src, dst).map_err(|source| SnapshotError::Io { path: dst.to_path_buf(), source })
}

#[cfg(test)]
mod tests;
