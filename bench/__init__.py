"""``python -m bench`` (``make bench``): microbenchmarks of vhostnet under load from a separate front-end process.

Run it inside the private network namespace (``make bench`` does):
``python3 -m tools.netns -- python3 -m bench [--cases ring,tcp-rr] [--json F]``.
``--guest`` (or the case ``guest``) adds iperf3 in a real TCG guest (see guest_iperf.py).
The endurance cases ``soak`` and ``churn`` (bench/soak.py) run only when named.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from bench.cases import ALL_CASES, TCP_MTUS, Baselines, Settings, nat_rows, ring_rows
from bench.guest_iperf import (
    DIRECTIONS,
    GUEST_CASE,
    GUEST_MTUS,
    QEMU_VERSIONS,
    GuestBaselines,
    GuestKits,
    GuestSettings,
    check_udp_rate,
    compare_families,
    guest_rows,
    load_kits,
    parse_mtus,
    select_directions,
)
from bench.output import (
    HEADER,
    PlotUnavailable,
    Progress,
    Row,
    check_plot,
    compare_backends,
    comparison_table,
    format_row,
    markdown_table,
    merge_rounds,
    write_json,
    write_plot,
)
from bench.passt import PASST, gateway_mac_text, passt_template
from bench.runner import BenchError, loopback_process, vhostnet_template
from bench.soak import SOAK_CASES, SoakSettings, churn_rows, soak_rows
from bench.switch import SWITCH_CASE, switch_rows
from bench.testpmd import TESTPMD_CASE, testpmd_missing, testpmd_rows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench",
                                description="Measure vhostnet (and optionally another back-end) "
                                            "against host-to-host baselines from the same run.")
    p.add_argument("--cases", default=",".join((*ALL_CASES, TESTPMD_CASE, SWITCH_CASE)),
                   help="comma-separated cases (default: "
                        f"{','.join((*ALL_CASES, TESTPMD_CASE, SWITCH_CASE))}; "
                        f"also {GUEST_CASE!r}, the same as --guest; {TESTPMD_CASE!r}: "
                        "dpdk-testpmd as a VM-less front-end, txonly and rxonly, 64 and 1500 B; "
                        f"{SWITCH_CASE!r}: guest to guest through the switch kernel, driven "
                        "directly, then between two front-ends on one --max-guests 2 vhostnet, "
                        "on vhostnet alone)")
    p.add_argument("--rounds", type=int, default=3, help="rounds per case (min/median/max; default 3)")
    p.add_argument("--duration", type=float, default=1.0, help="seconds per round (default 1.0)")
    p.add_argument("--json", metavar="FILE", help="write every figure to FILE as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="draw median/baseline per case (needs matplotlib)")
    p.add_argument("--markdown", metavar="FILE", help="write the table as Markdown (for the README)")
    p.add_argument("--compare", metavar="CMD",
                   help="also measure another vhost-user back-end started by CMD; placeholders "
                        "{socket} (required), {control}, {mtu}, {tcp_fwd} (40001:5001), {udp_fwd} (40002:5002)")
    p.add_argument("--no-passt", action="store_true",
                   help="measure vhostnet alone; by default Debian trixie's passt (fetched by "
                        "`make kit`) runs every case too, interleaved round by round")
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
    p.add_argument("--guest-cases", default="", metavar="LIST",
                   help="with --guest, only these guest cases, e.g. udp or guest-udp-rx,tcp-tx "
                        "(a name with or without guest-, or a part of it; default all)")
    p.add_argument("--guest-stream", action="store_true",
                   help="with --guest, also boot the guest with -netdev stream (rows NAME-stream)")
    p.add_argument("--guest-stream-only", action="store_true",
                   help="with --guest, boot the guest with -netdev stream only (no vhost-user "
                        "guest rows)")
    p.add_argument("--guest-mtu", default=",".join(map(str, GUEST_MTUS)), metavar="LIST",
                   help="with --guest, the guest's and back-ends' MTUs, one boot each (default "
                        f"{','.join(map(str, GUEST_MTUS))}; rows past {GUEST_MTUS[0]} are named "
                        "CASE-mtuN)")
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


@dataclass(frozen=True)
class Contender:
    """A back-end measured in the run: its name and the command templates (runner.Backend)."""

    name: str
    template: str
    # The ring case (vhostnet discards guest frames, --discard-tx); None: not measured
    # (passt has no such mode and the ring guest's frames mean nothing to it).
    ring_template: str | None
    # The guest on -netdev stream (--guest-stream); None: ``template`` serves both.
    stream_template: str | None = None


def round_order(contenders: list[Contender], index: int) -> list[Contender]:
    """The back-ends of round ``index`` (from 0) in the order they run: as given in even
    rounds, reversed in odd ones."""
    return contenders if index % 2 == 0 else contenders[::-1]


def run(settings: Settings, contenders: list[Contender], guest: GuestSettings,
        kits: GuestKits | None, testpmd: bool, soak: SoakSettings | None = None) -> list[Row]:
    """Every case, a round at a time, the back-ends interleaved within each round, in an
    order that alternates (A B, B A, A B: ``round_order``): a load that comes and goes on the
    machine touches both alike, and neither always runs first after the other's load.
    The endurance cases (soak, churn) run first, once, on vhostnet alone."""
    rows: list[Row] = []
    soak = soak or SoakSettings()
    if "soak" in settings.cases:
        rows += soak_rows(soak, settings.progress)
    if "churn" in settings.cases:
        rows += churn_rows(soak, settings.progress)
    if not set(settings.cases) - set(SOAK_CASES):
        return _show(settings, rows)
    guest_baselines = GuestBaselines(rounds=settings.rounds)
    one = dataclasses.replace(settings, rounds=1)
    one_guest = dataclasses.replace(guest, rounds=1)
    client = loopback_process()
    try:
        baselines = Baselines(client, settings)  # every round of the baselines at first use
        if SWITCH_CASE in settings.cases:  # in this process, on vhostnet's kernel alone
            rows += switch_rows(settings, baselines)
        failed: dict[tuple[str, str], str] = {}  # (back-end, group) -> why it is skipped
        for index in range(settings.rounds):
            for c in round_order(contenders, index):
                settings.progress.update(f"round {index + 1}/{settings.rounds}: {c.name}")
                for group, measure in round_groups(c, settings, one, one_guest, baselines,
                                              guest_baselines, kits, testpmd):
                    if (c.name, group) in failed:
                        continue
                    try:
                        rows += measure()
                    except BenchError as error:
                        if c is contenders[0]:
                            raise
                        # Another back-end may not serve what a case needs (e.g. the
                        # VM-less benchmark guest): its rows are skipped, with the reason.
                        failed[(c.name, group)] = str(error)
                        settings.progress.clear()
                        print(f"bench: {c.name}: {group} skipped: {error}", flush=True)
    finally:
        client.close()
    rows = merge_rounds(rows)
    compare_families(rows)
    for other in contenders[1:]:
        compare_backends(rows, contenders[0].name, other.name)
        if guest.stream:
            compare_backends(rows, f"{contenders[0].name}-stream", f"{other.name}-stream")
    return _show(settings, rows)


def round_groups(c: Contender, settings: Settings, one: Settings, one_guest: GuestSettings,
                 baselines: Baselines, guest_baselines: GuestBaselines, kits: GuestKits | None,
                 testpmd: bool) -> list[tuple[str, Callable[[], list[Row]]]]:
    """One round of every case for back-end ``c``, as (group name, measure) pairs."""
    groups: list[tuple[str, Callable[[], list[Row]]]] = []
    if "ring" in settings.cases and c.ring_template is not None:
        ring = c.ring_template
        groups.append(("ring", lambda: ring_rows(ring, c.name, one, baselines)))
    # One group per case (tcp-tx/rx: per MTU too), each on a fresh back-end: a back-end
    # that cannot serve one case keeps the rows of the others.
    nat_cases = [case for case in ALL_CASES if case != "ring" and case in settings.cases]
    for mtu in TCP_MTUS:
        for case in nat_cases:
            if mtu != TCP_MTUS[0] and case not in ("tcp-tx", "tcp-rx"):
                continue
            sub = dataclasses.replace(one, cases=(case,))
            groups.append((f"{case} at MTU {mtu}",
                           lambda sub=sub, mtu=mtu: nat_rows(c.template, c.name, mtu, sub,
                                                             baselines)))
    if testpmd:
        groups.append((TESTPMD_CASE, lambda: testpmd_rows(c.template, c.name, gateway_mac_text(),
                                                          settings.duration)))
    for mtu in one_guest.mtus if kits is not None else ():
        if not one_guest.stream_only:
            groups.append((f"{GUEST_CASE} at MTU {mtu}",
                           lambda mtu=mtu: guest_rows(kits, c.template, c.name, one_guest,
                                                      guest_baselines, mtu=mtu)))
        if one_guest.stream:
            groups.append((f"{GUEST_CASE}-stream at MTU {mtu}",
                           lambda mtu=mtu: guest_rows(kits, c.stream_template or c.template,
                                                      c.name, one_guest, guest_baselines,
                                                      stream=True, mtu=mtu)))
    return groups


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
    known = (*ALL_CASES, GUEST_CASE, TESTPMD_CASE, SWITCH_CASE, *SOAK_CASES)
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
        guest_mtus = parse_mtus(args.guest_mtu)
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
                              settings.progress,
                              stream=args.guest_stream or args.guest_stream_only,
                              stream_only=args.guest_stream_only, mtus=guest_mtus,
                              directions=select_directions(args.guest_cases)
                              if args.guest_cases else DIRECTIONS)
        if GUEST_CASE in cases:
            # Before any other case, so a missing kit is reported at once.
            kits = load_kits(args.qemu)
        contenders = [Contender("vhostnet", vhostnet_template(), vhostnet_template(True))]
        if not args.no_passt:
            try:
                passt = passt_template()
                contenders.append(Contender(PASST, passt, None,
                                            passt_template(vhost_user=False)))
            except BenchError as error:
                print(f"bench: {error}: the passt rows are skipped", flush=True)
        if args.compare:
            contenders.append(Contender("other", args.compare, args.compare))
        testpmd = TESTPMD_CASE in cases
        if testpmd and (reason := testpmd_missing()):
            print(f"bench: skipped {TESTPMD_CASE}: {reason}", flush=True)
            testpmd = False
        print(HEADER, flush=True)
        started = time.monotonic()
        if not (1 <= args.soak_seconds <= 86400 and 0 <= args.soak_tcp <= 1_000_000
                and 0 <= args.soak_udp <= 1_000_000 and 1 <= args.churn_cycles <= 1_000_000):
            raise BenchError("--soak-seconds must be 1..86400 and the soak and churn counts "
                             "0..1000000 (churn at least 1)")
        soak = SoakSettings(args.soak_seconds, args.soak_tcp, args.soak_udp,
                            churn_cycles=args.churn_cycles)
        rows = run(settings, contenders, guest, kits, testpmd, soak)
        settings.progress.clear()
        if len(contenders) > 1:
            print(comparison_table(rows, contenders[0].name, contenders[1].name), flush=True)
            if guest.stream and kits is not None:
                print(comparison_table(rows, f"{contenders[0].name}-stream",
                                       f"{contenders[1].name}-stream"), flush=True)
        meta = {"rounds": args.rounds, "duration": args.duration, "cases": list(cases),
                "compare": args.compare, "backends": [c.name for c in contenders],
                "passt_command": contenders[1].template if len(contenders) > 1
                and contenders[1].name == PASST else None,
                "elapsed_s": time.monotonic() - started,
                "offload": not args.no_offload,
                "cpus": os.cpu_count()}
        if kits is not None:
            meta["guest"] = {"qemu": args.qemu, "seconds": args.guest_seconds,
                             "udp_rate": args.guest_udp_rate, "mtus": list(guest_mtus)}
        if args.json:
            write_json(args.json, rows, meta)
        if args.markdown:
            with open(args.markdown, "w", encoding="utf-8") as handle:
                handle.write(markdown_table(rows))
                if len(contenders) > 1:
                    handle.write("\n" + comparison_table(rows, contenders[0].name,
                                                          contenders[1].name))
        if args.plot:
            pair = (contenders[0].name, contenders[1].name) if len(contenders) > 1 else None
            write_plot(args.plot, rows, pair)
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
