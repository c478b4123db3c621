"""``--state-file PATH``: vhostnet stops and starts again without the guest losing a connection.

A restart is a same-host migration whose state goes through a file instead of QEMU:

- ``StateFile.open`` at start, before vhostnet drops root (``vhostnet.sandbox``):
  PATH is read (a file that is not a state we can decode is renamed PATH.bad
  with one log line: the network starts fresh), then opened for writing, created
  empty (mode 0600) if absent, and kept open: as ``nobody``, under a seccomp
  filter that creates no file, vhostnet can neither create nor rename a file in
  a folder root owns, but it can write one it holds. An empty PATH holds no state.
- ``restore_at_start``: the state is imported into the network before the
  front-end is served (QEMU reconnects and replays the device set-up; the
  guest's NAT state is ours again), then PATH is emptied, which lets the
  previous run's catchers go. Forwarded ports are bound as soon as the catchers
  free them (``listen_retry``).
- ``save_on_exit`` (SIGTERM): the network's state is exported (``export_network``:
  the TCP connections that can move are frozen and dumped), written over PATH
  through the open file (written whole, then cut to its length and synced: the
  next start reads it only once this vhostnet has exited), then released
  (``TcpMigration.release``): frozen sockets close in repair mode, which sends
  neither FIN nor RST; other connections close with RST; forwarded listeners
  close. Until the next vhostnet has restored them, a segment a peer
  retransmits would find no socket and the kernel would answer RST, so the
  migration's catchers (listening sockets with a drop-all filter on the frozen
  connections' local addresses) are handed to a small child process that
  keeps them until PATH is emptied (watched through the open file) or
  ``CATCH_SECONDS`` have passed.

With several guests (``--max-guests N``, N > 1) the state holds every guest's Network
(section ``guests``: one set of ``network_sections`` per Network, with its address as
``key``) and the lease pool (section ``leases``); a restart restores the pool first, then
rebuilds each Network at its address and imports its sections, so a guest reconnecting
with its MAC gets its lease, hence that Network and its connections, back. A guest entry
that cannot be loaded is skipped with one log line; the others are still restored. A
one-guest state loaded with several guests goes to the first guest's Network.

Without TCP_REPAIR (no CAP_NET_ADMIN and no helper connected) nothing can be
frozen: at SIGTERM the host side of every TCP connection is closed with RST
(the peers learn at once); the records are still saved, and at start each one
is reset toward the guest (``tcp.migration_reset``), so the guest's sockets
fail at once instead of after their retransmission timeouts.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Protocol

from vhostnet.migration.snapshot import import_sections, network_sections
from vhostnet.migration.state import MAX_BLOB_BYTES, StateError, decode_state, encode_state
from vhostnet.migration.tcp_migrate import CATCH_SECONDS

if TYPE_CHECKING:
    from vhostnet.migration.tcp_migrate import TcpMigration
    from vhostnet.network import Network

log = logging.getLogger(__name__)

# How long a restart waits for a TCP_REPAIR helper (no CAP_NET_ADMIN) to connect.
HELPER_WAIT_SECONDS = 10.0
# How often the catcher keeper looks whether the state file was emptied.
KEEPER_POLL_SECONDS = 0.05


class GuestNetworks(Protocol):
    """Several guests (``guests.Guests``) as a restart sees them."""

    def all_networks(self) -> list[Network]: ...

    def leases_snapshot(self) -> dict: ...

    def restore_leases(self, snapshot: dict) -> None:
        """``ValueError`` (nothing changed) if ``snapshot`` is malformed."""
        ...

    def network_at(self, address: bytes) -> Network:
        """The Network of the guest at ``address``, made if needed; ``ValueError`` if none can be."""
        ...


class Several:
    """What a restart saves and restores with several guests: every Network and the pool."""

    def __init__(self, guests: GuestNetworks, migration_of: Callable[[Network], TcpMigration]
                 ) -> None:
        self.guests = guests
        self.migration_of = migration_of


class StateFile:
    """The ``--state-file``, opened before privileges are dropped and kept open to the end."""

    def __init__(self, path: str, fd: int, blob: bytes | None) -> None:
        self.path = path
        self.fd = fd
        self.blob = blob  # what a previous run left, until restored

    @classmethod
    def open(cls, path: str) -> StateFile:
        """Read what PATH holds (set aside if it cannot be a state), then hold PATH open for
        writing, created empty if absent; OSError if it cannot be opened."""
        blob = _read_state(path)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        return cls(path, fd, blob)

    @property
    def pending(self) -> bool:
        """A state is waiting to be restored (forwarded ports may still be held)."""
        return self.blob is not None

    def write(self, blob: bytes) -> None:
        """Replace the content by ``blob``, on disk when this returns."""
        written = 0
        while written < len(blob):
            written += os.pwrite(self.fd, memoryview(blob)[written:], written)
        os.ftruncate(self.fd, len(blob))
        os.fsync(self.fd)

    def clear(self) -> None:
        """No state any more: the previous run's catcher keeper lets go."""
        self.blob = None
        os.ftruncate(self.fd, 0)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def save_on_exit(network: Network, migration: TcpMigration, state: StateFile,
                 several: Several | None = None) -> int:
    """Export the network (with ``several``: every guest's and the lease pool) to the state
    file and release its connections silently; the number of TCP connections frozen for the
    next start (0 also when the state could not be written: then they carry on until the
    network closes, which resets them)."""
    now = time.monotonic()
    migrations: list[TcpMigration] = []
    try:
        if several is None:
            migrations.append(migration)
            blob = encode_state(network_sections(network, migration, now))
        else:
            blob = _export_several(several, migrations, now)
    except (OSError, ValueError) as error:
        log.error("cannot export the network state (%s): connections are closed", error)
        _thaw(migrations, "the state export failed", now)
        return 0
    try:
        state.write(blob)
    except OSError as error:
        log.error("cannot write the state file %s (%s): connections are closed", state.path,
                  error.strerror or error)
        _thaw(migrations, "the state file could not be written", now)
        return 0
    with _helper_kept(migrations):
        released = sum(each.release() for each in migrations)
    catchers = [catcher for each in migrations for catcher in each.catchers]
    keeper = _keep_catchers(catchers, state.fd) if catchers else None
    for each in migrations:
        each.close_catchers()  # the keeper has its own copies
    log.info("state saved to %s (%d bytes): %d TCP connection(s) frozen for the next start%s",
             state.path, len(blob), released,
             f", segments for them caught by process {keeper}" if keeper else "")
    return released


def _export_several(several: Several, migrations: list[TcpMigration], now: float) -> bytes:
    """Every guest's Network (its address as ``key``) and the pool; ``migrations`` gets each
    Network's migration as it is exported (frozen: the caller releases or thaws them)."""
    guests = []
    for network in several.guests.all_networks():
        migration = several.migration_of(network)
        migrations.append(migration)
        key = str(ipaddress.IPv4Address(network.config.guest_ipv4))
        guests.append(network_sections(network, migration, now, {"key": key}))
    return encode_state({"leases": several.guests.leases_snapshot(), "guests": guests})


@contextlib.contextmanager
def _helper_kept(migrations: list[TcpMigration]) -> Iterator[None]:
    """The repair helper ``migrations`` share is kept through the block, then let go once."""
    for each in migrations:
        each.keep_helper = True
    try:
        yield
    finally:
        for each in migrations:
            each.keep_helper = False
        if migrations:
            migrations[-1].migration_over()


def _thaw(migrations: list[TcpMigration], reason: str, now: float) -> None:
    for migration in migrations:
        migration.thaw(reason, now)


def _keep_catchers(catchers: list[socket.socket], state_fd: int) -> int | None:
    """Fork a process that holds ``catchers`` until the state file is emptied (the next
    vhostnet restored the connections) or CATCH_SECONDS have passed; its pid. It watches
    the file through ``state_fd``: as nobody it may not reach the file's folder."""
    try:
        pid = os.fork()
    except OSError as error:
        log.warning("cannot fork the catcher keeper (%s): a peer retransmitting before the "
                    "restart gets RST", error)
        return None
    if pid:
        return pid
    try:  # the child: only the catchers stay open, so QEMU sees us gone at once
        keep = {catcher.fileno() for catcher in catchers} | {state_fd}
        for name in os.listdir("/proc/self/fd"):
            if int(name) not in keep:
                with contextlib.suppress(OSError):
                    os.close(int(name))
        deadline = time.monotonic() + CATCH_SECONDS
        while os.fstat(state_fd).st_size > 0 and time.monotonic() < deadline:
            time.sleep(KEEPER_POLL_SECONDS)
    finally:
        os._exit(0)


def _read_state(path: str) -> bytes | None:
    """The state at ``path``: None when absent or empty, or (one log line, the file renamed
    PATH.bad) when it cannot be read or is not a state this vhostnet can decode."""
    try:
        with open(path, "rb") as source:
            blob = source.read(MAX_BLOB_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as error:
        _set_aside(path, f"cannot be read ({error.strerror or error})")
        return None
    if not blob:
        return None
    try:
        decode_state(blob)
    except StateError as error:
        _set_aside(path, f"is not a state this vhostnet can load ({error})")
        return None
    return blob


def _set_aside(path: str, why: str) -> None:
    try:
        os.replace(path, f"{path}.bad")
        kept = f"; kept as {path}.bad"
    except OSError as error:
        kept = f"; cannot rename it ({error.strerror or error})"
    log.error("state file %s %s: starting fresh%s", path, why, kept)


async def restore_at_start(network: Network, migration: TcpMigration, state: StateFile,
                           several: Several | None = None) -> dict[str, int] | None:
    """Import the state a previous vhostnet left (see the module docstring) into ``network``
    (with ``several``: every guest's Network and the pool); what ``import_sections``
    returns (summed over the guests), None when there was no usable state."""
    blob = state.blob
    if blob is None:
        return None
    repair = migration.repair
    if repair is not None and not repair.direct and repair.helper is not None:
        await _wait_for_helper(repair.helper)
    try:
        sections = decode_state(blob)
        if several is not None and "guests" in sections:
            loaded = _import_several(several, sections, time.monotonic())
        else:
            loaded = import_sections(network, migration, sections, time.monotonic())
    except StateError as error:
        # Decoded at open but refused by an engine: no file can be set aside any more.
        log.error("state file %s is not a state this vhostnet can load (%s): starting fresh, "
                  "its content dropped", state.path, error)
        state.clear()
        return None
    state.clear()  # the catcher keeper sees this and lets the forwarded ports go
    guests = f" of {loaded['guests']} guest network(s)" if "guests" in loaded else ""
    log.info("restarted from %s: %d TCP connection(s)%s restored, %d reset toward the guest",
             state.path, loaded["tcp_restored"], guests, loaded["tcp_reset"])
    return loaded


def _import_several(several: Several, sections: dict[str, object], now: float
                    ) -> dict[str, int]:
    """The pool, then each guest's Network at its address; a bad guest entry is skipped
    (one log line each); ``StateError`` if the pool or the list itself is malformed."""
    entries = sections["guests"]
    leases = sections.get("leases")
    if not isinstance(entries, list) or not isinstance(leases, dict):
        raise StateError("the guests or leases section is malformed")
    try:
        several.guests.restore_leases(leases)
    except ValueError as error:
        raise StateError(str(error)) from None
    totals = {"udp_flows": 0, "tcp_restored": 0, "tcp_reset": 0, "guests": 0}
    targets = []
    for entry in entries:
        try:
            if not isinstance(entry, dict):
                raise StateError("a guest entry is not an object")
            network = several.guests.network_at(ipaddress.IPv4Address(entry["key"]).packed)
        except (KeyError, ValueError) as error:  # StateError is a ValueError
            log.error("a guest's saved state is skipped: no guest network for it (%s)", error)
            continue
        targets.append((several.migration_of(network), network, entry))
    with _helper_kept([migration for migration, _, _ in targets]):
        for migration, network, entry in targets:
            try:
                loaded = import_sections(network, migration, entry, now)
            except StateError as error:
                log.error("a guest's saved state is skipped: %s", error)
                continue
            for name, count in loaded.items():
                totals[name] += count
            totals["guests"] += 1
    return totals


async def _wait_for_helper(helper) -> None:  # helper: HelperLink
    deadline = time.monotonic() + HELPER_WAIT_SECONDS
    while not helper.connected and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if not helper.connected:
        log.warning("no repair helper connected to %s within %g s", helper.path,
                    HELPER_WAIT_SECONDS)
