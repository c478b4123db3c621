"""Run-time control: forwards added and removed through the control socket, leases, guests,
and the ``vhostnet ctl`` client, against a real Network and real sockets."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from pathlib import Path

import pytest

from tests.e2e.hostservers import free_port
from tests.support.daemon import VhostnetProcess, run_cli
from tests.support.dhcp import dhcp_request, msg_type, opt
from tests.support.frames import GUEST_IP, GUEST_MAC, guest_udp_frame
from tests.support.hostio import port_is_free
from vhostnet.control import ControlServer, control_request, register_network_commands
from vhostnet.network import Network
from vhostnet.server import open_listening_socket
from vhostnet.stack.config import StackConfig, parse_port_spec

REMOTE = bytes([192, 0, 2, 10])


class Controlled:
    """A Network with its control socket, served on the running loop."""

    def __init__(self, tmp: Path, config: StackConfig) -> None:
        self.path = str(tmp / "ctl.sock")
        self.config = config

    async def __aenter__(self) -> Controlled:
        self.network = Network(self.config, asyncio.get_running_loop())
        self.control = ControlServer(self.path)
        register_network_commands(self.control.commands, self.network, self.network.counters)
        await self.control.start(open_listening_socket(self.path))
        return self

    async def __aexit__(self, *_exc: object) -> None:
        self.control.close()
        self.network.close()

    async def request(self, command: str, **args: object) -> dict:
        return await asyncio.to_thread(control_request, self.path, command, **args)

    async def listed(self) -> list[tuple[str, int, int, str, bool]]:
        reply = await self.request("forwards")
        assert reply["ok"], reply
        return [(f["protocol"], f["host_port"], f["guest_port"], f["source"], f["listening"])
                for f in reply["forwards"]]


def guest_frames(network: Network) -> list[bytes]:
    frames = [entry if isinstance(entry, bytes) else entry[0] for entry in network.frames_to_guest]
    network.frames_to_guest.clear()
    return frames


async def until(predicate, what: str) -> None:
    for _ in range(200):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_tcp_forward_added_at_run_time_accepts_and_its_removal_frees_the_port(
        tmp_path: Path) -> None:
    port = free_port()

    async def scenario() -> None:
        async with Controlled(tmp_path, StackConfig()) as ctl:
            reply = await ctl.request("forward-add", protocol="tcp", spec=f"{port}:8080")
            assert reply["ok"], reply
            assert await ctl.listed() == [("tcp", port, 8080, "run time", True)]
            assert not port_is_free(port)
            client = socket.create_connection(("127.0.0.1", port), timeout=5)
            try:
                # The accepted connection becomes a SYN to the guest's port 8080.
                def syn_to_guest() -> bool:
                    return any(frame[23] == 6 and frame[30:34] == GUEST_IP
                               and struct.unpack("!H", frame[36:38])[0] == 8080
                               and frame[47] & 0x02 for frame in guest_frames(ctl.network))
                await until(syn_to_guest, "a SYN toward the guest")
                assert ctl.network.counters()["tcp.flows_open"] == 1
                reply = await ctl.request("forward-remove", protocol="tcp", spec=str(port))
                assert reply["ok"], reply
                assert await ctl.listed() == []
                assert port_is_free(port)
                # The connection it brought stays.
                assert ctl.network.counters()["tcp.flows_open"] == 1
            finally:
                client.close()

    asyncio.run(scenario())


def test_a_port_in_use_refuses_the_whole_spec_in_one_sentence(tmp_path: Path) -> None:
    first, busy = free_port(), free_port()

    async def scenario() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
            holder.bind(("127.0.0.1", busy))
            holder.listen()
            async with Controlled(tmp_path, StackConfig()) as ctl:
                reply = await ctl.request("forward-add", protocol="tcp", spec=f"{first},{busy}")
                assert not reply["ok"]
                assert reply["error"] == f"cannot listen on :: port {busy}: Address already in use"
                assert await ctl.listed() == []
                assert port_is_free(first)  # what the spec bound before the error closed again

    asyncio.run(scenario())


@pytest.mark.parametrize(("request_args", "error"), [
    ({"protocol": "tcp", "spec": "80-"}, "bad port '' in port spec '80-'"),
    ({"protocol": "tcp", "spec": "none"}, "no port to add"),
    ({"protocol": "sctp", "spec": "80"}, "'protocol' must be \"tcp\" or \"udp\""),
    ({"protocol": "udp"}, "'spec' must be a port spec (a string of 1 to 4096 characters)"),
])
def test_a_bad_request_is_one_sentence_and_changes_nothing(tmp_path: Path, request_args: dict,
                                                            error: str) -> None:
    async def scenario() -> None:
        async with Controlled(tmp_path, StackConfig()) as ctl:
            reply = await ctl.request("forward-add", **request_args)
            assert reply == {"ok": False, "error": error}
            assert await ctl.listed() == []

    asyncio.run(scenario())


def test_forwards_are_added_once_and_removed_only_when_forwarded(tmp_path: Path) -> None:
    port, other = free_port(), free_port()
    config = StackConfig(tcp_forwards=parse_port_spec(str(port)))

    async def scenario() -> None:
        async with Controlled(tmp_path, config) as ctl:
            assert await ctl.listed() == [("tcp", port, port, "command line", True)]
            reply = await ctl.request("forward-add", protocol="tcp", spec=f"{other},{port}")
            assert reply == {"ok": False, "error": f"tcp port {port} is already forwarded"}
            assert port_is_free(other)
            reply = await ctl.request("forward-remove", protocol="udp", spec=str(port))
            assert reply == {"ok": False, "error": f"udp port {port} is not forwarded"}
            # A command line forward goes as a run time one does.
            assert (await ctl.request("forward-remove", protocol="tcp", spec=str(port)))["ok"]
            assert port_is_free(port)
            assert await ctl.listed() == []

    asyncio.run(scenario())


def test_a_udp_forward_added_at_run_time_reaches_the_guest_and_goes(tmp_path: Path) -> None:
    port = free_port(socket.SOCK_DGRAM)

    async def scenario() -> None:
        async with Controlled(tmp_path, StackConfig()) as ctl:
            reply = await ctl.request("forward-add", protocol="udp", spec=f"{port}:5353")
            assert reply["ok"], reply
            assert await ctl.listed() == [("udp", port, 5353, "run time", True)]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
                client.sendto(b"hello", ("127.0.0.1", port))
                await until(lambda: ctl.network.counters().get("udp.rx_forward") == 1,
                            "the datagram")
            assert any(frame[23] == 17 and struct.unpack("!H", frame[36:38])[0] == 5353
                       and frame.endswith(b"hello") for frame in guest_frames(ctl.network))
            assert (await ctl.request("forward-remove", protocol="udp", spec=str(port)))["ok"]
            assert port_is_free(port, socket.SOCK_DGRAM)
            assert await ctl.listed() == []

    asyncio.run(scenario())


def test_leases_and_guests_describe_the_guest(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with Controlled(tmp_path, StackConfig()) as ctl:
            assert await ctl.request("guests") == {"ok": True, "guests": []}
            reply = await ctl.request("leases")
            assert reply["dhcp"] == [] and reply["dhcpv6"]["lifetime"] > 0
            request = dhcp_request(msg_type(3) + opt(50, GUEST_IP) + opt(12, b"myguest"))
            ctl.network.stack.receive_frame(
                guest_udp_frame(68, b"\xff" * 4, 67, request, src_ip=bytes(4),
                                dst_mac=b"\xff" * 6), 1.0)
            ctl.network.stack.receive_frame(guest_udp_frame(4000, REMOTE, 9, b"x"), 1.0)
            ctl.network.flush()
            reply = await ctl.request("leases")
            [lease] = reply["dhcp"]
            assert lease["mac"] == GUEST_MAC.hex(":") and lease["address"] == "10.0.2.15"
            assert lease["hostname"] == "myguest" and lease["expires_in"] > 0
            [guest] = (await ctl.request("guests"))["guests"]
            assert guest["mac"] == GUEST_MAC.hex(":") and guest["ipv4"] == "10.0.2.15"
            assert guest["udp_flows"] == 1

    asyncio.run(scenario())


# ---- the vhostnet ctl client against a real vhostnet process ----------------------------


def test_the_ctl_client_lists_adds_and_removes(tmp_path: Path) -> None:
    port, added = free_port(), free_port()
    daemon = VhostnetProcess(tmp_path, "-t", str(port))
    try:
        ctl = daemon.control_path
        listed = run_cli("ctl", ctl, "list")
        assert listed.returncode == 0, listed.stderr
        lines = listed.stdout.splitlines()
        assert lines[0].split() == ["PROTO", "BIND", "HOST", "PORT", "TO", "GUEST", "PORT",
                                    "SOURCE", "STATE"]
        assert lines[1].split() == ["tcp", "*", str(port), "guest", str(port), "command",
                                    "line", "listening"]
        result = run_cli("ctl", ctl, "add", "udp", f"127.0.0.1/{added}:53")
        assert result.returncode == 0, result.stderr
        assert f"udp    127.0.0.1  {added}" in result.stdout
        result = run_cli("ctl", ctl, "add", "udp", f"127.0.0.1/{added}")
        assert (result.returncode, result.stderr) == (
            1, f"vhostnet ctl: udp port {added} is already forwarded\n")
        as_json = json.loads(run_cli("ctl", "--json", ctl, "list").stdout)
        assert [(f["protocol"], f["host_port"], f["source"]) for f in as_json["forwards"]] == [
            ("tcp", port, "command line"), ("udp", added, "run time")]
        assert run_cli("ctl", ctl, "remove", "udp", f"127.0.0.1/{added}").returncode == 0
        assert port_is_free(added, socket.SOCK_DGRAM)
        leases = run_cli("ctl", ctl, "leases")
        assert leases.returncode == 0 and "no DHCP lease" in leases.stdout
        assert run_cli("ctl", ctl, "guests").stdout == "no guest seen yet\n"
        stats = run_cli("ctl", ctl, "stats")
        assert stats.stdout.startswith("COUNTER") and "tcp.flows_open" in stats.stdout
    finally:
        assert daemon.stop() == 0


def test_the_ctl_client_says_when_vhostnet_is_not_there(tmp_path: Path) -> None:
    missing = str(tmp_path / "nothing.ctl")
    result = run_cli("ctl", missing, "list")
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == f"vhostnet ctl: cannot connect to {missing}: No such file or directory\n"
    usage = run_cli("ctl", missing, "add", "sctp", "80")
    assert usage.returncode == 2 and "invalid choice: 'sctp'" in usage.stderr
