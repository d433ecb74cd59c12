//! Virtio devices and the virtio-mmio transport.
//!
//! Implements the device-side basics of the virtio 1.2 specification (§2: device status
//! field §2.1, feature bits §2.2, notifications §2.3, device configuration space §2.5, split
//! virtqueues §2.7) shared by every device, plus:
//!
//! - [`mmio`]: the virtio-mmio transport (§4.2), modern interface only (Version 2).
//! - [`block`]: virtio-blk (§5.2) over a raw file.
//!
//! The pieces fit together like this:
//!
//! - A device implements [`VirtioDevice`] (identity, features, config space, activation) and
//!   `event_manager::MutEventSubscriber` (its runtime work on the device event loop).
//! - The transport ([`mmio::MmioTransport`]) runs on vCPU threads. When the driver sets
//!   `DRIVER_OK` it hands the device an [`ActivationContext`]: guest memory, the negotiated
//!   queues and a [`VirtioInterrupt`] to signal the driver.
//! - Each device owns one [`EventFd`] per queue ([`VirtioDevice::queue_events`]). The VMM
//!   registers them as KVM ioeventfds on the transport's `QueueNotify` register; the
//!   transport also writes them itself when a notify write reaches it.
//! - Interrupts go through [`IrqfdInterrupt`]: an interrupt-status word shared with the
//!   transport plus an [`EventFd`] the VMM registers as a KVM irqfd on the device's GSI.
//!   Tests use [`RecordingInterrupt`] instead.

pub mod block;
mod device_common;
pub mod mmio;
pub mod net;
pub mod p9;
#[cfg(test)]
pub(crate) mod test_utils;
pub mod vsock;

use std::fmt;
use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use virtio_queue::{Queue, QueueState};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
pub use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};
pub use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// Why a device refused activation.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The transport handed over a different number of queues than the device declares.
    #[error("Expected {expected} queues, got {actual}")]
    QueueCount {
        /// Number of queues the device declares.
        expected: usize,
        /// Number of queues received.
        actual: usize,
    },
    /// The device is already active; it must be reset first.
    #[error("Device is already active")]
    AlreadyActive,
    /// Waking the device's event loop failed.
    #[error("Failed to signal the activate event: {0}")]
    ActivateEvent(#[source] io::Error),
}

/// The kind of interrupt a device raises (§2.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InterruptType {
    /// Used buffers were added to the given queue.
    Queue(u16),
    /// The configuration space changed (or the device needs a reset).
    Config,
}

/// How a device signals the driver. Behind a trait so tests can record interrupts.
pub trait VirtioInterrupt: Send + Sync + fmt::Debug {
    /// Raise `int_type` towards the driver.
    fn trigger(&self, int_type: InterruptType) -> io::Result<()>;
}

/// Production interrupt: sets the virtio-mmio `InterruptStatus` bit and kicks a KVM irqfd.
///
/// The VMM registers [`IrqfdInterrupt::eventfd`] with `KVM_IRQFD` on the device's GSI; the
/// transport reads and acknowledges the shared status word.
#[derive(Debug)]
pub struct IrqfdInterrupt {
    evt: EventFd,
    status: Arc<AtomicU32>,
}

impl IrqfdInterrupt {
    /// Create an interrupt with a fresh non-blocking irqfd and a zeroed status word.
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            evt: EventFd::new(EFD_NONBLOCK)?,
            status: Arc::new(AtomicU32::new(0)),
        })
    }

    /// The EventFd to register as a KVM irqfd.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }

    /// The interrupt status word (bits `VIRTIO_MMIO_INT_VRING` / `VIRTIO_MMIO_INT_CONFIG`).
    pub fn status(&self) -> &Arc<AtomicU32> {
        &self.status
    }
}

impl VirtioInterrupt for IrqfdInterrupt {
    fn trigger(&self, int_type: InterruptType) -> io::Result<()> {
        let bit = match int_type {
            InterruptType::Queue(_) => VIRTIO_MMIO_INT_VRING,
            InterruptType::Config => VIRTIO_MMIO_INT_CONFIG,
        };
        self.status.fetch_or(bit, Ordering::SeqCst);
        self.evt.write(1)
    }
}

/// Test interrupt: records every trigger in order.
#[derive(Debug, Default)]
pub struct RecordingInterrupt {
    triggers: Mutex<Vec<InterruptType>>,
}

impl RecordingInterrupt {
    /// Create an empty recorder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Take the interrupts recorded so far, oldest first.
    pub fn take(&self) -> Vec<InterruptType> {
        std::mem::take(&mut *lock(&self.triggers))
    }

    /// Number of interrupts recorded and not yet taken.
    pub fn count(&self) -> usize {
        lock(&self.triggers).len()
    }
}

impl VirtioInterrupt for RecordingInterrupt {
    fn trigger(&self, int_type: InterruptType) -> io::Result<()> {
        lock(&self.triggers).push(int_type);
        Ok(())
    }
}

/// Everything a device needs to run, handed over by the transport on `DRIVER_OK`.
#[derive(Debug)]
pub struct ActivationContext {
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// How to interrupt the driver.
    pub interrupt: Arc<dyn VirtioInterrupt>,
    /// The queues, configured and validated by the transport, in device order.
    pub queues: Vec<Queue>,
}

/// The interface between a virtio device and its transport (§2).
pub trait VirtioDevice {
    /// Virtio device ID (§5, `VIRTIO_ID_*`).
    fn device_type(&self) -> u32;

    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];

    /// Feature bits the device offers. The transport adds `VIRTIO_F_VERSION_1`.
    fn avail_features(&self) -> u64;

    /// Record the features the driver accepted (a subset of the offered ones), on `FEATURES_OK`.
    fn ack_features(&mut self, features: u64);

    /// Read the device configuration space at `offset` (§2.5). Bytes past its end read as 0.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Write the device configuration space at `offset`.
    fn write_config(&mut self, offset: u64, data: &[u8]);

    /// Start the device with the negotiated queues. Called on a vCPU thread: only store the
    /// context and wake the device's event loop here.
    fn activate(&mut self, ctx: ActivationContext) -> Result<(), ActivateError>;

    /// Return to the pre-activation state (driver wrote 0 to Status). Returns `false` if the
    /// device cannot be reset.
    fn reset(&mut self) -> bool;

    /// One EventFd per queue, signalled when the driver notifies that queue.
    fn queue_events(&self) -> &[EventFd];

    /// While active: the state of the queues the device works on (their ring positions move
    /// on the device's side, not the transport's), for a snapshot. `None` when inactive.
    fn queue_states(&self) -> Option<Vec<QueueState>>;

    /// The device was just re-activated from a snapshot: the driver's state (in guest memory)
    /// is as it was, the device's host-side state is new. Devices whose host side holds
    /// connections tell the driver here (virtio-vsock: a transport reset event).
    fn restored(&mut self) {}

    /// Before a snapshot: publish work that finished off the event loop (the snapshot may
    /// run on the event loop's own thread). virtio-9p returns its workers' finished requests
    /// here. Default: nothing.
    fn settle(&mut self) {}

    /// Host-side state a snapshot must carry beyond the queues (virtio-9p: the guest's
    /// open fids), as opaque bytes for [`VirtioDevice::restore_state`]; `Ok(None)` for
    /// devices without any (the default). Called with the vCPUs paused, under the same
    /// device lock as [`VirtioDevice::queue_states`].
    fn save_state(&self) -> Result<Option<Vec<u8>>, DeviceStateError> {
        Ok(None)
    }

    /// Take back what [`VirtioDevice::save_state`] returned, after the device was
    /// re-activated from a snapshot.
    fn restore_state(&mut self, _state: &[u8]) -> Result<(), DeviceStateError> {
        Err(DeviceStateError::Invalid("this device keeps no state".into()))
    }
}

/// Why a device's own state could not be saved or restored.
#[derive(Debug, thiserror::Error)]
pub enum DeviceStateError {
    /// Requests are being served; the state is consistent only between them. Try again.
    #[error("requests in flight")]
    Busy,
    /// The state cannot be described in a snapshot.
    #[error("{0}")]
    Unsupported(String),
    /// Saved state that does not fit this device.
    #[error("saved device state does not fit: {0}")]
    Invalid(String),
}

/// A device shared between its transport (vCPU threads) and the event loop.
pub type SharedDevice = Arc<Mutex<dyn VirtioDevice + Send>>;

/// Lock a mutex, recovering the data if another thread panicked while holding it.
pub(crate) fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The states of an active device's queues ([`VirtioDevice::queue_states`]).
pub(crate) fn states_of(queues: &[Queue]) -> Vec<QueueState> {
    queues.iter().map(|q| q.state()).collect()
}

/// Feature bit `bit` as a mask.
pub(crate) const fn feature(bit: u32) -> u64 {
    1u64 << bit
}
