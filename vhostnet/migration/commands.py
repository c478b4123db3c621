"""Control-socket commands for migrations without DEVICE_STATE (QEMU 7.2).

``save-state`` exports the network (to ``file`` if given, else base64 in the
reply) and freezes the TCP connections that can move; ``release`` then hands
them over (their sockets close silently, so a destination on the same host
can take the 4-tuples), or ``resume`` lets them carry on here if the migration
is abandoned (starting the guest here again does the same). ``load-state``
imports a state (from ``file`` or ``state``). A refused blob answers
``ok: false`` with the reason and leaves the network unchanged.
"""

from __future__ import annotations

import base64
import binascii
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from vhostnet.migration.snapshot import export_network, import_network
from vhostnet.migration.state import MAX_BLOB_BYTES, StateError

if TYPE_CHECKING:
    from vhostnet.migration.tcp_migrate import TcpMigration
    from vhostnet.network import Network

log = logging.getLogger(__name__)


Command = Callable[[dict[str, Any]], dict[str, Any]]


def register_state_commands(commands: dict[str, Command], network: Network,
                            migration: TcpMigration) -> None:
    """Add ``save-state``, ``load-state``, ``release`` and ``resume`` to ``commands`` (a
    control server's command table)."""

    def save_state(request: dict[str, Any]) -> dict[str, Any]:
        blob = export_network(network, migration, time.monotonic())
        path = request.get("file")
        if path is None:
            return {"bytes": len(blob), "state": base64.b64encode(blob).decode()}
        with open(str(path), "wb") as out:
            out.write(blob)
        log.info("network state saved to %s (%d bytes)", path, len(blob))
        return {"bytes": len(blob), "file": path}

    def load_state(request: dict[str, Any]) -> dict[str, Any]:
        try:
            if request.get("file") is not None:
                with open(str(request["file"]), "rb") as source:
                    blob = source.read(MAX_BLOB_BYTES + 1)
            else:
                blob = base64.b64decode(str(request.get("state", "")), validate=True)
            loaded = import_network(network, migration, blob, time.monotonic())
        except (OSError, binascii.Error, StateError) as exc:
            log.error("load-state refused: %s", exc)
            return {"ok": False, "error": f"state refused: {exc}"}
        return {"loaded": loaded}

    def release(_request: dict[str, Any]) -> dict[str, Any]:
        return {"released": migration.release()}

    def resume(_request: dict[str, Any]) -> dict[str, Any]:
        return {"resumed": migration.thaw("resume command", time.monotonic())}

    commands["save-state"] = save_state
    commands["load-state"] = load_state
    commands["release"] = release
    commands["resume"] = resume
