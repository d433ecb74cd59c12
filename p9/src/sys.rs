//! Thin, safe wrappers over the Linux `*at` system calls the server uses.
//!
//! Every call that takes a name takes it relative to a directory fd and
//! never follows a symlink in the final component (`O_NOFOLLOW`,
//! `AT_SYMLINK_NOFOLLOW`, or a call that never follows). Calls that need a
//! path for an inode we already hold (chmod, truncate, utimes, xattrs) go
//! through `/proc/self/fd/N`, which the kernel resolves to that exact inode
//! (a "magic link"), never to a path the guest can influence; callers only
//! do this for fds that are not symlinks.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn cvt_size(ret: libc::ssize_t) -> io::Result<usize> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

const EMPTY: &CStr = c"";

/// `/proc/self/fd/N` for an fd we own.
pub(crate) fn proc_path(fd: BorrowedFd<'_>) -> CString {
    // The formatted number never contains a NUL byte.
    CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap_or_default()
}

/// `openat(2)`; `O_CLOEXEC` is always added.
pub(crate) fn openat(dir: RawFd, name: &CStr, flags: i32, mode: u32) -> io::Result<OwnedFd> {
    // SAFETY: `name` is a valid NUL-terminated string; the returned fd is new and owned by us.
    let fd = cvt(unsafe { libc::openat(dir, name.as_ptr(), flags | libc::O_CLOEXEC, mode) })?;
    // SAFETY: `fd` was just returned by openat and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `O_PATH|O_NOFOLLOW` handle on `name` inside `dir`.
pub(crate) fn open_path_at(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<OwnedFd> {
    openat(dir.as_raw_fd(), name, libc::O_PATH | libc::O_NOFOLLOW, 0)
}

/// Reopen the inode behind an `O_PATH` fd with real open flags. The caller has
/// checked that `fd` is not a symlink.
pub(crate) fn reopen(fd: BorrowedFd<'_>, flags: i32) -> io::Result<OwnedFd> {
    openat(libc::AT_FDCWD, &proc_path(fd), flags & !libc::O_CREAT, 0)
}

/// `fstatat(fd, "", AT_EMPTY_PATH|AT_SYMLINK_NOFOLLOW)`: works on `O_PATH` fds.
pub(crate) fn fstat(fd: BorrowedFd<'_>) -> io::Result<libc::stat64> {
    fstatat(fd, EMPTY, libc::AT_EMPTY_PATH)
}

/// `fstatat(dir, name, AT_SYMLINK_NOFOLLOW | extra)`.
pub(crate) fn fstatat(dir: BorrowedFd<'_>, name: &CStr, extra: i32) -> io::Result<libc::stat64> {
    let mut st = std::mem::MaybeUninit::<libc::stat64>::zeroed();
    // SAFETY: `st` is a valid out-pointer of the right type and `name` is NUL-terminated.
    cvt(unsafe {
        libc::fstatat64(
            dir.as_raw_fd(),
            name.as_ptr(),
            st.as_mut_ptr(),
            libc::AT_SYMLINK_NOFOLLOW | extra,
        )
    })?;
    // SAFETY: fstatat succeeded, so it filled `st` (and it was zeroed before anyway).
    Ok(unsafe { st.assume_init() })
}

/// `fstatfs(2)` (works on `O_PATH` fds).
pub(crate) fn fstatfs(fd: BorrowedFd<'_>) -> io::Result<libc::statfs64> {
    let mut st = std::mem::MaybeUninit::<libc::statfs64>::zeroed();
    // SAFETY: valid fd and out-pointer.
    cvt(unsafe { libc::fstatfs64(fd.as_raw_fd(), st.as_mut_ptr()) })?;
    // SAFETY: fstatfs succeeded and filled `st` (zeroed before anyway).
    Ok(unsafe { st.assume_init() })
}

/// `pread(2)` of up to `count` bytes appended to `out` without zero-filling.
pub(crate) fn pread_append(
    fd: BorrowedFd<'_>,
    out: &mut Vec<u8>,
    count: usize,
    offset: u64,
) -> io::Result<usize> {
    let offset = i64::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    out.reserve(count);
    let spare = out.spare_capacity_mut();
    let count = count.min(spare.len());
    // SAFETY: `spare` has room for `count` bytes; the kernel writes at most that many.
    let n = cvt_size(unsafe {
        libc::pread64(fd.as_raw_fd(), spare.as_mut_ptr().cast(), count, offset)
    })?;
    let len = out.len() + n.min(count);
    // SAFETY: the kernel initialised the first `n <= count` spare bytes.
    unsafe { out.set_len(len) };
    Ok(n)
}

/// `pwrite(2)`.
pub(crate) fn pwrite(fd: BorrowedFd<'_>, data: &[u8], offset: u64) -> io::Result<usize> {
    let offset = i64::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: `data` is a valid readable buffer of its length.
    cvt_size(unsafe { libc::pwrite64(fd.as_raw_fd(), data.as_ptr().cast(), data.len(), offset) })
}

/// `mkdirat(2)`.
pub(crate) fn mkdirat(dir: BorrowedFd<'_>, name: &CStr, mode: u32) -> io::Result<()> {
    // SAFETY: `name` is NUL-terminated.
    cvt(unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), mode) }).map(drop)
}

/// `symlinkat(2)`.
pub(crate) fn symlinkat(target: &CStr, dir: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    // SAFETY: both strings are NUL-terminated.
    cvt(unsafe { libc::symlinkat(target.as_ptr(), dir.as_raw_fd(), name.as_ptr()) }).map(drop)
}

/// `mknodat(2)`.
pub(crate) fn mknodat(dir: BorrowedFd<'_>, name: &CStr, mode: u32, dev: u64) -> io::Result<()> {
    // SAFETY: `name` is NUL-terminated.
    cvt(unsafe { libc::mknodat(dir.as_raw_fd(), name.as_ptr(), mode, dev) }).map(drop)
}

/// `renameat(2)`.
pub(crate) fn renameat(
    olddir: BorrowedFd<'_>,
    old: &CStr,
    newdir: BorrowedFd<'_>,
    new: &CStr,
) -> io::Result<()> {
    // SAFETY: both names are NUL-terminated.
    cvt(unsafe {
        libc::renameat(
            olddir.as_raw_fd(),
            old.as_ptr(),
            newdir.as_raw_fd(),
            new.as_ptr(),
        )
    })
    .map(drop)
}

/// `unlinkat(2)`.
pub(crate) fn unlinkat(dir: BorrowedFd<'_>, name: &CStr, flags: i32) -> io::Result<()> {
    // SAFETY: `name` is NUL-terminated.
    cvt(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), flags) }).map(drop)
}

/// `linkat(2)` without following symlinks.
pub(crate) fn linkat(
    olddir: BorrowedFd<'_>,
    old: &CStr,
    newdir: BorrowedFd<'_>,
    new: &CStr,
) -> io::Result<()> {
    // SAFETY: both names are NUL-terminated; flags 0 never follows a symlink.
    cvt(unsafe {
        libc::linkat(
            olddir.as_raw_fd(),
            old.as_ptr(),
            newdir.as_raw_fd(),
            new.as_ptr(),
            0,
        )
    })
    .map(drop)
}

/// `readlinkat(fd, "")` on an `O_PATH` symlink fd.
pub(crate) fn readlink(fd: BorrowedFd<'_>) -> io::Result<Vec<u8>> {
    readlinkat(fd.as_raw_fd(), EMPTY)
}

/// The host path of the inode behind `fd` (its `/proc/self/fd` link).
pub(crate) fn fd_path(fd: BorrowedFd<'_>) -> io::Result<Vec<u8>> {
    readlinkat(libc::AT_FDCWD, &proc_path(fd))
}

fn readlinkat(dir: RawFd, name: &CStr) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
    // SAFETY: `name` is NUL-terminated and `buf` is writable for its length.
    let n = cvt_size(unsafe {
        libc::readlinkat(dir, name.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
    })?;
    buf.truncate(n);
    Ok(buf)
}

/// `chmod` of the inode behind `fd` (not a symlink).
pub(crate) fn chmod_fd(fd: BorrowedFd<'_>, mode: u32) -> io::Result<()> {
    let p = proc_path(fd);
    // SAFETY: `p` is NUL-terminated.
    cvt(unsafe { libc::fchmodat(libc::AT_FDCWD, p.as_ptr(), mode, 0) }).map(drop)
}

/// `fchownat(fd, "", AT_EMPTY_PATH|AT_SYMLINK_NOFOLLOW)`; `u32::MAX` keeps a field.
pub(crate) fn chown_fd(fd: BorrowedFd<'_>, uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: empty NUL-terminated path with AT_EMPTY_PATH operates on `fd` itself.
    cvt(unsafe {
        libc::fchownat(
            fd.as_raw_fd(),
            EMPTY.as_ptr(),
            uid,
            gid,
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(drop)
}

/// `utimensat(dir, name, times, AT_SYMLINK_NOFOLLOW)`.
pub(crate) fn utimensat(
    dir: RawFd,
    name: &CStr,
    times: &[libc::timespec; 2],
    nofollow: bool,
) -> io::Result<()> {
    let flags = if nofollow {
        libc::AT_SYMLINK_NOFOLLOW
    } else {
        0
    };
    // SAFETY: `name` is NUL-terminated and `times` points to two timespecs.
    cvt(unsafe { libc::utimensat(dir, name.as_ptr(), times.as_ptr(), flags) }).map(drop)
}

/// `truncate` of the inode behind `fd` (a regular file).
pub(crate) fn truncate_fd(fd: BorrowedFd<'_>, size: u64) -> io::Result<()> {
    let size = i64::try_from(size).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let p = proc_path(fd);
    // SAFETY: `p` is NUL-terminated.
    cvt(unsafe { libc::truncate64(p.as_ptr(), size) }).map(drop)
}

/// `ftruncate(2)` on an fd open for writing.
pub(crate) fn ftruncate(fd: BorrowedFd<'_>, size: u64) -> io::Result<()> {
    let size = i64::try_from(size).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: plain syscall on a valid fd.
    cvt(unsafe { libc::ftruncate64(fd.as_raw_fd(), size) }).map(drop)
}

/// `fsync(2)` or `fdatasync(2)`.
pub(crate) fn fsync(fd: BorrowedFd<'_>, datasync: bool) -> io::Result<()> {
    // SAFETY: plain syscalls on a valid fd.
    cvt(unsafe {
        if datasync {
            libc::fdatasync(fd.as_raw_fd())
        } else {
            libc::fsync(fd.as_raw_fd())
        }
    })
    .map(drop)
}

/// `lseek(fd, off, SEEK_SET)` with a raw directory cookie.
pub(crate) fn seek_dir(fd: BorrowedFd<'_>, off: u64) -> io::Result<()> {
    // SAFETY: plain syscall on a valid fd; directory offsets are opaque cookies.
    let r = unsafe { libc::lseek64(fd.as_raw_fd(), off as i64, libc::SEEK_SET) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `getdents64(2)` into `buf`; returns the bytes filled.
pub(crate) fn getdents64(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is writable for its length; the kernel writes at most that much.
    let r = unsafe {
        libc::syscall(
            libc::SYS_getdents64,
            fd.as_raw_fd(),
            buf.as_mut_ptr(),
            buf.len(),
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// `fcntl(fd, cmd, &flock)` for OFD locks.
pub(crate) fn fcntl_lock(fd: BorrowedFd<'_>, cmd: i32, fl: &mut libc::flock64) -> io::Result<()> {
    // SAFETY: `fl` is a valid flock64 for the duration of the call.
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), cmd, fl as *mut libc::flock64) }).map(drop)
}

fn xattr_buf(mut call: impl FnMut(*mut libc::c_void, usize) -> isize) -> io::Result<Vec<u8>> {
    for _ in 0..4 {
        let size = cvt_size(call(std::ptr::null_mut(), 0))?;
        let mut buf = vec![0u8; size];
        match cvt_size(call(buf.as_mut_ptr().cast(), buf.len())) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            // The value grew between the two calls: try again.
            Err(e) if e.raw_os_error() == Some(libc::ERANGE) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::from_raw_os_error(libc::ERANGE))
}

/// All xattr names of the inode behind `fd` (not a symlink).
pub(crate) fn listxattr_fd(fd: BorrowedFd<'_>) -> io::Result<Vec<u8>> {
    let p = proc_path(fd);
    // SAFETY: `p` is NUL-terminated; the buffer pointer/len pair comes from `xattr_buf`.
    xattr_buf(|b, n| unsafe { libc::listxattr(p.as_ptr(), b.cast(), n) })
}

/// The value of xattr `name` of the inode behind `fd` (not a symlink).
pub(crate) fn getxattr_fd(fd: BorrowedFd<'_>, name: &CStr) -> io::Result<Vec<u8>> {
    let p = proc_path(fd);
    // SAFETY: both strings are NUL-terminated; the buffer pointer/len pair comes from `xattr_buf`.
    xattr_buf(|b, n| unsafe { libc::getxattr(p.as_ptr(), name.as_ptr(), b, n) })
}

/// The process umask, read from `/proc/self/status` (no racy `umask(2)` dance).
pub(crate) fn current_umask() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Umask:"))
                .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
        })
        .unwrap_or(0o022)
}
