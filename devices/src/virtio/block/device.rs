//! The virtio-blk device (virtio 1.2 §5.2): features, configuration space (§5.2.4), and the
//! queue loop on the device event loop.
//!
//! Events (`event_manager::MutEventSubscriber`):
//! - the internal activate EventFd, the only fd registered at `init`. [`Block::activate`]
//!   runs on a vCPU thread: it stores the [`ActivationContext`] and signals this EventFd; the
//!   event loop then registers the queue EventFd (runtime fds only after activation);
//! - the queue EventFd (the transport's `QueueNotify`, normally a KVM ioeventfd): drain the
//!   queue with notifications disabled, re-enable, repeat if more arrived, then raise at most
//!   one interrupt for the batch (honouring `VIRTIO_RING_F_EVENT_IDX`).

use std::fs::File;
use std::mem::offset_of;
use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use tracing::{debug, error, warn};
use virtio_bindings::virtio_blk::{
    virtio_blk_config, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::QueueT;
use vmm_sys_util::eventfd::EventFd;

use super::request::complete_invalid;
use super::{
    BlockConfig, BlockError, BlockMetrics, Disk, Request, RequestContext, DISCARD_SECTOR_ALIGNMENT,
    MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, QUEUE_SIZE, SECTOR_SIZE,
};
use crate::virtio::device_common::{notify_queue, read_config, DeviceState, ACTIVATE_TOKEN};
use crate::virtio::{
    feature, ActivateError, ActivationContext, VirtioDevice, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};

const QUEUE_TOKEN: u32 = 1;

/// A virtio-blk device with one request queue.
#[derive(Debug)]
pub struct Block {
    disk: Disk,
    state: DeviceState<1>,
    config_space: Vec<u8>,
    active: Option<ActivationContext>,
    metrics: Arc<BlockMetrics>,
}

impl Block {
    /// Open `config.path` and build the device.
    pub fn new(config: BlockConfig) -> Result<Self, BlockError> {
        let disk = Disk::open(&config)?;
        Self::with_disk(disk, &config)
    }

    /// Build the device over an already open file (a memfd, say).
    pub fn with_file(file: File, config: BlockConfig) -> Result<Self, BlockError> {
        let disk = Disk::from_file(file, &config)?;
        Self::with_disk(disk, &config)
    }

    fn with_disk(disk: Disk, config: &BlockConfig) -> Result<Self, BlockError> {
        let queue_size = match config.queue_size {
            0 => QUEUE_SIZE,
            n if n.is_power_of_two() && n <= QUEUE_SIZE => n,
            n => return Err(BlockError::QueueSize(n)),
        };
        let mut avail_features = feature(VIRTIO_F_VERSION_1)
            | feature(VIRTIO_RING_F_INDIRECT_DESC)
            | feature(VIRTIO_RING_F_EVENT_IDX)
            | feature(VIRTIO_BLK_F_SEG_MAX)
            | feature(VIRTIO_BLK_F_BLK_SIZE)
            | feature(VIRTIO_BLK_F_FLUSH);
        if disk.read_only() {
            avail_features |= feature(VIRTIO_BLK_F_RO);
        } else {
            avail_features |= feature(VIRTIO_BLK_F_DISCARD) | feature(VIRTIO_BLK_F_WRITE_ZEROES);
        }
        let config_space = build_config_space(&disk, queue_size);
        Ok(Self {
            disk,
            state: DeviceState::new("virtio-blk", avail_features, [queue_size])
                .map_err(BlockError::EventFd)?,
            config_space,
            active: None,
            metrics: Arc::new(BlockMetrics::default()),
        })
    }

    /// The device's counters.
    pub fn metrics(&self) -> &Arc<BlockMetrics> {
        &self.metrics
    }

    /// The backing disk.
    pub fn disk(&self) -> &Disk {
        &self.disk
    }

    /// Features the driver accepted.
    pub fn acked_features(&self) -> u64 {
        self.state.acked_features
    }

    /// Whether the guest activated the device (and has not reset it since).
    pub fn is_active(&self) -> bool {
        self.active.is_some()
    }

    fn request_context(&self) -> RequestContext {
        RequestContext {
            capacity_sectors: self.disk.capacity_sectors(),
            discard: self.state.has_feature(VIRTIO_BLK_F_DISCARD),
            write_zeroes: self.state.has_feature(VIRTIO_BLK_F_WRITE_ZEROES),
        }
    }

    /// Drain queue `idx` and raise (at most) one interrupt for the batch.
    pub fn process_queue(&mut self, idx: usize) {
        let ctx = self.request_context();
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let Some(queue) = active.queues.get_mut(idx) else {
            return;
        };
        let mem = &active.mem;
        let mut used_any = false;
        loop {
            if let Err(e) = queue.disable_notification(mem) {
                error!("virtio-blk: cannot disable notifications: {e}");
                BlockMetrics::inc(&self.metrics.queue_errors);
                break;
            }
            while let Some(chain) = queue.pop_descriptor_chain(mem) {
                let head = chain.head_index();
                let used_len = match Request::parse(&chain, mem, &ctx) {
                    Ok(req) => req.execute(&self.disk, &self.metrics).used_len,
                    Err(e) => {
                        debug!(head, "virtio-blk: malformed request: {e}");
                        BlockMetrics::inc(&self.metrics.invalid_requests);
                        complete_invalid(&chain, mem)
                    }
                };
                if let Err(e) = queue.add_used(mem, head, used_len) {
                    error!(head, "virtio-blk: cannot add used entry: {e}");
                    BlockMetrics::inc(&self.metrics.queue_errors);
                }
                used_any = true;
            }
            match crate::virtio::device_common::enable_notification(queue, mem) {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    error!("virtio-blk: cannot enable notifications: {e}");
                    BlockMetrics::inc(&self.metrics.queue_errors);
                    break;
                }
            }
        }
        if !used_any {
            return;
        }
        let counters = (&self.metrics.interrupts, &self.metrics.queue_errors);
        notify_queue("virtio-blk", queue, mem, &*active.interrupt, idx, counters);
    }

    fn handle_activate_event(&mut self, ops: &mut EventOps) {
        self.state.read_activate_evt();
        if self.active.is_none() {
            return;
        }
        if !self.state.register_queue_evts(ops, QUEUE_TOKEN) {
            return;
        }
        // Requests may have been queued before the queue event was registered.
        for idx in 0..self.state.queue_evts.len() {
            self.process_queue(idx);
        }
    }

    fn handle_queue_event(&mut self, idx: usize) {
        let Some(evt) = self.state.queue_evts.get(idx) else {
            warn!(idx, "virtio-blk: event for unknown queue");
            return;
        };
        if let Err(e) = evt.read() {
            // EAGAIN: a spurious wake-up, the queue is still worth checking.
            debug!("virtio-blk: queue event read failed: {e}");
        }
        BlockMetrics::inc(&self.metrics.queue_events);
        self.process_queue(idx);
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
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
        // No writable field is offered (no VIRTIO_BLK_F_CONFIG_WCE).
        warn!(offset, len = data.len(), "virtio-blk: config write ignored");
    }

    fn activate(&mut self, ctx: ActivationContext) -> Result<(), ActivateError> {
        self.state.check_activation(self.active.is_some(), &ctx)?;
        self.state.signal_activation()?;
        self.active = Some(ctx);
        BlockMetrics::inc(&self.metrics.activations);
        Ok(())
    }

    fn reset(&mut self) -> bool {
        // The queue EventFd stays registered; events for an inactive device are drained
        // and ignored.
        self.active = None;
        self.state.acked_features = 0;
        true
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.state.queue_evts
    }

    fn queue_states(&self) -> Option<Vec<virtio_queue::QueueState>> {
        self.active.as_ref().map(|a| crate::virtio::states_of(&a.queues))
    }
}

impl MutEventSubscriber for Block {
    fn init(&mut self, ops: &mut EventOps) {
        self.state.register_activate_evt(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            ACTIVATE_TOKEN => self.handle_activate_event(ops),
            token => self.handle_queue_event((token - QUEUE_TOKEN) as usize),
        }
    }
}

/// The configuration space (§5.2.4) up to `write_zeroes_may_unmap` (no secure erase, zones).
fn build_config_space(disk: &Disk, queue_size: u16) -> Vec<u8> {
    let len = offset_of!(virtio_blk_config, max_secure_erase_sectors);
    let mut c = vec![0u8; len];
    let mut put = |at: usize, bytes: &[u8]| c[at..at + bytes.len()].copy_from_slice(bytes);
    put(
        offset_of!(virtio_blk_config, capacity),
        &disk.capacity_sectors().to_le_bytes(),
    );
    // Two descriptors of every request carry the header and the status.
    let seg_max = u32::from(queue_size.saturating_sub(2).max(1));
    put(
        offset_of!(virtio_blk_config, seg_max),
        &seg_max.to_le_bytes(),
    );
    put(
        offset_of!(virtio_blk_config, blk_size),
        &(SECTOR_SIZE as u32).to_le_bytes(),
    );
    for (field, value) in [
        (
            offset_of!(virtio_blk_config, max_discard_sectors),
            MAX_DISCARD_SECTORS,
        ),
        (
            offset_of!(virtio_blk_config, max_discard_seg),
            MAX_DISCARD_SEG,
        ),
        (
            offset_of!(virtio_blk_config, discard_sector_alignment),
            DISCARD_SECTOR_ALIGNMENT,
        ),
        (
            offset_of!(virtio_blk_config, max_write_zeroes_sectors),
            MAX_DISCARD_SECTORS,
        ),
        (
            offset_of!(virtio_blk_config, max_write_zeroes_seg),
            MAX_DISCARD_SEG,
        ),
    ] {
        put(field, &value.to_le_bytes());
    }
    put(offset_of!(virtio_blk_config, write_zeroes_may_unmap), &[1]);
    c
}
