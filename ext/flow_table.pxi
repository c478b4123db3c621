# The fast paths' flow tables (included textually by tcp_fast.pyx and udp_fast.pyx,
# after net_inline.pxi).
#
# A table maps a guest packet's 4-tuple to a slot index with open addressing.
# ``FlowIndex`` owns the keys, the flow_id -> slot map used by the Python side,
# and the list of slots that had activity since the last report; each fast path
# keeps its own per-flow state in an array with the same indices.

cimport cython
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free
from libc.string cimport memcpy

cdef extern from "<arpa/inet.h>" nogil:
    uint16_t htons(uint16_t value)

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


cdef inline uint32_t slot_hash(uint32_t gip, uint16_t gport, uint32_t rip, uint16_t rport) noexcept nogil:
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

    def __cinit__(self):
        self.keys = <FlowKey *>calloc(TABLE_SLOTS, sizeof(FlowKey))
        if self.keys == NULL:
            raise MemoryError()
        self.slot_of_flow = {}

    def __dealloc__(self):
        free(self.keys)

    cdef int slot_of(self, int64_t flow_id):
        """The slot of a registered flow, or -1."""
        found = self.slot_of_flow.get(flow_id)
        return -1 if found is None else <int>found

    cdef int add(self, int64_t flow_id, bytes guest_ip, int guest_port, bytes remote_ip,
                 int remote_port) except -2:
        """Claim a slot for a new flow (addresses 4 bytes, ports host order); -1 if the table is full."""
        cdef uint32_t gip, rip, index
        cdef int probes
        if (flow_id <= 0 or flow_id in self.slot_of_flow or len(guest_ip) != 4
                or len(remote_ip) != 4 or not 0 <= guest_port <= 0xFFFF
                or not 0 <= remote_port <= 0xFFFF):
            raise ValueError("bad fast-path flow")
        if self.count >= TABLE_SLOTS // 2:
            return -1
        memcpy(&gip, <const char *>guest_ip, 4)
        memcpy(&rip, <const char *>remote_ip, 4)
        index = slot_hash(gip, htons(<uint16_t>guest_port), rip, htons(<uint16_t>remote_port))
        # The table is at most half full: a free (empty or removed) slot is on the path.
        for probes in range(TABLE_SLOTS):
            if self.keys[index].flow_id <= 0:
                break
            index = (index + 1) & (TABLE_SLOTS - 1)
        self.keys[index].guest_ip = gip
        self.keys[index].remote_ip = rip
        self.keys[index].guest_port = htons(<uint16_t>guest_port)
        self.keys[index].remote_port = htons(<uint16_t>remote_port)
        self.keys[index].flow_id = flow_id
        self.slot_of_flow[flow_id] = index
        self.count += 1
        return <int>index

    cdef int discard(self, int64_t flow_id):
        """Forget a flow; the slot it had (its state is now the caller's to clear), or -1."""
        found = self.slot_of_flow.pop(flow_id, None)
        if found is None:
            return -1
        cdef int index = <int>found
        self.keys[index].guest_ip = self.keys[index].remote_ip = 0
        self.keys[index].guest_port = self.keys[index].remote_port = 0
        self.keys[index].flow_id = -1
        self.count -= 1
        return index

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

    cdef list take_touched(self):
        """Slots noted by ``touch`` since the last call (every registered slot after an overflow)."""
        cdef int i
        if self.touched_overflow:
            slots = list(self.slot_of_flow.values())
        else:
            slots = [self.touched[i] for i in range(self.ntouched)]
        self.ntouched = 0
        self.touched_overflow = False
        return slots
