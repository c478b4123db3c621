"""The bench machinery is correct: exact bytes, counts that match vhostnet's counters, JSON fields.

Tiny durations only, and no figure is compared with any speed: these tests
check that the benchmark measures what it says. They start vhostnet and send
traffic to 127.0.0.1 only, so they run inside the private namespace
(``python3 -m tools.netns -- python3 -m pytest tests/bench/test_bench.py``).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time

import pytest

from bench.cases import ALL_CASES, Settings
from bench.guest_iperf import (
    DIRECTIONS,
    GuestSettings,
    HostIperf,
    parse_guest_output,
    parse_iperf_json,
)
from bench.guest_net import ACK, GuestTcp, bulk_block
from bench.hostside import TcpSender, TcpSink, UdpSink
from bench.output import PlotUnavailable, Row, format_row, write_json, write_plot
from bench.runner import (
    GUEST_TCP_PORT,
    HOST_TCP_FWD,
    Backend,
    BenchError,
    guest_process,
    process_cpu_seconds,
    vhostnet_template,
)
from tools.netns import in_private_netns


def udp_receive_buffer_errors() -> int:
    """Datagrams this network namespace dropped because a socket's buffer was full."""
    with open("/proc/net/snmp") as snmp:
        header, values = [line.split() for line in snmp if line.startswith("Udp:")][:2]
    return int(values[header.index("RcvbufErrors")])


needs_netns = pytest.mark.skipif(not in_private_netns(), reason="sends traffic: run inside tools.netns")



def test_row_statistics_and_json(tmp_path) -> None:
    row = Row("tcp-tx-mtu1500", "Gbit/s", [3.0, 1.0, 2.0], [4.0, 4.0], "loopback Gbit/s")
    assert (min(row.rounds), row.median, max(row.rounds), row.ratio) == (1.0, 2.0, 3.0, 0.5)
    assert "tcp-tx-mtu1500" in format_row(row)
    path = tmp_path / "out.json"
    write_json(str(path), [row], {"rounds": 3})
    data = json.loads(path.read_text())
    result = data["results"][0]
    for key in ("case", "unit", "rounds", "min", "median", "max", "baseline", "baseline_median", "ratio"):
        assert key in result
    assert data["meta"]["rounds"] == 3


@needs_netns
def test_ring_frame_count_matches_vhostnet_counters() -> None:
    backend = Backend(vhostnet_template(discard_tx=True), 1500, "vhostnet")
    try:
        guest = guest_process(backend.socket, 1500, arp=False)
        try:
            before = backend.counters().get("guest.tx_to_sink", 0)
            reply = guest.request("ring", size=64, duration=0.1)
            after = backend.counters()["guest.tx_to_sink"]
        finally:
            guest.close()
    finally:
        backend.close()
    assert reply["frames"] > 0
    assert reply["lost_in_ring"] == 0
    assert after - before == reply["frames"]


def test_process_cpu_seconds_counts_this_process_burning_cpu() -> None:
    before = process_cpu_seconds(os.getpid())
    assert before is not None and before >= 0
    deadline = time.process_time() + 0.2
    while time.process_time() < deadline:
        pass
    after = process_cpu_seconds(os.getpid())
    assert after is not None and 0.1 <= after - before < 5
    assert process_cpu_seconds(-1) is None


@needs_netns
def test_udp_and_tcp_deliver_exact_counts_and_bytes() -> None:
    backend = Backend(vhostnet_template(), 1500, "vhostnet")
    sink, tcp_sink = UdpSink(), TcpSink()
    sink.start()
    tcp_sink.start()
    try:
        guest = guest_process(backend.socket, 1500)
        try:
            # UDP: every datagram the guest completed reached vhostnet and was handed
            # to the host's sink socket. On a busy machine the sink thread can fall
            # behind and its socket drop some: the namespace's own RcvbufErrors
            # counter says how many, so the sum must still be exact.
            before = backend.counters().get("device.tx.frames", 0)
            overflow_before = udp_receive_buffer_errors()
            reply = guest.request("udp_tx", payload=64, port=sink.port, duration=0.1)
            deadline = time.monotonic() + 2.0
            while (sink.packets + udp_receive_buffer_errors() - overflow_before < reply["frames"]
                   and time.monotonic() < deadline):
                time.sleep(0.01)
            after = backend.counters()["device.tx.frames"]
            assert after - before == reply["frames"]
            overflowed = udp_receive_buffer_errors() - overflow_before
            packets, size = sink.take()
            assert (packets + overflowed, size) == (reply["frames"], packets * 64)
            assert packets > 0

            # TCP guest -> host: a fixed number of bytes, same sha256 on both ends.
            reply = guest.request("tcp_tx", port=tcp_sink.port, limit=300_001)
            deadline = time.monotonic() + 5.0
            while not tcp_sink.results and time.monotonic() < deadline:
                time.sleep(0.01)
            assert reply["bytes"] == 300_001
            assert tcp_sink.results[0] == {"bytes": 300_001, "sha256": reply["sha256"]}

            # TCP host -> guest through the -t forward: the same bytes, each one checked.
            block = bulk_block(3, 1000)
            guest.send("tcp_rx", port=GUEST_TCP_PORT, seed=3, block_len=1000)
            sender = TcpSender(HOST_TCP_FWD, 0.2, block)
            sender.start()
            reply = guest.read(30.0)
            sender.stop(10.0)
            assert sender.error is None
            assert reply["bytes"] == sender.sent > 0
            assert reply["intact"] is True
        finally:
            guest.close()
    finally:
        sink.stop()
        tcp_sink.stop()
        backend.close()


class _NoNet:
    """Just enough of ``GuestNet`` for a connection that only receives (nothing is sent)."""

    def __init__(self) -> None:
        self.connections: dict[int, GuestTcp] = {}


def _receiving(expected: bytes) -> GuestTcp:
    conn = GuestTcp(_NoNet(), 5001, bytes(4), 40000, 1460)  # type: ignore[arg-type]
    conn.expect_repeated(expected)
    conn.irs, conn.rcv_nxt, conn.established = 0x12345678, 1, True
    return conn


def _deliver(conn: GuestTcp, payload: bytes) -> None:
    conn.segment((conn.irs + conn.rcv_nxt) & 0xFFFFFFFF, (conn.iss + 1) & 0xFFFFFFFF, ACK, 1000,
                 memoryview(payload), payload, 0, 0)


def test_bulk_receiver_checks_every_byte_against_the_repeated_block() -> None:
    block = bulk_block(5, 1000)
    stream = block * 200
    conn = _receiving(block)
    # Segments of uneven sizes, at every phase of the block, up to a 64 KiB one.
    for start, end in ((0, 1), (1, 999), (999, 66_534), (66_534, 131_000),
                       (131_000, 196_000), (196_000, 200_000)):
        _deliver(conn, stream[start:end])
    assert conn.received == 200_000 and conn.intact

    for corrupt in (0, 1460, 150_000):
        conn = _receiving(block)
        bad = bytearray(stream[:200_000])
        bad[corrupt] ^= 1
        for start in range(0, 200_000, 50_000):
            _deliver(conn, bytes(bad[start:start + 50_000]))
        assert conn.received == 200_000 and not conn.intact


def test_bulk_receiver_goes_on_past_4_gib() -> None:
    block = bulk_block(5, 1000)
    conn = _receiving(block)
    conn.rcv_nxt = (1 << 32) - 500  # the sequence numbers wrap 500 bytes on
    conn.received = conn.rcv_nxt - 1
    start = conn.received % 1000
    _deliver(conn, (block * 4)[start:start + 2000])
    assert conn.rcv_nxt == (1 << 32) + 1500 and conn.intact
    _deliver(conn, (block * 4)[start + 2000:start + 2500])
    assert conn.rcv_nxt == (1 << 32) + 2000 and conn.received == (1 << 32) + 1999


def test_repeated_block_digest_matches_hashlib() -> None:
    from bench.guest import _repeated_digest

    block = bytes(range(7))
    assert _repeated_digest(block, 30) == hashlib.sha256((block * 5)[:30]).hexdigest()


@needs_netns
def test_tiny_bench_run_writes_json_with_every_field(tmp_path) -> None:
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "bench", "--cases", "ring,tcp-rr", "--rounds", "1",
           "--duration", "0.1", "--json", str(out), "--markdown", str(tmp_path / "bench.md"),
           "--no-passt", "--compare", vhostnet_template()]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    data = json.loads(out.read_text())
    cases = {(r["case"], r["backend"]) for r in data["results"]}
    assert {("ring-split-64B", "vhostnet"), ("ring-split-1500B", "vhostnet"),
            ("ring-packed-64B", "vhostnet"), ("ring-packed-1500B", "vhostnet"),
            ("tcp-rr", "vhostnet"), ("tcp-rr", "other")} <= cases
    for result in data["results"]:
        assert result["median"] > 0 and result["baseline_median"] > 0
        assert result["ratio"] is not None
    other_rr = next(r for r in data["results"] if r["case"] == "tcp-rr" and r["backend"] == "other")
    assert "vs_vhostnet" in other_rr["extra"]
    assert "ring-split-64B" in done.stdout and "ring-packed-64B" in done.stdout
    table, comparison = (tmp_path / "bench.md").read_text().split("\n\n")
    table = table.splitlines()
    assert len(table) == 2 + len(data["results"])
    assert table[2].startswith("| ring-split-64B | vhostnet | Mpps |")
    # vhostnet's five cases (four ring rows, tcp-rr) against the other back-end's
    assert len(comparison.splitlines()) == 2 + 5 and "| vhostnet/other |" in comparison


def test_bench_refuses_outside_the_namespace_and_bad_options() -> None:
    env = {k: v for k, v in os.environ.items() if k != "VHOSTNET_NETNS"}
    done = subprocess.run([sys.executable, "-m", "bench", "--cases", "ring"],
                          capture_output=True, text=True, timeout=30, env=env)
    assert done.returncode == 2 and "namespace" in done.stderr
    done = subprocess.run([sys.executable, "-m", "bench", "--cases", "nope"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "unknown case" in done.stderr
    assert Settings().cases == ALL_CASES


def _plot_rows() -> list[Row]:
    return [Row("tcp-tx-mtu1500", "Gbit/s", [0.2, 0.3, 0.25], [3.0, 3.5], "loopback Gbit/s"),
            Row("guest-udp-rx", "Mbit/s", [150.0], [970.0], "loopback Mbit/s"),
            Row("tcp-rr", "p50 us", [500.0, 600.0], [16.0], "loopback p50 us"),
            Row("no-baseline", "Mpps", [1.0])]


def test_write_plot_draws_a_png_with_one_bar_per_compared_case(tmp_path) -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        reason = "matplotlib is not installed (the optional 'plot' extra)"
        print(reason)
        pytest.skip(reason)
    path = tmp_path / "bench.png"
    labels = write_plot(str(path), _plot_rows())
    assert labels == ["tcp-tx-mtu1500\nvhostnet", "guest-udp-rx\nvhostnet", "tcp-rr\nvhostnet"]
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_is_one_sentence(tmp_path, monkeypatch) -> None:
    # None in sys.modules makes `import matplotlib` raise ImportError, installed or not.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(PlotUnavailable) as caught:
        write_plot(str(tmp_path / "bench.png"), _plot_rows())
    assert "matplotlib" in str(caught.value) and "\n" not in str(caught.value)
    assert not (tmp_path / "bench.png").exists()


def test_guest_console_parsing_and_iperf3_reports() -> None:
    udp = {"end": {"sum_received": {"bytes": 14000, "bits_per_second": 1.2e8, "packets": 12,
                                    "lost_packets": 2, "lost_percent": 16.7}}}
    console = ("[    2.1] some kernel line\nIPERF-BEGIN guest-udp-rx 2\n"
               "IPERF-JSON-BEGIN guest-udp-rx 2 rc=0\n" + json.dumps(udp, indent=1) +
               "\nIPERF-JSON-END\nIPERF-JSON-BEGIN guest-tcp-tx 1 rc=1\n"
               '{"start": {}, "error": "unable to connect to server: Connection refused"}\n'
               "IPERF-JSON-END\n")
    runs = parse_guest_output(console)
    assert set(runs) == {("guest-udp-rx", 2), ("guest-tcp-tx", 1)}
    code, text = runs[("guest-udp-rx", 2)]
    result = parse_iperf_json(text, udp=True)
    assert (code, result.datagrams, result.bytes, result.mbit_s) == (0, 10, 14000, 120.0)
    code, text = runs[("guest-tcp-tx", 1)]
    with pytest.raises(BenchError, match="Connection refused"):
        parse_iperf_json(text, udp=False)
    with pytest.raises(BenchError, match="not JSON"):
        parse_iperf_json("iperf3: error - the server is busy", udp=False)


# A stand-in for iperf3: "-s" listens on the port; each "-c" run is refused while the
# count file says so (as iperf3 is between two tests), then reports 1 MB received.
FAKE_IPERF = """
import json, socket, sys, time
args = sys.argv[1:]
if "-s" in args:
    server = socket.socket()
    server.bind(("127.0.0.1", int(args[args.index("-p") + 1])))
    server.listen()
    time.sleep(60)
    sys.exit(0)
count_file, refusal = sys.argv[1:3]
left = int(open(count_file).read())
open(count_file, "w").write(str(left - 1))
if left > 0:
    print(json.dumps({"start": {}, "end": {}, "error": refusal}))
else:
    print(json.dumps({"end": {"sum_received": {"bits_per_second": 8e6, "bytes": 1000000}}}))
"""


REFUSED = "unable to connect to server: Connection refused"
BUSY = "the server is busy running a test. try again later"


@pytest.mark.parametrize("refusals, attempts, refusal", [(2, 3, REFUSED), (3, 3, REFUSED),
                                                         (2, 3, BUSY)])
def test_loopback_iperf_run_tries_again_after_a_refusal(tmp_path, refusals: int, attempts: int,
                                                        refusal: str) -> None:
    script = tmp_path / "fake_iperf3.py"
    script.write_text(FAKE_IPERF)
    count_file = tmp_path / "refusals"
    count_file.write_text(str(refusals))
    server = HostIperf([sys.executable, str(script), str(count_file), refusal],
                       tmp_path / "server.log")
    try:
        tcp_tx = next(d for d in DIRECTIONS if not d.udp and not d.reverse)
        settings = GuestSettings(rounds=1, seconds=1)
        if refusals < attempts:
            assert server.loopback(tcp_tx, settings).bytes == 1000000
        else:
            with pytest.raises(BenchError, match=refusal.split(":")[0]):
                server.loopback(tcp_tx, settings)
        runs = refusals - int(count_file.read_text())
        assert runs == min(refusals + 1, attempts), "refused runs are tried again, a bounded number of times"
    finally:
        server.close()


def test_bench_refuses_bad_guest_options() -> None:
    for args, words in ((["--guest", "--qemu", "8.0"], "--qemu"),
                        (["--guest", "--guest-udp-rate", "fast"], "--guest-udp-rate"),
                        (["--guest", "--guest-seconds", "0"], "--guest-seconds"),
                        (["--guest", "--guest-mtu", "1500,9k"], "--guest-mtu")):
        done = subprocess.run([sys.executable, "-m", "bench", *args],
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 2 and words in done.stderr, done.stderr
        assert "Traceback" not in done.stderr


# ---- endurance cases: the machinery counts right (tiny counts, no figure judged) ----


@needs_netns
def test_soak_opens_and_closes_the_flows_it_says() -> None:
    from bench.soak import SoakSettings, soak_rows

    rss, fds = soak_rows(SoakSettings(seconds=3, tcp_flows=50, udp_flows=50,
                                      udp_idle_timeout=1.0))
    assert rss.extra["tcp_flows"] == 50 and rss.extra["tcp_failed"] == 0, rss.extra
    assert rss.extra["udp_flows"] == 50 and rss.extra["udp_replies"] == 50, rss.extra
    assert rss.extra["peak_udp_open"] > 0, rss.extra
    assert rss.extra["end_tcp_open"] == rss.extra["end_udp_open"] == 0, rss.extra
    assert rss.extra["start"] <= rss.extra["peak"] and fds.extra["start"] <= fds.extra["peak"]
    assert rss.rounds == [rss.extra["end"]] and fds.rounds == [fds.extra["end"]]


@needs_netns
def test_churn_runs_every_cycle() -> None:
    from bench.soak import SoakSettings, churn_rows

    (row,) = churn_rows(SoakSettings(churn_cycles=20))
    assert row.extra["cycles"] == 20 and row.rounds == [row.extra["end"]]
    assert row.extra["fds_end"] <= row.extra["fds_start"] + 1, row.extra


@needs_netns
def test_udp_request_response_counts_every_transaction_both_ways() -> None:
    """udp-rr: every transaction the guest counts is one datagram the echo server saw and one
    vhostnet moved each way; the case's row carries latency, rate and wake-ups."""
    from bench.cases import Baselines, nat_rows
    from bench.runner import loopback_process

    backend = Backend(vhostnet_template(), 1500, "vhostnet")
    echo = UdpSink(echo=True)
    echo.start()
    try:
        guest = guest_process(backend.socket, 1500)
        try:
            before = backend.counters()
            reply = guest.request("udp_rr", port=echo.port, duration=0.2, payload=64)
            after = backend.counters()
        finally:
            guest.close()
    finally:
        echo.stop()
        backend.close()
    assert reply["count"] > 0 and 0 < reply["p50_us"] <= reply["p99_us"]
    assert echo.packets == reply["count"] and echo.bytes == 64 * reply["count"]
    assert after["udp.tx_host"] - before.get("udp.tx_host", 0) == reply["count"]
    assert after["udp.rx_host"] - before.get("udp.rx_host", 0) == reply["count"]

    client = loopback_process()
    try:
        settings = Settings(cases=("udp-rr",), rounds=1, duration=0.1)
        rows = nat_rows(vhostnet_template(), "vhostnet", 1500, settings,
                        Baselines(client, settings))
    finally:
        client.close()
    (row,) = rows
    assert (row.case, row.unit) == ("udp-rr-64B", "p50 us")
    assert row.rounds[0] > 0 and row.baseline[0] > 0
    assert row.extra["transactions"] > 0 and row.extra["txn_per_s"] > 0
    assert row.extra["p99_us"] >= row.rounds[0]
    assert {"cpu_us_per_txn", "wakeups_per_txn"} <= set(row.extra)
