//! Thin safe wrappers over the libc calls the agent needs as PID 1: mount/umount, signal masks,
//! `sigtimedwait`, reaping, `reboot`, hostname, interface flags.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::Duration;

fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// `mount(2)`.
pub fn mount(
    source: Option<&Path>,
    target: &Path,
    fstype: &str,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let src = match source {
        Some(s) => cstr(s)?,
        None => CString::new(fstype).unwrap_or_default(),
    };
    let tgt = cstr(target)?;
    let fs = CString::new(fstype).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let data = data
        .map(CString::new)
        .transpose()
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let data_ptr = data
        .as_ref()
        .map_or(std::ptr::null(), |d| d.as_ptr().cast());
    // SAFETY: all pointers are valid NUL-terminated strings (or null for data) that outlive the call.
    cvt(unsafe { libc::mount(src.as_ptr(), tgt.as_ptr(), fs.as_ptr(), flags, data_ptr) })?;
    Ok(())
}

/// `pivot_root(2)`.
pub fn pivot_root(new_root: &Path, put_old: &Path) -> io::Result<()> {
    let new_root = cstr(new_root)?;
    let put_old = cstr(put_old)?;
    // SAFETY: both are valid NUL-terminated strings for the duration of the call.
    cvt(unsafe { libc::syscall(libc::SYS_pivot_root, new_root.as_ptr(), put_old.as_ptr()) } as libc::c_int)?;
    Ok(())
}

/// `umount2(2)`.
pub fn umount(target: &Path, flags: libc::c_int) -> io::Result<()> {
    let tgt = cstr(target)?;
    // SAFETY: tgt is a valid NUL-terminated string for the duration of the call.
    cvt(unsafe { libc::umount2(tgt.as_ptr(), flags) })?;
    Ok(())
}

/// The signals the agent handles in its main loop.
pub const HANDLED_SIGNALS: [libc::c_int; 6] = [
    libc::SIGCHLD,
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGPWR,
    libc::SIGUSR1,
    libc::SIGHUP,
];

extern "C" fn noop_handler(_: libc::c_int) {}

fn sigset(signals: &[libc::c_int]) -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t we own.
    unsafe { libc::sigemptyset(&mut set) };
    for &s in signals {
        // SAFETY: as above; s is a valid signal number.
        unsafe { libc::sigaddset(&mut set, s) };
    }
    set
}

/// Installs a no-op handler for [`HANDLED_SIGNALS`] (so the kernel does not drop them for PID 1,
/// which ignores default-action signals) and blocks them in the calling thread; threads spawned
/// afterwards inherit the mask, so only `wait_signal` consumes them. `std::process::Command`
/// resets the mask and handlers in children.
pub fn block_handled_signals() -> io::Result<()> {
    for &s in &HANDLED_SIGNALS {
        // SAFETY: sigaction is plain data; zeroed then filled with a valid handler.
        let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
        sa.sa_sigaction = noop_handler as extern "C" fn(libc::c_int) as usize;
        sa.sa_flags = libc::SA_RESTART;
        // SAFETY: valid sigaction struct and signal number.
        cvt(unsafe { libc::sigaction(s, &sa, std::ptr::null_mut()) })?;
    }
    let set = sigset(&HANDLED_SIGNALS);
    // SAFETY: valid sigset; old set not requested.
    let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    Ok(())
}

/// Waits up to `timeout` for one of [`HANDLED_SIGNALS`]; `None` on timeout.
pub fn wait_signal(timeout: Duration) -> Option<libc::c_int> {
    let set = sigset(&HANDLED_SIGNALS);
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: valid sigset and timespec; siginfo not requested.
    let r = unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &ts) };
    (r > 0).then_some(r)
}

/// Sends SIGUSR1 to the agent's own process: wakes the main loop's `wait_signal`.
pub fn wake_main() {
    // SAFETY: kill on our own pid with a handled, blocked signal.
    unsafe { libc::kill(libc::getpid(), libc::SIGUSR1) };
}

/// An exited child: pid and raw wait status.
#[derive(Debug, Clone, Copy)]
pub struct Exit {
    /// Process id.
    pub pid: libc::pid_t,
    /// Raw `waitpid` status.
    pub status: libc::c_int,
}

/// Reaps one exited child without blocking.
pub fn reap_one() -> Option<Exit> {
    let mut status = 0;
    // SAFETY: status is a valid out-pointer.
    let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
    (pid > 0).then_some(Exit { pid, status })
}

/// Human-readable wait status: `exit code N` or `signal N`.
pub fn describe_status(status: libc::c_int) -> String {
    if libc::WIFEXITED(status) {
        format!("exit code {}", libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        format!("signal {}", libc::WTERMSIG(status))
    } else {
        format!("status {status}")
    }
}

/// Sends `sig` to `pid` (errors ignored: the process may be gone).
pub fn kill(pid: libc::pid_t, sig: libc::c_int) {
    // SAFETY: plain syscall; pid is a child we started or -1 (all but init).
    unsafe { libc::kill(pid, sig) };
}

/// `sync(2)`.
pub fn sync() {
    // SAFETY: no arguments.
    unsafe { libc::sync() };
}

/// `reboot(RB_AUTOBOOT)`: with the guest booted `reboot=k` this resets through the i8042, which the
/// VMM turns into a clean exit. Only returns on error.
pub fn reboot() -> io::Error {
    // SAFETY: plain syscall; we are PID 1 with CAP_SYS_BOOT.
    unsafe { libc::reboot(libc::RB_AUTOBOOT) };
    io::Error::last_os_error()
}

/// `sethostname(2)`.
pub fn set_hostname(name: &str) -> io::Result<()> {
    // SAFETY: pointer/length pair of a live &str.
    cvt(unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) })?;
    Ok(())
}

/// Sets IFF_UP on an interface (`lo`) with SIOCSIFFLAGS, without exec'ing `ip`.
pub fn interface_up(name: &str) -> io::Result<()> {
    if name.len() >= libc::IFNAMSIZ {
        return Err(io::ErrorKind::InvalidInput.into());
    }
    // SAFETY: plain socket syscall.
    let fd = cvt(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: fd was just returned by socket() and is owned here.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    use std::os::fd::AsRawFd;
    // SAFETY: ifreq is plain data.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    // SAFETY: valid socket and ifreq; SIOCGIFFLAGS fills ifru_flags.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr) })?;
    // SAFETY: union field written by the kernel above.
    unsafe { ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    // SAFETY: valid socket and ifreq.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCSIFFLAGS, &ifr) })?;
    Ok(())
}

/// `FIFREEZE` (`_IOWR('X', 119, int)`).
const FIFREEZE: libc::c_ulong = 0xC004_5877;

/// Freezes the filesystem mounted at `path` (flushes it; ext4 also flushes its journal and marks
/// itself clean on disk). Never thawed: used just before power-off.
pub fn freeze(path: &Path) -> io::Result<()> {
    let dir = std::fs::File::open(path)?;
    use std::os::fd::AsRawFd;
    // SAFETY: valid fd; FIFREEZE takes an (ignored) int argument.
    cvt(unsafe { libc::ioctl(dir.as_raw_fd(), FIFREEZE as _, 0) })?;
    Ok(())
}

/// Parses the parent pid out of a `/proc/<pid>/stat` line (the command may contain spaces and
/// parentheses, so fields are counted after the last `)`).
pub fn stat_ppid(stat: &str) -> Option<libc::pid_t> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// `pid (comm)` for log lines.
pub fn describe_pid(pid: libc::pid_t) -> String {
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    format!("{pid} ({})", comm.trim())
}

/// Pids of all user-space processes other than PID 1 (kernel threads — pid 2 and its children —
/// excluded).
pub fn user_processes() -> Vec<libc::pid_t> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<libc::pid_t>().ok())
        .filter(|&pid| pid > 2)
        .filter(|&pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| stat_ppid(&s))
                .is_some_and(|ppid| ppid != 2)
        })
        .collect()
}

/// Sets `CLOCK_REALTIME`.
pub fn set_realtime(secs: i64, nanos: i64) -> io::Result<()> {
    let ts = libc::timespec {
        tv_sec: secs as libc::time_t,
        tv_nsec: nanos as libc::c_long,
    };
    // SAFETY: a valid timespec for the duration of the call.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Credits `bytes` (trusted host randomness) to the kernel's input pool and reseeds the CRNG
/// from it (`RNDADDENTROPY`, `RNDRESEEDCRNG`).
pub fn add_entropy(bytes: &[u8]) -> io::Result<()> {
    /// `struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }`
    #[repr(C)]
    struct PoolInfo {
        entropy_count: libc::c_int,
        buf_size: libc::c_int,
        buf: [u8; 32],
    }
    const RNDADDENTROPY: libc::c_ulong = 0x4008_5203; // _IOW('R', 0x03, int[2])
    const RNDRESEEDCRNG: libc::c_ulong = 0x5207; // _IO('R', 0x07)
    let mut info = PoolInfo { entropy_count: 0, buf_size: 0, buf: [0; 32] };
    let n = bytes.len().min(info.buf.len());
    info.buf[..n].copy_from_slice(&bytes[..n]);
    info.entropy_count = (n * 8) as libc::c_int;
    info.buf_size = n as libc::c_int;
    let dev = std::fs::File::open("/dev/urandom")?;
    // SAFETY: RNDADDENTROPY reads a rand_pool_info of `buf_size` bytes of payload from `info`,
    // which lives for the call; RNDRESEEDCRNG takes no argument.
    unsafe {
        if libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&dev), RNDADDENTROPY as _, &info) != 0 {
            return Err(io::Error::last_os_error());
        }
        if libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&dev), RNDRESEEDCRNG as _) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn ppid_from_stat() {
        assert_eq!(
            super::stat_ppid("38 (containerd) S 1 38 38 0 -1 4194560 1 0"),
            Some(1)
        );
        assert_eq!(super::stat_ppid("7 (a) b) (c) R 2 0 0"), Some(2));
        assert_eq!(super::stat_ppid("garbage"), None);
        let me = std::fs::read_to_string("/proc/self/stat").unwrap();
        // SAFETY: getppid has no preconditions.
        assert_eq!(super::stat_ppid(&me), Some(unsafe { libc::getppid() }));
    }
}
