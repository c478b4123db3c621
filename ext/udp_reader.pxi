# A flow socket's reader on the event loop (included by udp_fast.pyx): the loop calls the
# ``FlowReader`` itself when the socket is readable, and in the common case (one RX ring to
# write into, nothing queued for the guest ahead) the datagrams go straight into the RX ring
# from here (``receive_direct``) with no Python frame between the loop and recvmmsg; the one
# Python call left is the device's completion (``direct_rx_done``: counters, watchdog, ring
# errors). Anything else (frames already queued for the guest, several RX rings, no guest MAC
# told, a datagram handed back, a receive error) goes to the Python side as before.


cdef class DirectRoute:
    """Where a flow's host datagrams may go straight into the RX ring, shared by a fast path's
    ``FlowReader``s and kept up to date by its Python face (``vhostnet.hostio.udp_fast``).

    ``rx``: the device offering direct writes (``direct_rx()``, ``direct_rx_done(frames)``)
    or None; ``waiting``: the guest's frame queue (non-empty: nothing may pass it); ``stack``:
    whose ``guest_mac`` must be ``told_mac`` (the one the kernel builds frames with) and whose
    ``config.mtu`` bounds the frames; ``finish(flow_id, status, frames, spilled, now)``: the
    Python end of a direct receive that did not simply drain the socket (False: what is left
    is the fallback's to read)."""
    cdef public object rx
    cdef public object waiting
    cdef public object stack
    cdef public object told_mac
    cdef public object finish

    def __init__(self, stack, finish):
        self.rx = None
        self.waiting = ()
        self.stack = stack
        self.told_mac = None
        self.finish = finish


cdef class FlowReader:
    """The loop's reader for one registered flow's socket (``loop.add_reader(fd, reader)``):
    see the top of this file. ``fallback()`` reads the socket the Python way; ``clock()``
    gives the ``now`` the flow's activity is stamped with."""
    cdef UdpFastPath kernel
    cdef DirectRoute route
    cdef readonly int64_t flow_id
    cdef readonly object fallback
    cdef object clock

    def __init__(self, UdpFastPath kernel, DirectRoute route, int64_t flow_id, fallback, clock):
        self.kernel = kernel
        self.route = route
        self.flow_id = flow_id
        self.fallback = fallback
        self.clock = clock

    def __call__(self):
        cdef DirectRoute route = self.route
        rx = route.rx
        if (rx is None or route.waiting or route.stack.guest_mac is not route.told_mac
                or self.kernel.index.slot_of(self.flow_id) < 0):
            return self.fallback()
        ring = rx.direct_rx()
        if ring is None:
            return self.fallback()  # several RX rings (by flow), a capture, or none usable
        now = self.clock()
        status, frames, spilled = self.kernel.receive_direct(
            self.flow_id, route.stack.config.mtu, now, *ring)
        if (status == UDP_DIRECT_DRAINED or status == UDP_DIRECT_LIMIT) and not spilled:
            rx.direct_rx_done(frames)
            return None
        if not route.finish(self.flow_id, status, frames, spilled, now):
            return self.fallback()  # (the Python way reads what is left)
        return None
