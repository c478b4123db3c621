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


def test_a_udp_row_notes_what_the_back_end_counted_on_the_stream_and_for_the_backlog() -> None:
    from bench.guest_iperf import DIRECTIONS, IperfResult, _row

    udp_rx = next(d for d in DIRECTIONS if d.case == "guest-udp-rx")
    before = {"udp.rx_host": 10, "stream.rx.frames": 5, "stream.rx.sends": 1,
              "stream.rx.send_waits": 0, "udp.rx_paused": 0, "guest.rx_backlog_dropped": 0}
    after = {"udp.rx_host": 110, "stream.rx.frames": 105, "stream.rx.sends": 6,
             "stream.rx.send_waits": 2, "udp.rx_paused": 3, "guest.rx_backlog_dropped": 4}
    result = IperfResult(1e8, 140_000, 100, 0.0)
    row = _row(udp_rx, "vhostnet-stream", [result], [result], before, after,
               GuestSettings(rounds=1), 10.0)
    assert {name: row.extra[name] for name in (
        "backend_stream_frames", "backend_stream_sends", "backend_stream_waits",
        "backend_rx_paused", "backend_backlog_dropped")} == {
        "backend_stream_frames": 100, "backend_stream_sends": 5, "backend_stream_waits": 2,
        "backend_rx_paused": 3, "backend_backlog_dropped": 4}
    assert "backend_rx_frames" not in row.extra  # no rings on the stream
