"""The TCP engine's timer queue: one heap entry per flow for its earliest deadline.

A flow has several timers (SYN, retransmission, FIN, idle); keeping all of
them in a heap would mean a push on every segment, since the idle deadline
moves each time. Instead the heap holds at most one live entry per flow,
``flow.scheduled_at``, pushed only when a deadline becomes *earlier*. When an
entry comes due and the flow's real deadline has moved later, it is simply
pushed again. Entries for gone flows or superseded deadlines are skipped.

The engine does not recompute a flow's deadlines after each of its events either (several
per request/response). Every deadline but the delayed ACK's is set at least
``TcpEngine.look_ahead`` after the event that sets it (the smallest of the RTO, SYN, FIN and
idle timeouts), so an entry due within that look-ahead of the event is early enough for
whatever the event set: the engine only checks that the flow's entry is (``look_by``, with
its test written out in the per-event paths) and arms the delayed ACK's deadline itself. When
such an entry comes due (or is found at the head of the heap), the flow's real earliest
deadline is computed and pushed, as for any entry whose deadline moved later.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator

from vhostnet.tcp.flow import Flow


class FlowTimers:
    def __init__(self, flows_by_id: dict[int, Flow]) -> None:
        self._flows_by_id = flows_by_id
        self._heap: list[tuple[float, int]] = []

    def schedule(self, flow: Flow) -> None:
        """Make sure the heap holds the flow's earliest deadline (later ones wait their turn)."""
        # The earliest deadline is computed here, without a call per timer.
        deadline = flow.idle_at
        for at in (flow.rto_at, flow.ack_owed_at, flow.syn_at, flow.fin_at):
            if at is not None and (deadline is None or at < deadline):
                deadline = at
        if deadline is not None:
            self.look_by(flow, deadline)

    def look_by(self, flow: Flow, at: float) -> None:
        """Make sure the flow's entry is due by ``at``: its deadlines are computed then (or
        earlier), without computing them now (``at`` is no later than any deadline set since
        the flow's entry was pushed; see the module docstring)."""
        scheduled = flow.scheduled_at
        if (scheduled is not None and scheduled <= at) or flow.flow_id not in self._flows_by_id:
            return
        flow.scheduled_at = at
        heapq.heappush(self._heap, (at, flow.flow_id))

    def next_deadline(self) -> float | None:
        heap = self._heap
        while heap:
            deadline, flow_id = heap[0]
            flow = self._flows_by_id.get(flow_id)
            heapq.heappop(heap)
            if flow is None or flow.scheduled_at != deadline:
                continue  # stale: the flow is gone or was rescheduled earlier
            # Push the flow's real earliest deadline: the same one (then it is the answer) or a
            # later one, when its timers moved since this entry was pushed (it waits its turn).
            flow.scheduled_at = None
            self.schedule(flow)
            if flow.scheduled_at == deadline:
                return deadline
        return None

    def due(self, now: float) -> Iterator[Flow]:
        """Flows with an entry due at ``now``; the caller runs their timers and reschedules them."""
        heap = self._heap
        # Bounded: each entry present at the start is popped at most once.
        for _ in range(len(heap)):
            if not heap or heap[0][0] > now:
                return
            deadline, flow_id = heapq.heappop(heap)
            flow = self._flows_by_id.get(flow_id)
            if flow is None or flow.scheduled_at != deadline:
                continue
            flow.scheduled_at = None
            yield flow
