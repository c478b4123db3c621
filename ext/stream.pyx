# cython: language_level=3
"""The stream-mode kernel: QEMU's ``-netdev stream`` framing, a batch at a time.

On the stream each Ethernet frame is a 4-byte big-endian length followed by the frame.
``StreamReader`` reads the socket into a FrameBatch's own storage and records where the
whole frames lie in that batch's arrays (``FrameBatch.arrays()``: the frames are read once
and never copied), a read and its indexing in one call without the GIL; a partial frame
at the end stays for the next read. ``StreamSender`` writes the
frames queued for the guest with sendmsg(2), gathered where they lie (no copy into a
send buffer): each frame is two iovecs, its length from a small header array and the
frame itself. Lengths outside [14, 65549] mean the framing is lost: reported, never
trusted.

The Python face is vhostnet/stream.py; use that, not this module.
"""

from cpython.bytes cimport (PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_FromStringAndSize,
                            PyBytes_GET_SIZE)
from libc.errno cimport EAGAIN, EINTR, ENOBUFS, errno
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memmove

from netbytes cimport be32, put32
from sockets cimport MAX_IOV, MSG_DONTWAIT, MSG_NOSIGNAL, iovec, msghdr, recv, sendmsg

cdef enum:
    LENGTH_BYTES = 4
    MIN_FRAME = 14  # an Ethernet header
    MAX_FRAME = 65535 + 14  # the largest IP packet in an Ethernet frame
    # Frames one sendmsg gathers: two iovecs each, plus one for the tail of a cut frame.
    SEND_SLOTS = (MAX_IOV - 1) // 2

cdef enum SlotKind:
    SLOT_FRAME
    SLOT_OFFLOADED  # a (frame, vnet) entry: offload fields a stream guest cannot take
    SLOT_UNSENDABLE  # a length no stream frame can have, or a frame outside its batch

LENGTH_PREFIX = LENGTH_BYTES
SMALLEST_FRAME = MIN_FRAME
LARGEST_FRAME = MAX_FRAME
FRAMES_PER_SEND = SEND_SLOTS


cdef class StreamReader:
    """The receiving half of the framing, over one buffer (a FrameBatch's storage, bound
    once): bytes go in at ``end`` (``receive`` reads the socket there itself, or a caller
    writes into ``space()`` and reports ``filled``), and ``index`` records where the whole
    frames from ``start`` on lie in the batch's arrays, in place, without the GIL.

    ``receive`` is a whole read of a stream peer in one call (make room, recv(2), index):
    a guest sending on the stream wakes its back-end for a frame or two at a time, so what
    a wakeup costs outside the kernel is most of what a frame costs.
    """

    cdef uint8_t[::1] buffer_view
    cdef uint64_t[::1] offsets_view
    cdef uint32_t[::1] lengths_view
    cdef uint64_t[::1] vnets_view
    cdef object whole  # a memoryview of the buffer, for space()
    cdef uint8_t *data
    cdef Py_ssize_t size, capacity
    cdef readonly Py_ssize_t chunk, start, end

    def __init__(self, storage not None, uint64_t[::1] offsets not None,
                 uint32_t[::1] lengths not None, uint64_t[::1] vnets not None,
                 Py_ssize_t chunk):
        cdef uint8_t[::1] writable = storage
        if chunk <= 0 or writable.shape[0] < chunk + LENGTH_BYTES + MAX_FRAME:
            raise ValueError(f"a buffer of {writable.shape[0]} bytes cannot take a chunk of "
                             f"{chunk} and a largest frame")
        self.whole = memoryview(storage)
        self.buffer_view = writable
        self.offsets_view, self.lengths_view, self.vnets_view = offsets, lengths, vnets
        self.data = &writable[0]
        self.size = writable.shape[0]
        self.capacity = min(offsets.shape[0], lengths.shape[0], vnets.shape[0])
        self.chunk = chunk
        self.start = self.end = 0

    @property
    def buffered(self) -> int:
        return self.end - self.start

    cdef void _make_room(self) noexcept nogil:
        """Start again at 0 when everything was taken; move a partial frame (at most one
        frame's bytes) to the front when less than a quarter chunk is left after it."""
        if not self.start:
            return
        if self.start == self.end:
            self.start = self.end = 0
        elif self.size - self.end < self.chunk // 4:
            memmove(self.data, self.data + self.start, self.end - self.start)
            self.end -= self.start
            self.start = 0

    def space(self) -> memoryview:
        """Where to write next (never empty: a partial frame always leaves room for a chunk)."""
        self._make_room()
        return self.whole[self.end:]

    def filled(self, Py_ssize_t count) -> None:
        """``count`` bytes were written into ``space()``."""
        if count < 0 or count > self.size - self.end:
            raise ValueError(f"{count} bytes do not fit the {self.size - self.end} left")
        self.end += count

    def index(self) -> tuple:
        """Record the whole frames buffered (as many as the arrays hold) in entries 0 on of
        the arrays and move past them; returns (frames, the first bad length or -1).
        Nothing past a bad length is taken."""
        cdef Py_ssize_t count
        cdef long long bad
        with nogil:
            count = self._index(&bad)
        return count, bad

    def receive(self, int fd) -> tuple:
        """One recv(2) of ``fd`` (MSG_DONTWAIT) into the room left, then ``index``.

        Returns (bytes read: 0 at the end of the stream, the room the read had, frames
        indexed, the first bad length or -1, errno or 0); after an error nothing was read
        (EAGAIN: nothing to read; ENOBUFS: no room, whole frames were left buffered), but
        the frames buffered before are indexed all the same.
        """
        cdef ssize_t got
        cdef Py_ssize_t room, count
        cdef long long bad
        cdef int error = 0
        with nogil:
            self._make_room()
            room = self.size - self.end
            if room:
                while True:
                    got = recv(fd, self.data + self.end, room, MSG_DONTWAIT)
                    if got >= 0 or errno != EINTR:
                        break
                if got < 0:
                    error = errno
                    got = 0
            else:  # whole frames left buffered (a caller that did not take them all)
                got = 0
                error = ENOBUFS
            self.end += got
            count = self._index(&bad)
        return got, room, count, bad, error

    cdef Py_ssize_t _index(self, long long *bad) noexcept nogil:
        cdef Py_ssize_t position = self.start, count = 0
        cdef uint32_t length
        bad[0] = -1
        while self.end - position >= LENGTH_BYTES and count < self.capacity:
            length = be32(self.data + position)
            if length < MIN_FRAME or length > MAX_FRAME:
                bad[0] = length
                break
            if self.end - position - LENGTH_BYTES < <Py_ssize_t>length:
                break
            self.offsets_view[count] = <uint64_t>(position + LENGTH_BYTES)
            self.lengths_view[count] = length
            self.vnets_view[count] = 0
            count += 1
            position += LENGTH_BYTES + length
        self.start = position
        return count


cdef class StreamSender:
    """Sends the frames queued for a stream guest, many per sendmsg(2), from where they lie.

    ``send`` gathers entries from the front of a queue (a deque: frames as bytes or any
    buffer, ``(frame, vnet)`` entries, and entries of ``built_type``: frames ``start`` onward
    of a FrameBatch a C fast path built), sends them in one sendmsg, then takes off the
    queue exactly what went: whole entries popped, a built batch's ``start`` moved on (to
    its ``count`` when all of it went). A frame a short send cut is taken too, its unsent
    tail copied here (``cut_bytes``) and sent first next time, so frames are never
    reordered, lost or resent, and the queue's owner may reuse a batch once its frames
    are taken.
    """

    cdef iovec iovs[MAX_IOV]
    cdef uint8_t headers[SEND_SLOTS * LENGTH_BYTES]
    # One slot per frame gathered (sent or dropped), in queue order.
    cdef const uint8_t *slot_data[SEND_SLOTS]
    cdef uint32_t slot_length[SEND_SLOTS]
    cdef uint8_t slot_kind[SEND_SLOTS]
    cdef Py_ssize_t slot_index[SEND_SLOTS]  # the frame's index in its built batch
    # One per entry gathered: its first slot, its slot count, whether all of it is gathered.
    cdef Py_ssize_t entry_first[SEND_SLOTS]
    cdef Py_ssize_t entry_slots[SEND_SLOTS]
    cdef bint entry_whole[SEND_SLOTS]
    cdef uint8_t *cut  # the unsent tail of a cut frame (length prefix included)
    cdef Py_ssize_t cut_start, cut_end

    def __cinit__(self):
        self.cut = <uint8_t *>malloc(LENGTH_BYTES + MAX_FRAME)
        if self.cut is NULL:
            raise MemoryError()
        self.cut_start = self.cut_end = 0

    def __dealloc__(self):
        free(self.cut)

    @property
    def cut_bytes(self) -> int:
        """Bytes of a frame a short send cut, still to go before any other frame."""
        return self.cut_end - self.cut_start

    def send(self, int fd, pending not None, Py_ssize_t max_frames, Py_ssize_t max_bytes,
             built_type=None, list sent_frames=None) -> tuple:
        """One sendmsg of the cut tail (if any) and the frames at the front of ``pending``,
        up to ``max_frames`` (at most ``FRAMES_PER_SEND``) and about ``max_bytes``.

        ``sent_frames``: each frame taken is appended to it as bytes (for a capture).
        Returns (bytes sent, frames taken, ``(frame, vnet)`` entries dropped, frames dropped
        for a length no stream frame can have, error): error is 0 when everything gathered
        went, EAGAIN when the socket took less (wait until it is writable), else the errno
        of the failed send.
        """
        cdef Py_ssize_t slots = 0, entries = 0, niov = 0, wire = 0, first, index, count
        cdef Py_ssize_t length, limit = min(max_frames, <Py_ssize_t>SEND_SLOTS)
        cdef const uint8_t[::1] data
        cdef const uint64_t[::1] offsets
        cdef const uint32_t[::1] lengths
        cdef const uint8_t[::1] view
        cdef uint64_t offset, size
        held = []  # keeps every gathered buffer alive while the GIL is released
        if self.cut_end > self.cut_start:
            self.iovs[0].iov_base = self.cut + self.cut_start
            self.iovs[0].iov_len = self.cut_end - self.cut_start
            niov = 1
            wire = self.cut_end - self.cut_start
        for entry in pending:
            if slots >= limit or wire >= max_bytes or entries >= SEND_SLOTS:
                break
            first = slots
            self.entry_first[entries] = first
            self.entry_whole[entries] = True
            held.append(entry)
            if built_type is not None and type(entry) is built_type:
                storage, offsets_array, lengths_array, _vnets = entry.batch.arrays()
                data, offsets, lengths = storage, offsets_array, lengths_array
                count = entry.batch.count
                if count > offsets.shape[0] or count > lengths.shape[0]:
                    raise ValueError("a built batch counts more frames than its arrays hold")
                index = entry.start
                size = <uint64_t>data.shape[0]
                while index < count:
                    if slots >= limit or wire >= max_bytes:
                        self.entry_whole[entries] = False
                        break
                    offset, length = offsets[index], lengths[index]
                    self.slot_index[slots] = index
                    if offset > size or <uint64_t>length > size - offset:
                        self._drop(slots, SLOT_UNSENDABLE)
                    else:
                        wire += self._gather(slots, &niov, &data[0] + offset, length)
                    slots += 1
                    index += 1
            elif PyBytes_CheckExact(entry):
                wire += self._gather(slots, &niov, <const uint8_t *>PyBytes_AS_STRING(entry),
                                     PyBytes_GET_SIZE(entry))
                slots += 1
            elif type(entry) is tuple:
                self._drop(slots, SLOT_OFFLOADED)
                slots += 1
            else:
                view = memoryview(entry).cast("B")
                held.append(view)
                wire += self._gather(slots, &niov, &view[0] if view.shape[0] else NULL,
                                     view.shape[0])
                slots += 1
            self.entry_slots[entries] = slots - first
            entries += 1
        cdef ssize_t sent = 0
        cdef int error = 0
        cdef msghdr message
        if niov:
            message.msg_name = NULL
            message.msg_namelen = 0
            message.msg_iov = self.iovs
            message.msg_iovlen = niov
            message.msg_control = NULL
            message.msg_controllen = 0
            message.msg_flags = 0
            with nogil:
                while True:
                    sent = sendmsg(fd, &message, MSG_DONTWAIT | MSG_NOSIGNAL)
                    if sent >= 0 or errno != EINTR:
                        break
                if sent < 0:
                    error = errno  # EWOULDBLOCK is EAGAIN on Linux
                    sent = 0
                elif sent < wire:
                    error = EAGAIN
            if error and error != EAGAIN:
                return 0, 0, 0, 0, error
        taken = self._take(sent, slots, sent_frames)
        self._pop_taken(pending, entries, taken[0], built_type)
        del held
        return sent, taken[1], taken[2], taken[3], error

    cdef inline void _drop(self, Py_ssize_t slot, uint8_t kind) noexcept:
        self.slot_kind[slot] = kind
        self.slot_length[slot] = 0
        self.slot_data[slot] = NULL

    cdef inline Py_ssize_t _gather(self, Py_ssize_t slot, Py_ssize_t *niov,
                                   const uint8_t *frame, Py_ssize_t length) noexcept:
        """Slot ``slot`` is ``frame`` (two iovecs: its length, then it); returns its bytes on
        the wire, 0 for a length no stream frame can have (dropped)."""
        if length < MIN_FRAME or length > MAX_FRAME:
            self._drop(slot, SLOT_UNSENDABLE)
            return 0
        cdef uint8_t *header = self.headers + slot * LENGTH_BYTES
        put32(header, <uint64_t>length)
        self.slot_kind[slot] = SLOT_FRAME
        self.slot_length[slot] = <uint32_t>length
        self.slot_data[slot] = frame
        self.iovs[niov[0]].iov_base = header
        self.iovs[niov[0]].iov_len = LENGTH_BYTES
        self.iovs[niov[0] + 1].iov_base = <void *>frame
        self.iovs[niov[0] + 1].iov_len = length
        niov[0] += 2
        return LENGTH_BYTES + length

    cdef tuple _take(self, Py_ssize_t sent, Py_ssize_t slots, list sent_frames):
        """Account ``sent`` bytes: the cut tail first, then slot by slot; a frame the send
        cut leaves its tail here. Returns (slots taken, frames, offloaded, unsendable)."""
        cdef Py_ssize_t cut = self.cut_end - self.cut_start, slot = 0, frames = 0
        cdef Py_ssize_t offloaded = 0, unsendable = 0, wire, done
        if cut:
            if sent < cut:
                self.cut_start += sent
                return 0, 0, 0, 0
            sent -= cut
            self.cut_start = self.cut_end = 0
        while slot < slots:
            if self.slot_kind[slot] == SLOT_OFFLOADED:
                offloaded += 1
            elif self.slot_kind[slot] == SLOT_UNSENDABLE:
                unsendable += 1
            else:
                wire = LENGTH_BYTES + self.slot_length[slot]
                if not sent:
                    break
                done = min(sent, wire)
                sent -= done
                if done < wire:
                    self._keep_tail(slot, done)
                frames += 1
                if sent_frames is not None:
                    sent_frames.append(PyBytes_FromStringAndSize(
                        <const char *>self.slot_data[slot], self.slot_length[slot]))
            slot += 1
        return slot, frames, offloaded, unsendable

    cdef void _keep_tail(self, Py_ssize_t slot, Py_ssize_t done) noexcept:
        """Copy what a short send left of slot ``slot``'s wire bytes (prefix, frame)."""
        cdef Py_ssize_t length = self.slot_length[slot], end = 0
        if done < LENGTH_BYTES:
            memcpy(self.cut, self.headers + slot * LENGTH_BYTES + done, LENGTH_BYTES - done)
            end = LENGTH_BYTES - done
            done = 0
        else:
            done -= LENGTH_BYTES
        memcpy(self.cut + end, self.slot_data[slot] + done, length - done)
        self.cut_start = 0
        self.cut_end = end + length - done

    cdef void _pop_taken(self, pending, Py_ssize_t entries, Py_ssize_t taken, built_type):
        """Take off ``pending`` the entries whose slots are all taken; a built batch taken
        in part keeps its place with ``start`` after its last frame taken."""
        cdef Py_ssize_t entry = 0, whole = 0
        while whole < entries and self.entry_whole[whole] \
                and self.entry_first[whole] + self.entry_slots[whole] <= taken:
            whole += 1
        if built_type is not None:
            for front in pending:
                if entry >= whole:
                    if (entry < entries and taken > self.entry_first[entry]
                            and type(front) is built_type):
                        front.start = self.slot_index[taken - 1] + 1
                    break
                if type(front) is built_type:
                    front.start = front.batch.count  # all taken (the switch reads it)
                entry += 1
        # All at once where the queue can (the network's: one call, not one per frame).
        popleft_many = getattr(pending, "popleft_many", None)
        if popleft_many is not None:
            if whole:
                popleft_many(whole)
        else:
            for entry in range(whole):
                pending.popleft()
