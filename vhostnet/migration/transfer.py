"""Device state over vhost-user (SET_DEVICE_STATE_FD / CHECK_DEVICE_STATE).

QEMU blocks on the SET_DEVICE_STATE_FD reply before it touches the pipe, so
nothing is written or read here until the event loop runs again, which is
after the server has sent the reply. SAVE streams the blob with non-blocking
writes; LOAD reads to EOF and applies the state at once (it arrives before
the rings are set up). CHECK_DEVICE_STATE reports the outcome.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import TYPE_CHECKING

from vhostnet.migration.snapshot import export_network, import_network
from vhostnet.migration.state import MAX_BLOB_BYTES, StateError

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


class DeviceStateTransfer:
    """One device's state transfers, driven by the event loop (a ``device.DeviceStateHandler``)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, network: Network,
                 migration: TcpMigration) -> None:
        self.loop = loop
        self.network = network
        self.migration = migration
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
            self.buffer += export_network(self.network, self.migration, time.monotonic())
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
            self.loaded = import_network(self.network, self.migration, bytes(self.buffer),
                                         time.monotonic())
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
            if ok:
                migration.release()
            else:
                migration.thaw("the state transfer failed", time.monotonic())
        return ok

    def close(self) -> None:
        self._finish_fd()
