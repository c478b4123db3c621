"""Guest memory and virtqueues, split and packed (the Cython data path lives in ext/virtq.pyx)."""

from vhostnet.virtqueue._virtq import FlowSteering, FrameBatch
from vhostnet.virtqueue.memory import AddressError, GuestMemory, MappedRegion
from vhostnet.virtqueue.switch import Switch
from vhostnet.virtqueue.virtqueue import (
    MAX_FRAME_BYTES,
    PACKED_FRESH_BASE,
    VIRTIO_F_RING_PACKED,
    WATCH_MOVED,
    WATCH_RESIGNALLED,
    WATCH_TX_WAITING,
    Virtqueue,
)

__all__ = [
    "AddressError",
    "FlowSteering",
    "FrameBatch",
    "GuestMemory",
    "MappedRegion",
    "MAX_FRAME_BYTES",
    "PACKED_FRESH_BASE",
    "Switch",
    "VIRTIO_F_RING_PACKED",
    "Virtqueue",
    "WATCH_MOVED",
    "WATCH_RESIGNALLED",
    "WATCH_TX_WAITING",
]
