"""The control socket (``--control PATH``): statistics and management at run time.

One JSON object per line in each direction, so it can be driven with
``socat - UNIX-CONNECT:PATH`` as well as from Python::

    -> {"command": "stats"}
    <- {"ok": true, "counters": {"ipv4.rx": 12, ...}}

Unknown commands and malformed lines get ``{"ok": false, "error": "..."}``;
the connection stays open. Commands are looked up in ``ControlServer.commands``
so that other parts (migration) can add theirs. A command refusing its request
raises ``CommandError``: the sentence is the answer, nothing is logged.

``register_network_commands`` adds the network's: ``forwards``, ``forward-add``,
``forward-remove`` (``{"protocol": "tcp"|"udp", "spec": "<passt -t/-u spec>"}``),
``leases`` and ``guests``. With several guests (``register_guest_commands``) a spec's
``HOSTPORT:GUESTADDR/GUESTPORT`` picks the guest (its Network) by its leased address,
the first guest without one; ``guests`` lists every guest and ``leases`` the pool.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

from vhostnet.stack.config import (
    DEFAULT_EPHEMERAL,
    PortForward,
    ip4_str,
    ip6_str,
    mac_str,
    parse_port_spec,
)

if TYPE_CHECKING:  # the ctl client imports this module: it must not load the network
    from vhostnet.guests import Guests
    from vhostnet.network import ForwardState, Network

log = logging.getLogger(__name__)

MAX_LINE = 64 << 10
MAX_CLIENTS = 8
# Requests are flat objects; deeper nesting is refused before json recurses.
MAX_NESTING = 32
# A client silent this long is closed; when all slots are taken, the one idle
# longest makes room for a new client, so idle clients never lock `stats` out.
IDLE_SECONDS = 60.0

# A port spec longer than this is not a mistake worth parsing.
MAX_SPEC = 4096

CommandHandler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]] | dict[str, Any]]


class CommandError(Exception):
    """A command refused its request: ``str()`` is the one-sentence answer."""


class ForwardTargets(Protocol):
    """The Networks forwards go to: the one guest's, or each guest's (``guests.Guests``)."""

    def network_for_address(self, address: str | None) -> Network:
        """The Network a spec's guest address names (None: the first guest's);
        ``ValueError`` (one sentence) when none."""
        ...

    def all_networks(self) -> list[Network]: ...


class OneGuest:
    """``ForwardTargets`` of one guest (``--max-guests 1``): every spec goes to its Network."""

    def __init__(self, network: Network) -> None:
        self.network = network

    def network_for_address(self, address: str | None) -> Network:
        return self.network

    def all_networks(self) -> list[Network]:
        return [self.network]


class ControlServer:
    """Serves the control socket on the running event loop."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.commands: dict[str, CommandHandler] = {}
        self._server: asyncio.AbstractServer | None = None
        # Each client's writer -> when it last finished a command (None: running one).
        self._clients: dict[asyncio.StreamWriter, float | None] = {}

    async def start(self, listener: socket.socket) -> None:
        self._server = await asyncio.start_unix_server(self._serve, sock=listener, limit=MAX_LINE)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._clients) >= MAX_CLIENTS and not self._evict_idle_client():
            writer.close()
            return
        loop = asyncio.get_running_loop()
        self._clients[writer] = loop.time()
        try:
            while True:
                try:
                    line = await asyncio.wait_for(reader.readline(), IDLE_SECONDS)
                except (ValueError, asyncio.LimitOverrunError):
                    await self._send(writer, {"ok": False, "error": "line too long"})
                    break
                except TimeoutError:
                    break
                if not line:
                    break
                self._clients[writer] = None
                await self._send(writer, await self._dispatch(line))
                self._clients[writer] = loop.time()
        except ConnectionError:
            pass
        finally:
            self._clients.pop(writer, None)
            writer.close()

    def _evict_idle_client(self) -> bool:
        """Close the client idle longest (not one running a command); False if none is idle."""
        idle = [(since, writer) for writer, since in self._clients.items() if since is not None]
        if not idle:
            return False
        _since, writer = min(idle, key=lambda pair: pair[0])
        self._clients.pop(writer)
        writer.close()
        return True

    async def _dispatch(self, line: bytes) -> dict[str, Any]:
        try:
            if _nesting(line) > MAX_NESTING:
                raise ValueError(f"nested deeper than {MAX_NESTING} levels")
            request = json.loads(line)
            if not isinstance(request, dict) or not isinstance(request.get("command"), str):
                raise ValueError("expected an object with a 'command' string")
        except ValueError as exc:
            return {"ok": False, "error": f"malformed request: {exc}"}
        handler = self.commands.get(request["command"])
        if handler is None:
            known = ", ".join(sorted(self.commands))
            return {"ok": False, "error": f"unknown command {request['command']!r} (known: {known})"}
        try:
            result = handler(request)
            if asyncio.iscoroutine(result):
                result = await result
        except CommandError as exc:
            return {"ok": False, "error": str(exc)}
        except Exception as exc:  # a failing command must not take the socket down
            log.exception("control command %s failed", request["command"])
            return {"ok": False, "error": str(exc) or type(exc).__name__}
        return {"ok": True, **result}

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, reply: dict[str, Any]) -> None:
        writer.write(json.dumps(reply).encode() + b"\n")
        await writer.drain()

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass


def register_network_commands(commands: dict[str, CommandHandler], network: Network,
                              counters: Callable[[], dict[str, int]],
                              ephemeral: range = DEFAULT_EPHEMERAL,
                              targets: ForwardTargets | None = None) -> None:
    """Add the network's commands to ``commands``; ``counters`` gives every counter (the
    server's), ``ephemeral`` is the port range a spec's ``all`` leaves out; ``targets``:
    the guests forwards may go to (default: ``network`` alone)."""
    targets = OneGuest(network) if targets is None else targets
    several = not isinstance(targets, OneGuest)

    def forwards(_request: dict[str, Any]) -> dict[str, Any]:
        records = []
        for target in targets.all_networks():
            for state in target.forwards():
                record = forward_record(state)
                if several:
                    record["guest"] = ip4_str(target.config.guest_ipv4)
                records.append(record)
        return {"forwards": records}

    def change(request: dict[str, Any], adding: bool) -> dict[str, Any]:
        protocol, parsed = _forward_request(request, ephemeral)
        try:
            target = _target_of(targets, protocol, parsed, adding)
            if adding:
                target.add_forwards(protocol, parsed)
            else:
                target.remove_forwards(protocol, parsed)
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        return forwards(request)

    def leases(_request: dict[str, Any]) -> dict[str, Any]:
        stack = network.stack
        now = time.monotonic()
        dhcp = stack.dhcp.describe_lease(now) if stack.dhcp is not None else None
        dhcpv6 = stack.dhcpv6.describe_binding() if stack.dhcpv6 is not None else None
        return {"dhcp": [] if dhcp is None else [dhcp], "dhcpv6": dhcpv6}

    def guests(_request: dict[str, Any]) -> dict[str, Any]:
        from vhostnet.guests import traffic_record  # not at import: the ctl client's too

        stack = network.stack
        if stack.guest_mac is None:
            return {"guests": []}  # not heard from yet
        counts = counters()
        return {"guests": [{
            "mac": mac_str(stack.guest_mac),
            "ipv4": None if stack.guest_ipv4 is None else ip4_str(stack.guest_ipv4),
            "ipv6": [ip6_str(address) for address in stack.guest_ipv6_addresses],
            **traffic_record(counts, counts),
        }]}

    commands["forwards"] = forwards
    commands["forward-add"] = lambda request: change(request, adding=True)
    commands["forward-remove"] = lambda request: change(request, adding=False)
    commands["leases"] = leases
    commands["guests"] = guests


def register_guest_commands(commands: dict[str, CommandHandler], guests: Guests,
                            port_counters: Callable[[Any], dict[str, int]]) -> None:
    """Several guests: ``guests`` lists each guest (port, MACs, addresses, name, connected,
    counters; ``port_counters(port)`` gives its device's), ``leases`` the lease pool."""

    def guest_list(_request: dict[str, Any]) -> dict[str, Any]:
        return {"guests": guests.describe(port_counters)}

    def leases(_request: dict[str, Any]) -> dict[str, Any]:
        bound = {port.mac for port in guests.ports.values() if port.network is not None}
        return {"leases": [{
            "mac": mac_str(lease.mac),
            "ipv4": None if lease.ipv4 is None else ip4_str(lease.ipv4),
            "ipv6": None if lease.ipv6 is None else ip6_str(lease.ipv6),
            "name": lease.name, "reserved": lease.reserved, "connected": lease.mac in bound,
        } for lease in guests.pool.leases()]}

    commands["guests"] = guest_list
    commands["leases"] = leases


def _target_of(targets: ForwardTargets, protocol: str, forwards: list[PortForward],
               adding: bool) -> Network:
    """The one Network a spec's forwards go to: the guest its address names; for a removal
    without an address, the guest that has the port."""
    addresses = {forward.guest_addr for forward in forwards}
    if len(addresses) > 1:
        raise ValueError("a spec's ports must all go to one guest")
    address = addresses.pop() if addresses else None
    if address is not None or adding:
        return targets.network_for_address(address)
    wanted = {(f.host_addr, f.host_port, f.host_if) for f in forwards}
    for network in targets.all_networks():
        if any(state.protocol == protocol and (state.forward.host_addr, state.forward.host_port,
                                               state.forward.host_if) in wanted
               for state in network.forwards()):
            return network
    return targets.network_for_address(None)  # which then says the port is not forwarded


def forward_record(state: ForwardState) -> dict[str, Any]:
    """One forwarded port as the ``forwards`` command lists it."""
    forward = state.forward
    return {"protocol": state.protocol,
            "bind": "*" if forward.dual_stack else forward.host_addr,
            "interface": forward.host_if, "host_port": forward.host_port,
            "guest_address": forward.guest_addr, "guest_port": forward.guest_port,
            "source": state.source, "listening": state.listening}


def _forward_request(request: dict[str, Any], ephemeral: range
                     ) -> tuple[Any, list[PortForward]]:
    protocol, spec = request.get("protocol"), request.get("spec")
    if protocol not in ("tcp", "udp"):
        raise CommandError("'protocol' must be \"tcp\" or \"udp\"")
    if not isinstance(spec, str) or not spec or len(spec) > MAX_SPEC:
        raise CommandError(f"'spec' must be a port spec (a string of 1 to {MAX_SPEC} characters)")
    try:
        return protocol, parse_port_spec(spec, ephemeral)
    except ValueError as exc:
        raise CommandError(str(exc)) from None


def _nesting(line: bytes) -> int:
    """Deepest bracket nesting of a JSON text, strings skipped (an upper bound is enough)."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in line:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            deepest = max(deepest, depth)
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return deepest


def control_request(path: str, command: str, timeout: float = 5.0, **args: Any) -> dict[str, Any]:
    """Send one command to a control socket and return the reply (blocking; for tools and tests)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(json.dumps({"command": command, **args}).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
            if len(data) > MAX_LINE * 64:
                raise ValueError("control reply too long")
    return json.loads(data)
