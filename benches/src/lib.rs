//! Shared pieces of dinv's benchmarks (`benches/benches/*.rs`): the kernel parameters dinv
//! itself passes, so QEMU boots with exactly the same ones, and QEMU's `-M microvm` command line
//! for the same kernel, memory and read-only root disk.

use std::path::Path;

/// dinv's base kernel parameters plus, on a PVM host, its PVM profile.
pub fn dinv_params() -> String {
    let mut params = dinv_vmm::vm::BASE_CMDLINE.to_string();
    if dinv_vmm::pvm::host_is_pvm() {
        params.push(' ');
        params.push_str(&dinv_vmm::pvm::cmdline_additions());
    }
    params
}

/// QEMU `-M microvm` (PVH boot of `kernel`), one vCPU, `mem` (e.g. `512M` or `128`), the serial
/// console on stdout, `append` as the kernel command line and `rootfs` as a read-only
/// virtio-blk disk (`/dev/vda`). Callers append their own devices.
pub fn qemu_microvm(kernel: &Path, mem: &str, append: &str, rootfs: &Path) -> Vec<String> {
    [
        // debug-threads: the vCPU thread is named `CPU 0/KVM` (see `thread_cpu_ns`).
        "-name", "dinv-bench,debug-threads=on",
        "-M", "microvm,acpi=off", "-enable-kvm", "-cpu", "host,-arch-capabilities",
        "-m", mem, "-smp", "1", "-nodefaults", "-no-user-config",
        "-nographic", "-serial", "stdio", "-no-reboot",
        "-kernel", &kernel.display().to_string(), "-append", append,
        "-drive", &format!("id=root,file={},format=raw,if=none,readonly=on", rootfs.display()),
        "-device", "virtio-blk-device,drive=root",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// CPU time (ns) the threads of process `pid` have run so far, split into vCPU threads (dinv's
/// `vcpuN`, QEMU's `CPU N/KVM`: the guest runs inside them) and all others (the VMM's own work:
/// device emulation, the 9P server, the network stack, QEMU's main loop and workers).
/// Threads that ended are not counted; benchmarks compare deltas over steps where the
/// VMM's threads live throughout.
pub fn thread_cpu_ns(pid: u32) -> std::io::Result<(u64, u64)> {
    let (mut vcpu, mut other) = (0u64, 0u64);
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let dir = task?.path();
        // A thread may end between listing and reading: skip it.
        let (Ok(comm), Ok(sched)) =
            (std::fs::read_to_string(dir.join("comm")), std::fs::read_to_string(dir.join("schedstat")))
        else {
            continue;
        };
        // schedstat: time on CPU (ns), time waiting, timeslices.
        let ns: u64 = sched.split_whitespace().next().and_then(|v| v.parse().ok()).unwrap_or(0);
        let comm = comm.trim_end();
        if comm.starts_with("vcpu") || comm.ends_with("/KVM") {
            vcpu += ns;
        } else {
            other += ns;
        }
    }
    Ok((vcpu, other))
}
