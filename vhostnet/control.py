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

MAX_LINE = 1 << 20
MAX_CLIENTS = 8

CommandHandler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]] | dict[str, Any]]


class ControlServer:
    """Serves the control socket on the running event loop."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.commands: dict[str, CommandHandler] = {}
        self._server: asyncio.AbstractServer | None = None
        self._clients = 0

    async def start(self, listener: socket.socket) -> None:
        self._server = await asyncio.start_unix_server(self._serve, sock=listener, limit=MAX_LINE)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._clients >= MAX_CLIENTS:
            writer.close()
            return
        self._clients += 1
        try:
            while True:
                try:
                    line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    await self._send(writer, {"ok": False, "error": "line too long"})
                    break
                if not line:
                    break
                await self._send(writer, await self._dispatch(line))
        except ConnectionError:
            pass
        finally:
            self._clients -= 1
            writer.close()

    async def _dispatch(self, line: bytes) -> dict[str, Any]:
        try:
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
