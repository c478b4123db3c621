"""Every seed and every regression input goes through its fuzz target without a crash.

Regression inputs (fuzz/regressions/<target>/) are inputs that once crashed a target;
they are replayed here in every run (and in the sanitized build, ``make test-asan``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fuzz.run import CORPUS, REGRESSIONS, replay
from fuzz.targets import TARGETS


def _inputs() -> list[tuple[str, Path]]:
    return [(folder.name, path)
            for root in (CORPUS, REGRESSIONS) if root.is_dir()
            for folder in sorted(root.iterdir()) if folder.is_dir()
            for path in sorted(folder.iterdir())]


def test_every_target_has_seeds() -> None:
    seeded = {name for name, _ in _inputs()}
    assert set(TARGETS) <= seeded, f"targets without seeds: {sorted(set(TARGETS) - seeded)}"


def test_inputs_belong_to_known_targets() -> None:
    assert {name for name, _ in _inputs()} <= set(TARGETS)


@pytest.mark.parametrize(("target", "path"), _inputs(),
                         ids=lambda value: value if isinstance(value, str) else value.name)
def test_input_replays_cleanly(target: str, path: Path) -> None:
    TARGETS[target](path.read_bytes())


def test_replay_reports_a_crashing_input(tmp_path: Path, monkeypatch) -> None:
    def broken(data: bytes) -> None:
        raise IndexError("a parser bug")

    monkeypatch.setitem(TARGETS, "broken", broken)
    sample = tmp_path / "sample"
    sample.write_bytes(b"\x00")
    assert replay("broken", [sample]) == 1
    monkeypatch.setitem(TARGETS, "broken", lambda data: None)
    assert replay("broken", [sample]) == 0


def test_a_view_target_refuses_quietly_and_lets_other_errors_out() -> None:
    from fuzz.wire_targets import parser
    from vhostnet.wire.arp import ArpPacket
    from vhostnet.wire.errors import MalformedPacket

    parser(ArpPacket)(b"short")  # MalformedPacket: the contract, not a crash

    def buggy(data: bytes) -> None:
        raise (MalformedPacket("short") if data else KeyError("bug"))

    parser(buggy)(b"x")
    with pytest.raises(KeyError):
        parser(buggy)(b"")
