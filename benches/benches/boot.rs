//! Boot benchmark: exec → init-marker time and VMM memory overhead, dinv beside QEMU.
//!
//! Both VMMs boot the same kernel and tiny root filesystem (`DINV_KERNEL`, `DINV_TEST_ROOTFS`)
//! with the same memory, vCPU count and kernel parameters (dinv's PVM profile included when the
//! host is PVM). QEMU runs as `-M microvm` with a PVH boot of the same vmlinux. Reported per run:
//! - time from exec to the guest's `DINV-TEST-INIT-OK` line on the serial console;
//! - the VMM's peak RSS excluding guest memory (sum of `/proc/PID/smaps` Rss over every mapping
//!   except the guest RAM mapping), sampled every 50 ms.
//!
//! Targets: dinv ≤ 0.5× QEMU's time to init; dinv overhead ≤ 4 MiB.
//!
//! Run: `scripts/bench boot` (builds dinv in release first). `DINV_BENCH_RUNS` sets the
//! number of alternating runs (default 1: a PVM boot takes over a minute).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dinv_tests::{artifact, Running};

const GUEST_MEM_MIB: u64 = 128;
const TIMEOUT: Duration = Duration::from_secs(900);

/// RSS in bytes of `pid` excluding mappings of exactly the guest RAM size.
fn rss_excluding_guest(pid: u32, guest_bytes: u64) -> Option<u64> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let mut total = 0u64;
    let mut skip = false;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((start, end)) = first.split_once('-') {
            if let (Ok(s), Ok(e)) = (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16)) {
                let size = e - s;
                // Guest RAM: one anonymous mapping of the guest size (QEMU may align it up).
                skip = size >= guest_bytes && size <= guest_bytes + (4 << 20);
                continue;
            }
        }
        if let Some(rest) = line.strip_prefix("Rss:") {
            if !skip {
                let kb: u64 = rest.trim().trim_end_matches("kB").trim().parse().unwrap_or(0);
                total += kb * 1024;
            }
        }
    }
    Some(total)
}

struct Sample {
    secs: f64,
    peak_rss: u64,
}

fn measure(mut vm: Running) -> Sample {
    let peak = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, done, pid) = (peak.clone(), done.clone(), vm.pid());
        std::thread::spawn(move || {
            while !done.load(Ordering::SeqCst) {
                if let Some(rss) = rss_excluding_guest(pid, GUEST_MEM_MIB << 20) {
                    peak.fetch_max(rss, Ordering::SeqCst);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    vm.wait_for("DINV-TEST-INIT-OK", TIMEOUT);
    let secs = vm.elapsed().as_secs_f64();
    done.store(true, Ordering::SeqCst);
    let _ = sampler.join();
    vm.kill();
    Sample {
        secs,
        peak_rss: peak.load(Ordering::SeqCst),
    }
}

fn main() {
    let kernel = artifact("DINV_KERNEL");
    let rootfs = artifact("DINV_TEST_ROOTFS");
    let runs: usize = std::env::var("DINV_BENCH_RUNS").ok().and_then(|s| s.parse().ok()).unwrap_or(1);
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data.ext4");
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("truncate -s 64M {0} && mkfs.ext4 -q -F {0}", data.display()))
        .status()
        .expect("mkfs");
    assert!(status.success());
    let guest_args = "root=/dev/vda ro init=/init dinv.token=bench";
    let mem = format!("{GUEST_MEM_MIB}M");

    let mut ours = Vec::new();
    let mut qemu = Vec::new();
    for run in 0..runs {
        eprintln!("run {}/{runs}: dinv", run + 1);
        ours.push(measure(Running::spawn([
            "boot".as_ref(),
            "--kernel".as_ref(),
            kernel.as_os_str(),
            "--memory".as_ref(),
            mem.as_ref(),
            "--disk".as_ref(),
            format!("{},ro", rootfs.display()).as_ref(),
            "--disk".as_ref(),
            data.as_os_str(),
            "--cmdline".as_ref(),
            guest_args.as_ref(),
        ])));
        eprintln!("run {}/{runs}: qemu", run + 1);
        let append = format!("{} {guest_args}", dinv_benches::dinv_params());
        let mut args = dinv_benches::qemu_microvm(&kernel, &GUEST_MEM_MIB.to_string(), &append, &rootfs);
        args.extend([
            "-drive".to_string(),
            format!("id=data,file={},format=raw,if=none", data.display()),
            "-device".to_string(),
            "virtio-blk-device,drive=data".to_string(),
        ]);
        qemu.push(measure(Running::spawn_program("qemu-system-x86_64", args)));
    }

    let avg = |v: &[Sample]| v.iter().map(|s| s.secs).sum::<f64>() / v.len() as f64;
    let rss = |v: &[Sample]| v.iter().map(|s| s.peak_rss).max().unwrap_or(0) as f64 / (1 << 20) as f64;
    println!("boot benchmark ({runs} run(s), {GUEST_MEM_MIB} MiB guest, 1 vCPU, same kernel + rootfs)");
    println!("{:<8} {:>16} {:>26}", "vmm", "exec->init (s)", "RSS excl. guest RAM (MiB)");
    println!("{:<8} {:>16.2} {:>26.2}", "dinv", avg(&ours), rss(&ours));
    println!("{:<8} {:>16.2} {:>26.2}", "qemu", avg(&qemu), rss(&qemu));
    println!("ratio dinv/qemu time to init: {:.2} (target <= 0.50)", avg(&ours) / avg(&qemu));
    println!("dinv overhead: {:.2} MiB (target <= 4 MiB)", rss(&ours));
}
