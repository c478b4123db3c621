"""The guest benchmark's IPv6 rows: naming, iperf3 options, the guest script, the ratios."""

from __future__ import annotations

import socket
import sys

import pytest

from bench.guest_iperf import (
    DIRECTIONS,
    GuestSettings,
    HostIperf,
    compare_families,
    guest_script,
    iperf_client_args,
    ipv4_sibling,
    proc_net_address,
)
from bench.output import Row, merge_rounds


def test_ipv6_rows_are_tcp_both_ways_beside_their_ipv4_rows() -> None:
    cases = [d.case for d in DIRECTIONS]
    assert cases[:4] == ["guest-tcp-tx", "guest-tcp-rx", "guest-tcp6-tx", "guest-tcp6-rx"]
    for direction in DIRECTIONS:
        sibling = ipv4_sibling(direction)
        if not direction.ipv6:
            assert sibling is None
            continue
        assert sibling is not None and sibling.case == direction.case.replace("tcp6", "tcp")
        assert sibling.counter == direction.counter


def test_iperf_runs_name_their_family() -> None:
    for direction in DIRECTIONS:
        args = iperf_client_args(direction, 3, "1G")
        assert ("-6" in args, "-4" in args) == (direction.ipv6, not direction.ipv6)


def test_guest_script_waits_for_slaac_and_runs_ipv6_against_the_ipv6_server() -> None:
    script = guest_script({False: 5201, True: 5206}, GuestSettings(rounds=1, seconds=2))
    # The address must be there before the first IPv6 run.
    assert script.index("RESULT slaac=") < script.index("IPERF-BEGIN guest-tcp6-tx 1")
    runs = [line for line in script.splitlines() if "iperf3 -c" in line]
    assert len(runs) == len(DIRECTIONS)
    for direction, line in zip(DIRECTIONS, runs, strict=True):
        wanted = "-c fec0::2 -p 5206" if direction.ipv6 else "-c 10.0.2.2 -p 5201"
        assert wanted in line, (direction.case, line)


@pytest.mark.parametrize("host, port, expected", [
    ("127.0.0.1", 5201, "0100007F:1451"),
    ("::1", 80, "00000000000000000000000001000000:0050"),
])
def test_proc_net_address(host: str, port: int, expected: str) -> None:
    assert proc_net_address(host, port) == expected


def test_host_iperf_server_is_seen_listening_on_ipv6_loopback(tmp_path) -> None:
    # A stand-in server that listens where it is told (as iperf3 -s -B HOST -p PORT does).
    script = tmp_path / "listen.py"
    script.write_text(
        "import socket, sys, time\n"
        "args = sys.argv[1:]\n"
        "host, port = args[args.index('-B') + 1], int(args[args.index('-p') + 1])\n"
        "server = socket.socket(socket.AF_INET6)\n"
        "server.bind((host, port))\n"
        "server.listen()\n"
        "time.sleep(60)\n")
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError as error:
        pytest.skip(f"no IPv6 loopback here: {error}")
    server = HostIperf([sys.executable, str(script)], tmp_path / "server.log", host="::1")
    try:
        assert server.host == "::1" and server.proc.poll() is None
    finally:
        server.close()


def test_ipv6_rows_note_their_ratio_to_the_ipv4_row_of_the_same_backend() -> None:
    rows = merge_rounds([
        Row("guest-tcp-tx", "Mbit/s", [400.0], [9000.0]),
        Row("guest-tcp-tx", "Mbit/s", [600.0], [9000.0]),
        Row("guest-tcp6-tx", "Mbit/s", [250.0], [8000.0]),
        Row("guest-tcp6-tx", "Mbit/s", [250.0], [8000.0]),
        Row("guest-tcp-tx", "Mbit/s", [300.0], backend="passt"),
        Row("guest-tcp6-tx", "Mbit/s", [600.0], backend="passt"),
        Row("guest-tcp6-rx", "Mbit/s", [100.0], backend="passt"),  # no IPv4 row beside it
    ])
    compare_families(rows)
    notes = {(r.case, r.backend): r.extra.get("vs_ipv4") for r in rows}
    assert notes == {("guest-tcp-tx", "vhostnet"): None, ("guest-tcp6-tx", "vhostnet"): 0.5,
                     ("guest-tcp-tx", "passt"): None, ("guest-tcp6-tx", "passt"): 2.0,
                     ("guest-tcp6-rx", "passt"): None}
