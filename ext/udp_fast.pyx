# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""UDP of established outbound flows both ways, in C with the GIL released.

Guest -> host:

``UdpNat`` (Python) stays the authority: it creates every flow from the flow's
first datagram, the glue opens the connected host socket and then registers
the flow here (``add``), and expiry removes it (``remove``). For a TX batch,
``send_batch`` picks out the frames that are plain IPv4 or IPv6 UDP datagrams of a
registered flow (no IPv4 options or fragments, no IPv6 extension headers; headers and
checksums verified, or the UDP checksum left partial by the guest's driver; IPv6's
forbidden zero checksum left to Python to drop), and sends their payloads with sendmmsg(2)
straight from the batch buffer: no Python object, no copy, no allocation per
datagram. Everything else (a new flow, options, fragments, a bad checksum,
other protocols) is left to the Python stack, which counts and drops what is
bad. What Python must learn afterwards comes back per flow, not per frame:
which flows were active and which send errors happened.

Host -> guest: ``receive`` takes the datagrams waiting on a registered flow's socket with
recvmmsg(2) and builds each one's whole frame for the guest (Ethernet, IPv4 or IPv6 and UDP
headers, checksums computed here) into a FrameBatch's arrays, ready for the RX ring or the
stream's send buffer in one call. A datagram larger than the guest's MTU allows in one frame
is handed back as bytes (the Python stack fragments it). ``receive_from`` does the same for
a forwarded port's (unconnected) socket: datagrams of the peers Python registered
(``add_peer``, once an inbound flow exists) become frames, the others go back to Python
with their sender's address.

The Python face is ``vhostnet.hostio.udp_fast``; use that.
"""

from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcmp, memcpy, memset
from libc.errno cimport EAGAIN, EINTR, EINVAL, EIO, EMSGSIZE, errno

from frame_batch cimport FrameArrays, frame_at
from netbytes cimport (be16, checksum_field, pseudo_header_sum, pseudo_header_sum6, put16,
                      sum_bytes, sum_verifies)
from vhostnet.wire._flow_table cimport TABLE_SLOTS, FlowIndex
from sockets cimport MSG_DONTWAIT, MSG_TRUNC, iovec, mmsghdr, msghdr, recvmmsg, sendmmsg
from vnet cimport VNET_F_DATA_VALID, vnet_encode, vnet_partial_csum_at

cdef enum:
    MAX_BATCH = 1024             # datagrams per sendmmsg round
    MAX_ERRORS = 64
    ETH_LEN = 14
    IP_LEN = 20
    IP6_LEN = 40
    UDP_LEN = 8
    PROTO_UDP = 17
    UDP_CHECKSUM_OFFSET = 6
    MAX_RX = 64                  # datagrams per recvmmsg
    RX_SLOT = 65536              # arena bytes per datagram: none is ever cut short
    TTL = 64                     # as the Python stack's send_ipv4 / send_ipv6
    PEER_SLOTS = 8192            # inbound flows' peers (a power of two; more: Python path)
    AF_INET_C = 2
    AF_INET6_C = 10

include "udp_gso.pxi"   # UDP GSO on send: the Message a sendmmsg entry stands for

cdef struct FlowSlot:          # the flow in slot i of the FlowIndex (vhostnet/wire/_flow_table.pxd)
    int fd
    uint64_t datagrams       # since the last take_activity()
    uint64_t bytes
    # What a datagram from the host becomes for the guest: from remote to guest.
    uint8_t remote_ip[16]    # 4 bytes used for IPv4
    uint8_t guest_ip[16]
    uint8_t remote_port[2]   # network byte order
    uint8_t guest_port[2]
    bint ipv6
    bint gso_refused         # the kernel would not cut this flow's datagrams: plain sends
    double last_seen         # the ``now`` of its last datagram sent or received here


include "udp_tx.pxi"     # guest -> host: which frames are plain datagrams of a flow
include "udp_peers.pxi"  # inbound flows' peers on forwarded ports
include "udp_rx.pxi"     # host -> guest frames: headers, and straight into the RX ring



cdef class UdpFastPath:
    """Registered outbound UDP flows and the batch sender; see the module docstring."""

    cdef FlowIndex index
    cdef FlowSlot *slots
    # send_batch(): each taken datagram's payload is an iovec; consecutive ones of a flow are
    # bundled into messages (udp_gso.pxi), sent by flush(). A refused bundle is sent again
    # datagram by datagram from the plain_* arrays.
    cdef iovec iovs[MAX_BATCH]
    cdef int niovs
    cdef Message messages[MAX_BATCH]
    cdef mmsghdr msgs[MAX_BATCH]
    cdef int nmessages
    cdef Message plain[GSO_SEGMENTS]
    cdef mmsghdr plain_msgs[GSO_SEGMENTS]
    cdef bint gso_on
    cdef readonly uint64_t gso_datagrams     # sent in messages the kernel cut (UDP GSO)
    cdef readonly uint64_t gso_refused       # flows whose bundle the kernel refused
    cdef readonly uint64_t datagrams_taken   # frames send_batch took, in all and on IPv6
    cdef readonly uint64_t datagrams_taken6
    cdef FrameArrays bound                   # the batch of bind_batch
    cdef uint8_t *bound_handled
    cdef Py_ssize_t bound_capacity
    cdef object bound_buffers
    cdef int64_t err_flow[MAX_ERRORS]
    cdef int err_code[MAX_ERRORS]
    cdef readonly int nerrors                # send errors take_errors has yet to report
    cdef readonly uint64_t datagrams_sent
    cdef readonly Py_ssize_t last_taken6     # of the last send_batch's frames, those on IPv6
    cdef readonly uint64_t host_busy
    cdef uint8_t gateway_mac[6]
    cdef uint8_t guest_mac[6]
    cdef bint have_guest_mac
    # receive(): recvmmsg lands in the arena (MAX_RX slots of RX_SLOT bytes, allocated at
    # the first call; pages the datagrams never reach stay untouched).
    cdef uint8_t *arena
    cdef mmsghdr rx_msgs[MAX_RX]
    cdef iovec rx_iovs[MAX_RX]
    cdef PeerName rx_names[MAX_RX]
    cdef int left_at[MAX_RX]              # datagrams of a round left to Python
    cdef int64_t left_flow[MAX_RX]
    cdef int64_t hit_flows[MAX_RX * 4]    # flows that got frames (runs of the same one: once)
    cdef int nhits
    cdef PeerEntry *peers                 # allocated with the first peer
    cdef readonly int peer_count
    cdef readonly uint64_t datagrams_received
    cdef readonly Py_ssize_t frames6      # of the last receive's frames, those on IPv6
    cdef UdpDirect direct                 # receive_direct(): straight into an RX ring
    cdef readonly uint64_t datagrams_direct
    cdef readonly uint64_t datagrams_direct6
    cdef double now                       # the ``now`` of the send in progress
    cdef uint64_t rx_vnet                 # the vnet word of every frame built for the guest

    def __cinit__(self):
        self.index = FlowIndex()
        self.slots = <FlowSlot *>calloc(TABLE_SLOTS, sizeof(FlowSlot))
        if self.slots == NULL:
            raise MemoryError()
        self.gso_on = gso_supported()

    def __dealloc__(self):
        free(self.slots)
        free(self.arena)
        free(self.direct.spill)
        free(self.peers)

    @property
    def flows(self) -> int:
        return self.index.count

    @property
    def gso(self) -> bool:
        """Whether datagrams of a flow are bundled for the kernel to cut (UDP GSO); on where
        the kernel has it. Turning it off sends one datagram per sendmmsg entry."""
        return self.gso_on

    @gso.setter
    def gso(self, bint on) -> None:
        self.gso_on = on and gso_supported()

    @property
    def data_valid(self) -> bool:
        """Whether frames built for the guest (both ways: ``receive``, ``receive_from``,
        ``receive_direct``) say their checksums are verified (VIRTIO_NET_HDR_F_DATA_VALID, as
        Linux's tap and vhost-net mark a datagram its stack checked), so that the guest does
        not sum every payload again; only for a guest that negotiated receive checksum
        offload. The checksums are filled in either way."""
        return self.rx_vnet != 0

    @data_valid.setter
    def data_valid(self, bint on) -> None:
        self.rx_vnet = vnet_encode(VNET_F_DATA_VALID, 0, 0, 0, 0) if on else 0

    def set_macs(self, bytes gateway_mac, guest_mac) -> None:
        """The frames to take: from ``guest_mac`` (None: take none) to ``gateway_mac``."""
        memcpy(self.gateway_mac, <const char *>gateway_mac, 6)
        self.have_guest_mac = guest_mac is not None
        if self.have_guest_mac:
            memcpy(self.guest_mac, <const char *><bytes>guest_mac, 6)

    def add(self, int64_t flow_id, bytes guest_ip, int guest_port, bytes remote_ip,
            int remote_port, int fd) -> bool:
        """Register a flow whose connected host socket is ``fd``; False if the table is full."""
        if fd < 0:
            raise ValueError("bad UDP fast-path flow")
        if self.index.slot_of(flow_id) >= 0:
            return False
        cdef int index = self.index.add(flow_id, guest_ip, guest_port, remote_ip, remote_port)
        if index < 0:
            return False
        cdef FlowSlot *slot = &self.slots[index]
        slot.fd = fd
        slot.datagrams = 0
        slot.bytes = 0
        slot.ipv6 = len(guest_ip) == 16
        slot.gso_refused = False
        memcpy(slot.guest_ip, <const char *>guest_ip, len(guest_ip))
        memcpy(slot.remote_ip, <const char *>remote_ip, len(remote_ip))
        put16(slot.guest_port, guest_port)
        put16(slot.remote_port, remote_port)
        return True

    def holds(self, int64_t flow_id) -> bool:
        """Whether ``flow_id`` is registered."""
        return self.index.slot_of(flow_id) >= 0

    def remove(self, int64_t flow_id) -> tuple:
        """Forget a flow (its socket is about to close); its unreported (datagrams, bytes)."""
        cdef int index = self.index.discard(flow_id)
        if index < 0:
            return (0, 0)
        cdef FlowSlot *slot = &self.slots[index]
        result = (slot.datagrams, slot.bytes)
        memset(slot, 0, sizeof(FlowSlot))
        return result

    def last_seen(self, int64_t flow_id) -> float:
        """The ``now`` of the last datagram of ``flow_id`` this kernel sent or received
        (``send_bound``, ``receive_direct``), 0.0 for none, -1.0 for a flow it does not hold."""
        cdef int index = self.index.slot_of(flow_id)
        return self.slots[index].last_seen if index >= 0 else -1.0

    def take_activity(self) -> list:
        """(flow_id, datagrams, bytes) of every flow that sent since the last call."""
        active = []
        cdef FlowSlot *slot
        cdef int index
        for index in self.index.take_touched():
            slot = &self.slots[index]
            if self.index.flow_id(index) > 0 and slot.datagrams:
                active.append((self.index.flow_id(index), slot.datagrams, slot.bytes))
                slot.datagrams = 0
                slot.bytes = 0
        return active

    def take_errors(self) -> list:
        """(flow_id, errno) of send errors since the last call (at most 64 kept)."""
        errors = [(self.err_flow[i], self.err_code[i]) for i in range(self.nerrors)]
        self.nerrors = 0
        return errors

    def bind_batch(self, const uint8_t[::1] data, const uint64_t[::1] offsets,
                   const uint32_t[::1] lengths, const uint64_t[::1] vnets,
                   uint8_t[::1] handled) -> None:
        """The TX batch's arrays (as ``FrameBatch.arrays()`` gives them) and the ``handled``
        array that ``send_bound`` works on, held until the next bind: a batch is bound once,
        not at every send."""
        cdef Py_ssize_t capacity = min(offsets.shape[0], lengths.shape[0], vnets.shape[0],
                                       handled.shape[0])
        if data.shape[0] == 0 or capacity == 0:
            raise ValueError("an empty batch")
        self.bound_buffers = (data, offsets, lengths, vnets, handled)  # keeps them alive
        self.bound.data = &data[0]
        self.bound.size = data.shape[0]
        self.bound.offsets = &offsets[0]
        self.bound.lengths = &lengths[0]
        self.bound.vnets = &vnets[0]
        self.bound_handled = &handled[0]
        self.bound_capacity = capacity

    def send_bound(self, Py_ssize_t count, double now=0.0) -> int:
        """Send the datagrams of registered flows among the bound batch's first ``count``
        frames.

        ``handled[i]`` is set to 1 for each frame taken (sent, or dropped because the host
        socket was busy), 0 for frames the Python stack must handle. Returns how many
        were taken. Each flow that sent has ``now`` as its ``last_seen``.
        """
        cdef Py_ssize_t taken
        self.now = now
        if count > self.bound_capacity:
            raise ValueError("count exceeds the batch arrays")
        self.last_taken6 = 0
        if count <= 0 or self.index.count == 0 or not self.have_guest_mac:
            if count > 0:
                memset(self.bound_handled, 0, count)
            return 0
        with nogil:
            taken = self._send_batch(&self.bound, self.bound_handled, count)
        return taken

    def send_batch(self, const uint8_t[::1] data, const uint64_t[::1] offsets,
                   const uint32_t[::1] lengths, const uint64_t[::1] vnets, uint8_t[::1] handled,
                   Py_ssize_t count, double now=0.0) -> int:
        """``bind_batch`` then ``send_bound``."""
        self.bind_batch(data, offsets, lengths, vnets, handled)
        return self.send_bound(count, now)

    cdef Py_ssize_t _send_batch(self, const FrameArrays *batch, uint8_t *handled,
                                Py_ssize_t count) noexcept nogil:
        cdef Py_ssize_t i, taken = 0, taken6 = 0
        cdef int slot
        cdef const uint8_t *frame
        cdef const uint8_t *payload
        cdef uint64_t length, payload_len
        cdef bint ipv6
        for i in range(count):
            handled[i] = 0
            frame = frame_at(batch, i, &length)
            if frame == NULL:
                continue
            slot = datagram_of_flow(self.index, self.gateway_mac, self.guest_mac, frame, length,
                                    batch.vnets[i], &payload, &payload_len, &ipv6)
            if slot < 0:
                continue
            taken6 += ipv6
            self.queue(slot, payload, payload_len)
            handled[i] = 1
            taken += 1
        self.flush()
        self.last_taken6 = taken6
        self.datagrams_taken += taken
        self.datagrams_taken6 += taken6
        return taken

    cdef void queue(self, int slot, const uint8_t *payload, uint64_t length) noexcept nogil:
        """A datagram's payload for flow ``slot``: into the last message if GSO may cut it
        from there, else a message of its own (sent by the next flush)."""
        cdef Message *message
        if self.niovs == MAX_BATCH:
            self.flush()
        self.iovs[self.niovs].iov_base = <void *>payload
        self.iovs[self.niovs].iov_len = length
        if self.nmessages and self.gso_on and not self.slots[slot].gso_refused:
            message = &self.messages[self.nmessages - 1]
            if gso_may_join(message, slot, length):
                message.segments += 1
                message.bytes += length
                message.closed = length < message.segment_size
                self.niovs += 1
                return
        message = &self.messages[self.nmessages]
        message.slot = slot
        message.first = self.niovs
        message.segments = 1
        message.segment_size = <uint32_t>length
        message.bytes = length
        message.closed = False
        self.nmessages += 1
        self.niovs += 1

    cdef void flush(self) noexcept nogil:
        """Send the queued messages."""
        cdef int i
        for i in range(self.nmessages):
            self.set_header(&self.msgs[i], &self.messages[i])
        self.send(self.msgs, self.messages, self.nmessages)
        self.nmessages = 0
        self.niovs = 0

    cdef void set_header(self, mmsghdr *entry, Message *message) noexcept nogil:
        memset(entry, 0, sizeof(mmsghdr))
        entry.msg_hdr.msg_iov = &self.iovs[message.first]
        entry.msg_hdr.msg_iovlen = message.segments
        gso_control(&entry.msg_hdr, message)

    cdef void send(self, mmsghdr *msgs, Message *messages, int n) noexcept nogil:
        """Send msgs[0:n], one sendmmsg per run of the same socket; record errors per flow."""
        cdef int start = 0, end, sent, fd, error
        cdef int rounds = 0
        while start < n and rounds < 2 * MAX_BATCH:
            rounds += 1
            fd = self.slots[messages[start].slot].fd
            end = start + 1
            while end < n and self.slots[messages[end].slot].fd == fd:
                end += 1
            sent = sendmmsg(fd, &msgs[start], end - start, MSG_DONTWAIT)
            if sent < 0:
                error = errno
                if error == EINTR:
                    continue
                if messages[start].segments > 1:
                    self.unbundle(&messages[start], error)
                else:
                    self.lost(messages[start].slot, error)  # carry on with the next
                start += 1
                continue
            for end in range(start, start + sent):
                self.delivered(&messages[end])
            start += sent

    cdef void delivered(self, const Message *message) noexcept nogil:
        cdef FlowSlot *flow = &self.slots[message.slot]
        if flow.datagrams == 0:
            self.index.touch(message.slot)
        flow.last_seen = self.now
        flow.datagrams += message.segments
        flow.bytes += message.bytes
        self.datagrams_sent += message.segments
        if message.segments > 1:
            self.gso_datagrams += message.segments

    cdef void lost(self, int slot, int error) noexcept nogil:
        """A datagram of flow ``slot`` the kernel did not take."""
        if error == EAGAIN:
            self.host_busy += 1  # UDP may lose; never block the data path
        elif self.nerrors < MAX_ERRORS:
            self.err_flow[self.nerrors] = self.index.flow_id(slot)
            self.err_code[self.nerrors] = error
            self.nerrors += 1

    cdef void unbundle(self, const Message *message, int error) noexcept nogil:
        """A GSO message failed with ``error``: send its datagrams one by one, as they would
        have gone without GSO."""
        cdef uint32_t skip = 0, i
        if error == EINVAL or error == EMSGSIZE or error == EIO:
            # The kernel will not cut this flow's datagrams (a segment over the route's MTU,
            # a socket without UDP checksums, IPsec): plain sends for the flow from now on.
            self.slots[message.slot].gso_refused = True
            self.gso_refused += 1
        elif error != EAGAIN:
            # A pending socket error (ECONNREFUSED after an ICMP error) this send took: the
            # flow learns it and loses one datagram, as with a plain send.
            self.lost(message.slot, error)
            skip = 1
        for i in range(message.segments - skip):
            self.plain[i].slot = message.slot
            self.plain[i].first = message.first + skip + i
            self.plain[i].segments = 1
            self.plain[i].bytes = self.iovs[message.first + skip + i].iov_len
            self.set_header(&self.plain_msgs[i], &self.plain[i])
        self.send(self.plain_msgs, self.plain, message.segments - skip)

    # ---- host -> guest ------------------------------------------------------------

    def receive(self, int64_t flow_id, Py_ssize_t mtu, uint8_t[::1] storage,
                uint64_t[::1] offsets, uint32_t[::1] lengths, uint64_t[::1] vnets) -> tuple:
        """Take what waits on ``flow_id``'s socket: each datagram becomes a whole frame for
        the guest in the batch arrays (from frame 0, as ``FrameBatch.take_written`` reads
        them), until the socket is drained or the arrays are full.

        Returns (frames written, errno of a receive error or 0, datagrams too large for one
        frame of ``mtu`` as a list of bytes: the Python stack fragments those).
        """
        cdef int index = self.index.slot_of(flow_id)
        if index < 0 or not self.have_guest_mac:
            raise ValueError("receive on a flow the fast path does not hold")
        frames, error, left = self._receive(self.slots[index].fd, &self.slots[index], mtu,
                                            storage, offsets, lengths, vnets)
        return frames, error, [payload for payload, _entry, _family, _address, _port in left]

    def receive_direct(self, int64_t flow_id, Py_ssize_t mtu, double now, ring, capsule,
                       long limit=MAX_RX) -> tuple:
        """Take up to ``limit`` datagrams waiting on ``flow_id``'s socket straight into the RX
        ring ``ring`` (the ring kernel's queue, ``capsule`` its ``rx_direct_handle``), one
        interrupt for all (see udp_rx.pxi). When any went, the flow's ``last_seen`` becomes
        ``now``; they are counted in ``datagrams_direct`` (and ``datagrams_direct6``).
        Their vnet word is ``data_valid``'s (see there).

        Returns (status, frames delivered, a tuple of the datagrams received but not
        delivered, as bytes, in order: one the ring could not take and the one after it, if
        it came with it); status DIRECT_DRAINED, DIRECT_LIMIT, DIRECT_RING_FULL,
        DIRECT_SPILLED (datagrams handed back), or a receive error's errno. After DIRECT_RING_FULL or
        DIRECT_SPILLED, what else waits is for ``receive``, behind what went here.
        """
        cdef int index = self.index.slot_of(flow_id)
        cdef UdpDirect *p = &self.direct
        if index < 0 or not self.have_guest_mac or limit < 1:
            raise ValueError("direct receive on a flow the fast path does not hold")
        if mtu - IP6_LEN - UDP_LEN < 1:
            raise ValueError("an MTU too small for a UDP frame")
        if p.spill == NULL:
            p.spill = <uint8_t *>malloc(SPILL_SIZE)
            if p.spill == NULL:
                raise MemoryError()
        p.fd = self.slots[index].fd
        p.slot = &self.slots[index]
        p.guest_mac = self.guest_mac
        p.gateway_mac = self.gateway_mac
        p.max_payload = mtu - UDP_LEN - (IP6_LEN if self.slots[index].ipv6 else IP_LEN)
        p.limit = limit
        p.vnet = self.rx_vnet
        result = direct_receive(p, ring, capsule)
        if p.frames:
            self.slots[index].last_seen = now
            self.datagrams_direct += p.frames
            if self.slots[index].ipv6:
                self.datagrams_direct6 += p.frames
        self.frames6 = p.frames if self.slots[index].ipv6 else 0
        return result

    def add_peer(self, int64_t flow_id, int fd, bytes peer_address, int peer_port,
                 bytes guest_ip, int guest_port, bytes remote_ip, int remote_port) -> bool:
        """An inbound flow: datagrams from ``peer_address``:``peer_port`` (4 bytes on an IPv4
        socket, 16 on an IPv6 one, as recvfrom gives them) arriving on the forward's socket
        ``fd`` go to the guest as from remote_ip:remote_port to guest_ip:guest_port. False
        if the peer table is full (that flow's datagrams stay on the Python path)."""
        if len(peer_address) not in (4, 16) or len(guest_ip) != len(remote_ip) \
                or len(guest_ip) not in (4, 16) or flow_id <= 0 or fd < 0:
            raise ValueError("bad UDP fast-path peer")
        if self.peers == NULL:
            self.peers = <PeerEntry *>calloc(PEER_SLOTS, sizeof(PeerEntry))
            if self.peers == NULL:
                raise MemoryError()
        cdef PeerEntry probe
        _peer_key(&probe, fd, peer_address, peer_port)
        if peer_find(self.peers, &probe) >= 0:
            return False
        cdef int at = peer_free_slot(self.peers, &probe)
        if at < 0:
            return False
        cdef PeerEntry *entry = &self.peers[at]
        entry[0] = probe
        entry.flow_id = flow_id
        entry.to_guest.fd = fd
        entry.to_guest.ipv6 = len(guest_ip) == 16
        memcpy(entry.to_guest.guest_ip, <const char *>guest_ip, len(guest_ip))
        memcpy(entry.to_guest.remote_ip, <const char *>remote_ip, len(remote_ip))
        put16(entry.to_guest.guest_port, guest_port)
        put16(entry.to_guest.remote_port, remote_port)
        self.peer_count += 1
        return True

    def remove_peer(self, int fd, bytes peer_address, int peer_port) -> bool:
        """Forget an inbound flow's peer (before its flow or its forward's socket goes)."""
        if self.peers == NULL or len(peer_address) not in (4, 16):
            return False
        cdef PeerEntry probe
        _peer_key(&probe, fd, peer_address, peer_port)
        cdef int at = peer_find(self.peers, &probe)
        if at < 0:
            return False
        memset(&self.peers[at], 0, sizeof(PeerEntry))
        self.peers[at].flow_id = -1  # a tombstone: lookups probe past it
        self.peer_count -= 1
        if self.peer_count == 0:
            memset(self.peers, 0, PEER_SLOTS * sizeof(PeerEntry))  # no tombstones pile up
        return True

    def receive_from(self, int fd, Py_ssize_t mtu, uint8_t[::1] storage, uint64_t[::1] offsets,
                     uint32_t[::1] lengths, uint64_t[::1] vnets) -> tuple:
        """``receive`` for a forward's (unconnected) socket ``fd``: datagrams of registered
        peers become frames; the others come back for the Python stack.

        Returns (frames written, errno or 0, flow ids that got frames, what Python must
        take as (payload, flow id or 0 for an unknown peer, address family, peer address
        bytes, peer port)).
        """
        if not self.have_guest_mac:
            raise ValueError("no guest MAC to build frames for")
        frames, error, left = self._receive(fd, NULL, mtu, storage, offsets, lengths, vnets)
        return frames, error, self._take_hits(), left

    cdef list _take_hits(self):
        hits = [self.hit_flows[i] for i in range(self.nhits)]
        self.nhits = 0
        return hits

    cdef tuple _receive(self, int fd, FlowSlot *fixed, Py_ssize_t mtu, uint8_t[::1] storage,
                        uint64_t[::1] offsets, uint32_t[::1] lengths, uint64_t[::1] vnets):
        """The receive loop of both: rounds of recvmmsg until drained, full or an error;
        (frames, errno or 0, [(payload, flow id, family, address, port)] left to Python)."""
        cdef Py_ssize_t max_payload = mtu - IP_LEN - UDP_LEN
        cdef Py_ssize_t capacity = min(offsets.shape[0], lengths.shape[0], vnets.shape[0])
        # Room for the largest frame either family can give at this MTU (IPv4's).
        if max_payload < 1 or capacity < 1 or storage.shape[0] < ETH_LEN + mtu:
            raise ValueError("the batch cannot hold one frame of this MTU")
        if self.arena == NULL:
            self.arena = <uint8_t *>malloc(<size_t>MAX_RX * RX_SLOT)
            if self.arena == NULL:
                raise MemoryError()
        cdef Py_ssize_t frames = 0
        cdef uint64_t fill = 0
        cdef int nleft, error, i, at
        self.frames6 = 0
        self.nhits = 0
        left = []
        while True:
            with nogil:
                error = self._receive_round(fd, fixed, mtu, &storage[0], storage.shape[0],
                                            &offsets[0], &lengths[0], &vnets[0], capacity,
                                            &frames, &fill, &nleft)
            for i in range(nleft):
                at = self.left_at[i]
                family, address, port = _peer_of(&self.rx_names[at])
                left.append((bytes((self.arena + <size_t>at * RX_SLOT)[:self.rx_msgs[at].msg_len]),
                             self.left_flow[i], family, address, port))
            if error != -1:
                break
        return frames, error, left

    cdef int _receive_round(self, int fd, FlowSlot *fixed, Py_ssize_t mtu, uint8_t *storage,
                            Py_ssize_t size, uint64_t *offsets, uint32_t *lengths,
                            uint64_t *vnets, Py_ssize_t capacity, Py_ssize_t *frames,
                            uint64_t *fill, int *nleft) noexcept nogil:
        """One recvmmsg of as many datagrams as surely fit; -1: go on (more may wait and
        there is room), 0: done, else the errno of a receive error. Datagrams of ``fixed``
        (a connected flow) or, without one, of the registered peer each came from, become
        frames; the rest are noted in ``left_at``/``left_flow``."""
        cdef Py_ssize_t room = (size - <Py_ssize_t>fill[0]) // (ETH_LEN + mtu)
        cdef Py_ssize_t want = min(<Py_ssize_t>MAX_RX, capacity - frames[0], room)
        cdef int got, i
        cdef uint32_t length
        cdef Py_ssize_t header
        cdef FlowSlot *to_guest
        cdef PeerEntry *peer
        cdef int64_t flow_id
        nleft[0] = 0
        if want <= 0:
            return 0
        for i in range(want):
            self.rx_iovs[i].iov_base = self.arena + <size_t>i * RX_SLOT
            self.rx_iovs[i].iov_len = RX_SLOT
            memset(&self.rx_msgs[i], 0, sizeof(mmsghdr))
            self.rx_msgs[i].msg_hdr.msg_iov = &self.rx_iovs[i]
            self.rx_msgs[i].msg_hdr.msg_iovlen = 1
            if fixed == NULL:
                self.rx_msgs[i].msg_hdr.msg_name = &self.rx_names[i]
                self.rx_msgs[i].msg_hdr.msg_namelen = sizeof(PeerName)
        while True:
            got = recvmmsg(fd, self.rx_msgs, <unsigned int>want, MSG_DONTWAIT, NULL)
            if got >= 0 or errno != EINTR:
                break
        if got < 0:
            return 0 if errno == EAGAIN else errno
        for i in range(got):
            length = self.rx_msgs[i].msg_len
            to_guest = fixed
            flow_id = 0
            if to_guest == NULL:
                peer = peer_of_sender(self.peers, self.peer_count, fd, &self.rx_names[i])
                if peer != NULL:
                    flow_id = peer.flow_id
                    to_guest = &peer.to_guest
            header = ETH_LEN + UDP_LEN + (IP6_LEN if to_guest != NULL and to_guest.ipv6
                                          else IP_LEN)
            if to_guest == NULL or length > mtu - header + ETH_LEN \
                    or self.rx_msgs[i].msg_hdr.msg_flags & MSG_TRUNC:
                self.left_at[nleft[0]] = i
                self.left_flow[nleft[0]] = flow_id
                nleft[0] += 1
                continue
            build_frame(self.guest_mac, self.gateway_mac, to_guest, storage + fill[0],
                        self.arena + <size_t>i * RX_SLOT, length)
            offsets[frames[0]] = fill[0]
            lengths[frames[0]] = <uint32_t>(header + length)
            vnets[frames[0]] = self.rx_vnet
            fill[0] += header + length
            frames[0] += 1
            if to_guest.ipv6:
                self.frames6 += 1
            if flow_id and self.nhits < MAX_RX * 4 and (
                    self.nhits == 0 or self.hit_flows[self.nhits - 1] != flow_id):
                self.hit_flows[self.nhits] = flow_id
                self.nhits += 1
        self.datagrams_received += got
        return -1 if got == want else 0


include "udp_reader.pxi"  # a flow socket's reader on the loop (after UdpFastPath, which it uses)
