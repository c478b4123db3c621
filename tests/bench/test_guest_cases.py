"""``--guest-cases`` (which guest directions run) and the guest's counters around each run."""

from __future__ import annotations

import pytest

from bench import build_parser
from bench.guest_iperf import (
    GUEST_STAT_NAMES,
    GuestSettings,
    guest_script,
    parse_guest_stats,
    select_directions,
)
from bench.runner import BenchError


def cases(text: str) -> list[str]:
    return [direction.case for direction in select_directions(text)]


def test_guest_cases_pick_directions_by_name_or_part() -> None:
    assert cases("udp") == ["guest-udp-tx", "guest-udp-rx"]
    assert cases("guest-udp-rx") == cases("udp-rx") == ["guest-udp-rx"]
    assert cases("tcp6") == ["guest-tcp6-tx", "guest-tcp6-rx"]
    assert cases("udp-rx, tcp-tx") == ["guest-tcp-tx", "guest-udp-rx"]  # the table's order
    assert len(cases("rx")) == 3


@pytest.mark.parametrize("text", ["", "sctp", "udp,bogus", "guest-udp"])
def test_a_guest_case_that_names_nothing_is_refused(text: str) -> None:
    with pytest.raises(BenchError, match="--guest-cases"):
        select_directions(text)


def test_the_option_is_parsed() -> None:
    assert build_parser().parse_args(["--guest-cases", "udp-rx"]).guest_cases == "udp-rx"


def test_the_script_runs_only_the_chosen_directions_with_counters_around_each_run() -> None:
    script = guest_script({False: 5201, True: 5206},
                          GuestSettings(rounds=2, directions=select_directions("udp-rx")))
    assert "IPERF-BEGIN guest-udp-rx 2" in script
    assert "IPERF-BEGIN guest-tcp" not in script and "guest-udp-tx" not in script
    assert script.index("gstat() {") < script.index("gstat guest-udp-rx 1 before")
    assert script.index("gstat guest-udp-rx 1 before") < script.index(" -R") \
        < script.index("gstat guest-udp-rx 1 after")


def test_guest_counters_are_summed_over_the_rounds() -> None:
    console = "\n".join([
        "GSTAT guest-udp-rx 1 before 10 0 0 20 0 5 1000 5000",
        "GSTAT guest-udp-rx 1 after 110 30 30 160 0 9 1250 5300",
        "noise",
        "GSTAT guest-udp-rx 2 before 110 30 30 160 0 9 1250 5300",
        "GSTAT guest-udp-rx 2 after 210 40 40 300 1 19 1300 5400",
        "GSTAT guest-udp-tx 1 before 0 0 0 0 0 0 0 0",
    ])
    assert parse_guest_stats(console, "guest-udp-rx", 2) == dict(zip(
        GUEST_STAT_NAMES[:6], [200, 40, 40, 280, 1, 14], strict=True)) | {
        "guest_cpu_pct": 75.0}  # 300 busy ticks of 400
    # A round without both lines: nothing rather than a wrong sum.
    assert parse_guest_stats(console, "guest-udp-rx", 3) == {}
    assert parse_guest_stats(console, "guest-udp-tx", 1) == {}
