"""Shared helpers for the TCP tests: a stand-in for the stack and a scripted guest.

(No tests here; the module name only matches the files this part owns.)
"""

from __future__ import annotations

from dataclasses import dataclass

from vhostnet.stack.config import PortForward, StackConfig
from vhostnet.tcp.engine import TcpEngine
from vhostnet.tcp.flow import TcpTimeouts
from vhostnet.wire.checksum import PROTO_TCP, l4_checksum_ok
from vhostnet.wire.offload import NO_OFFLOADS
from vhostnet.wire.tcp import ACK, TcpSegment

GUEST_IP = bytes([10, 0, 2, 15])
GATEWAY = bytes([10, 0, 2, 2])
REMOTE_IP = bytes([93, 184, 216, 34])  # never contacted: the glue is not involved in unit tests
GUEST_IP6 = bytes.fromhex("fec0000000000000505400fffe123456")
GATEWAY6 = bytes.fromhex("fec00000000000000000000000000002")  # fec0::2, mapped to ::1
REMOTE_IP6 = bytes.fromhex("20010db8000000000000000000000022")  # 2001:db8::22


@dataclass
class FakePacket:
    """The duck type NetworkStack hands to protocol handlers."""

    src: bytes
    dst: bytes
    payload: memoryview
    ttl: int = 64
    tos: int = 0
    checksum_partial: bool = False

    @property
    def upper_payload(self) -> memoryview:
        """What an IPv6 packet calls its TCP segment."""
        return self.payload


class SegmentOutput:
    """The stack's side of ``tcp.output.GuestLink`` for tests that take segments one by one:
    no offloads and no guest MAC learned, so TCP data is never built into whole frames."""

    guest_offloads = NO_OFFLOADS
    guest_mac = None
    gateway_mac = bytes.fromhex("525600000002")
    guest_ipv6: bytes | None = None

    def send_ipv4_frames(self, frames: list[bytes | tuple[bytes, int]]) -> None:
        raise AssertionError("whole frames need the guest's MAC, which this output never has")

    send_ipv6_frames = send_ipv4_frames


class RecordingOutput(SegmentOutput):
    """Stands in for NetworkStack.send_ipv4 and keeps what the engine sent to the guest."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, bytes, TcpSegment]] = []

    def send_ipv4(self, src: bytes, dst: bytes, proto: int, payload: bytes, *,
                  offload: int = 0) -> None:
        assert proto == PROTO_TCP and not offload and len(src) == len(dst) == 4
        self.sent.append((src, dst, TcpSegment.parse(payload)))

    def send_ipv6(self, src: bytes, dst: bytes, next_header: int, payload: bytes) -> None:
        assert next_header == PROTO_TCP and len(src) == len(dst) == 16
        assert l4_checksum_ok(src, dst, PROTO_TCP, payload)
        self.sent.append((src, dst, TcpSegment.parse(payload)))

    def take(self) -> list[TcpSegment]:
        segments = [segment for _, _, segment in self.sent]
        self.sent.clear()
        return segments


def make_config(
    flow_limit: int = 65536, forwards: list[PortForward] | None = None, mtu: int = 1500
) -> StackConfig:
    return StackConfig(flow_limit=flow_limit, tcp_forwards=forwards or [], mtu=mtu)


def make_engine(**kwargs) -> tuple[TcpEngine, RecordingOutput]:
    output = RecordingOutput()
    timeouts = kwargs.pop("timeouts", TcpTimeouts())
    engine = TcpEngine(make_config(**kwargs), output, timeouts=timeouts, isn_source=lambda: 5000)
    return engine, output


def guest_segment(
    engine: TcpEngine,
    now: float,
    *,
    src_port: int,
    dst_port: int,
    seq: int,
    ack: int = 0,
    flags: int = ACK,
    window: int = 65535,
    payload: bytes = b"",
    mss: int | None = None,
    wscale: int | None = None,
    src: bytes = GUEST_IP,
    dst: bytes = REMOTE_IP,
    corrupt: bool = False,
) -> None:
    """Build a guest segment with a correct checksum (unless ``corrupt``) and feed it in."""
    raw = bytearray(
        TcpSegment(src_port, dst_port, seq, ack, flags, window, payload, mss, wscale).emit(src, dst)
    )
    if corrupt:
        raw[-1] ^= 0xFF
    packet = FakePacket(src, dst, memoryview(bytes(raw)))
    if len(src) == 16:
        engine.handle_ipv6(packet, now)
    else:
        engine.handle_ipv4(packet, now)
