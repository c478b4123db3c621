# Host -> guest TCP data straight into the guest's RX buffers (included by tcp_fast.pyx).
#
# One call executes one of the engine's Peek commands (``vhostnet.tcp.flow.Peek``: ``length``
# bytes ``offset`` bytes into the socket's receive queue) for the engine: the bytes are
# peeked (recvmsg MSG_PEEK at SO_PEEK_OFF, so they stay in the socket until the guest
# acknowledges them) into the RX buffers the ring kernel hands out (ext/rx_direct.pxd), past
# room for the virtio-net, Ethernet, IP and TCP headers, which are written after, with the
# checksum over the payload where it already lies. One copy, the kernel's. The engine stays
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

# A long peek (the guest's whole window) publishes what it delivered every this many bytes, so
# the guest starts on the first frames while the rest is copied (it is told as it asks).
cdef enum:
    PUBLISH_BYTES = 256 * 1024

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
    uint64_t published       # delivered bytes already made visible to the guest


cdef long direct_peek_work(void *ring, void *arg, long unused) noexcept nogil:
    cdef DirectPeek *p = <DirectPeek *>arg
    cdef RxRoom room
    cdef iovec iov[RXD_MAX_SPANS]
    cdef msghdr msg
    cdef int niov, attempts
    cdef ssize_t got
    cdef uint64_t want, skip, payload_sum
    cdef uint8_t headers[HEADERS_MAX]
    cdef uint64_t vnet
    cdef uint8_t gso
    cdef int peek_off = <int>p.offset
    p.status = PEEK_RING_FULL
    if setsockopt(p.fd, SOL_SOCKET, SO_PEEK_OFF, &peek_off, sizeof(int)) != 0:
        return 0  # the Python path peeks its own way
    while p.delivered < p.length:
        want = p.length - p.delivered
        if want > p.seg_size:
            want = p.seg_size
        if not p.api.take(ring, 12 + p.headers_len + want, 12 + p.headers_len + 1, &room):
            break
        skip = room.hdr_len + p.headers_len
        if room.capacity < skip + 1:
            break
        if want > room.capacity - skip:
            want = room.capacity - skip
        want = room_payload_iov(&room, skip, want, iov, &niov)
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
        payload_sum = iov_sum(iov, niov, <uint64_t>got) if p.checksum == CSUM_FULL else 0
        fill_headers(headers, p.ip_len, p.template, got, p.seq + <uint32_t>p.delivered,
                     <uint64_t>got < want or p.delivered + got == p.length, p.checksum,
                     payload_sum)
        if p.checksum == CSUM_PARTIAL:
            gso = VNET_GSO_NONE
            if <uint64_t>got > p.mss:
                gso = VNET_GSO_TCPV6 if p.ip_len == HDR_IP6_LEN else VNET_GSO_TCPV4
                p.large_segments += 1
            vnet = vnet_encode(VNET_F_NEEDS_CSUM, gso, p.mss if gso else 0,
                               HDR_ETH_LEN + p.ip_len, 16)
        elif p.checksum == CSUM_NONE:
            vnet = vnet_encode(VNET_F_DATA_VALID, 0, 0, 0, 0)
        else:
            vnet = 0
        if p.api.commit(ring, &room, headers, p.headers_len, vnet, p.headers_len + got) != 0:
            return 0  # refused (counted by the ring): the Python path sends these bytes
        p.delivered += got
        p.segments += 1
        if p.delivered - p.published >= PUBLISH_BYTES:
            p.api.finish(ring)
            p.published = p.delivered
        if <uint64_t>got < want:
            p.status = PEEK_DRAINED
            return 0
    if p.delivered == p.length:
        p.status = PEEK_DONE
    return 0


cdef class DirectPeeker:
    """Executes Peek commands straight into one RX ring (``vhostnet.tcp.fast`` uses it)."""

    cdef DirectPeek peek

    def run(self, ring, capsule, int fd, long long offset, Py_ssize_t length, bytes guest_mac,
            bytes gateway_mac, bytes src_ip, bytes dst_ip, int src_port, int dst_port,
            uint32_t seq, uint32_t ack, int window, Py_ssize_t seg_size, int mss,
            int checksum) -> tuple:
        """Peek ``length`` bytes at ``offset`` of socket ``fd`` into RX buffers of ``ring`` as
        ACK segments of up to ``seg_size`` bytes from ``src_ip``:``src_port`` to the guest,
        the first at ``seq``. Returns (status, delivered bytes, segments, segments longer than
        ``mss``); status DIRECT_DONE, DIRECT_DRAINED, DIRECT_EOF, DIRECT_RING_FULL, or -errno.
        ``ring``: the ring kernel's queue, ``capsule`` its ``rx_direct_handle``."""
        cdef DirectPeek *p = &self.peek
        cdef long result
        if len(guest_mac) != 6 or len(gateway_mac) != 6 or len(src_ip) not in (4, 16) \
                or len(dst_ip) != len(src_ip) or length < 0 or offset < 0 \
                or offset > 0x7FFFFFFF or not 0 < seg_size <= 0xFFFF - HDR_IP_LEN - HDR_TCP_LEN \
                or not 0 < mss <= 0xFFFF or checksum not in (CSUM_FULL, CSUM_NONE, CSUM_PARTIAL):
            raise ValueError("bad direct peek")
        api = <const RxDirectApi *>PyCapsule_GetPointer(capsule, b"vhostnet.rx_direct")
        if PyCapsule_GetContext(capsule) != <void *>ring:
            raise ValueError("the capsule belongs to another ring")
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
                      dst_port & 0xFFFF, ack, window if 0 <= window < 0xFFFF else 0xFFFF)
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


def discard_acked(int fd, Py_ssize_t length) -> int:
    """Drop the first ``length`` bytes of TCP socket ``fd``'s receive queue (the guest acknowledged
    them) in one recv(MSG_TRUNC): Linux TCP frees them without copying, so no buffer is
    passed. Returns the bytes dropped (fewer: the queue held fewer); raises OSError."""
    cdef Py_ssize_t dropped = 0
    cdef ssize_t got = 0
    cdef int rounds, failed = 0
    if length < 0:
        raise ValueError("negative discard")
    with nogil:
        for rounds in range(DISCARD_ROUNDS):
            if dropped >= length:
                break
            got = recv(fd, NULL, <size_t>(length - dropped), MSG_TRUNC | MSG_DONTWAIT)
            if got < 0:
                if errno == EINTR:
                    continue
                if errno != EAGAIN:
                    failed = errno
                break
            if got == 0:
                break
            dropped += got
    if failed:
        raise OSError(failed, strerror(failed))
    return dropped
