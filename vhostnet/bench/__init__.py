"""``vhostnet bench``: microbenchmarks of vhostnet under load from a separate front-end process.

Run it inside the private network namespace (``make bench`` does):
``python3 -m tools.netns -- python3 -m vhostnet bench [--cases ring,tcp-rr] [--json F]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from .cases import ALL_CASES, TCP_MTUS, Baselines, Settings, nat_rows, ring_rows
from .output import HEADER, PlotUnavailable, Progress, Row, format_row, write_json, write_plot
from .runner import BenchError, loopback_process, vhostnet_template


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vhostnet bench",
                                description="Measure vhostnet (and optionally another back-end) "
                                            "against host-to-host baselines from the same run.")
    p.add_argument("--cases", default=",".join(ALL_CASES),
                   help=f"comma-separated cases (default all: {','.join(ALL_CASES)})")
    p.add_argument("--rounds", type=int, default=3, help="rounds per case (min/median/max; default 3)")
    p.add_argument("--duration", type=float, default=1.0, help="seconds per round (default 1.0)")
    p.add_argument("--json", metavar="FILE", help="write every figure to FILE as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="draw median/baseline per case (needs matplotlib)")
    p.add_argument("--compare", metavar="CMD",
                   help="also measure another vhost-user back-end started by CMD; placeholders "
                        "{socket} (required), {control}, {mtu}, {tcp_fwd} (40001:5001), {udp_fwd} (40002:5002)")
    p.add_argument("--no-offload", action="store_true",
                   help="the benchmark guest negotiates no checksum/segmentation offloads")
    p.add_argument("--guest", action="store_true",
                   help="measure with a real TCG guest running iperf3 (not implemented yet)")
    return p


def run(settings: Settings, compare: str | None) -> list[Row]:
    rows: list[Row] = []
    client = loopback_process()
    try:
        baselines = Baselines(client, settings)
        backends = [("vhostnet", vhostnet_template(), vhostnet_template(discard_tx=True))]
        if compare:
            backends.append(("other", compare, compare))
        for name, template, ring_template in backends:
            if "ring" in settings.cases:
                rows += _show(settings, ring_rows(ring_template, name, settings, baselines))
            for mtu in TCP_MTUS:
                nat_cases = set(settings.cases) - {"ring"}
                if mtu != TCP_MTUS[0]:
                    nat_cases &= {"tcp-tx", "tcp-rx"}
                if nat_cases:
                    sub = Settings(tuple(sorted(nat_cases)), settings.rounds, settings.duration,
                                   settings.progress, settings.offload)
                    rows += _show(settings, nat_rows(template, name, mtu, sub, baselines))
    finally:
        client.close()
    if compare:
        ours = {r.case: r for r in rows if r.backend == "vhostnet"}
        for row in rows:
            if row.backend == "other" and row.case in ours and ours[row.case].median:
                row.extra["vs_vhostnet"] = row.median / ours[row.case].median
    return rows


def _show(settings: Settings, rows: list[Row]) -> list[Row]:
    settings.progress.clear()
    for row in rows:
        print(format_row(row), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    cases = tuple(c.strip() for c in args.cases.split(",") if c.strip())
    unknown = [c for c in cases if c not in ALL_CASES]
    try:
        if unknown:
            raise BenchError(f"unknown case {unknown[0]!r}; known: {', '.join(ALL_CASES)}")
        if args.guest:
            raise BenchError("--guest (a real TCG guest running iperf3) is not implemented yet")
        if args.compare and "{socket}" not in args.compare:
            raise BenchError("--compare needs a command with {socket} where the socket path goes")
        if not 1 <= args.rounds <= 100 or not 0.05 <= args.duration <= 60:
            raise BenchError("--rounds must be 1..100 and --duration 0.05..60 seconds")
        if os.environ.get("VHOSTNET_NETNS") != "1":
            raise BenchError("run benchmarks inside the private namespace: "
                             "python3 -m tools.netns -- python3 -m vhostnet bench")
        settings = Settings(cases, args.rounds, args.duration, Progress(), not args.no_offload)
        print(HEADER, flush=True)
        started = time.monotonic()
        rows = run(settings, args.compare)
        settings.progress.clear()
        meta = {"rounds": args.rounds, "duration": args.duration, "cases": list(cases),
                "compare": args.compare, "elapsed_s": time.monotonic() - started,
                "offload": not args.no_offload,
                "cpus": os.cpu_count()}
        if args.json:
            write_json(args.json, rows, meta)
        if args.plot:
            write_plot(args.plot, rows)
    except (BenchError, PlotUnavailable) as exc:
        print(f"vhostnet bench: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0
