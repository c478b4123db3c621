"""The TCP engine's timer queue: one heap entry per flow for its earliest deadline.

A flow has several timers (SYN, retransmission, FIN, idle); keeping all of
them in a heap would mean a push on every segment, since the idle deadline
moves each time. Instead the heap holds at most one live entry per flow,
``flow.scheduled_at``, pushed only when a deadline becomes *earlier*. When an
entry comes due and the flow's real deadline has moved later, it is simply
pushed again. Entries for gone flows or superseded deadlines are skipped.
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
        # Called after every event of a flow (several per request/response): the earliest
        # deadline is computed here, without a call per timer.
        deadline = flow.idle_at
        for at in (flow.rto_at, flow.ack_owed_at, flow.syn_at, flow.fin_at):
            if at is not None and (deadline is None or at < deadline):
                deadline = at
        if deadline is None:
            return
        scheduled = flow.scheduled_at
        if scheduled is None or deadline < scheduled:
            if flow.flow_id not in self._flows_by_id:
                return
            flow.scheduled_at = deadline
            heapq.heappush(self._heap, (deadline, flow.flow_id))

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
