//! File data straight between host files and guest buffers: the [`p9::DirectIo`] of one
//! descriptor chain.
//!
//! A `Twrite` payload is handed to `pwritev` as iovecs over the chain's device-readable
//! buffers, an `Rread`'s data is read by `preadv` into its device-writable buffers; neither
//! passes through the 9P server's own buffers. The buffers are the same guest memory the
//! chain's [`virtio_queue::Reader`]/[`virtio_queue::Writer`] cover (built the same way:
//! readable descriptors up to the first writable one, then every writable one), so
//! positions agree with what those wrote and read.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use vm_memory::{GuestMemory, Permissions, VolatileSlice};

use super::worker::Chain;

/// Most iovecs one `preadv`/`pwritev` takes (`IOV_MAX` on Linux).
const IOV_MAX: usize = 1024;

/// Errors collecting a chain's buffers.
#[derive(Debug, thiserror::Error)]
pub enum ChainIoError {
    /// A descriptor's buffer is not in guest memory.
    #[error("Descriptor buffer outside guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
    /// The buffers' lengths add up to more than the address space.
    #[error("Descriptor chain length overflows")]
    Overflow,
}

/// One chain's guest buffers, for [`p9::Server::handle_direct`].
#[derive(Debug)]
pub struct ChainIo<'a> {
    readable: Vec<VolatileSlice<'a>>,
    writable: Vec<VolatileSlice<'a>>,
    /// Request payload bytes written to files (for the metrics).
    pub written: usize,
}

impl<'a> ChainIo<'a> {
    /// Collect `chain`'s buffers in `mem`.
    pub fn new<M: GuestMemory<Bitmap = ()>>(
        mem: &'a M,
        chain: &Chain,
    ) -> Result<Self, ChainIoError> {
        Ok(Self {
            readable: slices(mem, chain.clone().readable(), Permissions::Read)?,
            writable: slices(mem, chain.clone().writable(), Permissions::Write)?,
            written: 0,
        })
    }
}

fn slices<'a, M: GuestMemory<Bitmap = ()>>(
    mem: &'a M,
    descs: impl Iterator<Item = virtio_queue::desc::split::Descriptor>,
    access: Permissions,
) -> Result<Vec<VolatileSlice<'a>>, ChainIoError> {
    let mut total = 0usize;
    let mut out = Vec::new();
    for desc in descs {
        total = total
            .checked_add(desc.len() as usize)
            .ok_or(ChainIoError::Overflow)?;
        for slice in mem.get_slices(desc.addr(), desc.len() as usize, access)? {
            out.push(slice?);
        }
    }
    Ok(out)
}

/// iovecs for bytes `at..at + len` of `bufs` (fewer if the buffers end first).
fn iovecs(bufs: &[VolatileSlice<'_>], mut at: usize, mut len: usize) -> Vec<libc::iovec> {
    let mut out = Vec::new();
    for vs in bufs {
        if len == 0 {
            break;
        }
        if at >= vs.len() {
            at -= vs.len();
            continue;
        }
        let n = (vs.len() - at).min(len);
        out.push(libc::iovec {
            // The slice is `vs.len()` bytes of mapped guest memory (bitmap `()`: the guard
            // only exists for Xen mappings), so `at..at + n` is in bounds.
            iov_base: vs.ptr_guard_mut().as_ptr().wrapping_add(at).cast(),
            iov_len: n,
        });
        at = 0;
        len -= n;
    }
    out
}

/// `preadv`/`pwritev` over `iov` (not empty) in batches of [`IOV_MAX`], stopping at the first
/// short transfer. An error after some progress ends the transfer short instead.
fn transfer(
    fd: BorrowedFd<'_>,
    iov: &[libc::iovec],
    mut offset: u64,
    op: unsafe extern "C" fn(
        libc::c_int,
        *const libc::iovec,
        libc::c_int,
        libc::off64_t,
    ) -> libc::ssize_t,
) -> io::Result<usize> {
    let mut done = 0usize;
    for batch in iov.chunks(IOV_MAX) {
        let want: usize = batch.iter().map(|v| v.iov_len).sum();
        let n = match transfer_batch(fd, batch, offset, op) {
            Ok(n) => n,
            Err(_) if done > 0 => return Ok(done),
            Err(e) => return Err(e),
        };
        done += n;
        offset += n as u64;
        if n < want {
            break;
        }
    }
    Ok(done)
}

/// One `preadv`/`pwritev` call (at most [`IOV_MAX`] iovecs), retried on `EINTR`.
fn transfer_batch(
    fd: BorrowedFd<'_>,
    batch: &[libc::iovec],
    offset: u64,
    op: unsafe extern "C" fn(
        libc::c_int,
        *const libc::iovec,
        libc::c_int,
        libc::off64_t,
    ) -> libc::ssize_t,
) -> io::Result<usize> {
    let off =
        libc::off64_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    loop {
        // SAFETY: every iovec points into guest memory that the chain's `Arc`'d mapping keeps
        // mapped for the duration of the call (or is empty); batch.len() <= IOV_MAX fits c_int.
        let r = unsafe {
            op(
                fd.as_raw_fd(),
                batch.as_ptr(),
                batch.len() as libc::c_int,
                off,
            )
        };
        if r >= 0 {
            return Ok(r as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// A zero-length `pread`/`pwrite`: nothing moves, but the fd and offset are checked exactly
/// as the copying path's call checks them (`EBADF` for the wrong access mode, `EISDIR`,
/// `EINVAL`), so both paths answer alike.
fn nothing(fd: BorrowedFd<'_>, offset: u64, write: bool) -> io::Result<usize> {
    let off =
        libc::off64_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let mut none = [0u8; 0];
    // SAFETY: zero bytes are read or written.
    let r = unsafe {
        if write {
            libc::pwrite64(fd.as_raw_fd(), none.as_ptr().cast(), 0, off)
        } else {
            libc::pread64(fd.as_raw_fd(), none.as_mut_ptr().cast(), 0, off)
        }
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(0)
}

impl p9::DirectIo for ChainIo<'_> {
    fn request_len(&self) -> usize {
        self.readable.iter().map(|vs| vs.len()).sum()
    }

    fn request_to_file(
        &mut self,
        at: usize,
        len: usize,
        fd: BorrowedFd<'_>,
        offset: u64,
    ) -> io::Result<usize> {
        let iov = iovecs(&self.readable, at, len);
        if iov.iter().map(|v| v.iov_len).sum::<usize>() != len {
            // The chain holds less than the message says: a truncated message, as the
            // copying path would find.
            return Err(io::Error::from_raw_os_error(libc::EPROTO));
        }
        if iov.is_empty() {
            return nothing(fd, offset, true);
        }
        let n = transfer(fd, &iov, offset, libc::pwritev64)?;
        self.written += n;
        Ok(n)
    }

    fn file_to_reply(
        &mut self,
        at: usize,
        len: usize,
        fd: BorrowedFd<'_>,
        offset: u64,
    ) -> io::Result<usize> {
        let iov = iovecs(&self.writable, at, len);
        if iov.is_empty() {
            return nothing(fd, offset, false);
        }
        transfer(fd, &iov, offset, libc::preadv64)
    }
}
