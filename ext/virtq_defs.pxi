# Constants, refusal reasons and the C structs of the ring kernel (included by virtq.pyx).

cdef enum:
    DESC_F_NEXT = 1
    DESC_F_WRITE = 2
    DESC_F_INDIRECT = 4
    AVAIL_F_NO_INTERRUPT = 1
    USED_F_NO_NOTIFY = 1
    DESC_SIZE = 16
    # vhost-net's bound (UIO_MAXIOV); Linux guests use at most MAX_SKB_FRAGS + 2 entries.
    MAX_INDIRECT_ENTRIES = 1024
    MAX_QUEUE_SIZE = 32768
    # 64 KiB IP packet + Ethernet header + VLAN tag + slack, the largest frame either side may carry.
    MAX_FRAME_BYTES_C = 65562
    # A long TX drain hands chains back (used->idx, and an interrupt if the guest asks)
    # every this many, so the guest refills the ring while we go on (vhost-net: 64).
    TX_USED_PUBLISH_EVERY = 64
    ETH_HEADER_BYTES = 14
    LOG_PAGE_SHIFT = 12
    CHAIN_OK = -1

# Reasons a chain or frame was refused. Order matches REASON_NAMES.
cdef enum:
    R_HEAD_OUT_OF_RANGE = 0
    R_NEXT_OUT_OF_RANGE
    R_CHAIN_LOOP
    R_ADDRESS_UNMAPPED
    R_ADDRESS_OVERFLOW
    R_INDIRECT_NESTED
    R_INDIRECT_BAD_LENGTH
    R_INDIRECT_WITH_NEXT
    R_WRONG_DIRECTION
    R_TX_FRAME_TOO_SHORT
    R_TX_FRAME_TOO_LONG
    R_RX_BUFFER_TOO_SMALL
    R_RX_TOO_FRAGMENTED
    R_AVAIL_IDX_JUMP
    R_NOTIFY_FAILED
    R_TX_OFFLOAD_NOT_NEGOTIATED
    R_TX_BAD_CSUM_OFFSET
    R_TX_BAD_GSO
    R_RX_OFFLOAD_NOT_NEGOTIATED
    R_GUEST_MEMORY_FAULT
    R_PACKED_CHAIN_NOT_AVAILABLE
    N_REASONS

REASON_NAMES = (
    "head_out_of_range",
    "next_out_of_range",
    "chain_loop_or_too_long",
    "address_unmapped",
    "address_overflow",
    "indirect_nested",
    "indirect_bad_length",
    "indirect_with_next",
    "wrong_direction",
    "tx_frame_too_short",
    "tx_frame_too_long",
    "rx_buffer_too_small",
    "rx_too_fragmented",
    "avail_idx_jump",
    "notify_failed",
    "tx_offload_not_negotiated",
    "tx_bad_csum_offset",
    "tx_bad_gso",
    "rx_offload_not_negotiated",
    "guest_memory_fault",
    "packed_chain_not_available",
)

cdef enum:
    S_TX_FRAMES = 0
    S_TX_BYTES
    S_RX_FRAMES
    S_RX_BYTES
    S_RX_BUFFERS
    S_NOTIFICATIONS
    S_TX_GSO_FRAMES
    S_RX_GSO_FRAMES
    N_STATS

STAT_NAMES = ("tx_frames", "tx_bytes", "rx_frames", "rx_bytes", "rx_buffers", "notifications",
              "tx_gso_frames", "rx_gso_frames")

MAX_FRAME_BYTES = MAX_FRAME_BYTES_C

# rx_one() results
cdef enum:
    RX_DELIVERED = 0
    RX_DROPPED
    RX_NO_BUFFERS
    RX_RETRY      # some chains were handed back; try the same frame again


cdef struct Region:
    uint64_t gpa
    uint64_t uva
    uint64_t size
    uint8_t *host

cdef struct Segment:
    uint64_t gpa
    uint32_t length

cdef struct Desc:
    uint64_t addr
    uint32_t length
    uint16_t flags
    uint16_t next
