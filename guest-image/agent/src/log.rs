//! Console logging for the agent.
//!
//! Every line goes to the agent's stdout (the kernel's `/dev/console`, i.e. ttyS0) as
//! `[<seconds since boot>] dinv-agent: <message>` (so `dinv-agent: ready` and
//! `dinv-agent: powering off` are plain substrings a host can match). The timestamp is `CLOCK_BOOTTIME`, the same clock
//! as the kernel's printk time, so boot phases can be read straight off the serial log.
//! Child output (containerd, dockerd) is forwarded by [`crate::services`] with its own prefix.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

static DEBUG: AtomicBool = AtomicBool::new(false);

/// Enables `debug!` output (`dinv.debug=1`).
pub fn set_debug(on: bool) {
    DEBUG.store(on, Ordering::Relaxed);
}

/// Whether `dinv.debug=1` was given.
pub fn debug_enabled() -> bool {
    DEBUG.load(Ordering::Relaxed)
}

/// Seconds since boot (`CLOCK_BOOTTIME`).
pub fn uptime() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own; no other memory is touched.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// Writes one complete line to the console (one `write` call, so lines from threads do not mix).
pub fn line(prefix: &str, msg: &str) {
    let text = format!("[{:10.3}] {prefix}: {msg}\n", uptime());
    let out = std::io::stdout();
    let mut lock = out.lock();
    let _ = lock.write_all(text.as_bytes());
    let _ = lock.flush();
}

/// Logs a line with the agent's prefix.
#[macro_export]
macro_rules! info {
    ($($arg:tt)*) => { $crate::log::line("dinv-agent", &format!($($arg)*)) };
}

/// Logs a line only when `dinv.debug=1`.
#[macro_export]
macro_rules! debug {
    ($($arg:tt)*) => {
        if $crate::log::debug_enabled() { $crate::log::line("dinv-agent(debug)", &format!($($arg)*)) }
    };
}
