//! i8042 keyboard controller (`vm_superio::I8042Device`): only what Linux needs to probe it
//! and, with `reboot=k`, to reset the machine. The reset command (0xFE to port 0x64) fires the
//! reset [`EventFdTrigger`], which the VMM turns into a clean VM exit.

use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;
use vm_superio::I8042Device;

use super::EventFdTrigger;

/// Ports 0x60 (data) to 0x64 (command/status).
pub const I8042_PORT_COUNT: u16 = 5;

/// The i8042 controller.
pub struct I8042 {
    inner: I8042Device<EventFdTrigger>,
}

impl std::fmt::Debug for I8042 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("I8042").finish_non_exhaustive()
    }
}

impl I8042 {
    /// A controller signalling `reset` when the guest asks for a CPU reset.
    pub fn new(reset: EventFdTrigger) -> Self {
        Self {
            inner: I8042Device::new(reset),
        }
    }
}

impl MutDevicePio for I8042 {
    fn pio_read(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        if let (Ok(offset), [byte]) = (u8::try_from(offset), data) {
            *byte = self.inner.read(offset);
        }
    }

    fn pio_write(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        if let (Ok(offset), [byte]) = (u8::try_from(offset), data) {
            if let Err(e) = self.inner.write(offset, *byte) {
                tracing::warn!("i8042 reset signal failed: {e}");
            }
        }
    }
}
