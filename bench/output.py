"""Benchmark output: live progress, the results table, JSON and an optional plot."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO


@dataclass
class Row:
    """One case's figures: the primary figure per round, a baseline from the same run, and extras."""

    case: str
    unit: str
    rounds: list[float]
    baseline: list[float] = field(default_factory=list)
    baseline_unit: str = ""
    # ratio = median / baseline median; for latencies > 1 means slower than the baseline.
    extra: dict[str, Any] = field(default_factory=dict)
    backend: str = "vhostnet"

    @staticmethod
    def _median(values: list[float]) -> float:
        ordered = sorted(values)
        n = len(ordered)
        if not n:
            return float("nan")
        return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2

    @property
    def median(self) -> float:
        return self._median(self.rounds)

    @property
    def baseline_median(self) -> float:
        return self._median(self.baseline)

    @property
    def ratio(self) -> float | None:
        base = self.baseline_median
        if not self.baseline or not base or base != base:
            return None
        return self.median / base

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(
            min=min(self.rounds) if self.rounds else None,
            median=self.median if self.rounds else None,
            max=max(self.rounds) if self.rounds else None,
            baseline_median=self.baseline_median if self.baseline else None,
            ratio=self.ratio,
        )
        return data


def merge_rounds(rows: list[Row]) -> list[Row]:
    """Rows of the same case and back-end measured in separate rounds (interleaved with
    another back-end's), as one row each, in first-seen order: rounds and baselines joined
    (a baseline shared by the rounds is kept once), extras combined per round: counts
    summed, figures (floats) by their median, flags all true, anything else the first."""
    merged: dict[tuple[str, str], Row] = {}
    extras: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        key = (row.case, row.backend)
        if key not in merged:
            merged[key] = Row(row.case, row.unit, [], list(row.baseline), row.baseline_unit,
                              backend=row.backend)
            extras[key] = []
        elif row.baseline != merged[key].baseline:
            merged[key].baseline += row.baseline
        merged[key].rounds += row.rounds
        extras[key].append(row.extra)
    for key, row in merged.items():
        for name in dict.fromkeys(k for extra in extras[key] for k in extra):
            values = [e[name] for e in extras[key] if name in e]
            if all(isinstance(v, bool) for v in values):
                row.extra[name] = all(values)
            elif all(isinstance(v, int) for v in values):
                row.extra[name] = sum(values)
            elif all(isinstance(v, (int, float)) for v in values):
                row.extra[name] = Row._median([float(v) for v in values])
            else:
                row.extra[name] = values[0]
    return list(merged.values())


# Cases where a smaller figure is better (latencies): "faster" flips for them.
def lower_is_better(row: Row) -> bool:
    return row.unit.endswith(" us")


def compare_backends(rows: list[Row], ours: str, other: str) -> None:
    """Note on each of ``ours``'s rows ``vs_<other>``: its median over the other's for the same
    case, and on the other's row ``vs_<ours>``, the inverse (> 1: a larger figure; for
    latencies, slower)."""
    theirs = {r.case: r for r in rows if r.backend == other}
    for row in rows:
        peer = theirs.get(row.case)
        if row.backend != ours or peer is None or not peer.rounds or not row.rounds:
            continue
        if peer.median and row.median:
            row.extra[f"vs_{other}"] = row.median / peer.median
            peer.extra[f"vs_{ours}"] = peer.median / row.median


# Extras of the back-end's own cost, shown beside the figures in the comparison table.
COST_NOTES = ("cpu_us_per_pkt", "cpu_us_per_MB", "cpu_us_per_txn", "cpu_us_per_conn",
              "wakeups_per_pkt", "wakeups_per_MB", "wakeups_per_txn", "wakeups_per_conn")


def comparison_table(rows: list[Row], ours: str, other: str) -> str:
    """Markdown: per case both back-ends' median (min-max) and the ratio ours/other, with
    each one's CPU and wake-ups per unit where measured."""
    theirs = {r.case: r for r in rows if r.backend == other}
    lines = [f"| case | unit | {ours} median (min-max) | {other} median (min-max) | "
             f"{ours}/{other} | better | {ours} cost | {other} cost |",
             "|---|---|---|---|---|---|---|---|"]

    def figures(row: Row | None) -> str:
        if row is None or not row.rounds:
            return "-"
        return f"{_fmt(row.median)} ({_fmt(min(row.rounds))}-{_fmt(max(row.rounds))})"

    def cost(row: Row | None) -> str:
        if row is None:
            return "-"
        return ", ".join(f"{k.replace('_per_', '/')} {_fmt(row.extra[k])}"
                         for k in COST_NOTES if k in row.extra) or "-"

    for row in rows:
        if row.backend != ours:
            continue
        peer = theirs.get(row.case)
        ratio = row.extra.get(f"vs_{other}")
        better = "-"
        if ratio is not None:
            better = ours if (ratio < 1) == lower_is_better(row) else other
        lines.append(f"| {row.case} | {row.unit} | {figures(row)} | {figures(peer)} | "
                     f"{'-' if ratio is None else f'{ratio:.2f}'} | {better} | {cost(row)} | "
                     f"{cost(peer)} |")
    return "\n".join(lines) + "\n"


class Progress:
    """One `\\r`-rewritten status line on a terminal, plain lines otherwise."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self._width = 0

    def update(self, text: str) -> None:
        if self.tty:
            pad = max(0, self._width - len(text))
            self.stream.write("\r" + text + " " * pad)
            self._width = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def clear(self) -> None:
        if self.tty and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0


def _fmt(value: float | None) -> str:
    if value is None or value != value:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


HEADER = f"{'case':<16} {'backend':<9} {'unit':<9} {'min':>10} {'median':>10} {'max':>10} {'baseline':>10} {'ratio':>7}  notes"


def format_row(row: Row) -> str:
    notes = "  ".join(f"{k}={_fmt(v) if isinstance(v, float) else v}" for k, v in row.extra.items())
    ratio = "-" if row.ratio is None else f"{row.ratio:.3f}"
    return (f"{row.case:<16} {row.backend:<9} {row.unit:<9} {_fmt(min(row.rounds) if row.rounds else None):>10} "
            f"{_fmt(row.median if row.rounds else None):>10} {_fmt(max(row.rounds) if row.rounds else None):>10} "
            f"{_fmt(row.baseline_median if row.baseline else None):>10} {ratio:>7}  {notes}")


# Extras worth a column in the README's table; the rest stay in the JSON.
MARKDOWN_NOTES = ("ns_per_frame", "cpu_ns_per_frame", "p99_us", "loss_pct", "loopback_loss_pct",
                  "vs_ipv4")


def markdown_table(rows: list[Row]) -> str:
    """The table as Markdown, for the README."""
    lines = ["| case | backend | unit | min | median | max | baseline (same run) | ratio | notes |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        notes = ", ".join(f"{k} {_fmt(row.extra[k])}" for k in MARKDOWN_NOTES if k in row.extra)
        ratio = "-" if row.ratio is None else f"{row.ratio:.3f}"
        baseline = f"{_fmt(row.baseline_median)} {row.baseline_unit}" if row.baseline else "-"
        figures = [_fmt(f(row.rounds)) if row.rounds else "-" for f in (min, Row._median, max)]
        lines.append(f"| {row.case} | {row.backend} | {row.unit} | {' | '.join(figures)} | "
                     f"{baseline} | {ratio} | {notes} |")
    return "\n".join(lines) + "\n"


def write_json(path: str, rows: list[Row], meta: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump({"meta": meta, "results": [r.as_dict() for r in rows]}, handle, indent=2)
        handle.write("\n")


class PlotUnavailable(Exception):
    """matplotlib is missing; the message is one sentence for the user."""


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotUnavailable("--plot needs matplotlib, which is not installed "
                              "(pip install 'vhostnet[plot]' or pip install matplotlib)") from None
    return plt


def check_plot() -> None:
    """PlotUnavailable now rather than after a run of several minutes."""
    _pyplot()


def write_plot(path: str, rows: list[Row], compare: tuple[str, str] | None = None) -> list[str]:
    """One bar per case: median as a fraction of its baseline, min/max whiskers; the bars' labels.

    The axis is logarithmic: ratios run from a few hundredths (throughput far
    below loopback) to tens (latencies, where above 1 means slower). Each bar
    carries its median in the case's own unit; guest (iperf3) bars are orange.
    With ``compare`` (ours, other) a second panel shows ours/other per case
    (``compare_backends``), green where ours is better.
    """
    plt = _pyplot()
    shown = [r for r in rows if r.ratio is not None and r.ratio > 0]
    versus = []
    if compare:
        key = f"vs_{compare[1]}"
        versus = [r for r in rows if r.backend == compare[0] and r.extra.get(key)]
    width = max(7, len(shown) * 0.75, len(versus) * 0.75)
    fig, axes = plt.subplots(2 if versus else 1, 1, figsize=(width, 9 if versus else 4.5),
                             squeeze=False)
    ax = axes[0][0]
    labels = [f"{r.case}\n{r.backend}" for r in shown]
    base = [r.baseline_median for r in shown]
    med = [r.median / b for r, b in zip(shown, base, strict=True)]
    low = [m - min(r.rounds) / b for r, m, b in zip(shown, med, base, strict=True)]
    high = [max(r.rounds) / b - m for r, m, b in zip(shown, med, base, strict=True)]
    colors = ["tab:orange" if r.case.startswith("guest-") else "tab:blue" for r in shown]
    ax.bar(range(len(shown)), med, yerr=[low, high], capsize=3, color=colors)
    for x, (row, top) in enumerate(zip(shown, [m + h for m, h in zip(med, high, strict=True)],
                                       strict=True)):
        ax.annotate(f"{_fmt(row.median)} {row.unit}", (x, top), textcoords="offset points",
                    xytext=(0, 3), ha="center", va="bottom", fontsize=6, rotation=90)
    ax.set_yscale("log")
    if shown:  # room above the tallest whisker for its label
        ax.set_ylim(top=max(m + h for m, h in zip(med, high, strict=True)) * 30)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xticks(range(len(shown)), labels, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("median / baseline from the same run")
    ax.set_title("vhostnet bench (whiskers: min and max round; orange: iperf3 in a TCG guest)",
                 fontsize=8)
    if versus and compare:
        ours, other = compare
        vx = axes[1][0]
        ratios = [r.extra[f"vs_{other}"] for r in versus]
        good = ["tab:green" if (q < 1) == lower_is_better(r) else "tab:red"
                for r, q in zip(versus, ratios, strict=True)]
        vx.bar(range(len(versus)), ratios, color=good)
        for x, q in enumerate(ratios):
            vx.annotate(f"{q:.2f}", (x, q), textcoords="offset points", xytext=(0, 2),
                        ha="center", va="bottom", fontsize=6)
        vx.axhline(1.0, color="grey", linewidth=0.8)
        vx.set_yscale("log")  # 0.5 and 2 the same distance from parity
        vx.set_xticks(range(len(versus)), [f"{r.case} ({r.unit})" for r in versus],
                      rotation=45, ha="right", fontsize=7)
        vx.set_ylabel(f"{ours} median / {other} median")
        vx.set_title(f"{ours} against {other} in the same run, interleaved "
                     f"(green: {ours} better; for latencies lower is better)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return labels
