"""The passt comparison's pieces: testpmd's statistics, rounds of interleaved back-ends merged,
ratios per case, CPU and wake-ups per unit, the passt command. No figure is judged for speed."""

from __future__ import annotations

import os
import shlex
import time

import pytest

from bench import testpmd
from bench.output import Row, compare_backends, comparison_table, merge_rounds, write_plot
from bench.runner import BenchError, Usage, process_wakeups
from bench.testpmd import parse_forward_stats, parse_periodic_rx
from tools.netns import in_private_netns

# What dpdk-testpmd 22.11 prints with --stats-period 1, then at SIGINT (trimmed).
TESTPMD_OUTPUT = """\
Port statistics ====================================
  ######################## NIC statistics for port 0  ########################
  RX-packets: 0          RX-missed: 0          RX-bytes:  0
  TX-packets: 32         TX-errors: 0          TX-bytes:  1920
  Rx-pps:            0          Rx-bps:            0
  ############################################################################
Port statistics ====================================
  ######################## NIC statistics for port 0  ########################
  RX-packets: 11094      RX-missed: 0          RX-bytes:  710016
  TX-packets: 32         TX-errors: 0          TX-bytes:  1920
  ############################################################################
Port statistics ====================================
Telling cores to stop...

  ---------------------- Forward statistics for port 0  ----------------------
  RX-packets: 22137          RX-dropped: 0             RX-total: 22137
  TX-packets: 7              TX-dropped: 222795136     TX-total: 222795143
  ----------------------------------------------------------------------------
"""


def test_testpmd_statistics_are_parsed() -> None:
    assert parse_forward_stats(TESTPMD_OUTPUT) == (22137, 7)
    # the third block is not whole yet: the latest whole one counts
    before_stop = TESTPMD_OUTPUT.split("Telling")[0]
    assert parse_periodic_rx(before_stop) == (2, 11094)
    assert parse_periodic_rx("EAL: starting") == (0, 0)
    with pytest.raises(BenchError):
        parse_forward_stats(before_stop)


def test_testpmd_command_line() -> None:
    argv = testpmd.testpmd_argv("/tmp/x/vhost.sock", "txonly", 64, "52:56:00:00:00:02", 5555, "vn1")
    assert argv[0] == "dpdk-testpmd" and "--no-huge" in argv and "--no-pci" in argv
    assert "net_virtio_user0,path=/tmp/x/vhost.sock,queues=1,queue_size=256" in argv
    assert {"--forward-mode=txonly", "--txpkts=64", "--eth-peer=0,52:56:00:00:00:02",
            "--tx-ip=10.0.2.15,10.0.2.2", "--tx-udp=40000,5555"} <= set(argv)
    assert argv.index("--") < argv.index("--forward-mode=txonly")


def test_interleaved_rounds_merge_per_case_and_back_end() -> None:
    base = [10.0, 11.0, 12.0]
    rows = []
    for value in (1.0, 3.0, 2.0):
        rows.append(Row("tcp-rr", "p50 us", [value * 100], base, "loopback p50 us",
                        extra={"transactions": 10, "p99_us": value, "exact_bytes": True,
                               "qemu": "10.0"}))
        rows.append(Row("tcp-rr", "p50 us", [value * 50], base, "loopback p50 us",
                        extra={"transactions": 20, "exact_bytes": value != 3.0},
                        backend="passt"))
    ours, theirs = merge_rounds(rows)
    assert (ours.backend, theirs.backend) == ("vhostnet", "passt")
    assert ours.rounds == [100.0, 300.0, 200.0] and ours.baseline == base
    assert ours.extra == {"transactions": 30, "p99_us": 2.0, "exact_bytes": True, "qemu": "10.0"}
    assert theirs.extra == {"transactions": 60, "exact_bytes": False}
    compare_backends([ours, theirs], "vhostnet", "passt")
    assert ours.extra["vs_passt"] == pytest.approx(2.0)
    assert theirs.extra["vs_vhostnet"] == pytest.approx(0.5)


def test_comparison_table_says_which_is_better() -> None:
    rows = [Row("testpmd-tx-64B", "pps", [90.0, 100.0, 120.0],
                extra={"cpu_us_per_pkt": 2.5, "wakeups_per_pkt": 0.25}),
            Row("testpmd-tx-64B", "pps", [200.0], backend="passt"),
            Row("tcp-rr", "p50 us", [300.0]),
            Row("tcp-rr", "p50 us", [400.0], backend="passt"),
            Row("ring-64B", "Mpps", [1.0]),  # vhostnet only
            Row("tcp-crr", "conn/s", [10.0], extra={"cpu_us_per_conn": 300.0,
                                                    "wakeups_per_conn": 5.0}),
            Row("tcp-crr", "conn/s", [20.0], backend="passt")]
    compare_backends(rows, "vhostnet", "passt")
    lines = comparison_table(rows, "vhostnet", "passt").splitlines()
    assert lines[0].startswith("| case | unit | vhostnet median (min-max) | passt median")
    assert lines[2] == ("| testpmd-tx-64B | pps | 100.0 (90.0-120.0) | 200.0 (200.0-200.0) | 0.50 | "
                        "passt | cpu_us/pkt 2.5, wakeups/pkt 0.25 | - |")
    assert lines[3].startswith("| tcp-rr | p50 us | 300.0 (300.0-300.0) | 400.0 (400.0-400.0) | "
                               "0.75 | vhostnet |")
    assert lines[4] == "| ring-64B | Mpps | 1 (1-1) | - | - | - | - | - |"
    assert lines[5].endswith("| cpu_us/conn 300.0, wakeups/conn 5 | - |"), lines[5]


def test_usage_per_unit_and_wakeups_of_a_process() -> None:
    start, end = Usage(1.0, 100), Usage(1.5, 300)
    assert start.per_unit(end, 1000, "pkt") == {"cpu_us_per_pkt": 500.0, "wakeups_per_pkt": 0.2}
    assert start.per_unit(end, 0, "MB") == {}
    before = process_wakeups(os.getpid())
    for _ in range(5):
        time.sleep(0.001)  # each sleep is a voluntary context switch
    after = process_wakeups(os.getpid())
    assert before is not None and after is not None and after - before >= 5
    assert process_wakeups(-1) is None and Usage.of(-1) is None


def test_plot_has_a_panel_of_ratios_against_passt(tmp_path) -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        reason = "matplotlib is not installed (the optional 'plot' extra)"
        print(reason)
        pytest.skip(reason)
    rows = [Row("tcp-rr", "p50 us", [300.0], [20.0], "loopback p50 us"),
            Row("tcp-rr", "p50 us", [400.0], [20.0], "loopback p50 us", backend="passt"),
            Row("testpmd-rx-64B", "pps", [5.0]), Row("testpmd-rx-64B", "pps", [4.0], backend="passt")]
    compare_backends(rows, "vhostnet", "passt")
    path = tmp_path / "bench.png"
    labels = write_plot(str(path), rows, ("vhostnet", "passt"))
    assert labels == ["tcp-rr\nvhostnet", "tcp-rr\npasst"]
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def kit_passt_template() -> str:
    """The bench's command template for trixie's passt from the kit cache; a printed skip
    when the kit has none."""
    from bench.passt import passt_template
    from tools.guestkit import DEFAULT_CACHE_DIR

    if not (DEFAULT_CACHE_DIR / "passt-trixie/usr/bin/passt").exists():
        reason = "trixie's passt is not in the kit cache (make kit fetches it)"
        print(reason)
        pytest.skip(reason)
    return passt_template()


def test_passt_command_gives_the_guest_vhostnets_network() -> None:
    from bench.passt import gateway_mac_text

    template = kit_passt_template()
    argv = shlex.split(template.format(socket="/s", mtu=1500, tcp_fwd="1:2", udp_fwd="3:4"))
    assert argv[0].endswith("ld-linux-x86-64.so.2") and os.path.basename(argv[3]).startswith("passt")
    assert gateway_mac_text() == "52:56:00:00:00:02"
    for option, value in (("--vhost-user", None), ("-s", "/s"), ("-m", "1500"), ("-t", "1:2"),
                          ("-u", "3:4"), ("-M", gateway_mac_text()),
                          ("--map-host-loopback", "10.0.2.2")):
        assert option in argv
        if value is not None:
            assert argv[argv.index(option) + 1] == value
    # vhostnet's IPv6 plan too (the guest rows over IPv6): no -4, ::1 at fec0::2.
    assert "-4" not in argv
    maps = [argv[i + 1] for i, arg in enumerate(argv) if arg == "--map-host-loopback"]
    assert maps == ["10.0.2.2", "fec0::2"]


def test_a_case_another_back_end_cannot_serve_keeps_the_rows_of_the_others(monkeypatch,
                                                                           capsys) -> None:
    """Each VM-less case is a group of its own: when the second back-end fails tcp-rr, its
    udp-tx and tcp-tx rows (at both MTUs) stay, tcp-rr is not tried again in later rounds,
    and the reason is printed once."""
    import bench
    from bench.cases import Settings
    from bench.guest_iperf import GuestSettings

    calls: list[tuple[str, tuple[str, ...], int]] = []

    def nat_rows(template: str, name: str, mtu: int, settings: Settings,
                 baselines: object) -> list[Row]:
        calls.append((name, settings.cases, mtu))
        if name == "other" and "tcp-rr" in settings.cases:
            raise BenchError("the benchmark guest: tcp_rr failed: no answer")
        return [Row(f"{case}-mtu{mtu}", "x", [1.0], [1.0], "b", backend=name)
                for case in settings.cases]

    class Client:
        def close(self) -> None:
            pass

    monkeypatch.setattr(bench, "nat_rows", nat_rows)
    monkeypatch.setattr(bench, "loopback_process", Client)
    settings = Settings(cases=("udp-tx", "tcp-rr", "tcp-tx"), rounds=2, duration=0.1)
    contenders = [bench.Contender("vhostnet", "v", None), bench.Contender("other", "o", None)]
    rows = bench.run(settings, contenders, GuestSettings(rounds=2), None, False)
    got = {(row.case, row.backend): len(row.rounds) for row in rows}
    cases = ("udp-tx-mtu1500", "tcp-rr-mtu1500", "tcp-tx-mtu1500", "tcp-tx-mtu65520")
    assert got == {(case, name): 2 for name in ("vhostnet", "other") for case in cases
                   if (case, name) != ("tcp-rr-mtu1500", "other")}
    assert calls.count(("other", ("tcp-rr",), 1500)) == 1
    skipped = [line for line in capsys.readouterr().out.splitlines() if "skipped" in line]
    assert skipped == ["bench: other: tcp-rr at MTU 1500 skipped: "
                       "the benchmark guest: tcp_rr failed: no answer"]


@pytest.mark.skipif(not in_private_netns(), reason="sends traffic: run inside tools.netns")
def test_the_benchmark_guest_transmits_through_passt() -> None:
    """passt negotiates no EVENT_IDX and reads TX only when kicked: the benchmark guest's
    datagrams, a TCP stream (byte for byte) and UDP requests reach the host through it. And
    passt learns the guest's IPv4 address from IPv4 packets only: a connection from the host
    as the fresh guest's first TCP reaches it."""
    from bench.cases import _sink_result
    from bench.guest_net import bulk_block
    from bench.hostside import TcpSender, TcpSink, UdpSink
    from bench.runner import GUEST_TCP_PORT, HOST_TCP_FWD, Backend, guest_process

    backend = Backend(kit_passt_template(), 1500, "passt")
    sink, stream, echo = UdpSink(), TcpSink(), UdpSink(echo=True)
    workers = (sink, stream, echo)
    for worker in workers:
        worker.start()
    try:
        guest = guest_process(backend.socket, 1500, offload=True)
        try:
            guest.send("tcp_rx", port=GUEST_TCP_PORT, seed=3, block_len=1024)
            sender = TcpSender(HOST_TCP_FWD, 0.2, bulk_block(3, 1024))
            sender.start()
            try:
                rx = guest.read(30.0)
            finally:
                sender.stop(5.0)
            udp = guest.request("udp_tx", payload=64, port=sink.port, duration=0.2)
            tcp = guest.request("tcp_tx", port=stream.port, limit=1_000_000)
            rr = guest.request("udp_rr", port=echo.port, duration=0.2, payload=64)
        finally:
            guest.close()
        time.sleep(0.1)  # the last datagrams into the sink
        got = _sink_result(stream, 0)
    finally:
        for worker in workers:
            worker.stop()
        backend.close()
    assert sender.error is None and rx["bytes"] == sender.sent > 0
    assert rx["intact"] is True
    assert udp["frames"] > 0 and udp["lost_in_ring"] == 0 and sink.packets > 0
    assert udp["tx_kicks"] > 1
    assert tcp["bytes"] == got["bytes"] == 1_000_000 and tcp["sha256"] == got["sha256"]
    assert rr["count"] > 0 and echo.packets == rr["count"]


def test_a_back_end_that_does_not_start_says_why_in_the_error() -> None:
    """A back-end's stderr goes to a file (passt repeats itself at every start); when it
    fails to start, what it said is in the error."""
    import sys

    from bench.runner import Backend

    command = f"{sys.executable} -c \"import sys; sys.exit('unknown option {{socket}}')\""
    with pytest.raises(BenchError, match="it said: unknown option /"):
        Backend(command, 1500, "broken")


def test_the_back_ends_take_turns_running_first() -> None:
    from bench import Contender, round_order

    ours, theirs = Contender("vhostnet", "a", None), Contender("passt", "b", None)
    orders = [[c.name for c in round_order([ours, theirs], index)] for index in range(3)]
    assert orders == [["vhostnet", "passt"], ["passt", "vhostnet"], ["vhostnet", "passt"]]
