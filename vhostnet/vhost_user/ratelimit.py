"""Log lines rate-limited per reason, and callbacks that survive their own exceptions.

A hostile front-end or guest can trigger the same problem thousands of times
a second, across reconnects; the log must stay readable and bounded. Per
reason, the first line goes out at once; later ones within ``INTERVAL`` are
only counted, and ``summarise()`` (called from the network timer) writes one
"N more" line per reason once its interval has passed. The limiter is
process-wide on purpose: it outlives connections.

Tracebacks are for developers: ``log_failure`` adds one only when debug
logging is on.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sized
from dataclasses import dataclass
from typing import Any

INTERVAL = 60.0


@dataclass
class _Reason:
    logger: logging.Logger
    level: int
    last: float
    suppressed: int = 0


class RateLimiter:
    """Per-reason log rate limit with a periodic summary of what was held back."""

    def __init__(self, interval: float = INTERVAL, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self.clock = clock
        self._reasons: dict[str, _Reason] = {}

    def log(self, logger: logging.Logger, level: int, reason: str, message: str, *args: Any,
            exc_info: BaseException | None = None) -> bool:
        """Log ``message`` unless ``reason`` was logged in the last interval; True if logged."""
        now = self.clock()
        state = self._reasons.get(reason)
        if state is not None and now - state.last < self.interval:
            state.suppressed += 1
            return False
        if state is not None and state.suppressed:
            self._summary(reason, state)
        self._reasons[reason] = _Reason(logger, level, now)
        logger.log(level, message, *args, exc_info=exc_info)
        return True

    def reset(self) -> None:
        """Forget every reason (tests start from a clean slate)."""
        self._reasons.clear()

    def summarise(self) -> None:
        """Write "N more" for every reason whose interval has passed with lines held back."""
        now = self.clock()
        for reason, state in self._reasons.items():
            if state.suppressed and now - state.last >= self.interval:
                self._summary(reason, state)
                state.last = now

    @staticmethod
    def _summary(reason: str, state: _Reason) -> None:
        state.logger.log(state.level, "%d more '%s' problem(s) since the last report", state.suppressed, reason)
        state.suppressed = 0


limiter = RateLimiter()


def log_failure(logger: logging.Logger, reason: str, message: str, *args: Any,
                error: BaseException) -> None:
    """One rate-limited error line for an unexpected exception (traceback only with debug logging)."""
    detail = error if logger.isEnabledFor(logging.DEBUG) else None
    limiter.log(logger, logging.ERROR, reason, message + ": %r", *args, error, exc_info=detail)


def run_guarded(counts: Counter[str], reason: str, logger: logging.Logger,
                callback: Callable[..., Any], *args: Any) -> bool:
    """Run ``callback``; an exception is counted under ``reason``, logged (rate-limited), and swallowed.

    For timers and event callbacks that must keep running (and rescheduling) whatever one
    call hits. Returns False if it raised.
    """
    try:
        callback(*args)
    except Exception as error:
        _failed(counts, reason, logger, callback, error)
        return False
    return True


def run_each_pending(counts: Counter[str], reason: str, logger: logging.Logger,
                     jobs: Iterable[tuple[Sized, Callable[[], Any]]]) -> None:
    """``run_guarded`` for each (queue, callback) of ``jobs`` whose queue holds something, in
    turn (one raising does not stop the others), without a call frame per callback, nor a
    call for an empty queue: for a per-packet loop."""
    for queue, callback in jobs:
        if not queue:
            continue
        try:
            callback()
        except Exception as error:
            _failed(counts, reason, logger, callback, error)


def _failed(counts: Counter[str], reason: str, logger: logging.Logger,
            callback: Callable[..., Any], error: Exception) -> None:
    counts[reason] += 1
    log_failure(logger, reason, "%s failed", getattr(callback, "__qualname__", reason), error=error)
