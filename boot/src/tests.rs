use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::cpu::{boot_gdt, boot_sregs, gdt_entry, segment_from_gdt, BootProtocol};
use crate::layout::*;
use crate::{mptable, GuestMemoryMmap};

fn guest(size: u64) -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&ram_regions(size).unwrap()).unwrap()
}

#[test]
fn ram_regions_split_around_the_mmio_gap() {
    assert!(ram_regions(1 << 20).is_err());
    assert_eq!(ram_regions(256 << 20).unwrap(), vec![(GuestAddress(0), 256 << 20)]);
    let big = ram_regions(4 << 30).unwrap();
    assert_eq!(big[0], (GuestAddress(0), MMIO_GAP_START as usize));
    assert_eq!(big[1], (GuestAddress(MMIO_GAP_END), (1 << 30) as usize));
}

#[test]
fn gdt_entries_round_trip_to_segments() {
    let code = segment_from_gdt(gdt_entry(0xa09b, 0, 0xfffff), 1);
    assert_eq!((code.l, code.db, code.g, code.present, code.s, code.type_), (1, 0, 1, 1, 1, 0xb));
    assert_eq!(code.limit, 0xffff_ffff);
    assert_eq!(code.selector, 8);
    let odd = segment_from_gdt(gdt_entry(0x0093, 0x1234_5678, 0xabcde), 2);
    assert_eq!(odd.base, 0x1234_5678);
    assert_eq!(odd.limit, 0xabcde);
    assert_eq!(odd.g, 0);
    assert_eq!(segment_from_gdt(0, 0).unusable, 1);
}

#[test]
fn long_mode_sregs_and_identity_map() {
    let mem = guest(128 << 20);
    let sregs = boot_sregs(&mem, BootProtocol::Linux64, Default::default()).unwrap();
    assert_eq!(sregs.cr3, PML4_START);
    assert_ne!(sregs.cr0 & (1 << 31), 0, "paging on");
    assert_ne!(sregs.efer & (1 << 10), 0, "long mode active");
    assert_eq!(sregs.cs.l, 1);
    let gdt0: u64 = mem.read_obj(GuestAddress(BOOT_GDT_START + 8)).unwrap();
    assert_eq!(gdt0, boot_gdt(BootProtocol::Linux64)[1]);
    // The 2 MiB page that holds 0x1000000 (where vmlinux lives) maps to itself.
    let pde: u64 = mem.read_obj(GuestAddress(PDE_START + 8 * 8)).unwrap();
    assert_eq!(pde & !0xfff, 8 * (2 << 20));
}

#[test]
fn pvh_sregs_are_flat_protected_mode() {
    let mem = guest(128 << 20);
    let sregs = boot_sregs(&mem, BootProtocol::Pvh, Default::default()).unwrap();
    assert_eq!(sregs.cr0 & 1, 1);
    assert_eq!(sregs.cr0 & (1 << 31), 0);
    assert_eq!(sregs.efer, 0);
    assert_eq!((sregs.cs.db, sregs.cs.l, sregs.cs.limit), (1, 0, 0xffff_ffff));
}

#[test]
fn mptable_checksums_and_counts() {
    let mem = guest(128 << 20);
    mptable::write_mptable(&mem, 2).unwrap();
    let mut mpf = [0u8; 16];
    mem.read_slice(&mut mpf, GuestAddress(EBDA_START)).unwrap();
    assert_eq!(&mpf[..4], b"_MP_");
    assert_eq!(mpf.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
    let table = u32::from_le_bytes(mpf[4..8].try_into().unwrap()) as u64;
    let mut hdr = [0u8; 44];
    mem.read_slice(&mut hdr, GuestAddress(table)).unwrap();
    assert_eq!(&hdr[..4], b"PCMP");
    let len = u16::from_le_bytes([hdr[4], hdr[5]]) as usize;
    assert_eq!(len + 16, mptable::table_size(2));
    let mut all = vec![0u8; len];
    mem.read_slice(&mut all, GuestAddress(table)).unwrap();
    assert_eq!(all.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
    // The largest table fits in the KiB of the EBDA that Linux scans, below the VGA hole.
    assert!(mptable::table_size(mptable::MAX_CPUS) <= 1024);
    const { assert!(EBDA_START + 1024 <= LOW_MEMORY_END) };
    assert!(mptable::write_mptable(&mem, mptable::MAX_CPUS).is_ok());
    assert!(mptable::write_mptable(&mem, 0).is_err());
    assert!(mptable::write_mptable(&mem, mptable::MAX_CPUS + 1).is_err());
    let _ = mem.num_regions();
}

#[test]
fn virtio_windows_and_irqs() {
    assert_eq!(virtio_mmio_window(1), VIRTIO_MMIO_START + 0x1000);
    assert_eq!(virtio_irq(0), Some(VIRTIO_IRQ_START));
    assert_eq!(virtio_irq((IRQ_MAX - VIRTIO_IRQ_START) as usize), Some(IRQ_MAX));
    assert_eq!(virtio_irq((IRQ_MAX - VIRTIO_IRQ_START + 1) as usize), None);
}

#[test]
fn cpuid_topology_leaves_name_the_vcpu_not_the_host_cpu() {
    use kvm_bindings::{kvm_cpuid_entry2, CpuId};
    let entry = |function, edx| kvm_cpuid_entry2 { function, edx, ..Default::default() };
    // KVM copies EDX (the x2APIC ID) of whichever host CPU answered.
    let mut cpuid = CpuId::from_entries(&[entry(0x1, 0), entry(0xb, 5), entry(0x1f, 5), entry(0x7, 5)]).unwrap();
    crate::cpu::filter_cpuid(&mut cpuid, 1, 2);
    let edx: Vec<(u32, u32)> = cpuid.as_slice().iter().map(|e| (e.function, e.edx)).collect();
    assert_eq!(edx[1..], [(0xb, 1), (0x1f, 1), (0x7, 5)]);
    assert_eq!(cpuid.as_slice()[0].ebx >> 24, 1, "initial APIC ID");
    assert_eq!((cpuid.as_slice()[0].ebx >> 16) & 0xff, 2, "logical processors");
}
