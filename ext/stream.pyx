# cython: language_level=3
"""The stream-mode kernel: QEMU's ``-netdev stream`` framing, a batch at a time.

On the stream each Ethernet frame is a 4-byte big-endian length followed by the frame.
``parse_frames`` cuts whole frames out of a receive buffer into a FrameBatch's arrays
(the layout of ext/frame_batch.pxd, handed out by ``FrameBatch.arrays()``) without the
GIL; a partial frame at the end stays for the next read. ``encode_frames`` joins the
frames queued for the guest into one send buffer. Lengths outside [14, 65549] mean the
framing is lost: reported, never trusted.

The Python face is vhostnet/stream.py; use that, not this module.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE, PyBytes_CheckExact
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.string cimport memcpy

cdef enum:
    LENGTH_BYTES = 4
    MIN_FRAME = 14  # an Ethernet header
    MAX_FRAME = 65535 + 14  # the largest IP packet in an Ethernet frame

LENGTH_PREFIX = LENGTH_BYTES
SMALLEST_FRAME = MIN_FRAME
LARGEST_FRAME = MAX_FRAME


cdef inline uint32_t load_be32(const uint8_t *p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]


cdef inline void store_be32(uint8_t *p, uint32_t value) noexcept nogil:
    p[0] = <uint8_t>(value >> 24)
    p[1] = <uint8_t>(value >> 16)
    p[2] = <uint8_t>(value >> 8)
    p[3] = <uint8_t>value


def parse_frames(const uint8_t[::1] buffer not None, Py_ssize_t start, Py_ssize_t end,
                 uint8_t[::1] storage not None, uint64_t[::1] offsets not None,
                 uint32_t[::1] lengths not None, uint64_t[::1] vnets not None) -> tuple:
    """Copy the whole frames of ``buffer[start:end]`` to the batch arrays, from frame 0 on,
    until the batch's frames or storage run out.

    Returns (position after the last frame taken, frames taken, bytes of storage used,
    the first bad length or -1). Nothing past a bad length is taken.
    """
    if start < 0 or end > buffer.shape[0] or start > end:
        raise ValueError(f"range {start}..{end} outside the buffer of {buffer.shape[0]} bytes")
    cdef Py_ssize_t capacity = min(offsets.shape[0], lengths.shape[0], vnets.shape[0])
    cdef uint64_t room = <uint64_t>storage.shape[0]
    cdef const uint8_t *data = &buffer[0] if buffer.shape[0] else NULL
    cdef uint8_t *out = &storage[0] if storage.shape[0] else NULL
    cdef Py_ssize_t position = start, count = 0
    cdef uint64_t fill = 0
    cdef uint32_t length
    cdef long long bad = -1
    with nogil:
        while end - position >= LENGTH_BYTES and count < capacity:
            length = load_be32(data + position)
            if length < MIN_FRAME or length > MAX_FRAME:
                bad = length
                break
            if end - position - LENGTH_BYTES < <Py_ssize_t>length or fill + length > room:
                break
            memcpy(out + fill, data + position + LENGTH_BYTES, length)
            offsets[count] = fill
            lengths[count] = length
            vnets[count] = 0
            fill += length
            count += 1
            position += LENGTH_BYTES + length
    return position, count, fill, bad


def encode_frames(pending not None, uint8_t[::1] out not None, Py_ssize_t max_frames,
                  Py_ssize_t max_bytes, built_type=None) -> tuple:
    """Move frames from the front of ``pending`` (a deque of bytes) into ``out``, each after
    its length, while fewer than ``max_frames`` frames and ``max_bytes`` bytes are in.

    An entry of ``built_type`` (``network.GuestBatch``: frames ``start`` onward of a
    FrameBatch built by a C fast path) is copied from the batch's arrays, no Python object
    per frame; one the limits cut stays at the front with its ``start`` moved on.

    Returns (bytes written, frames written, ``(frame, vnet)`` entries dropped (offload fields
    a stream guest cannot take), frames dropped for a length no stream frame can have).
    """
    cdef Py_ssize_t size = out.shape[0], used = 0, frames = 0, offloaded = 0, unsendable = 0
    cdef Py_ssize_t length
    cdef uint8_t *base = &out[0] if size else NULL
    cdef const uint8_t[::1] view
    cdef const uint8_t *source
    popleft = pending.popleft
    while pending and frames < max_frames and used < max_bytes:
        frame = pending[0]
        if built_type is not None and type(frame) is built_type:
            if _encode_built(frame, base, size, max_frames, max_bytes, &used, &frames,
                             &unsendable):
                popleft()
            continue
        popleft()
        if PyBytes_CheckExact(frame):
            source = <const uint8_t *>PyBytes_AS_STRING(frame)
            length = PyBytes_GET_SIZE(frame)
        elif type(frame) is tuple:
            offloaded += 1
            continue
        else:
            view = memoryview(frame).cast("B")
            length = view.shape[0]
            source = &view[0] if length else NULL
        if not _put_frame(base, size, &used, source, length):
            unsendable += 1
            continue
        frames += 1
    return used, frames, offloaded, unsendable


cdef inline bint _put_frame(uint8_t *base, Py_ssize_t size, Py_ssize_t *used,
                            const uint8_t *source, Py_ssize_t length) noexcept nogil:
    """One frame after its length at ``base + used``; False (nothing written) for a length no
    stream frame can have or one past the buffer."""
    if length < MIN_FRAME or length > MAX_FRAME or used[0] + LENGTH_BYTES + length > size:
        return False
    store_be32(base + used[0], <uint32_t>length)
    memcpy(base + used[0] + LENGTH_BYTES, source, length)
    used[0] += LENGTH_BYTES + length
    return True


cdef bint _encode_built(entry, uint8_t *base, Py_ssize_t size, Py_ssize_t max_frames,
                        Py_ssize_t max_bytes, Py_ssize_t *used, Py_ssize_t *frames,
                        Py_ssize_t *unsendable) except -1:
    """The frames of a built batch entry into the buffer; True when all of them are in."""
    storage, offsets_array, lengths_array, _vnets = entry.batch.arrays()
    cdef const uint8_t[::1] data = storage
    cdef const uint64_t[::1] offsets = offsets_array
    cdef const uint32_t[::1] lengths = lengths_array
    cdef Py_ssize_t index = entry.start, count = entry.batch.count
    cdef uint64_t offset, length
    if count > offsets.shape[0] or count > lengths.shape[0]:
        raise ValueError("a built batch counts more frames than its arrays hold")
    with nogil:
        while index < count and frames[0] < max_frames and used[0] < max_bytes:
            offset = offsets[index]
            length = lengths[index]
            index += 1
            if offset > <uint64_t>data.shape[0] or length > <uint64_t>data.shape[0] - offset \
                    or not _put_frame(base, size, used, &data[0] + offset, <Py_ssize_t>length):
                unsendable[0] += 1
                continue
            frames[0] += 1
    entry.start = index
    return index >= count
