"""Scaffolding inside the test network namespace: an extra address, a veth pair.

The tests run inside ``python -m tools.netns`` as (namespace) root, where only ``lo``
exists; what these context managers add is removed again when they end, so other tests
see the namespace as it was. Outside that namespace the test is skipped with the reason
printed: nothing is ever added to the machine's own network.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator

import pytest

from tools.netns import in_private_netns


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=10)


def _require_netns() -> None:
    if not in_private_netns():
        print("skipping: changes interfaces, so it runs only inside python -m tools.netns")
        pytest.skip("changes interfaces: runs only inside python -m tools.netns")


@contextlib.contextmanager
def extra_address(address: str, device: str = "lo") -> Iterator[str]:
    """``address`` (with its /prefix) on ``device`` while the block runs; IPv6 without DAD,
    so it is usable at once. Yields the address without the prefix."""
    _require_netns()
    options = ["nodad"] if ":" in address else []
    _ip("addr", "add", address, "dev", device, *options)
    try:
        yield address.partition("/")[0]
    finally:
        _ip("addr", "del", address, "dev", device)


@contextlib.contextmanager
def veth_pair(name: str, address4: str | None = None,
              address6: str | None = None) -> Iterator[str]:
    """An up veth pair ``name``/``name``p, ``name`` holding the given addresses (with
    prefix), while the block runs; deleting one end deletes both."""
    _require_netns()
    _ip("link", "add", name, "type", "veth", "peer", "name", f"{name}p")
    try:
        for end in (name, f"{name}p"):
            _ip("link", "set", end, "up")
        if address4:
            _ip("addr", "add", address4, "dev", name)
        if address6:
            _ip("addr", "add", address6, "dev", name, "nodad")
        yield name
    finally:
        _ip("link", "del", name)


PING_GROUP_RANGE = "/proc/sys/net/ipv4/ping_group_range"


@contextlib.contextmanager
def ping_sockets_allowed() -> Iterator[None]:
    """Ping sockets for every group (this namespace's sysctl) while the block runs."""
    _require_netns()
    with open(PING_GROUP_RANGE, encoding="ascii") as handle:
        before = handle.read()
    with open(PING_GROUP_RANGE, "w", encoding="ascii") as handle:
        handle.write("0 2147483647\n")
    try:
        yield
    finally:
        with open(PING_GROUP_RANGE, "w", encoding="ascii") as handle:
            handle.write(before)
