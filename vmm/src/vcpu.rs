//! vCPU threads: one per vCPU, each looping on `KVM_RUN`.
//!
//! Port and MMIO exits are dispatched to the shared [`IoManager`]. A guest reset (i8042 or a
//! KVM system event) ends the VM cleanly; an internal error (emulation failure), a triple fault
//! (`KVM_EXIT_SHUTDOWN`) or a failed entry ends it with a diagnosis from [`crate::fault`].
//! The VMM stops a running vCPU by setting [`ExitState::stop`] and signalling its thread with
//! [`VCPU_KICK_SIGNAL`], which makes `KVM_RUN` return `EINTR`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use kvm_bindings::{KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_device::bus::{MmioAddress, PioAddress};
use vm_device::device_manager::{IoManager, MmioManager, PioManager};
use vmm_sys_util::eventfd::EventFd;

use boot::GuestMemoryMmap;

use crate::VmExit;

/// Real-time signal used to kick vCPU threads out of `KVM_RUN`.
pub fn vcpu_kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

/// Shared between the vCPU threads and the VMM's main loop: why the VM ended.
#[derive(Debug)]
pub struct ExitState {
    /// Signalled once a reason is recorded.
    pub evt: EventFd,
    /// The first reason recorded wins.
    pub reason: Mutex<Option<VmExit>>,
    /// Set when vCPUs must stop.
    pub stop: AtomicBool,
    /// Set when vCPUs must leave their threads with their state intact (a snapshot).
    pub pause: AtomicBool,
}

impl ExitState {
    /// A fresh state.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            evt: EventFd::new(libc::EFD_NONBLOCK)?,
            reason: Mutex::new(None),
            stop: AtomicBool::new(false),
            pause: AtomicBool::new(false),
        })
    }

    /// Records `exit` unless a reason is already known, then wakes the main loop.
    pub fn finish(&self, exit: VmExit) {
        {
            let mut reason = self.reason.lock().unwrap_or_else(|e| e.into_inner());
            if reason.is_none() {
                *reason = Some(exit);
            }
        }
        self.stop.store(true, Ordering::SeqCst);
        if let Err(e) = self.evt.write(1) {
            tracing::error!("cannot signal VM exit: {e}");
        }
    }
}

/// What a `KVM_RUN` exit means for the loop.
enum Step {
    Continue,
    /// `KVM_RUN` returned `EINTR`: a kick (stop, pause, profiler sample) or `immediate_exit`.
    Interrupted,
    Exit(VmExit),
}

/// One vCPU and what it needs to run.
pub struct Vcpu {
    /// Index (also the APIC ID).
    pub id: u8,
    /// The KVM vCPU.
    pub fd: VcpuFd,
    /// Port and MMIO devices.
    pub io: Arc<IoManager>,
    /// Guest memory (for fault diagnosis).
    pub mem: GuestMemoryMmap,
    /// Where the VM's end is recorded.
    pub exit: Arc<ExitState>,
    /// Guest profiler, when enabled: a kick out of `KVM_RUN` is a sample.
    pub profile: Option<Arc<crate::profile::Profile>>,
}

impl std::fmt::Debug for Vcpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vcpu").field("id", &self.id).finish_non_exhaustive()
    }
}

impl Vcpu {
    /// Runs until the guest ends, the VMM stops the vCPU, or the VMM pauses it; returns the
    /// vCPU, whose state is complete (no exit left half-handled) when it was paused.
    pub fn run(mut self) -> VcpuFd {
        while !self.exit.stop.load(Ordering::SeqCst) && !self.exit.pause.load(Ordering::SeqCst) {
            match self.step() {
                Step::Continue | Step::Interrupted => {}
                Step::Exit(exit) => {
                    self.exit.finish(exit);
                    break;
                }
            }
        }
        if self.exit.pause.load(Ordering::SeqCst) && !self.exit.stop.load(Ordering::SeqCst) {
            self.complete_pending_exit();
        }
        tracing::debug!("vcpu{} left its thread", self.id);
        self.fd
    }

    /// Lets KVM finish the instruction behind the last MMIO/PIO exit (its data is in `kvm_run`,
    /// which a restored vCPU would not have): `KVM_RUN` with `immediate_exit` completes it and
    /// returns `EINTR` without entering the guest.
    fn complete_pending_exit(&mut self) {
        self.fd.set_kvm_immediate_exit(1);
        for _ in 0..8 {
            match self.step() {
                Step::Interrupted => break,
                // An exit that was already on its way out (a string I/O instruction's next
                // round) is handled like any other.
                Step::Continue => {}
                Step::Exit(exit) => {
                    self.exit.finish(exit);
                    break;
                }
            }
        }
        self.fd.set_kvm_immediate_exit(0);
    }

    fn fault(&self, what: String) -> Step {
        let detail = crate::fault::describe(&self.fd, &self.mem);
        Step::Exit(VmExit::Fault {
            vcpu: self.id,
            reason: what,
            detail,
        })
    }

    fn step(&mut self) -> Step {
        let io = &self.io;
        let outcome = match self.fd.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                // Unclaimed ports read as all ones, as on real hardware.
                data.fill(0xff);
                let _ = io.pio_read(PioAddress(port), data);
                return Step::Continue;
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                let _ = io.pio_write(PioAddress(port), data);
                return Step::Continue;
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if io.mmio_read(MmioAddress(addr), data).is_err() {
                    data.fill(0);
                    tracing::debug!("vcpu{}: MMIO read from unclaimed {addr:#x}", self.id);
                }
                return Step::Continue;
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                if io.mmio_write(MmioAddress(addr), data).is_err() {
                    tracing::debug!("vcpu{}: MMIO write to unclaimed {addr:#x}", self.id);
                }
                return Step::Continue;
            }
            // With the in-kernel irqchip HLT does not exit; if it does, just re-enter.
            Ok(VcpuExit::Hlt) => return Step::Continue,
            Ok(VcpuExit::SystemEvent(kind, _))
                if kind == KVM_SYSTEM_EVENT_RESET || kind == KVM_SYSTEM_EVENT_SHUTDOWN =>
            {
                return Step::Exit(VmExit::Reset)
            }
            Ok(VcpuExit::SystemEvent(kind, data)) => {
                Err(format!("KVM system event {kind} {data:?}"))
            }
            Ok(VcpuExit::Shutdown) => Err("triple fault (KVM_EXIT_SHUTDOWN)".to_string()),
            Ok(VcpuExit::FailEntry(reason, cpu)) => Err(format!(
                "VM entry failed (KVM_EXIT_FAIL_ENTRY, hardware reason {reason:#x}, cpu {cpu})"
            )),
            Ok(VcpuExit::InternalError) => Ok(()),
            Ok(other) => Err(format!("unexpected KVM exit {other:?}")),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                if let Some(profile) = &self.profile {
                    profile.sample(&self.fd);
                }
                return Step::Interrupted;
            }
            Err(e) => Err(format!("KVM_RUN failed: {e}")),
        };
        match outcome {
            Err(what) => self.fault(what),
            // The internal-error details live in kvm_run, readable once the exit is dropped.
            Ok(()) => {
                let run = self.fd.get_kvm_run();
                // SAFETY: exit_reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the active
                // member of the exit union.
                let internal = unsafe { run.__bindgen_anon_1.internal };
                let ndata = (internal.ndata as usize).min(internal.data.len());
                let what = format!(
                    "KVM internal error (KVM_EXIT_INTERNAL_ERROR suberror {}{}), data {:x?}",
                    internal.suberror,
                    if internal.suberror == kvm_bindings::KVM_INTERNAL_ERROR_EMULATION {
                        ": emulation failure"
                    } else {
                        ""
                    },
                    &internal.data[..ndata]
                );
                self.fault(what)
            }
        }
    }
}
