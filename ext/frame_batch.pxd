# The layout contract between the ring kernel that fills a FrameBatch (virtq.pyx,
# frame_batch.pxi) and the fast paths that read it in place (tcp_fast.pyx, udp_fast.pyx).
#
# Frame i is ``lengths[i]`` bytes at ``data + offsets[i]``, with its vnet word (vnet.pxd)
# in ``vnets[i]``; ``FrameBatch.arrays()`` hands out the four arrays in the order of this
# struct's fields. The fast paths live in packages that may not import the ring kernel,
# so they get the arrays, not the class; this struct is what both sides agree on.
#
# Compile-time only (inline, GIL-free).

from libc.stdint cimport uint8_t, uint32_t, uint64_t


cdef struct FrameArrays:
    const uint8_t *data      # the batch storage
    Py_ssize_t size          # its length in bytes
    const uint64_t *offsets
    const uint32_t *lengths
    const uint64_t *vnets


cdef inline const uint8_t *frame_at(const FrameArrays *batch, Py_ssize_t i,
                                    uint64_t *length) noexcept nogil:
    """Frame ``i`` and its length, or NULL if it does not lie inside the storage (never trust
    arrays handed in from Python)."""
    cdef uint64_t offset = batch.offsets[i]
    length[0] = batch.lengths[i]
    if offset > <uint64_t>batch.size or length[0] > <uint64_t>batch.size - offset:
        return NULL
    return batch.data + offset
