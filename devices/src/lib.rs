//! dinv's emulated devices.
//!
//! - [`legacy`]: the 8250 UART console and the i8042 controller (reset line), port I/O.
//! - [`virtio`]: the virtio-mmio transport (virtio 1.x, section 4.2) and the virtio devices.
//!
//! Devices never depend on the VMM: the VMM plugs them into a `vm_device` I/O manager and
//! an `event_manager::EventManager`.

pub mod legacy;
pub mod virtio;
