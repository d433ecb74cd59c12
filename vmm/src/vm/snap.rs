//! Taking a snapshot of a running [`Vm`], resuming one (file format: [`crate::snapshot`]), and
//! moving a running guest into a fresh KVM VM (`relocate`, the snapshot path without files).
//!
//! Taking runs on the device event loop's thread, so no device works while the vCPUs are out
//! of `KVM_RUN`: the guest memory, the disks and every queue are still. The same vCPUs then go
//! on in the same KVM VM.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::CpuId;
use kvm_ioctls::{VcpuFd, VmFd};

use devices::virtio::mmio::MmioTransport;

use super::{create_machine, create_vcpu, join_vcpus, Vm};
use crate::snapshot::{self, Snapshot, SnapshotError, SnapshotInfo, VcpuState, VmState, FORMAT_VERSION};

/// A snapshot asked for through a [`crate::VmHandle`].
#[derive(Debug)]
pub(crate) struct Request {
    /// Where to write it (must not exist).
    pub dir: PathBuf,
    /// Where the outcome goes.
    pub reply: Sender<Result<SnapshotInfo, SnapshotError>>,
}

/// Puts a fresh VM (irqchip, PIT, devices and wiring in place) into the snapshot's state;
/// returns its vCPUs, ready to run.
pub(super) fn restore_machine(
    vm: &VmFd,
    cpuid: &CpuId,
    transports: &[Arc<Mutex<MmioTransport>>],
    snap: &Snapshot,
) -> Result<Vec<VcpuFd>, SnapshotError> {
    if snap.transports.len() != transports.len() {
        return Err(SnapshotError::Device(format!(
            "{} virtio devices saved, {} attached",
            snap.transports.len(),
            transports.len()
        )));
    }
    snap.vm.restore(vm)?;
    let fds = restore_vcpus(vm, cpuid, &snap.vcpus)?;
    for (i, (transport, saved)) in transports.iter().zip(&snap.transports).enumerate() {
        lock(transport)
            .restore(saved)
            .map_err(|e| SnapshotError::Device(format!("virtio device {i}: {e}")))?;
    }
    Ok(fds)
}

/// Locks a device, recovering it if a thread panicked while holding it.
fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// New vCPUs of `vm` in the saved states.
fn restore_vcpus(vm: &VmFd, cpuid: &CpuId, states: &[VcpuState]) -> Result<Vec<VcpuFd>, SnapshotError> {
    let count = u8::try_from(states.len()).map_err(|_| SnapshotError::Device("too many vCPUs".into()))?;
    let mut fds = Vec::with_capacity(states.len());
    for (id, state) in states.iter().enumerate() {
        let fd = create_vcpu(vm, cpuid, id as u8, count).map_err(|e| SnapshotError::Device(format!("vcpu{id}: {e}")))?;
        state.restore(&fd)?;
        fds.push(fd);
    }
    Ok(fds)
}

impl Vm {
    /// Takes every vCPU out of `KVM_RUN` and its thread, its last exit completed.
    fn pause_vcpus(&mut self, threads: &mut Vec<JoinHandle<Option<VcpuFd>>>) -> Result<Vec<VcpuFd>, SnapshotError> {
        self.exit.pause.store(true, Ordering::SeqCst);
        let fds = join_vcpus(std::mem::take(threads));
        self.exit.pause.store(false, Ordering::SeqCst);
        if fds.len() != usize::from(self.vcpu_count) || self.exit.stop.load(Ordering::SeqCst) {
            return Err(SnapshotError::Unsupported("the guest ended while it was being paused".into()));
        }
        Ok(fds)
    }

    /// Pauses every vCPU, captures the KVM state, and continues in a fresh KVM VM restored
    /// from it (see [`super::VmBuilder::relocate_after`]); returns how long the guest stood
    /// still.
    pub(super) fn relocate(&mut self, threads: &mut Vec<JoinHandle<Option<VcpuFd>>>) -> Result<Duration, SnapshotError> {
        let start = Instant::now();
        let fds = self.pause_vcpus(threads)?;
        let msrs = snapshot::msr_indices(&self.kvm)?;
        let states = fds.iter().map(|fd| VcpuState::capture(fd, &msrs)).collect::<Result<Vec<_>, _>>()?;
        let old = self.vm.take().ok_or_else(|| SnapshotError::Unsupported("no KVM VM".into()))?;
        let machine = VmState::capture(&old)?;
        tracing::info!(
            "captured {} vCPU(s) ({} MSRs each, RIP {:#x}) and the irqchip/PIT/clock",
            states.len(),
            states[0].msrs.len(),
            states[0].regs.rip
        );
        // Some hosts (PVM) allow one VM per process: the old one goes first.
        drop(fds);
        drop(old);
        let device = |e: crate::Error| SnapshotError::Device(e.to_string());
        let vm = create_machine(&self.kvm, &self.mem).map_err(device)?;
        self.wiring.apply(&vm).map_err(device)?;
        machine.restore(&vm)?;
        let fds = restore_vcpus(&vm, &self.cpuid, &states)?;
        self.vm = Some(vm);
        *threads = self.spawn_vcpus(fds).map_err(device)?;
        Ok(start.elapsed())
    }

    /// Pauses the vCPUs, writes the snapshot into `dir` (through a temporary directory beside
    /// it) and lets the same vCPUs go on, whatever happened.
    pub(super) fn take_snapshot(
        &mut self,
        threads: &mut Vec<JoinHandle<Option<VcpuFd>>>,
        dir: &Path,
    ) -> Result<SnapshotInfo, SnapshotError> {
        if dir.exists() {
            return Err(SnapshotError::Io {
                path: dir.to_path_buf(),
                source: std::io::Error::from(std::io::ErrorKind::AlreadyExists),
            });
        }
        let start = Instant::now();
        let fds = self.pause_vcpus(threads)?;
        let result = self.write_snapshot(&fds, dir);
        match self.spawn_vcpus(fds) {
            Ok(t) => *threads = t,
            Err(e) => self.exit.finish(crate::VmExit::Fault {
                vcpu: 0,
                reason: "cannot resume after a snapshot".into(),
                detail: e.to_string(),
            }),
        }
        let mut info = result?;
        info.paused = start.elapsed();
        Ok(info)
    }

    fn write_snapshot(&self, fds: &[VcpuFd], dir: &Path) -> Result<SnapshotInfo, SnapshotError> {
        let msrs = snapshot::msr_indices(&self.kvm)?;
        let vcpus = fds.iter().map(|fd| VcpuState::capture(fd, &msrs)).collect::<Result<Vec<_>, _>>()?;
        let vm = self.vm.as_ref().ok_or_else(|| SnapshotError::Unsupported("no KVM VM".into()))?;
        let machine = VmState::capture(vm)?;
        let serial = lock(&self.serial).snapshot();
        let transports = self
            .transports
            .iter()
            .enumerate()
            .map(|(i, t)| lock(t).snapshot().map_err(|e| SnapshotError::Device(format!("virtio device {i}: {e}"))))
            .collect::<Result<Vec<_>, _>>()?;

        let (parent, name) = snapshot::parent_and_name(dir);
        let tmp = tempfile::Builder::new()
            .prefix(&format!(".{name}.partial-"))
            .tempdir_in(parent)
            .map_err(|source| SnapshotError::Io { path: parent.to_path_buf(), source })?;
        let mut info = SnapshotInfo::default();
        let (regions, memory_bytes) = snapshot::write_memory(&self.mem, &tmp.path().join(snapshot::MEMORY_FILE))?;
        info.memory_bytes = memory_bytes;
        let mut saved_disks = Vec::new();
        for (i, (path, _)) in self.disks.iter().enumerate().filter(|(_, (_, read_only))| !read_only) {
            info.disk_bytes += snapshot::copy_sparse(path, &snapshot::disk_file(tmp.path(), i))
                .map_err(|source| SnapshotError::Io { path: path.clone(), source })?;
            saved_disks.push(i);
        }
        info.disks = saved_disks.len();
        Snapshot {
            version: FORMAT_VERSION,
            machine: self.spec.clone(),
            regions,
            vcpus,
            vm: machine,
            serial,
            transports,
            saved_disks,
        }
        .store(tmp.path())?;
        let tmp = tmp.keep();
        std::fs::rename(&tmp, dir).map_err(|source| SnapshotError::Io { path: dir.to_path_buf(), source })?;
        Ok(info)
    }
}
