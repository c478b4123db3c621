"""`python -m bench --guest` measures what it says: iperf3 in a real guest moves bytes both ways.

One short boot per MTU (one 1-second round per direction; the guest's link at the
MTU, which guest_rows checks, and vhostnet started with it): every direction must
report data moved, and vhostnet's own counters must have seen at least as
much as iperf3 reports for the data direction (they also count iperf3's
control connection, so only a lower bound holds). No speed is asserted.
"""

from __future__ import annotations

import io

import pytest

from bench.guest_iperf import (
    DIRECTIONS,
    GUEST_MTUS,
    GuestBaselines,
    GuestSettings,
    guest_rows,
    load_kits,
    row_case,
)
from bench.output import Progress
from bench.runner import BenchError, vhostnet_template
from tools.guestkit import Kit

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.mark.parametrize("mtu", GUEST_MTUS)
def test_guest_iperf_moves_data_both_ways_and_vhostnet_counts_it(kit: Kit, mtu: int) -> None:
    version = "10.0" if kit.qemu10 is not None else "7.2"
    if kit.qemu10 is None:
        print(f"QEMU 10.0 unavailable ({kit.qemu10_reason}); using 7.2")
    try:
        kits = load_kits(version)
    except BenchError as error:
        pytest.fail(str(error), pytrace=False)
    progress = io.StringIO()
    settings = GuestSettings(rounds=1, seconds=1, qemu=version, udp_rate="100M",
                             progress=Progress(progress))
    try:
        rows = guest_rows(kits, vhostnet_template(), "vhostnet", settings, GuestBaselines(),
                          mtu=mtu)
    finally:
        kits.close()
    by_case = {row.case: row for row in rows}
    assert list(by_case) == [row_case(d, mtu) for d in DIRECTIONS]
    # The live progress named every direction as the guest reached it.
    for direction in DIRECTIONS:
        assert (f"{direction.case} [vhostnet, MTU {mtu}, QEMU {version}] round 1/1"
                in progress.getvalue())
    for direction in DIRECTIONS:
        row = by_case[row_case(direction, mtu)]
        assert len(row.rounds) == 1 and row.rounds[0] > 0, row
        assert len(row.baseline) == 1 and row.baseline[0] > 0, row
        if direction.udp:
            moved, counted = row.extra["iperf_datagrams"], row.extra["vhostnet_datagrams"]
        else:
            moved, counted = row.extra["iperf_bytes"], row.extra["vhostnet_bytes"]
        assert moved > 0, row
        assert counted is not None and counted >= moved, row
