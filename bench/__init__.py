"""``python -m bench`` (``make bench``): microbenchmarks of vhostnet under load from a separate front-end process.

Run it inside the private network namespace (``make bench`` does):
``python3 -m tools.netns -- python3 -m bench [--cases ring,tcp-rr] [--json F]``.
``--guest`` (or the case ``guest``) adds iperf3 in a real TCG guest (see guest_iperf.py).
The endurance cases ``soak`` and ``churn`` (bench/soak.py) run only when named.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from bench.cases import ALL_CASES, TCP_MTUS, Baselines, Settings, nat_rows, ring_rows
from bench.guest_iperf import (
    GUEST_CASE,
    QEMU_VERSIONS,
    GuestBaselines,
    GuestKits,
    GuestSettings,
    check_udp_rate,
    guest_rows,
    load_kits,
)
from bench.output import (
    HEADER,
    PlotUnavailable,
    Progress,
    Row,
    check_plot,
    format_row,
    markdown_table,
    write_json,
    write_plot,
)
from bench.runner import BenchError, loopback_process, vhostnet_template
from bench.soak import SOAK_CASES, SoakSettings, churn_rows, soak_rows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench",
                                description="Measure vhostnet (and optionally another back-end) "
                                            "against host-to-host baselines from the same run.")
    p.add_argument("--cases", default=",".join(ALL_CASES),
                   help=f"comma-separated cases (default: {','.join(ALL_CASES)}; "
                        f"also {GUEST_CASE!r}, the same as --guest)")
    p.add_argument("--rounds", type=int, default=3, help="rounds per case (min/median/max; default 3)")
    p.add_argument("--duration", type=float, default=1.0, help="seconds per round (default 1.0)")
    p.add_argument("--json", metavar="FILE", help="write every figure to FILE as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="draw median/baseline per case (needs matplotlib)")
    p.add_argument("--markdown", metavar="FILE", help="write the table as Markdown (for the README)")
    p.add_argument("--compare", metavar="CMD",
                   help="also measure another vhost-user back-end started by CMD; placeholders "
                        "{socket} (required), {control}, {mtu}, {tcp_fwd} (40001:5001), {udp_fwd} (40002:5002)")
    p.add_argument("--no-offload", action="store_true",
                   help="the benchmark guest negotiates no checksum/segmentation offloads")
    p.add_argument("--guest", action="store_true",
                   help="also measure iperf3 in a real TCG guest, TCP and UDP both ways "
                        "(needs `make kit`)")
    p.add_argument("--qemu", default=QEMU_VERSIONS[0], metavar="VERSION",
                   help=f"QEMU for --guest: {' or '.join(QEMU_VERSIONS)} (default {QEMU_VERSIONS[0]})")
    p.add_argument("--guest-seconds", type=int, default=3, metavar="N",
                   help="seconds per iperf3 run with --guest (default 3)")
    p.add_argument("--guest-udp-rate", default="1G", metavar="RATE",
                   help="offered UDP rate (iperf3 -b) with --guest (default 1G)")
    p.add_argument("--guest-stream", action="store_true",
                   help="with --guest, also boot the guest with -netdev stream (rows NAME-stream)")
    p.add_argument("--soak-seconds", type=float, default=600.0, metavar="N",
                   help="how long the soak case spreads its flows over (default 600)")
    p.add_argument("--soak-tcp", type=int, default=10_000, metavar="N",
                   help="TCP connections the soak case opens and closes (default 10000)")
    p.add_argument("--soak-udp", type=int, default=20_000, metavar="N",
                   help="UDP flows the soak case opens, closed by expiry (default 20000)")
    p.add_argument("--churn-cycles", type=int, default=10_000, metavar="N",
                   help="front-end connect/negotiate/disconnect cycles of the churn case "
                        "(default 10000)")
    return p


def run(settings: Settings, compare: str | None, guest: GuestSettings,
        kits: GuestKits | None, soak: SoakSettings | None = None) -> list[Row]:
    rows: list[Row] = []
    soak = soak or SoakSettings()
    if "soak" in settings.cases:
        rows += _show(settings, soak_rows(soak, settings.progress))
    if "churn" in settings.cases:
        rows += _show(settings, churn_rows(soak, settings.progress))
    if not set(settings.cases) - set(SOAK_CASES):
        return rows
    guest_baselines = GuestBaselines()
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
                nat_cases = set(settings.cases) - {"ring", GUEST_CASE, *SOAK_CASES}
                if mtu != TCP_MTUS[0]:
                    nat_cases &= {"tcp-tx", "tcp-rx"}
                if nat_cases:
                    sub = Settings(tuple(sorted(nat_cases)), settings.rounds, settings.duration,
                                   settings.progress, settings.offload)
                    rows += _show(settings, nat_rows(template, name, mtu, sub, baselines))
            if kits is not None:
                rows += _show(settings, guest_rows(kits, template, name, guest, guest_baselines))
                if guest.stream:
                    rows += _show(settings, guest_rows(kits, template, name, guest,
                                                       guest_baselines, stream=True))
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
    if args.guest and GUEST_CASE not in cases:
        cases += (GUEST_CASE,)
    known = (*ALL_CASES, GUEST_CASE, *SOAK_CASES)
    unknown = [c for c in cases if c not in known]
    kits: GuestKits | None = None
    ok = False
    try:
        if unknown:
            raise BenchError(f"unknown case {unknown[0]!r}; known: {', '.join(known)}")
        if args.qemu not in QEMU_VERSIONS:
            raise BenchError(f"--qemu must be one of {', '.join(QEMU_VERSIONS)}, not {args.qemu!r}")
        if not 1 <= args.guest_seconds <= 60:
            raise BenchError("--guest-seconds must be 1..60")
        check_udp_rate(args.guest_udp_rate)
        if args.plot:
            check_plot()
        if args.compare and "{socket}" not in args.compare:
            raise BenchError("--compare needs a command with {socket} where the socket path goes")
        if not 1 <= args.rounds <= 100 or not 0.05 <= args.duration <= 60:
            raise BenchError("--rounds must be 1..100 and --duration 0.05..60 seconds")
        if os.environ.get("VHOSTNET_NETNS") != "1":
            raise BenchError("run benchmarks inside the private namespace: "
                             "python3 -m tools.netns -- python3 -m bench")
        settings = Settings(cases, args.rounds, args.duration, Progress(), not args.no_offload)
        guest = GuestSettings(args.rounds, args.guest_seconds, args.qemu, args.guest_udp_rate,
                              settings.progress, stream=args.guest_stream)
        if GUEST_CASE in cases:
            # Before any other case, so a missing kit is reported at once.
            kits = load_kits(args.qemu)
        print(HEADER, flush=True)
        started = time.monotonic()
        if not (1 <= args.soak_seconds <= 86400 and 0 <= args.soak_tcp <= 1_000_000
                and 0 <= args.soak_udp <= 1_000_000 and 1 <= args.churn_cycles <= 1_000_000):
            raise BenchError("--soak-seconds must be 1..86400 and the soak and churn counts "
                             "0..1000000 (churn at least 1)")
        soak = SoakSettings(args.soak_seconds, args.soak_tcp, args.soak_udp,
                            churn_cycles=args.churn_cycles)
        rows = run(settings, args.compare, guest, kits, soak)
        settings.progress.clear()
        meta = {"rounds": args.rounds, "duration": args.duration, "cases": list(cases),
                "compare": args.compare, "elapsed_s": time.monotonic() - started,
                "offload": not args.no_offload,
                "cpus": os.cpu_count()}
        if kits is not None:
            meta["guest"] = {"qemu": args.qemu, "seconds": args.guest_seconds,
                             "udp_rate": args.guest_udp_rate}
        if args.json:
            write_json(args.json, rows, meta)
        if args.markdown:
            with open(args.markdown, "w", encoding="utf-8") as handle:
                handle.write(markdown_table(rows))
        if args.plot:
            write_plot(args.plot, rows)
        ok = True
    except (BenchError, PlotUnavailable) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        if kits is not None and ok:
            kits.close()  # on failure the logs stay where the message points
    return 0
