# The Ethernet switch between guests (included by virtq.pyx, after virtq_segment.pxi).
#
# Each guest front-end is a port. A port's TX batch goes through ``switch_frames`` once,
# without the GIL: sources are learned (MAC -> port), frames for other guests are copied
# into those ports' outgoing FrameBatches (offloads they did not negotiate done here,
# virtq_segment.pxi), and the batch is compacted in place to what the port's own router
# takes (the gateway MAC, broadcast, multicast). Nothing is allocated per frame.
#
# The MAC table is fixed: MAC_SLOTS entries, open addressing with a probe window of
# MAC_PROBE slots from the MAC's hash. Lookups look at the whole window (no tombstones, so
# removing an entry is clearing it); learning takes the MAC's own slot, else a free or aged
# one, else evicts the window's oldest entry (counted).
#
# Routing through the gateway MAC: a frame a guest sends to the gateway MAC whose IPv4 or
# IPv6 destination is another connected guest's address (the route table: per port its
# MAC, its IPv4 lease and up to ROUTE6_SLOTS global IPv6 addresses, set from Python when
# the port binds to its lease or learns addresses) goes to that guest as a router would
# send it: destination MAC the guest's, source MAC the gateway's, TTL / hop limit one less,
# the IPv4 header checksum updated (RFC 1624). Rewritten in the sender's batch (the frame
# leaves it), then delivered with the offloads the destination lacks, like any unicast.
# A TTL / hop limit of 1 or less stays for the sender's router. The lookup is a scan of
# the ports (few), only for frames to the gateway MAC and only while some port has a
# route.

from libc.string cimport memcmp, memmove
from libc.stdint cimport int32_t

cdef enum:
    MAC_SLOTS = 4096   # a power of two
    MAC_PROBE = 8
    NO_PORT = -1
    ROUTE6_SLOTS = 9   # the lease's IPv6 address and LeasePool's MAX_LEARNED_IPV6 (8)
    IPV4_HEADER_MIN = 20

cdef uint64_t NO_MAC = (<uint64_t>1) << 63   # no 48-bit MAC equals it

# Counters. Order matches SWITCH_COUNTER_NAMES.
cdef enum:
    SW_FORWARDED = 0          # unicast frames delivered to their learned port
    SW_FLOODED                # frames flooded (broadcast, multicast, unknown unicast), once each
    SW_TO_ROUTER              # frames left in the batch for the port's own router
    SW_LEARNED                # MACs learned
    SW_MOVED                  # MACs re-learned on another port
    SW_AGED                   # entries found aged out
    SW_EVICTED                # entries evicted because their probe window was full
    SW_CHECKSUMS_COMPLETED
    SW_SEGMENTED              # GSO frames cut into segments
    SW_SEGMENTS               # segments those gave
    SW_ROUTED                 # frames to the gateway MAC routed to another guest
    SW_DROP_SHORT             # first drop reason: frames shorter than an Ethernet header
    SW_DROP_BAD_OFFSET        # frames outside the batch storage
    SW_DROP_BAD_SOURCE        # multicast source MAC, or the gateway's
    SW_DROP_SAME_PORT         # unicast to a MAC learned on the sending port
    SW_DROP_OUTGOING_FULL     # the destination's outgoing batch had no room
    SW_DROP_BAD_OFFLOAD       # a vnet word that does not fit its frame
    SW_DROP_GSO_UNSUPPORTED   # GSO for a port without TSO, not plain TCP over IP
    SW_DROP_OFFLOADS_CHANGED  # waiting for a port whose guest renegotiated its offloads
    SW_N

SWITCH_COUNTER_NAMES = (
    "forwarded", "flooded", "to_router", "learned", "moved", "aged", "evicted",
    "checksums_completed", "segmented", "segments", "routed",
    "dropped.short", "dropped.bad_offset", "dropped.bad_source", "dropped.same_port",
    "dropped.outgoing_full", "dropped.bad_offload", "dropped.gso_unsupported",
    "dropped.offloads_changed",
)
SWITCH_FIRST_DROP = SW_DROP_SHORT
SWITCH_ROUTE6_SLOTS = ROUTE6_SLOTS


cdef struct MacEntry:
    uint64_t mac
    double seen
    int32_t port          # NO_PORT: free


cdef struct SwitchPort:
    bint active
    bint csum             # takes partial checksums (GUEST_CSUM)
    bint tso4             # takes TCPv4 super-frames (GUEST_TSO4)
    bint tso6
    void *out             # its outgoing FrameBatch (a reference is held in SwitchKernel.outs)
    uint64_t route_mac    # routing to this guest: its MAC (NO_MAC: not routed to)
    uint8_t route4[4]     # its IPv4 address (all zero: none)
    int route6_count
    uint8_t route6[ROUTE6_SLOTS][16]


cdef inline uint64_t mac_key(const uint8_t *p) noexcept nogil:
    return ((<uint64_t>p[0] << 40) | (<uint64_t>p[1] << 32) | (<uint64_t>p[2] << 24)
            | (<uint64_t>p[3] << 16) | (<uint64_t>p[4] << 8) | p[5])


cdef inline Py_ssize_t mac_home(uint64_t mac) noexcept nogil:
    return <Py_ssize_t>(((mac * <uint64_t>0x9E3779B97F4A7C15) >> 40) & (MAC_SLOTS - 1))


cdef class SwitchKernel:
    """The switch's C state; the Python face is vhostnet/virtqueue/switch.py (use that)."""

    cdef MacEntry *table
    cdef SwitchPort *ports
    cdef readonly int max_ports
    cdef uint64_t gateway
    cdef double ageing
    cdef double latest               # the latest ``now`` seen: what macs() ages against
    cdef uint64_t counts[SW_N]
    cdef bint reported[SW_N]
    cdef readonly bint has_new_drops
    cdef list outs                   # the outgoing FrameBatch per port, or None
    cdef int routes                  # ports with a route (0: no lookup at all)

    def __cinit__(self, int max_ports, bytes gateway_mac not None, double ageing_seconds):
        cdef Py_ssize_t i
        if not 1 <= max_ports <= 4096:
            raise ValueError(f"max_ports {max_ports} outside 1..4096")
        if len(gateway_mac) != 6:
            raise ValueError("the gateway MAC must be 6 bytes")
        if not ageing_seconds > 0:
            raise ValueError("ageing_seconds must be positive")
        self.table = <MacEntry *>malloc(MAC_SLOTS * sizeof(MacEntry))
        self.ports = <SwitchPort *>malloc(max_ports * sizeof(SwitchPort))
        if self.table == NULL or self.ports == NULL:
            raise MemoryError()
        for i in range(MAC_SLOTS):
            self.table[i].port = NO_PORT
        memset(self.ports, 0, max_ports * sizeof(SwitchPort))
        for i in range(max_ports):
            self.ports[i].route_mac = NO_MAC
        memset(self.counts, 0, sizeof(self.counts))
        memset(self.reported, 0, sizeof(self.reported))
        self.max_ports = max_ports
        self.gateway = mac_key(gateway_mac)
        self.ageing = ageing_seconds
        self.outs = [None] * max_ports

    def __dealloc__(self):
        free(self.table)
        free(self.ports)

    # ----------------------------------------------------------------- ports

    def add_port(self, FrameBatch out not None) -> int:
        """The lowest free port, sending to ``out``; RuntimeError when all are in use."""
        cdef int port
        for port in range(self.max_ports):
            if not self.ports[port].active:
                out.clear()
                self.outs[port] = out
                self.ports[port].active = True
                self.ports[port].csum = self.ports[port].tso4 = self.ports[port].tso6 = False
                self.ports[port].out = <void *>out
                return port
        raise RuntimeError(f"all {self.max_ports} switch ports are in use")

    def remove_port(self, int port) -> None:
        """Free ``port``: its MACs are forgotten and its waiting frames dropped."""
        cdef Py_ssize_t i
        self._check_port(port)
        for i in range(MAC_SLOTS):
            if self.table[i].port == port:
                self.table[i].port = NO_PORT
        self.set_port_route(port, None, None, ())
        self.ports[port].active = False
        self.ports[port].out = NULL
        self.outs[port] = None

    def set_port_offloads(self, int port, bint csum, bint tso4, bint tso6) -> None:
        """What ``port``'s guest takes from now on. Frames already waiting for it were made
        for the offloads it had: after a change (a driver reset) they are dropped, counted,
        as a NIC drops what was in flight when it was reset."""
        cdef FrameBatch out
        self._check_port(port)
        if (self.ports[port].csum != csum or self.ports[port].tso4 != tso4
                or self.ports[port].tso6 != tso6):
            out = <FrameBatch>self.outs[port]
            if out is not None:
                if out.n:
                    self.drop(SW_DROP_OFFLOADS_CHANGED, out.n)
                out.clear()
        self.ports[port].csum = csum
        self.ports[port].tso4 = tso4
        self.ports[port].tso6 = tso6

    def set_port_route(self, int port, mac, ipv4, ipv6) -> None:
        """Route frames for ``ipv4`` (4 bytes or None) and the ``ipv6`` addresses (16 bytes
        each, at most ROUTE6_SLOTS) sent to the gateway MAC to ``port``'s guest at ``mac``
        (None: no route to it)."""
        cdef SwitchPort *entry
        cdef Py_ssize_t k
        self._check_port(port)
        ipv6 = list(ipv6)
        if mac is not None and len(mac) != 6:
            raise ValueError("a route's MAC must be 6 bytes")
        if ipv4 is not None and len(ipv4) != 4:
            raise ValueError("a route's IPv4 address must be 4 bytes")
        if len(ipv6) > ROUTE6_SLOTS or any(len(address) != 16 for address in ipv6):
            raise ValueError(f"a route takes at most {ROUTE6_SLOTS} IPv6 addresses of 16 bytes")
        entry = &self.ports[port]
        if entry.route_mac != NO_MAC:
            self.routes -= 1
        entry.route_mac = NO_MAC
        memset(entry.route4, 0, 4)
        entry.route6_count = 0
        if mac is None:
            return
        entry.route_mac = mac_key(mac)
        self.routes += 1
        if ipv4 is not None:
            memcpy(entry.route4, <const uint8_t *>ipv4, 4)
        for k, address in enumerate(ipv6):
            memcpy(entry.route6[k], <const uint8_t *>address, 16)
        entry.route6_count = len(ipv6)

    cdef _check_port(self, int port):
        if not 0 <= port < self.max_ports or not self.ports[port].active:
            raise ValueError(f"switch port {port} is not in use")

    # ----------------------------------------------------------- data path

    def switch_batch(self, int port, FrameBatch batch not None, Py_ssize_t count,
                     double now) -> int:
        """See ``Switch.switch_batch``."""
        cdef Py_ssize_t kept, tail
        self._check_port(port)
        if count < 0:
            raise ValueError(f"negative frame count {count}")
        if count > batch.n:
            count = batch.n
        with nogil:
            if now > self.latest:
                self.latest = now
            kept = switch_frames(self, batch, port, count, now)
            # Frames past ``count`` (not switched) close up behind the kept ones.
            tail = batch.n - count
            if tail and kept < count:
                memmove(batch.offsets + kept, batch.offsets + count, tail * sizeof(uint64_t))
                memmove(batch.lengths + kept, batch.lengths + count, tail * sizeof(uint32_t))
                memmove(batch.vnets + kept, batch.vnets + count, tail * sizeof(uint64_t))
            batch.n = kept + tail
        return kept

    def outgoing(self, int port):
        """The port's outgoing FrameBatch, or None when nothing waits."""
        self._check_port(port)
        out = <FrameBatch>self.outs[port]
        return out if out.n else None

    def taken(self, int port, Py_ssize_t count) -> None:
        """The first ``count`` outgoing frames of ``port`` left: the rest move to the front."""
        cdef FrameBatch out
        cdef Py_ssize_t i, rest
        cdef uint64_t base
        self._check_port(port)
        out = <FrameBatch>self.outs[port]
        if count < 0 or count > out.n:
            raise ValueError(f"{count} frames taken from an outgoing batch of {out.n}")
        if count == out.n:
            out.clear()
            return
        if count == 0:
            return
        # The switch appends frames back to back, so the rest is one block from here.
        base = out.offsets[count]
        rest = out.n - count
        memmove(out.data, out.data + base, out.fill - base)
        for i in range(rest):
            out.offsets[i] = out.offsets[count + i] - base
            out.lengths[i] = out.lengths[count + i]
            out.vnets[i] = out.vnets[count + i]
        out.n = rest
        out.fill -= base

    # -------------------------------------------------------------- control

    def macs(self) -> list:
        """(MAC, port, last seen) of every entry not aged out by the latest ``now``."""
        cdef Py_ssize_t i
        result = []
        for i in range(MAC_SLOTS):
            if (self.table[i].port != NO_PORT
                    and self.latest - self.table[i].seen <= self.ageing):
                result.append((int(self.table[i].mac).to_bytes(6, "big"), self.table[i].port,
                               self.table[i].seen))
        return result

    def counters(self) -> dict:
        return {name: self.counts[i] for i, name in enumerate(SWITCH_COUNTER_NAMES)}

    def take_new_drops(self) -> list:
        """Names of drop reasons seen for the first time since the last call."""
        fresh = []
        for i in range(SW_DROP_SHORT, SW_N):
            if self.counts[i] and not self.reported[i]:
                self.reported[i] = True
                fresh.append(SWITCH_COUNTER_NAMES[i])
        self.has_new_drops = False
        return fresh

    cdef inline void drop(self, int reason, uint64_t frames=1) noexcept nogil:
        self.counts[reason] += frames
        if not self.reported[reason]:
            self.has_new_drops = True


cdef int32_t mac_lookup(SwitchKernel sw, uint64_t mac, double now) noexcept nogil:
    """The port ``mac`` was learned on, or NO_PORT (unknown or aged out: then forgotten)."""
    cdef Py_ssize_t home = mac_home(mac), k, slot
    cdef MacEntry *entry
    for k in range(MAC_PROBE):
        slot = (home + k) & (MAC_SLOTS - 1)
        entry = &sw.table[slot]
        if entry.port != NO_PORT and entry.mac == mac:
            if now - entry.seen > sw.ageing:
                entry.port = NO_PORT
                sw.counts[SW_AGED] += 1
                return NO_PORT
            return entry.port
    return NO_PORT


cdef void mac_learn(SwitchKernel sw, uint64_t mac, int32_t port, double now) noexcept nogil:
    """``mac`` was seen on ``port`` at ``now``."""
    cdef Py_ssize_t home = mac_home(mac), k, slot
    cdef MacEntry *entry
    cdef MacEntry *free_entry = NULL
    cdef MacEntry *oldest = NULL
    for k in range(MAC_PROBE):
        slot = (home + k) & (MAC_SLOTS - 1)
        entry = &sw.table[slot]
        if entry.port == NO_PORT:
            if free_entry == NULL:
                free_entry = entry
            continue
        if entry.mac == mac:
            if entry.port != port:
                sw.counts[SW_MOVED] += 1
                entry.port = port
            entry.seen = now
            return
        if now - entry.seen > sw.ageing:
            entry.port = NO_PORT
            sw.counts[SW_AGED] += 1
            if free_entry == NULL:
                free_entry = entry
        elif oldest == NULL or entry.seen < oldest.seen:
            oldest = entry
    if free_entry == NULL:
        free_entry = oldest
        sw.counts[SW_EVICTED] += 1
    free_entry.mac = mac
    free_entry.port = port
    free_entry.seen = now
    sw.counts[SW_LEARNED] += 1


cdef bint deliver(SwitchKernel sw, FrameBatch out, SwitchPort *dest, const uint8_t *frame,
                  uint64_t length, uint64_t vnet) noexcept nogil:
    """Append one frame to a destination's outgoing batch, doing the offloads it lacks."""
    cdef VnetFields fields = vnet_decode(vnet)
    cdef uint8_t gso = fields.gso_type & ~VNET_GSO_ECN
    cdef uint64_t segments = 0
    cdef int result
    if fields.gso_type != VNET_GSO_NONE:
        # ECN on a super-frame: the port may not have GUEST_ECN (not tracked), so cut it.
        if (dest.csum and not fields.gso_type & VNET_GSO_ECN
                and ((gso == VNET_GSO_TCPV4 and dest.tso4)
                     or (gso == VNET_GSO_TCPV6 and dest.tso6))):
            result = FIX_NO_ROOM if not out.room_for(length) else FIX_OK
        elif gso == VNET_GSO_TCPV4 or gso == VNET_GSO_TCPV6:
            result = segment_tcp(out, frame, length, &fields, &segments)
            if result == FIX_OK:
                sw.counts[SW_SEGMENTED] += 1
                sw.counts[SW_SEGMENTS] += segments
                return True
        else:
            result = FIX_GSO_UNSUPPORTED
    elif fields.flags & VNET_F_NEEDS_CSUM and not dest.csum:
        result = copy_completing_checksum(out, frame, length, &fields)
        if result == FIX_OK:
            sw.counts[SW_CHECKSUMS_COMPLETED] += 1
            return True
    else:
        if not dest.csum:
            vnet &= ~(<uint64_t>VNET_F_DATA_VALID)
        result = FIX_NO_ROOM if not out.room_for(length) else FIX_OK
    if result == FIX_OK:   # as it is
        memcpy(out.data + out.fill, frame, length)
        out.commit(<uint32_t>length, vnet)
        return True
    if result == FIX_NO_ROOM:
        sw.drop(SW_DROP_OUTGOING_FULL)
    elif result == FIX_BAD_OFFLOAD:
        sw.drop(SW_DROP_BAD_OFFLOAD)
    else:
        sw.drop(SW_DROP_GSO_UNSUPPORTED)
    return False


cdef int32_t route_lookup(SwitchKernel sw, const uint8_t *frame, uint64_t length,
                         int32_t source) noexcept nogil:
    """The port of the guest a frame to the gateway MAC is addressed to (IP destination), or
    NO_PORT (not another guest's address, not plain IPv4/IPv6, or a TTL about to expire)."""
    cdef const uint8_t *ip = frame + ETH_HEADER_BYTES
    cdef uint16_t ethertype
    cdef int32_t port
    cdef int k
    cdef SwitchPort *entry
    if length < ETH_HEADER_BYTES + IPV4_HEADER_MIN:
        return NO_PORT
    ethertype = be16(frame + 12)
    if ethertype == ETHERTYPE_IPV4:
        if (ip[0] >> 4 != 4 or (ip[0] & 15) * 4 < IPV4_HEADER_MIN
                or length < <uint64_t>(ETH_HEADER_BYTES + (ip[0] & 15) * 4) or ip[8] <= 1):
            return NO_PORT
        for port in range(sw.max_ports):
            entry = &sw.ports[port]
            if (entry.active and entry.route_mac != NO_MAC and port != source
                    and memcmp(entry.route4, ip + 16, 4) == 0
                    and (entry.route4[0] | entry.route4[1] | entry.route4[2] | entry.route4[3])):
                return port
    elif ethertype == ETHERTYPE_IPV6:
        if length < ETH_HEADER_BYTES + IPV6_HEADER_BYTES or ip[0] >> 4 != 6 or ip[7] <= 1:
            return NO_PORT
        for port in range(sw.max_ports):
            entry = &sw.ports[port]
            if entry.active and entry.route_mac != NO_MAC and port != source:
                for k in range(entry.route6_count):
                    if memcmp(entry.route6[k], ip + 24, 16) == 0:
                        return port
    return NO_PORT


cdef void route_rewrite(SwitchKernel sw, uint8_t *frame, SwitchPort *dest) noexcept nogil:
    """What the gateway does to a frame it routes to ``dest``'s guest (route_lookup said)."""
    cdef uint8_t *ip = frame + ETH_HEADER_BYTES
    cdef uint32_t total
    cdef uint16_t before
    cdef int k
    for k in range(6):
        frame[k] = <uint8_t>(dest.route_mac >> (40 - 8 * k))
        frame[6 + k] = <uint8_t>(sw.gateway >> (40 - 8 * k))
    if be16(frame + 12) == ETHERTYPE_IPV6:
        ip[7] -= 1
        return
    # TTL is the high byte of header word 4: HC' = ~(~HC + ~m + m') (RFC 1624).
    before = be16(ip + 8)
    ip[8] -= 1
    total = (<uint32_t>(~be16(ip + 10)) & 0xFFFF) + ((~before) & 0xFFFF) + be16(ip + 8)
    total = (total & 0xFFFF) + (total >> 16)
    total = (total & 0xFFFF) + (total >> 16)
    put16(ip + 10, <uint16_t>(~total & 0xFFFF))


cdef void flood(SwitchKernel sw, int32_t source, const uint8_t *frame, uint64_t length,
                uint64_t vnet) noexcept nogil:
    cdef int32_t port
    sw.counts[SW_FLOODED] += 1
    for port in range(sw.max_ports):
        if port != source and sw.ports[port].active:
            deliver(sw, <FrameBatch>sw.ports[port].out, &sw.ports[port], frame, length, vnet)


cdef Py_ssize_t switch_frames(SwitchKernel sw, FrameBatch batch, int32_t port, Py_ssize_t count,
                              double now) noexcept nogil:
    """Switch the first ``count`` frames that came from ``port``; compact the batch to the ones
    for the port's router and return how many those are."""
    cdef FrameArrays arrays
    cdef Py_ssize_t i, kept = 0
    cdef uint64_t length, source, destination
    cdef uint64_t last_source = NO_MAC, last_destination = NO_MAC
    cdef int32_t to = NO_PORT, routed_to
    cdef const uint8_t *frame
    arrays.data = batch.data
    arrays.size = batch.buffer_bytes
    arrays.offsets = batch.offsets
    arrays.lengths = batch.lengths
    arrays.vnets = batch.vnets
    for i in range(count):
        frame = frame_at(&arrays, i, &length)
        if frame == NULL:
            sw.drop(SW_DROP_BAD_OFFSET)
            continue
        if length < ETH_HEADER_BYTES:
            sw.drop(SW_DROP_SHORT)
            continue
        source = mac_key(frame + 6)
        if source != last_source:
            # A guest may not claim a group address or the gateway's MAC.
            if frame[6] & 1 or source == sw.gateway:
                sw.drop(SW_DROP_BAD_SOURCE)
                continue
            mac_learn(sw, source, port, now)
            last_source = source
            last_destination = NO_MAC   # learning may have moved the cached destination
        destination = mac_key(frame)
        if frame[0] & 1:
            flood(sw, port, frame, length, batch.vnets[i])
        elif destination == sw.gateway and sw.routes:
            routed_to = route_lookup(sw, frame, length, port)
            if routed_to != NO_PORT:
                route_rewrite(sw, <uint8_t *>frame, &sw.ports[routed_to])
                last_destination = NO_MAC   # the frame's destination MAC changed
                if deliver(sw, <FrameBatch>sw.ports[routed_to].out, &sw.ports[routed_to],
                           frame, length, batch.vnets[i]):
                    sw.counts[SW_ROUTED] += 1
                continue
        elif destination != sw.gateway:
            if destination != last_destination:
                to = mac_lookup(sw, destination, now)
                last_destination = destination
            if to == NO_PORT:
                flood(sw, port, frame, length, batch.vnets[i])
            elif to == port:
                sw.drop(SW_DROP_SAME_PORT)
            elif deliver(sw, <FrameBatch>sw.ports[to].out, &sw.ports[to], frame, length,
                         batch.vnets[i]):
                sw.counts[SW_FORWARDED] += 1
            continue
        # For the port's own router: the gateway MAC, broadcast, multicast.
        batch.offsets[kept] = batch.offsets[i]
        batch.lengths[kept] = batch.lengths[i]
        batch.vnets[kept] = batch.vnets[i]
        kept += 1
    sw.counts[SW_TO_ROUTER] += kept
    return kept
