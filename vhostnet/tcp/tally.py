"""Per-event TCP counts kept as plain integers: the paths that run several times per
request/response or once per connection (segments and bytes each way, the fast path's ACKs and
writes, flows established and closed) add to an
attribute instead of calling ``Counters.inc``; the totals join the engine's counters, under
the same names, whenever they are read (``Counters.add_source``)."""

from __future__ import annotations

from vhostnet.stack.counters import PlainCounts

# Attribute -> counter name.
NAMES = {
    "established": "tcp.established",  # flows (one each, not segments)
    "closed": "tcp.closed",
    "fin_acks_delayed": "tcp.fin_acks_delayed",
    "segments_in": "tcp.segments_in",
    "segments_out": "tcp.segments_out",
    "bytes_to_host": "tcp.bytes_to_host",
    "bytes_to_guest": "tcp.bytes_to_guest",
    "acks_on_replies": "tcp.acks_on_replies",
    "fast_acks": "tcp.fast_acks",
    "fast_acks6": "tcp6.fast_acks",  # of tcp.fast_acks
    "fast_segments": "tcp.fast_segments",
    "fast_segments6": "tcp6.fast_segments",  # of tcp.fast_segments
    "fast_bytes": "tcp.fast_bytes",
    "parsed_segments": "tcp.parsed_segments",  # parsed by the fast path, not the wire views
    "direct_rx_segments": "tcp.direct_rx_segments",
    "direct_rx_peeks": "tcp.direct_rx_peeks",  # calls into the ring (one Python round each)
    "gso_segments_out": "tcp.gso_segments_out",  # of the direct RX segments: the guest cuts them
}


class EventCounts(PlainCounts):
    """The counts since they were last taken; one per engine (``GuestOutput.counts``)."""

    __slots__ = tuple(NAMES)
    NAMES = NAMES
