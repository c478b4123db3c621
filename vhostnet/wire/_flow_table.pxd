# cython: language_level=3
# The fast paths' flow table: the declaration of ``vhostnet.wire._flow_table`` (ext/flow_table.pyx),
# for the kernels that cimport it (ext/tcp_fast.pyx, ext/udp_fast.pyx).
#
# A table maps a guest packet's 4-tuple to a slot index with open addressing, for
# both families: an IPv4 key holds its addresses; an IPv6 key holds a 32-bit fold of
# each address (for the hash and a first compare) and its full addresses live in a
# side array, allocated with the first IPv6 flow, so IPv4 keys stay 24 bytes and an
# IPv4 lookup costs one compare more (the family). ``find`` takes an IPv4 header,
# ``find6`` an IPv6 one (no extension headers: the L4 header follows the fixed one).
# ``FlowIndex`` owns the keys, the flow_id -> slot map used by the Python side,
# and the list of slots that had activity since the last report; each fast path
# keeps its own per-flow state in an array with the same indices. Registration
# (add, discard, ...) is compiled once, in that module; the per-packet lookups are
# inline here, so each kernel's packet loop calls no function of another module.

cimport cython
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy

cdef enum:
    # A power of two, at most half used (the flow limit is 65536), so linear
    # probing stays short.
    TABLE_SLOTS = 131072
    # Slots remembered as active between two reports; beyond that, a report
    # scans every registered flow instead.
    MAX_TOUCHED = 4096


cdef struct FlowKey:
    uint32_t guest_ip        # network byte order, as in the frame (IPv6: ``fold6``)
    uint32_t remote_ip
    uint16_t guest_port      # network byte order
    uint16_t remote_port
    uint32_t family          # 4 or 6 (in what would be padding before flow_id)
    int64_t flow_id          # 0: empty; -1: removed (tombstone, lookups probe past it)


cdef struct FlowAddrs6:      # an IPv6 key's addresses, in the order of the IPv6 header
    uint8_t guest_ip[16]
    uint8_t remote_ip[16]


cdef inline uint32_t fold6(const uint8_t *address) noexcept nogil:
    """An IPv6 address folded to 32 bits (the XOR of its words, byte order kept)."""
    cdef uint32_t words[4]
    memcpy(words, address, 16)
    return words[0] ^ words[1] ^ words[2] ^ words[3]


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
    cdef FlowAddrs6 *addrs6  # NULL until the first IPv6 flow
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
        cdef uint32_t gip, rip
        memcpy(&gip, ip + 12, 4)
        memcpy(&rip, ip + 16, 4)
        return self._probe(gip, rip, l4, 4, NULL)

    cdef inline int find6(self, const uint8_t *ip6, const uint8_t *l4) noexcept nogil:
        """``find`` for an IPv6 packet: ``ip6`` its fixed header, ``l4`` the TCP/UDP header."""
        if self.addrs6 == NULL:
            return -1
        return self._probe(fold6(ip6 + 8), fold6(ip6 + 24), l4, 6, ip6 + 8)

    cdef inline int _probe(self, uint32_t gip, uint32_t rip, const uint8_t *l4, uint32_t family,
                           const uint8_t *addrs6) noexcept nogil:
        """The probe behind ``find``/``find6``; ``addrs6``: the 32 bytes of the IPv6
        source and destination, compared in full once the folded key matches."""
        cdef uint32_t index
        cdef uint16_t gport, rport
        cdef int probes
        memcpy(&gport, l4, 2)
        memcpy(&rport, l4 + 2, 2)
        index = slot_hash(gip, gport, rip, rport)
        for probes in range(TABLE_SLOTS):
            if self.keys[index].flow_id == 0:
                return -1
            if (self.keys[index].flow_id > 0 and self.keys[index].guest_ip == gip
                    and self.keys[index].remote_ip == rip and self.keys[index].guest_port == gport
                    and self.keys[index].remote_port == rport
                    and self.keys[index].family == family
                    and (addrs6 == NULL or memcmp(&self.addrs6[index], addrs6, 32) == 0)):
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
