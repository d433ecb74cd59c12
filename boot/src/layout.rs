//! Guest physical memory layout (x86_64).
//!
//! ```text
//! 0x0000_0500  GDT                      0x0000_9000  PML4 (identity page tables follow)
//! 0x0000_0520  IDT (empty)              0x0002_0000  kernel command line
//! 0x0000_6000  PVH hvm_start_info       0x0009_fc00  MP table (start of the EBDA)
//! 0x0000_6040  PVH memory map           0x0010_0000  kernel (high memory starts here)
//! 0x0000_7000  Linux zero page          0xc000_0000  32-bit MMIO gap (virtio-mmio, I/O APIC, LAPIC)
//! 0x0000_8ff0  boot stack pointer       0x1_0000_0000 RAM above the gap, when there is more
//! ```
//! RAM is one region below the MMIO gap and, for guests larger than the gap start, a second
//! region from 4 GiB.

use vm_memory::GuestAddress;

/// Global descriptor table used while entering the kernel.
pub const BOOT_GDT_START: u64 = 0x500;
/// Number of GDT entries we install.
pub const BOOT_GDT_MAX: usize = 4;
/// An empty interrupt descriptor table (interrupts stay off until the kernel sets its own).
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info` structure (the `ebx` argument of the PVH entry point).
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH memory map entries, right after `hvm_start_info`.
pub const PVH_MEMMAP_START: u64 = 0x6040;
/// Linux "zero page" (`struct boot_params`, the `rsi` argument of the 64-bit entry point).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer for the boot CPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Page-map level 4 table of the boot identity map.
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table of the boot identity map.
pub const PDPTE_START: u64 = 0xa000;
/// Page directory of the boot identity map (512 × 2 MiB = the first 1 GiB).
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Maximum command line length, terminator included (x86 `COMMAND_LINE_SIZE`).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the extended BIOS data area; Linux scans its first KiB for the MP table.
pub const EBDA_START: u64 = 0x9fc00;
/// End of the legacy low memory (VGA hole and BIOS area follow).
pub const LOW_MEMORY_END: u64 = 0xa0000;
/// Where the kernel and high memory start.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO gap below 4 GiB.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO gap.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// First virtio-mmio device window (each device gets [`VIRTIO_MMIO_SIZE`] bytes).
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// Size of one virtio-mmio device window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// I/O APIC registers (fixed by KVM's in-kernel irqchip).
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Local APIC registers.
pub const APIC_START: u64 = 0xfee0_0000;
/// The legacy COM1 UART port and IRQ.
pub const COM1_PORT: u16 = 0x3f8;
/// COM1 interrupt line.
pub const COM1_IRQ: u32 = 4;
/// i8042 keyboard controller ports (data, command/status).
pub const I8042_DATA_PORT: u16 = 0x60;
/// First interrupt line handed to virtio devices.
pub const VIRTIO_IRQ_START: u32 = 5;
/// Last usable interrupt line on the I/O APIC (24 pins).
pub const IRQ_MAX: u32 = 23;
/// Smallest guest we agree to build: the boot structures, the kernel and a little room.
pub const MIN_MEMORY_SIZE: u64 = 64 << 20;

/// The RAM regions for a guest with `mem_size` bytes of memory.
pub fn ram_regions(mem_size: u64) -> crate::Result<Vec<(GuestAddress, usize)>> {
    if mem_size < MIN_MEMORY_SIZE {
        return Err(crate::Error::MemorySize(mem_size));
    }
    let to_usize = |n: u64| usize::try_from(n).map_err(|_| crate::Error::MemorySize(mem_size));
    if mem_size <= MMIO_GAP_START {
        return Ok(vec![(GuestAddress(0), to_usize(mem_size)?)]);
    }
    Ok(vec![
        (GuestAddress(0), to_usize(MMIO_GAP_START)?),
        (GuestAddress(MMIO_GAP_END), to_usize(mem_size - MMIO_GAP_START)?),
    ])
}

/// Guest physical window of the `index`-th virtio-mmio device.
pub fn virtio_mmio_window(index: usize) -> u64 {
    VIRTIO_MMIO_START + index as u64 * VIRTIO_MMIO_SIZE
}

/// Interrupt line of the `index`-th virtio-mmio device, if one is left.
pub fn virtio_irq(index: usize) -> Option<u32> {
    let irq = VIRTIO_IRQ_START.checked_add(u32::try_from(index).ok()?)?;
    (irq <= IRQ_MAX).then_some(irq)
}
