//! Kernel loading and boot information.
//!
//! Accepts an uncompressed ELF `vmlinux` (entered through its PVH note or its 64-bit entry
//! point) or a `bzImage` (entered at its 64-bit entry point, `code32_start + 0x200`, skipping
//! the real-mode set-up code entirely). Writes the command line, and the Linux zero page
//! (`boot_params` with an e820 map) or the PVH `hvm_start_info` with its memory map.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_start_info};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{bzimage::BzImage, load_cmdline, KernelLoader};
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::cpu::BootProtocol;
use crate::layout::{
    CMDLINE_MAX_SIZE, CMDLINE_START, EBDA_START, HIMEM_START, PVH_INFO_START, PVH_MEMMAP_START,
    ZERO_PAGE_START,
};
use crate::{Error, GuestMemoryMmap, Result};

/// Which entry point to prefer for an ELF kernel that offers both.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EntryPreference {
    /// The 64-bit Linux entry point (long mode from the first instruction).
    #[default]
    Linux64,
    /// The PVH entry point when the ELF has one.
    Pvh,
}

/// Where and how to enter a loaded kernel.
#[derive(Clone, Copy, Debug)]
pub struct KernelEntry {
    /// First instruction executed.
    pub entry: GuestAddress,
    /// Register/boot-information convention at that instruction.
    pub protocol: BootProtocol,
    /// End of the loaded image in guest memory.
    pub kernel_end: u64,
    setup_header: Option<setup_header>,
}

const ELF_MAGIC: [u8; 4] = *b"\x7fELF";
/// "HdrS" at offset 0x202 marks a bzImage set-up header.
const BZIMAGE_MAGIC: u32 = 0x5372_6448;
const BZIMAGE_MAGIC_OFFSET: u64 = 0x202;
/// Offset of the 64-bit entry point from the protected-mode kernel's start.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// Boot protocol 2.12 introduced `xloadflags` (and with it XLF_KERNEL_64).
const BZIMAGE_MIN_VERSION: u16 = 0x020c;
const XLF_KERNEL_64: u16 = 1 << 0;
/// Zero-page constants from Documentation/arch/x86/boot.rst.
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
/// `hvm_start_info` magic and version (start_info.h).
const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;
/// e820 type for usable RAM.
const E820_RAM: u32 = 1;

/// Loads the kernel image at `path` into guest memory.
pub fn load_kernel(
    mem: &GuestMemoryMmap,
    path: &Path,
    preference: EntryPreference,
) -> Result<KernelEntry> {
    let file_err = |source| Error::KernelFile {
        path: path.to_owned(),
        source,
    };
    let mut file = File::open(path).map_err(file_err)?;
    let mut magic = [0u8; 4];
    file.read_exact(&mut magic).map_err(file_err)?;
    file.rewind().map_err(file_err)?;

    if magic == ELF_MAGIC {
        let loaded = Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START)))?;
        let (entry, protocol) = match (preference, loaded.pvh_boot_cap) {
            (EntryPreference::Pvh, PvhBootCapability::PvhEntryPresent(pvh)) => {
                (pvh, BootProtocol::Pvh)
            }
            // The ELF entry point of vmlinux is the physical address of startup_64.
            _ => (loaded.kernel_load, BootProtocol::Linux64),
        };
        return Ok(KernelEntry {
            entry,
            protocol,
            kernel_end: loaded.kernel_end,
            setup_header: None,
        });
    }

    let mut hdr_magic = [0u8; 4];
    file.seek(SeekFrom::Start(BZIMAGE_MAGIC_OFFSET))
        .and_then(|_| file.read_exact(&mut hdr_magic))
        .and_then(|_| file.rewind())
        .map_err(file_err)?;
    if u32::from_le_bytes(hdr_magic) != BZIMAGE_MAGIC {
        return Err(Error::UnknownKernelFormat(magic));
    }
    let loaded = BzImage::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START)))?;
    let header = loaded.setup_header.unwrap_or_default();
    let version = header.version;
    let xloadflags = header.xloadflags;
    if version < BZIMAGE_MIN_VERSION || xloadflags & XLF_KERNEL_64 == 0 {
        return Err(Error::OldBzImage(version));
    }
    Ok(KernelEntry {
        entry: loaded
            .kernel_load
            .unchecked_add(BZIMAGE_64BIT_ENTRY_OFFSET),
        protocol: BootProtocol::Linux64,
        kernel_end: loaded.kernel_end,
        setup_header: loaded.setup_header,
    })
}

/// Builds a [`Cmdline`] with dinv's capacity from a string.
pub fn cmdline_from_str(s: &str) -> Result<Cmdline> {
    let mut cmdline = Cmdline::new(CMDLINE_MAX_SIZE)?;
    cmdline.insert_str(s)?;
    Ok(cmdline)
}

/// The usable RAM ranges of guest memory as (start, size): conventional memory below the EBDA,
/// then every region from [`HIMEM_START`] up.
pub fn ram_map(mem: &GuestMemoryMmap) -> Vec<(u64, u64)> {
    let mut map = vec![(0, EBDA_START)];
    for region in mem.iter() {
        let start = region.start_addr().raw_value().max(HIMEM_START);
        let end = region.start_addr().raw_value() + region.len();
        if end > start {
            map.push((start, end - start));
        }
    }
    map
}

/// Writes the command line and the boot information for `kernel`.
pub fn write_boot_info(
    mem: &GuestMemoryMmap,
    kernel: &KernelEntry,
    cmdline: &Cmdline,
) -> Result<()> {
    load_cmdline(mem, GuestAddress(CMDLINE_START), cmdline)?;
    let cmdline_len = cmdline
        .as_cstring()
        .map(|c| c.as_bytes().len())
        .map_err(Error::Cmdline)?;
    let ram = ram_map(mem);
    match kernel.protocol {
        BootProtocol::Linux64 => {
            let mut params = boot_params::default();
            if let Some(hdr) = kernel.setup_header {
                params.hdr = hdr;
            }
            params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
            params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
            params.hdr.header = BZIMAGE_MAGIC;
            params.hdr.cmd_line_ptr = CMDLINE_START as u32;
            params.hdr.cmdline_size = cmdline_len as u32;
            params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
            for (i, (addr, size)) in ram.iter().enumerate() {
                params.e820_table[i] = boot_e820_entry {
                    addr: *addr,
                    size: *size,
                    r#type: E820_RAM,
                };
            }
            params.e820_entries = ram.len() as u8;
            LinuxBootConfigurator::write_bootparams(
                &BootParams::new(&params, GuestAddress(ZERO_PAGE_START)),
                mem,
            )?;
        }
        BootProtocol::Pvh => {
            let memmap: Vec<hvm_memmap_table_entry> = ram
                .iter()
                .map(|(addr, size)| hvm_memmap_table_entry {
                    addr: *addr,
                    size: *size,
                    type_: E820_RAM,
                    reserved: 0,
                })
                .collect();
            let start_info = hvm_start_info {
                magic: XEN_HVM_START_MAGIC_VALUE,
                version: 1,
                cmdline_paddr: CMDLINE_START,
                memmap_paddr: PVH_MEMMAP_START,
                memmap_entries: memmap.len() as u32,
                ..Default::default()
            };
            let mut params = BootParams::new(&start_info, GuestAddress(PVH_INFO_START));
            params.set_sections(&memmap, GuestAddress(PVH_MEMMAP_START));
            PvhBootConfigurator::write_bootparams(&params, mem)?;
        }
    }
    Ok(())
}
