//! Initial vCPU state: GDT, identity page tables, segment and control registers, general
//! registers, MSRs, FPU and local APIC LVT entries.
//!
//! Two entry protocols are supported (see [`BootProtocol`]):
//! - Linux 64-bit boot protocol (Documentation/arch/x86/boot.rst, "64-bit boot protocol"):
//!   long mode, paging on with an identity map covering the kernel, `rsi` = zero page.
//! - PVH (xen/include/public/arch-x86/hvm/start_info.h): 32-bit protected mode, paging off,
//!   `ebx` = `hvm_start_info`.
//!
//! Architectural constants below (MSR indices, CR/EFER bits) come from the Intel SDM vol. 3/4;
//! `kvm-bindings` does not export them.

use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress};

use crate::layout::{
    BOOT_GDT_MAX, BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PDE_START, PDPTE_START,
    PML4_START, PVH_INFO_START, ZERO_PAGE_START,
};
use crate::{Error, GuestMemoryMmap, Result};

/// How the kernel is entered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootProtocol {
    /// Linux 64-bit boot protocol: long mode, `rsi` points to the zero page.
    Linux64,
    /// PVH: 32-bit protected mode without paging, `ebx` points to `hvm_start_info`.
    Pvh,
}

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// Reserved bit 1 of RFLAGS, which always reads as one.
const RFLAGS_RESERVED: u64 = 1 << 1;

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_IA32_MISC_ENABLE_FAST_STRING: u64 = 1;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

/// Page-table entry bits.
const PTE_PRESENT: u64 = 1 << 0;
const PTE_WRITABLE: u64 = 1 << 1;
const PTE_HUGE: u64 = 1 << 7;
/// Size of one page-directory mapping (2 MiB pages).
const HUGE_PAGE_SIZE: u64 = 2 << 20;

/// x87 control word after FNINIT.
const FPU_FCW_DEFAULT: u16 = 0x37f;
/// MXCSR after reset: all SIMD exceptions masked.
const MXCSR_DEFAULT: u32 = 0x1f80;

/// Local APIC register offsets and delivery modes (Intel SDM vol. 3, 11.5.1).
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// GDT selectors (index × 8) used at entry.
const GDT_CODE: u8 = 1;
const GDT_DATA: u8 = 2;
const GDT_TSS: u8 = 3;

/// Encodes a GDT descriptor. `flags` holds the access byte in bits 0-7 and the
/// AVL/L/D-B/G nibble in bits 12-15, as in the descriptor's bytes 5-6.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let base = base as u64;
    let limit = limit as u64;
    ((base & 0xff00_0000) << 32)
        | (((flags as u64) & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

/// Decodes a GDT descriptor into the form `KVM_SET_SREGS` takes (byte-granular limit).
pub fn segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let bit = |n: u32| ((entry >> n) & 1) as u8;
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0x000f_0000)) as u32;
    let g = bit(55);
    let limit = if g == 1 { (raw_limit << 12) | 0xfff } else { raw_limit };
    let present = bit(47);
    kvm_segment {
        base,
        limit,
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g,
        avl: bit(52),
        padding: 0,
        unusable: u8::from(present == 0),
    }
}

/// The GDT installed for `protocol`: null, code, data, TSS.
pub fn boot_gdt(protocol: BootProtocol) -> [u64; BOOT_GDT_MAX] {
    let code = match protocol {
        // Present, DPL 0, execute/read, accessed; G=1, L=1.
        BootProtocol::Linux64 => gdt_entry(0xa09b, 0, 0xfffff),
        // Present, DPL 0, execute/read, accessed; G=1, D=1 (32-bit).
        BootProtocol::Pvh => gdt_entry(0xc09b, 0, 0xfffff),
    };
    [
        gdt_entry(0, 0, 0),
        code,
        // Present, DPL 0, read/write, accessed; G=1, B=1.
        gdt_entry(0xc093, 0, 0xfffff),
        // Present, 32/64-bit busy TSS.
        gdt_entry(0x808b, 0, 0xfffff),
    ]
}

fn write_u64(mem: &GuestMemoryMmap, addr: u64, val: u64, what: &'static str) -> Result<()> {
    mem.write_obj(val, GuestAddress(addr))
        .map_err(|source| Error::GuestMemory { what, source })
}

/// Writes the GDT and an empty IDT to guest memory.
pub fn write_descriptor_tables(mem: &GuestMemoryMmap, protocol: BootProtocol) -> Result<()> {
    for (i, entry) in boot_gdt(protocol).iter().enumerate() {
        write_u64(mem, BOOT_GDT_START + 8 * i as u64, *entry, "GDT")?;
    }
    write_u64(mem, BOOT_IDT_START, 0, "IDT")
}

/// Writes identity page tables mapping the first 1 GiB with 2 MiB pages (enough for the
/// kernel image, which builds its own tables early on).
pub fn write_identity_page_tables(mem: &GuestMemoryMmap) -> Result<()> {
    write_u64(mem, PML4_START, PDPTE_START | PTE_PRESENT | PTE_WRITABLE, "PML4")?;
    write_u64(mem, PDPTE_START, PDE_START | PTE_PRESENT | PTE_WRITABLE, "PDPTE")?;
    for i in 0..512u64 {
        let entry = (i * HUGE_PAGE_SIZE) | PTE_PRESENT | PTE_WRITABLE | PTE_HUGE;
        write_u64(mem, PDE_START + i * 8, entry, "PDE")?;
    }
    Ok(())
}

/// Special registers for the boot CPU, starting from the vCPU's reset state `sregs`.
/// Writes the GDT/IDT (and page tables for [`BootProtocol::Linux64`]) to guest memory.
pub fn boot_sregs(
    mem: &GuestMemoryMmap,
    protocol: BootProtocol,
    mut sregs: kvm_sregs,
) -> Result<kvm_sregs> {
    write_descriptor_tables(mem, protocol)?;
    let gdt = boot_gdt(protocol);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = (std::mem::size_of::<u64>() - 1) as u16;

    let code = segment_from_gdt(gdt[GDT_CODE as usize], GDT_CODE);
    let data = segment_from_gdt(gdt[GDT_DATA as usize], GDT_DATA);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment_from_gdt(gdt[GDT_TSS as usize], GDT_TSS);

    match protocol {
        BootProtocol::Linux64 => {
            write_identity_page_tables(mem)?;
            sregs.cr3 = PML4_START;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.cr0 |= X86_CR0_PE | X86_CR0_PG;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
        BootProtocol::Pvh => {
            sregs.cr0 = (sregs.cr0 & !X86_CR0_PG) | X86_CR0_PE;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
    }
    Ok(sregs)
}

/// General registers for the boot CPU entering the kernel at `entry`.
pub fn boot_regs(protocol: BootProtocol, entry: GuestAddress) -> kvm_regs {
    let mut regs = kvm_regs {
        rflags: RFLAGS_RESERVED,
        rip: entry.0,
        ..Default::default()
    };
    match protocol {
        BootProtocol::Linux64 => {
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
            regs.rsi = ZERO_PAGE_START;
        }
        BootProtocol::Pvh => regs.rbx = PVH_INFO_START,
    }
    regs
}

/// FPU state after FNINIT with SSE exceptions masked.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: FPU_FCW_DEFAULT,
        mxcsr: MXCSR_DEFAULT,
        ..Default::default()
    }
}

/// MSR values every vCPU starts with: SYSCALL/SYSENTER cleared, TSC at zero, fast strings on.
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    let msr = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        msr(MSR_IA32_SYSENTER_CS, 0),
        msr(MSR_IA32_SYSENTER_ESP, 0),
        msr(MSR_IA32_SYSENTER_EIP, 0),
        msr(MSR_STAR, 0),
        msr(MSR_CSTAR, 0),
        msr(MSR_KERNEL_GS_BASE, 0),
        msr(MSR_SYSCALL_MASK, 0),
        msr(MSR_LSTAR, 0),
        msr(MSR_IA32_TSC, 0),
        msr(MSR_IA32_MISC_ENABLE, MSR_IA32_MISC_ENABLE_FAST_STRING),
    ]
}

fn lapic_reg(lapic: &kvm_lapic_state, offset: usize) -> u32 {
    let mut b = [0u8; 4];
    for (i, byte) in b.iter_mut().enumerate() {
        *byte = lapic.regs[offset + i] as u8;
    }
    u32::from_le_bytes(b)
}

fn set_lapic_reg(lapic: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (i, byte) in value.to_le_bytes().iter().enumerate() {
        lapic.regs[offset + i] = *byte as _;
    }
}

/// Wires LINT0 as ExtINT (the legacy PIC) and LINT1 as NMI, as firmware would.
pub fn set_lint(lapic: &mut kvm_lapic_state) {
    let with_mode = |reg: u32, mode: u32| (reg & !0x700) | (mode << 8);
    let lvt0 = lapic_reg(lapic, APIC_LVT0);
    set_lapic_reg(lapic, APIC_LVT0, with_mode(lvt0, APIC_MODE_EXTINT));
    let lvt1 = lapic_reg(lapic, APIC_LVT1);
    set_lapic_reg(lapic, APIC_LVT1, with_mode(lvt1, APIC_MODE_NMI));
}

/// Adjusts the CPUID the host KVM supports for vCPU `cpu_id` of `cpu_count`: APIC IDs,
/// logical processor count and the hypervisor bit.
pub fn filter_cpuid(cpuid: &mut kvm_bindings::CpuId, cpu_id: u8, cpu_count: u8) {
    const LEAF_FEATURES: u32 = 0x1;
    const LEAF_EXT_TOPOLOGY: u32 = 0xb;
    /// V2 extended topology: like 0xb, EDX is the x2APIC ID of the CPU that runs CPUID (KVM
    /// reports whichever host CPU answered the ioctl).
    const LEAF_EXT_TOPOLOGY_V2: u32 = 0x1f;
    const ECX_HYPERVISOR: u32 = 1 << 31;
    const EDX_HTT: u32 = 1 << 28;
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            LEAF_FEATURES => {
                entry.ebx = (entry.ebx & 0x0000_ffff)
                    | (u32::from(cpu_id) << 24)
                    | (u32::from(cpu_count) << 16);
                entry.ecx |= ECX_HYPERVISOR;
                if cpu_count > 1 {
                    entry.edx |= EDX_HTT;
                }
            }
            LEAF_EXT_TOPOLOGY | LEAF_EXT_TOPOLOGY_V2 => entry.edx = u32::from(cpu_id),
            _ => {}
        }
    }
}
