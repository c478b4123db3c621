# FrameBatch: the preallocated frame buffer the kernel fills and drains (included by virtq.pyx).

cdef class FrameBatch:
    """Preallocated storage for up to ``capacity_frames`` Ethernet frames (no virtio-net header)."""

    cdef object _storage
    cdef object _offsets_store
    cdef object _lengths_store
    cdef object _vnet_store
    cdef uint8_t *data
    cdef uint64_t *offsets
    cdef uint32_t *lengths
    cdef uint64_t *vnets            # per frame: the virtio-net header's offload fields (virtq_offload.pxi)
    cdef readonly Py_ssize_t capacity_frames
    cdef readonly Py_ssize_t buffer_bytes
    cdef Py_ssize_t n
    cdef uint64_t fill

    def __cinit__(self, Py_ssize_t capacity_frames=256, Py_ssize_t buffer_bytes=256 * 65562):
        if capacity_frames <= 0 or buffer_bytes <= 0:
            raise ValueError("FrameBatch needs a positive frame capacity and buffer size")
        self._storage = np.empty(buffer_bytes, dtype=np.uint8)
        self._offsets_store = np.zeros(capacity_frames, dtype=np.uint64)
        self._lengths_store = np.zeros(capacity_frames, dtype=np.uint32)
        self._vnet_store = np.zeros(capacity_frames, dtype=np.uint64)
        cdef uint8_t[::1] storage = self._storage
        cdef uint64_t[::1] offsets = self._offsets_store
        cdef uint32_t[::1] lengths = self._lengths_store
        cdef uint64_t[::1] vnet = self._vnet_store
        self.data = &storage[0]
        self.offsets = &offsets[0]
        self.lengths = &lengths[0]
        self.vnets = &vnet[0]
        self.capacity_frames = capacity_frames
        self.buffer_bytes = buffer_bytes
        self.n = 0
        self.fill = 0

    cdef inline bint room_for(self, uint64_t length) noexcept nogil:
        return self.n < self.capacity_frames and self.fill + length <= <uint64_t>self.buffer_bytes

    cdef inline void commit(self, uint32_t length, uint64_t vnet) noexcept nogil:
        """Record a frame of ``length`` bytes already written at ``data + fill``."""
        self.offsets[self.n] = self.fill
        self.lengths[self.n] = length
        self.vnets[self.n] = vnet
        self.fill += length
        self.n += 1

    def append(self, frame, uint64_t vnet=0) -> bool:
        """Copy ``frame`` in; False when the batch is full. Frames over 65562 bytes raise ValueError.

        ``vnet`` carries the frame's virtio-net offload fields (0: none; see ``vnet()``).
        """
        cdef const uint8_t[::1] view = memoryview(frame).cast("B")
        cdef Py_ssize_t length = view.shape[0]
        if length > MAX_FRAME_BYTES_C:
            raise ValueError(f"frame of {length} bytes exceeds the {MAX_FRAME_BYTES_C}-byte limit")
        if not self.room_for(length):
            return False
        if length:
            memcpy(self.data + self.fill, &view[0], length)
        self.commit(<uint32_t>length, vnet)
        return True

    def frame(self, Py_ssize_t i) -> memoryview:
        """Read-only view of frame ``i``; valid until ``clear()``."""
        self._check_index(i)
        start = self.offsets[i]
        return memoryview(self._storage)[start:start + self.lengths[i]].toreadonly()

    def vnet(self, Py_ssize_t i) -> int:
        """Frame ``i``'s offload word: flags | gso_type << 8 | gso_size << 16 | csum_start << 32
        | csum_offset << 48 (flags: 1 partial checksum, 2 checksums verified)."""
        self._check_index(i)
        return self.vnets[i]

    def arrays(self) -> tuple:
        """The batch's own (storage uint8, offsets uint64, lengths uint32, vnet uint64) arrays,
        for other C kernels to read frames in place; valid for the life of the batch."""
        return (self._storage, self._offsets_store, self._lengths_store, self._vnet_store)

    def take_written(self, Py_ssize_t count) -> None:
        """Make the first ``count`` entries of ``arrays()``, written there in place by another
        kernel (the stream framer), the batch's frames; ValueError if one lies outside the
        storage or exceeds the frame limit."""
        cdef Py_ssize_t i
        cdef uint64_t end, fill = 0
        if count < 0 or count > self.capacity_frames:
            raise ValueError(f"{count} frames outside a batch of {self.capacity_frames}")
        for i in range(count):
            end = self.offsets[i] + self.lengths[i]
            if (self.lengths[i] > MAX_FRAME_BYTES_C or self.offsets[i] > <uint64_t>self.buffer_bytes
                    or end > <uint64_t>self.buffer_bytes):
                raise ValueError(f"frame {i} lies outside the batch storage")
            if end > fill:
                fill = end
        self.n = count
        self.fill = fill

    def length(self, Py_ssize_t i) -> int:
        self._check_index(i)
        return self.lengths[i]

    cdef _check_index(self, Py_ssize_t i):
        if i < 0 or i >= self.n:
            raise IndexError(f"frame index {i} out of range (batch holds {self.n})")

    @property
    def count(self) -> int:
        return self.n

    def __len__(self) -> int:
        return self.n

    def clear(self) -> None:
        self.n = 0
        self.fill = 0
