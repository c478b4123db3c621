"""bench.trace_gaps reads a perf trace of a udp-rr run into per-step gaps (no process run)."""

from __future__ import annotations

import pytest

from bench.trace_gaps import eventfds, main, parse, step_gaps, summary

# Two transactions of a back-end (kick fd 19, call fd 26, flow socket 21) as perf trace
# prints them: the first is preempted after its call write (next syscall 34 us later), the
# second carries on at once; a 1-second pause before a third kick counts as no cycle.
TRACE = """\
     0.000 ( 0.030 ms): python/7 epoll_pwait(epfd: 4, events: 0x1, maxevents: 1024, timeout: 6, sigsetsize: 8) = 1
     0.032 ( 0.001 ms): python/7 read(fd: 19, buf: 0x2, count: 8)                           = 8
     0.036 ( 0.004 ms): python/7 sendmmsg(fd: 21, mmsg: 0x3, vlen: 1, flags: DONTWAIT)      = 1
     0.041 ( 0.015 ms): python/7 epoll_pwait(epfd: 4, events: 0x1, maxevents: 1024, timeout: 6, sigsetsize: 8) = 1
     0.059 ( 0.002 ms): python/7 recvmmsg(fd: 21, mmsg: 0x4, vlen: 2, flags: DONTWAIT)      = 1
     0.063 ( 0.002 ms): python/7 write(fd: 26, buf: 0x5, count: 8)                          = 8
     0.099 ( 0.001 ms): python/7 epoll_pwait(epfd: 4, events: 0x1, maxevents: 1024, timeout: 6, sigsetsize: 8) = 1
     0.102 ( 0.001 ms): python/7 read(fd: 19, buf: 0x2, count: 8)                           = 8
     0.106 ( 0.004 ms): python/7 sendmmsg(fd: 21, mmsg: 0x3, vlen: 1, flags: DONTWAIT)      = 1
     0.111 ( 0.020 ms): python/7 epoll_pwait(epfd: 4, events: 0x1, maxevents: 1024, timeout: 6, sigsetsize: 8) = 1
     0.133 ( 0.002 ms): python/7 recvmmsg(fd: 21, mmsg: 0x4, vlen: 2, flags: DONTWAIT)      = 1
     0.137 ( 0.002 ms): python/7 write(fd: 26, buf: 0x5, count: 8)                          = 8
     0.142 ( 0.010 ms): python/7 epoll_pwait(epfd: 4, events: 0x1, maxevents: 1024, timeout: 6, sigsetsize: 8) = 1
  1000.200 ( 0.001 ms): python/7 read(fd: 19, buf: 0x2, count: 8)                           = 8
some line perf prints that is no system call
"""


def test_each_step_of_each_transaction() -> None:
    calls = parse(TRACE.splitlines())
    assert len(calls) == 14
    assert eventfds(calls) == (19, 26)
    gaps = step_gaps(calls, 19, 26)
    assert gaps["wake->kick read"] == pytest.approx([2.0, 2.0, 1_000_048.0])
    assert gaps["kick read->send"] == pytest.approx([3.0, 3.0])
    assert gaps["send->reply wake"] == pytest.approx([16.0, 21.0])
    assert gaps["wake->recv"] == pytest.approx([3.0, 2.0])
    assert gaps["recv->call write"] == pytest.approx([2.0, 2.0])
    assert gaps["kick->call write"] == pytest.approx([33.0, 37.0])
    assert gaps["call write->next syscall"] == pytest.approx([34.0, 3.0])
    assert gaps["cycle"] == pytest.approx([70.0])  # (the pause is no cycle)
    lines = summary(gaps)
    assert lines[-1] == "preempted after the call write: 50%"


def test_command_line(tmp_path, capsys) -> None:
    trace = tmp_path / "vh.pt"
    trace.write_text(TRACE)
    assert main([str(trace)]) == 0
    out = capsys.readouterr().out
    assert "kick fd 19, call fd 26" in out and "preempted after the call write: 50%" in out
    empty = tmp_path / "empty.pt"
    empty.write_text("nothing\n")
    assert main([str(empty)]) == 2
    assert main([]) == 2
    assert "no 8-byte eventfd" in capsys.readouterr().err
