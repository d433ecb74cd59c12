//! The virtio-9p device (virtio 1.2 §5.7): feature `VIRTIO_9P_MOUNT_TAG`, configuration space
//! (§5.7.4: `le16 tag_len; u8 tag[tag_len]`), one request queue, and its side of the worker
//! pool on the device event loop.
//!
//! Events (`event_manager::MutEventSubscriber`):
//! - the internal activate EventFd, the only fd registered at `init`. [`P9Device::activate`]
//!   runs on a vCPU thread: it stores the [`ActivationContext`] and signals this EventFd; the
//!   event loop then starts the worker threads (first activation only) and registers the
//!   runtime fds below;
//! - the queue EventFd (the transport's `QueueNotify`, normally a KVM ioeventfd): pop every
//!   available chain (notifications disabled while draining) and queue them for the workers;
//! - the pool's completion EventFd: add the used entries of finished requests of the current
//!   activation and raise at most one interrupt per batch (honouring
//!   `VIRTIO_RING_F_EVENT_IDX`).

use std::sync::Arc;
use std::time::Duration;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use p9::Server;
use tracing::{error, warn};
use virtio_bindings::virtio_ids::VIRTIO_ID_9P;
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use bincode::Options;

use super::worker::{Job, SharedMem, WorkerPool};
use super::{
    validate_tag, P9Config, P9Error, P9Metrics, DEFAULT_WORKERS, MAX_WORKERS, QUEUE_SIZE,
    VIRTIO_9P_MOUNT_TAG,
};
use crate::virtio::device_common::{notify_queue, read_config, DeviceState, ACTIVATE_TOKEN};
use crate::virtio::{
    feature, ActivateError, ActivationContext, DeviceStateError, VirtioDevice, VirtioInterrupt,
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};

const QUEUE_TOKEN: u32 = 1;
const COMPLETION_TOKEN: u32 = 2;

/// How long a reset waits for requests already running on the workers.
pub const RESET_DRAIN_TIMEOUT: Duration = Duration::from_millis(500);

#[derive(Debug)]
struct ActiveState {
    mem: SharedMem,
    interrupt: Arc<dyn VirtioInterrupt>,
    queues: Vec<Queue>,
}

/// A virtio-9p device exporting one host directory under one mount tag.
#[derive(Debug)]
pub struct P9Device {
    tag: String,
    server_config: p9::Config,
    /// The 9P session of the current activation (a fresh one after every reset).
    server: Arc<Server>,
    state: DeviceState<1>,
    config_space: Vec<u8>,
    active: Option<ActiveState>,
    runtime_evts_registered: bool,
    pool: WorkerPool,
    metrics: Arc<P9Metrics>,
    /// Chains popped and not yet returned as used entries: a snapshot must wait for 0.
    in_flight: usize,
}

impl P9Device {
    /// Validate the tag, open the export root and build the device. No thread starts until
    /// the guest activates the device.
    pub fn new(config: P9Config) -> Result<Self, P9Error> {
        validate_tag(&config.tag)?;
        let workers = match config.workers {
            0 => DEFAULT_WORKERS,
            n if n <= MAX_WORKERS => n,
            n => return Err(P9Error::Workers(n)),
        };
        let server = Server::new(config.server.clone()).map_err(P9Error::Server)?;
        let metrics = Arc::new(P9Metrics::default());
        let tag_len = config.tag.len() as u16; // validate_tag bounds it by u16::MAX
        let mut config_space = Vec::with_capacity(2 + config.tag.len());
        config_space.extend_from_slice(&tag_len.to_le_bytes());
        config_space.extend_from_slice(config.tag.as_bytes());
        Ok(Self {
            tag: config.tag,
            server_config: config.server,
            server: Arc::new(server),
            state: DeviceState::new(
                "virtio-9p",
                feature(VIRTIO_F_VERSION_1)
                    | feature(VIRTIO_RING_F_INDIRECT_DESC)
                    | feature(VIRTIO_RING_F_EVENT_IDX)
                    | feature(VIRTIO_9P_MOUNT_TAG),
                [QUEUE_SIZE],
            )
            .map_err(P9Error::EventFd)?,
            config_space,
            active: None,
            runtime_evts_registered: false,
            pool: WorkerPool::new(workers, metrics.clone()).map_err(P9Error::EventFd)?,
            metrics,
            in_flight: 0,
        })
    }

    /// The mount tag.
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// The device's counters.
    pub fn metrics(&self) -> &Arc<P9Metrics> {
        &self.metrics
    }

    /// The 9P server of the current session.
    pub fn server(&self) -> &Arc<Server> {
        &self.server
    }

    /// Features the driver accepted.
    pub fn acked_features(&self) -> u64 {
        self.state.acked_features
    }

    /// Whether the guest activated the device (and has not reset it since).
    pub fn is_active(&self) -> bool {
        self.active.is_some()
    }

    /// Requests queued for or running on the workers.
    pub fn pending_requests(&self) -> usize {
        self.pool.pending()
    }

    /// The worker pool (for the completion EventFd and tests).
    pub fn pool(&self) -> &WorkerPool {
        &self.pool
    }

    /// Pop every available chain of the request queue and hand them to the workers.
    pub fn process_queue(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let Some(queue) = active.queues.first_mut() else {
            return;
        };
        let mem = &active.mem;
        let generation = self.pool.generation();
        let mut jobs = Vec::new();
        loop {
            if let Err(e) = queue.disable_notification(&**mem) {
                error!("virtio-9p: cannot disable notifications: {e}");
                P9Metrics::inc(&self.metrics.queue_errors);
                break;
            }
            while let Some(chain) = queue.pop_descriptor_chain(mem.clone()) {
                jobs.push(Job {
                    generation,
                    server: self.server.clone(),
                    chain,
                });
            }
            match crate::virtio::device_common::enable_notification(queue, &**mem) {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    error!("virtio-9p: cannot enable notifications: {e}");
                    P9Metrics::inc(&self.metrics.queue_errors);
                    break;
                }
            }
        }
        P9Metrics::add(&self.metrics.requests, jobs.len() as u64);
        self.in_flight += jobs.len();
        self.pool.submit(jobs);
    }

    /// Add the used entries of finished requests and raise (at most) one interrupt.
    pub fn process_completions(&mut self) {
        let done = self.pool.take_completions();
        if done.is_empty() {
            return;
        }
        let generation = self.pool.generation();
        let Some(active) = self.active.as_mut() else {
            P9Metrics::add(&self.metrics.stale_completions, done.len() as u64);
            return;
        };
        let Some(queue) = active.queues.first_mut() else {
            return;
        };
        let mem = &*active.mem;
        let mut used_any = false;
        for c in done {
            if c.generation != generation {
                P9Metrics::inc(&self.metrics.stale_completions);
                continue;
            }
            self.in_flight = self.in_flight.saturating_sub(1);
            if let Err(e) = queue.add_used(mem, c.head, c.len) {
                error!(head = c.head, "virtio-9p: cannot add used entry: {e}");
                P9Metrics::inc(&self.metrics.queue_errors);
            }
            used_any = true;
        }
        if used_any {
            let counters = (&self.metrics.interrupts, &self.metrics.queue_errors);
            notify_queue("virtio-9p", queue, mem, &*active.interrupt, 0, counters);
        }
    }

    fn handle_activate_event(&mut self, ops: &mut EventOps) {
        self.state.read_activate_evt();
        if self.active.is_none() {
            return;
        }
        self.pool.start("dinv-9p");
        if !self.runtime_evts_registered {
            let queue = Events::with_data(&self.state.queue_evts[0], QUEUE_TOKEN, EventSet::IN);
            let done =
                Events::with_data(self.pool.completion_evt(), COMPLETION_TOKEN, EventSet::IN);
            for events in [queue, done] {
                if let Err(e) = ops.add(events) {
                    error!("virtio-9p: cannot register a runtime event: {e}");
                    return;
                }
            }
            self.runtime_evts_registered = true;
        }
        // Requests may have been queued before the queue event was registered.
        self.process_queue();
    }

    fn handle_queue_event(&mut self) {
        if let Err(e) = self.state.queue_evts[0].read() {
            // EAGAIN: a spurious wake-up, the queue is still worth checking.
            tracing::debug!("virtio-9p: queue event read failed: {e}");
        }
        P9Metrics::inc(&self.metrics.queue_events);
        self.process_queue();
    }
}

impl VirtioDevice for P9Device {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_9P
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.state.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        self.state.avail_features
    }

    fn ack_features(&mut self, features: u64) {
        self.state.ack_features(features);
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config(&self.config_space, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // The configuration space is read-only (§5.7.4).
        warn!(offset, len = data.len(), "virtio-9p: config write ignored");
    }

    fn activate(&mut self, ctx: ActivationContext) -> Result<(), ActivateError> {
        self.state.check_activation(self.active.is_some(), &ctx)?;
        self.state.signal_activation()?;
        self.active = Some(ActiveState {
            mem: Arc::new(ctx.mem),
            interrupt: ctx.interrupt,
            queues: ctx.queues,
        });
        P9Metrics::inc(&self.metrics.activations);
        Ok(())
    }

    fn reset(&mut self) -> bool {
        // Stop new work and forget the old activation's completions. The queue and
        // completion EventFds stay registered; events for an inactive device are ignored.
        self.active = None;
        self.in_flight = 0;
        self.state.acked_features = 0;
        if !self.pool.reset(RESET_DRAIN_TIMEOUT) {
            warn!(
                tag = self.tag,
                "virtio-9p: requests still running after reset; their replies are dropped"
            );
        }
        // The guest's 9P session is over: start the next one with an empty fid table (the
        // old server, and the host fds its fids hold, go with its last request).
        match Server::new(self.server_config.clone()) {
            Ok(server) => self.server = Arc::new(server),
            Err(e) => warn!(
                tag = self.tag,
                "virtio-9p: cannot reopen the export, keeping the old session: {e}"
            ),
        }
        true
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.state.queue_evts
    }

    fn queue_states(&self) -> Option<Vec<virtio_queue::QueueState>> {
        self.active
            .as_ref()
            .map(|a| crate::virtio::states_of(&a.queues))
    }

    fn settle(&mut self) {
        self.process_completions();
    }

    /// The 9P session (msize, fids as paths in the export) while active and idle.
    fn save_state(&self) -> Result<Option<Vec<u8>>, DeviceStateError> {
        if self.active.is_none() {
            return Ok(None);
        }
        if self.in_flight > 0 {
            return Err(DeviceStateError::Busy);
        }
        let session = self
            .server
            .save_session()
            .map_err(|e| DeviceStateError::Unsupported(e.to_string()))?;
        state_codec()
            .serialize(&session)
            .map(Some)
            .map_err(|e| DeviceStateError::Unsupported(e.to_string()))
    }

    /// Reopen the saved fids in this device's (fresh) session.
    fn restore_state(&mut self, state: &[u8]) -> Result<(), DeviceStateError> {
        let session: p9::SessionState = state_codec()
            .deserialize(state)
            .map_err(|e| DeviceStateError::Invalid(e.to_string()))?;
        let restored = self
            .server
            .restore_session(&session)
            .map_err(|e| DeviceStateError::Invalid(e.to_string()))?;
        tracing::info!(
            tag = self.tag,
            restored,
            saved = session.fids.len(),
            "virtio-9p: session restored"
        );
        Ok(())
    }
}

/// The encoding of a saved 9P session: fixed-width bincode, at most 64 MiB.
fn state_codec() -> impl Options {
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .with_limit(64 << 20)
}

impl MutEventSubscriber for P9Device {
    fn init(&mut self, ops: &mut EventOps) {
        self.state.register_activate_evt(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            ACTIVATE_TOKEN => self.handle_activate_event(ops),
            QUEUE_TOKEN => self.handle_queue_event(),
            COMPLETION_TOKEN => self.process_completions(),
            token => warn!(token, "virtio-9p: unknown event"),
        }
    }
}
