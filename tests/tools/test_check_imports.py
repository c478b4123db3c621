"""tools/check_imports.py: it fails on each kind of bad import, and the real tree passes it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tools import check_imports

ROOT = Path(__file__).resolve().parents[2]

# A tree that follows every rule: wire below stack, a kernel imported by its own package.
GOOD_TREE = {
    "setup.py": 'Extension("vhostnet.wire._csum", ["ext/csum.pyx"])\n',
    "vhostnet/__init__.py": "",
    "vhostnet/wire/__init__.py": "",
    "vhostnet/wire/checksum.py": "import struct\nfrom vhostnet.wire._csum import fold\n",
    "vhostnet/wire/ipv4.py": "from .checksum import fold\n\n\ndef _helper():\n    pass\n",
    "vhostnet/stack/__init__.py": "",
    "vhostnet/stack/stack.py": ("from typing import TYPE_CHECKING\n"
                                "from vhostnet.wire import ipv4\n"
                                "if TYPE_CHECKING:\n    from vhostnet.stack import engine\n"),
    "vhostnet/stack/engine.py": "from vhostnet.stack import stack\n\n\ndef f():\n    return stack\n",
    "testkit/__init__.py": "",
    "testkit/frontend.py": "import numpy\nfrom vhostnet.wire.ipv4 import fold\n",
    "bench/__init__.py": "",
    "bench/run.py": "import testkit.frontend\nimport vhostnet.stack.stack\n",
}


def write_tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def run(root: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    status = check_imports.main(["--root", str(root)])
    return status, capsys.readouterr().out.splitlines()


def test_a_tree_following_the_rules_passes(tmp_path: Path, capsys) -> None:
    status, lines = run(write_tree(tmp_path, GOOD_TREE), capsys)
    assert status == 0
    assert len(lines) == 1 and lines[0].startswith("check_imports: ")


@pytest.mark.parametrize(("extra", "expected"), [
    # (a) a cycle at module level, relative import included; the line of the first edge
    ({"vhostnet/stack/a.py": "from . import b\n", "vhostnet/stack/b.py": "import vhostnet.stack.a\n"},
     "vhostnet/stack/a.py:1: import cycle: vhostnet.stack.a -> vhostnet.stack.b -> vhostnet.stack.a"),
    # (b) a lower layer importing a higher one, even inside a function or under TYPE_CHECKING
    ({"vhostnet/wire/bad.py": "def f():\n    from vhostnet.stack.stack import x\n"},
     "vhostnet/wire/bad.py:2: layer wire (vhostnet.wire.bad) must not import layer stack"),
    ({"vhostnet/stack/bad.py": "import typing\nif typing.TYPE_CHECKING:\n    import vhostnet.tcp.engine\n"},
     "vhostnet/stack/bad.py:3: layer stack (vhostnet.stack.bad) must not import layer tcp"),
    ({"vhostnet/network.py": "from vhostnet.migration import state\n"},
     "vhostnet/network.py:1: layer network (vhostnet.network) must not import layer migration"),
    ({"testkit/bad.py": "from vhostnet.stack import stack\n"},
     "testkit/bad.py:1: layer testkit (testkit.bad) must not import layer stack"),
    ({"vhostnet/wire/bad.py": "\nimport uvloop\n"},
     "vhostnet/wire/bad.py:2: layer wire (vhostnet.wire.bad) may use only the standard library"),
    ({"testkit/bad.py": "import tools.netns\n"},
     "testkit/bad.py:1: layer testkit (testkit.bad) may use only the standard library"),
    # (c) vhostnet importing what is not shipped
    ({"vhostnet/cli.py": "from testkit import frontend\n"},
     "vhostnet/cli.py:1: vhostnet must not import testkit (not shipped)"),
    # (d) private names of another package: a name, a kernel, an attribute of a module or class
    ({"vhostnet/stack/bad.py": "from vhostnet.wire.ipv4 import _helper\n"},
     "vhostnet/stack/bad.py:1: private name of package vhostnet.wire imported from vhostnet.stack"),
    ({"vhostnet/stack/bad.py": "from vhostnet.wire._csum import fold\n"},
     "vhostnet/stack/bad.py:1: private name of package vhostnet.wire imported from vhostnet.stack"),
    ({"vhostnet/stack/bad.py": "from vhostnet.wire import ipv4\n\nipv4._helper()\n"},
     "vhostnet/stack/bad.py:3: private name of package vhostnet.wire used from vhostnet.stack"),
    ({"vhostnet/stack/bad.py": "import vhostnet.wire.ipv4\nvhostnet.wire.ipv4._helper()\n"},
     "vhostnet/stack/bad.py:2: private name of package vhostnet.wire used from vhostnet.stack"),
    ({"vhostnet/wire/tcp.py": "class Segment:\n    _x = 1\n",
      "vhostnet/stack/bad.py": "from vhostnet.wire.tcp import Segment as S\nS._x\n"},
     "vhostnet/stack/bad.py:2: private name of package vhostnet.wire used from vhostnet.stack: S._x"),
    # a module the layer table does not know
    ({"vhostnet/newthing.py": ""},
     "vhostnet/newthing.py:1: vhostnet.newthing is in no layer"),
])
def test_each_bad_import_fails_naming_file_and_line(tmp_path: Path, capsys, extra, expected) -> None:
    status, lines = run(write_tree(tmp_path, {**GOOD_TREE, **extra}), capsys)
    assert status == 1
    assert any(line.startswith(expected) for line in lines), lines


def test_all_problems_are_reported_at_once(tmp_path: Path, capsys) -> None:
    extra = {"vhostnet/stack/a.py": "from . import b\n", "vhostnet/stack/b.py": "from . import a\n",
             "vhostnet/wire/bad.py": "import vhostnet.stack.a\n",
             "vhostnet/hostio/__init__.py": "",
             "vhostnet/hostio/bad.py": "from vhostnet.wire.ipv4 import _helper\n"}
    status, lines = run(write_tree(tmp_path, {**GOOD_TREE, **extra}), capsys)
    assert status == 1
    assert [line.split(": ", 1)[1].split(" ", 2)[:2] for line in lines] == [
        ["private", "name"], ["layer", "wire"], ["import", "cycle:"]]


def test_the_real_tree_passes() -> None:
    result = subprocess.run([sys.executable, "-m", "tools.check_imports"], cwd=ROOT,
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
