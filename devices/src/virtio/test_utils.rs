//! Test harness shared by the device tests: guest memory, split virtqueues laid out in it,
//! a minimal driver side (descriptors, available ring, used ring) and the event loop.

use event_manager::{EventManager, MutEventSubscriber};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// One contiguous region of `size` bytes at guest address 0.
pub(crate) fn guest_mem(size: usize) -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).unwrap()
}

/// Start of queue `q` in the multi-queue layout: descriptor table, then the available ring
/// 0x1000 later, then the used ring 0x1000 after that.
pub(crate) fn queue_base(q: usize) -> u64 {
    0x1_0000 * (q as u64 + 1)
}
/// Descriptor table of queue `q`.
pub(crate) fn desc_addr(q: usize) -> u64 {
    queue_base(q)
}
/// Available ring of queue `q`.
pub(crate) fn avail_addr(q: usize) -> u64 {
    queue_base(q) + 0x1000
}
/// Used ring of queue `q`.
pub(crate) fn used_addr(q: usize) -> u64 {
    queue_base(q) + 0x2000
}

/// A ready split queue of `size` entries with its rings at the given guest addresses.
pub(crate) fn split_queue(size: u16, desc: u64, avail: u64, used: u64, event_idx: bool) -> Queue {
    let mut queue = Queue::new(size).unwrap();
    queue.set_size(size);
    queue.set_ready(true);
    queue.set_event_idx(event_idx);
    let split = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
    let (lo, hi) = split(desc);
    queue.set_desc_table_address(lo, hi);
    let (lo, hi) = split(avail);
    queue.set_avail_ring_address(lo, hi);
    let (lo, hi) = split(used);
    queue.set_used_ring_address(lo, hi);
    queue
}

/// Write descriptor `idx` of the table at `table`.
pub(crate) fn write_desc(
    mem: &GuestMemoryMmap,
    table: u64,
    idx: u16,
    (addr, len, flags): (u64, u32, u16),
    next: u16,
) {
    let mut d = [0u8; 16];
    d[0..8].copy_from_slice(&addr.to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[12..14].copy_from_slice(&flags.to_le_bytes());
    d[14..16].copy_from_slice(&next.to_le_bytes());
    mem.write_slice(&d, GuestAddress(table + 16 * u64::from(idx)))
        .unwrap();
}

/// Make chain `head` available in the ring at `avail` (`size` entries), advancing `avail_idx`.
pub(crate) fn publish(
    mem: &GuestMemoryMmap,
    avail: u64,
    size: u16,
    avail_idx: &mut u16,
    head: u16,
) {
    let slot = u64::from(*avail_idx % size);
    mem.write_obj(head, GuestAddress(avail + 4 + 2 * slot))
        .unwrap();
    *avail_idx = avail_idx.wrapping_add(1);
    mem.write_obj(*avail_idx, GuestAddress(avail + 2)).unwrap();
}

/// New entries of the used ring at `used` (`size` entries) as (id, len), advancing
/// `used_seen`.
pub(crate) fn take_used(
    mem: &GuestMemoryMmap,
    used: u64,
    size: u16,
    used_seen: &mut u16,
) -> Vec<(u32, u32)> {
    let idx: u16 = mem.read_obj(GuestAddress(used + 2)).unwrap();
    let mut out = Vec::new();
    while *used_seen != idx {
        let at = used + 4 + 8 * u64::from(*used_seen % size);
        let id: u32 = mem.read_obj(GuestAddress(at)).unwrap();
        let len: u32 = mem.read_obj(GuestAddress(at + 4)).unwrap();
        out.push((id, len));
        *used_seen = used_seen.wrapping_add(1);
    }
    out
}

/// Run the event loop until nothing is ready.
pub(crate) fn run_idle<S: MutEventSubscriber>(em: &mut EventManager<S>) {
    for _ in 0..10_000 {
        if em.run_with_timeout(0).unwrap() == 0 {
            return;
        }
    }
    panic!("event loop never went idle");
}
