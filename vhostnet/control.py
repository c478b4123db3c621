"""The control socket (``--control PATH``): statistics and management at run time.

One JSON object per line in each direction, so it can be driven with
``socat - UNIX-CONNECT:PATH`` as well as from Python::

    -> {"command": "stats"}
    <- {"ok": true, "counters": {"ipv4.rx": 12, ...}}

Unknown commands and malformed lines get ``{"ok": false, "error": "..."}``;
the connection stays open. Commands are looked up in ``ControlServer.commands``
so that other parts (migration) can add theirs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger(__name__)

MAX_LINE = 64 << 10
MAX_CLIENTS = 8
# Requests are flat objects; deeper nesting is refused before json recurses.
MAX_NESTING = 32
# A client silent this long is closed; when all slots are taken, the one idle
# longest makes room for a new client, so idle clients never lock `stats` out.
IDLE_SECONDS = 60.0

CommandHandler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]] | dict[str, Any]]


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
