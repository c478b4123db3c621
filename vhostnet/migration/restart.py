"""``--state-file PATH``: vhostnet stops and starts again without the guest losing a connection.

A restart is a same-host migration whose state goes through a file instead of QEMU:

- ``save_on_exit`` (SIGTERM): the network's state is exported (``export_network``:
  the TCP connections that can move are frozen and dumped), written to PATH
  atomically (a temporary file renamed over it, mode 0600), then released
  (``TcpMigration.release``): frozen sockets close in repair mode, which sends
  neither FIN nor RST; other connections close with RST; forwarded listeners
  close. Until the next vhostnet has restored them, a segment a peer
  retransmits would find no socket and the kernel would answer RST, so the
  migration's catchers (listening sockets with a drop-all filter on the frozen
  connections' local addresses) are handed to a small child process that
  keeps them until PATH is gone or ``CATCH_SECONDS`` have passed.
- ``restore_at_start``: PATH is read and checked (a file that is not a state
  we can load is renamed PATH.bad with one log line: the network starts
  fresh), imported into the network before the front-end is served (QEMU
  reconnects and replays the device set-up; the guest's NAT state is ours
  again), then removed, which lets the catchers go. Forwarded ports are bound
  as soon as the catchers free them (``listen_retry``).

Without TCP_REPAIR (no CAP_NET_ADMIN and no helper connected) nothing can be
frozen: at SIGTERM the host side of every TCP connection is closed with RST
(the peers learn at once); the records are still saved, and at start each one
is reset toward the guest (``tcp.migration_reset``), so the guest's sockets
fail at once instead of after their retransmission timeouts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from typing import TYPE_CHECKING

from vhostnet.migration.snapshot import export_network, import_network
from vhostnet.migration.state import MAX_BLOB_BYTES, StateError
from vhostnet.migration.tcp_migrate import CATCH_SECONDS

if TYPE_CHECKING:
    from vhostnet.migration.tcp_migrate import TcpMigration
    from vhostnet.network import Network

log = logging.getLogger(__name__)

# How long a restart waits for a TCP_REPAIR helper (no CAP_NET_ADMIN) to connect.
HELPER_WAIT_SECONDS = 10.0
# How often the catcher keeper looks whether the state file is gone.
KEEPER_POLL_SECONDS = 0.05


def state_pending(path: str | None) -> bool:
    """A state is waiting to be restored at ``path`` (forwarded ports may still be held)."""
    return path is not None and os.path.exists(path)


def write_state(path: str, blob: bytes) -> None:
    """Write ``blob`` to ``path`` atomically: a reader sees the old file or the whole new one."""
    temporary = f"{path}.tmp.{os.getpid()}"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(blob)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def save_on_exit(network: Network, migration: TcpMigration, path: str) -> int:
    """Export the network to ``path`` and release its connections silently; the number of
    TCP connections frozen for the next start (0 also when the state could not be written:
    then they carry on until the network closes, which resets them)."""
    now = time.monotonic()
    try:
        blob = export_network(network, migration, now)
    except (OSError, ValueError) as error:
        log.error("cannot export the network state (%s): connections are closed", error)
        migration.thaw("the state export failed", now)
        return 0
    try:
        write_state(path, blob)
    except OSError as error:
        log.error("cannot write the state file %s (%s): connections are closed", path,
                  error.strerror or error)
        migration.thaw("the state file could not be written", now)
        return 0
    released = migration.release()
    keeper = _keep_catchers(migration.catchers, path) if migration.catchers else None
    migration.close_catchers()  # the keeper has its own copies
    log.info("state saved to %s (%d bytes): %d TCP connection(s) frozen for the next start%s",
             path, len(blob), released,
             f", segments for them caught by process {keeper}" if keeper else "")
    return released


def _keep_catchers(catchers: list[socket.socket], path: str) -> int | None:
    """Fork a process that holds ``catchers`` until ``path`` is gone (the next vhostnet
    restored the connections) or CATCH_SECONDS have passed; its pid."""
    try:
        pid = os.fork()
    except OSError as error:
        log.warning("cannot fork the catcher keeper (%s): a peer retransmitting before the "
                    "restart gets RST", error)
        return None
    if pid:
        return pid
    try:  # the child: only the catchers stay open, so QEMU sees us gone at once
        keep = {catcher.fileno() for catcher in catchers}
        for name in os.listdir("/proc/self/fd"):
            if int(name) not in keep:
                with contextlib.suppress(OSError):
                    os.close(int(name))
        deadline = time.monotonic() + CATCH_SECONDS
        while os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(KEEPER_POLL_SECONDS)
    finally:
        os._exit(0)


def read_state(path: str) -> bytes | None:
    """The blob at ``path``; None (one log line, the file renamed PATH.bad) if unreadable."""
    try:
        with open(path, "rb") as source:
            blob = source.read(MAX_BLOB_BYTES + 1)
    except OSError as error:
        _set_aside(path, f"cannot be read ({error.strerror or error})")
        return None
    return blob


def _set_aside(path: str, why: str) -> None:
    try:
        os.replace(path, f"{path}.bad")
        kept = f"; kept as {path}.bad"
    except OSError as error:
        kept = f"; cannot rename it ({error.strerror or error})"
    log.error("state file %s %s: starting fresh%s", path, why, kept)


async def restore_at_start(network: Network, migration: TcpMigration, path: str
                           ) -> dict[str, int] | None:
    """Import the state a previous vhostnet left at ``path`` (see the module docstring);
    what ``import_network`` returns, None when there was no usable state."""
    if not os.path.exists(path):
        return None
    blob = read_state(path)
    if blob is None:
        return None
    repair = migration.repair
    if repair is not None and not repair.direct and repair.helper is not None:
        await _wait_for_helper(repair.helper)
    try:
        loaded = import_network(network, migration, blob, time.monotonic())
    except StateError as error:
        _set_aside(path, f"is not a state this vhostnet can load ({error})")
        return None
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # the catcher keeper sees this and lets the forwarded ports go
    log.info("restarted from %s: %d TCP connection(s) restored, %d reset toward the guest",
             path, loaded["tcp_restored"], loaded["tcp_reset"])
    return loaded


async def _wait_for_helper(helper) -> None:  # helper: HelperLink
    deadline = time.monotonic() + HELPER_WAIT_SECONDS
    while not helper.connected and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if not helper.connected:
        log.warning("no repair helper connected to %s within %g s", helper.path,
                    HELPER_WAIT_SECONDS)
