# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Guest -> host TCP payload of established flows, in C with the GIL released.

``TcpEngine`` (Python) stays the authority. The Python face
(``vhostnet.tcp.fast``) registers a flow here only while it is in the
simple state (established, nothing buffered for the host, no FIN either way),
with the wire values a segment must carry to change nothing in the engine but
``rcv_nxt``: the next expected sequence number, the acknowledgement number and
the raw window the engine last took from the guest.

For a TX batch, ``take_batch`` walks the frames once. A frame is taken only if
it is a plain TCP segment of a registered flow (IPv4 without options or fragments,
or IPv6 without extension headers: TCP right after the fixed header), flags ACK or
ACK|PSH, starting exactly at the expected sequence number, with no SACK block, an
acceptable ack and window (below), and a checksum that verifies over the pseudo-header
of its family (or was left partial by the guest's driver, virtio NEEDS_CSUM). Consecutive
taken frames of one flow are written with one sendmsg(2) straight from the batch
buffer. What the kernel does not take is not acknowledged: the guest sends it
again, as after a partial write on the Python path. A frame not taken, and every
later frame of the same flow in that batch (to keep the order), is left to
the Python stack.

Acks (the guest's pure ACKs and window updates, and the ack of its data segments): the
engine publishes with each flow the ack and raw window it last took and the highest ack
it accepts (``snd_max`` on the wire). A frame whose ack lies in [newest ack, ack limit]
with a non-zero window is taken and only its ack and window are kept: the later ACK of a
batch supersedes the earlier ones. What the engine would count or treat on its own goes
to Python: a duplicate ACK (same ack and window, a pure ACK while data is in flight: the
engine counts them for fast retransmission), an older ack, an ack beyond the limit, a
zero window. Nothing stays here between batches: the newest ack of each flow goes to the
engine (``take_activity``) before any frame of the batch reaches the Python stack.

What Python must learn comes back per flow, not per frame (``take_activity``):
bytes and segments written, whether the host socket filled up, and the pure ACKs taken
with the newest ack and window.

The Python face is ``vhostnet.tcp.fast``; use that.
"""

from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free
from libc.string cimport memcmp, memcpy, memset, strerror
from libc.errno cimport EAGAIN, EFAULT, EINTR, errno

from frame_batch cimport FrameArrays, frame_at
from netbytes cimport be16, be32, pseudo_header_sum, pseudo_header_sum6, sum_bytes, sum_verifies
from vhostnet.wire._flow_table cimport TABLE_SLOTS, FlowIndex
from sockets cimport MAX_IOV, MSG_DONTWAIT, MSG_NOSIGNAL, iovec, msghdr, sendmsg
from tcp_segment cimport flags_valid, has_sack, options_valid, syn_options
from vnet cimport vnet_partial_csum_at

cdef enum:
    ETH_LEN = 14
    IP_LEN = 20
    IP6_LEN = 40
    TCP_LEN = 20
    PROTO_TCP = 6
    TCP_CHECKSUM_OFFSET = 16
    FLAG_FIN = 0x01
    FLAG_SYN = 0x02
    FLAG_RST = 0x04
    FLAG_PSH = 0x08
    FLAG_ACK = 0x10

# Why a guest TCP frame went to the Python stack (index into TcpFastPath.fallback).
cdef enum:
    FB_NOT_PLAIN = 0     # IPv4 options or fragment, bad IP header, bad TCP header or options
    FB_NOT_REGISTERED
    FB_FLAGS             # anything but ACK or ACK|PSH
    FB_OUT_OF_ORDER
    FB_CHECKSUM
    FB_SACK              # a SACK option: the engine reads the segment itself
    FB_DUP_ACK           # a pure ACK repeating the newest ack and window with data in flight
    FB_ACK_OLD           # an ack below the newest one
    FB_ACK_UNSENT        # an ack beyond what the engine sent (its snd_max)
    FB_ZERO_WINDOW       # the guest closes its window (or probes a closed one)
    FB_AFTER_FALLBACK    # an earlier frame of the flow in this batch went to Python
    FB_HOST_BUSY         # the host socket took nothing (EAGAIN) or failed
    FB_COUNT

FALLBACK_NAMES = ("not_plain", "not_registered", "flags", "out_of_order", "checksum", "sack",
                  "dup_ack", "ack_old", "ack_unsent", "zero_window", "after_fallback",
                  "host_busy")

include "tcp_fast_parse.pxi"  # segments not taken, parsed for the engine


cdef struct FlowSlot:          # the flow in slot i of the FlowIndex (vhostnet/wire/_flow_table.pxd)
    int fd
    uint32_t seq_next        # host byte order: the guest sequence number the engine expects
    uint32_t ack             # host byte order: the ack number the engine last took, then
                             # the newest one taken in this batch
    uint16_t window          # the raw (unscaled) window, likewise
    uint32_t ack_limit       # the highest ack the engine accepts (its snd_max on the wire)
    bint ack_changed         # ack or window differ from what the engine last took
    bint ipv6                # the flow's family (its frames count as IPv6 ones)
    bint active              # noted for take_activity() (touched in the FlowIndex)
    uint32_t stopped_in      # batch number in which the flow fell back to Python
    uint64_t bytes           # since the last take_activity()
    uint64_t segments
    uint64_t acks            # pure ACKs taken since the last take_activity()
    bint host_full           # a write was partial since the last take_activity()


cdef struct AckState:          # a flow's ack fields before a frame (restored if it is not taken)
    uint32_t ack
    uint16_t window
    bint changed


cdef class TcpFastPath:
    """Registered established TCP flows and the batch writer; see the module docstring."""

    cdef FlowIndex index
    cdef FlowSlot *slots
    cdef uint32_t batch_no
    # The run of taken frames of one flow not yet written: iovecs plus their frame indices.
    cdef iovec iovs[MAX_IOV]
    cdef Py_ssize_t iov_frame[MAX_IOV]
    cdef AckState iov_acks[MAX_IOV]    # the flow's ack fields before each frame of the run
    cdef int niov
    cdef int pending_slot
    cdef uint32_t pending_seq      # seq_next of the pending flow before the run
    cdef Py_ssize_t taken          # frames taken in the current batch
    cdef readonly Py_ssize_t last_taken6    # of the last take_batch's frames, those on IPv6
    cdef readonly Py_ssize_t last_acks      # of the last take_batch's frames, the pure ACKs
    cdef readonly Py_ssize_t last_acks6     # and those of them on IPv6
    cdef uint64_t fallback_counts[FB_COUNT]
    cdef readonly uint64_t partial_writes
    cdef uint8_t gateway_mac[6]
    cdef uint8_t guest_mac[6]
    cdef bint have_guest_mac
    cdef int parse_families                 # PARSE_IPV4 | PARSE_IPV6 (tcp_fast_parse.pxi)
    cdef Py_ssize_t parsed                  # frames marked PARSED in the current batch
    cdef readonly Py_ssize_t last_parsed6   # of the last take_batch's parsed frames, on IPv6
    cdef readonly list last_parsed          # the last take_batch's ParsedSegments, in order

    def __cinit__(self):
        self.index = FlowIndex()
        self.slots = <FlowSlot *>calloc(TABLE_SLOTS, sizeof(FlowSlot))
        if self.slots == NULL:
            raise MemoryError()
        self.pending_slot = -1

    def __dealloc__(self):
        free(self.slots)

    @property
    def flows(self) -> int:
        return self.index.count

    def fallbacks(self) -> dict:
        """Frames left to Python since the start, by reason (``FALLBACK_NAMES``)."""
        return {FALLBACK_NAMES[i]: self.fallback_counts[i] for i in range(FB_COUNT)}

    def set_macs(self, bytes gateway_mac, guest_mac) -> None:
        """The frames to take: from ``guest_mac`` (None: take none) to ``gateway_mac``."""
        memcpy(self.gateway_mac, <const char *>gateway_mac, 6)
        self.have_guest_mac = guest_mac is not None
        if self.have_guest_mac:
            memcpy(self.guest_mac, <const char *><bytes>guest_mac, 6)

    def set_parse(self, bint ipv4, bint ipv6) -> None:
        """Which families' segments not taken come back parsed (``last_parsed``); none at first."""
        self.parse_families = (PARSE_IPV4 if ipv4 else 0) | (PARSE_IPV6 if ipv6 else 0)

    def contains(self, int64_t flow_id) -> bool:
        return self.index.slot_of(flow_id) >= 0

    def set(self, int64_t flow_id, bytes guest_ip, int guest_port, bytes remote_ip,
            int remote_port, int fd, uint32_t seq_next, uint32_t ack, int window,
            uint32_t ack_limit) -> bool:
        """Register a flow, or update a registered one; False if the table is full.

        Addresses: 4 bytes each (IPv4) or 16 (IPv6). ``seq_next``, ``ack``, ``window``
        (raw, unscaled) and ``ack_limit`` (the highest ack the engine accepts; ``ack`` when
        nothing is in flight) are wire values, host byte order.
        """
        if fd < 0 or not 0 <= window <= 0xFFFF:
            raise ValueError("bad TCP fast-path flow")
        cdef int index = self.index.slot_of(flow_id)
        if index < 0:
            index = self.index.add(flow_id, guest_ip, guest_port, remote_ip, remote_port)
            if index < 0:
                return False
            memset(&self.slots[index], 0, sizeof(FlowSlot))
            self.slots[index].ipv6 = len(guest_ip) == 16
        self.slots[index].fd = fd
        self.slots[index].seq_next = seq_next
        self.slots[index].ack = ack
        self.slots[index].window = <uint16_t>window
        self.slots[index].ack_limit = ack_limit
        self.slots[index].ack_changed = False
        return True

    def set_ack_limit(self, int64_t flow_id, uint32_t ack_limit) -> None:
        """A registered flow's new ack limit after a round that moved nothing else the entry
        mirrors (``TcpFastPath.stream_round``: the engine took the newest ack and window this
        entry holds, and sent more); an unregistered flow is left alone."""
        cdef int index = self.index.slot_of(flow_id)
        if index >= 0:
            self.slots[index].ack_limit = ack_limit

    def remove(self, int64_t flow_id) -> tuple:
        """Forget a flow (before its socket closes); its unreported (bytes, segments)."""
        cdef int index = self.index.discard(flow_id)
        if index < 0:
            return (0, 0)
        cdef FlowSlot *slot = &self.slots[index]
        result = (slot.bytes, slot.segments)
        memset(slot, 0, sizeof(FlowSlot))
        return result

    def take_activity(self) -> list:
        """(flow_id, bytes, segments, host_full, acks, newest) of every flow that wrote or took
        an ack since the last call: ``acks`` pure ACKs were taken, ``newest`` is the
        (ack, raw window) for the engine (None: nothing to tell it)."""
        active = []
        cdef FlowSlot *slot
        cdef int index
        for index in self.index.take_touched():
            slot = &self.slots[index]
            if self.index.flow_id(index) > 0 and slot.active:
                newest = (slot.ack, slot.window) if slot.acks or slot.ack_changed else None
                active.append((self.index.flow_id(index), slot.bytes, slot.segments,
                               bool(slot.host_full), slot.acks, newest))
                slot.bytes = 0
                slot.segments = 0
                slot.acks = 0
                slot.host_full = False
                slot.ack_changed = False
                slot.active = False
        return active

    def take_batch(self, const uint8_t[::1] data, const uint64_t[::1] offsets,
                   const uint32_t[::1] lengths, const uint64_t[::1] vnets, uint8_t[::1] handled,
                   Py_ssize_t count) -> int:
        """Write the payload of in-order segments of registered flows among the first ``count`` frames.

        Frames with ``handled[i]`` already non-zero are skipped (another fast path took them);
        ``handled[i]`` is set to 1 for each frame taken, to 2 for each segment parsed for the
        engine (``last_parsed``, tcp_fast_parse.pxi). Returns how many were taken.
        """
        cdef Py_ssize_t taken_frames, i
        cdef uint64_t length
        cdef FrameArrays batch
        if count > offsets.shape[0] or count > lengths.shape[0] or count > vnets.shape[0] \
                or count > handled.shape[0]:
            raise ValueError("count exceeds the batch arrays")
        self.last_taken6 = 0
        self.last_acks = 0
        self.last_acks6 = 0
        self.last_parsed6 = 0
        self.parsed = 0
        self.last_parsed = []
        if (count <= 0 or (self.index.count == 0 and not self.parse_families)
                or not self.have_guest_mac or data.shape[0] == 0):
            return 0
        batch.data = &data[0]
        batch.size = data.shape[0]
        batch.offsets = &offsets[0]
        batch.lengths = &lengths[0]
        batch.vnets = &vnets[0]
        with nogil:
            taken_frames = self._take_batch(&batch, &handled[0], count)
        if self.parsed:
            for i in range(count):
                if handled[i] == HANDLED_PARSED:
                    self.last_parsed.append(parsed_segment(i, frame_at(&batch, i, &length)))
        return taken_frames

    cdef Py_ssize_t _take_batch(self, const FrameArrays *batch, uint8_t *handled,
                                Py_ssize_t count) noexcept nogil:
        cdef Py_ssize_t i
        cdef int slot
        cdef const uint8_t *frame
        cdef const uint8_t *ip
        cdef const uint8_t *tcp
        cdef uint64_t length, total, tcp_len, header_len, payload_len
        cdef bint ipv6
        cdef FlowSlot *flow
        cdef AckState before
        self.batch_no += 1
        self.taken = 0
        self.niov = 0
        self.pending_slot = -1
        for i in range(count):
            if handled[i]:
                continue
            frame = frame_at(batch, i, &length)
            if frame == NULL:
                continue
            # Lengths first: every field read below lies inside these bounds.
            if length < ETH_LEN + IP_LEN + TCP_LEN:
                continue
            if memcmp(frame, self.gateway_mac, 6) != 0 or memcmp(frame + 6, self.guest_mac, 6) != 0:
                continue
            ip = frame + ETH_LEN
            if frame[12] == 0x08 and frame[13] == 0x00:
                if ip[9] != PROTO_TCP:
                    continue
                # Plain IPv4 only: no options, no fragment, a header that verifies.
                total = be16(ip + 2)
                if (ip[0] != 0x45 or (be16(ip + 6) & 0x3FFF) != 0 or total < IP_LEN + TCP_LEN
                        or total > length - ETH_LEN or not sum_verifies(sum_bytes(ip, IP_LEN))):
                    self.fallback_counts[FB_NOT_PLAIN] += 1
                    continue
                ipv6 = False
                tcp = ip + IP_LEN
                tcp_len = total - IP_LEN
            elif frame[12] == 0x86 and frame[13] == 0xDD:
                # Plain IPv6 only: TCP right after the fixed header (no extension headers).
                if length < ETH_LEN + IP6_LEN + TCP_LEN or ip[6] != PROTO_TCP:
                    continue
                tcp_len = be16(ip + 4)  # the payload length: all of it is the segment
                if ip[0] >> 4 != 6 or tcp_len < TCP_LEN or tcp_len > length - ETH_LEN - IP6_LEN:
                    self.fallback_counts[FB_NOT_PLAIN] += 1
                    continue
                ipv6 = True
                tcp = ip + IP6_LEN
            else:
                continue
            header_len = (tcp[12] >> 4) * 4
            if header_len < TCP_LEN or header_len > tcp_len \
                    or not options_valid(tcp + TCP_LEN, header_len - TCP_LEN):
                self.fallback_counts[FB_NOT_PLAIN] += 1
                continue
            slot = self.index.find6(ip, tcp) if ipv6 else self.index.find(ip, tcp)
            if slot < 0:
                if self.index.count:  # (as when no flow is registered and nothing was parsed)
                    self.fallback_counts[FB_NOT_REGISTERED] += 1
                self.mark_parsed(i, ip, tcp, tcp_len, batch.vnets[i], ipv6, handled)
                continue
            flow = &self.slots[slot]
            if flow.stopped_in == self.batch_no:
                self.fallback_counts[FB_AFTER_FALLBACK] += 1
                self.mark_parsed(i, ip, tcp, tcp_len, batch.vnets[i], ipv6, handled)
                continue
            payload_len = tcp_len - header_len
            if payload_len == 0 and slot == self.pending_slot:
                # A pure ACK after data of its flow: the data is written first, so a short
                # write still leaves this ACK to Python behind the unwritten frames.
                self.write_pending(handled)
                if flow.stopped_in == self.batch_no:
                    self.fallback_counts[FB_AFTER_FALLBACK] += 1
                    self.mark_parsed(i, ip, tcp, tcp_len, batch.vnets[i], ipv6, handled)
                    continue
            before.ack = flow.ack
            before.window = flow.window
            before.changed = flow.ack_changed
            if not self.acceptable(flow, ip, tcp, tcp_len, header_len, batch.vnets[i], ipv6):
                flow.stopped_in = self.batch_no
                if slot == self.pending_slot:
                    self.write_pending(handled)
                self.mark_parsed(i, ip, tcp, tcp_len, batch.vnets[i], ipv6, handled)
                continue
            if payload_len == 0:
                flow.acks += 1
                self.note_active(slot, flow)
                handled[i] = 1
                self.taken += 1
                self.last_acks += 1
                if ipv6:
                    self.last_taken6 += 1
                    self.last_acks6 += 1
                continue
            if slot != self.pending_slot or self.niov == MAX_IOV:
                self.write_pending(handled)
                self.pending_slot = slot
                self.pending_seq = flow.seq_next
            self.iovs[self.niov].iov_base = <void *>(tcp + header_len)
            self.iovs[self.niov].iov_len = payload_len
            self.iov_frame[self.niov] = i
            self.iov_acks[self.niov] = before
            self.niov += 1
            flow.seq_next += <uint32_t>payload_len  # the next frame must follow this one
            handled[i] = 1
        self.write_pending(handled)
        return self.taken

    cdef bint acceptable(self, FlowSlot *flow, const uint8_t *ip, const uint8_t *tcp,
                         uint64_t tcp_len, uint64_t header_len, uint64_t vnet,
                         bint ipv6) noexcept nogil:
        """True if the engine would only append the payload (advance rcv_nxt) and take the
        ack and window; these are then the flow's newest (counted if not)."""
        cdef uint8_t flags = tcp[13]
        if flags != FLAG_ACK and flags != (FLAG_ACK | FLAG_PSH):
            self.fallback_counts[FB_FLAGS] += 1
            return False
        if be32(tcp + 4) != flow.seq_next:
            self.fallback_counts[FB_OUT_OF_ORDER] += 1
            return False
        if not self.checksum_acceptable(ip, tcp, tcp_len, vnet, ipv6):
            self.fallback_counts[FB_CHECKSUM] += 1
            return False
        if header_len > TCP_LEN and has_sack(tcp + TCP_LEN, header_len - TCP_LEN):
            self.fallback_counts[FB_SACK] += 1
            return False
        return self.take_ack(flow, be32(tcp + 8), be16(tcp + 14), tcp_len == header_len)

    cdef bint take_ack(self, FlowSlot *flow, uint32_t ack, uint16_t window,
                       bint pure) noexcept nogil:
        """Keep ``ack`` and ``window`` as the flow's newest if the engine would do no more than
        take them (TcpEngine's ACK processing, GuestSender.take_ack); False (counted) if not."""
        cdef uint32_t advance
        if ack == flow.ack and window == flow.window:
            if not pure:
                return True  # data with what the engine has: nothing new (a closed window too)
            if window == 0:
                self.fallback_counts[FB_ZERO_WINDOW] += 1  # e.g. the answer to a window probe
                return False
            if flow.ack != flow.ack_limit:
                self.fallback_counts[FB_DUP_ACK] += 1
                return False
            return True
        if window == 0:
            self.fallback_counts[FB_ZERO_WINDOW] += 1
            return False
        advance = ack - flow.ack  # modulo 2**32: an older ack is a huge advance
        if advance > <uint32_t>(flow.ack_limit - flow.ack):
            if advance >> 31:
                self.fallback_counts[FB_ACK_OLD] += 1
            else:
                self.fallback_counts[FB_ACK_UNSENT] += 1
            return False
        flow.ack = ack
        flow.window = window
        flow.ack_changed = True
        return True

    cdef void mark_parsed(self, Py_ssize_t i, const uint8_t *ip, const uint8_t *tcp,
                          uint64_t tcp_len, uint64_t vnet, bint ipv6,
                          uint8_t *handled) noexcept nogil:
        """Mark a segment not taken (headers and options checked) PARSED if the stack would
        hand it to the engine as it is: its family parsed, flags the engine accepts, not from
        a multicast IPv6 source, a checksum that verifies or was left partial."""
        if not self.parse_families & (PARSE_IPV6 if ipv6 else PARSE_IPV4):
            return
        if not flags_valid(tcp[13]) or (ipv6 and ip[8] == 0xFF):
            return
        if not self.checksum_acceptable(ip, tcp, tcp_len, vnet, ipv6):
            return
        handled[i] = HANDLED_PARSED
        self.parsed += 1
        if ipv6:
            self.last_parsed6 += 1

    cdef inline void note_active(self, int slot, FlowSlot *flow) noexcept nogil:
        """The flow has something for take_activity()."""
        if not flow.active:
            flow.active = True
            self.index.touch(slot)

    cdef bint checksum_acceptable(self, const uint8_t *ip, const uint8_t *tcp, uint64_t tcp_len,
                                  uint64_t vnet, bint ipv6) noexcept nogil:
        # A partial checksum at the TCP header (virtio NEEDS_CSUM) is the guest's driver
        # leaving the sum to the device: nothing to verify (TSO frames always come so).
        if ipv6:
            if vnet_partial_csum_at(vnet, ETH_LEN + IP6_LEN, TCP_CHECKSUM_OFFSET):
                return True
            return sum_verifies(pseudo_header_sum6(ip, PROTO_TCP, tcp_len)
                                + sum_bytes(tcp, tcp_len))
        if vnet_partial_csum_at(vnet, ETH_LEN + IP_LEN, TCP_CHECKSUM_OFFSET):
            return True
        return sum_verifies(pseudo_header_sum(ip, PROTO_TCP, tcp_len) + sum_bytes(tcp, tcp_len))

    cdef void write_pending(self, uint8_t *handled) noexcept nogil:
        """Write the pending run of one flow with sendmsg; settle which of its frames were taken."""
        cdef msghdr msg
        cdef ssize_t written = -1
        cdef uint64_t left, want = 0
        cdef int k, attempts
        cdef bint restored
        cdef FlowSlot *flow
        if self.niov == 0:
            return
        flow = &self.slots[self.pending_slot]
        for k in range(self.niov):
            want += self.iovs[k].iov_len
        memset(&msg, 0, sizeof(msghdr))
        msg.msg_iov = self.iovs
        msg.msg_iovlen = self.niov
        for attempts in range(4):
            written = sendmsg(flow.fd, &msg, MSG_DONTWAIT | MSG_NOSIGNAL)
            if written >= 0 or errno != EINTR:
                break
        if written <= 0:
            # EAGAIN or an error: the Python path sends these frames again and learns why
            # (partial-write accounting, or on_host_error).
            written = 0
        if <uint64_t>written < want:
            flow.stopped_in = self.batch_no
            if written > 0:
                flow.host_full = True
                self.partial_writes += 1
        flow.seq_next = self.pending_seq + <uint32_t>written
        left = <uint64_t>written
        restored = False
        for k in range(self.niov):
            if left == 0 and not restored:
                # The first frame not taken: the ack fields as they were before it.
                flow.ack = self.iov_acks[k].ack
                flow.window = self.iov_acks[k].window
                flow.ack_changed = self.iov_acks[k].changed
                restored = True
            if left > 0:
                # Taken, whole or in part; an unwritten tail is not acknowledged, the guest resends.
                left -= left if left < self.iovs[k].iov_len else self.iovs[k].iov_len
                flow.segments += 1
                self.taken += 1
                if flow.ipv6:
                    self.last_taken6 += 1
            else:
                handled[self.iov_frame[k]] = 0
                self.fallback_counts[FB_HOST_BUSY] += 1
        if written > 0:
            self.note_active(self.pending_slot, flow)
            flow.bytes += <uint64_t>written
        self.niov = 0
        self.pending_slot = -1


include "tcp_fast_rx.pxi"   # host -> guest: Peek commands straight into RX buffers
