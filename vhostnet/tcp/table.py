"""The TCP engine's flow table: flows by 4-tuple and by id, their timers, the flow limit,
and which flows changed since a mirror of them (the C fast path) last asked.

The engine is the only writer; everything else reads ``by_key``/``by_id``
(exposed as ``engine.flows``/``engine.flows_by_id``) or asks the engine.
"""

from __future__ import annotations

import logging

from vhostnet.stack.counters import Counters
from vhostnet.tcp.flow import Flow, Phase
from vhostnet.tcp.timers import FlowTimers

log = logging.getLogger("vhostnet.tcp.engine")

Key = tuple[bytes, int, bytes, int]

FLOW_LIMIT_LOG_INTERVAL = 10.0


class FlowTable:
    """Every flow of one engine; ids are never reused."""

    def __init__(self, stats: Counters, flow_limit: int) -> None:
        self.stats = stats
        self.flow_limit = flow_limit
        self.by_key: dict[Key, Flow] = {}
        self.by_id: dict[int, Flow] = {}
        self.timers = FlowTimers(self.by_id)
        self._next_id = 1
        self._last_limit_log = float("-inf")
        # The ids of flows changed since a mirror last took them; recorded only once a mirror
        # asks (track_changes). One set for the table's life: a mirror may test it without a
        # call (``if table.changed``) and pop from it.
        self.changed: set[int] = set()
        self.tracking = False  # a mirror asked (read by the engine's per-segment path)

    def __len__(self) -> int:
        return len(self.by_key)

    def add(self, key: Key, inbound: bool, phase: Phase) -> Flow:
        """A new flow with the next id (counted in tcp.flows_total)."""
        flow = Flow(self._next_id, key[0], key[1], key[2], key[3], inbound, phase)
        self._next_id += 1
        self.by_key[key] = flow
        self.by_id[flow.flow_id] = flow
        self.stats.inc("tcp.flows_total")
        return flow  # (tcp.flows_open: TcpEngine.counters sets it when the counters are read)

    def remove(self, flow: Flow) -> None:
        self.by_key.pop(flow.key, None)
        self.by_id.pop(flow.flow_id, None)
        self.touch(flow.flow_id)

    def at_limit(self, now: float) -> bool:
        """True (counted, logged at most every few seconds) when no new flow may open."""
        if len(self.by_key) < self.flow_limit:
            return False
        self.stats.inc("tcp.drop.flow_limit")
        if now - self._last_limit_log >= FLOW_LIMIT_LOG_INTERVAL:
            self._last_limit_log = now
            log.warning("TCP flow limit (%d) reached, refusing connections", self.flow_limit)
        return True

    # ---- change tracking (for a mirror of the flows) ---------------------------------

    def track_changes(self) -> None:
        """Start recording the ids of flows whose guest-side state may change."""
        self.tracking = True
        # ``touch`` is then the set's own add (no Python frame: the engine touches a flow
        # several times per connection and per request/response).
        self.touch = self.changed.add  # type: ignore[method-assign]

    def touch(self, flow_id: int) -> None:
        """The flow's state may have changed (or it is gone)."""
        if self.tracking:
            self.changed.add(flow_id)

    def take_changed(self) -> set[int]:
        """The ids recorded since the last call (empty when not tracking); the record restarts."""
        changed = set(self.changed)
        self.changed.clear()
        return changed
