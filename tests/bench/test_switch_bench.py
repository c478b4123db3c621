"""The ``switch`` bench case runs with tiny parameters and measures what it says.

No figure is compared with any speed: the case must deliver every frame to the other
port (its own check), report the segments it cut, and print its rows with the loopback
baseline and the ratio; with real front-ends on a ``--max-guests 2`` vhostnet, front-end
2 must receive the frames front-end 1 sent, as they were sent.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from bench.rings import GuestRings
from bench.runner import Backend, vhostnet_template
from bench.switch import KINDS, MSS, switch_gbits
from bench.switch_frontends import (
    FRONTEND_SIZES,
    IP_1,
    IP_2,
    MAC_1,
    MAC_2,
    announce,
    learn_peer,
    stream,
    udp_frame,
)
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


NETNS_ONLY = pytest.mark.skipif(not in_private_netns(),
                                reason="starts vhostnet with forwards: run inside tools.netns")


@NETNS_ONLY
def test_front_end_2_receives_front_end_1s_stream_through_a_real_vhostnet() -> None:
    backend = Backend(vhostnet_template() + " --max-guests 2", 1500, "vhostnet")
    try:
        with GuestRings(backend.socket) as one, GuestRings(backend.socket) as two:
            announce(two, MAC_2, IP_2)
            announce(one, MAC_1, IP_1)
            assert learn_peer(one, MAC_1) == MAC_2 and learn_peer(two, MAC_2) == MAC_1
            before = backend.counters()
            sent, received, nbytes, seconds = stream(one, two, udp_frame(1500), 0.05)
            after = backend.counters()
            assert seconds > 0 and sent > 0 and 0 < received <= sent
            assert nbytes == received * 1500
            forwarded = after["switch.forwarded"] - before["switch.forwarded"]
            assert forwarded >= received
            assert after["switch.flooded"] == before["switch.flooded"]  # B's MAC was learned
            one.send_frames([udp_frame(64)])
            deadline = time.monotonic() + 5
            frames: list[bytes] = []
            while not frames and time.monotonic() < deadline:
                two.rx.wait(0.05)
                frames = two.receive_frames()
            assert frames == [udp_frame(64)]
    finally:
        backend.close()


@NETNS_ONLY
def test_the_switch_case_prints_rows_against_loopback(tmp_path) -> None:
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, "-m", "bench", "--cases", "switch", "--rounds", "1",
                           "--duration", "0.05", "--no-passt", "--json", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    results = {r["case"]: r for r in json.loads(out.read_text())["results"]}
    assert set(results) == ({case for case, *_ in KINDS}
                            | {f"switch-frontends-{size}B" for size in FRONTEND_SIZES})
    for case, result in results.items():
        assert result["median"] > 0 and result["baseline_median"] > 0
        assert result["ratio"] is not None
        assert case in done.stdout
    assert results["switch-segment"]["extra"]["segments_per_frame"] == 45
    for size in FRONTEND_SIZES:
        extra = results[f"switch-frontends-{size}B"]["extra"]
        assert 0 < extra["frames_received"] <= extra["frames_sent"]
        assert extra["cpu_ns_per_frame"] >= 0  # /proc ticks: 0 in a tiny round
