# The peers of forwarded ports' sockets (included by udp_fast.pyx): inbound flows whose
# datagrams arrive on an unconnected socket, keyed by (socket, peer address, peer port), in an
# open-addressed table of PEER_SLOTS entries (removed ones left as tombstones until it empties).

cdef struct PeerName:          # what recvmmsg writes to msg_name: a sockaddr_in or _in6
    uint16_t family
    uint8_t data[26]         # port, then (flowinfo and) the address


cdef struct PeerEntry:         # a registered peer of a forward's socket: an inbound flow
    int64_t flow_id          # 0: empty; -1: removed (tombstone)
    int fd
    uint8_t address_len      # 4 or 16, as the socket's family gives it
    uint8_t address[16]
    uint8_t port[2]          # network byte order
    FlowSlot to_guest        # the frame's headers (fd, datagrams, bytes unused)


cdef inline uint32_t _peer_hash(const PeerEntry *key) noexcept nogil:
    """FNV-1a over the socket, the port and the address."""
    cdef uint32_t h = 2166136261u ^ <uint32_t>key.fd
    cdef int i
    h = (h ^ key.port[0]) * 16777619u
    h = (h ^ key.port[1]) * 16777619u
    for i in range(key.address_len):
        h = (h ^ key.address[i]) * 16777619u
    return h & (PEER_SLOTS - 1)


cdef void _peer_key(PeerEntry *probe, int fd, bytes address, int port):
    """A lookup key for the peer ``address``:``port`` (4 or 16 bytes, checked by the caller)
    of the forward's socket ``fd``: everything else zero."""
    memset(probe, 0, sizeof(PeerEntry))
    probe.fd = fd
    probe.address_len = len(address)
    memcpy(probe.address, <const char *>address, probe.address_len)
    put16(probe.port, port)


cdef tuple _peer_of(const PeerName *name):
    """(family, address bytes, port) of a datagram's sender, as recvmmsg gave it."""
    cdef int port = (<int>name.data[0] << 8) | name.data[1]
    if name.family == AF_INET_C:
        return name.family, bytes(name.data[2:6]), port
    if name.family == AF_INET6_C:
        return name.family, bytes(name.data[6:22]), port
    return name.family, b"", port


cdef int peer_find(const PeerEntry *peers, const PeerEntry *probe) noexcept nogil:
    """The slot of the registered peer ``probe`` (a ``_peer_key``) names, or -1 (or no table)."""
    if peers == NULL:
        return -1
    cdef uint32_t at = _peer_hash(probe)
    cdef int n
    cdef const PeerEntry *entry
    for n in range(PEER_SLOTS):
        entry = &peers[at]
        if entry.flow_id == 0:
            return -1
        if entry.flow_id > 0 and entry.fd == probe.fd \
                and entry.address_len == probe.address_len \
                and memcmp(entry.port, probe.port, 2) == 0 \
                and memcmp(entry.address, probe.address, probe.address_len) == 0:
            return at
        at = (at + 1) & (PEER_SLOTS - 1)
    return -1


cdef int peer_free_slot(const PeerEntry *peers, const PeerEntry *probe) noexcept nogil:
    """Where ``probe`` goes: the first empty or removed slot from its hash; -1 if full."""
    cdef uint32_t at = _peer_hash(probe)
    cdef int n
    for n in range(PEER_SLOTS):
        if peers[at].flow_id <= 0:
            return at
        at = (at + 1) & (PEER_SLOTS - 1)
    return -1


cdef PeerEntry *peer_of_sender(PeerEntry *peers, int peer_count, int fd,
                               const PeerName *name) noexcept nogil:
    """The registered peer of the forward's socket ``fd`` a datagram came from, or NULL."""
    if peers == NULL or peer_count == 0:
        return NULL
    cdef PeerEntry probe
    memset(&probe, 0, sizeof(PeerEntry))
    if name.family == AF_INET_C:
        probe.address_len = 4
        memcpy(probe.address, name.data + 2, 4)
    elif name.family == AF_INET6_C:
        probe.address_len = 16
        memcpy(probe.address, name.data + 6, 16)
    else:
        return NULL
    memcpy(probe.port, name.data, 2)
    probe.fd = fd  # keyed by socket too: two forwards may hear the same peer
    cdef int at = peer_find(peers, &probe)
    return &peers[at] if at >= 0 else NULL
