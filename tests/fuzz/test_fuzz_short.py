"""A short coverage-guided run (atheris) of every fuzz target: a few seconds each.

``make fuzz`` is the long run. A crash here fails the test with the target's log tail;
the input is in fuzz/crashes/ (fix it, then keep it in fuzz/regressions/<target>/).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from fuzz.run import ROOT
from fuzz.targets import TARGETS

SECONDS_PER_TARGET = 2
JOBS = 2


def test_every_target_fuzzes_without_a_crash() -> None:
    budget = SECONDS_PER_TARGET * len(TARGETS) // JOBS
    run = subprocess.run(
        [sys.executable, "-m", "fuzz.run", "--seconds", str(budget), "--jobs", str(JOBS)],
        cwd=ROOT, capture_output=True, text=True, timeout=budget + 120 * len(TARGETS),
        check=False)
    print(run.stdout)
    assert run.returncode == 0, run.stdout + run.stderr
    cases = dict(re.findall(r"^(\w+)\s+(\d+)\s+\d+\s+ok$", run.stdout, re.MULTILINE))
    assert set(cases) == set(TARGETS), run.stdout
    assert all(int(count) > 0 for count in cases.values()), run.stdout


def test_a_crash_fails_the_run_and_keeps_the_input(tmp_path: Path) -> None:
    # A copy of fuzz/ whose ARP target raises on the first byte of a real ARP packet.
    shutil.copytree(ROOT / "fuzz", tmp_path / "fuzz", ignore=shutil.ignore_patterns("crashes"))
    with open(tmp_path / "fuzz" / "targets.py", "a", encoding="utf-8") as targets:
        targets.write("\ndef _planted(data):\n"
                      "    if data[:2] == b'\\x00\\x01': raise ValueError('planted')\n"
                      "TARGETS['arp'] = _planted\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-m", "fuzz.run", "--seconds", "5", "--target", "arp"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
                         check=False)
    assert run.returncode == 1 and "CRASH" in run.stdout, run.stdout + run.stderr
    assert list((tmp_path / "fuzz" / "crashes").glob("arp-crash-*")), run.stdout
