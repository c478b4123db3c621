"""Numbers of the vhost-user protocol: request ids, feature bits, header flags.

Values follow QEMU's docs/interop/vhost-user.rst (QEMU 10.0) and the virtio 1.x
specification. Nothing here does any work; every other module imports these.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag

# Header flags. The version lives in bits 0-1 and is always 1.
VERSION = 0x1
VERSION_MASK = 0x3
REPLY = 0x4
NEED_REPLY = 0x8
# QEMU refuses replies whose flags are anything but exactly this.
REPLY_FLAGS = VERSION | REPLY

HEADER_SIZE = 12
# At most this many fds travel with one message (VHOST_MEMORY_BASELINE_NREGIONS).
VHOST_USER_MAX_FDS = 8
# Largest union member of QEMU's VhostUserPayload: the config space message
# (12 + 256). A bigger header size can only be garbage or an attack.
CONFIG_SPACE_MAX = 256
PAYLOAD_MAX_SIZE = 12 + CONFIG_SPACE_MAX

# SET_VRING_KICK/CALL/ERR payload: low byte is the ring index, bit 8 means "no fd".
VRING_INDEX_MASK = 0xFF
VRING_NOFD_MASK = 0x100

# SET_VRING_ADDR flags: bit 0 asks for dirty logging of used-ring writes.
VRING_F_LOG = 0x1

# SET_DEVICE_STATE_FD reply: bit 8 says the back-end returns no fd of its own.
DEVICE_STATE_NOFD = 0x100


class Request(IntEnum):
    """Front-end to back-end request ids."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43


class BackendRequest(IntEnum):
    """Back-end to front-end request ids (sent on the SET_BACKEND_REQ_FD socket)."""

    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3
    VRING_CALL = 4
    VRING_ERR = 5
    SHARED_OBJECT_ADD = 6
    SHARED_OBJECT_REMOVE = 7
    SHARED_OBJECT_LOOKUP = 8


class ProtocolFeature(IntFlag):
    """Protocol feature bits (GET/SET_PROTOCOL_FEATURES)."""

    MQ = 1 << 0
    LOG_SHMFD = 1 << 1
    RARP = 1 << 2
    REPLY_ACK = 1 << 3
    NET_MTU = 1 << 4
    BACKEND_REQ = 1 << 5
    CROSS_ENDIAN = 1 << 6
    CRYPTO_SESSION = 1 << 7
    PAGEFAULT = 1 << 8
    CONFIG = 1 << 9
    BACKEND_SEND_FD = 1 << 10
    HOST_NOTIFIER = 1 << 11
    INFLIGHT_SHMFD = 1 << 12
    RESET_DEVICE = 1 << 13
    # In QEMU's mask but not implemented by QEMU: never offer.
    INBAND_NOTIFICATIONS = 1 << 14
    CONFIGURE_MEM_SLOTS = 1 << 15
    STATUS = 1 << 16
    # Xen only, in QEMU 10.0's mask: never offer.
    XEN_MMAP = 1 << 17
    SHARED_OBJECT = 1 << 18
    DEVICE_STATE = 1 << 19


# Protocol bits QEMU lists in its mask but cannot handle; offering them breaks it.
NEVER_OFFERED_PROTOCOL_FEATURES = ProtocolFeature.INBAND_NOTIFICATIONS | ProtocolFeature.XEN_MMAP


class VirtioFeature:
    """virtio and virtio-net feature bits (the GET/SET_FEATURES u64)."""

    NET_F_CSUM = 1 << 0
    NET_F_GUEST_CSUM = 1 << 1
    NET_F_MTU = 1 << 3
    NET_F_MAC = 1 << 5
    NET_F_GSO = 1 << 6
    NET_F_GUEST_TSO4 = 1 << 7
    NET_F_GUEST_TSO6 = 1 << 8
    NET_F_GUEST_ECN = 1 << 9
    NET_F_GUEST_UFO = 1 << 10
    NET_F_HOST_TSO4 = 1 << 11
    NET_F_HOST_TSO6 = 1 << 12
    NET_F_HOST_ECN = 1 << 13
    NET_F_HOST_UFO = 1 << 14
    NET_F_MRG_RXBUF = 1 << 15
    NET_F_STATUS = 1 << 16
    NET_F_CTRL_VQ = 1 << 17
    NET_F_GUEST_ANNOUNCE = 1 << 21
    NET_F_MQ = 1 << 22
    F_NOTIFY_ON_EMPTY = 1 << 24
    F_LOG_ALL = 1 << 26
    F_ANY_LAYOUT = 1 << 27
    RING_F_INDIRECT_DESC = 1 << 28
    RING_F_EVENT_IDX = 1 << 29
    F_PROTOCOL_FEATURES = 1 << 30
    VERSION_1 = 1 << 32
    F_IOMMU_PLATFORM = 1 << 33
    F_RING_PACKED = 1 << 34
    F_IN_ORDER = 1 << 35


# Short aliases matching the names in docs/ARCHITECTURE.md.
VERSION_1 = VirtioFeature.VERSION_1
NET_F_MRG_RXBUF = VirtioFeature.NET_F_MRG_RXBUF
RING_F_EVENT_IDX = VirtioFeature.RING_F_EVENT_IDX
RING_F_INDIRECT_DESC = VirtioFeature.RING_F_INDIRECT_DESC
F_PROTOCOL_FEATURES = VirtioFeature.F_PROTOCOL_FEATURES
F_LOG_ALL = VirtioFeature.F_LOG_ALL

# virtio device status bits (SET_STATUS / GET_STATUS).
STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8

# SET_DEVICE_STATE_FD parameters.
DEVICE_STATE_SAVE = 0
DEVICE_STATE_LOAD = 1
DEVICE_STATE_PHASE_STOPPED = 0

# The virtio-net header with VERSION_1 or MRG_RXBUF (num_buffers included).
VIRTIO_NET_HDR_SIZE = 12
