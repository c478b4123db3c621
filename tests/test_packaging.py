"""`python -m build` gives an sdist and a wheel (built from the sdist) that install into
a clean virtual environment and run. Slow (two Cython builds): marked e2e."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import venv
import zipfile
from pathlib import Path

import pytest

from tests.support.daemon import REPO

pytestmark = pytest.mark.e2e


def _run(*argv: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    # Without PYTHONPATH: the source tree must not stand in for what was installed.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    result = subprocess.run(list(argv), cwd=cwd, capture_output=True, text=True, timeout=600,
                            check=False, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_sdist_and_wheel_install_and_run_in_a_clean_venv(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    # No isolation: the build requirements come from this venv, nothing from the network;
    # `build` makes the sdist, then the wheel from the unpacked sdist.
    _run(sys.executable, "-m", "build", "--no-isolation", "-o", str(dist), str(REPO))
    sdist, = dist.glob("vhostnet-*.tar.gz")
    wheel, = dist.glob("vhostnet-*.whl")
    with tarfile.open(sdist) as archive:
        names = {Path(n).relative_to(Path(n).parts[0]).as_posix() for n in archive.getnames()
                 if len(Path(n).parts) > 1}
    assert {"LICENSE", "setup.py", "pyproject.toml", "ext/virtq.pyx", "ext/virtq_rx.pxi",
            "ext/virtq_guard.h", "vhostnet/cli.py"} <= names
    assert not any(n.startswith(("tests/", "testkit/", "bench/", "tools/")) for n in names)
    with zipfile.ZipFile(wheel) as archive:
        shipped = archive.namelist()
    assert all(n.startswith(("vhostnet/", "vhostnet-")) for n in shipped), shipped
    assert not [n for n in shipped if n.endswith((".c", ".pyx", ".pxi"))]
    assert any(n.endswith("/LICENSE") for n in shipped)
    metadata = next(n for n in shipped if n.endswith("METADATA"))
    with zipfile.ZipFile(wheel) as archive:
        assert "License-Expression: GPL-2.0-or-later" in archive.read(metadata).decode()

    outside = tmp_path / "elsewhere"  # not the source tree (its vhostnet.egg-info, its
    outside.mkdir()                    # package): what runs is what was installed
    env = tmp_path / "venv"
    venv.create(env, with_pip=True)
    python = env / "bin" / "python"
    # numpy and uvloop from this venv's own installed copies: no index, nothing fetched.
    site = Path(next(p for p in sys.path if p.endswith("site-packages")))
    _run(str(python), "-m", "pip", "install", "-q", "--no-index", "--no-deps", str(wheel),
         cwd=outside)
    (env / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
     / "shared.pth").write_text(f"import sys; sys.path.append({str(site)!r})\n")
    version = _run(str(env / "bin" / "vhostnet"), "--version", cwd=outside)
    assert version.stdout.startswith("vhostnet ")
    assert "passt" in _run(str(env / "bin" / "vhostnet"), "--help", cwd=outside).stdout
    where = _run(str(python), "-c", "import vhostnet.virtqueue._virtq as m; print(m.__file__)",
                 cwd=outside)
    assert where.stdout.startswith(str(env))
