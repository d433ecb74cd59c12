//! Hand-assembled guest payloads packed as minimal ELF64 images, to test how the VMM reacts
//! to guests that die (no real kernel involved).
//!
//! The image has one `PT_LOAD` segment at [`LOAD_ADDR`] and, when a PVH entry is wanted, a
//! `PT_NOTE` with `XEN_ELFNOTE_PHYS32_ENTRY` pointing at the same code.

/// Guest physical address the payload is loaded at (the kernel's usual 1 MiB).
pub const LOAD_ADDR: u64 = 0x10_0000;

/// `ud2` with no IDT: #UD → #GP (no descriptor) → #DF → triple fault.
pub const TRIPLE_FAULT: &[u8] = &[0x0f, 0x0b];

/// 32-bit code (PVH entry, paging off): `mov eax, 0xf0000000; jmp eax` — fetches its next
/// instruction from a guest-physical address with no memory behind it, which KVM can only try
/// to emulate, and fails.
pub const FETCH_FROM_NOWHERE: &[u8] = &[0xb8, 0x00, 0x00, 0x00, 0xf0, 0xff, 0xe0];

/// 64-bit code, interrupts off, forever: writes the alphabet to COM1 over and over, the letter
/// chosen from a counter in `rbx` (`'a' + rbx % 26`), a newline after every 64 letters. Any
/// lost register or instruction shows as a break in the sequence.
pub const ALPHABET_FOREVER: &[u8] = &[
    0x31, 0xdb, // xor ebx, ebx
    0x89, 0xd8, // loop: mov eax, ebx
    0x31, 0xd2, // xor edx, edx
    0xb9, 0x1a, 0x00, 0x00, 0x00, // mov ecx, 26
    0xf7, 0xf1, // div ecx
    0x8d, 0x42, 0x61, // lea eax, [rdx + 'a']
    0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
    0xee, // out dx, al
    0xff, 0xc3, // inc ebx
    0x89, 0xd8, // mov eax, ebx
    0x83, 0xe0, 0x3f, // and eax, 63
    0x75, 0xe4, // jnz loop
    0xb0, 0x0a, // mov al, '\n'
    0xee, // out dx, al
    0xeb, 0xdf, // jmp loop
];

const EHDR_SIZE: usize = 64;
const PHDR_SIZE: usize = 56;
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

fn put(buf: &mut Vec<u8>, bytes: &[u8]) {
    buf.extend_from_slice(bytes);
}

/// Builds an ELF64 executable around `code`; with `pvh`, adds the PVH entry note.
pub fn elf(code: &[u8], pvh: bool) -> Vec<u8> {
    let phnum: u16 = if pvh { 2 } else { 1 };
    let note_off = EHDR_SIZE + PHDR_SIZE * usize::from(phnum);
    // Note: namesz=4 ("Xen\0"), descsz=4 (u32 entry), type.
    let mut note = Vec::new();
    if pvh {
        put(&mut note, &4u32.to_le_bytes());
        put(&mut note, &4u32.to_le_bytes());
        put(&mut note, &XEN_ELFNOTE_PHYS32_ENTRY.to_le_bytes());
        put(&mut note, b"Xen\0");
        put(&mut note, &(LOAD_ADDR as u32).to_le_bytes());
    }
    let code_off = (note_off + note.len()).next_multiple_of(16);

    let mut b = Vec::new();
    // ELF header.
    put(&mut b, b"\x7fELF");
    put(&mut b, &[2, 1, 1, 0]); // 64-bit, little endian, version 1, SysV
    put(&mut b, &[0; 8]);
    put(&mut b, &2u16.to_le_bytes()); // ET_EXEC
    put(&mut b, &0x3eu16.to_le_bytes()); // EM_X86_64
    put(&mut b, &1u32.to_le_bytes());
    put(&mut b, &LOAD_ADDR.to_le_bytes()); // e_entry
    put(&mut b, &(EHDR_SIZE as u64).to_le_bytes()); // e_phoff
    put(&mut b, &0u64.to_le_bytes()); // e_shoff
    put(&mut b, &0u32.to_le_bytes()); // e_flags
    put(&mut b, &(EHDR_SIZE as u16).to_le_bytes());
    put(&mut b, &(PHDR_SIZE as u16).to_le_bytes());
    put(&mut b, &phnum.to_le_bytes());
    put(&mut b, &64u16.to_le_bytes()); // e_shentsize
    put(&mut b, &0u16.to_le_bytes()); // e_shnum
    put(&mut b, &0u16.to_le_bytes()); // e_shstrndx
    // PT_LOAD, R+X.
    put(&mut b, &1u32.to_le_bytes());
    put(&mut b, &5u32.to_le_bytes());
    put(&mut b, &(code_off as u64).to_le_bytes());
    put(&mut b, &LOAD_ADDR.to_le_bytes()); // vaddr
    put(&mut b, &LOAD_ADDR.to_le_bytes()); // paddr
    put(&mut b, &(code.len() as u64).to_le_bytes());
    put(&mut b, &(code.len() as u64).to_le_bytes());
    put(&mut b, &0x1000u64.to_le_bytes());
    if pvh {
        // PT_NOTE.
        put(&mut b, &4u32.to_le_bytes());
        put(&mut b, &4u32.to_le_bytes());
        put(&mut b, &(note_off as u64).to_le_bytes());
        put(&mut b, &0u64.to_le_bytes());
        put(&mut b, &0u64.to_le_bytes());
        put(&mut b, &(note.len() as u64).to_le_bytes());
        put(&mut b, &(note.len() as u64).to_le_bytes());
        put(&mut b, &4u64.to_le_bytes());
    }
    put(&mut b, &note);
    b.resize(code_off, 0);
    put(&mut b, code);
    b
}

#[cfg(test)]
mod tests {
    #[test]
    fn elf_layout() {
        let e = super::elf(super::TRIPLE_FAULT, true);
        assert_eq!(&e[..4], b"\x7fELF");
        assert_eq!(u16::from_le_bytes([e[56], e[57]]), 2);
        assert!(e.ends_with(super::TRIPLE_FAULT));
    }
}
