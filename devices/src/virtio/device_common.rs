//! Plumbing shared by the virtio devices: feature negotiation (§2.2), configuration-space
//! reads (§2.5), activation checks and the activate EventFd that hands the device over to its
//! event loop, and registering the queue EventFds there once the device is active.
//!
//! Each device keeps its own `ActiveState`, metrics and event handling; only the mechanism
//! that was identical across them lives here.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use event_manager::{EventOps, EventSet, Events};
use tracing::{error, warn};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemory;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{feature, ActivateError, ActivationContext, InterruptType, VirtioInterrupt};

/// Event-loop token of the activate EventFd, the only fd a device registers at `init`.
pub(crate) const ACTIVATE_TOKEN: u32 = 0;

/// The state every device with `N` queues carries: its features, queue sizes and EventFds.
#[derive(Debug)]
pub(crate) struct DeviceState<const N: usize> {
    /// Prefix of log messages (`virtio-blk`, ...).
    name: &'static str,
    /// Feature bits offered to the driver.
    pub avail_features: u64,
    /// Feature bits the driver accepted (a subset of `avail_features`).
    pub acked_features: u64,
    /// Maximum size of each queue.
    pub queue_sizes: [u16; N],
    /// One EventFd per queue, signalled when the driver notifies it.
    pub queue_evts: [EventFd; N],
    /// Wakes the device's event loop after activation (and, for some devices, reset).
    pub activate_evt: EventFd,
    /// Whether the queue EventFds are registered on the event loop.
    pub queue_evts_registered: bool,
}

impl<const N: usize> DeviceState<N> {
    /// Fresh state with non-blocking EventFds and nothing acked.
    pub fn new(name: &'static str, avail_features: u64, queue_sizes: [u16; N]) -> io::Result<Self> {
        let mut evts = Vec::with_capacity(N);
        for _ in 0..N {
            evts.push(EventFd::new(EFD_NONBLOCK)?);
        }
        let queue_evts = evts
            .try_into()
            .map_err(|_| io::Error::other("queue EventFd count"))?;
        Ok(Self {
            name,
            avail_features,
            acked_features: 0,
            queue_sizes,
            queue_evts,
            activate_evt: EventFd::new(EFD_NONBLOCK)?,
            queue_evts_registered: false,
        })
    }

    /// Record the features the driver accepted, dropping (and warning about) bits that were
    /// not offered.
    pub fn ack_features(&mut self, features: u64) {
        let unknown = features & !self.avail_features;
        if unknown != 0 {
            warn!(
                unknown,
                "{}: driver acked features that were not offered", self.name
            );
        }
        self.acked_features = features & self.avail_features;
    }

    /// Whether the driver accepted feature `bit`.
    pub fn has_feature(&self, bit: u32) -> bool {
        self.acked_features & feature(bit) != 0
    }

    /// Refuse an activation while `active`, or with the wrong number of queues.
    pub fn check_activation(
        &self,
        active: bool,
        ctx: &ActivationContext,
    ) -> Result<(), ActivateError> {
        if active {
            return Err(ActivateError::AlreadyActive);
        }
        if ctx.queues.len() != N {
            return Err(ActivateError::QueueCount {
                expected: N,
                actual: ctx.queues.len(),
            });
        }
        Ok(())
    }

    /// Wake the event loop to finish the activation there.
    pub fn signal_activation(&self) -> Result<(), ActivateError> {
        self.activate_evt
            .write(1)
            .map_err(ActivateError::ActivateEvent)
    }

    /// Register the activate EventFd (`MutEventSubscriber::init`).
    pub fn register_activate_evt(&self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(
            &self.activate_evt,
            ACTIVATE_TOKEN,
            EventSet::IN,
        )) {
            error!("{}: cannot register the activate event: {e}", self.name);
        }
    }

    /// Consume the activate EventFd's counter on the event loop.
    pub fn read_activate_evt(&self) {
        if let Err(e) = self.activate_evt.read() {
            warn!("{}: activate event read failed: {e}", self.name);
        }
    }

    /// Register queue `i`'s EventFd with token `first_token + i`, once. Returns `false` (after
    /// logging) if a registration failed.
    pub fn register_queue_evts(&mut self, ops: &mut EventOps, first_token: u32) -> bool {
        if self.queue_evts_registered {
            return true;
        }
        for (i, evt) in self.queue_evts.iter().enumerate() {
            // `i` < N, a handful of queues: the token cannot overflow.
            let token = first_token + i as u32;
            if let Err(e) = ops.add(Events::with_data(evt, token, EventSet::IN)) {
                error!("{}: cannot register queue event: {e}", self.name);
                return false;
            }
        }
        self.queue_evts_registered = true;
        true
    }
}

/// `Queue::enable_notification` for a device loop that goes round again while it returns
/// `true`: an available index more than the queue size ahead of the device is an error
/// (virtio 1.2 §2.7.6: the driver never has more than `size` buffers outstanding), not more
/// work — otherwise a driver that writes such an index keeps the event loop spinning, since no
/// chain can be popped from that ring.
pub(crate) fn enable_notification<M: GuestMemory>(queue: &mut Queue, mem: &M) -> Result<bool, virtio_queue::Error> {
    if !queue.enable_notification(mem)? {
        return Ok(false);
    }
    let ahead = queue.avail_idx(mem, Ordering::Acquire)?.0.wrapping_sub(queue.next_avail());
    if ahead > queue.size() {
        return Err(virtio_queue::Error::InvalidAvailRingIndex);
    }
    Ok(true)
}

/// After used buffers were added to queue `idx`: interrupt the driver if it wants to be
/// (§2.7.7, §2.7.10 with VIRTIO_F_EVENT_IDX), counting in `interrupts`, or a failed interrupt
/// in `errors`. A ring that cannot be read errs on the side of interrupting.
pub(crate) fn notify_queue<M: GuestMemory>(
    name: &str,
    queue: &mut Queue,
    mem: &M,
    interrupt: &dyn VirtioInterrupt,
    idx: usize,
    (interrupts, errors): (&AtomicU64, &AtomicU64),
) {
    if !queue.needs_notification(mem).unwrap_or(true) {
        return;
    }
    // Devices have a handful of queues: idx fits.
    let int = InterruptType::Queue(u16::try_from(idx).unwrap_or(u16::MAX));
    match interrupt.trigger(int) {
        Ok(()) => interrupts.fetch_add(1, Ordering::Relaxed),
        Err(e) => {
            error!("{name}: cannot raise interrupt: {e}");
            errors.fetch_add(1, Ordering::Relaxed)
        }
    };
}

/// Read `config` at `offset` into `data`; bytes past its end read as 0 (§2.5).
pub(crate) fn read_config(config: &[u8], offset: u64, data: &mut [u8]) {
    let start = usize::try_from(offset)
        .unwrap_or(usize::MAX)
        .min(config.len());
    let end = start.saturating_add(data.len()).min(config.len());
    let n = end - start;
    data[..n].copy_from_slice(&config[start..end]);
    data[n..].fill(0);
}
