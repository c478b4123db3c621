# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The fast paths' flow table, compiled once as ``vhostnet.wire._flow_table``.

The declarations (key layout, hash, the inline per-packet lookups) are in
vhostnet/wire/_flow_table.pxd, which the fast-path kernels cimport; this module
holds the registration side, called per flow, not per packet.
"""

from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t
from libc.stdlib cimport calloc, free
from libc.string cimport memcpy, memset

cdef extern from "<arpa/inet.h>" nogil:
    uint16_t htons(uint16_t value)


cdef class FlowIndex:

    def __cinit__(self):
        self.keys = <FlowKey *>calloc(TABLE_SLOTS, sizeof(FlowKey))
        if self.keys == NULL:
            raise MemoryError()
        self.slot_of_flow = {}

    def __dealloc__(self):
        free(self.keys)
        free(self.addrs6)

    cdef int slot_of(self, int64_t flow_id):
        """The slot of a registered flow, or -1."""
        found = self.slot_of_flow.get(flow_id)
        return -1 if found is None else <int>found

    cdef int add(self, int64_t flow_id, bytes guest_ip, int guest_port, bytes remote_ip,
                 int remote_port) except -2:
        """Claim a slot for a new flow (addresses both 4 bytes, IPv4, or both 16, IPv6; ports
        host order); -1 if the table is full."""
        cdef uint32_t gip, rip, index
        cdef int probes
        cdef Py_ssize_t width = len(guest_ip)
        if (flow_id <= 0 or flow_id in self.slot_of_flow or width not in (4, 16)
                or len(remote_ip) != width or not 0 <= guest_port <= 0xFFFF
                or not 0 <= remote_port <= 0xFFFF):
            raise ValueError("bad fast-path flow")
        if self.count >= TABLE_SLOTS // 2:
            return -1
        if width == 16:
            if self.addrs6 == NULL:
                self.addrs6 = <FlowAddrs6 *>calloc(TABLE_SLOTS, sizeof(FlowAddrs6))
                if self.addrs6 == NULL:
                    raise MemoryError()
            gip = fold6(<const uint8_t *><const char *>guest_ip)
            rip = fold6(<const uint8_t *><const char *>remote_ip)
        else:
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
        self.keys[index].family = 6 if width == 16 else 4
        if width == 16:
            memcpy(self.addrs6[index].guest_ip, <const char *>guest_ip, 16)
            memcpy(self.addrs6[index].remote_ip, <const char *>remote_ip, 16)
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
        self.keys[index].family = 0
        if self.addrs6 != NULL:
            memset(&self.addrs6[index], 0, sizeof(FlowAddrs6))
        self.keys[index].flow_id = -1
        self.count -= 1
        return index

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
