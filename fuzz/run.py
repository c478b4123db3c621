"""Run the fuzz targets under atheris (libFuzzer, coverage-guided) within a time budget.

    python -m fuzz.run --seconds N [--target NAME ...] [--jobs J]
    python -m fuzz.run --replay FILE... --target NAME

Each target runs in a child process for its share of the budget (``N * J / targets``
seconds, at least 1), starting from its seeds (fuzz/corpus/NAME), its regression inputs
(fuzz/regressions/NAME) and what earlier runs found (build/fuzz/corpus/NAME, kept out of
the repository). Prints cases per target and crashes; a crashing input is saved to
fuzz/crashes/ and the exit status is 1. ``--replay`` runs files through a target once,
without atheris, and shows the traceback of any failure.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import subprocess
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

FUZZ_DIR = Path(__file__).resolve().parent
ROOT = FUZZ_DIR.parent
CORPUS = FUZZ_DIR / "corpus"
REGRESSIONS = FUZZ_DIR / "regressions"
CRASHES = FUZZ_DIR / "crashes"
WORK = ROOT / "build" / "fuzz"
# Targets that open host sockets: only in a namespace with nothing but loopback.
NEEDS_NETNS = ("stack", "vhost_user")
# Targets whose harness (fuzz/<name>_target.py) branches on what an uninstrumented C kernel
# did: the harness is instrumented too, so those branches guide the fuzzer.
GUIDED_BY_HARNESS = ("switch",)
MAX_LEN = {"ring": 16384, "vhost_user": 8192, "stack": 4096, "switch": 8192}
DEFAULT_MAX_LEN = 2048
_EXECUTED = re.compile(r"stat::number_of_executed_units:\s*(\d+)")
_PROGRESS = re.compile(r"^#(\d+)\s", re.MULTILINE)


@dataclass
class Outcome:
    name: str
    cases: int
    seconds: float
    crashed: bool
    artifact: str = ""
    log: str = ""


def _child(name: str, seconds: int) -> None:
    """Fuzz one target in this process until libFuzzer's time runs out (it exits)."""
    import atheris

    logging.disable(logging.CRITICAL)  # hostile input is logged by design; millions of lines

    harness = f"fuzz.{name}_target"
    guided = name in GUIDED_BY_HARNESS
    with atheris.instrument_imports(include=["vhostnet", *([harness] if guided else [])]):
        from fuzz.targets import TARGETS
        if guided:
            importlib.import_module(harness)
    target = TARGETS[name]
    work = WORK / "corpus" / name
    work.mkdir(parents=True, exist_ok=True)
    CRASHES.mkdir(exist_ok=True)
    dirs = [str(d) for d in (work, CORPUS / name, REGRESSIONS / name) if d.is_dir()]
    args = ["fuzz.run", f"-max_total_time={seconds}", f"-artifact_prefix={CRASHES}/{name}-",
            f"-max_len={MAX_LEN.get(name, DEFAULT_MAX_LEN)}", "-rss_limit_mb=4096",
            "-timeout=30", "-print_final_stats=1", *dirs]
    atheris.Setup(args, target)
    atheris.Fuzz()


def _run_one(name: str, seconds: int) -> Outcome:
    WORK.mkdir(parents=True, exist_ok=True)
    before = set(CRASHES.glob(f"{name}-*")) if CRASHES.is_dir() else set()
    started = time.monotonic()
    child = subprocess.run(
        [sys.executable, "-m", "fuzz.run", "--child", name, "--seconds", str(seconds)],
        cwd=ROOT, capture_output=True, text=True, errors="replace", timeout=seconds + 300,
        check=False)
    elapsed = time.monotonic() - started
    log = child.stdout + child.stderr
    (WORK / f"{name}.log").write_text(log)
    found = _EXECUTED.findall(log) or _PROGRESS.findall(log)
    cases = int(found[-1]) if found else 0
    new = sorted(set(CRASHES.glob(f"{name}-*")) - before) if CRASHES.is_dir() else []
    crashed = child.returncode != 0 or bool(new)
    return Outcome(name, cases, elapsed, crashed, str(new[0]) if new else "", log)


def replay(name: str, files: list[Path]) -> int:
    from fuzz.targets import TARGETS

    failures = 0
    for path in files:
        try:
            TARGETS[name](path.read_bytes())
        except Exception:
            failures += 1
            print(f"{path}: CRASH")
            traceback.print_exc()
        else:
            print(f"{path}: ok")
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:  # before anything imports vhostnet uninstrumented
        _child(argv[1], int(argv[3]))
        return 0  # not reached: libFuzzer exits the process
    from fuzz.targets import TARGETS

    parser = argparse.ArgumentParser(prog="python -m fuzz.run", description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=600, help="wall-clock budget (all targets)")
    parser.add_argument("--target", action="append", choices=sorted(TARGETS),
                        help="only this target (repeatable); default: all")
    parser.add_argument("--jobs", type=int, default=1, help="targets fuzzed at once")
    parser.add_argument("--replay", nargs="+", type=Path, help="run these files through --target")
    args = parser.parse_args(argv)
    names = args.target or list(TARGETS)
    if args.replay:
        if len(names) != 1:
            parser.error("--replay needs exactly one --target")
        return replay(names[0], args.replay)
    if any(name in NEEDS_NETNS for name in names):
        from fuzz.stack_target import require_private_netns
        try:
            require_private_netns()
        except RuntimeError as error:
            print(f"fuzz: {error}", file=sys.stderr)
            return 2
    jobs = max(1, min(args.jobs, len(names)))
    share = max(1, args.seconds * jobs // len(names))
    print(f"fuzzing {len(names)} target(s), {share} s each, {jobs} at a time", flush=True)
    with ThreadPoolExecutor(jobs) as pool:
        outcomes = list(pool.map(lambda name: _run_one(name, share), names))
    print(f"{'target':<14}{'cases':>12}{'seconds':>9}  result")
    for outcome in outcomes:
        result = f"CRASH {outcome.artifact}" if outcome.crashed else "ok"
        print(f"{outcome.name:<14}{outcome.cases:>12}{outcome.seconds:>9.0f}  {result}")
    print(f"{'total':<14}{sum(o.cases for o in outcomes):>12}")
    crashed = [o for o in outcomes if o.crashed]
    for outcome in crashed:
        print(f"--- {outcome.name} (log: {WORK / (outcome.name + '.log')})")
        print("\n".join(outcome.log.splitlines()[-40:]))
    return 1 if crashed else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
