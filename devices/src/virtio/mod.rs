//! Virtio devices and the virtio-mmio transport.
