"""The ``switch`` bench case runs with tiny parameters and measures what it says.

No figure is compared with any speed: the case must deliver every frame to the other
port (its own check), report the segments it cut, and print its rows with the loopback
baseline and the ratio.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bench.switch import KINDS, MSS, switch_gbits
from tools.netns import in_private_netns


@pytest.mark.parametrize(("case", "payload_len", "frames", "offloads"), KINDS)
def test_each_kind_of_traffic_reaches_the_other_port_whole(case: str, payload_len: int,
                                                            frames: int, offloads: bool) -> None:
    gbits, counters = switch_gbits(payload_len, frames, offloads, 0.01)
    assert gbits > 0
    assert counters["switch.forwarded"] > 0 and counters["switch.flooded"] == 0
    cut = payload_len > MSS and not offloads
    assert counters["switch.segments"] == (counters["switch.forwarded"] * payload_len // MSS
                                           if cut else 0)


@pytest.mark.skipif(not in_private_netns(), reason="measures loopback TCP: run inside tools.netns")
def test_the_switch_case_prints_rows_against_loopback(tmp_path) -> None:
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, "-m", "bench", "--cases", "switch", "--rounds", "1",
                           "--duration", "0.05", "--no-passt", "--json", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    results = {r["case"]: r for r in json.loads(out.read_text())["results"]}
    assert set(results) == {case for case, *_ in KINDS}
    for case, result in results.items():
        assert result["median"] > 0 and result["baseline_median"] > 0
        assert result["ratio"] is not None
        assert case in done.stdout
    assert results["switch-segment"]["extra"]["segments_per_frame"] == 45
