# The contract between the ring kernel (virtq.pyx, virtq_rxdirect.pxi) and a kernel that writes
# frames straight into a guest's RX buffers (tcp_fast.pyx: host TCP data peeked from the socket
# into the buffers, one copy).
#
# The ring kernel hands out a table of functions (``RxDirectApi``) in a PyCapsule
# (``_virtq.rx_direct_handle(queue)``; the capsule's context is the queue, which the caller
# keeps alive by holding the queue object). The kernels live in packages that may not import
# each other, so this struct is what both sides agree on. Compile-time only.
#
# One or more frames: ``take`` lists RX buffers (not yet taken from the ring) as host memory
# spans, chain by chain (a frame starts at a chain: the virtio-net header's ``hdr_len`` bytes
# first); the caller writes each frame's payload into the spans past its headers; ``commit``
# writes the virtio-net header and the frame's headers, marks every written page dirty while
# migration logs, and completes the chains the frame used, from the room's ``next_chain`` on
# (which it moves past them: the next commit is the next frame, in the same room). ``finish`` makes the completed chains visible and interrupts the guest once if it
# asks. A taken room that is not committed is simply left in the ring. All of it runs
# inside ``run`` (the SIGBUS guard, GIL released): guest memory can vanish under a copy.

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

cdef enum:
    RXD_MAX_SPANS = 128          # a room covers at most this many host memory pieces

cdef struct RxSpan:
    uint8_t *host
    uint64_t length

cdef struct RxRoom:
    uint64_t capacity            # bytes the spans hold, the virtio-net header included
    uint32_t hdr_len             # the ring's virtio-net header length (10 or 12)
    int nspans
    int nchains                  # chains listed (the last one may be cut short)
    int next_chain               # the chain the next commit's frame starts at
    uint64_t chain_bytes[RXD_MAX_SPANS]   # bytes listed per chain (its spans, in order)
    RxSpan spans[RXD_MAX_SPANS]

# ``work(ring, arg, n)`` as ``run`` calls it (the shape of the ring kernel's guarded calls).
ctypedef long (*rxd_work_fn)(void *ring, void *arg, long n) noexcept nogil

cdef struct RxDirectApi:
    # List buffers for a frame of up to ``wanted`` bytes (header included): 1 if they hold at
    # least ``least`` bytes, 0 if not (ring empty or short, not started, broken).
    int (*take)(void *ring, uint64_t wanted, uint64_t least, RxRoom *room) noexcept nogil
    # Complete the frame that starts at the room's ``next_chain``: ``frame_len`` bytes after its
    # virtio-net header, of which the first ``headers_len`` are copied from ``headers``
    # (Ethernet/IP/TCP) and the rest were written by the caller. ``vnet``: its offload word (vnet.pxd). 0, or a refusal
    # (offload not negotiated: counted, nothing completed).
    int (*commit)(void *ring, RxRoom *room, const uint8_t *headers, uint32_t headers_len,
                  uint64_t vnet, uint64_t frame_len) noexcept nogil
    # Publish the completed chains and notify the guest if it asks; True if interrupted.
    bint (*finish)(void *ring) noexcept nogil
    # Run ``work(ring, arg, n)`` with the GIL released under the SIGBUS guard (call with the
    # GIL held); a fault breaks the queue. Returns work's result, or -1 after a fault.
    long (*run)(void *ring, rxd_work_fn work, void *arg, long n) noexcept


# ---- helpers for the writers (inline: each kernel compiles its own copy) --------------------

from sockets cimport iovec
from netbytes cimport fold, sum_bytes


cdef inline uint64_t room_payload_iov(const RxRoom *room, uint64_t skip, uint64_t count,
                                      iovec *iov, int *niov) noexcept nogil:
    """Point ``iov`` (RXD_MAX_SPANS entries) at ``count`` bytes of the room after its first
    ``skip``; returns the bytes covered (less when the room is shorter)."""
    cdef int i
    cdef uint64_t covered = 0, start, piece
    niov[0] = 0
    for i in range(room.nspans):
        if covered >= count:
            break
        if skip >= room.spans[i].length:
            skip -= room.spans[i].length
            continue
        start = skip
        skip = 0
        piece = room.spans[i].length - start
        if piece > count - covered:
            piece = count - covered
        iov[niov[0]].iov_base = room.spans[i].host + start
        iov[niov[0]].iov_len = piece
        niov[0] += 1
        covered += piece
    return covered


cdef inline uint64_t iov_sum(const iovec *iov, int niov, uint64_t length) noexcept nogil:
    """The RFC 1071 sum (unfolded) of the first ``length`` bytes ``iov`` points at, pieces that
    start at an odd offset byte-swapped."""
    cdef uint64_t total = 0, offset = 0, piece
    cdef uint16_t folded
    cdef int k
    for k in range(niov):
        if offset >= length:
            break
        piece = iov[k].iov_len if iov[k].iov_len < length - offset else length - offset
        if offset & 1:
            folded = fold(sum_bytes(<const uint8_t *>iov[k].iov_base, piece))
            total += ((folded & 0xFF) << 8) | (folded >> 8)
        else:
            total += sum_bytes(<const uint8_t *>iov[k].iov_base, piece)
        offset += piece
    return total
