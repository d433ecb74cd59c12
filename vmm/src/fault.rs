//! Diagnosing a dead guest: where it stopped and which instruction it was on.
//!
//! On `KVM_EXIT_INTERNAL_ERROR`, `KVM_EXIT_SHUTDOWN` (triple fault) or `KVM_EXIT_FAIL_ENTRY` the
//! VMM reports RIP, the translated guest-physical address and the instruction bytes there, so
//! RIP can be mapped through the guest's System.map. Translation asks KVM first and falls back
//! to walking the guest's 4-level page tables from CR3 (PVM may not implement KVM_TRANSLATE).

use kvm_bindings::{kvm_regs, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use boot::GuestMemoryMmap;

const CR0_PG: u64 = 1 << 31;
const PTE_PRESENT: u64 = 1;
const PTE_HUGE: u64 = 1 << 7;
const PTE_ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
/// Bytes of instruction shown (the longest x86 instruction is 15 bytes).
const INSN_BYTES: usize = 16;

/// Walks 4-level page tables rooted at `cr3` for `gva`.
pub fn walk_page_tables(mem: &GuestMemoryMmap, cr3: u64, gva: u64) -> Option<u64> {
    let mut table = cr3 & PTE_ADDR_MASK;
    // (shift, is this level allowed to map a huge page)
    for (level, shift) in [39u32, 30, 21, 12].into_iter().enumerate() {
        let index = (gva >> shift) & 0x1ff;
        let entry: u64 = mem.read_obj(GuestAddress(table + index * 8)).ok()?;
        if entry & PTE_PRESENT == 0 {
            return None;
        }
        let huge = (level == 1 || level == 2) && entry & PTE_HUGE != 0;
        if huge || level == 3 {
            let page_mask = (1u64 << shift) - 1;
            return Some((entry & PTE_ADDR_MASK & !page_mask) | (gva & page_mask));
        }
        table = entry & PTE_ADDR_MASK;
    }
    None
}

/// A one-paragraph description of where `vcpu` stopped.
pub fn describe(vcpu: &VcpuFd, mem: &GuestMemoryMmap) -> String {
    let (regs, sregs): (kvm_regs, kvm_sregs) = match (vcpu.get_regs(), vcpu.get_sregs()) {
        (Ok(r), Ok(s)) => (r, s),
        (Err(e), _) | (_, Err(e)) => return format!("(cannot read vCPU registers: {e})"),
    };
    let linear = sregs.cs.base.wrapping_add(regs.rip);
    let gpa = if sregs.cr0 & CR0_PG == 0 {
        Some(linear)
    } else {
        match vcpu.translate_gva(linear) {
            Ok(t) if t.valid != 0 => Some(t.physical_address),
            _ => walk_page_tables(mem, sregs.cr3, linear),
        }
    };
    let bytes = gpa
        .and_then(|gpa| {
            let mut buf = [0u8; INSN_BYTES];
            mem.read_slice(&mut buf, GuestAddress(gpa)).ok().map(|_| buf)
        })
        .map(|b| {
            b.iter()
                .map(|x| format!("{x:02x}"))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_else(|| "unavailable".into());
    let gpa = gpa.map_or_else(|| "untranslatable".into(), |g| format!("{g:#x}"));
    format!(
        "RIP {:#018x} (GPA {gpa}) instruction bytes [{bytes}]; RSP {:#x} RFLAGS {:#x} CR0 {:#x} CR3 {:#x} CR4 {:#x} EFER {:#x} CS.sel {:#x} CPL {}",
        regs.rip,
        regs.rsp,
        regs.rflags,
        sregs.cr0,
        sregs.cr3,
        sregs.cr4,
        sregs.efer,
        sregs.cs.selector,
        sregs.cs.dpl,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryBackend;

    #[test]
    fn walks_4k_and_2m_mappings() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let w = |addr: u64, v: u64| mem.write_obj(v, GuestAddress(addr)).unwrap();
        // gva 0xffff_8000_0020_1123: pml4[256] -> 0x2000, pdpt[0] -> 0x3000, pd[1] -> 0x4000 pt
        w(0x1000 + 256 * 8, 0x2000 | 3);
        w(0x2000, 0x3000 | 3);
        w(0x3000 + 8, 0x4000 | 3);
        w(0x4000 + 8, 0x77_7000 | 3);
        assert_eq!(
            walk_page_tables(&mem, 0x1000, 0xffff_8000_0020_1123),
            Some(0x77_7123)
        );
        // pd[2] is a 2 MiB page at 0x60_0000.
        w(0x3000 + 16, 0x60_0000 | 3 | PTE_HUGE);
        assert_eq!(
            walk_page_tables(&mem, 0x1000, 0xffff_8000_0041_2345),
            Some(0x61_2345)
        );
        assert_eq!(walk_page_tables(&mem, 0x1000, 0x1234), None);
        assert!(mem.num_regions() == 1);
    }
}
