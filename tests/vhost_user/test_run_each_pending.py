"""``run_each_pending``: the network's per-batch glue flushes (vhostnet/vhost_user/ratelimit.py)."""

from __future__ import annotations

import logging
from collections import Counter, deque

from vhostnet.vhost_user.ratelimit import run_each_pending


def test_only_callbacks_with_something_queued_run_and_one_failing_stops_none() -> None:
    ran = []
    empty: deque[str] = deque()
    waiting = deque(["command"])

    def flush_waiting() -> None:
        ran.append("waiting")
        waiting.clear()

    def broken() -> None:
        ran.append("broken")
        raise RuntimeError("glue bug")

    counts: Counter[str] = Counter()
    jobs = ((empty, lambda: ran.append("empty")), (deque(["x"]), broken),
            (waiting, flush_waiting))
    run_each_pending(counts, "glue_flush", logging.getLogger("test"), jobs)
    assert ran == ["broken", "waiting"]
    assert counts == {"glue_flush": 1}
    assert not waiting
    run_each_pending(counts, "glue_flush", logging.getLogger("test"), ((waiting, flush_waiting),))
    assert ran == ["broken", "waiting"], "nothing queued: not called again"
