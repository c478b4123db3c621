"""Shared helpers for the TFTP tests: a recording output, a file wrapper, a scripted client.

No tests live here; the other ``test_tftp_*`` modules import these helpers.
The server under test is always driven in-process with explicit ``now``
values, and files are real ones in pytest's ``tmp_path`` read by ``TftpRoot``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vhostnet.hostio.tftp_files import TftpRoot
from vhostnet.stack.tftp import TftpServer
from vhostnet.wire.tftp import (
    DEFAULT_BLOCK_SIZE,
    Ack,
    Data,
    Error,
    Opcode,
    OptionAck,
    Request,
    TftpView,
)

GATEWAY = bytes([10, 0, 2, 2])
GATEWAY6 = bytes.fromhex("fec00000000000000000000000000002")
GUEST = bytes([10, 0, 2, 15])
CLIENT_PORT = 2000


@dataclass(frozen=True)
class Sent:
    """One datagram the server asked the stack to send."""

    src: bytes
    sport: int
    dst: bytes
    dport: int
    payload: bytes


class RecordingOutput:
    """Stands in for NetworkStack.send_udp and send_udp6: keeps every datagram."""

    def __init__(self) -> None:
        self.sent: list[Sent] = []

    def send_udp(self, src: bytes, sport: int, dst: bytes, dport: int, payload: bytes) -> None:
        self.sent.append(Sent(bytes(src), sport, bytes(dst), dport, bytes(payload)))

    send_udp6 = send_udp  # the family shows in the addresses' length

    def take(self) -> list[Sent]:
        taken, self.sent = self.sent, []
        return taken


class TrackingFiles(TftpRoot):
    """The real TftpRoot, counting handles still open so tests can see cleanup."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.open_handles = 0

    def open(self, name: str) -> Any:
        handle = super().open(name)
        self.open_handles += 1
        return handle

    def close(self, handle: Any) -> None:
        super().close(handle)
        self.open_handles -= 1


@dataclass
class NetConfig:
    """The fields of StackConfig the server reads."""

    gateway: bytes = GATEWAY
    gateway6: bytes = GATEWAY6
    mtu: int = 1500


def make_server(
    root: Path, files: dict[str, bytes], *, mtu: int = 1500, **kwargs: Any
) -> tuple[TftpServer, RecordingOutput, TrackingFiles]:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    output = RecordingOutput()
    tracking = TrackingFiles(root)
    server = TftpServer(NetConfig(mtu=mtu), output, tracking, **kwargs)
    return server, output, tracking


def rrq(name: str, mode: str = "octet", **options: int | str) -> bytes:
    return Request(Opcode.RRQ, name, mode, {k: str(v) for k, v in options.items()}).emit()


def ack(block: int) -> bytes:
    return Ack(block).emit()


def request(server: TftpServer, output: RecordingOutput, payload: bytes, now: float = 0.0,
            port: int = CLIENT_PORT) -> list[Sent]:
    """Send ``payload`` from the guest to gateway:69, return the server's answers."""
    assert server.accepts(GATEWAY, 69)
    server.handle_udp(GUEST, port, GATEWAY, 69, memoryview(payload), now)
    return output.take()


def send(server: TftpServer, output: RecordingOutput, server_port: int, payload: bytes,
         now: float = 0.0, port: int = CLIENT_PORT, src_ip: bytes = GUEST) -> list[Sent]:
    """Send ``payload`` from the guest to a transfer port, return the server's answers."""
    assert server.accepts(GATEWAY, server_port)
    server.handle_udp(src_ip, port, GATEWAY, server_port, memoryview(payload), now)
    return output.take()


def error_of(sent: Sent) -> Error:
    return Error.parse(sent.payload)


def fetch(server: TftpServer, output: RecordingOutput, name: str, *, port: int = CLIENT_PORT,
          now: float = 0.0, max_rounds: int = 200_000, **options: int | str) -> bytes:
    """Play a well-behaved client: request, ACK the last block of each answer, return the file.

    Checks on the way that every packet comes from one server port to the
    client and that blocks arrive in order, with 16-bit wrap-around.
    """
    replies = request(server, output, rrq(name, **options), now, port)
    block_size = DEFAULT_BLOCK_SIZE
    server_port = None
    expected = 1  # absolute number of the next block
    content = bytearray()
    for _ in range(max_rounds):
        assert replies, "the server went silent"
        to_ack = None
        finished = False
        for sent in replies:
            assert (sent.src, sent.dst, sent.dport) == (GATEWAY, GUEST, port)
            server_port = server_port or sent.sport
            assert sent.sport == server_port
            view = TftpView(sent.payload)
            if view.opcode == Opcode.OACK:
                oack = OptionAck.parse(sent.payload)
                block_size = int(oack.options.get("blksize", DEFAULT_BLOCK_SIZE))
                to_ack = 0
            elif view.opcode == Opcode.DATA:
                data = Data.parse(sent.payload)
                assert data.block == expected & 0xFFFF
                assert len(data.payload) <= block_size
                content += data.payload
                expected += 1
                to_ack = data.block
                finished = len(data.payload) < block_size
            else:
                raise AssertionError(f"unexpected answer {error_of(sent)}")
        assert to_ack is not None and server_port is not None
        replies = send(server, output, server_port, ack(to_ack), now, port)
        if finished:
            assert replies == []
            return bytes(content)
    raise AssertionError("transfer did not finish")
