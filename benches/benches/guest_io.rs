//! Guest I/O benchmark: 9P bind-mount throughput and metadata speed, and user-mode network
//! throughput (iperf3), dinv beside QEMU on the same kernel, root filesystem and machine.
//!
//! One boot per VMM. The tiny test rootfs's `/init` runs the workloads when the kernel command
//! line says `dinv.bench=p9,net` and prints `DINV-BENCH <name> <value>` lines:
//! - 9P (dinv: our virtio-9p server; QEMU: `-fsdev local` + `virtio-9p-device`), both mounted
//!   with dinv-agent's options (`trans=virtio,version=9p2000.L,cache=none`) and the same msize:
//!   `dd` 1 GiB write (`conv=fsync`) and read once per msize (512000 — the stock kernel's
//!   limit — 1 and 2 MiB, 4 MiB − 12 KiB; 4 MiB on dinv only), create / stat (`ls -l`) / unlink 10,000 files, untar a source
//!   tree (Linux's `fs/`, from Debian's linux-source) from the share into it.
//! - Network (dinv: netstack behind virtio-net; QEMU: `-netdev user`, i.e. slirp): iperf3 for
//!   10 s each way between the guest and an `iperf3 -s` on the host's 127.0.0.1, reached through
//!   each stack's host-loopback address (dinv 10.234.0.2, slirp 10.0.2.2).
//!
//! Each step also reports `<step>-vmm-cpu-ms`: the CPU time of the VMM's threads other than
//! its vCPUs over the step, i.e. what the 9P server / network stack cost the host. On PVM the
//! guest's own kernel work bounds both VMMs' wall times; this is the VMM's part.
//!
//! Targets (issues 4 and 5): network ≥ 3× QEMU's user networking; 9P sequential ≥ 3× and
//! metadata ≥ 2× QEMU's virtio-9p.
//!
//! Run: `scripts/bench guest_io`. `DINV_BENCH_ONLY=dinv|qemu` runs one side;
//! `DINV_BENCH_WORK=p9|net|p9,net` selects the workloads, `DINV_BENCH_P9_MSIZE` the msizes
//! (comma-separated); `DINV_BENCH_P9_MIB` (1024) and `DINV_BENCH_P9_FILES` (10000; the untar
//! runs at 10000, or with `DINV_BENCH_P9_UNTAR=1`) scale the 9P workload down for PVM hosts,
//! where every guest-kernel instruction run with interrupts disabled is emulated.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use dinv_tests::{artifact, Running};

const GUEST_MEM_MIB: u64 = 256;
/// The msizes the sequential 9P workload runs with on both VMMs (`DINV_BENCH_P9_MSIZE`
/// overrides): the stock kernel's 512000, then 1 and 2 MiB and QEMU's largest, 4 MiB less
/// 12 KiB (dinv's guest kernel, patch 0006, allows up to 4 MiB).
const MSIZES: &str = "512000,1048576,2097152,4182016";
/// Run on dinv only: QEMU 7.2 stops its virtio-9p device at msize 4 MiB ("virtio: too many
/// write descriptors in indirect table": it takes at most 1024 descriptors per chain, a
/// 4 MiB request needs 1026) and the guest hangs.
const DINV_ONLY_MSIZES: &str = "4194304";
const TIMEOUT: Duration = Duration::from_secs(90 * 60);
const SUBNET: &str = "10.234.0.0/24";

/// Runs one guest to `DINV-TEST-DONE` and returns its `DINV-BENCH` values, plus for each step
/// `<name>-vmm-cpu-ms`: CPU time of the VMM's own threads (not the vCPUs) between the step's
/// `DINV-BENCH-START` and its result: what serving the guest cost the host.
fn collect(mut vm: Running) -> BTreeMap<String, String> {
    let pid = vm.pid();
    let mut out = BTreeMap::new();
    let mut started: Option<(String, u64)> = None;
    loop {
        let line = vm.wait_for("DINV-", TIMEOUT);
        let other_ns = dinv_benches::thread_cpu_ns(pid).map(|(_, other)| other).unwrap_or(0);
        if line.contains("DINV-TEST-DONE") {
            break;
        }
        if let Some(pos) = line.find("DINV-BENCH-START ") {
            started = Some((line[pos + "DINV-BENCH-START ".len()..].trim().to_string(), other_ns));
        } else if let Some(pos) = line.find("DINV-BENCH ") {
            let Some((k, v)) = line[pos + "DINV-BENCH ".len()..].trim().split_once(' ') else {
                continue;
            };
            eprintln!("  {k} = {v}");
            if let Some((name, from)) = started.take().filter(|(name, _)| name == k) {
                let ms = format!("{:.0}", other_ns.saturating_sub(from) as f64 / 1e6);
                eprintln!("  {name}-vmm-cpu-ms = {ms}");
                out.insert(format!("{name}-vmm-cpu-ms"), ms);
            }
            out.insert(k.to_string(), v.trim().to_string());
        }
    }
    let fails = vm.lines_with("DINV-TEST-FAIL");
    assert!(fails.is_empty(), "guest reported failures: {fails:?}\n{}", vm.tail());
    vm.kill();
    out
}

/// An `iperf3 -s` on 127.0.0.1 (serves both directions, one test at a time).
fn iperf_server() -> (Child, u16) {
    let port = TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let child = Command::new("iperf3")
        .args(["-s", "-B", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("iperf3 is required (apt-get install iperf3)");
    (child, port)
}

/// A fresh share directory holding the source tarball the guest untars.
fn fresh_share(base: &Path, name: &str, tarball: &Path) -> std::path::PathBuf {
    let dir = base.join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("share dir");
    std::fs::copy(tarball, dir.join("src.tar")).expect("copy tarball");
    dir
}

/// Linux's `fs/` directory as a plain tar (the untar workload).
fn source_tarball(base: &Path) -> std::path::PathBuf {
    let src = std::fs::read_dir("/usr/src")
        .expect("/usr/src")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().contains("linux-source-") && p.to_string_lossy().ends_with(".tar.xz"))
        .expect("Debian's linux-source tarball in /usr/src (apt-get install linux-source-6.1)");
    let top = src.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_suffix(".tar.xz")).expect("name");
    let out = base.join("src.tar");
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "tar -xJf {src} -C {base} {top}/fs && tar -cf {out} -C {base}/{top} fs && rm -rf {base}/{top}",
            src = src.display(),
            base = base.display(),
            out = out.display()
        ))
        .status()
        .expect("tar");
    assert!(status.success(), "could not build the source tarball");
    out
}

fn main() {
    let kernel = artifact("DINV_KERNEL");
    let rootfs = artifact("DINV_TEST_ROOTFS");
    let only = std::env::var("DINV_BENCH_ONLY").unwrap_or_default();
    let work = std::env::var("DINV_BENCH_WORK").unwrap_or_else(|_| "p9,net".into());
    let scale = |var: &str, default: u32| -> u32 {
        std::env::var(var).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
    };
    let msizes = std::env::var("DINV_BENCH_P9_MSIZE").unwrap_or_else(|_| MSIZES.into());
    let sizes = format!(
        "dinv.p9_mib={} dinv.p9_files={} dinv.p9_untar={}",
        scale("DINV_BENCH_P9_MIB", 1024),
        scale("DINV_BENCH_P9_FILES", 10_000),
        scale("DINV_BENCH_P9_UNTAR", 0)
    );
    let dinv_sizes = match std::env::var("DINV_BENCH_P9_MSIZE") {
        Ok(_) => format!("dinv.msize={msizes} {sizes}"),
        Err(_) => format!("dinv.msize={msizes},{DINV_ONLY_MSIZES} {sizes}"),
    };
    let sizes = format!("dinv.msize={msizes} {sizes}");
    // On disk, not tmpfs: both servers write real files.
    let base = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
    let tarball = source_tarball(base.path());
    let mem = format!("{GUEST_MEM_MIB}M");
    let (mut iperf, port) = iperf_server();
    let net = netstack::Config::for_subnet(SUBNET.parse().expect("subnet")).expect("subnet config");
    let mut results: BTreeMap<&str, BTreeMap<String, String>> = BTreeMap::new();

    if only.is_empty() || only == "dinv" {
        eprintln!("dinv: booting (guest_io: {work})");
        let share = fresh_share(base.path(), "dinv-share", &tarball);
        let cmdline = format!(
            "root=/dev/vda ro init=/init dinv.bench={work} {dinv_sizes} dinv.ip={}/{} \
             dinv.gw={} dinv.hostlo={} dinv.iperf_port={port}",
            net.guest_ip,
            net.subnet.prefix(),
            net.gateway_ip,
            net.host_loopback_ip
        );
        results.insert(
            "dinv",
            collect(Running::spawn([
                "boot".into(),
                "--kernel".into(),
                kernel.clone().into_os_string(),
                "--memory".into(),
                mem.clone().into(),
                "--disk".into(),
                format!("{},ro", rootfs.display()).into(),
                "--share".into(),
                format!("bench={}", share.display()).into(),
                "--net".into(),
                SUBNET.into(),
                "--cmdline".into(),
                cmdline.into(),
            ] as [std::ffi::OsString; 13])),
        );
    }
    if only.is_empty() || only == "qemu" {
        eprintln!("qemu: booting (guest_io: {work})");
        let share = fresh_share(base.path(), "qemu-share", &tarball);
        let append = format!(
            "{} root=/dev/vda ro init=/init dinv.bench={work} {sizes} \
             dinv.ip=10.0.2.15/24 dinv.gw=10.0.2.2 dinv.hostlo=10.0.2.2 dinv.iperf_port={port}",
            dinv_benches::dinv_params()
        );
        let mut args = dinv_benches::qemu_microvm(&kernel, &GUEST_MEM_MIB.to_string(), &append, &rootfs);
        args.extend([
            "-fsdev".to_string(),
            format!("local,id=bench,path={},security_model=none", share.display()),
            "-device".to_string(),
            "virtio-9p-device,fsdev=bench,mount_tag=bench".to_string(),
            "-netdev".to_string(),
            "user,id=n0".to_string(),
            "-device".to_string(),
            "virtio-net-device,netdev=n0".to_string(),
        ]);
        results.insert("qemu", collect(Running::spawn_program("qemu-system-x86_64", args)));
    }
    let _ = iperf.kill();
    let _ = iperf.wait();

    println!("guest I/O benchmark ({GUEST_MEM_MIB} MiB guest, 1 vCPU, same kernel + rootfs, msizes {msizes})");
    let keys: std::collections::BTreeSet<&String> = results.values().flat_map(|m| m.keys()).collect();
    println!("{:<20} {:>12} {:>12} {:>14}", "metric", "dinv", "qemu", "dinv advantage");
    for k in keys {
        let get = |vmm: &str| results.get(vmm).and_then(|m| m.get(k)).cloned().unwrap_or_else(|| "-".into());
        let (d, q) = (get("dinv"), get("qemu"));
        // Seconds: lower is better; Mbit/s and counts: higher is better.
        let adv = match (d.parse::<f64>(), q.parse::<f64>()) {
            (Ok(d), Ok(q)) if d > 0.0 && q > 0.0 && k.ends_with("-mbit") => format!("{:.2}x", d / q),
            (Ok(d), Ok(q)) if d > 0.0 && q > 0.0 && !k.ends_with("-files") => format!("{:.2}x", q / d),
            _ => String::new(),
        };
        let unit = if k.ends_with("-vmm-cpu-ms") {
            "ms of the VMM's own threads"
        } else if k.ends_with("-mbit") {
            "Mbit/s"
        } else if k.ends_with("-files") {
            "files"
        } else {
            "s"
        };
        println!("{:<20} {:>12} {:>12} {:>14}   ({unit})", k, d, q, adv);
    }
    println!("targets: net >= 3x, p9 read/write >= 3x, p9 metadata >= 2x");
}
