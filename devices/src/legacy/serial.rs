//! 8250/16550 UART at COM1 (`vm_superio::Serial`), the guest console.
//!
//! Output goes to any `Write` sink (the VMM passes stdout or a log file). Guest reads and
//! writes of the eight UART registers arrive as port I/O; the interrupt line is an
//! [`EventFdTrigger`] wired to IRQ 4 by the VMM.

use std::io::Write;

use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;
use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::Serial;

use super::EventFdTrigger;

/// Number of UART registers (ports base..base+8).
pub const SERIAL_PORT_COUNT: u16 = 8;

/// The UART's registers and unread input, as saved in a snapshot
/// (`vm_superio::serial::SerialState` with serde).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialSnapshot {
    /// Divisor latch, low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte.
    pub baud_divisor_high: u8,
    /// Interrupt enable register.
    pub interrupt_enable: u8,
    /// Interrupt identification register.
    pub interrupt_identification: u8,
    /// Line control register.
    pub line_control: u8,
    /// Line status register.
    pub line_status: u8,
    /// Modem control register.
    pub modem_control: u8,
    /// Modem status register.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Input not yet read by the guest.
    pub in_buffer: Vec<u8>,
}

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

    /// A UART in the state `snap` saved (raising a pending interrupt again).
    pub fn from_snapshot(snap: &SerialSnapshot, interrupt: EventFdTrigger, out: W) -> std::io::Result<Self> {
        let state = SerialState {
            baud_divisor_low: snap.baud_divisor_low,
            baud_divisor_high: snap.baud_divisor_high,
            interrupt_enable: snap.interrupt_enable,
            interrupt_identification: snap.interrupt_identification,
            line_control: snap.line_control,
            line_status: snap.line_status,
            modem_control: snap.modem_control,
            modem_status: snap.modem_status,
            scratch: snap.scratch,
            in_buffer: snap.in_buffer.clone(),
        };
        let inner = Serial::from_state(&state, interrupt, NoEvents, out)
            .map_err(|e| std::io::Error::other(format!("serial state: {e:?}")))?;
        Ok(Self { inner })
    }

    /// The registers and unread input, for a snapshot.
    pub fn snapshot(&self) -> SerialSnapshot {
        let s = self.inner.state();
        SerialSnapshot {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
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
