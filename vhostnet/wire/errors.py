"""The one error every checked wire view raises.

``MalformedPacket.reason`` is a short identifier that becomes the last part of
a drop counter name (``Counters.drop``), so every kind of bad input is counted
separately and logged only once.
"""

from __future__ import annotations


class MalformedPacket(ValueError):
    """Raised by a wire view when the bytes cannot be what they claim to be."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
