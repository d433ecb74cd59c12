//! Legacy port-I/O devices: the 8250 UART console ([`serial`]) and the i8042 controller
//! ([`i8042`]) whose CPU-reset command is how a dinv guest ends (`reboot=k`).
//!
//! Both wrap the `vm-superio` state machines and plug into a `vm_device::IoManager` as
//! [`vm_device::MutDevicePio`]. Interrupts and the reset line are [`EventFdTrigger`]s: the VMM
//! registers the serial one as a KVM irqfd and polls the reset one in its event loop.

pub mod i8042;
pub mod serial;

use vmm_sys_util::eventfd::EventFd;

/// A `vm_superio::Trigger` that writes 1 to an eventfd.
#[derive(Debug)]
pub struct EventFdTrigger(EventFd);

impl EventFdTrigger {
    /// Wraps `evt`.
    pub fn new(evt: EventFd) -> Self {
        Self(evt)
    }

    /// The underlying eventfd.
    pub fn event_fd(&self) -> &EventFd {
        &self.0
    }
}

impl vm_superio::Trigger for EventFdTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}
