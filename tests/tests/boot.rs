//! Whole-system boot tests: our VMM boots our guest kernel with the tiny test root filesystem on
//! this machine's KVM (PVM in CI), and reports guests that die.
//!
//! Needs `DINV_KERNEL` and `DINV_TEST_ROOTFS` (see `.ci/run`), `/dev/kvm`, and e2fsprogs.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dinv_tests::{artifact, payload, require_kvm, run_ok, Running};

/// Generous: the guest reaches init in about a minute on PVM.
const BOOT_TIMEOUT: Duration = Duration::from_secs(900);
const STEP_TIMEOUT: Duration = Duration::from_secs(300);

fn mkfs(path: &Path, size: &str) {
    run_ok(Command::new("truncate").args(["-s", size]).arg(path));
    run_ok(Command::new("mkfs.ext4").args(["-q", "-F", "-E", "nodiscard", "-L", "dinvdata"]).arg(path));
}

#[test]
fn guest_boots_moves_into_a_fresh_vm_writes_its_second_disk_and_powers_off() {
    require_kvm();
    let kernel = artifact("DINV_KERNEL");
    let rootfs = artifact("DINV_TEST_ROOTFS");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data.ext4");
    mkfs(&data, "64M");
    let blocks_before = std::fs::metadata(&data).unwrap().blocks();
    let token = format!(
        "t{}x{}",
        std::process::id(),
        SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_micros()
    );

    let mut vm = Running::spawn([
        "boot".as_ref(),
        "--kernel".as_ref(),
        kernel.as_os_str(),
        "--memory".as_ref(),
        "128M".as_ref(),
        "--disk".as_ref(),
        format!("{},ro", rootfs.display()).as_ref(),
        "--disk".as_ref(),
        data.as_os_str(),
        "--cmdline".as_ref(),
        format!("root=/dev/vda ro init=/init dinv.token={token}").as_ref(),
        // Midway (PVM: during the kernel's boot) the guest is paused and moved into a fresh
        // KVM VM restored from its captured state: everything after that must still work.
        "--relocate-after".as_ref(),
        "6".as_ref(),
    ]);
    vm.wait_for("DINV-TEST-INIT-OK", BOOT_TIMEOUT);
    let time_to_init = vm.elapsed();
    let cpus = vm.wait_for("DINV-TEST-CPUS", STEP_TIMEOUT);
    assert!(cpus.trim_end().ends_with(" 1"), "{cpus}");
    let blk = vm.wait_for("DINV-TEST-BLK-", STEP_TIMEOUT);
    assert!(blk.contains(&format!("DINV-TEST-BLK-OK {token}")), "{blk}\n{}", vm.tail());
    let trim = vm.wait_for("DINV-TEST-TRIM", STEP_TIMEOUT);
    vm.wait_for("DINV-TEST-DONE", STEP_TIMEOUT);
    let status = vm.wait_exit(STEP_TIMEOUT);
    assert!(status.success(), "dinv exited {status} after guest poweroff\n{}", vm.tail());
    assert!(vm.lines_with("DINV-TEST-FAIL").is_empty(), "{}", vm.tail());
    assert!(!vm.lines_with("guest moved into a fresh KVM VM").is_empty(), "no relocation\n{}", vm.tail());
    if Path::new("/sys/module/kvm_pvm").exists() {
        assert!(!vm.lines_with("PVM detected").is_empty(), "PVM profile not applied\n{}", vm.tail());
    }
    eprintln!("exec -> init marker: {:.1}s", time_to_init.as_secs_f64());

    // What the guest wrote is on the host's image, and the filesystem is clean.
    let got = run_ok(Command::new("debugfs").args(["-R", "cat /token.txt"]).arg(&data));
    assert_eq!(got.trim(), token);
    run_ok(Command::new("e2fsck").args(["-fn"]).arg(&data));
    // fstrim in the guest punched the 8 MiB file it wrote and deleted out of the sparse image.
    let blocks_after = std::fs::metadata(&data).unwrap().blocks();
    assert!(
        blocks_after * 512 < blocks_before * 512 + (4 << 20),
        "discard did not free space: {blocks_before} -> {blocks_after} sectors ({trim})"
    );
}

fn run_payload(code: &[u8], pvh: bool) -> (std::process::ExitStatus, String) {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let elf = dir.path().join("payload.elf");
    std::fs::write(&elf, payload::elf(code, pvh)).unwrap();
    let mut vm = Running::spawn([
        "boot".as_ref(),
        "--kernel".as_ref(),
        elf.as_os_str(),
        "--memory".as_ref(),
        "64M".as_ref(),
        "--entry".as_ref(),
        if pvh { "pvh" } else { "linux64" }.as_ref(),
    ]);
    let status = vm.wait_exit(Duration::from_secs(60));
    (status, vm.transcript.join("\n"))
}

#[test]
fn triple_fault_exits_non_zero_with_rip_and_instruction_bytes() {
    let (status, out) = run_payload(payload::TRIPLE_FAULT, false);
    assert_eq!(status.code(), Some(1), "{out}");
    assert!(out.contains("triple fault"), "{out}");
    assert!(out.contains("RIP 0x0000000000100000"), "{out}");
    assert!(out.contains("[0f 0b"), "{out}");
}

#[test]
fn emulation_failure_exits_non_zero_with_rip_and_instruction_bytes() {
    let (status, out) = run_payload(payload::FETCH_FROM_NOWHERE, true);
    assert_eq!(status.code(), Some(1), "{out}");
    assert!(out.contains("KVM_EXIT_INTERNAL_ERROR"), "{out}");
    assert!(out.contains("RIP 0x00000000f0000000"), "{out}");
}

#[test]
fn guest_relocated_into_a_fresh_kvm_vm_continues_where_it_stopped() {
    // The snapshot path's core: pause the vCPU, capture its KVM state (registers, FPU, LAPIC,
    // MSRs, events) and the irqchip/PIT/clock, restore all of it into a new KVM VM and go on.
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let elf = dir.path().join("payload.elf");
    std::fs::write(&elf, payload::elf(payload::ALPHABET_FOREVER, false)).unwrap();
    let mut vm = Running::spawn([
        "boot".as_ref(),
        "--kernel".as_ref(),
        elf.as_os_str(),
        "--memory".as_ref(),
        "64M".as_ref(),
        "--relocate-after".as_ref(),
        "0.5".as_ref(),
    ]);
    vm.wait_for("guest moved into a fresh KVM VM", Duration::from_secs(60));
    // Lines written after the move.
    let moved_at = vm.transcript.len();
    while vm.transcript.len() < moved_at + 200 {
        vm.wait_for("", Duration::from_secs(60));
    }
    vm.kill();
    let console: Vec<&String> = vm.transcript.iter().filter(|l| !l.starts_with("[dinv] ")).collect();
    assert!(console.len() > 200, "{}", vm.tail());
    for (n, line) in console.iter().enumerate().take(console.len() - 1) {
        let want: String = (0..64).map(|i| char::from(b'a' + ((n * 64 + i) % 26) as u8)).collect();
        assert_eq!(line.as_str(), want, "console line {n} breaks the sequence\n{}", vm.tail());
    }
}

#[test]
fn snapshot_resumes_in_a_new_process_and_finishes_the_guests_work() {
    // One dinv snapshots the test guest mid-boot (PVM: in the kernel's initcalls) and goes on;
    // a second dinv resumes that snapshot with a copy of the data disk made at the pause and
    // must finish the same work: init, the disk test (its token on the copy), power-off.
    require_kvm();
    let kernel = artifact("DINV_KERNEL");
    let rootfs = artifact("DINV_TEST_ROOTFS");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data.ext4");
    mkfs(&data, "64M");
    let snap = dir.path().join("snap");
    let token = format!("s{}", std::process::id());
    let cmdline = format!("root=/dev/vda ro init=/init dinv.token={token}");
    let root = format!("{},ro", rootfs.display());
    let machine = |data: &Path| -> Vec<std::ffi::OsString> {
        ["boot", "--kernel"]
            .iter()
            .map(|s| s.into())
            .chain([kernel.clone().into_os_string()])
            .chain(["--memory", "128M", "--disk", &root, "--disk"].iter().map(|s| s.into()))
            .chain([data.as_os_str().to_owned(), "--cmdline".into(), cmdline.clone().into()])
            .collect()
    };
    let mut first = Running::spawn(
        machine(&data).into_iter().chain(["--snapshot-after".into(), "4".into(), "--snapshot-to".into(), snap.clone().into_os_string()]),
    );
    first.wait_for("snapshot written to", BOOT_TIMEOUT);
    let before = first.transcript.iter().filter(|l| l.contains("DINV-TEST-")).count();
    first.wait_for("DINV-TEST-DONE", BOOT_TIMEOUT);
    assert!(first.wait_exit(STEP_TIMEOUT).success(), "{}", first.tail());
    assert_eq!(before, 0, "the snapshot came after the guest's init: too late to test anything\n{}", first.tail());

    let copy = dir.path().join("data-copy.ext4");
    let mut second = Running::spawn(machine(&copy).into_iter().chain(["--restore".into(), snap.into_os_string()]));
    second.wait_for("resumed the snapshot", STEP_TIMEOUT);
    second.wait_for("DINV-TEST-INIT-OK", BOOT_TIMEOUT);
    let blk = second.wait_for("DINV-TEST-BLK-", STEP_TIMEOUT);
    assert!(blk.contains(&format!("DINV-TEST-BLK-OK {token}")), "{blk}\n{}", second.tail());
    second.wait_for("DINV-TEST-DONE", STEP_TIMEOUT);
    assert!(second.wait_exit(STEP_TIMEOUT).success(), "{}", second.tail());
    assert!(second.lines_with("DINV-TEST-FAIL").is_empty(), "{}", second.tail());
    let got = run_ok(Command::new("debugfs").args(["-R", "cat /token.txt"]).arg(&copy));
    assert_eq!(got.trim(), token);
    run_ok(Command::new("e2fsck").args(["-fn"]).arg(&copy));

    // A snapshot only resumes on the machine it was taken of.
    let other = dir.path().join("data-other.ext4");
    let out = Command::new(dinv_tests::dinv_bin())
        .args(machine(&other).into_iter().map(|a| if a == "128M" { "256M".into() } else { a }))
        .arg("--restore")
        .arg(dir.path().join("snap"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("different memory size"), "{stderr}");
}
