//! KVM machine state: what a paused VM's vCPUs and in-kernel devices hold, captured and put back.
//!
//! The KVM half of a snapshot (pause, capture, restore into a fresh KVM VM). [`VcpuState`] holds
//! one vCPU's architectural state (registers, segment/control registers, FPU/XSAVE, XCRs, debug
//! registers, local APIC, MSRs, pending events, MP state); [`VmState`] the in-kernel irqchip
//! (both PICs and the IOAPIC), the PIT and the KVM clock. Restore order follows what KVM needs:
//! CPUID must already be set on the vCPU (MSR and XSAVE validity depend on it); MP state and
//! registers come before the LAPIC, MSRs and events.
//!
//! A vCPU must be outside `KVM_RUN` with no exit left half-done (see
//! [`crate::vcpu::Vcpu::run`]: on a pause it re-enters once with `immediate_exit` so KVM
//! completes a pending MMIO/PIO instruction).

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_pit_state2,
    kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

/// A KVM call that failed while capturing or restoring state.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct StateError {
    /// The ioctl, by its KVM name.
    pub what: &'static str,
    /// KVM's error.
    pub source: kvm_ioctls::Error,
}

fn kvm<T>(what: &'static str, r: Result<T, kvm_ioctls::Error>) -> Result<T, StateError> {
    r.map_err(|source| StateError { what, source })
}

/// The MSRs KVM can save and restore for this host (`KVM_GET_MSR_INDEX_LIST`).
pub fn msr_indices(kvm_fd: &Kvm) -> Result<Vec<u32>, StateError> {
    Ok(kvm("KVM_GET_MSR_INDEX_LIST", kvm_fd.get_msr_index_list())?.as_slice().to_vec())
}

/// One vCPU's state.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// General-purpose registers, RIP, RFLAGS.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers, EFER, APIC base, pending interrupt.
    pub sregs: kvm_sregs,
    /// The FPU/SSE/AVX area.
    pub xsave: kvm_xsave,
    /// Extended control registers (XCR0).
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// The local APIC's registers.
    pub lapic: kvm_lapic_state,
    /// Every MSR that could be read (index, value).
    pub msrs: Vec<(u32, u64)>,
    /// Pending exceptions, interrupts, NMIs, SMM and interrupt shadow.
    pub events: kvm_vcpu_events,
    /// Runnable, halted, waiting for INIT/SIPI.
    pub mp_state: kvm_mp_state,
}

impl VcpuState {
    /// Reads the state of a vCPU that is not running; `msrs` lists the MSR indices to save
    /// (those KVM cannot read are left out, one by one).
    pub fn capture(vcpu: &VcpuFd, msrs: &[u32]) -> Result<Self, StateError> {
        let mut saved = Vec::with_capacity(msrs.len());
        for chunk in msrs.chunks(64) {
            let entries: Vec<kvm_msr_entry> =
                chunk.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
            let mut list = Msrs::from_entries(&entries).map_err(|_| StateError {
                what: "KVM_GET_MSRS",
                source: kvm_ioctls::Error::new(libc::E2BIG),
            })?;
            let n = kvm("KVM_GET_MSRS", vcpu.get_msrs(&mut list))?;
            if n == chunk.len() {
                saved.extend(list.as_slice().iter().map(|e| (e.index, e.data)));
                continue;
            }
            // KVM stops at the first MSR it cannot read: take them one at a time.
            for &index in chunk {
                let mut one = Msrs::from_entries(&[kvm_msr_entry { index, ..Default::default() }]).map_err(|_| {
                    StateError { what: "KVM_GET_MSRS", source: kvm_ioctls::Error::new(libc::E2BIG) }
                })?;
                if kvm("KVM_GET_MSRS", vcpu.get_msrs(&mut one))? == 1 {
                    saved.push((index, one.as_slice()[0].data));
                }
            }
        }
        Ok(Self {
            regs: kvm("KVM_GET_REGS", vcpu.get_regs())?,
            sregs: kvm("KVM_GET_SREGS", vcpu.get_sregs())?,
            xsave: kvm("KVM_GET_XSAVE", vcpu.get_xsave())?,
            xcrs: kvm("KVM_GET_XCRS", vcpu.get_xcrs())?,
            debugregs: kvm("KVM_GET_DEBUGREGS", vcpu.get_debug_regs())?,
            lapic: kvm("KVM_GET_LAPIC", vcpu.get_lapic())?,
            msrs: saved,
            events: kvm("KVM_GET_VCPU_EVENTS", vcpu.get_vcpu_events())?,
            mp_state: kvm("KVM_GET_MP_STATE", vcpu.get_mp_state())?,
        })
    }

    /// Writes the state into a fresh vCPU whose CPUID is already set.
    pub fn restore(&self, vcpu: &VcpuFd) -> Result<(), StateError> {
        kvm("KVM_SET_MP_STATE", vcpu.set_mp_state(self.mp_state))?;
        kvm("KVM_SET_REGS", vcpu.set_regs(&self.regs))?;
        kvm("KVM_SET_SREGS", vcpu.set_sregs(&self.sregs))?;
        // SAFETY: `xsave` came from KVM_GET_XSAVE on a vCPU of this host (the legacy 4 KiB
        // area, which is what this call reads).
        kvm("KVM_SET_XSAVE", unsafe { vcpu.set_xsave(&self.xsave) })?;
        kvm("KVM_SET_XCRS", vcpu.set_xcrs(&self.xcrs))?;
        kvm("KVM_SET_DEBUGREGS", vcpu.set_debug_regs(&self.debugregs))?;
        kvm("KVM_SET_LAPIC", vcpu.set_lapic(&self.lapic))?;
        let entries: Vec<kvm_msr_entry> =
            self.msrs.iter().map(|&(index, data)| kvm_msr_entry { index, data, ..Default::default() }).collect();
        for chunk in entries.chunks(64) {
            let list = Msrs::from_entries(chunk)
                .map_err(|_| StateError { what: "KVM_SET_MSRS", source: kvm_ioctls::Error::new(libc::E2BIG) })?;
            let n = kvm("KVM_SET_MSRS", vcpu.set_msrs(&list))?;
            if n != chunk.len() {
                tracing::warn!("KVM_SET_MSRS: MSR {:#x} refused", chunk[n].index);
                return Err(StateError { what: "KVM_SET_MSRS", source: kvm_ioctls::Error::new(libc::EINVAL) });
            }
        }
        kvm("KVM_SET_VCPU_EVENTS", vcpu.set_vcpu_events(&self.events))?;
        Ok(())
    }
}

/// The VM-wide in-kernel device state.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmState {
    /// PIC master, PIC slave, IOAPIC.
    pub irqchips: [kvm_irqchip; 3],
    /// The i8254 timer.
    pub pit: kvm_pit_state2,
    /// kvmclock's time base.
    pub clock: kvm_clock_data,
}

const CHIPS: [u32; 3] = [KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQCHIP_IOAPIC];

impl VmState {
    /// Reads the state of a VM whose vCPUs are not running.
    pub fn capture(vm: &VmFd) -> Result<Self, StateError> {
        let mut irqchips = [kvm_irqchip::default(); 3];
        for (chip, id) in irqchips.iter_mut().zip(CHIPS) {
            chip.chip_id = id;
            kvm("KVM_GET_IRQCHIP", vm.get_irqchip(chip))?;
        }
        let mut clock = kvm("KVM_GET_CLOCK", vm.get_clock())?;
        // KVM_SET_CLOCK takes only the value; the flags it reported (e.g. TSC-stable) are not
        // flags it accepts.
        clock.flags = 0;
        Ok(Self { irqchips, pit: kvm("KVM_GET_PIT2", vm.get_pit2())?, clock })
    }

    /// Writes the state into a fresh VM that already has its irqchip and PIT.
    pub fn restore(&self, vm: &VmFd) -> Result<(), StateError> {
        kvm("KVM_SET_PIT2", vm.set_pit2(&self.pit))?;
        kvm("KVM_SET_CLOCK", vm.set_clock(&self.clock))?;
        for chip in &self.irqchips {
            kvm("KVM_SET_IRQCHIP", vm.set_irqchip(chip))?;
        }
        Ok(())
    }
}
