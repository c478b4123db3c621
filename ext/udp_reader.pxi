# A flow socket's reader on the event loop (included by udp_fast.pyx): the loop calls the
# ``FlowReader`` itself when the socket is readable, and in the common case (one RX ring to
# write into, nothing queued for the guest ahead) the datagrams go straight into the RX ring
# from here (``receive_direct``) with no Python frame between the loop and recvmmsg, nor after
# it while the device says it needs no completion call (``direct_rx_done``: counters,
# watchdog, ring errors; see ``DirectRoute``). Anything else (frames already queued for the
# guest, several RX rings, no guest MAC told, a datagram handed back, a receive error) goes
# to the Python side as before.
#
# The same for the guest's requests (``TxKick``): a TX ring's kick read, drained and the UDP
# datagrams of registered flows sent in one call.

from posix.unistd cimport read


cdef class DirectRoute:
    """What a fast path's C readers (``FlowReader``, ``TxKick``) share, kept up to date by its
    Python face (``vhostnet.hostio.udp_fast``).

    ``rx``: the device offering direct writes (``direct_rx()``, ``direct_rx_done(frames)``)
    or None; ``waiting``: the guest's frame queue (non-empty: nothing may pass it); ``stack``:
    whose ``guest_mac`` must be ``told_mac`` (the one the kernel builds frames with) and whose
    ``config.mtu`` bounds the frames; ``finish(flow_id, status, frames, spilled, now)``: the
    Python end of a direct receive that did not simply drain the socket (False: what is left
    is the fallback's to read); ``bound``: the TX batch the kernel's ``send_bound`` works on;
    ``tx_sink``: guest frames go to a sink, not to the host (``Network.set_tx_sink``).

    Optional on ``rx`` (a ``NetDevice`` has them): ``direct_rx_generation``, which changes
    whenever ``direct_rx()``'s answer may (its last answer is kept until then), and
    ``direct_rx_quiet``, True while a direct write that met no ring error needs no
    ``direct_rx_done`` but its frames added to ``counters["rx.frames"]`` (the device's
    watchdog is on already)."""
    cdef public object rx
    cdef public object waiting
    cdef public object stack
    cdef public object told_mac
    cdef public object finish
    cdef public object bound
    cdef public bint tx_sink
    cdef public object ring           # ``rx.direct_rx()``'s last answer, of ``generation``
    cdef public object generation

    def __init__(self, stack, finish):
        self.ring = None
        self.generation = None
        self.bound = None
        self.tx_sink = False
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
        # The device's handle, asked again only when its rings changed (its generation).
        generation = getattr(rx, "direct_rx_generation", None)
        ring = route.ring
        if ring is None or generation is None or generation != route.generation:
            ring = rx.direct_rx()
            if ring is None:
                return self.fallback()  # several RX rings (by flow), a capture, or none usable
            route.ring = ring
            route.generation = generation
        now = self.clock()
        status, frames, spilled = self.kernel.receive_direct(
            self.flow_id, route.stack.config.mtu, now, *ring)
        if (status == UDP_DIRECT_DRAINED or status == UDP_DIRECT_LIMIT) and not spilled:
            queue = ring[0]
            if (getattr(rx, "direct_rx_quiet", False) and not queue.has_new_errors
                    and not queue.broken):
                if frames:
                    rx.counters["rx.frames"] += frames
            else:
                rx.direct_rx_done(frames)
            return None
        if not route.finish(self.flow_id, status, frames, spilled, now):
            return self.fallback()  # (the Python way reads what is left)
        return None


cdef class TxKick:
    """The loop's reader of a TX ring's kick eventfd (``loop.add_reader(fd, kick)``): the
    eventfd read, the ring drained and re-armed (``tx_drain_rearm``) and the batch's datagrams
    of registered flows sent (``send_bound``) in one call, with no Python frame of vhostnet:
    the ring's C queue (``ring``, ``Virtqueue.kernel``) is drained directly, and the
    ``Virtqueue`` is called only to log bad guest input met for the first time. When the fast
    path took the whole batch, nothing else runs.

    The device keeps ``queue`` (its ``Virtqueue``, None while stopped), ``ring`` (that
    queue's ``kernel``, None while stopped) and ``ready`` (nothing
    of its own needs Python per kick: one queue pair, no capture, the ring enabled and whole)
    up to date, and ``watched`` (its watchdog is on; if not, ``busy()`` turns it on). Not
    ready: ``fallback()`` does the whole kick in Python. Anything the fast path did not take
    (frames for the Python stack or TCP, a send error, more frames waiting, the ring broken
    meanwhile): ``rest((frames, again, taken))`` carries on in Python with the drained
    batch, ``taken`` None when no send was tried. Frames already waiting for the guest go to
    the RX ring (``flush_rx()``) before the kick ends, as the Python kick does."""
    cdef UdpFastPath kernel
    cdef DirectRoute route
    cdef int fd
    cdef object batch
    cdef int max_frames
    cdef object fallback
    cdef object rest
    cdef object busy
    cdef object flush_rx
    cdef dict counters
    cdef object clock
    cdef public object queue
    cdef public object ring
    cdef public bint ready
    cdef public bint watched

    def __init__(self, UdpFastPath kernel, DirectRoute route, int fd, batch, int max_frames,
                 fallback, rest, busy, flush_rx, dict counters, clock):
        self.kernel = kernel
        self.route = route
        self.fd = fd
        self.batch = batch
        self.max_frames = max_frames
        self.fallback = fallback
        self.rest = rest
        self.busy = busy
        self.flush_rx = flush_rx
        self.counters = counters
        self.clock = clock
        self.queue = None
        self.ring = None
        self.ready = False
        self.watched = False

    def __call__(self):
        cdef uint64_t value
        cdef DirectRoute route = self.route
        ring = self.ring
        if not self.ready or self.queue is None or ring is None:
            return self.fallback()
        if read(self.fd, &value, 8) < 0 and errno != EAGAIN and errno != EINTR:
            return self.fallback()  # (it reads the fd again and deals with the error)
        if not self.watched:
            self.busy()
        frames, again = ring.tx_drain_rearm(self.batch, self.max_frames)
        if ring.has_new_errors:
            self.queue.direct_rx_done()  # (the first of a kind of bad guest input: logged)
        taken = None
        if (frames and route.bound is self.batch and not route.tx_sink
                and route.stack.guest_mac is route.told_mac):
            taken = self.kernel.send_bound(frames, self.clock())
        if again or not self.ready or (frames and (taken != frames or self.kernel.nerrors)):
            return self.rest((frames, again, taken))
        if frames:
            self.counters["tx.frames"] += frames
        if route.waiting:
            self.flush_rx()
        return None
