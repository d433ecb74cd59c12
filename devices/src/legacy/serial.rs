//! 8250/16550 UART at COM1 (`vm_superio::Serial`), the guest console.
//!
//! Output goes to any `Write` sink (the VMM passes stdout or a log file). Guest reads and
//! writes of the eight UART registers arrive as port I/O; the interrupt line is an
//! [`EventFdTrigger`] wired to IRQ 4 by the VMM.

use std::io::Write;

use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;
use vm_superio::serial::NoEvents;
use vm_superio::Serial;

use super::EventFdTrigger;

/// Number of UART registers (ports base..base+8).
pub const SERIAL_PORT_COUNT: u16 = 8;

/// A UART whose output goes to `W`.
pub struct SerialDevice<W: Write + Send> {
    inner: Serial<EventFdTrigger, NoEvents, W>,
}

impl<W: Write + Send> std::fmt::Debug for SerialDevice<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialDevice").finish_non_exhaustive()
    }
}

impl<W: Write + Send> SerialDevice<W> {
    /// A UART raising `interrupt` and writing the guest's output to `out`.
    pub fn new(interrupt: EventFdTrigger, out: W) -> Self {
        Self {
            inner: Serial::new(interrupt, out),
        }
    }

    /// Queues host input for the guest to read; returns how many bytes fit in the FIFO.
    pub fn enqueue_input(&mut self, input: &[u8]) -> std::io::Result<usize> {
        self.inner
            .enqueue_raw_bytes(input)
            .map_err(|e| std::io::Error::other(format!("{e:?}")))
    }

    /// The output sink.
    pub fn writer_mut(&mut self) -> &mut W {
        self.inner.writer_mut()
    }
}

impl<W: Write + Send> MutDevicePio for SerialDevice<W> {
    fn pio_read(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        if let (Ok(offset), [byte]) = (u8::try_from(offset), data) {
            *byte = self.inner.read(offset);
        }
    }

    fn pio_write(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        if let (Ok(offset), [byte]) = (u8::try_from(offset), data) {
            if let Err(e) = self.inner.write(offset, *byte) {
                tracing::warn!("serial write failed: {e:?}");
            }
        }
    }
}
