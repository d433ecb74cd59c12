//! The virtio-net device (virtio 1.2 §5.1): identity, configuration space (§5.1.4), and the
//! queue loops on the device event loop.
//!
//! Events (`event_manager::MutEventSubscriber`):
//! - the internal activate EventFd, the only fd registered at `init`. [`Net::activate`] and
//!   [`Net::reset`] run on a vCPU thread: they update state and signal this EventFd; the event
//!   loop then registers the queue EventFds and the backend fd (and drops the backend fd again
//!   after a reset);
//! - the tx queue EventFd: parse every chain and hand its frame to the backend, poll the
//!   backend, deliver what it produced;
//! - the rx queue EventFd: the driver posted receive buffers, deliver pending frames;
//! - the backend fd: poll the backend, deliver what it produced.
//!
//! The tx queue is drained with notifications disabled, re-enabled and re-checked; at most one
//! interrupt is raised per queue per batch. Rx notifications stay disabled while frames flow
//! and are enabled only when a frame is waiting and the guest has no (or too few) buffers:
//! delivery then pauses — the backend is simply not drained, which for the netstack means its
//! fd stays quiet until frames are taken again — and resumes on the rx queue event.

use std::os::fd::RawFd;
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use tracing::{debug, error, warn};
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::frame::{fill_l4_checksum, write_frame, NetHeader, RxChain, TxFrame};
use super::{
    NetBackend, NetConfig, NetError, NetMetrics, ETH_HLEN, HDR_LEN, MAX_MTU, MIN_MTU, NUM_QUEUES,
    QUEUE_SIZE, RX_QUEUE, TX_QUEUE, VLAN_HLEN,
};
use crate::virtio::device_common::{notify_queue, read_config, DeviceState, ACTIVATE_TOKEN};
use crate::virtio::{
    feature, ActivateError, ActivationContext, VirtioDevice, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};

const RX_TOKEN: u32 = 1;
const TX_TOKEN: u32 = 2;
const BACKEND_TOKEN: u32 = 3;
// The queue EventFds are registered with token `RX_TOKEN + queue index`.
const _: () =
    assert!(RX_TOKEN + RX_QUEUE as u32 == RX_TOKEN && RX_TOKEN + TX_QUEUE as u32 == TX_TOKEN);
/// Poll the backend at least this often during a long tx batch, so its input queue (the
/// netstack holds 1024 frames) never overflows.
const TX_POLL_EVERY: usize = 256;
/// Size of the configuration space: `mac`, `status`, `max_virtqueue_pairs`, `mtu` (§5.1.4).
const CONFIG_LEN: usize = 12;

/// How reserving rx buffers for one frame ended.
enum Reserve {
    /// Enough buffers popped.
    Ready,
    /// The guest has too few buffers posted; all were given back.
    Starved,
    /// The frame cannot fit the guest's buffers even with the whole ring.
    TooSmall,
}

/// A virtio-net device over a [`NetBackend`].
#[derive(Debug)]
pub struct Net {
    mac: [u8; 6],
    mtu: u16,
    backend: Box<dyn NetBackend + Send>,
    state: DeviceState<NUM_QUEUES>,
    active: Option<ActivationContext>,
    reset_pending: bool,
    backend_fd_registered: Option<RawFd>,
    tx_buf: Vec<u8>,
    rx_bufs: Vec<RxChain>,
    rx_bad: Vec<u16>,
    rx_used: Vec<u32>,
    metrics: Arc<NetMetrics>,
}

impl Net {
    /// Build the device. Refuses a zero or multicast MAC, an MTU outside
    /// [`MIN_MTU`]..=[`MAX_MTU`], and an MTU other than the backend's.
    pub fn new(config: NetConfig) -> Result<Self, NetError> {
        let NetConfig { mac, mtu, backend } = config;
        if mac == [0; 6] || mac[0] & 1 != 0 {
            return Err(NetError::InvalidMac(mac));
        }
        if !(MIN_MTU..=MAX_MTU).contains(&mtu) {
            return Err(NetError::InvalidMtu(mtu));
        }
        if let Some(backend_mtu) = backend.mtu() {
            if backend_mtu != usize::from(mtu) {
                return Err(NetError::MtuMismatch {
                    device: mtu,
                    backend: backend_mtu,
                });
            }
        }
        let avail_features = feature(VIRTIO_F_VERSION_1)
            | feature(VIRTIO_RING_F_INDIRECT_DESC)
            | feature(VIRTIO_RING_F_EVENT_IDX)
            | feature(VIRTIO_NET_F_MAC)
            | feature(VIRTIO_NET_F_MTU)
            | feature(VIRTIO_NET_F_STATUS)
            | feature(VIRTIO_NET_F_CSUM)
            | feature(VIRTIO_NET_F_GUEST_CSUM)
            | feature(VIRTIO_NET_F_MRG_RXBUF);
        Ok(Self {
            mac,
            mtu,
            backend,
            state: DeviceState::new("virtio-net", avail_features, [QUEUE_SIZE; NUM_QUEUES])
                .map_err(NetError::EventFd)?,
            active: None,
            reset_pending: false,
            backend_fd_registered: None,
            tx_buf: Vec::new(),
            rx_bufs: Vec::new(),
            rx_bad: Vec::new(),
            rx_used: Vec::new(),
            metrics: Arc::new(NetMetrics::default()),
        })
    }

    /// The guest's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The MTU offered to the guest.
    pub fn mtu(&self) -> u16 {
        self.mtu
    }

    /// The features the driver accepted.
    pub fn acked_features(&self) -> u64 {
        self.state.acked_features
    }

    /// The device's counters.
    pub fn metrics(&self) -> &Arc<NetMetrics> {
        &self.metrics
    }

    /// The backend.
    pub fn backend(&self) -> &(dyn NetBackend + Send) {
        &*self.backend
    }

    /// Whether the guest activated the device (and has not reset it since).
    pub fn is_active(&self) -> bool {
        self.active.is_some()
    }

    /// Largest frame accepted from the guest or delivered to it: MTU + ethernet + one VLAN tag.
    fn max_frame(&self) -> usize {
        usize::from(self.mtu) + ETH_HLEN + VLAN_HLEN
    }

    /// Take frames from the tx queue and hand them to the backend. Returns whether any was
    /// handed over.
    pub fn process_tx(&mut self) -> bool {
        let max_frame = self.max_frame();
        let Some(active) = self.active.as_mut() else {
            return false;
        };
        let Some(queue) = active.queues.get_mut(TX_QUEUE) else {
            return false;
        };
        let mem = &active.mem;
        let metrics = &self.metrics;
        let backend = &mut self.backend;
        let complete_csum = backend.verifies_checksums();
        let mut used_any = false;
        let mut sent = 0usize;
        let mut since_poll = 0usize;
        loop {
            if let Err(e) = queue.disable_notification(mem) {
                error!("virtio-net: cannot disable tx notifications: {e}");
                NetMetrics::inc(&metrics.queue_errors);
                break;
            }
            while let Some(chain) = queue.pop_descriptor_chain(mem) {
                let head = chain.head_index();
                match TxFrame::parse(&chain, mem, max_frame, &mut self.tx_buf) {
                    Ok(mut f) => {
                        if complete_csum && f.complete_checksum() {
                            NetMetrics::inc(&metrics.tx_csum_completed);
                        }
                        backend.send_frame(f.frame);
                        NetMetrics::inc(&metrics.tx_frames);
                        NetMetrics::add(&metrics.tx_bytes, f.frame.len() as u64);
                        sent += 1;
                        since_poll += 1;
                        if since_poll == TX_POLL_EVERY {
                            since_poll = 0;
                            backend.poll();
                        }
                    }
                    Err(e) => {
                        debug!(head, "virtio-net: malformed tx chain: {e}");
                        NetMetrics::inc(&metrics.tx_malformed);
                    }
                }
                if let Err(e) = queue.add_used(mem, head, 0) {
                    error!(head, "virtio-net: cannot add used tx entry: {e}");
                    NetMetrics::inc(&metrics.queue_errors);
                }
                used_any = true;
            }
            match crate::virtio::device_common::enable_notification(queue, mem) {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    error!("virtio-net: cannot enable tx notifications: {e}");
                    NetMetrics::inc(&metrics.queue_errors);
                    break;
                }
            }
        }
        if used_any {
            notify_queue(
                "virtio-net",
                queue,
                mem,
                &*active.interrupt,
                TX_QUEUE,
                (&metrics.interrupts, &metrics.queue_errors),
            );
        }
        sent > 0
    }

    /// Deliver the backend's pending frames into the rx queue. Returns whether any rx buffer
    /// was used.
    pub fn process_rx(&mut self) -> bool {
        let max_frame = self.max_frame();
        let mergeable = self.state.has_feature(VIRTIO_NET_F_MRG_RXBUF);
        let data_valid = self.state.has_feature(VIRTIO_NET_F_GUEST_CSUM);
        let fill_csum = !data_valid && !self.backend.computes_checksums();
        let Some(active) = self.active.as_mut() else {
            return false;
        };
        let Some(queue) = active.queues.get_mut(RX_QUEUE) else {
            return false;
        };
        let mem = &active.mem;
        let metrics = &self.metrics;
        let backend = &mut self.backend;
        let (bufs, bad, used) = (&mut self.rx_bufs, &mut self.rx_bad, &mut self.rx_used);
        let mut used_any = false;
        if let Err(e) = queue.disable_notification(mem) {
            error!("virtio-net: cannot disable rx notifications: {e}");
            NetMetrics::inc(&metrics.queue_errors);
        }
        while let Some(len) = backend.peek_frame_len() {
            if len > max_frame || len == 0 {
                warn!(len, "virtio-net: dropping a frame larger than the MTU");
                if let Some(frame) = backend.recv_frame() {
                    backend.recycle_frame(frame);
                }
                NetMetrics::inc(&metrics.rx_dropped);
                continue;
            }
            let start = queue.next_avail();
            match reserve(queue, mem, HDR_LEN + len, mergeable, bufs, bad) {
                Reserve::Starved => {
                    // Ask for a kick once more buffers than the ones seen are posted, then
                    // give those back.
                    let more = crate::virtio::device_common::enable_notification(queue, mem);
                    queue.set_next_avail(start);
                    match more {
                        Ok(true) => {
                            if let Err(e) = queue.disable_notification(mem) {
                                error!("virtio-net: cannot disable rx notifications: {e}");
                                NetMetrics::inc(&metrics.queue_errors);
                            }
                            continue;
                        }
                        Ok(false) => NetMetrics::inc(&metrics.rx_starved),
                        Err(e) => {
                            error!("virtio-net: cannot enable rx notifications: {e}");
                            NetMetrics::inc(&metrics.queue_errors);
                        }
                    }
                    break;
                }
                Reserve::TooSmall => {
                    debug!(len, "virtio-net: frame does not fit the guest's rx buffers");
                    if let Some(frame) = backend.recv_frame() {
                        backend.recycle_frame(frame);
                    }
                    NetMetrics::inc(&metrics.rx_dropped);
                    used.clear();
                    used.resize(bufs.len(), 0);
                }
                Reserve::Ready => {
                    let Some(mut frame) = backend.recv_frame() else {
                        // The backend went back on its word: return the buffers.
                        queue.set_next_avail(start);
                        break;
                    };
                    if fill_csum {
                        fill_l4_checksum(&mut frame);
                    }
                    // bufs.len() <= queue size <= u16::MAX.
                    let num = u16::try_from(bufs.len()).unwrap_or(u16::MAX);
                    let header = NetHeader::rx(num, data_valid);
                    used.clear();
                    match write_frame(bufs, mem, &header, &frame, used) {
                        Ok(()) => {
                            NetMetrics::inc(&metrics.rx_frames);
                            NetMetrics::add(&metrics.rx_bytes, frame.len() as u64);
                        }
                        Err(e) => {
                            error!("virtio-net: cannot write rx frame: {e}");
                            NetMetrics::inc(&metrics.queue_errors);
                            used.clear();
                            used.resize(bufs.len(), 0);
                        }
                    }
                    backend.recycle_frame(frame);
                }
            }
            // The frame's buffers first, contiguous in the used ring, then the malformed ones.
            let entries = bufs.iter().map(RxChain::head).zip(used.iter().copied());
            let bad_entries = bad.iter().map(|&h| (h, 0u32));
            for (head, len) in entries.chain(bad_entries) {
                if let Err(e) = queue.add_used(mem, head, len) {
                    error!(head, "virtio-net: cannot add used rx entry: {e}");
                    NetMetrics::inc(&metrics.queue_errors);
                }
                used_any = true;
            }
            NetMetrics::add(&metrics.rx_malformed, bad.len() as u64);
        }
        if used_any {
            notify_queue(
                "virtio-net",
                queue,
                mem,
                &*active.interrupt,
                RX_QUEUE,
                (&metrics.interrupts, &metrics.queue_errors),
            );
        }
        used_any
    }

    /// Deliver what the backend has, after a tx batch or a backend event.
    fn poll_backend(&mut self) {
        self.backend.poll();
        self.process_rx();
    }

    fn handle_activate_event(&mut self, ops: &mut EventOps) {
        self.state.read_activate_evt();
        if std::mem::take(&mut self.reset_pending) && self.active.is_none() {
            if let Some(fd) = self.backend_fd_registered.take() {
                if let Err(e) = ops.remove(backend_events(fd)) {
                    error!("virtio-net: cannot unregister the backend fd: {e}");
                    NetMetrics::inc(&self.metrics.queue_errors);
                }
            }
        }
        if self.active.is_none() {
            return;
        }
        if !self.state.register_queue_evts(ops, RX_TOKEN) {
            NetMetrics::inc(&self.metrics.queue_errors);
            return;
        }
        if self.backend_fd_registered.is_none() {
            if let Some(fd) = self.backend.fd() {
                match ops.add(backend_events(fd)) {
                    Ok(()) => self.backend_fd_registered = Some(fd),
                    Err(e) => {
                        error!("virtio-net: cannot register the backend fd: {e}");
                        NetMetrics::inc(&self.metrics.queue_errors);
                    }
                }
            }
        }
        // Frames may have been queued before the queue events were registered.
        self.process_tx();
        self.poll_backend();
    }

    fn handle_queue_event(&mut self, idx: usize) {
        let Some(evt) = self.state.queue_evts.get(idx) else {
            warn!(idx, "virtio-net: event for unknown queue");
            return;
        };
        if let Err(e) = evt.read() {
            // EAGAIN: a spurious wake-up, the queue is still worth checking.
            debug!("virtio-net: queue event read failed: {e}");
        }
        NetMetrics::inc(&self.metrics.queue_events);
        match idx {
            RX_QUEUE => {
                self.process_rx();
            }
            TX_QUEUE if self.process_tx() => self.poll_backend(),
            _ => {}
        }
    }

    fn handle_backend_event(&mut self) {
        NetMetrics::inc(&self.metrics.backend_events);
        // Poll even when inactive: the fd is level-triggered.
        self.backend.poll();
        self.process_rx();
    }
}

/// Pop rx chains until their capacity reaches `need` bytes. Valid chains go to `bufs`, the
/// heads of malformed ones to `bad`.
fn reserve(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    need: usize,
    mergeable: bool,
    bufs: &mut Vec<RxChain>,
    bad: &mut Vec<u16>,
) -> Reserve {
    bufs.clear();
    bad.clear();
    let mut room = 0usize;
    let mut popped = 0u16;
    loop {
        if room >= need {
            return Reserve::Ready;
        }
        // Without MRG_RXBUF a frame must fit one buffer (§5.1.6.3.1); and no more buffers can
        // appear while the whole ring is held here.
        if (!mergeable && !bufs.is_empty()) || popped >= queue.size() {
            return Reserve::TooSmall;
        }
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            return Reserve::Starved;
        };
        popped += 1;
        match RxChain::parse(&chain, mem) {
            Ok(buf) => {
                room = room.saturating_add(buf.capacity());
                bufs.push(buf);
            }
            Err(e) => {
                debug!(
                    head = chain.head_index(),
                    "virtio-net: malformed rx buffer: {e}"
                );
                bad.push(chain.head_index());
            }
        }
    }
}

fn backend_events(fd: RawFd) -> Events {
    Events::with_data_raw(fd, BACKEND_TOKEN, EventSet::IN)
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
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
        // struct virtio_net_config { u8 mac[6]; le16 status; le16 max_virtqueue_pairs;
        // le16 mtu; ... } (§5.1.4); the fields after mtu belong to features not offered.
        let mut config = [0u8; CONFIG_LEN];
        config[0..6].copy_from_slice(&self.mac);
        config[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        config[8..10].copy_from_slice(&1u16.to_le_bytes());
        config[10..12].copy_from_slice(&self.mtu.to_le_bytes());
        read_config(&config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // The MAC is read-only for a VERSION_1 driver (§5.1.4.2).
        warn!(offset, len = data.len(), "virtio-net: config write ignored");
    }

    fn activate(&mut self, ctx: ActivationContext) -> Result<(), ActivateError> {
        self.state.check_activation(self.active.is_some(), &ctx)?;
        self.state.signal_activation()?;
        self.active = Some(ctx);
        NetMetrics::inc(&self.metrics.activations);
        Ok(())
    }

    fn reset(&mut self) -> bool {
        // The event loop unregisters the backend fd (it owns the registrations).
        self.active = None;
        self.state.acked_features = 0;
        self.reset_pending = true;
        if let Err(e) = self.state.activate_evt.write(1) {
            error!("virtio-net: cannot wake the event loop for reset: {e}");
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
}

impl MutEventSubscriber for Net {
    fn init(&mut self, ops: &mut EventOps) {
        self.state.register_activate_evt(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            ACTIVATE_TOKEN => self.handle_activate_event(ops),
            RX_TOKEN => self.handle_queue_event(RX_QUEUE),
            TX_TOKEN => self.handle_queue_event(TX_QUEUE),
            BACKEND_TOKEN => self.handle_backend_event(),
            token => warn!(token, "virtio-net: event with unknown token"),
        }
    }
}
