# Small byte-order, checksum and flow-table helpers shared by the Cython kernels
# that read and write packets (included textually: `include "net_inline.pxi"`).
# Everything here is inline and GIL-free.

from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy

cdef extern from "<endian.h>" nogil:
    unsigned int be32toh(unsigned int)

cdef enum:
    # Slots of the fast paths' flow tables: a power of two, at most half used
    # (the flow limit is 65536), so linear probing stays short.
    TABLE_SLOTS = 131072


cdef inline uint16_t be16(const uint8_t *p) noexcept nogil:
    return (<uint16_t>p[0] << 8) | p[1]


cdef inline uint32_t be32(const uint8_t *p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]


cdef inline void put16(uint8_t *p, uint64_t v) noexcept nogil:
    p[0] = (v >> 8) & 0xFF
    p[1] = v & 0xFF


cdef inline void put32(uint8_t *p, uint64_t v) noexcept nogil:
    p[0] = (v >> 24) & 0xFF
    p[1] = (v >> 16) & 0xFF
    p[2] = (v >> 8) & 0xFF
    p[3] = v & 0xFF


cdef inline uint64_t sum_bytes(const uint8_t *data, Py_ssize_t length) noexcept nogil:
    """Unfolded one's complement sum of ``data`` as big-endian 16-bit words (odd byte padded).

    Summing 32-bit words into 64 bits is the same sum once folded (2**16 = 1 in
    one's complement) and loses no carry below 2**32 words, far beyond any frame.
    """
    cdef uint64_t total = 0
    cdef Py_ssize_t i = 0
    cdef unsigned int word
    while i + 4 <= length:
        memcpy(&word, data + i, 4)
        total += be32toh(word)
        i += 4
    if i + 2 <= length:
        total += (<uint64_t>data[i] << 8) | data[i + 1]
        i += 2
    if i < length:
        total += <uint64_t>data[i] << 8
    return total


cdef inline uint16_t fold(uint64_t total) noexcept nogil:
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return <uint16_t>total


cdef inline uint32_t slot_hash(uint32_t gip, uint16_t gport, uint32_t rip, uint16_t rport) noexcept nogil:
    """Flow-table slot of a 4-tuple (addresses and ports as read from the packet)."""
    cdef uint64_t h = (<uint64_t>gip * 0x9E3779B1ULL) ^ (<uint64_t>rip * 0x85EBCA77ULL)
    h ^= (<uint64_t>gport << 16 | rport) * 0xC2B2AE3DULL
    h ^= h >> 29
    return <uint32_t>h & (TABLE_SLOTS - 1)


# --- The fast paths' flow tables: 4-tuple keys, open addressing -------------
# Each fast path keeps an array of TABLE_SLOTS keys beside an array of its own
# per-flow state with the same indices; these helpers own the keys.

cdef struct FlowKey:
    uint32_t guest_ip        # network byte order, as in the frame
    uint32_t remote_ip
    uint16_t guest_port      # network byte order
    uint16_t remote_port
    int64_t flow_id          # 0: empty; -1: removed (tombstone, lookups probe past it)


cdef inline uint32_t flow_key_insert(FlowKey *keys, int64_t flow_id, uint32_t gip, uint16_t gport,
                                     uint32_t rip, uint16_t rport) noexcept nogil:
    """Claim the first empty or removed slot on the 4-tuple's probe path; its index.

    The caller keeps the table at most half full, so a free slot always exists.
    """
    cdef uint32_t index = slot_hash(gip, gport, rip, rport)
    cdef int probes
    for probes in range(TABLE_SLOTS):
        if keys[index].flow_id <= 0:
            break
        index = (index + 1) & (TABLE_SLOTS - 1)
    keys[index].guest_ip = gip
    keys[index].remote_ip = rip
    keys[index].guest_port = gport
    keys[index].remote_port = rport
    keys[index].flow_id = flow_id
    return index


cdef inline int flow_key_find(const FlowKey *keys, const uint8_t *ip, const uint8_t *l4) noexcept nogil:
    """Slot of the flow a guest packet belongs to (IPv4 header ``ip``, TCP/UDP header ``l4``), or -1."""
    cdef uint32_t gip, rip, index
    cdef uint16_t gport, rport
    cdef int probes
    memcpy(&gip, ip + 12, 4)
    memcpy(&rip, ip + 16, 4)
    memcpy(&gport, l4, 2)
    memcpy(&rport, l4 + 2, 2)
    index = slot_hash(gip, gport, rip, rport)
    for probes in range(TABLE_SLOTS):
        if keys[index].flow_id == 0:
            return -1
        if (keys[index].flow_id > 0 and keys[index].guest_ip == gip
                and keys[index].remote_ip == rip and keys[index].guest_port == gport
                and keys[index].remote_port == rport):
            return <int>index
        index = (index + 1) & (TABLE_SLOTS - 1)
    return -1


cdef inline void flow_key_remove(FlowKey *keys, uint32_t index) noexcept nogil:
    keys[index].guest_ip = keys[index].remote_ip = 0
    keys[index].guest_port = keys[index].remote_port = 0
    keys[index].flow_id = -1
