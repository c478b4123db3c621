# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Guest -> host UDP for established outbound flows, in C with the GIL released.

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

The Python face is ``vhostnet.hostio.udp_fast``; use that.
"""

from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free
from libc.string cimport memcmp, memcpy, memset
from libc.errno cimport EAGAIN, EINTR, errno

from frame_batch cimport FrameArrays, frame_at
from netbytes cimport be16, pseudo_header_sum, pseudo_header_sum6, sum_bytes, sum_verifies
from vhostnet.wire._flow_table cimport TABLE_SLOTS, FlowIndex
from vnet cimport vnet_partial_csum_at

cdef extern from "<sys/socket.h>" nogil:
    cdef struct iovec:
        void *iov_base
        size_t iov_len
    cdef struct msghdr:
        void *msg_name
        unsigned int msg_namelen
        iovec *msg_iov
        size_t msg_iovlen
        void *msg_control
        size_t msg_controllen
        int msg_flags
    cdef struct mmsghdr:
        msghdr msg_hdr
        unsigned int msg_len
    int sendmmsg(int fd, mmsghdr *msgvec, unsigned int vlen, int flags)
    int MSG_DONTWAIT

cdef enum:
    MAX_BATCH = 1024             # datagrams per sendmmsg round
    MAX_ERRORS = 64
    ETH_LEN = 14
    IP_LEN = 20
    IP6_LEN = 40
    UDP_LEN = 8
    PROTO_UDP = 17
    UDP_CHECKSUM_OFFSET = 6

cdef struct FlowSlot:          # the flow in slot i of the FlowIndex (vhostnet/wire/_flow_table.pxd)
    int fd
    uint64_t datagrams       # since the last take_activity()
    uint64_t bytes


cdef class UdpFastPath:
    """Registered outbound UDP flows and the batch sender; see the module docstring."""

    cdef FlowIndex index
    cdef FlowSlot *slots
    cdef mmsghdr msgs[MAX_BATCH]
    cdef iovec iovs[MAX_BATCH]
    cdef int msg_slot[MAX_BATCH]
    cdef int64_t err_flow[MAX_ERRORS]
    cdef int err_code[MAX_ERRORS]
    cdef int nerrors
    cdef readonly uint64_t datagrams_sent
    cdef readonly Py_ssize_t last_taken6     # of the last send_batch's frames, those on IPv6
    cdef readonly uint64_t host_busy
    cdef uint8_t gateway_mac[6]
    cdef uint8_t guest_mac[6]
    cdef bint have_guest_mac

    def __cinit__(self):
        self.index = FlowIndex()
        self.slots = <FlowSlot *>calloc(TABLE_SLOTS, sizeof(FlowSlot))
        if self.slots == NULL:
            raise MemoryError()

    def __dealloc__(self):
        free(self.slots)

    @property
    def flows(self) -> int:
        return self.index.count

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
        self.slots[index].fd = fd
        self.slots[index].datagrams = 0
        self.slots[index].bytes = 0
        return True

    def remove(self, int64_t flow_id) -> tuple:
        """Forget a flow (its socket is about to close); its unreported (datagrams, bytes)."""
        cdef int index = self.index.discard(flow_id)
        if index < 0:
            return (0, 0)
        cdef FlowSlot *slot = &self.slots[index]
        result = (slot.datagrams, slot.bytes)
        memset(slot, 0, sizeof(FlowSlot))
        return result

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

    def send_batch(self, const uint8_t[::1] data, const uint64_t[::1] offsets,
                   const uint32_t[::1] lengths, const uint64_t[::1] vnets, uint8_t[::1] handled,
                   Py_ssize_t count) -> int:
        """Send the datagrams of registered flows among the first ``count`` frames.

        ``handled[i]`` is set to 1 for each frame taken (sent, or dropped because the host
        socket was busy), 0 for frames the Python stack must handle. Returns how many
        were taken.
        """
        cdef Py_ssize_t taken
        cdef FrameArrays batch
        if count > offsets.shape[0] or count > lengths.shape[0] or count > vnets.shape[0] \
                or count > handled.shape[0]:
            raise ValueError("count exceeds the batch arrays")
        self.last_taken6 = 0
        if count <= 0 or self.index.count == 0 or not self.have_guest_mac:
            if count > 0:
                memset(&handled[0], 0, count)
            return 0
        batch.data = &data[0]
        batch.size = data.shape[0]
        batch.offsets = &offsets[0]
        batch.lengths = &lengths[0]
        batch.vnets = &vnets[0]
        with nogil:
            taken = self._send_batch(&batch, &handled[0], count)
        return taken

    cdef Py_ssize_t _send_batch(self, const FrameArrays *batch, uint8_t *handled,
                                Py_ssize_t count) noexcept nogil:
        cdef Py_ssize_t i, taken = 0, taken6 = 0
        cdef int n = 0, slot
        cdef const uint8_t *frame
        cdef const uint8_t *ip
        cdef const uint8_t *udp
        cdef uint64_t length, total, udp_len
        for i in range(count):
            handled[i] = 0
            frame = frame_at(batch, i, &length)
            if frame == NULL:
                continue
            if length < ETH_LEN + IP_LEN + UDP_LEN:
                continue
            if memcmp(frame, self.gateway_mac, 6) != 0 or memcmp(frame + 6, self.guest_mac, 6) != 0:
                continue
            ip = frame + ETH_LEN
            if frame[12] == 0x08 and frame[13] == 0x00:
                # Plain IPv4 only: no options, no fragment, UDP, a header that verifies.
                if ip[0] != 0x45 or ip[9] != PROTO_UDP or (be16(ip + 6) & 0x3FFF) != 0:
                    continue
                total = be16(ip + 2)
                if total < IP_LEN + UDP_LEN or total > length - ETH_LEN:
                    continue
                if not sum_verifies(sum_bytes(ip, IP_LEN)):
                    continue
                udp = ip + IP_LEN
                udp_len = be16(udp + 4)
                if udp_len < UDP_LEN or udp_len > total - IP_LEN:
                    continue
                slot = self.index.find(ip, udp)
                if slot < 0:
                    continue
                if not self.checksum_acceptable(ip, udp, udp_len, batch.vnets[i]):
                    continue  # the Python stack counts and drops it
            elif frame[12] == 0x86 and frame[13] == 0xDD:
                # Plain IPv6 only: UDP right after the fixed header (no extension headers).
                if length < ETH_LEN + IP6_LEN + UDP_LEN or ip[0] >> 4 != 6 or ip[6] != PROTO_UDP:
                    continue
                total = be16(ip + 4)  # the payload length
                if total < UDP_LEN or total > length - ETH_LEN - IP6_LEN:
                    continue
                udp = ip + IP6_LEN
                udp_len = be16(udp + 4)
                if udp_len < UDP_LEN or udp_len > total:
                    continue
                slot = self.index.find6(ip, udp)
                if slot < 0 or not self.checksum6_acceptable(ip, udp, udp_len, batch.vnets[i]):
                    continue
                taken6 += 1
            else:
                continue
            if n == MAX_BATCH:
                self.flush(n)
                n = 0
            self.iovs[n].iov_base = <void *>(udp + UDP_LEN)
            self.iovs[n].iov_len = udp_len - UDP_LEN
            memset(&self.msgs[n], 0, sizeof(mmsghdr))
            self.msgs[n].msg_hdr.msg_iov = &self.iovs[n]
            self.msgs[n].msg_hdr.msg_iovlen = 1
            self.msg_slot[n] = slot
            n += 1
            handled[i] = 1
            taken += 1
        if n:
            self.flush(n)
        self.last_taken6 = taken6
        return taken

    cdef bint checksum_acceptable(self, const uint8_t *ip, const uint8_t *udp, uint64_t udp_len,
                                  uint64_t vnet) noexcept nogil:
        if udp[6] == 0 and udp[7] == 0:
            return True  # the sender computed none (IPv4 allows it)
        # A partial checksum at the UDP header (virtio NEEDS_CSUM) is the guest's driver
        # leaving the sum to the device: nothing to verify.
        if vnet_partial_csum_at(vnet, ETH_LEN + IP_LEN, UDP_CHECKSUM_OFFSET):
            return True
        return sum_verifies(pseudo_header_sum(ip, PROTO_UDP, udp_len) + sum_bytes(udp, udp_len))

    cdef bint checksum6_acceptable(self, const uint8_t *ip6, const uint8_t *udp,
                                   uint64_t udp_len, uint64_t vnet) noexcept nogil:
        if udp[6] == 0 and udp[7] == 0:
            return False  # forbidden over IPv6 (RFC 8200 8.1): Python counts and drops it
        if vnet_partial_csum_at(vnet, ETH_LEN + IP6_LEN, UDP_CHECKSUM_OFFSET):
            return True
        return sum_verifies(pseudo_header_sum6(ip6, PROTO_UDP, udp_len) + sum_bytes(udp, udp_len))

    cdef void flush(self, int n) noexcept nogil:
        """Send msgs[0:n], one sendmmsg per run of the same socket; record errors per flow."""
        cdef int start = 0, end, sent, fd, slot
        cdef int rounds = 0
        while start < n and rounds < 2 * MAX_BATCH:
            rounds += 1
            fd = self.slots[self.msg_slot[start]].fd
            end = start + 1
            while end < n and self.slots[self.msg_slot[end]].fd == fd:
                end += 1
            sent = sendmmsg(fd, &self.msgs[start], end - start, MSG_DONTWAIT)
            if sent < 0:
                if errno == EINTR:
                    continue
                slot = self.msg_slot[start]
                if errno == EAGAIN:
                    self.host_busy += 1  # UDP may lose; never block the data path
                elif self.nerrors < MAX_ERRORS:
                    self.err_flow[self.nerrors] = self.index.flow_id(slot)
                    self.err_code[self.nerrors] = errno
                    self.nerrors += 1
                start += 1  # that datagram is lost; carry on with the next
                continue
            for end in range(start, start + sent):
                slot = self.msg_slot[end]
                if self.slots[slot].datagrams == 0:
                    self.index.touch(slot)
                self.slots[slot].datagrams += 1
                self.slots[slot].bytes += self.iovs[end].iov_len
            self.datagrams_sent += sent
            start += sent
