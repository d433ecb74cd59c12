//! Intel MultiProcessor Specification 1.4 table.
//!
//! A kernel booted without ACPI (dinv's guests have none) learns the CPUs, the I/O APIC and the
//! ISA interrupt routing from this table. It is written at [`EBDA_START`], which Linux scans
//! (`smp_scan_config`) for the floating pointer structure "_MP_".
//!
//! Layout: floating pointer (16 bytes) | configuration table header "PCMP" (44 bytes) | one
//! processor entry per vCPU | one ISA bus | the I/O APIC | an I/O interrupt entry for each of
//! the 24 I/O APIC pins | local interrupt entries for LINT0 (ExtINT) and LINT1 (NMI).

use vm_memory::{Address, ByteValued, Bytes, GuestAddress};

use crate::layout::{APIC_START, EBDA_START, IOAPIC_START, IRQ_MAX};
use crate::{Error, GuestMemoryMmap, Result};

/// Most vCPUs we describe: the whole table then still fits in the 1 KiB at the start of the
/// EBDA, below the legacy VGA hole.
pub const MAX_CPUS: u8 = 32;

const MPC_SPEC_REV: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const MPC_APIC_USABLE: u8 = 1;
/// CPU signature (family 6) and feature flags (FPU, APIC) reported per processor.
const CPU_STEPPING: u32 = 0x600;
const CPU_FEATURE_APIC: u32 = 0x200;
const CPU_FEATURE_FPU: u32 = 0x001;
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_INTSRC: u8 = 3;
const ENTRY_LINTSRC: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
/// Polarity and trigger "conforming to the bus" (flags = 0).
const IRQ_FLAGS_DEFAULT: u16 = 0;
const BUS_ID_ISA: u8 = 0;
/// Destination "all local APICs".
const DEST_ALL_APICS: u8 = 0xff;

#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct MpfIntel {
    signature: [u8; 4],
    physptr: u32,
    length: u8,
    specification: u8,
    checksum: u8,
    feature: [u8; 5],
}

#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct MpcTable {
    signature: [u8; 4],
    length: u16,
    spec: u8,
    checksum: u8,
    oem: [u8; 8],
    productid: [u8; 12],
    oemptr: u32,
    oemsize: u16,
    oemcount: u16,
    lapic: u32,
    reserved: u32,
}

#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct MpcCpu {
    type_: u8,
    apicid: u8,
    apicver: u8,
    cpuflag: u8,
    cpufeature: u32,
    featureflag: u32,
    reserved: [u32; 2],
}

#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct MpcBus {
    type_: u8,
    busid: u8,
    bustype: [u8; 6],
}

#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct MpcIoapic {
    type_: u8,
    apicid: u8,
    apicver: u8,
    flags: u8,
    apicaddr: u32,
}

/// Shared layout of I/O interrupt (type 3) and local interrupt (type 4) entries.
#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct MpcInt {
    type_: u8,
    irqtype: u8,
    irqflag: u16,
    srcbus: u8,
    srcbusirq: u8,
    dstapic: u8,
    dstirq: u8,
}

// SAFETY: all of these are plain `repr(C, packed)` integer aggregates: every bit pattern is a
// valid value and there is no padding.
unsafe impl ByteValued for MpfIntel {}
// SAFETY: as above.
unsafe impl ByteValued for MpcTable {}
// SAFETY: as above.
unsafe impl ByteValued for MpcCpu {}
// SAFETY: as above.
unsafe impl ByteValued for MpcBus {}
// SAFETY: as above.
unsafe impl ByteValued for MpcIoapic {}
// SAFETY: as above.
unsafe impl ByteValued for MpcInt {}

/// Appends entries and keeps the running checksum of everything after the header.
struct TableWriter {
    bytes: Vec<u8>,
    count: u16,
}

impl TableWriter {
    fn push<T: ByteValued>(&mut self, entry: T) {
        self.bytes.extend_from_slice(entry.as_slice());
        self.count += 1;
    }
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |acc, b| acc.wrapping_add(*b))
}

/// Size in bytes of the table for `num_cpus` vCPUs.
pub fn table_size(num_cpus: u8) -> usize {
    std::mem::size_of::<MpfIntel>()
        + std::mem::size_of::<MpcTable>()
        + std::mem::size_of::<MpcCpu>() * usize::from(num_cpus)
        + std::mem::size_of::<MpcBus>()
        + std::mem::size_of::<MpcIoapic>()
        + std::mem::size_of::<MpcInt>() * (IRQ_MAX as usize + 1 + 2)
}

/// Writes the MP table for `num_cpus` vCPUs (APIC IDs 0..num_cpus, vCPU 0 the BSP).
pub fn write_mptable(mem: &GuestMemoryMmap, num_cpus: u8) -> Result<()> {
    if num_cpus == 0 || num_cpus > MAX_CPUS {
        return Err(Error::TooManyCpus(num_cpus));
    }
    let ioapic_id = num_cpus + 1;
    let mut body = TableWriter {
        bytes: Vec::new(),
        count: 0,
    };
    for cpu in 0..num_cpus {
        body.push(MpcCpu {
            type_: ENTRY_PROCESSOR,
            apicid: cpu,
            apicver: APIC_VERSION,
            cpuflag: CPU_ENABLED | if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 },
            cpufeature: CPU_STEPPING,
            featureflag: CPU_FEATURE_APIC | CPU_FEATURE_FPU,
            reserved: [0; 2],
        });
    }
    body.push(MpcBus {
        type_: ENTRY_BUS,
        busid: BUS_ID_ISA,
        bustype: *b"ISA   ",
    });
    body.push(MpcIoapic {
        type_: ENTRY_IOAPIC,
        apicid: ioapic_id,
        apicver: IOAPIC_VERSION,
        flags: MPC_APIC_USABLE,
        apicaddr: IOAPIC_START as u32,
    });
    for irq in 0..=IRQ_MAX as u8 {
        body.push(MpcInt {
            type_: ENTRY_INTSRC,
            irqtype: INT_TYPE_INT,
            irqflag: IRQ_FLAGS_DEFAULT,
            srcbus: BUS_ID_ISA,
            srcbusirq: irq,
            dstapic: ioapic_id,
            dstirq: irq,
        });
    }
    for (irqtype, lint) in [(INT_TYPE_EXTINT, 0), (INT_TYPE_NMI, 1)] {
        body.push(MpcInt {
            type_: ENTRY_LINTSRC,
            irqtype,
            irqflag: IRQ_FLAGS_DEFAULT,
            srcbus: BUS_ID_ISA,
            srcbusirq: 0,
            dstapic: DEST_ALL_APICS,
            dstirq: lint,
        });
    }

    let mpf_addr = GuestAddress(EBDA_START);
    let table_addr = mpf_addr.unchecked_add(std::mem::size_of::<MpfIntel>() as u64);
    let mut header = MpcTable {
        signature: *b"PCMP",
        length: (std::mem::size_of::<MpcTable>() + body.bytes.len()) as u16,
        spec: MPC_SPEC_REV,
        oem: *b"DINV    ",
        productid: *b"MICROVM     ",
        oemcount: body.count,
        lapic: APIC_START as u32,
        ..Default::default()
    };
    header.checksum = 0u8
        .wrapping_sub(checksum(header.as_slice()))
        .wrapping_sub(checksum(&body.bytes));
    let mut mpf = MpfIntel {
        signature: *b"_MP_",
        physptr: table_addr.raw_value() as u32,
        length: 1,
        specification: MPC_SPEC_REV,
        ..Default::default()
    };
    mpf.checksum = 0u8.wrapping_sub(checksum(mpf.as_slice()));

    let write_err = |source| Error::GuestMemory {
        what: "MP table",
        source,
    };
    mem.write_obj(mpf, mpf_addr).map_err(write_err)?;
    mem.write_obj(header, table_addr).map_err(write_err)?;
    mem.write_slice(
        &body.bytes,
        table_addr.unchecked_add(std::mem::size_of::<MpcTable>() as u64),
    )
    .map_err(write_err)?;
    Ok(())
}
