"""Flat event counters and log-once reporting shared by every stack engine.

Counters are plain dotted names ("ipv4.rx", "ipv4.drop.bad_checksum") so the
integrator can print or export them without knowing each engine's structure.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable


def add_counts(total: dict[str, int], counts: dict[str, int]) -> None:
    """Add ``counts`` into ``total``, name by name."""
    for name, value in counts.items():
        total[name] = total.get(name, 0) + value


class Counters:
    """A bag of named integer counters plus a "log this kind of problem once" helper.

    Logging once per key matters because a misbehaving guest can send millions
    of identical bad frames; the counter keeps the total, the log keeps the cause.
    """

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self._values: Counter[str] = Counter()
        self._logged: set[str] = set()
        self._sources: list[Callable[[], dict[str, int]]] = []
        self._logger = logger or logging.getLogger("vhostnet.stack")

    def inc(self, name: str, amount: int = 1) -> None:
        self._values[name] += amount

    def set(self, name: str, value: int) -> None:
        """Record a gauge (a current level such as the number of open flows)."""
        self._values[name] = value

    def add_source(self, source: Callable[[], dict[str, int]]) -> None:
        """Counts kept elsewhere as plain integers (a per-event path saves a call per count):
        ``source()`` answers those made since its last call, by name, and starts again from
        zero; they are added here whenever the counters are read."""
        self._sources.append(source)

    def _collect(self) -> None:
        for source in self._sources:
            for name, amount in source().items():
                self._values[name] += amount

    def get(self, name: str) -> int:
        if self._sources:
            self._collect()
        return self._values.get(name, 0)

    def drop(self, name: str, message: str = "") -> None:
        """Count a dropped input under ``name`` and log the first occurrence."""
        self._values[name] += 1
        self.log_once(name, message or f"dropped: {name}")

    def log_once(self, key: str, message: str, level: int = logging.WARNING) -> None:
        if key in self._logged:
            return
        self._logged.add(key)
        self._logger.log(level, "%s (further occurrences only counted)", message)

    def log_exception_once(self, key: str, message: str) -> None:
        """Log the current exception with its traceback, the first time only."""
        if key in self._logged:
            return
        self._logged.add(key)
        self._logger.exception("%s (further occurrences only counted)", message)

    def restore(self, values: dict[str, int]) -> None:
        """Take over counters from a migration source (added to our own)."""
        for name, value in values.items():
            if isinstance(name, str) and isinstance(value, int) and value >= 0:
                self._values[name] += value

    def snapshot(self) -> dict[str, int]:
        if self._sources:
            self._collect()
        return dict(self._values)


class PlainCounts:
    """Counts kept as plain integer attributes for a path that runs per frame or per segment
    (an attribute add instead of a ``Counters.inc`` call), joined to ``stats`` under their
    counter names whenever the counters are read (``Counters.add_source``).

    A subclass names its attributes in ``NAMES`` (attribute -> counter name) and declares
    ``__slots__ = tuple(NAMES)``.
    """

    __slots__ = ()
    NAMES: dict[str, str] = {}

    def __init__(self, stats: Counters) -> None:
        for attribute in self.NAMES:
            setattr(self, attribute, 0)
        stats.add_source(self.take)

    def take(self) -> dict[str, int]:
        """The counts made since the last call, by counter name (none of zero); restart."""
        counts = {}
        for attribute, name in self.NAMES.items():
            value = getattr(self, attribute)
            if value:
                counts[name] = value
                setattr(self, attribute, 0)
        return counts
