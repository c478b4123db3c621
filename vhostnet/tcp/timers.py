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
        deadline = flow.next_deadline()
        if deadline is None:
            return
        if flow.scheduled_at is None or deadline < flow.scheduled_at:
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
            if flow.next_deadline() == deadline:
                heapq.heappush(heap, (deadline, flow_id))
                return deadline
            # The flow's timers moved later since this entry was pushed: requeue it.
            flow.scheduled_at = None
            self.schedule(flow)
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
