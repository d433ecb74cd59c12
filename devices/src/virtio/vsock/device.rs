//! The virtio-vsock device (virtio 1.2 §5.10): identity, configuration space (§5.10.4), and
//! the queue loops on the device event loop.
//!
//! Events (`event_manager::MutEventSubscriber`):
//! - the internal activate EventFd, the only fd registered at `init`. [`Vsock::activate`] and
//!   [`Vsock::reset`] run on a vCPU thread: they update state and signal this EventFd; the
//!   event loop then registers the queue EventFds and applies the backend's fd changes;
//! - the rx queue EventFd: the driver posted receive buffers, deliver pending packets;
//! - the tx queue EventFd: parse and hand every packet to the backend, then deliver replies;
//! - the event queue EventFd: drained and ignored (no events are ever posted, §5.10.6.5);
//! - backend fds (unix listeners and streams), all on one token and told apart by fd.
//!
//! Each queue is drained with notifications disabled, re-enabled, and re-checked; at most
//! one interrupt is raised per queue per batch. When the backend pushes back (too many
//! replies the guest has not collected), the tx queue is left alone until rx progresses.

use std::os::fd::RawFd;
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use tracing::{debug, error, warn};
use virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;
use virtio_queue::{QueueOwnedT, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::{
    FdOp, RxBuffer, TxPacket, UnixMuxer, VsockBackend, VsockConfig, VsockError, VsockMetrics,
    EVENT_QUEUE, EVENT_TRANSPORT_RESET, HOST_CID, MAX_PKT_LEN, NUM_QUEUES, QUEUE_SIZE, RX_QUEUE, TX_QUEUE, TYPE_STREAM,
};
use crate::virtio::device_common::{notify_queue, read_config, DeviceState, ACTIVATE_TOKEN};
use crate::virtio::{
    feature, ActivateError, ActivationContext, VirtioDevice, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};

const QUEUE_TOKEN: u32 = 1;
const BACKEND_TOKEN: u32 = QUEUE_TOKEN + NUM_QUEUES as u32;

/// A virtio-vsock device over a [`VsockBackend`] (by default the unix-socket muxer).
#[derive(Debug)]
pub struct Vsock<B: VsockBackend = UnixMuxer> {
    guest_cid: u64,
    backend: B,
    state: DeviceState<NUM_QUEUES>,
    active: Option<ActivationContext>,
    backend_active: bool,
    reset_pending: bool,
    /// Restored from a snapshot: the driver must hear that its connections are gone.
    transport_reset_pending: bool,
    tx_stalled: bool,
    rx_scratch: Vec<u8>,
    fd_ops: Vec<FdOp>,
    metrics: Arc<VsockMetrics>,
}

impl Vsock<UnixMuxer> {
    /// Build the device with the unix-socket muxer described by `config`.
    pub fn new(config: VsockConfig) -> Result<Self, VsockError> {
        check_cid(config.guest_cid)?;
        let metrics = Arc::new(VsockMetrics::default());
        let guest_cid = config.guest_cid;
        let muxer = UnixMuxer::new(config, metrics.clone())?;
        Self::build(guest_cid, muxer, metrics)
    }
}

impl<B: VsockBackend> Vsock<B> {
    /// Build the device over any backend (a fake in tests).
    pub fn with_backend(
        guest_cid: u64,
        backend: B,
        metrics: Arc<VsockMetrics>,
    ) -> Result<Self, VsockError> {
        check_cid(guest_cid)?;
        Self::build(guest_cid, backend, metrics)
    }

    fn build(guest_cid: u64, backend: B, metrics: Arc<VsockMetrics>) -> Result<Self, VsockError> {
        // No VIRTIO_VSOCK_F_SEQPACKET: stream sockets only (§5.10.3).
        let avail_features = feature(VIRTIO_F_VERSION_1)
            | feature(VIRTIO_RING_F_INDIRECT_DESC)
            | feature(VIRTIO_RING_F_EVENT_IDX);
        Ok(Self {
            guest_cid,
            backend,
            state: DeviceState::new("virtio-vsock", avail_features, [QUEUE_SIZE; NUM_QUEUES])
                .map_err(VsockError::EventFd)?,
            active: None,
            backend_active: false,
            reset_pending: false,
            transport_reset_pending: false,
            tx_stalled: false,
            rx_scratch: vec![0u8; MAX_PKT_LEN as usize],
            fd_ops: Vec::new(),
            metrics,
        })
    }

    /// The guest's CID.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// The device's counters.
    pub fn metrics(&self) -> &Arc<VsockMetrics> {
        &self.metrics
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The backend, mutably (tests).
    pub fn backend_mut(&mut self) -> &mut B {
        &mut self.backend
    }

    /// Whether the guest activated the device (and has not reset it since).
    pub fn is_active(&self) -> bool {
        self.active.is_some()
    }

    /// Take packets from the tx queue and hand them to the backend.
    pub fn process_tx(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let Some(queue) = active.queues.get_mut(TX_QUEUE) else {
            return;
        };
        let mem = &active.mem;
        let metrics = &self.metrics;
        let mut used_any = false;
        self.tx_stalled = false;
        'drain: loop {
            if let Err(e) = queue.disable_notification(mem) {
                error!("virtio-vsock: cannot disable tx notifications: {e}");
                VsockMetrics::inc(&metrics.queue_errors);
                break;
            }
            while let Some(chain) = queue.pop_descriptor_chain(mem) {
                let head = chain.head_index();
                match TxPacket::parse(&chain, mem, self.guest_cid) {
                    Ok(pkt) => {
                        if self.backend.send_pkt(&pkt).is_err() {
                            // Leave the chain for later; it is re-parsed then.
                            queue.go_to_previous_position();
                            self.tx_stalled = true;
                            VsockMetrics::inc(&metrics.tx_backpressure);
                            break 'drain;
                        }
                        VsockMetrics::inc(&metrics.tx_packets);
                        VsockMetrics::add(&metrics.tx_bytes, pkt.data.len() as u64);
                    }
                    Err(e) => {
                        debug!(head, "virtio-vsock: malformed tx packet: {e}");
                        VsockMetrics::inc(&metrics.invalid_packets);
                        if let Some(hdr) = e.reply_to() {
                            self.backend.reject(hdr);
                        }
                    }
                }
                if let Err(e) = queue.add_used(mem, head, 0) {
                    error!(head, "virtio-vsock: cannot add used tx entry: {e}");
                    VsockMetrics::inc(&metrics.queue_errors);
                }
                used_any = true;
            }
            match crate::virtio::device_common::enable_notification(queue, mem) {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    error!("virtio-vsock: cannot enable tx notifications: {e}");
                    VsockMetrics::inc(&metrics.queue_errors);
                    break;
                }
            }
        }
        if used_any {
            notify_queue(
                "virtio-vsock",
                queue,
                mem,
                &*active.interrupt,
                TX_QUEUE,
                (&metrics.interrupts, &metrics.queue_errors),
            );
        }
    }

    /// Deliver the backend's pending packets into the rx queue. Returns whether any rx
    /// buffer was used.
    pub fn process_rx(&mut self) -> bool {
        let guest_cid = self.guest_cid;
        let Some(active) = self.active.as_mut() else {
            return false;
        };
        let Some(queue) = active.queues.get_mut(RX_QUEUE) else {
            return false;
        };
        let mem = &active.mem;
        let metrics = &self.metrics;
        let mut used_any = false;
        loop {
            if let Err(e) = queue.disable_notification(mem) {
                error!("virtio-vsock: cannot disable rx notifications: {e}");
                VsockMetrics::inc(&metrics.queue_errors);
                break;
            }
            let mut starved = false;
            while self.backend.has_pending_rx() {
                let Some(chain) = queue.pop_descriptor_chain(mem) else {
                    starved = true;
                    break;
                };
                let head = chain.head_index();
                let used_len = match RxBuffer::parse(&chain, mem) {
                    Ok(buf) => {
                        let room = buf.payload_room().min(self.rx_scratch.len());
                        let Some(scratch) = self.rx_scratch.get_mut(..room) else {
                            break;
                        };
                        let Some((mut hdr, n)) = self.backend.recv_pkt(scratch) else {
                            // Nothing after all: give the buffer back.
                            queue.go_to_previous_position();
                            break;
                        };
                        let data = scratch.get(..n).unwrap_or_default();
                        hdr.src_cid = HOST_CID;
                        hdr.dst_cid = guest_cid;
                        hdr.type_ = TYPE_STREAM;
                        // n <= room <= MAX_PKT_LEN.
                        hdr.len = u32::try_from(data.len()).unwrap_or(0);
                        match buf.write(&hdr, data) {
                            Ok(len) => {
                                VsockMetrics::inc(&metrics.rx_packets);
                                VsockMetrics::add(&metrics.rx_bytes, data.len() as u64);
                                len
                            }
                            Err(e) => {
                                error!("virtio-vsock: cannot write rx packet: {e}");
                                VsockMetrics::inc(&metrics.queue_errors);
                                0
                            }
                        }
                    }
                    Err(e) => {
                        debug!(head, "virtio-vsock: malformed rx buffer: {e}");
                        VsockMetrics::inc(&metrics.invalid_packets);
                        0
                    }
                };
                if let Err(e) = queue.add_used(mem, head, used_len) {
                    error!(head, "virtio-vsock: cannot add used rx entry: {e}");
                    VsockMetrics::inc(&metrics.queue_errors);
                }
                used_any = true;
            }
            match crate::virtio::device_common::enable_notification(queue, mem) {
                Ok(true) if starved => continue,
                Ok(_) => break,
                Err(e) => {
                    error!("virtio-vsock: cannot enable rx notifications: {e}");
                    VsockMetrics::inc(&metrics.queue_errors);
                    break;
                }
            }
        }
        if used_any {
            notify_queue(
                "virtio-vsock",
                queue,
                mem,
                &*active.interrupt,
                RX_QUEUE,
                (&metrics.interrupts, &metrics.queue_errors),
            );
        }
        used_any
    }

    /// Deliver rx; while that makes progress (or `retry_tx`), retry a stalled tx queue.
    fn pump(&mut self, retry_tx: bool) {
        let mut progressed = self.process_rx() || retry_tx;
        // Bounded: every round but the first consumes rx buffers.
        while self.tx_stalled && progressed {
            self.process_tx();
            progressed = self.process_rx();
        }
    }

    /// The driver added event buffers: post a pending transport reset.
    fn process_event_queue(&mut self) {
        self.post_transport_reset();
    }

    /// Posts `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET` into the first event buffer, if one is
    /// pending and the driver has a buffer (otherwise it waits for the next event-queue
    /// notification).
    fn post_transport_reset(&mut self) {
        if !self.transport_reset_pending {
            return;
        }
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let Some(queue) = active.queues.get_mut(EVENT_QUEUE) else {
            return;
        };
        let mem = &active.mem;
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            debug!("virtio-vsock: no event buffer for the transport reset yet");
            return;
        };
        let head = chain.head_index();
        // struct virtio_vsock_event { le32 id; } in the first device-writable descriptor.
        let mut used_len = 0;
        if let Some(desc) = chain.clone().find(|d| d.is_write_only() && d.len() >= 4) {
            match vm_memory::Bytes::write_obj(mem, EVENT_TRANSPORT_RESET.to_le(), desc.addr()) {
                Ok(()) => used_len = 4,
                Err(e) => {
                    error!("virtio-vsock: cannot write the transport reset event: {e}");
                    VsockMetrics::inc(&self.metrics.queue_errors);
                }
            }
        } else {
            debug!(head, "virtio-vsock: event buffer without a 4-byte writable descriptor");
            VsockMetrics::inc(&self.metrics.invalid_packets);
        }
        if let Err(e) = queue.add_used(mem, head, used_len) {
            error!(head, "virtio-vsock: cannot add used event entry: {e}");
            VsockMetrics::inc(&self.metrics.queue_errors);
        }
        if used_len == 4 {
            self.transport_reset_pending = false;
            debug!("virtio-vsock: transport reset posted");
        }
        notify_queue(
            "virtio-vsock",
            queue,
            mem,
            &*active.interrupt,
            EVENT_QUEUE,
            (&self.metrics.interrupts, &self.metrics.queue_errors),
        );
    }

    fn apply_fd_ops(&mut self, ops: &mut EventOps) {
        self.backend.take_fd_ops(&mut self.fd_ops);
        for op in self.fd_ops.drain(..) {
            let res = match op {
                FdOp::Add(fd, set) => ops.add(backend_events(fd, set)),
                FdOp::Modify(fd, set) => ops.modify(backend_events(fd, set)),
                FdOp::Remove(fd) => ops.remove(backend_events(fd, EventSet::empty())),
                FdOp::Close(fd) => {
                    drop(fd);
                    Ok(())
                }
            };
            if let Err(e) = res {
                error!("virtio-vsock: cannot update watched fds: {e}");
                VsockMetrics::inc(&self.metrics.queue_errors);
            }
        }
    }

    fn handle_activate_event(&mut self, ops: &mut EventOps) {
        self.state.read_activate_evt();
        if std::mem::take(&mut self.reset_pending) && self.backend_active {
            self.backend.reset();
            self.backend_active = false;
        }
        if self.active.is_none() {
            return;
        }
        if !self.state.register_queue_evts(ops, QUEUE_TOKEN) {
            VsockMetrics::inc(&self.metrics.queue_errors);
            return;
        }
        if !self.backend_active {
            self.backend.activate();
            self.backend_active = true;
        }
        self.post_transport_reset();
        // Packets may have been queued before the queue events were registered.
        self.process_tx();
        self.pump(false);
    }

    fn handle_queue_event(&mut self, idx: usize) {
        let Some(evt) = self.state.queue_evts.get(idx) else {
            warn!(idx, "virtio-vsock: event for unknown queue");
            return;
        };
        if let Err(e) = evt.read() {
            // EAGAIN: a spurious wake-up, the queue is still worth checking.
            debug!("virtio-vsock: queue event read failed: {e}");
        }
        VsockMetrics::inc(&self.metrics.queue_events);
        match idx {
            RX_QUEUE => self.pump(true),
            TX_QUEUE => {
                self.process_tx();
                self.pump(false);
            }
            EVENT_QUEUE => self.process_event_queue(),
            _ => {}
        }
    }

    fn handle_backend_event(&mut self, fd: RawFd, set: EventSet) {
        VsockMetrics::inc(&self.metrics.fd_events);
        if !self.backend_active {
            return;
        }
        self.backend.handle_fd_event(fd, set);
        self.pump(false);
    }
}

fn backend_events(fd: RawFd, set: EventSet) -> Events {
    Events::with_data_raw(fd, BACKEND_TOKEN, set)
}

fn check_cid(cid: u64) -> Result<(), VsockError> {
    // §5.10.4: the upper 32 bits are reserved; 0, 1, 2 and u32::MAX are reserved CIDs.
    if cid <= HOST_CID || cid >= u64::from(u32::MAX) {
        return Err(VsockError::InvalidCid(cid));
    }
    Ok(())
}

impl<B: VsockBackend> VirtioDevice for Vsock<B> {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
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
        // struct virtio_vsock_config { le64 guest_cid; } (§5.10.4).
        read_config(&self.guest_cid.to_le_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        warn!(
            offset,
            len = data.len(),
            "virtio-vsock: config write ignored"
        );
    }

    fn activate(&mut self, ctx: ActivationContext) -> Result<(), ActivateError> {
        self.state.check_activation(self.active.is_some(), &ctx)?;
        self.state.signal_activation()?;
        self.active = Some(ctx);
        VsockMetrics::inc(&self.metrics.activations);
        Ok(())
    }

    fn reset(&mut self) -> bool {
        // The backend drops its connections on the event loop (it owns the fd registrations).
        self.active = None;
        self.state.acked_features = 0;
        self.tx_stalled = false;
        self.reset_pending = true;
        if let Err(e) = self.state.activate_evt.write(1) {
            error!("virtio-vsock: cannot wake the event loop for reset: {e}");
            return false;
        }
        true
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.state.queue_evts
    }

    fn queue_states(&self) -> Option<Vec<virtio_queue::QueueState>> {
        self.active.as_ref().map(|a| crate::virtio::states_of(&a.queues))
    }

    fn restored(&mut self) {
        // The backend starts with no connections while the driver still has its sockets.
        self.transport_reset_pending = true;
    }
}

impl<B: VsockBackend> MutEventSubscriber for Vsock<B> {
    fn init(&mut self, ops: &mut EventOps) {
        self.state.register_activate_evt(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            ACTIVATE_TOKEN => self.handle_activate_event(ops),
            BACKEND_TOKEN => self.handle_backend_event(events.fd(), events.event_set()),
            token => self.handle_queue_event(token.wrapping_sub(QUEUE_TOKEN) as usize),
        }
        self.apply_fd_ops(ops);
    }
}
