//! The virtio-mmio transport, virtio 1.2 §4.2 (modern interface only: `Version` reads 2).
//!
//! [`MmioTransport`] exposes one [`VirtioDevice`] as a [`MMIO_REGION_SIZE`] register window
//! (§4.2.2) and implements [`vm_device::MutDeviceMmio`]; it runs on vCPU threads.
//!
//! - Device initialisation (§3.1.1) is a status state machine: `ACKNOWLEDGE` → `DRIVER` →
//!   `FEATURES_OK` (accepted only if the driver took `VIRTIO_F_VERSION_1` and nothing that was
//!   not offered) → `DRIVER_OK`, which activates the device if every queue is ready and lies in
//!   guest memory. A failed activation sets `DEVICE_NEEDS_RESET` and raises a configuration
//!   interrupt. Writing 0 to `Status` resets the device and the transport.
//! - `QueueNotify` writes signal the device's queue EventFd. The VMM normally registers those
//!   EventFds as KVM ioeventfds at `base + NOTIFY_REG_OFFSET` (datamatch = queue index) so
//!   notifications never exit to userspace.
//! - Interrupts: [`IrqfdInterrupt`]; `InterruptStatus` reads its status word, `InterruptACK`
//!   clears bits in it.
//!
//! Registers take 32-bit aligned accesses only; the configuration space at 0x100 takes any
//! width. Other accesses are logged and ignored (reads return zeros).

#[cfg(test)]
mod tests;

use std::fmt;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tracing::{debug, error, warn};
use virtio_bindings::virtio_mmio::*;
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};
use vm_device::bus::{MmioAddress, MmioAddressOffset};
use vm_device::MutDeviceMmio;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{
    feature, lock, ActivationContext, InterruptType, IrqfdInterrupt, SharedDevice, VirtioInterrupt,
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};

/// Size of one virtio-mmio device window.
pub const MMIO_REGION_SIZE: u64 = 0x1000;
/// `MagicValue`: "virt" in little endian.
pub const MMIO_MAGIC_VALUE: u32 = 0x7472_6976;
/// `Version` of the modern (virtio 1.x) interface.
pub const MMIO_VERSION: u32 = 2;
/// `VendorID` reported by dinv devices.
pub const VENDOR_ID: u32 = 0;
/// Offset of the `QueueNotify` register, where the VMM registers queue ioeventfds.
pub const NOTIFY_REG_OFFSET: u64 = VIRTIO_MMIO_QUEUE_NOTIFY as u64;
/// Offset of the device configuration space.
pub const CONFIG_SPACE_OFFSET: u64 = VIRTIO_MMIO_CONFIG as u64;

const STATUS_INIT: u32 = 0;
const STATUS_ACK: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
const STATUS_DRIVER: u32 = STATUS_ACK | VIRTIO_CONFIG_S_DRIVER;
const STATUS_FEATURES_OK: u32 = STATUS_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK;
const STATUS_DRIVER_OK: u32 = STATUS_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK;

/// Errors building a transport.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    /// The device declares a queue size the virtqueue implementation refuses.
    #[error("Invalid queue max size {0}: {1}")]
    QueueSize(u16, #[source] virtio_queue::Error),
    /// Duplicating a queue EventFd failed.
    #[error("Failed to duplicate a queue EventFd: {0}")]
    QueueEvent(#[source] io::Error),
    /// Creating the interrupt EventFd failed.
    #[error("Failed to create the interrupt EventFd: {0}")]
    Interrupt(#[source] io::Error),
    /// At `DRIVER_OK`, a queue was not ready or not inside guest memory.
    #[error("Queue {0} is not ready or not in guest memory")]
    QueueInvalid(usize),
    /// At `DRIVER_OK`, a queue's state could not be handed over.
    #[error("Queue {0} state rejected: {1}")]
    QueueState(usize, #[source] virtio_queue::Error),
    /// A snapshot does not fit this transport's device.
    #[error("Snapshot of device type {found} with {found_queues} queues does not fit device type {expected} with {expected_queues}")]
    SnapshotMismatch {
        /// This device's type.
        expected: u32,
        /// This device's queue count.
        expected_queues: usize,
        /// The snapshot's device type.
        found: u32,
        /// The snapshot's queue count.
        found_queues: usize,
    },
    /// The device refused activation.
    #[error("Device activation failed: {0}")]
    Activate(#[source] super::ActivateError),
    /// The device's own state could not be saved or restored.
    #[error("Device type {0}: {1}")]
    DeviceState(u32, #[source] super::DeviceStateError),
}

/// How long [`MmioTransport::snapshot`] waits for a device to finish the requests it is
/// serving.
pub const SNAPSHOT_DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// One virtqueue's configuration and ring positions, as saved in a snapshot
/// (`virtio_queue::QueueState` with serde).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    /// Maximum size offered by the device.
    pub max_size: u16,
    /// Next available-ring entry the device will read.
    pub next_avail: u16,
    /// Next used-ring entry the device will write.
    pub next_used: u16,
    /// `VIRTIO_F_RING_EVENT_IDX` in use.
    pub event_idx_enabled: bool,
    /// Size the driver chose.
    pub size: u16,
    /// The driver finished configuring it.
    pub ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Available ring address.
    pub avail_ring: u64,
    /// Used ring address.
    pub used_ring: u64,
}

impl From<QueueState> for QueueSnapshot {
    fn from(q: QueueState) -> Self {
        Self {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

impl From<QueueSnapshot> for QueueState {
    fn from(q: QueueSnapshot) -> Self {
        Self {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

/// A transport's registers and queues, as saved in a snapshot. Restoring it onto a fresh
/// transport of the same device type re-activates the device where the driver left it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioSnapshot {
    /// The device's virtio ID (checked on restore).
    pub device_type: u32,
    /// `Status`.
    pub device_status: u32,
    /// `DeviceFeaturesSel`.
    pub device_features_sel: u32,
    /// `DriverFeaturesSel`.
    pub driver_features_sel: u32,
    /// The features the driver accepted.
    pub driver_features: u64,
    /// `QueueSel`.
    pub queue_sel: u32,
    /// `ConfigGeneration`.
    pub config_generation: u32,
    /// `SHMSel`.
    pub shm_sel: u32,
    /// `InterruptStatus`.
    pub interrupt_status: u32,
    /// Whether the device was active.
    pub activated: bool,
    /// Every queue, in order.
    pub queues: Vec<QueueSnapshot>,
    /// The device's own state ([`super::VirtioDevice::save_state`]), if it keeps any.
    pub device_state: Option<Vec<u8>>,
}

/// The virtio-mmio register window of one device.
pub struct MmioTransport {
    mem: GuestMemoryMmap,
    device: SharedDevice,
    interrupt: Arc<IrqfdInterrupt>,
    queues: Vec<Queue>,
    queue_evts: Vec<EventFd>,
    device_status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    config_generation: u32,
    shm_sel: u32,
    activated: bool,
}

impl fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device_status", &self.device_status)
            .field("driver_features", &self.driver_features)
            .field("queues", &self.queues)
            .field("activated", &self.activated)
            .finish_non_exhaustive()
    }
}

impl MmioTransport {
    /// Wrap `device`; its queues are created from [`super::VirtioDevice::queue_max_sizes`].
    pub fn new(mem: GuestMemoryMmap, device: SharedDevice) -> Result<Self, MmioError> {
        let (queues, queue_evts) = {
            let dev = lock(&device);
            let queues = dev
                .queue_max_sizes()
                .iter()
                .map(|&max| Queue::new(max).map_err(|e| MmioError::QueueSize(max, e)))
                .collect::<Result<Vec<_>, _>>()?;
            // Duplicates, so notifying never waits for the device lock.
            let evts = dev
                .queue_events()
                .iter()
                .map(EventFd::try_clone)
                .collect::<Result<Vec<_>, _>>()
                .map_err(MmioError::QueueEvent)?;
            (queues, evts)
        };
        Ok(Self {
            mem,
            device,
            interrupt: Arc::new(IrqfdInterrupt::new().map_err(MmioError::Interrupt)?),
            queues,
            queue_evts,
            device_status: STATUS_INIT,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            config_generation: 0,
            shm_sel: 0,
            activated: false,
        })
    }

    /// The EventFd to register as a KVM irqfd on this device's GSI.
    pub fn interrupt_evt(&self) -> &EventFd {
        self.interrupt.eventfd()
    }

    /// The interrupt shared with the device (status word + irqfd).
    pub fn interrupt(&self) -> &Arc<IrqfdInterrupt> {
        &self.interrupt
    }

    /// The device's queue EventFds (duplicates), index = queue index, to register as KVM
    /// ioeventfds at `base + NOTIFY_REG_OFFSET` with datamatch = queue index (u32).
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The wrapped device.
    pub fn device(&self) -> &SharedDevice {
        &self.device
    }

    /// Current value of the `Status` register.
    pub fn device_status(&self) -> u32 {
        self.device_status
    }

    /// Whether the device has been activated since the last reset.
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    /// The registers, queues and device state, for a snapshot (the guest must not be
    /// running). A device serving requests ([`super::DeviceStateError::Busy`]) is settled
    /// and asked again every 5 ms for up to [`SNAPSHOT_DRAIN_TIMEOUT`].
    pub fn snapshot(&self) -> Result<MmioSnapshot, MmioError> {
        let deadline = std::time::Instant::now() + SNAPSHOT_DRAIN_TIMEOUT;
        let (device_type, queues, device_state) = loop {
            // One lock for the queues and the device state: they must agree.
            let mut device = lock(&self.device);
            let device_type = device.device_type();
            device.settle();
            match device.save_state() {
                Ok(state) => break (device_type, self.queue_snapshots(&*device), state),
                Err(super::DeviceStateError::Busy) if std::time::Instant::now() < deadline => {
                    drop(device);
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                Err(e) => return Err(MmioError::DeviceState(device_type, e)),
            }
        };
        Ok(MmioSnapshot {
            device_type,
            device_status: self.device_status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            config_generation: self.config_generation,
            shm_sel: self.shm_sel,
            interrupt_status: self.interrupt.status().load(Ordering::SeqCst),
            activated: self.activated,
            queues,
            device_state,
        })
    }

    /// The queues as the driver configured them, with the ring positions of the device's live
    /// copies while it is active.
    fn queue_snapshots(&self, device: &(dyn super::VirtioDevice + Send)) -> Vec<QueueSnapshot> {
        let live = if self.activated { device.queue_states() } else { None };
        match live {
            Some(states) if states.len() == self.queues.len() => states.into_iter().map(Into::into).collect(),
            _ => self.queues.iter().map(|q| q.state().into()).collect(),
        }
    }

    /// Puts a fresh transport where `snap` left its driver: registers, queues (validated like
    /// the driver's own writes), the device's acked features, and, if it was active, the device
    /// re-activated with the saved ring positions and told it was restored
    /// ([`super::VirtioDevice::restored`]). A pending interrupt is raised again.
    pub fn restore(&mut self, snap: &MmioSnapshot) -> Result<(), MmioError> {
        let device_type = lock(&self.device).device_type();
        if snap.device_type != device_type
            || snap.queues.len() != self.queues.len()
            || snap.queues.iter().zip(&self.queues).any(|(s, q)| s.max_size != q.max_size())
        {
            return Err(MmioError::SnapshotMismatch {
                expected: device_type,
                expected_queues: self.queues.len(),
                found: snap.device_type,
                found_queues: snap.queues.len(),
            });
        }
        let queues = snap
            .queues
            .iter()
            .enumerate()
            .map(|(i, q)| Queue::try_from(QueueState::from(*q)).map_err(|e| MmioError::QueueState(i, e)))
            .collect::<Result<Vec<_>, _>>()?;
        self.queues = queues;
        self.device_status = snap.device_status;
        self.device_features_sel = snap.device_features_sel;
        self.driver_features_sel = snap.driver_features_sel;
        self.driver_features = snap.driver_features;
        self.queue_sel = snap.queue_sel;
        self.config_generation = snap.config_generation;
        self.shm_sel = snap.shm_sel;
        self.interrupt.status().store(snap.interrupt_status, Ordering::SeqCst);
        if self.device_status & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            lock(&self.device).ack_features(self.driver_features);
        }
        if snap.activated {
            self.activate()?;
            let mut device = lock(&self.device);
            if let Some(state) = &snap.device_state {
                device.restore_state(state).map_err(|e| MmioError::DeviceState(device_type, e))?;
            }
            device.restored();
        }
        if snap.interrupt_status != 0 {
            self.interrupt.eventfd().write(1).map_err(MmioError::Interrupt)?;
        }
        Ok(())
    }

    fn offered_features(&self) -> u64 {
        lock(&self.device).avail_features() | feature(VIRTIO_F_VERSION_1)
    }

    fn selected_queue(&self) -> Option<&Queue> {
        self.queues.get(self.queue_sel as usize)
    }

    /// Queue registers are writable between `FEATURES_OK` and `DRIVER_OK` (§4.2.3.2).
    fn selected_queue_mut(&mut self) -> Option<&mut Queue> {
        if self.device_status != STATUS_FEATURES_OK {
            warn!(
                status = self.device_status,
                "virtio-mmio: queue write in wrong state"
            );
            return None;
        }
        let sel = self.queue_sel as usize;
        let queue = self.queues.get_mut(sel);
        if queue.is_none() {
            warn!(sel, "virtio-mmio: write to non-existent queue");
        }
        queue
    }

    fn read_reg(&self, offset: u32) -> u32 {
        match offset {
            VIRTIO_MMIO_MAGIC_VALUE => MMIO_MAGIC_VALUE,
            VIRTIO_MMIO_VERSION => MMIO_VERSION,
            VIRTIO_MMIO_DEVICE_ID => lock(&self.device).device_type(),
            VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.offered_features() as u32,
                1 => (self.offered_features() >> 32) as u32,
                _ => 0,
            },
            VIRTIO_MMIO_QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| q.max_size().into()),
            VIRTIO_MMIO_QUEUE_READY => self.selected_queue().map_or(0, |q| q.ready().into()),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt.status().load(Ordering::SeqCst),
            VIRTIO_MMIO_STATUS => self.device_status,
            VIRTIO_MMIO_CONFIG_GENERATION => self.config_generation,
            // No shared memory regions: a non-existent region has length -1 (§4.2.2).
            VIRTIO_MMIO_SHM_LEN_LOW | VIRTIO_MMIO_SHM_LEN_HIGH => u32::MAX,
            VIRTIO_MMIO_SHM_BASE_LOW | VIRTIO_MMIO_SHM_BASE_HIGH => u32::MAX,
            VIRTIO_MMIO_SHM_SEL => self.shm_sel,
            _ => {
                warn!(
                    offset,
                    "virtio-mmio: read of unknown or write-only register"
                );
                0
            }
        }
    }

    fn write_reg(&mut self, offset: u32, val: u32) {
        match offset {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = val,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = val,
            VIRTIO_MMIO_DRIVER_FEATURES => self.write_driver_features(val),
            VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = val,
            VIRTIO_MMIO_QUEUE_NUM => {
                if let Some(q) = self.selected_queue_mut() {
                    match u16::try_from(val) {
                        Ok(size) => q.set_size(size),
                        Err(_) => warn!(val, "virtio-mmio: queue size out of range"),
                    }
                }
            }
            VIRTIO_MMIO_QUEUE_READY => {
                if let Some(q) = self.selected_queue_mut() {
                    q.set_ready(val == 1);
                }
            }
            VIRTIO_MMIO_QUEUE_DESC_LOW => self.set_queue_addr(|q| {
                q.set_desc_table_address(Some(val), None);
            }),
            VIRTIO_MMIO_QUEUE_DESC_HIGH => self.set_queue_addr(|q| {
                q.set_desc_table_address(None, Some(val));
            }),
            VIRTIO_MMIO_QUEUE_AVAIL_LOW => self.set_queue_addr(|q| {
                q.set_avail_ring_address(Some(val), None);
            }),
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH => self.set_queue_addr(|q| {
                q.set_avail_ring_address(None, Some(val));
            }),
            VIRTIO_MMIO_QUEUE_USED_LOW => self.set_queue_addr(|q| {
                q.set_used_ring_address(Some(val), None);
            }),
            VIRTIO_MMIO_QUEUE_USED_HIGH => self.set_queue_addr(|q| {
                q.set_used_ring_address(None, Some(val));
            }),
            VIRTIO_MMIO_QUEUE_NOTIFY => self.notify_queue(val),
            VIRTIO_MMIO_INTERRUPT_ACK => {
                self.interrupt.status().fetch_and(!val, Ordering::SeqCst);
            }
            VIRTIO_MMIO_STATUS => self.write_status(val),
            VIRTIO_MMIO_SHM_SEL => self.shm_sel = val,
            _ => warn!(
                offset,
                val, "virtio-mmio: write to unknown or read-only register"
            ),
        }
    }

    fn set_queue_addr(&mut self, f: impl FnOnce(&mut Queue)) {
        if let Some(q) = self.selected_queue_mut() {
            f(q);
        }
    }

    fn write_driver_features(&mut self, val: u32) {
        if self.device_status != STATUS_DRIVER {
            warn!(
                status = self.device_status,
                "virtio-mmio: driver features write in wrong state"
            );
            return;
        }
        match self.driver_features_sel {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(val),
            1 => {
                self.driver_features = (self.driver_features & 0xffff_ffff) | (u64::from(val) << 32)
            }
            sel if val != 0 => warn!(sel, val, "virtio-mmio: driver features page out of range"),
            _ => {}
        }
    }

    fn notify_queue(&self, val: u32) {
        match self.queue_evts.get(val as usize) {
            Some(evt) => {
                if let Err(e) = evt.write(1) {
                    error!(
                        queue = val,
                        "virtio-mmio: failed to signal queue event: {e}"
                    );
                }
            }
            None => warn!(queue = val, "virtio-mmio: notify of non-existent queue"),
        }
    }

    /// The device status state machine (§3.1.1, §4.2.3.1).
    fn write_status(&mut self, val: u32) {
        if val == 0 {
            self.reset();
            return;
        }
        if val & VIRTIO_CONFIG_S_FAILED != 0 {
            debug!("virtio-mmio: driver gave up on the device");
            self.device_status |= VIRTIO_CONFIG_S_FAILED;
            return;
        }
        match (self.device_status, val) {
            (STATUS_INIT, STATUS_ACK) | (STATUS_ACK, STATUS_DRIVER) => self.device_status = val,
            (STATUS_DRIVER, STATUS_FEATURES_OK) => self.features_ok(),
            (STATUS_FEATURES_OK, STATUS_DRIVER_OK) => self.driver_ok(),
            (cur, new) if cur == new => {}
            (cur, new) => warn!(cur, new, "virtio-mmio: invalid status transition ignored"),
        }
    }

    fn features_ok(&mut self) {
        let offered = self.offered_features();
        let unknown = self.driver_features & !offered;
        if unknown != 0 {
            warn!(
                unknown,
                "virtio-mmio: driver accepted features that were not offered"
            );
            return;
        }
        if self.driver_features & feature(VIRTIO_F_VERSION_1) == 0 {
            warn!("virtio-mmio: legacy driver (no VIRTIO_F_VERSION_1) refused");
            return;
        }
        lock(&self.device).ack_features(self.driver_features);
        self.device_status = STATUS_FEATURES_OK;
    }

    fn driver_ok(&mut self) {
        self.device_status = STATUS_DRIVER_OK;
        if let Err(reason) = self.activate() {
            error!("virtio-mmio: device activation failed: {reason}");
            self.device_status |= VIRTIO_CONFIG_S_NEEDS_RESET;
            self.config_generation = self.config_generation.wrapping_add(1);
            if let Err(e) = self.interrupt.trigger(InterruptType::Config) {
                error!("virtio-mmio: failed to raise config interrupt: {e}");
            }
        }
    }

    fn activate(&mut self) -> Result<(), MmioError> {
        let event_idx = self.driver_features & feature(super::VIRTIO_RING_F_EVENT_IDX) != 0;
        let mut queues = Vec::with_capacity(self.queues.len());
        for (i, q) in self.queues.iter().enumerate() {
            if !q.is_valid(&self.mem) {
                return Err(MmioError::QueueInvalid(i));
            }
            let mut q = Queue::try_from(q.state()).map_err(|e| MmioError::QueueState(i, e))?;
            q.set_event_idx(event_idx);
            queues.push(q);
        }
        let ctx = ActivationContext {
            mem: self.mem.clone(),
            interrupt: self.interrupt.clone(),
            queues,
        };
        lock(&self.device)
            .activate(ctx)
            .map_err(MmioError::Activate)?;
        self.activated = true;
        Ok(())
    }

    fn reset(&mut self) {
        if !lock(&self.device).reset() {
            error!("virtio-mmio: device failed to reset");
            self.device_status |= VIRTIO_CONFIG_S_NEEDS_RESET;
            return;
        }
        for q in &mut self.queues {
            q.reset();
        }
        self.activated = false;
        self.device_status = STATUS_INIT;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.shm_sel = 0;
        self.interrupt.status().store(0, Ordering::SeqCst);
    }

    /// Handle a read at `offset` within the window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset >= CONFIG_SPACE_OFFSET {
            if offset < MMIO_REGION_SIZE {
                lock(&self.device).read_config(offset - CONFIG_SPACE_OFFSET, data);
            } else {
                warn!(offset, "virtio-mmio: read past the window");
            }
            return;
        }
        match (u32::try_from(offset), data.len()) {
            (Ok(off), 4) if off % 4 == 0 => {
                data.copy_from_slice(&self.read_reg(off).to_le_bytes());
            }
            _ => warn!(
                offset,
                len = data.len(),
                "virtio-mmio: bad register read width"
            ),
        }
    }

    /// Handle a write at `offset` within the window.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            if offset >= MMIO_REGION_SIZE {
                warn!(offset, "virtio-mmio: write past the window");
            } else if self.device_status & VIRTIO_CONFIG_S_DRIVER == 0
                || self.device_status & VIRTIO_CONFIG_S_FAILED != 0
            {
                warn!(
                    status = self.device_status,
                    "virtio-mmio: config write in wrong state"
                );
            } else {
                lock(&self.device).write_config(offset - CONFIG_SPACE_OFFSET, data);
            }
            return;
        }
        match (u32::try_from(offset), <[u8; 4]>::try_from(data)) {
            (Ok(off), Ok(bytes)) if off % 4 == 0 => self.write_reg(off, u32::from_le_bytes(bytes)),
            _ => warn!(
                offset,
                len = data.len(),
                "virtio-mmio: bad register write width"
            ),
        }
    }
}

impl MutDeviceMmio for MmioTransport {
    fn mmio_read(&mut self, _base: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
        self.read(offset, data);
    }

    fn mmio_write(&mut self, _base: MmioAddress, offset: MmioAddressOffset, data: &[u8]) {
        self.write(offset, data);
    }
}
