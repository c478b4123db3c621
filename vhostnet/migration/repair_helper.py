"""Switching TCP_REPAIR: directly, or through a helper (passt-repair's protocol).

TCP_REPAIR needs CAP_NET_ADMIN. vhostnet uses it directly when it has the
capability (probed once at start-up on a throwaway socket). It also listens on
a repair socket, ``SOCKET.repair`` by default as passt does in vhost-user mode
(``--repair-path PATH`` moves it, ``none`` turns it off), for a helper started
with the capability: passt's ``passt-repair PATH`` or ``vhostnet repair PATH``.

The helper connects and serves requests until vhostnet closes the connection,
which vhostnet does when its side of a migration is over, as passt does: a
helper serves one migration (KubeVirt starts passt-repair for each). A request
is one byte, the TCP_REPAIR value as a signed 8-bit number (1 on, 0 off, -1 off
without a window probe), sent with a batch of socket descriptors (SCM_RIGHTS,
at most ``MAX_FDS_PER_REQUEST``, never none: passt-repair exits on a request
without descriptors). The helper sets the option on every descriptor, closes
its copies, and answers with the same byte; ``vhostnet repair`` answers
``REPLY_FAILED`` if any descriptor refused (the others were set), passt-repair
exits instead. vhostnet asks for nothing else: freezing (``freeze_sockets``:
a minimum TTL of 255 and a closed receive window, which need no capability,
and a drop-all socket filter where the host allows it) and every other repair
step are its own (``tcp_freeze``, ``tcp_repair``). Where the host reserves
socket filters to CAP_NET_ADMIN, ``vhostnet repair`` still attaches the filter
with repair on (and removes it before repair off); passt-repair does not, and
the TTL and the window freeze alone.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import logging
import os
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Protocol

from vhostnet.migration.tcp_freeze import (
    attach_drop_filter,
    attach_drop_filters,
    close_receive_window,
    detach_drop_filter,
    shut_out_peer,
    unfreeze_sockets,
)
from vhostnet.migration.tcp_repair import (
    REPAIR_OFF,
    REPAIR_OFF_NO_WINDOW_PROBE,
    REPAIR_ON,
    K,
    RepairError,
    can_repair_directly,
    set_repair_direct,
)

log = logging.getLogger(__name__)

MAX_FDS_PER_REQUEST = 253  # SCM_MAX_FD
REPLY_FAILED = 0x7F
REQUEST_TIMEOUT = 5.0
CONNECT_WAIT = 10.0
MODES = (REPAIR_ON, REPAIR_OFF, REPAIR_OFF_NO_WINDOW_PROBE)


def _mode_byte(mode: int) -> bytes:
    return (mode & 0xFF).to_bytes(1, "little")


def _mode_of(byte: int) -> int:
    return byte - 256 if byte >= 128 else byte


class RepairSwitch(Protocol):
    """Sets TCP_REPAIR on sockets; raises ``RepairError`` if any refused."""

    def set_repair(self, socks: Sequence[socket.socket], mode: int) -> None: ...


class HelperGone(RepairError):
    """The helper is not connected, or went away during a request."""


class DirectRepair:
    """This process has CAP_NET_ADMIN."""

    def set_repair(self, socks: Sequence[socket.socket], mode: int) -> None:
        failed = 0
        for sock in socks:
            try:
                set_repair_direct(sock, mode)
            except OSError:
                failed += 1
        if failed:
            raise RepairError(0, f"TCP_REPAIR {mode} refused for {failed} of {len(socks)} sockets")


class HelperLink:
    """vhostnet's end of ``--repair-path``: listens, keeps the one connected helper."""

    def __init__(self, path: str, loop: asyncio.AbstractEventLoop) -> None:
        self.path = path
        self.loop = loop
        self.conn: socket.socket | None = None
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.listener.bind(path)
            self.listener.listen(1)
        except OSError:
            self.listener.close()
            raise
        self.listener.setblocking(False)
        loop.add_reader(self.listener.fileno(), self._on_accept)

    @property
    def connected(self) -> bool:
        return self.conn is not None

    def _on_accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as error:
            log.warning("repair helper: accept failed: %s", error)
            return
        self._drop()  # a new helper replaces the old one
        conn.setblocking(True)
        conn.settimeout(REQUEST_TIMEOUT)
        self.conn = conn
        # Between requests the helper says nothing: readable means it went away.
        self.loop.add_reader(conn.fileno(), self._on_idle_event)
        log.info("repair helper connected on %s: TCP connections can move with the guest",
                 self.path)

    def _on_idle_event(self) -> None:
        if self.conn is None:
            return
        try:
            data = self.conn.recv(1, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as error:
            data, why = b"", str(error)
        else:
            why = "it sent a byte nobody asked for" if data else "it closed the connection"
        self._drop()
        log.warning("repair helper on %s disconnected (%s); a new one may connect before the "
                    "next migration", self.path, why)

    def set_repair(self, socks: Sequence[socket.socket], mode: int) -> None:
        """``HelperGone`` if there is no helper or it went away (not logged here: the
        caller says in one line what that costs), ``RepairError`` if it refused."""
        if self.conn is None:
            raise HelperGone(0, "no repair helper connected")
        request = _mode_byte(mode)
        for start in range(0, len(socks), MAX_FDS_PER_REQUEST):
            fds = array.array("i", (s.fileno() for s in socks[start:start + MAX_FDS_PER_REQUEST]))
            try:
                self.conn.sendmsg([request], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
                reply = self.conn.recv(1)
            except OSError as error:
                self._drop()
                raise HelperGone(error.errno or 0,
                                 f"the repair helper failed: {error.strerror or error}") from None
            if not reply:
                self._drop()  # passt-repair exits when a socket refuses
                raise HelperGone(0, "the repair helper disconnected")
            if reply != request:
                raise RepairError(0, f"repair helper could not set TCP_REPAIR {mode} on every socket")

    def release(self) -> None:
        """This side's migration is over: let the helper go (passt-repair then exits), as
        passt does; the next migration needs a new one."""
        if self.conn is not None:
            self._drop()
            log.info("migration over: repair helper released (start one again for the next "
                     "migration)")

    def _drop(self) -> None:
        if self.conn is not None:
            self.loop.remove_reader(self.conn.fileno())
            self.conn.close()
            self.conn = None

    def close(self) -> None:
        if self.listener.fileno() < 0:
            return  # closed already
        self.loop.remove_reader(self.listener.fileno())
        self.listener.close()
        self._drop()
        try:
            os.unlink(self.path)
        except OSError:
            pass


def repair_on_shut_out(socks: Mapping[K, socket.socket], switch: RepairSwitch
                       ) -> dict[K, socket.socket]:
    """Our drop-all filter where the host allows it and a minimum TTL of 255
    (``tcp_freeze``), then TCP_REPAIR on for all through ``switch`` (the step that
    needs CAP_NET_ADMIN). Returns the sockets shut out from their peers by either (the
    minimum TTL is never refused in practice). ``RepairError`` from the switch: the
    caller undoes it."""
    shut_out = attach_drop_filters(socks)
    for key, sock in socks.items():
        try:
            shut_out_peer(sock)
        except OSError as error:
            log.warning("cannot set IP_MINTTL on a TCP socket for migration (%s)",
                        error.strerror or error)
            continue
        shut_out[key] = sock
    if socks:
        switch.set_repair(list(socks.values()), REPAIR_ON)
    return shut_out


def freeze_sockets(socks: Mapping[K, socket.socket], switch: RepairSwitch
                   ) -> dict[K, socket.socket]:
    """Freeze connected sockets (``tcp_freeze``): filter where allowed, minimum TTL,
    repair on, closed receive window. Returns the frozen sockets; the others are live
    again, for the caller to reset. ``RepairError`` from the switch: the caller thaws
    them all."""
    shut_out = repair_on_shut_out(socks, switch)
    frozen: dict[K, socket.socket] = {}
    refused: list[socket.socket] = []
    for key, sock in socks.items():
        try:
            close_receive_window(sock)
        except OSError:
            refused.append(sock)
            continue
        if key in shut_out:
            frozen[key] = sock
        else:
            refused.append(sock)
    if refused:  # in repair mode but not frozen: back to live, the caller resets them
        log.warning("cannot freeze %d TCP socket(s) in repair mode: they are reset toward "
                    "the guest instead of moving", len(refused))
        unfreeze_sockets(refused)
        switch.set_repair(refused, REPAIR_OFF)
    return frozen


class RepairAccess:
    """How this vhostnet switches TCP_REPAIR: itself, through the helper, or not at all."""

    def __init__(self, direct: bool, helper: HelperLink | None = None) -> None:
        self.direct = direct
        self.helper = helper

    @classmethod
    def probe(cls, helper: HelperLink | None = None) -> RepairAccess:
        return cls(can_repair_directly(), helper)

    def switch(self) -> RepairSwitch | None:
        if self.direct:
            return DirectRepair()
        if self.helper is not None and self.helper.connected:
            return self.helper
        return None

    def describe(self) -> str:
        if self.direct:
            return "TCP_REPAIR available (CAP_NET_ADMIN): TCP connections move with the guest"
        if self.helper is not None:
            return (f"no CAP_NET_ADMIN: TCP connections move with the guest if a repair helper "
                    f"(passt-repair or `vhostnet repair`) is connected to {self.helper.path} "
                    f"for the migration")
        return ("TCP_REPAIR unavailable (no CAP_NET_ADMIN, no repair socket): TCP connections "
                "are reset toward the guest when it migrates")

    def migration_over(self) -> None:
        if self.helper is not None:
            self.helper.release()

    def close(self) -> None:
        if self.helper is not None:
            self.helper.close()


# ---- the helper process ------------------------------------------------------------


def _apply(fds: list[int], mode: int) -> bool:
    ok = True
    for fd in fds:
        try:
            with socket.socket(fileno=fd) as sock:
                # Beyond passt-repair: the drop-all filter too, for hosts that reserve
                # socket filters to CAP_NET_ADMIN (vhostnet attaches it itself where it
                # can; attaching it again is harmless): with it catchers work there.
                # Removed before repair off, so the answer to the window probe gets in.
                if mode == REPAIR_ON:
                    _try(attach_drop_filter, sock)
                else:
                    _try(detach_drop_filter, sock)
                set_repair_direct(sock, mode)
        except OSError as error:
            print(f"vhostnet repair: TCP_REPAIR {mode} on a socket failed: {error}", file=sys.stderr)
            ok = False
    return ok


def _try(step, sock: socket.socket) -> None:
    try:
        step(sock)
    except OSError as error:
        print(f"vhostnet repair: {step.__name__} failed: {error}", file=sys.stderr)


def serve(conn: socket.socket) -> int:
    """Answer requests on ``conn`` until vhostnet closes it."""
    fd_space = socket.CMSG_SPACE(MAX_FDS_PER_REQUEST * array.array("i").itemsize)
    while True:
        try:
            data, ancillary, _flags, _addr = conn.recvmsg(1, fd_space)
        except OSError as error:
            print(f"vhostnet repair: connection failed: {error}", file=sys.stderr)
            return 1
        fds: list[int] = []
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                received = array.array("i")
                received.frombytes(payload[: len(payload) - len(payload) % received.itemsize])
                fds.extend(received)
        if not data:
            for fd in fds:
                os.close(fd)
            return 0
        mode = _mode_of(data[0])
        if mode not in MODES:
            for fd in fds:
                os.close(fd)
            conn.sendall(bytes([REPLY_FAILED]))
            continue
        conn.sendall(data if _apply(fds, mode) else bytes([REPLY_FAILED]))


def run(path: str, connect_wait: float = CONNECT_WAIT) -> int:
    if not can_repair_directly():
        print("vhostnet repair: TCP_REPAIR is not permitted here; run this helper with "
              "CAP_NET_ADMIN (e.g. as root)", file=sys.stderr)
        return 1
    deadline = time.monotonic() + connect_wait
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    while True:  # bounded by the deadline
        try:
            conn.connect(path)
            break
        except OSError as error:
            if time.monotonic() >= deadline:
                print(f"vhostnet repair: cannot connect to {path}: {error.strerror or error}",
                      file=sys.stderr)
                conn.close()
                return 1
        time.sleep(0.1)
    with conn:
        print(f"vhostnet repair: serving TCP_REPAIR requests on {path}", file=sys.stderr)
        return serve(conn)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="vhostnet repair",
        description="Switch TCP_REPAIR on vhostnet's sockets for it (run with CAP_NET_ADMIN), "
                    "so that TCP connections survive a live migration. Connects to the "
                    "--repair-path socket of a running vhostnet and serves it until it closes.")
    parser.add_argument("socket", metavar="SOCKET", help="vhostnet's --repair-path")
    parser.add_argument("--wait", type=float, default=CONNECT_WAIT, metavar="SECONDS",
                        help=f"how long to retry connecting (default {CONNECT_WAIT:g})")
    args = parser.parse_args(argv)
    return run(args.socket, max(0.0, args.wait))
