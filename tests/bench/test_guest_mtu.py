"""The guest benchmark's MTU setting: row names, the option, the guest script's check, the
groups of a round, and the MTU on both back-ends' command lines."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import pytest

from bench import Contender, round_groups
from bench.cases import Baselines, Settings
from bench.guest_iperf import (
    DIRECTIONS,
    GUEST_MTUS,
    GuestBaselines,
    GuestSettings,
    check_guest_mtu,
    compare_families,
    guest_script,
    parse_mtus,
    row_case,
)
from bench.output import Row, merge_rounds
from bench.runner import Backend, BenchError, vhostnet_template


def test_rows_at_1500_keep_their_names_and_others_carry_the_mtu() -> None:
    assert GUEST_MTUS == (1500, 65520)
    names = [row_case(d, mtu) for mtu in GUEST_MTUS for d in DIRECTIONS]
    assert names[:len(DIRECTIONS)] == [d.case for d in DIRECTIONS]  # old JSON compares
    assert row_case(DIRECTIONS[0], 65520) == "guest-tcp-tx-mtu65520"
    assert row_case(DIRECTIONS[-1], 9000) == "guest-udp-rx-mtu9000"
    assert len(set(names)) == len(names)


@pytest.mark.parametrize("text, mtus", [("1500,65520", (1500, 65520)), ("65520", (65520,)),
                                        (" 9000 , 1500,9000", (9000, 1500)),
                                        ("1428", (1428,))])
def test_guest_mtu_option_is_a_list_of_mtus(text: str, mtus: tuple[int, ...]) -> None:
    assert parse_mtus(text) == mtus


@pytest.mark.parametrize("text", ["", ",", "jumbo", "1500,9k", "1427", "65521", "-1500"])
def test_guest_mtu_option_refuses_what_is_not_an_mtu(text: str) -> None:
    with pytest.raises(BenchError, match="--guest-mtu"):
        parse_mtus(text)


def test_guest_script_sets_and_checks_the_mtu_before_any_run() -> None:
    script = guest_script({False: 5201, True: 5206}, GuestSettings(rounds=1), 65520)
    lines = script.splitlines()
    first_run = next(i for i, line in enumerate(lines) if line.startswith("echo 'IPERF-BEGIN"))
    set_mtu = lines.index("ip link set eth0 mtu 65520")
    reported = lines.index('echo "RESULT mtu=$(cat /sys/class/net/eth0/mtu)"')
    # A driver that refuses the MTU ends the script: no run at the wrong MTU.
    stop = lines.index('[ "$(cat /sys/class/net/eth0/mtu)" = 65520 ] || exit 1')
    assert set_mtu < reported < stop < first_run
    assert "ip link set eth0 mtu 1500" in guest_script({False: 1, True: 2}, GuestSettings())


def test_the_guest_console_must_show_the_mtu_asked_for(tmp_path: Path) -> None:
    console = tmp_path / "guest.serial"
    check_guest_mtu("[ 1.0] virtio_net\nRESULT mtu=65520\nIPERF-BEGIN x 1\n", 65520, console)
    for text, seen in (("RESULT mtu=1500\n", "1500"), ("no result line\n", "unknown"),
                       ("RESULT mtu=\n", "unknown")):
        with pytest.raises(BenchError, match=f"MTU is {seen}, not 65520") as caught:
            check_guest_mtu(text, 65520, console)
        assert str(console) in str(caught.value)


@pytest.mark.parametrize("stream", [False, True])
def test_a_round_boots_the_guest_once_per_mtu_for_each_backend(stream: bool) -> None:
    settings = Settings(("guest",), 1, 1.0)
    guest = GuestSettings(rounds=1, mtus=(1500, 65520), stream=stream)
    contender = Contender("vhostnet", vhostnet_template(), None)
    kits = object()  # only handed to the measuring callables, which are not called here
    groups = [name for name, _ in round_groups(contender, settings, settings, guest,
                                          Baselines(None, settings), GuestBaselines(),
                                          kits, testpmd=False)]
    wanted = ["guest at MTU 1500", "guest at MTU 65520"]
    if stream:
        wanted = ["guest at MTU 1500", "guest-stream at MTU 1500",
                  "guest at MTU 65520", "guest-stream at MTU 65520"]
    assert groups == wanted


def test_ipv6_rows_compare_with_the_ipv4_row_at_the_same_mtu() -> None:
    rows = merge_rounds([
        Row("guest-tcp-tx", "Mbit/s", [400.0]),
        Row("guest-tcp6-tx", "Mbit/s", [200.0]),
        Row("guest-tcp-tx-mtu65520", "Mbit/s", [1000.0]),
        Row("guest-tcp6-tx-mtu65520", "Mbit/s", [1500.0]),
        Row("guest-tcp6-rx-mtu65520", "Mbit/s", [100.0]),  # its IPv4 row is missing
        Row("guest-tcp6-rx", "Mbit/s", [100.0], backend="passt"),
        Row("guest-tcp-rx-mtu65520", "Mbit/s", [100.0], backend="passt"),  # not its sibling
    ])
    compare_families(rows)
    assert {(r.case, r.backend): r.extra.get("vs_ipv4") for r in rows} == {
        ("guest-tcp-tx", "vhostnet"): None, ("guest-tcp6-tx", "vhostnet"): 0.5,
        ("guest-tcp-tx-mtu65520", "vhostnet"): None,
        ("guest-tcp6-tx-mtu65520", "vhostnet"): 1.5,
        ("guest-tcp6-rx-mtu65520", "vhostnet"): None,
        ("guest-tcp6-rx", "passt"): None, ("guest-tcp-rx-mtu65520", "passt"): None}


# Stands for a back-end: writes the command line it got, then creates the socket it was given.
RECORDER = """
import sys
open(sys.argv[1], "w").write("\\n".join(sys.argv[2:]))
flag = "--socket" if "--socket" in sys.argv else "-s"  # vhostnet's, passt's
socket_path = sys.argv[sys.argv.index(flag) + 1]
open(socket_path, "w").close()
"""


@pytest.mark.parametrize("mtu", GUEST_MTUS)
def test_the_guest_mtu_reaches_both_backends_command_lines(tmp_path: Path, mtu: int) -> None:
    from bench.passt import passt_template
    from tools.guestkit import DEFAULT_CACHE_DIR

    recorder = tmp_path / "recorder.py"
    recorder.write_text(RECORDER)
    templates = {"vhostnet": vhostnet_template()}
    if (DEFAULT_CACHE_DIR / "passt-trixie/usr/bin/passt").exists():
        templates["passt"] = passt_template()
    else:
        print("trixie's passt is not in the kit cache (make kit fetches it): vhostnet's only")
    for name, template in templates.items():
        argv_file = tmp_path / f"{name}.argv"
        # The template's own command line, handed to the recorder instead of being run.
        recording = f"{shlex.quote(sys.executable)} {recorder} {argv_file} {template}"
        backend = Backend(recording, mtu, name)
        try:
            backend.proc.wait(10)
        finally:
            backend.close()
        argv = argv_file.read_text().splitlines()
        last = len(argv) - 1 - argv[::-1].index("-m")  # not python's own -m (module)
        assert argv[last + 1] == str(mtu), (name, argv)


def test_stream_only_boots_the_stream_guest_alone() -> None:
    settings = Settings(("guest",), 1, 1.0)
    guest = GuestSettings(rounds=1, mtus=(1500, 65520), stream=True, stream_only=True)
    contender = Contender("vhostnet", vhostnet_template(), None)
    groups = [name for name, _ in round_groups(contender, settings, settings, guest,
                                          Baselines(None, settings), GuestBaselines(),
                                          object(), testpmd=False)]
    assert groups == ["guest-stream at MTU 1500", "guest-stream at MTU 65520"]
