"""TftpRoot: what may be read from the TFTP root, and nothing else."""

from __future__ import annotations

import gc
import logging
import os
from pathlib import Path

import pytest

from vhostnet.hostio.tftp_files import TftpRoot
from vhostnet.wire.tftp import ErrorCode, TftpError


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """root/ with files, a subdirectory and symlinks; a secret beside the root."""
    root = tmp_path / "root"
    (root / "pxelinux.cfg").mkdir(parents=True)
    (root / "boot.bin").write_bytes(b"0123456789")
    (root / "pxelinux.cfg" / "default").write_bytes(b"DEFAULT linux\n")
    (tmp_path / "secret").write_bytes(b"top secret")
    (tmp_path / "outside_dir").mkdir()
    (tmp_path / "outside_dir" / "file").write_bytes(b"outside")
    os.symlink("boot.bin", root / "alias.bin")  # inside -> inside: allowed
    os.symlink(tmp_path / "secret", root / "escape")  # absolute link outside
    os.symlink("../secret", root / "relative_escape")
    os.symlink(tmp_path / "outside_dir", root / "outdir")
    os.symlink(tmp_path / "nonexistent", root / "dangling")
    return root


def refusal(files: TftpRoot, name: str) -> ErrorCode:
    with pytest.raises(TftpError) as caught:
        files.open(name)
    return caught.value.code


def test_reads_a_file(tree: Path) -> None:
    files = TftpRoot(tree)
    handle = files.open("boot.bin")
    assert files.size(handle) == 10
    assert files.read(handle, 0, 4) == b"0123"
    assert files.read(handle, 8, 4) == b"89"  # short only at end of file
    assert files.read(handle, 10, 4) == b""
    files.close(handle)
    files.close(handle)  # twice is harmless


def test_subdirectory_and_leading_slash(tree: Path) -> None:
    files = TftpRoot(tree)
    for name in ("pxelinux.cfg/default", "/pxelinux.cfg/default", "//pxelinux.cfg/./default"):
        handle = files.open(name)
        assert files.read(handle, 0, 100) == b"DEFAULT linux\n"
        files.close(handle)


def test_symlink_inside_root_is_followed(tree: Path) -> None:
    files = TftpRoot(tree)
    handle = files.open("alias.bin")
    assert files.read(handle, 0, 100) == b"0123456789"
    files.close(handle)


@pytest.mark.parametrize(
    "name",
    [
        "../secret",
        "../../etc/passwd",
        "../../../../../../../../etc/passwd",
        "pxelinux.cfg/../boot.bin",  # stays inside, but '..' is refused outright
        "/../secret",
        "..",
        "boot.bin\0.txt",
        "escape",
        "relative_escape",
        "outdir/file",
        "dangling",
    ],
)
def test_access_violations(tree: Path, name: str) -> None:
    assert refusal(TftpRoot(tree), name) == ErrorCode.ACCESS_VIOLATION


def test_absolute_host_path_is_taken_relative_to_the_root(tree: Path) -> None:
    # "/etc/passwd" means root/etc/passwd, which does not exist.
    assert refusal(TftpRoot(tree), "/etc/passwd") == ErrorCode.FILE_NOT_FOUND


@pytest.mark.parametrize("name", ["missing.bin", "boot.bin/x", "pxelinux.cfg", "/", "", "x" * 300])
def test_missing_files_and_directories(tree: Path, name: str) -> None:
    assert refusal(TftpRoot(tree), name) == ErrorCode.FILE_NOT_FOUND


def test_fifo_is_refused_without_blocking(tree: Path) -> None:
    os.mkfifo(tree / "pipe")
    assert refusal(TftpRoot(tree), "pipe") == ErrorCode.ACCESS_VIOLATION


def test_refusal_is_logged_once_per_reason(tree: Path, caplog: pytest.LogCaptureFixture) -> None:
    files = TftpRoot(tree)
    with caplog.at_level(logging.WARNING, logger="vhostnet.tftp"):
        for _ in range(3):
            refusal(files, "../secret")
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1
    assert "'..'" in messages[0]


def test_no_descriptor_leaks_on_refusal(tree: Path) -> None:
    files = TftpRoot(tree)
    gc.collect()  # earlier roots close their descriptors now, not during the count
    before = len(os.listdir("/proc/self/fd"))
    for name in ("pxelinux.cfg", "escape", "missing"):
        refusal(files, name)
    assert len(os.listdir("/proc/self/fd")) == before


def test_root_must_be_a_directory(tree: Path) -> None:
    with pytest.raises(ValueError, match="not a directory"):
        TftpRoot(tree / "boot.bin")


def test_descriptor_recheck_refuses_a_file_swapped_outside(
    tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Simulates the race the re-check exists for: between the path check and
    # the open, a directory was replaced by a symlink and the kernel opened a
    # file outside the root.
    monkeypatch.setattr(TftpRoot, "_descriptor_path", staticmethod(lambda fd: "/etc/passwd"))
    files = TftpRoot(tree)
    gc.collect()  # earlier roots close their descriptors now, not during the count
    before = len(os.listdir("/proc/self/fd"))
    assert refusal(files, "boot.bin") == ErrorCode.ACCESS_VIOLATION
    assert len(os.listdir("/proc/self/fd")) == before


def test_symlinks_climbing_or_absolute_are_followed_while_inside_the_root(tree: Path) -> None:
    os.symlink("../boot.bin", tree / "pxelinux.cfg" / "up")
    os.symlink(tree / "pxelinux.cfg" / "default", tree / "absolute_inside")
    os.symlink("../../secret", tree / "pxelinux.cfg" / "two_up")
    os.symlink("loop", tree / "loop")
    files = TftpRoot(tree)
    for name, content in (("pxelinux.cfg/up", b"0123456789"),
                          ("absolute_inside", b"DEFAULT linux\n")):
        handle = files.open(name)
        assert files.read(handle, 0, 100) == content
        files.close(handle)
    assert refusal(files, "pxelinux.cfg/two_up") == ErrorCode.ACCESS_VIOLATION
    assert refusal(files, "loop") == ErrorCode.ACCESS_VIOLATION
