"""The fuzz targets: one table, name -> a callable taking the fuzz bytes.

A target drives the code under test and asserts its contract; any exception it lets
out is a crash (``fuzz.run`` saves the input to fuzz/crashes/). Seeds are in
fuzz/corpus/<name>/ (``python -m fuzz.make_corpus``), inputs that once crashed in
fuzz/regressions/<name>/; tests/fuzz replays both. A new target is one entry here
(plus its seeds in make_corpus.py); a checked view needs no function of its own:
``"dhcpv6": wire.parser(dhcpv6.Dhcpv6Message.parse),``. Targets that hold state (an event loop, guest
memory) are built once per process, on first use.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

from fuzz import wire_targets as wire
from fuzz.fragments_target import fuzz_fragments
from vhostnet.vhost_user import codec
from vhostnet.wire import dhcpv6

Target = Callable[[bytes], None]

# Every vhost-user payload structure: parse or raise CodecError.
_CODEC_PAYLOADS = (codec.Header, codec.U64, codec.VringState, codec.VringAddr,
                   codec.MemoryRegion, codec.MemoryTable, codec.SingleMemoryRegion,
                   codec.LogParams, codec.IotlbMsg, codec.Config, codec.VringArea,
                   codec.Inflight, codec.DeviceStateParams)


def fuzz_vhost_codec(data: bytes) -> None:
    if not data:
        return
    payload = data[1:]
    kind = _CODEC_PAYLOADS[data[0] % len(_CODEC_PAYLOADS)]
    try:
        parsed = kind.parse(payload)
    except codec.CodecError:
        return
    assert kind.parse(parsed.emit()) == parsed, "emit does not round-trip"


@cache
def _stateful(name: str) -> Target:
    if name == "vhost_user":
        from fuzz.vhost_target import VhostUserTarget
        return VhostUserTarget()
    if name == "ring":
        from fuzz.ring_target import RingTarget
        return RingTarget()
    if name == "switch":
        from fuzz.switch_target import SwitchTarget
        return SwitchTarget()
    from fuzz.stack_target import StackTarget
    return StackTarget()


def _lazy(name: str) -> Target:
    return lambda data: _stateful(name)(data)


TARGETS: dict[str, Target] = {
    "ethernet": wire.fuzz_ethernet,
    "arp": wire.fuzz_arp,
    "ipv4": wire.fuzz_ipv4,
    "ipv6": wire.fuzz_ipv6,
    "icmp": wire.fuzz_icmp,
    "icmpv6": wire.fuzz_icmpv6,
    "udp": wire.fuzz_udp,
    "tcp": wire.fuzz_tcp,
    "dhcp": wire.fuzz_dhcp,
    "dns": wire.fuzz_dns,
    "tftp": wire.fuzz_tftp,
    "dhcpv6": wire.parser(dhcpv6.Dhcpv6Message.parse),
    "fragments": fuzz_fragments,
    "vhost_codec": fuzz_vhost_codec,
    "vhost_user": _lazy("vhost_user"),
    "ring": _lazy("ring"),
    "switch": _lazy("switch"),
    "stack": _lazy("stack"),
}
