//! dinv's virtual machine monitor: a KVM VMM built on rust-vmm crates.
//!
//! ```no_run
//! use dinv_vmm::{Vm, DiskConfig};
//! let exit = Vm::builder()
//!     .kernel("vmlinux")
//!     .cmdline("root=/dev/vda ro")
//!     .memory(256 << 20)
//!     .disk(DiskConfig::new("rootfs.ext4"))
//!     .build()?
//!     .run()?;
//! assert!(exit.is_clean());
//! # Ok::<(), dinv_vmm::Error>(())
//! ```
//!
//! Threads: one per vCPU ([`vcpu`]), plus the caller of [`Vm::run`], which runs the device
//! event loop (`event-manager`): virtio queue notifications (KVM ioeventfds), the i8042 reset
//! line and the vCPUs' exit event. Interrupts reach the guest through KVM irqfds.

pub mod console;
pub mod daemon;
pub mod fault;
pub mod profile;
pub mod pvm;
pub mod size;
pub mod snapshot;
pub mod vcpu;
pub mod vm;

pub use boot::loader::EntryPreference;
pub use console::Console;
pub use pvm::PvmMode;
pub use devices::virtio::net::NetConfig;
pub use devices::virtio::p9::P9Config;
pub use devices::virtio::vsock::VsockConfig;
pub use vm::{DiskConfig, Vm, VmBuilder, VmHandle};

/// Why a VM stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmExit {
    /// The guest reset or powered off the machine (dinv guests end this way).
    Reset,
    /// The guest kernel panicked (and then reset itself).
    Panic,
    /// The guest died: emulation failure, triple fault, failed entry.
    Fault {
        /// vCPU that stopped.
        vcpu: u8,
        /// What KVM reported.
        reason: String,
        /// Registers and instruction bytes.
        detail: String,
    },
    /// The host stopped the VM through a [`VmHandle`].
    Stopped,
}

impl VmExit {
    /// True when the guest ended on its own, without panic or fault.
    pub fn is_clean(&self) -> bool {
        matches!(self, VmExit::Reset)
    }
}

impl std::fmt::Display for VmExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmExit::Reset => f.write_str("guest powered off"),
            VmExit::Panic => f.write_str("guest kernel panicked"),
            VmExit::Fault { vcpu, reason, detail } => write!(f, "vcpu{vcpu}: {reason}: {detail}"),
            VmExit::Stopped => f.write_str("stopped by the host"),
        }
    }
}

/// Errors while building or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No kernel image was given.
    #[error("No kernel image given")]
    NoKernel,
    /// Invalid configuration.
    #[error("{0}")]
    Config(String),
    /// A KVM ioctl failed.
    #[error("KVM: {0}")]
    Kvm(kvm_ioctls::Error),
    /// Guest memory could not be created.
    #[error("Guest memory: {0}")]
    Memory(String),
    /// Boot set-up failed.
    #[error(transparent)]
    Boot(#[from] boot::Error),
    /// An eventfd could not be created.
    #[error("eventfd: {0}")]
    EventFd(std::io::Error),
    /// The event manager failed.
    #[error("event manager: {0:?}")]
    EventManager(event_manager::Error),
    /// The console sink could not be opened.
    #[error("Console: {0}")]
    Console(std::io::Error),
    /// A disk could not be opened.
    #[error("Disk {path}: {source}")]
    Disk {
        /// Image path.
        path: std::path::PathBuf,
        /// What went wrong.
        source: devices::virtio::block::BlockError,
    },
    /// Device wiring failed.
    #[error("Device: {0}")]
    Device(String),
    /// More devices than interrupt lines.
    #[error("Too many virtio devices for the available interrupt lines")]
    TooManyDevices,
    /// The vCPU kick signal handler could not be installed.
    #[error("Signal handler: {0}")]
    Signal(String),
    /// A vCPU thread could not be started.
    #[error("Cannot start vCPU thread: {0}")]
    Thread(std::io::Error),
    /// Machine state could not be captured or restored.
    #[error("Machine state: {0}")]
    State(#[from] snapshot::StateError),
    /// A snapshot could not be read or resumed.
    #[error(transparent)]
    Snapshot(#[from] snapshot::SnapshotError),
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;
