# Host -> guest TCP data straight into the guest's RX buffers (included by tcp_fast.pyx).
#
# One call executes one of the engine's Peek commands (``vhostnet.tcp.flow.Peek``: ``length``
# bytes ``offset`` bytes into the socket's receive queue) for the engine: the bytes are
# peeked (recvmsg MSG_PEEK at SO_PEEK_OFF, so they stay in the socket until the guest
# acknowledges them) into the RX buffers the ring kernel hands out (ext/rx_direct.pxd), past
# room for the virtio-net, Ethernet, IP and TCP headers, which are written after, with the
# checksum over the payload where it already lies. One copy, the kernel's; one recvmsg fills
# the payloads of several frames (BATCH_BYTES), so the kernel walks its receive queue to the
# peek offset once per batch, not once per frame. The engine stays
# the owner of every sequence number: it passes the first one and learns how many bytes went.

from libc.stdint cimport uint16_t
from cpython.pycapsule cimport PyCapsule_GetContext, PyCapsule_GetPointer

from rx_direct cimport RXD_MAX_SPANS, RxDirectApi, RxRoom, iov_sum, room_payload_iov
from tcp_headers cimport (CSUM_FULL, CSUM_NONE, CSUM_PARTIAL, HDR_ETH_LEN, HDR_IP6_LEN,
                          HDR_IP_LEN, HDR_TCP_LEN, HEADERS_MAX, fill_headers, fill_template)
from vnet cimport VNET_F_DATA_VALID, VNET_F_NEEDS_CSUM, VNET_GSO_NONE, VNET_GSO_TCPV4, \
    VNET_GSO_TCPV6, vnet_encode

from sockets cimport (MSG_PEEK, MSG_TRUNC, SO_PEEK_OFF, SOL_SOCKET, recv, recvmsg, setsockopt,
                     socklen_t)

# One recvmsg peeks this many bytes at most (whole segments; at least one), into up to
# BATCH_FRAMES frames, which are then published: a long peek (the guest's whole window) lets
# the guest start on the first frames while the rest is copied (it is told as it asks).
cdef enum:
    BATCH_BYTES = 256 * 1024
    BATCH_FRAMES = 64

# How a direct peek ended (the first value of ``peek_into_ring``'s answer); negative: -errno.
cdef enum:
    PEEK_RING_FULL = 0     # the ring ran out of buffers (or refused): the rest goes the Python way
    PEEK_DONE = 1          # ``length`` bytes delivered
    PEEK_DRAINED = 2       # the socket had no more (EAGAIN or a short read)
    PEEK_EOF = 3           # the peer closed and nothing was delivered

DIRECT_RING_FULL = PEEK_RING_FULL
DIRECT_DONE = PEEK_DONE
DIRECT_DRAINED = PEEK_DRAINED
DIRECT_EOF = PEEK_EOF


cdef struct DirectPeek:
    const RxDirectApi *api
    int fd
    long long offset
    uint64_t length
    uint8_t template[HEADERS_MAX]
    uint32_t headers_len
    Py_ssize_t ip_len
    uint32_t seq
    uint64_t seg_size
    uint16_t mss
    int checksum
    # results
    uint64_t delivered
    int status
    uint64_t segments
    uint64_t large_segments
    uint64_t recvs           # recvmsg calls that peeked bytes
    uint64_t published       # delivered bytes already made visible to the guest


cdef struct PlannedFrame:
    uint64_t want            # payload bytes its buffers take
    int iov_first            # its pieces in the batch's iovec
    int iov_count


cdef int plan_frames(DirectPeek *p, RxRoom *room, uint64_t batch, iovec *iov,
                     PlannedFrame *plan, int *niov) noexcept nogil:
    """Lay ``batch`` payload bytes out over the room's chains as frames of up to ``seg_size``
    bytes, each from the start of a chain past its headers, in the chains the ring's commit
    will give it (as many as its headers and payload fill). Returns the frames planned."""
    cdef uint64_t skip = room.hdr_len + p.headers_len
    cdef uint64_t planned = 0, start = 0, cap, want
    cdef int frames = 0, chain = 0, last, count
    niov[0] = 0
    while frames < BATCH_FRAMES and chain < room.nchains and planned < batch:
        want = batch - planned
        if want > p.seg_size:
            want = p.seg_size
        cap = 0
        last = chain
        while last < room.nchains and cap < skip + want:
            cap += room.chain_bytes[last]
            last += 1
        if cap <= skip:
            break
        if want > cap - skip:
            want = cap - skip
        want = room_payload_iov(room, start + skip, want, iov + niov[0], &count)
        plan[frames].want = want
        plan[frames].iov_first = niov[0]
        plan[frames].iov_count = count
        niov[0] += count
        planned += want
        frames += 1
        start += cap
        chain = last
    return frames


cdef int commit_frame(DirectPeek *p, void *ring, RxRoom *room, const iovec *iov, int niov,
                      uint64_t n, bint last) noexcept nogil:
    """Headers for the next frame (``n`` payload bytes in ``iov``) and the ring's commit."""
    cdef uint8_t headers[HEADERS_MAX]
    cdef uint64_t vnet, payload_sum
    cdef uint8_t gso
    payload_sum = iov_sum(iov, niov, n) if p.checksum == CSUM_FULL else 0
    fill_headers(headers, p.ip_len, p.template, n, p.seq + <uint32_t>p.delivered, last,
                 p.checksum, payload_sum)
    if p.checksum == CSUM_PARTIAL:
        gso = VNET_GSO_NONE
        if n > p.mss:
            gso = VNET_GSO_TCPV6 if p.ip_len == HDR_IP6_LEN else VNET_GSO_TCPV4
        vnet = vnet_encode(VNET_F_NEEDS_CSUM, gso, p.mss if gso else 0,
                           HDR_ETH_LEN + p.ip_len, 16)
    elif p.checksum == CSUM_NONE:
        vnet = vnet_encode(VNET_F_DATA_VALID, 0, 0, 0, 0)
    else:
        vnet = 0
    if p.api.commit(ring, room, headers, p.headers_len, vnet, p.headers_len + n) != 0:
        return -1  # refused (counted by the ring): the Python path sends these bytes
    if p.checksum == CSUM_PARTIAL and n > p.mss:
        p.large_segments += 1
    p.delivered += n
    p.segments += 1
    return 0


cdef long direct_peek_work(void *ring, void *arg, long unused) noexcept nogil:
    cdef DirectPeek *p = <DirectPeek *>arg
    cdef RxRoom room
    cdef iovec iov[RXD_MAX_SPANS]
    cdef PlannedFrame plan[BATCH_FRAMES]
    cdef msghdr msg
    cdef int niov, attempts, frames, f
    cdef ssize_t got
    cdef uint64_t batch, planned, left, n
    cdef uint64_t per_frame = 12 + p.headers_len
    cdef uint64_t batch_limit = (BATCH_BYTES // p.seg_size) * p.seg_size
    cdef int peek_off = <int>p.offset
    if batch_limit < p.seg_size:
        batch_limit = p.seg_size
    p.status = PEEK_RING_FULL
    if setsockopt(p.fd, SOL_SOCKET, SO_PEEK_OFF, &peek_off, sizeof(int)) != 0:
        return 0  # the Python path peeks its own way
    while p.delivered < p.length:
        batch = p.length - p.delivered
        if batch > batch_limit:
            batch = batch_limit
        if not p.api.take(ring, batch + per_frame * ((batch + p.seg_size - 1) // p.seg_size),
                          per_frame + 1, &room):
            break
        frames = plan_frames(p, &room, batch, iov, plan, &niov)
        if frames == 0:
            break
        planned = 0
        for f in range(frames):
            planned += plan[f].want
        memset(&msg, 0, sizeof(msghdr))
        msg.msg_iov = iov
        msg.msg_iovlen = niov
        got = -1
        for attempts in range(4):
            got = recvmsg(p.fd, &msg, MSG_PEEK | MSG_DONTWAIT)
            if got >= 0 or errno != EINTR:
                break
        if got < 0:
            if errno == EFAULT:
                return 0  # the buffers are not guest memory any more: not the socket's fault
            p.status = PEEK_DRAINED if errno == EAGAIN else -errno
            return 0
        if got == 0:
            p.status = PEEK_EOF if p.delivered == 0 else PEEK_DRAINED
            return 0
        p.recvs += 1
        left = <uint64_t>got
        for f in range(frames):
            if not left:
                break
            n = plan[f].want if plan[f].want < left else left
            left -= n
            if commit_frame(p, ring, &room, iov + plan[f].iov_first, plan[f].iov_count, n,
                            n < plan[f].want or p.delivered + n == p.length) != 0:
                return 0
        if p.delivered - p.published >= batch_limit:
            p.api.finish(ring)
            p.published = p.delivered
        if <uint64_t>got < planned:
            p.status = PEEK_DRAINED
            return 0
    if p.delivered == p.length:
        p.status = PEEK_DONE
    return 0


cdef class DirectPeeker:
    """Executes Peek commands straight into one RX ring (``vhostnet.tcp.fast`` uses it)."""

    cdef DirectPeek peek

    cdef readonly Py_ssize_t last_dropped   # bytes the last ``run`` discarded first

    @property
    def last_recvs(self) -> int:
        """The recvmsg calls that peeked bytes in the last ``run`` (one fills several frames)."""
        return self.peek.recvs

    def run(self, ring, capsule, int fd, long long offset, Py_ssize_t length, bytes guest_mac,
            bytes gateway_mac, bytes src_ip, bytes dst_ip, int src_port, int dst_port,
            uint32_t seq, uint32_t ack, long long window, Py_ssize_t seg_size, int mss,
            int checksum, Py_ssize_t discard=0) -> tuple:
        """Peek ``length`` bytes at ``offset`` of socket ``fd`` into RX buffers of ``ring`` as
        ACK segments of up to ``seg_size`` bytes from ``src_ip``:``src_port`` to the guest,
        the first at ``seq``, with ``window`` as the window field (clamped: below 0 is 0, above
        0xFFFF is 0xFFFF). Returns (status, delivered bytes, segments, segments longer than
        ``mss``); status DIRECT_DONE, DIRECT_DRAINED, DIRECT_EOF, DIRECT_RING_FULL, or -errno.
        ``ring``: the ring kernel's queue, ``capsule`` its ``rx_direct_handle``.

        ``discard``: the guest's ACK first: drop that many bytes from the head of the receive
        queue (as ``discard_acked``; ``offset`` counts after them) in the same call; how many
        went is ``last_dropped`` (fewer: the queue held fewer). A failing discard answers
        -errno without peeking."""
        cdef DirectPeek *p = &self.peek
        cdef long result
        cdef int failed = 0
        self.last_dropped = 0
        if len(guest_mac) != 6 or len(gateway_mac) != 6 or len(src_ip) not in (4, 16) \
                or len(dst_ip) != len(src_ip) or length < 0 or offset < 0 \
                or offset > 0x7FFFFFFF or not 0 < seg_size <= 0xFFFF - HDR_IP_LEN - HDR_TCP_LEN \
                or not 0 < mss <= 0xFFFF or checksum not in (CSUM_FULL, CSUM_NONE, CSUM_PARTIAL) \
                or discard < 0:
            raise ValueError("bad direct peek")
        api = <const RxDirectApi *>PyCapsule_GetPointer(capsule, b"vhostnet.rx_direct")
        if PyCapsule_GetContext(capsule) != <void *>ring:
            raise ValueError("the capsule belongs to another ring")
        if discard:
            with nogil:
                self.last_dropped = drop_queued(fd, discard, &failed)
            if failed:
                return (-failed, 0, 0, 0)
        memset(p, 0, sizeof(DirectPeek))
        p.api = api
        p.fd = fd
        p.offset = offset
        p.length = length
        p.ip_len = HDR_IP_LEN if len(src_ip) == 4 else HDR_IP6_LEN
        p.headers_len = HDR_ETH_LEN + p.ip_len + HDR_TCP_LEN
        fill_template(p.template, p.ip_len, <const uint8_t *><const char *>guest_mac,
                      <const uint8_t *><const char *>gateway_mac,
                      <const uint8_t *><const char *>src_ip,
                      <const uint8_t *><const char *>dst_ip, src_port & 0xFFFF,
                      dst_port & 0xFFFF, ack,
                      0 if window < 0 else (window if window < 0xFFFF else 0xFFFF))
        p.seq = seq
        p.seg_size = seg_size
        p.mss = mss
        p.checksum = checksum
        if length == 0:
            return (PEEK_DONE, 0, 0, 0)
        result = api.run(<void *>ring, direct_peek_work, <void *>p, 0)
        if p.delivered > p.published:
            api.run(<void *>ring, direct_finish_work, <void *>p, 0)
        if result < 0:
            return (PEEK_RING_FULL, p.delivered, p.segments, p.large_segments)
        return (p.status, p.delivered, p.segments, p.large_segments)


cdef long direct_finish_work(void *ring, void *arg, long unused) noexcept nogil:
    """Publish what was delivered and not yet published; an interrupt if the guest wants one."""
    return (<DirectPeek *>arg).api.finish(ring)


# Rounds of one ``discard_acked``: one recv takes every queued byte up to the length asked; more
# rounds only when a signal interrupted it or the queue grew meanwhile.
cdef enum:
    DISCARD_ROUNDS = 8


cdef Py_ssize_t drop_queued(int fd, Py_ssize_t length, int *failed) noexcept nogil:
    """Drop up to ``length`` bytes from the head of TCP socket ``fd``'s receive queue with
    recv(MSG_TRUNC) (Linux TCP frees them without copying); the bytes dropped; ``failed``: errno."""
    cdef Py_ssize_t dropped = 0
    cdef ssize_t got = 0
    cdef int rounds
    for rounds in range(DISCARD_ROUNDS):
        if dropped >= length:
            break
        got = recv(fd, NULL, <size_t>(length - dropped), MSG_TRUNC | MSG_DONTWAIT)
        if got < 0:
            if errno == EINTR:
                continue
            if errno != EAGAIN:
                failed[0] = errno
            break
        if got == 0:
            break
        dropped += got
    return dropped


def discard_acked(int fd, Py_ssize_t length) -> int:
    """Drop the first ``length`` bytes of TCP socket ``fd``'s receive queue (the guest acknowledged
    them) in one recv(MSG_TRUNC): Linux TCP frees them without copying, so no buffer is
    passed. Returns the bytes dropped (fewer: the queue held fewer); raises OSError."""
    cdef Py_ssize_t dropped
    cdef int failed = 0
    if length < 0:
        raise ValueError("negative discard")
    with nogil:
        dropped = drop_queued(fd, length, &failed)
    if failed:
        raise OSError(failed, strerror(failed))
    return dropped
