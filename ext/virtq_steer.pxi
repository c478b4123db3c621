# Flow steering for multiqueue (included by virtq.pyx, after frame_batch.pxi).
#
# The guest picks a TX queue per flow (Linux: the CPU that sends, XPS); frames of
# that flow for the guest go back on the RX queue of the same pair, so that one
# guest CPU sees a flow both ways. The map is a table of queue-pair numbers indexed
# by a hash of the flow that is the same both ways (addresses and ports XORed), as
# Linux's RFS table: a collision or a stale slot only picks another queue, which
# is harmless (the guest takes any frame on any RX queue). Unknown flows: pair 0.

cdef enum:
    STEER_SLOTS = 4096   # a power of two


cdef inline uint32_t _le32(const uint8_t *p) noexcept nogil:
    return p[0] | (<uint32_t>p[1] << 8) | (<uint32_t>p[2] << 16) | (<uint32_t>p[3] << 24)


cdef inline int _flow_slot(const uint8_t *f, uint64_t n) noexcept nogil:
    """The steering slot of an IPv4 or IPv6 frame (same for both directions), or -1."""
    cdef uint32_t addresses = 0, ports = 0, proto
    cdef uint64_t l4 = 0
    cdef int i
    if n < 14:
        return -1
    if f[12] == 0x08 and f[13] == 0x00:
        if n < 34:
            return -1
        proto = f[23]
        addresses = _le32(f + 26) ^ _le32(f + 30)
        # Ports only in the first fragment (offset 0; the MF bit may be set).
        if (f[20] & 0x1F) == 0 and f[21] == 0:
            l4 = 14 + <uint64_t>(f[14] & 0x0F) * 4
    elif f[12] == 0x86 and f[13] == 0xDD:
        if n < 54:
            return -1
        proto = f[20]
        for i in range(8):
            addresses ^= _le32(f + 22 + 4 * i)
        l4 = 54
    else:
        return -1
    if (proto == 6 or proto == 17) and l4 and n >= l4 + 4:
        ports = _le32(f + l4)
        ports = (ports & 0xFFFF) ^ (ports >> 16)
    return _slot_of(addresses, ports, proto)


cdef inline int _slot_of(uint32_t addresses, uint32_t ports, uint32_t proto) noexcept nogil:
    """The slot of a flow: ``addresses`` the XOR of both addresses' little-endian 32-bit
    words, ``ports`` the XOR of both ports' 16-bit words as they lie on the wire."""
    cdef uint32_t h = addresses * <uint32_t>0x9E3779B1 ^ ports * <uint32_t>0x85EBCA6B ^ proto
    h ^= h >> 16
    h *= <uint32_t>0x7FEB352D
    h ^= h >> 15
    return <int>(h & (STEER_SLOTS - 1))


cdef class FlowSteering:
    """Which queue pair each flow of the guest uses: learned from TX batches, asked per RX frame."""

    cdef uint8_t pairs[STEER_SLOTS]

    def __cinit__(self):
        memset(self.pairs, 0, sizeof(self.pairs))

    def learn(self, FrameBatch batch, Py_ssize_t count, int pair) -> None:
        """The first ``count`` frames of ``batch`` came on TX queue of ``pair`` (0..255)."""
        cdef Py_ssize_t i
        cdef int slot
        cdef uint8_t value = <uint8_t>pair
        if not 0 <= pair <= 255:
            raise ValueError("queue pair outside 0..255")
        if count > batch.n:
            count = batch.n
        with nogil:
            for i in range(count):
                slot = _flow_slot(batch.data + batch.offsets[i], batch.lengths[i])
                if slot >= 0:
                    self.pairs[slot] = value

    def pair_of(self, frame) -> int:
        """The queue pair last seen for ``frame``'s flow (0 for non-IP and unseen flows)."""
        cdef const uint8_t[::1] view = memoryview(frame).cast("B")
        if view.shape[0] == 0:
            return 0
        cdef int slot = _flow_slot(&view[0], view.shape[0])
        return self.pairs[slot] if slot >= 0 else 0

    def pair_of_flow(self, bytes address_a, bytes address_b, int proto, int port_a,
                     int port_b) -> int:
        """``pair_of`` for a flow named by its fields instead of a frame (either direction:
        the host TCP data the fast path writes into the ring before any frame exists)."""
        cdef uint32_t addresses = 0
        cdef Py_ssize_t i, n = len(address_a)
        cdef const uint8_t *a = address_a
        cdef const uint8_t *b = address_b
        if n != len(address_b) or n not in (4, 16):
            return 0
        for i in range(0, n, 4):
            addresses ^= _le32(a + i) ^ _le32(b + i)
        # A port's bytes on the wire (big-endian) read as one little-endian 16-bit word.
        cdef uint32_t ports = (((port_a & 0xFF) << 8) | ((port_a >> 8) & 0xFF)) ^ (
            ((port_b & 0xFF) << 8) | ((port_b >> 8) & 0xFF))
        return self.pairs[_slot_of(addresses, ports, <uint32_t>proto)]

    def clear(self) -> None:
        memset(self.pairs, 0, sizeof(self.pairs))
