//! The raw-file backend of virtio-blk (§5.2.6 request semantics, host side).
//!
//! Positional reads and writes go straight between the file and guest memory slices (no
//! bounce buffer). DISCARD punches holes (`FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE`) so
//! sparse images stay sparse; WRITE_ZEROES punches when the driver allows unmapping and
//! otherwise uses `FALLOC_FL_ZERO_RANGE`, falling back to punching or writing zeros where
//! the file system (tmpfs/memfd, …) lacks a mode. Handles no events.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::io::AsRawFd;

use tracing::warn;
use virtio_bindings::virtio_blk::VIRTIO_BLK_ID_BYTES;
use vm_memory::VolatileSlice;

use super::{BlockConfig, BlockError, SECTOR_SHIFT};

const ID_BYTES: usize = VIRTIO_BLK_ID_BYTES as usize;

/// An open disk image.
#[derive(Debug)]
pub struct Disk {
    file: File,
    capacity_sectors: u64,
    read_only: bool,
    id: Vec<u8>,
}

impl Disk {
    /// Open `config.path` (read-only if `config.read_only`).
    pub fn open(config: &BlockConfig) -> Result<Self, BlockError> {
        let file = OpenOptions::new()
            .read(true)
            .write(!config.read_only)
            .open(&config.path)
            .map_err(|source| BlockError::Open {
                path: config.path.clone(),
                source,
            })?;
        Self::from_file(file, config)
    }

    /// Use an already open file (a memfd, say); `config.path` is only informative.
    pub fn from_file(file: File, config: &BlockConfig) -> Result<Self, BlockError> {
        let meta = file.metadata().map_err(BlockError::Metadata)?;
        let len = meta.len();
        if len % (1 << SECTOR_SHIFT) != 0 {
            warn!(
                path = %config.path.display(),
                len, "virtio-blk: image size is not a multiple of 512, the tail is ignored"
            );
        }
        let id = match &config.id {
            Some(id) if id.len() > ID_BYTES => return Err(BlockError::IdTooLong(id.len())),
            Some(id) => id.as_bytes().to_vec(),
            None => {
                let mut id = format!("{:x}{:x}", meta.dev(), meta.ino()).into_bytes();
                id.truncate(ID_BYTES);
                id
            }
        };
        Ok(Self {
            file,
            capacity_sectors: len >> SECTOR_SHIFT,
            read_only: config.read_only,
            id,
        })
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.capacity_sectors
    }

    /// Whether writes are refused.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The GET_ID serial (at most 20 bytes, not NUL-terminated when 20 bytes long).
    pub fn id(&self) -> &[u8] {
        &self.id
    }

    /// Fill `bufs` from the file starting at byte `offset`. Returns the bytes read.
    pub fn read_at(&self, bufs: &[VolatileSlice<'_>], mut offset: u64) -> io::Result<u64> {
        let mut total = 0u64;
        for buf in bufs {
            let guard = buf.ptr_guard_mut();
            let base = guard.as_ptr();
            let len = buf.len();
            let mut done = 0usize;
            while done < len {
                let off = file_offset(offset)?;
                // SAFETY: `base..base + len` is guest memory mapped for as long as `guard`
                // lives; the kernel writes at most `len - done` bytes starting at
                // `base + done`, which stays inside it. Guest memory is plain bytes, so any
                // content is valid.
                let ret = unsafe {
                    libc::pread(
                        self.file.as_raw_fd(),
                        base.add(done).cast(),
                        len - done,
                        off,
                    )
                };
                let Some(n) = check_io(ret)? else { continue };
                if n == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                done += n;
                offset += n as u64;
            }
            total += len as u64;
        }
        Ok(total)
    }

    /// Write `bufs` to the file starting at byte `offset`. Returns the bytes written.
    pub fn write_at(&self, bufs: &[VolatileSlice<'_>], mut offset: u64) -> io::Result<u64> {
        let mut total = 0u64;
        for buf in bufs {
            let guard = buf.ptr_guard();
            let base = guard.as_ptr();
            let len = buf.len();
            let mut done = 0usize;
            while done < len {
                let off = file_offset(offset)?;
                // SAFETY: `base..base + len` is guest memory mapped for as long as `guard`
                // lives; the kernel reads at most `len - done` bytes starting at
                // `base + done`, which stays inside it.
                let ret = unsafe {
                    libc::pwrite(
                        self.file.as_raw_fd(),
                        base.add(done).cast(),
                        len - done,
                        off,
                    )
                };
                let Some(n) = check_io(ret)? else { continue };
                if n == 0 {
                    return Err(io::ErrorKind::WriteZero.into());
                }
                done += n;
                offset += n as u64;
            }
            total += len as u64;
        }
        Ok(total)
    }

    /// Make written data durable (`fdatasync`).
    pub fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Deallocate `len` bytes at `offset`. Discard is advisory: an unsupported file system
    /// is not an error.
    pub fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        match self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        ) {
            Err(e) if is_unsupported(&e) => Ok(()),
            other => other,
        }
    }

    /// Make `len` bytes at `offset` read as zeros, deallocating them if `unmap`.
    pub fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        const PUNCH: libc::c_int = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        const ZERO: libc::c_int = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
        let modes = if unmap { [PUNCH, ZERO] } else { [ZERO, PUNCH] };
        for mode in modes {
            match self.fallocate(mode, offset, len) {
                Err(e) if is_unsupported(&e) => continue,
                other => return other,
            }
        }
        self.write_zero_bytes(offset, len)
    }

    fn write_zero_bytes(&self, mut offset: u64, len: u64) -> io::Result<()> {
        const CHUNK: usize = 64 * 1024;
        let zeros = vec![0u8; CHUNK];
        let end = offset.checked_add(len).ok_or(io::ErrorKind::InvalidInput)?;
        while offset < end {
            let n = usize::try_from(end - offset).map_or(CHUNK, |rem| rem.min(CHUNK));
            self.file.write_all_at(&zeros[..n], offset)?;
            offset += n as u64;
        }
        Ok(())
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        let off = file_offset(offset)?;
        let len = file_offset(len)?;
        loop {
            // SAFETY: fallocate only reads its integer arguments; the fd is owned by `self`.
            let ret = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off, len) };
            if ret == 0 {
                return Ok(());
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }
}

fn file_offset(offset: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput.into())
}

/// Map a read/write syscall return value; `None` means `EINTR`, retry.
fn check_io(ret: isize) -> io::Result<Option<usize>> {
    if ret >= 0 {
        return Ok(Some(ret.unsigned_abs()));
    }
    let err = io::Error::last_os_error();
    if err.kind() == io::ErrorKind::Interrupted {
        return Ok(None);
    }
    Err(err)
}

fn is_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL)
    )
}
