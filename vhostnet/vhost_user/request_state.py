"""What the request handlers of ``BackendHandler`` share.

``RequestState`` declares the protocol state (set up by ``BackendHandler.__init__``)
and the small helpers every request handler uses; the handlers themselves live in
backend.py (features, session, net, migration, the request table),
memory_requests.py (memory table, dirty log) and ring_requests.py (rings). A
handler returns a ``Result`` or raises ``Reject`` (refused, counted, answered with
failure) or ``CloseConnection``.
"""

from __future__ import annotations

import os
from collections import Counter

from vhostnet.vhost_user.device_api import BackendDevice, VringConfig
from vhostnet.vhost_user.protocol import ProtocolFeature, Request
from vhostnet.vhost_user.regions import RegionTable


class Reject(Exception):
    """A request we refuse: counted under ``kind``, answered with failure."""

    def __init__(self, kind: str, text: str) -> None:
        super().__init__(text)
        self.kind = kind


class CloseConnection(Exception):
    """A request that cannot be answered sensibly: the connection ends."""

    def __init__(self, kind: str, text: str) -> None:
        super().__init__(text)
        self.kind = kind


# A handler method returns an explicit reply body (bytes), or None for
# "done, no body" (REPLY_ACK then answers success when asked).
Result = bytes | None


def request_name(request: int) -> str:
    try:
        return Request(request).name
    except ValueError:
        return f"request {request}"


class RequestState:
    """The state of one connection the request handlers read and write."""

    device: BackendDevice
    max_mem_slots: int
    protocol_features: int
    status: int
    regions: RegionTable
    rings: list[VringConfig]
    counters: Counter[str]

    def has_protocol_feature(self, feature: ProtocolFeature) -> bool:
        return bool(self.protocol_features & feature)

    def _take_one_fd(self, fds: list[int], what: str) -> int:
        if not fds:
            raise Reject("missing_fd", f"{what} needs an fd")
        return fds.pop(0)

    @staticmethod
    def _close_fds(fds: list[int]) -> None:
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass
        fds.clear()
