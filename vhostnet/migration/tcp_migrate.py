"""Moving established TCP connections with their host sockets (TCP_REPAIR), both ends.

Source, in three steps:

1. ``export_records`` (QEMU 10: SET_DEVICE_STATE_FD SAVE; QEMU 7.2:
   ``save-state``): pending socket work is flushed, each movable connection's
   socket is taken from the glue, *frozen* (repair mode, a minimum TTL of 255
   and a closed receive window, plus a drop-all socket filter where the host
   allows it; see ``tcp_freeze``) and dumped with its window as it was
   before. The guest is stopped at this point, so nothing changes the
   engine's side meanwhile.
2. ``release`` (QEMU 10: CHECK_DEVICE_STATE after a complete SAVE; QEMU 7.2:
   the ``release`` command): the frozen sockets are closed in repair mode,
   which sends nothing (no FIN, no RST), so a destination on the same host
   can take the same 4-tuples; the other connections are closed with RST;
   listeners close so the destination can bind the forwarded ports.
   Until the destination has re-created a connection, a segment the peer
   retransmits would find no socket and the kernel would answer with RST,
   killing it. So before closing, each frozen socket's local address gets a
   *catcher*: a listening socket (bound in repair mode, which ignores the
   address being in use) shut out from peers like a frozen socket (minimum
   TTL 255, the drop-all filter where allowed), which swallows those
   segments. A restored connected socket takes precedence over a listener,
   so catchers do not disturb the destination; they close after
   ``CATCH_SECONDS`` (a forwarded port is free for the destination's
   listener only then).
3. or ``thaw`` instead (the device is started again, i.e. QEMU resumed the
   guest here; a SAVE that failed; the ``resume`` command): filter, TTL,
   receive window back, repair off, sockets back to the glue, data flows
   again. The peer's segments dropped meanwhile come back with its
   retransmissions.

QEMU 10 does not tell the source back-end that the destination succeeded; the
last point it hears from before the destination needs the 4-tuples is the
CHECK_DEVICE_STATE of its SAVE. A migration that fails after that leaves
the source without its connections (logged); one that fails before keeps them.

Destination, ``restore``: each record with a host socket gets a new socket,
repair on, bind/sequence numbers/connect (waiting a bounded time for the
source's release)/queues (the send queue's sent part)/options/window, repair
off, the never-sent tail of the send queue written normally (so it leaves
without waiting for a retransmission timeout), adopted by the glue; the
engine's flow is re-created with the same wire sequence numbers. Data that was
in flight to the guest is sent again (the guest drops duplicates); its
unacknowledged bytes are still in the restored receive queue. A connection
that fails to restore is reset toward the guest; the others carry on.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import TYPE_CHECKING

from vhostnet.migration.repair_helper import (
    HelperGone,
    RepairAccess,
    RepairSwitch,
    freeze_sockets,
    repair_on_shut_out,
)
from vhostnet.migration.tcp_freeze import dump_frozen, unfreeze_sockets
from vhostnet.migration.tcp_repair import (
    REPAIR_OFF,
    K,
    RepairError,
    in_repair,
    new_restore_socket,
    restore_in_repair,
    send_unsent,
)
from vhostnet.migration.tcp_state import (
    TcpRecord,
    export_connections,
    migratable,
    reset_toward_guest,
)
from vhostnet.tcp.handover import restore_flow, resume_host_io
from vhostnet.tcp.host import TcpHost
from vhostnet.tcp.host_sockets import abort_close, send_space

if TYPE_CHECKING:
    from vhostnet.network import Network

log = logging.getLogger(__name__)

# How long the destination waits for the source to release a 4-tuple.
RELEASE_WAIT_SECONDS = 5.0
# How long the source swallows segments for released connections (see above):
# the destination must have restored them by then.
CATCH_SECONDS = 60.0


def _switch_off(socks: dict[int, socket.socket], switch: RepairSwitch | None) -> set[int]:
    """Repair mode off for all; the flow ids of sockets left in repair mode.

    Only sockets actually in repair mode are asked about: after a helper died
    during "repair on", some or all may never have been switched.
    """
    socks = {flow_id: sock for flow_id, sock in socks.items() if in_repair(sock)}
    if not socks:
        return set()
    if switch is None:
        log.error("TCP_REPAIR cannot be switched any more: %d frozen connection(s) reset",
                  len(socks))
        return set(socks)
    try:
        switch.set_repair(list(socks.values()), REPAIR_OFF)
        return set()
    except HelperGone as error:
        log.error("%s: %d connection(s) left in repair mode are reset toward the guest",
                  error.strerror, len(socks))
        return set(socks)
    except RepairError:
        pass
    stuck = set()
    for flow_id, sock in socks.items():  # one by one, to find which ones refused
        try:
            switch.set_repair([sock], REPAIR_OFF)
        except RepairError as error:
            log.error("TCP flow %d: repair mode stuck on (%s); resetting it", flow_id, error)
            stuck.add(flow_id)
    return stuck


def _repair_new_sockets(socks: dict[K, socket.socket], switch: RepairSwitch
                        ) -> dict[K, socket.socket]:
    """``repair_on_shut_out`` for sockets of our own making (catchers, restores): those
    shut out from their peers; the others are closed, all of them on ``RepairError``."""
    kept: dict[K, socket.socket] = {}
    try:
        kept = repair_on_shut_out(socks, switch)
    finally:
        for key, sock in socks.items():
            if key not in kept:
                sock.close()
    return kept


class TcpMigration:
    """The TCP part of a migration for one ``Network`` (see the module docstring)."""

    def __init__(self, network: Network, repair: RepairAccess | None = None) -> None:
        self.network = network
        self.repair = repair
        self.frozen: dict[int, socket.socket] = {}
        self.exported = False  # a state was saved since the last release or thaw
        self.handed_over = 0  # connections released to a destination, lost if QEMU resumes here
        self.catchers: list[socket.socket] = []
        # A restart of several guests' Networks shares one helper: it is let go once, after
        # the last Network (``restart``), not at each one's end.
        self.keep_helper = False

    @classmethod
    def attach(cls, network: Network, repair: RepairAccess | None = None) -> TcpMigration:
        """The migration of ``network``, hooked in: a device start thaws frozen connections,
        closing the network closes the catchers."""
        migration = cls(network, repair)
        network.add_device_started_hook(migration.device_started)
        network.add_close_hook(migration.close_catchers)
        return migration

    def _switch(self) -> RepairSwitch | None:
        if self.repair is None:
            self.repair = RepairAccess.probe()
        return self.repair.switch()

    # ---- source ---------------------------------------------------------------------

    def export_records(self, now: float) -> list[dict[str, object]]:
        engine, host = self.network.tcp, self.network.tcp_host
        if engine is None:
            return []
        if self.frozen:
            self._thaw_frozen("a new state export started", now)
        self.exported = True
        self.network.flush()  # acknowledged bytes leave the sockets before the dump
        dumps: dict[int, dict[str, object]] = {}
        movable = [f.flow_id for f in engine.flows_by_id.values() if migratable(f)]
        switch = self._switch()
        if movable and (switch is None or host is None):
            log.warning("TCP_REPAIR unavailable: %d TCP connection(s) will be reset toward the "
                        "guest after the migration", len(movable))
        elif movable:
            dumps = self._freeze(movable, switch, host)
        return export_connections(engine, dumps)

    def _freeze(self, flow_ids: list[int], switch: RepairSwitch,
                host: TcpHost) -> dict[int, dict[str, object]]:
        stats = self.network.tcp.stats
        socks: dict[int, socket.socket] = {}
        for flow_id in flow_ids:
            sock = host.detach(flow_id)
            if sock is not None:
                socks[flow_id] = sock
        try:
            frozen = freeze_sockets(socks, switch)
        except RepairError as error:
            # One line for a helper that went away: what it costs.
            log.error("TCP_REPAIR on failed (%s): %d connection(s) could not be frozen and will "
                      "be reset toward the guest after the migration", error.strerror or error,
                      len(socks))
            frozen = {}
        if len(frozen) < len(socks):
            unfrozen = {k: s for k, s in socks.items() if k not in frozen}
            stats.inc("tcp.migration_freeze_failed", len(unfrozen))
            self._thaw_some(unfrozen, switch, time.monotonic())  # carry on until released
        socks = self.frozen = frozen
        dumps: dict[int, dict[str, object]] = {}
        queued = 0
        for flow_id, sock in list(socks.items()):
            try:
                dump = dump_frozen(sock)
            except RepairError as error:
                log.warning("TCP flow %d: dump failed (%s); it will be reset", flow_id, error)
                stats.inc("tcp.migration_dump_failed")
                self._thaw_some({flow_id: self.frozen.pop(flow_id)}, switch, time.monotonic())
                continue
            dumps[flow_id] = dump.to_record()
            queued += dump.queued_bytes
        stats.inc("tcp.migration_frozen", len(dumps))
        log.info("froze %d TCP connection(s) for migration (%d queued bytes)", len(dumps), queued)
        return dumps

    def release(self) -> int:
        """The state is out: close frozen sockets silently, everything else with RST."""
        engine, host = self.network.tcp, self.network.tcp_host
        if engine is None or host is None:
            self.migration_over()
            return 0
        if not self.exported:
            # Closing every connection and listener without a saved state would
            # only break this side.
            raise RuntimeError("no state was saved since the last release or resume: "
                               "nothing to release")
        self.exported = False
        released = len(self.frozen)
        self._open_catchers([sock.getsockname()[:2] for sock in self.frozen.values()])
        self.migration_over()  # after the catchers: they need repair mode too
        for sock in self.frozen.values():
            sock.close()  # repair mode: neither FIN nor RST
        self.frozen.clear()
        others = 0
        for flow in list(engine.flows_by_id.values()):
            engine.table.remove(flow)  # no segment, no command: the socket goes below
            sock = host.detach(flow.flow_id)
            if sock is not None:
                abort_close(sock)
                others += 1
        host.close_listeners()
        self.handed_over = released
        engine.stats.inc("tcp.migration_released", released)
        log.info("migration: released %d frozen TCP connection(s) silently, closed %d other(s); "
                 "forwarded ports closed", released, others)
        return released

    def _open_catchers(self, addresses: list[tuple[str, int]]) -> None:
        switch = self._switch()
        catchers = {address: socket.socket(socket.AF_INET6 if ":" in address[0]
                                           else socket.AF_INET, socket.SOCK_STREAM)
                    for address in set(addresses)}
        if not catchers or switch is None:
            return
        try:
            catchers = _repair_new_sockets(catchers, switch)  # repair mode binds a used address
        except RepairError as error:
            log.warning("cannot set up catchers (%s): a peer retransmitting before the "
                        "destination restored its connection gets RST", error)
            return
        for address, catcher in catchers.items():
            try:
                catcher.bind(address)
                catcher.listen(1)
            except OSError as error:
                log.warning("cannot catch segments for %s:%d: %s", *address, error)
                catcher.close()
                continue
            self.catchers.append(catcher)
        self.network.loop.call_later(CATCH_SECONDS, self.close_catchers)

    def close_catchers(self) -> None:
        for catcher in self.catchers:
            catcher.close()
        self.catchers.clear()

    def thaw(self, reason: str, now: float) -> int:
        """The migration is abandoned: frozen connections carry on here."""
        resumed = self._thaw_frozen(reason, now)
        self.migration_over()
        return resumed

    def _thaw_frozen(self, reason: str, now: float) -> int:
        self.exported = False
        if not self.frozen:
            return 0
        frozen, self.frozen = self.frozen, {}
        switch = self._switch()
        resumed = self._thaw_some(frozen, switch, now)
        log.warning("migration abandoned (%s): %d TCP connection(s) resumed here", reason, resumed)
        return resumed

    def migration_over(self) -> None:
        """This side's part is done: a helper is let go, as passt does with passt-repair."""
        if self.repair is not None and not self.keep_helper:
            self.repair.migration_over()

    def _thaw_some(self, socks: dict[int, socket.socket], switch: RepairSwitch | None,
                   now: float) -> int:
        engine, host = self.network.tcp, self.network.tcp_host
        assert engine is not None and host is not None
        unfreeze_sockets(socks.values())  # first: the window probe's answer must get in
        stuck = _switch_off(socks, switch)
        resumed = 0
        for flow_id, sock in socks.items():
            flow = engine.flows_by_id.get(flow_id)
            if flow is None:  # the engine gave up on it meanwhile
                abort_close(sock)
                continue
            host.adopt(flow_id, sock)
            if flow_id in stuck:
                engine.on_host_error(flow_id, 0, now)  # RST to the guest; the socket goes
                continue
            resume_host_io(engine, flow_id, now)
            resumed += 1
        engine.stats.inc("tcp.migration_thawed", resumed)
        self.network.flush()
        return resumed

    def device_started(self, now: float) -> None:
        """The device runs again on this side: a migration did not complete."""
        if self.frozen:
            self.thaw("the guest was resumed on this side", now)
        elif self.handed_over:
            log.error("the guest was resumed here after its %d TCP connection(s) were handed to "
                      "the migration destination: they are gone here", self.handed_over)
            self.handed_over = 0

    # ---- destination --------------------------------------------------------------

    def restore(self, records: list[TcpRecord], now: float) -> tuple[int, int]:
        """Re-create connections from checked records; (restored, reset toward the guest)."""
        engine, host = self.network.tcp, self.network.tcp_host
        if engine is None:
            return 0, 0
        resets = [r for r in records if r.host is None or r.key in engine.flows]
        movable = [r for r in records if r.host is not None and r.key not in engine.flows]
        switch = self._switch()
        if movable and (switch is None or host is None):
            log.warning("TCP_REPAIR unavailable here: %d TCP connection(s) reset toward the guest",
                        len(movable))
            resets += movable
            movable = []
        restored: list[tuple[TcpRecord, socket.socket]] = []
        if movable:
            assert switch is not None
            restored, failed = self._restore_sockets(movable, switch)
            resets += failed
        for record, sock in restored:
            self._recreate_flow(record, sock, now)
        reset = reset_toward_guest(engine, resets) if resets else 0
        if restored:
            engine.stats.inc("tcp.migration_restored", len(restored))
            log.info("restored %d TCP connection(s) from the migration source", len(restored))
        if reset:
            log.warning("%d TCP connection(s) could not move with the guest; reset toward the "
                        "guest", reset)
        self.network.flush()
        return len(restored), reset

    def _restore_sockets(self, records: list[TcpRecord], switch: RepairSwitch
                         ) -> tuple[list[tuple[TcpRecord, socket.socket]], list[TcpRecord]]:
        stats = self.network.tcp.stats
        fresh = {index: new_restore_socket(record.host.family)  # type: ignore[union-attr]
                 for index, record in enumerate(records)}
        try:
            # Shut out too: nothing the peer sends may meet a half-restored socket.
            repaired = _repair_new_sockets(fresh, switch)
        except RepairError as error:
            log.error("TCP_REPAIR on failed on the destination (%s): %d connection(s) reset "
                      "toward the guest", error.strerror or error, len(records))
            return [], records
        pairs = [(records[index], sock) for index, sock in repaired.items()]
        deadline = time.monotonic() + RELEASE_WAIT_SECONDS
        done: list[tuple[TcpRecord, socket.socket]] = []
        failed: list[TcpRecord] = []
        for record, sock in pairs:
            assert record.host is not None
            try:
                restore_in_repair(sock, record.host,
                                  wait_for_tuple=max(0.0, deadline - time.monotonic()))
                done.append((record, sock))
            except RepairError as error:
                log.warning("TCP connection %s:%d -> %s:%d not restored: %s",
                            *record.host.local, *record.host.peer, error)
                stats.inc("tcp.migration_restore_failed")
                sock.close()  # still in repair mode: nothing reaches the peer
                failed.append(record)
        try:
            unfreeze_sockets(sock for _, sock in done)
            switch.set_repair([sock for _, sock in done], REPAIR_OFF)
        except RepairError as error:
            log.error("TCP_REPAIR off failed on the destination (%s)", error)
            for _, sock in done:
                sock.close()
            return [], failed + [record for record, _ in done]
        restored = []
        for record, sock in done:
            assert record.host is not None
            try:
                send_unsent(sock, record.host)
                stats.inc("tcp.migration_unsent_bytes", record.host.unsent)
                restored.append((record, sock))
            except RepairError as error:
                log.warning("TCP connection %s:%d -> %s:%d not restored: %s",
                            *record.host.local, *record.host.peer, error)
                stats.inc("tcp.migration_restore_failed")
                abort_close(sock)  # live again: the peer must learn the stream broke
                failed.append(record)
        return restored, failed

    def _recreate_flow(self, record: TcpRecord, sock: socket.socket, now: float) -> None:
        engine, host = self.network.tcp, self.network.tcp_host
        assert engine is not None and host is not None
        flow = restore_flow(
            engine, record.key, inbound=record.inbound, snd_una=record.snd_una,
            snd_max=record.snd_max, rcv_nxt=record.rcv_nxt, snd_wnd=record.snd_wnd,
            snd_wscale=record.snd_wscale, rcv_wscale=record.rcv_wscale, mss=record.mss,
            to_host=record.to_host, host_space=send_space(sock), now=now,
            half_close=dict(record.half_close))
        host.adopt(flow.flow_id, sock)
        resume_host_io(engine, flow.flow_id, now)
