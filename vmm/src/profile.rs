//! Guest wall-clock profiler: where does the guest spend its time?
//!
//! A sampler thread kicks every vCPU thread out of `KVM_RUN` at a fixed rate; the vCPU reads its
//! registers and counts `(RIP, interrupts enabled)`. Because samples are taken on the host's
//! clock, code that is slow to *run* (on PVM: everything KVM emulates, e.g. guest kernel code with
//! interrupts disabled) shows up in proportion to what it costs, not to how often it executes.
//! At the end of the run the histogram is written as text, one `count rip if` line per address,
//! most frequent first; `scripts/guest-profile` maps it through the kernel's `System.map`.
//!
//! A debugging aid (`dinv --guest-profile FILE`, `dinv boot --guest-profile FILE`): the kicks
//! cost a VM exit each, so it stays off by default.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_ioctls::VcpuFd;

/// Samples per second (per vCPU).
pub const RATE_HZ: u64 = 200;

/// How often the sampler rewrites the profile file.
pub const SNAPSHOT_EVERY: Duration = Duration::from_secs(10);

/// `RFLAGS.IF`.
const RFLAGS_IF: u64 = 1 << 9;

/// The histogram shared by the vCPU threads.
#[derive(Debug, Default)]
pub struct Profile {
    samples: Mutex<HashMap<(u64, bool), u64>>,
}

impl Profile {
    /// Records the current position of `vcpu` (called when a kick interrupted `KVM_RUN`).
    pub fn sample(&self, vcpu: &VcpuFd) {
        let Ok(regs) = vcpu.get_regs() else { return };
        self.record(regs.rip, regs.rflags & RFLAGS_IF != 0);
    }

    fn record(&self, rip: u64, irqs_on: bool) {
        let mut s = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        *s.entry((rip, irqs_on)).or_insert(0) += 1;
    }

    /// Writes the histogram to `path` (atomically: a temporary file renamed over it).
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let mut rows: Vec<_> = {
            let s = self.samples.lock().unwrap_or_else(|e| e.into_inner());
            s.iter().map(|(&(rip, irq), &n)| (n, rip, irq)).collect()
        };
        rows.sort_unstable_by(|a, b| b.cmp(a));
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let mut out = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
        writeln!(
            out,
            "# count rip if (dinv guest profile, {RATE_HZ} Hz wall clock)"
        )?;
        for (n, rip, irq) in rows {
            writeln!(out, "{n} {rip:#x} {}", u8::from(irq))?;
        }
        out.flush()?;
        drop(out);
        std::fs::rename(&tmp, path)
    }
}

/// Starts the sampler thread: kicks `threads` at [`RATE_HZ`] until `stop` is set, and rewrites
/// `path` with the histogram so far every [`SNAPSHOT_EVERY`] (copy it to profile one phase).
pub fn start_sampler(
    profile: Arc<Profile>,
    path: PathBuf,
    threads: Vec<libc::pthread_t>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("profiler".into())
        .spawn(move || {
            let period = Duration::from_nanos(1_000_000_000 / RATE_HZ);
            let mut last = Instant::now();
            while !stop.load(Ordering::SeqCst) {
                std::thread::sleep(period);
                for &t in &threads {
                    // SAFETY: the vCPU threads outlive the sampler (it is joined first); the
                    // kick signal has a no-op handler installed.
                    unsafe { libc::pthread_kill(t, crate::vcpu::vcpu_kick_signal()) };
                }
                if last.elapsed() >= SNAPSHOT_EVERY {
                    last = Instant::now();
                    if let Err(e) = profile.write(&path) {
                        tracing::warn!("guest profile snapshot {}: {e}", path.display());
                    }
                }
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_written_most_frequent_first() {
        let p = Profile::default();
        p.record(0xffff_ffff_8100_0000, false);
        for _ in 0..3 {
            p.record(0x40_1000, true);
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("prof.txt");
        p.write(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with('#'), "{text}");
        assert_eq!(lines[1..], ["3 0x401000 1", "1 0xffffffff81000000 0"]);
        assert!(!dir.path().join("prof.txt.tmp").exists());
    }
}
