//! x86_64 boot support for dinv guests.
//!
//! This crate knows how a Linux guest starts on a bare KVM vCPU, and nothing about KVM file
//! descriptors: it writes boot data into guest memory and *computes* the initial register state
//! (as `kvm_bindings` structures) that the VMM then applies to each vCPU.
//!
//! - [`layout`]: the guest physical memory map (every fixed address is a named constant there).
//! - [`loader`]: loading an ELF `vmlinux` or a `bzImage` with `linux-loader`, the kernel command
//!   line, and the boot information the kernel reads (Linux zero page with e820 map, or the PVH
//!   `hvm_start_info`).
//! - [`cpu`]: GDT, identity page tables, segment/control registers, MSRs, FPU and LAPIC LVT
//!   set-up for the boot CPU and the application processors.
//! - [`mptable`]: the Intel MultiProcessor Specification 1.4 table that tells a kernel without
//!   ACPI how many CPUs exist and how the I/O APIC is wired.

pub mod cpu;
pub mod layout;
pub mod loader;
pub mod mptable;

#[cfg(test)]
mod tests;

/// Guest memory type used by dinv (no dirty-page tracking).
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

/// Errors while preparing a guest to boot.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The kernel image could not be opened or read.
    #[error("Cannot read kernel image {path}: {source}")]
    KernelFile {
        /// Path of the image.
        path: std::path::PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The kernel image is neither an ELF vmlinux nor a bzImage.
    #[error("Kernel image is neither an ELF vmlinux nor a bzImage (magic {0:02x?})")]
    UnknownKernelFormat([u8; 4]),
    /// linux-loader refused the image.
    #[error("Cannot load kernel: {0}")]
    Load(#[from] linux_loader::loader::Error),
    /// A bzImage that does not support the 64-bit boot protocol.
    #[error("bzImage boot protocol {0:#x} is too old (need 2.12+ with a 64-bit entry point)")]
    OldBzImage(u16),
    /// Building the kernel command line failed.
    #[error("Invalid kernel command line: {0}")]
    Cmdline(#[from] linux_loader::cmdline::Error),
    /// Writing boot parameters failed.
    #[error("Cannot write boot parameters: {0}")]
    BootConfig(#[from] linux_loader::configurator::Error),
    /// A guest memory access failed while writing boot structures.
    #[error("Cannot write {what} to guest memory: {source}")]
    GuestMemory {
        /// What was being written.
        what: &'static str,
        /// Underlying error.
        source: vm_memory::GuestMemoryError,
    },
    /// The requested memory size cannot be laid out.
    #[error("Invalid guest memory size {0} bytes (minimum {min} MiB)", min = layout::MIN_MEMORY_SIZE >> 20)]
    MemorySize(u64),
    /// Too many vCPUs for the MP table / APIC ID space.
    #[error("Too many vCPUs: {0} (maximum {max})", max = mptable::MAX_CPUS)]
    TooManyCpus(u8),
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;
