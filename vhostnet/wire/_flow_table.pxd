# cython: language_level=3
# The fast paths' flow table: the declaration of ``vhostnet.wire._flow_table`` (ext/flow_table.pyx),
# for the kernels that cimport it (ext/tcp_fast.pyx, ext/udp_fast.pyx).
#
# A table maps a guest packet's 4-tuple to a slot index with open addressing.
# ``FlowIndex`` owns the keys, the flow_id -> slot map used by the Python side,
# and the list of slots that had activity since the last report; each fast path
# keeps its own per-flow state in an array with the same indices. Registration
# (add, discard, ...) is compiled once, in that module; the per-packet lookups are
# inline here, so each kernel's packet loop calls no function of another module.

cimport cython
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy

cdef enum:
    # A power of two, at most half used (the flow limit is 65536), so linear
    # probing stays short.
    TABLE_SLOTS = 131072
    # Slots remembered as active between two reports; beyond that, a report
    # scans every registered flow instead.
    MAX_TOUCHED = 4096


cdef struct FlowKey:
    uint32_t guest_ip        # network byte order, as in the frame
    uint32_t remote_ip
    uint16_t guest_port      # network byte order
    uint16_t remote_port
    int64_t flow_id          # 0: empty; -1: removed (tombstone, lookups probe past it)


cdef inline uint32_t slot_hash(uint32_t gip, uint16_t gport, uint32_t rip,
                               uint16_t rport) noexcept nogil:
    """Flow-table slot of a 4-tuple (addresses and ports as read from the packet)."""
    cdef uint64_t h = (<uint64_t>gip * 0x9E3779B1ULL) ^ (<uint64_t>rip * 0x85EBCA77ULL)
    h ^= (<uint64_t>gport << 16 | rport) * 0xC2B2AE3DULL
    h ^= h >> 29
    return <uint32_t>h & (TABLE_SLOTS - 1)


@cython.final
cdef class FlowIndex:
    """Registered flows by 4-tuple and by flow id, and which of them were active."""

    cdef FlowKey *keys
    cdef readonly int count
    cdef dict slot_of_flow
    cdef int touched[MAX_TOUCHED]
    cdef int ntouched
    cdef bint touched_overflow

    cdef int slot_of(self, int64_t flow_id)
    cdef int add(self, int64_t flow_id, bytes guest_ip, int guest_port, bytes remote_ip,
                 int remote_port) except -2
    cdef int discard(self, int64_t flow_id)
    cdef list take_touched(self)

    cdef inline int find(self, const uint8_t *ip, const uint8_t *l4) noexcept nogil:
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
            if self.keys[index].flow_id == 0:
                return -1
            if (self.keys[index].flow_id > 0 and self.keys[index].guest_ip == gip
                    and self.keys[index].remote_ip == rip and self.keys[index].guest_port == gport
                    and self.keys[index].remote_port == rport):
                return <int>index
            index = (index + 1) & (TABLE_SLOTS - 1)
        return -1

    cdef inline int64_t flow_id(self, int slot) noexcept nogil:
        """The flow registered in ``slot``; <= 0 if none is."""
        return self.keys[slot].flow_id

    cdef inline void touch(self, int slot) noexcept nogil:
        """Note that ``slot`` had activity; call once per report period (when its counts were 0)."""
        if self.ntouched < MAX_TOUCHED:
            self.touched[self.ntouched] = slot
            self.ntouched += 1
        else:
            self.touched_overflow = True
