"""--state-file with several guests (``--max-guests 2``): every guest's Network and the lease
pool are saved at SIGTERM and rebuilt at start, so a guest coming back with its MAC gets its
address and its TCP connection back, whichever order the guests reconnect in.

VM-less, against a real ``python -m vhostnet``: the project's front-ends play the two QEMUs.
TCP connections survive only with TCP_REPAIR: vhostnet keeps CAP_NET_ADMIN (``make test``
runs as the namespace's root), or ``vhostnet repair`` switches it for vhostnet, one helper
per start, shared by every guest's Network.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemon import REPO, VhostnetProcess
from tests.test_several_guests import (
    FIRST,
    MAC1,
    MAC2,
    SECOND,
    EchoServer,
    Guest,
    GuestTcp,
    gateway_mac_of,
)
from vhostnet.guests import GuestPort, Guests
from vhostnet.migration.restart import Several, StateFile, restore_at_start, save_on_exit
from vhostnet.migration.state import decode_state, encode_state
from vhostnet.migration.tcp_migrate import TcpMigration
from vhostnet.network import Network
from vhostnet.stack.config import StackConfig, ip4_str
from vhostnet.virtqueue.switch import Switch


class Starts:
    """vhostnet started (and started again) on one state file, with its way to TCP_REPAIR."""

    def __init__(self, tmp_path: Path, repair: str) -> None:
        self.tmp_path, self.repair = tmp_path, repair
        self.state = tmp_path / "state"
        self.helpers: list[subprocess.Popen[bytes]] = []

    def start(self) -> VhostnetProcess:
        # The repair socket named: as root in a folder nobody cannot clean, the default
        # SOCKET.repair is made only with --vhost-user.
        repair_path = str(self.tmp_path / "vn.sock.repair")
        direct = (("--keep-cap-net-admin",) if self.repair == "direct"
                  else ("--repair-path", repair_path))
        if self.repair != "direct":  # it retries connecting until vhostnet listens
            self.helpers.append(subprocess.Popen(
                [sys.executable, "-m", "vhostnet", "repair", repair_path],
                cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL))
        process = VhostnetProcess(self.tmp_path, "--max-guests", "2", "--state-file",
                                  str(self.state), *direct)
        deadline = time.monotonic() + 20
        while (self.repair != "direct" and time.monotonic() < deadline
               and "repair helper connected" not in process.log_path.read_text()):
            time.sleep(0.05)
        return process

    def close(self) -> None:
        for helper in self.helpers:
            if helper.poll() is None:
                helper.kill()
            helper.wait(5)


@pytest.mark.parametrize("repair", ["direct", "vhostnet repair"])
def test_each_guest_gets_its_address_and_tcp_connection_back_after_a_restart(
        tmp_path: Path, repair: str) -> None:
    starts = Starts(tmp_path, repair)
    state = starts.state
    echo = EchoServer()
    first = starts.start()
    guests: list[Guest] = []
    try:
        guests += [Guest(first.socket_path, MAC1), Guest(first.socket_path, MAC2)]
        one, two = guests
        assert one.dhcp() == FIRST and two.dhcp() == SECOND
        gateway = gateway_mac_of(two)
        connection = GuestTcp(two, gateway, echo.port, 40002)
        assert connection.exchange(b"before") == b"BEFORE"
    finally:
        for guest in guests:
            guest.close()
        code = first.stop()  # SIGTERM: the state is saved
    log = first.log_path.read_text()
    assert code == 0 and "state saved to" in log, log
    sections = decode_state(state.read_bytes())
    assert sorted(entry["key"] for entry in sections["guests"]) == ["10.0.2.15", "10.0.2.16"]
    assert {(r["mac"], r["ipv4"]) for r in sections["leases"]["leases"]} == {
        (MAC1.hex(), FIRST.hex()), (MAC2.hex(), SECOND.hex())}

    second = starts.start()
    guests = []
    try:
        assert "restarted from" in second.log_path.read_text()
        assert "1 TCP connection(s) of 2 guest network(s) restored" in second.log_path.read_text()
        # Guest 2 reconnects first: without the pool it would get the first free address.
        back = Guest(second.socket_path, MAC2)
        guests.append(back)
        back.ip = SECOND
        connection.guest = back  # same sequence numbers: the connection goes on
        assert connection.exchange(b"after") == b"AFTER"
        guests.append(Guest(second.socket_path, MAC1))
        assert guests[-1].dhcp() == FIRST
        stats = second.stats()
        assert stats["guests.networks"] == 2
        assert ip4_str(back.ip) == "10.0.2.16"
    finally:
        for guest in guests:
            guest.close()
        echo.close()
        assert second.stop() == 0, second.log_path.read_text()
        starts.close()


# ---- in process: what a restart of several guests does with odd states -------------------


def guests_on(loop: asyncio.AbstractEventLoop) -> tuple[Guests, Several]:
    config = StackConfig(tcp=False, max_guests=2)
    pool = config.lease_pool()
    guests = Guests.start(config, pool, Switch(2, config.gateway_mac), 2,
                          lambda guest_config: Network(guest_config, loop, leases=pool))
    migrations: dict[int, TcpMigration] = {}

    def migration_of(network: Network) -> TcpMigration:
        return migrations.setdefault(id(network), TcpMigration.attach(network))

    return guests, Several(guests, migration_of)


def bind(guests: Guests, mac: bytes) -> GuestPort:
    port = guests.open_port()
    assert port is not None
    port.learn_guest_mac(mac)  # bound, and its router knows the MAC (as after SEND_RARP)
    assert port.network is not None
    return port


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def test_a_bad_guest_entry_is_skipped_and_the_others_restored(tmp_path: Path, loop,
                                                              caplog) -> None:
    path = tmp_path / "state"
    guests, several = guests_on(loop)
    bind(guests, MAC1)
    bind(guests, MAC2)
    state = StateFile.open(str(path))
    save_on_exit(guests.first, several.migration_of(guests.first), state, several)
    state.close()
    guests.close()
    sections = decode_state(path.read_bytes())
    [second] = [entry for entry in sections["guests"] if entry["key"] == "10.0.2.16"]
    second["udp"] = "not a list"
    path.write_bytes(encode_state(sections))

    guests, several = guests_on(loop)
    try:
        state = StateFile.open(str(path))
        with caplog.at_level(logging.ERROR, logger="vhostnet"):
            loaded = loop.run_until_complete(restore_at_start(
                guests.first, several.migration_of(guests.first), state, several))
        state.close()
        assert loaded is not None and loaded["guests"] == 1
        assert [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()] != []
        assert guests.first.stack.guest_mac == MAC1
        # The pool came back whole: guest 2, first to come back, still gets 10.0.2.16.
        assert bind(guests, MAC2).network.config.guest_ipv4 == SECOND
    finally:
        guests.close()


def test_a_one_guest_state_goes_to_the_first_guest(tmp_path: Path, loop) -> None:
    path = tmp_path / "state"
    one = Network(StackConfig(tcp=False), loop)
    one.stack.guest_mac = MAC1
    state = StateFile.open(str(path))
    save_on_exit(one, TcpMigration.attach(one), state)
    state.close()
    one.close()
    guests, several = guests_on(loop)
    try:
        state = StateFile.open(str(path))
        loaded = loop.run_until_complete(restore_at_start(
            guests.first, several.migration_of(guests.first), state, several))
        state.close()
        assert loaded is not None and "guests" not in loaded
        assert guests.first.stack.guest_mac == MAC1
    finally:
        guests.close()
