"""Where a back-end's time goes in one UDP request/response (udp-rr), from its system calls.

Run the bench with the back-end under ``perf trace`` (``--compare`` with a wrapper that does
``exec perf trace -o FILE -e epoll_pwait,epoll_wait,read,write,sendmmsg,recvmmsg,recvmsg --
"$@"``; the same for passt's command), then
``python -m bench.trace_gaps FILE [KICK_FD CALL_FD]`` (the TX ring's kick eventfd and the
RX ring's call eventfd; left out: the most read and the most written 8-byte fds of the
trace). The bench stops the wrapper, not the traced back-end: end that one yourself
(by its pid) after the run. Per transaction, medians and means in microseconds:

- ``wake->kick read``: the event loop's wake-up to the kick's eventfd read;
- ``kick read->send``: the TX ring drained, up to the host ``sendmmsg``;
- ``send->reply wake``: the host's answer on its way (the echo server's turn);
- ``wake->recv``, ``recv->call write``: the answer read and written into the RX ring;
- ``kick->call write``: the whole of it inside the back-end (the echo server's turn included);
- ``call write->next syscall``: bimodal. A few microseconds when the back-end carries on to
  its next ``epoll_wait``; tens when the woken front-end took its CPU at once (wake-up
  preemption) and the back-end finished its loop turn only after the front-end slept again:
  the front-end's next kick then finds the back-end runnable, not waiting. ``preempted`` is
  the share of transactions over ``PREEMPTED_US``;
- ``cycle``: one kick to the next (the front-end's share is ``cycle`` minus ``kick->call
  write``).

perf trace's clock has 1 us steps. Figures from a traced run are slower than untraced ones and
a shared machine moves them: compare back-ends traced in the same way, run after run.
"""

from __future__ import annotations

import re
import statistics
import sys
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

# "  2201.229 ( 0.020 ms): python/14407 sendmmsg(fd: 21, ...)   = 1"
_LINE = re.compile(r"\s*([\d.]+) \(\s*([\d.]+) ms\): \S+/\d+ (\w+)\(([^)]*)\)\s*= (-?\d+)")
PREEMPTED_US = 20.0  # call write -> next syscall beyond this: the back-end lost its CPU
CYCLE_LIMIT_US = 1000.0  # kicks further apart than this are pauses, not transactions
STEPS = ("wake->kick read", "kick read->send", "send->reply wake", "wake->recv",
         "recv->call write", "kick->call write", "call write->next syscall", "cycle")


@dataclass(frozen=True)
class Call:
    """One system call: start and duration in microseconds, name, argument text, result."""
    start: float
    duration: float
    name: str
    args: str
    result: int

    @property
    def end(self) -> float:
        return self.start + self.duration

    def on_fd(self, fd: int) -> bool:
        return self.args.startswith(f"fd: {fd},")


def parse(lines: Iterable[str]) -> list[Call]:
    """The completed calls of a ``perf trace`` output (other lines skipped)."""
    calls = []
    for line in lines:
        m = _LINE.match(line)
        if m:
            start, duration, name, args, result = m.groups()
            calls.append(Call(float(start) * 1000, float(duration) * 1000, name, args,
                              int(result)))
    return calls


def eventfds(calls: list[Call]) -> tuple[int, int]:
    """(kick fd, call fd): the fds most often read and most often written 8 bytes at a time."""
    reads: Counter[int] = Counter()
    writes: Counter[int] = Counter()
    for c in calls:
        if c.name in ("read", "write") and c.result == 8:
            fd = int(c.args.split(",", 1)[0].removeprefix("fd: "))
            (reads if c.name == "read" else writes)[fd] += 1
    if not reads or not writes:
        raise ValueError("no 8-byte eventfd reads and writes in the trace")
    return reads.most_common(1)[0][0], writes.most_common(1)[0][0]


def step_gaps(calls: list[Call], kick_fd: int, call_fd: int) -> dict[str, list[float]]:
    """Each step's gap (microseconds) in every transaction the trace shows whole (see the
    module docstring)."""
    gaps: dict[str, list[float]] = {step: [] for step in STEPS}
    state = ""
    kick = send = wake = recv = None
    last_kick: float | None = None
    for i, c in enumerate(calls):
        if c.name == "read" and c.on_fd(kick_fd) and c.result == 8:
            if i and calls[i - 1].name.startswith("epoll"):
                gaps["wake->kick read"].append(c.start - calls[i - 1].end)
            if last_kick is not None and c.start - last_kick < CYCLE_LIMIT_US:
                gaps["cycle"].append(c.start - last_kick)
            last_kick, kick, state = c.start, c, "kicked"
        elif state == "kicked" and c.name.startswith("send") and kick is not None:
            gaps["kick read->send"].append(c.start - kick.end)
            send, state = c, "sent"
        elif state == "sent" and c.name.startswith("epoll") and c.result > 0 and send:
            gaps["send->reply wake"].append(c.end - send.end)
            wake, state = c, "woke"
        elif state == "woke" and c.name.startswith("recv") and c.result > 0 and wake:
            gaps["wake->recv"].append(c.start - wake.end)
            recv, state = c, "received"
        elif state == "received" and c.name == "write" and c.on_fd(call_fd) and recv and kick:
            gaps["recv->call write"].append(c.start - recv.end)
            gaps["kick->call write"].append(c.end - kick.start)
            if i + 1 < len(calls):
                gaps["call write->next syscall"].append(calls[i + 1].start - c.end)
            state = ""
    return gaps


def summary(gaps: dict[str, list[float]]) -> list[str]:
    """One line per step: count, median, mean; then the preempted share."""
    lines = []
    for step in STEPS:
        values = gaps[step]
        if values:
            lines.append(f"{step:26s} n {len(values):6d}  p50 {statistics.median(values):6.1f}"
                         f"  mean {statistics.fmean(values):6.1f} us")
    after = gaps["call write->next syscall"]
    if after:
        share = sum(1 for v in after if v > PREEMPTED_US) / len(after)
        lines.append(f"preempted after the call write: {share:.0%}")
    return lines


def main(argv: list[str]) -> int:
    if len(argv) not in (1, 3):
        print("usage: python -m bench.trace_gaps PERF_TRACE_FILE [KICK_FD CALL_FD]",
              file=sys.stderr)
        return 2
    try:
        with open(argv[0]) as f:
            calls = parse(f)
        kick_fd, call_fd = eventfds(calls) if len(argv) == 1 else (int(argv[1]), int(argv[2]))
    except (OSError, ValueError) as error:
        print(f"bench.trace_gaps: {error}", file=sys.stderr)
        return 2
    print(f"{argv[0]}: kick fd {kick_fd}, call fd {call_fd}")
    for line in summary(step_gaps(calls, kick_fd, call_fd)):
        print("  " + line)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
