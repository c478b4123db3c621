"""Device state over vhost-user (SET_DEVICE_STATE_FD / CHECK_DEVICE_STATE).

QEMU blocks on the SET_DEVICE_STATE_FD reply before it touches the pipe, so
nothing is written or read here until the event loop runs again, which is
after the server has sent the reply. SAVE streams the blob with non-blocking
writes; LOAD reads to EOF and applies the state at once (it arrives before
the rings are set up). CHECK_DEVICE_STATE reports the outcome.

Whose state moves is the device's ``StateScope``: the one Network (``OneNetwork``, one
guest), or with several guests the Network of the connection's switch port plus that
guest's lease (``GuestPortScope``: the destination binds the port to the same address).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from vhostnet.migration.snapshot import export_network, import_network
from vhostnet.migration.state import MAX_BLOB_BYTES, StateError, decode_state

if TYPE_CHECKING:
    from vhostnet.migration.tcp_migrate import TcpMigration
    from vhostnet.network import Network

log = logging.getLogger(__name__)

SAVE, LOAD = 0, 1
PHASE_STOPPED = 0
READ_CHUNK = 65536
# CHECK_DEVICE_STATE follows QEMU closing its end, so the rest of a LOAD is
# already in the pipe (or the writer blocked until we read it): check() reads
# it without waiting, in at most this many reads. A front-end that keeps the
# pipe open and silent gets a failure at once instead of stalling the loop.
MAX_CHECK_READS = MAX_BLOB_BYTES // READ_CHUNK + 2


class StateScope(Protocol):
    """Whose state a device's transfers move."""

    def saving(self) -> tuple[Network, TcpMigration, dict[str, Any]]:
        """The Network to save, its migration and extra sections; ``StateError`` if none."""
        ...

    def loading(self, sections: dict[str, Any]) -> tuple[Network, TcpMigration]:
        """The Network a blob with ``sections`` goes to; ``StateError`` if none."""
        ...


class OneNetwork:
    """One guest (``--max-guests 1``): the one Network, as it always was."""

    def __init__(self, network: Network, migration: TcpMigration) -> None:
        self.network = network
        self.migration = migration

    def saving(self) -> tuple[Network, TcpMigration, dict[str, Any]]:
        return self.network, self.migration, {}

    def loading(self, sections: dict[str, Any]) -> tuple[Network, TcpMigration]:
        return self.network, self.migration


class PortLeases(Protocol):
    """A guest's switch port (``guests.GuestPort``) as migration sees it."""

    @property
    def network(self) -> Network | None: ...  # its guest's Network once bound

    def export_lease(self) -> dict[str, Any] | None: ...  # its guest's lease record

    def import_lease(self, record: dict[str, Any]) -> Network | None:
        """Take the lease record in and bind to its Network (None: refused, logged)."""
        ...


class GuestPortScope:
    """Several guests: a connection's state is its port's Network's, plus the lease."""

    def __init__(self, port: PortLeases,
                 migration_of: Callable[[Network], TcpMigration]) -> None:
        self.port = port
        self.migration_of = migration_of

    def saving(self) -> tuple[Network, TcpMigration, dict[str, Any]]:
        network = self.port.network
        if network is None:
            raise StateError("this guest has sent nothing yet: no state to save")
        return network, self.migration_of(network), {"lease": self.port.export_lease()}

    def loading(self, sections: dict[str, Any]) -> tuple[Network, TcpMigration]:
        lease = sections.get("lease")
        if not isinstance(lease, dict):
            raise StateError("the state carries no guest lease (a one-guest vhostnet's?)")
        network = self.port.import_lease(lease)
        if network is None:
            raise StateError("the migrated guest's lease cannot be taken here")
        return network, self.migration_of(network)


class DeviceStateTransfer:
    """One device's state transfers, driven by the event loop (a ``device.DeviceStateHandler``)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, scope: StateScope) -> None:
        self.loop = loop
        self.scope = scope
        self.migration: TcpMigration | None = None  # of the last transfer's Network
        self.fd: int | None = None
        self.direction: int | None = None
        self.buffer = bytearray()
        self.written = 0
        self.result: bool | None = None  # outcome of the last transfer, None while running
        self.loaded: dict[str, int] | None = None

    def begin(self, direction: int, phase: int, fd: int) -> bool:
        """Take ``fd`` (always closed here); False refuses the transfer."""
        self._finish_fd()
        if phase != PHASE_STOPPED or direction not in (SAVE, LOAD):
            os.close(fd)
            log.error("device state: unsupported transfer (direction %d, phase %d)", direction, phase)
            return False
        os.set_blocking(fd, False)
        self.fd, self.direction, self.result = fd, direction, None
        self.buffer = bytearray()
        self.written = 0
        if direction == SAVE:
            try:
                network, self.migration, extra = self.scope.saving()
            except StateError as exc:
                log.error("device state: %s", exc)
                self._done(False)
                return False
            self.buffer += export_network(network, self.migration, time.monotonic(), extra)
            log.info("device state: saving %d bytes", len(self.buffer))
            self.loop.add_writer(fd, self._on_writable)
        else:
            self.loop.add_reader(fd, self._on_readable)
        return True

    def _on_writable(self) -> None:
        assert self.fd is not None
        try:
            self.written += os.write(self.fd, memoryview(self.buffer)[self.written:])
        except BlockingIOError:
            return
        except OSError as exc:
            log.error("device state: writing the state failed (%s)", exc)
            self._done(False)
            return
        if self.written >= len(self.buffer):
            self._done(True)

    def _on_readable(self) -> None:
        self._read_some()

    def _read_some(self) -> bool | None:
        """Read what is there: True when the transfer ended (EOF or error), False after
        reading some, None when the pipe is empty but still open."""
        assert self.fd is not None
        try:
            chunk = os.read(self.fd, READ_CHUNK)
        except BlockingIOError:
            return None
        except OSError as exc:
            log.error("device state: reading the state failed (%s)", exc)
            self._done(False)
            return True
        if chunk:
            self.buffer += chunk
            if len(self.buffer) > MAX_BLOB_BYTES:
                log.error("device state from the source is larger than %d bytes; refused", MAX_BLOB_BYTES)
                self._done(False)
                return True
            return False
        self._apply_loaded()
        return True

    def _apply_loaded(self) -> None:
        try:
            blob = bytes(self.buffer)
            network, self.migration = self.scope.loading(decode_state(blob))
            self.loaded = import_network(network, self.migration, blob, time.monotonic())
        except StateError as exc:
            log.error("device state from the migration source refused: %s", exc)
            self._done(False)
            return
        self._done(True)

    def _done(self, ok: bool) -> None:
        self._finish_fd()
        self.result = ok
        self.buffer = bytearray()

    def _finish_fd(self) -> None:
        if self.fd is None:
            return
        if self.direction == SAVE:
            self.loop.remove_writer(self.fd)
        else:
            self.loop.remove_reader(self.fd)
        os.close(self.fd)
        self.fd = None

    def check(self) -> bool:
        """CHECK_DEVICE_STATE: finish a LOAD still in the pipe, then report success."""
        if self.fd is not None and self.direction == LOAD:
            for _ in range(MAX_CHECK_READS):
                if self._read_some() is not False:
                    break
        if self.fd is not None:
            log.error("device state: CHECK_DEVICE_STATE before the state was written")
            self._done(False)
        ok = bool(self.result)
        if not ok:
            log.error("device state check failed: this side keeps its own state")
        self.result = None
        if self.direction == SAVE:
            # The state is out: the last moment QEMU tells us about before the
            # destination needs the 4-tuples (see tcp_migrate's docstring).
            migration = self.migration
            if migration is None:
                return ok
            if ok:
                migration.release()
            else:
                migration.thaw("the state transfer failed", time.monotonic())
        return ok

    def close(self) -> None:
        self._finish_fd()
