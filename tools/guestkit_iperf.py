"""iperf3 for the benchmark guest (and the same binary on the host), from Debian's packages.

`build_iperf_kit()` downloads iperf3, libiperf0 and the libraries they need
with `apt-get download` (no root), unpacks them with `dpkg -x`, keeps only
the binary, the dynamic loader and the shared objects the ELF NEEDED entries
ask for, and writes them as a small newc archive. The bench guest's initrd is
the base initramfs with this archive appended (the kernel unpacks
concatenated archives in order), so the test guests keep their small, fast
initramfs. Run `python3 -m tools.guestkit_iperf` to build it and print its paths.

The binary always runs through its own loader with `--library-path`, in the
guest (the busybox initramfs has no libc) and on the host (the same iperf3
serves as the host end and as the loopback baseline, whatever the host has
installed).
"""

from __future__ import annotations

import dataclasses
import shutil
import struct
import sys
import tempfile
from pathlib import Path

from tools.guestkit import (
    DEFAULT_CACHE_DIR,
    CpioWriter,
    KitError,
    _apt_download,
    _ensure_system_apt_lists,
    _locked,
    _unpack_deb,
)

# iperf3 and libiperf0, then the packages holding what their NEEDED entries
# name (libc.so.6, libm.so.6, libcrypto.so.3, libsctp.so.1) and the loader.
IPERF3_PACKAGES = ("iperf3", "libiperf0", "libc6", "libssl3", "libsctp1")
LIBRARY_DIRS = ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu", "lib64", "lib", "usr/lib")
# Bump when the archive's layout changes, so cached kits are rebuilt.
LAYOUT_VERSION = "2"

GUEST_ROOT = "/opt/iperf3"
GUEST_COMMAND = "/usr/bin/iperf3"


@dataclasses.dataclass(frozen=True)
class IperfKit:
    """The unpacked iperf3 (``root``: the binary, lib/ with loader and libraries) and its archive."""

    root: Path
    archive: Path
    loader_name: str

    @property
    def binary(self) -> Path:
        return self.root / "iperf3"

    def host_command(self) -> list[str]:
        """argv prefix that runs this iperf3 on the host."""
        lib = self.root / "lib"
        return [str(lib / self.loader_name), "--library-path", str(lib), str(self.binary)]

    def describe(self) -> str:
        return f"iperf3:    {self.binary} (guest archive {self.archive})"


# --- ELF: the interpreter and the NEEDED entries ----------------------------------

PT_INTERP = 3
SHT_DYNAMIC = 6
DT_NEEDED = 1


def elf_dependencies(path: Path) -> tuple[str | None, list[str]]:
    """(program interpreter or None, NEEDED sonames) of a 64-bit little-endian ELF file."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise KitError(f"{path.name} is not a 64-bit little-endian ELF file")
    (e_phoff, e_shoff) = struct.unpack_from("<QQ", data, 0x20)
    (e_phentsize, e_phnum, e_shentsize, e_shnum) = struct.unpack_from("<HHHH", data, 0x36)
    interp = None
    for i in range(e_phnum):
        p_type, _flags, p_offset, _vaddr, _paddr, p_filesz = struct.unpack_from(
            "<IIQQQQ", data, e_phoff + i * e_phentsize)
        if p_type == PT_INTERP:
            interp = data[p_offset:p_offset + p_filesz].rstrip(b"\0").decode()
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, e_shoff + i * e_shentsize)
                for i in range(e_shnum)]
    needed: list[str] = []
    for _name, sh_type, _flags, _addr, offset, size, link, _info, _align, entsize in sections:
        if sh_type != SHT_DYNAMIC:
            continue
        strtab_offset = sections[link][4]
        for pos in range(offset, offset + size, entsize or 16):
            tag, value = struct.unpack_from("<qQ", data, pos)
            if tag == 0:
                break
            if tag == DT_NEEDED:
                start = strtab_offset + value
                needed.append(data[start:data.index(b"\0", start)].decode())
    return interp, needed


def _find_library(unpacked: Path, soname: str) -> Path:
    for directory in LIBRARY_DIRS:
        candidate = unpacked / directory / soname
        if candidate.exists():
            return candidate.resolve()
    raise KitError(f"{soname} is in none of the packages {', '.join(IPERF3_PACKAGES)}")


def _collect(unpacked: Path, into: Path) -> str:
    """Copy iperf3, its loader and its NEEDED closure from ``unpacked`` to ``into``; the loader's name."""
    binary = unpacked / "usr/bin/iperf3"
    if not binary.exists():
        raise KitError("the iperf3 package holds no usr/bin/iperf3")
    lib = into / "lib"
    lib.mkdir(parents=True)
    shutil.copyfile(binary, into / "iperf3")
    interp, _ = elf_dependencies(binary)
    if interp is None:
        raise KitError("usr/bin/iperf3 names no program interpreter")
    loader_name = Path(interp).name
    shutil.copyfile(_find_library(unpacked, loader_name), lib / loader_name)
    pending, seen = [binary], {loader_name}
    while pending:  # bounded: each soname is copied once, and there are a handful
        _, needed = elf_dependencies(pending.pop())
        for soname in needed:
            if soname in seen:
                continue
            seen.add(soname)
            source = _find_library(unpacked, soname)
            shutil.copyfile(source, lib / soname)
            pending.append(source)
    for path in (into / "iperf3", *lib.iterdir()):
        path.chmod(0o755)
    return loader_name


def guest_archive(root: Path, loader_name: str) -> bytes:
    """The newc archive appended to the bench guest's initrd: /opt/iperf3 and a wrapper command."""
    archive = CpioWriter()
    # The kernel creates no missing parents: every directory gets its own entry.
    archive.directory("opt")
    archive.directory(GUEST_ROOT.lstrip("/"))
    archive.directory(f"{GUEST_ROOT.lstrip('/')}/lib")
    archive.file(f"{GUEST_ROOT.lstrip('/')}/iperf3", (root / "iperf3").read_bytes(), executable=True)
    for path in sorted((root / "lib").iterdir()):
        archive.file(f"{GUEST_ROOT.lstrip('/')}/lib/{path.name}", path.read_bytes(), executable=True)
    # usr/bin exists in the base archive; only the file is added.
    wrapper = (f'#!/bin/sh\nexec {GUEST_ROOT}/lib/{loader_name} --library-path {GUEST_ROOT}/lib '
               f'{GUEST_ROOT}/iperf3 "$@"\n')
    archive.file(GUEST_COMMAND.lstrip("/"), wrapper.encode(), executable=True)
    return archive.finish()


def build_iperf_kit(cache_dir: Path = DEFAULT_CACHE_DIR) -> IperfKit:
    """Build (or reuse) iperf3 for the guest and the host. Raises KitError if it cannot be had."""
    cache_dir = Path(cache_dir).resolve()
    root = cache_dir / "iperf3"
    archive = cache_dir / "iperf3.cpio"
    stamp = cache_dir / "iperf3.stamp"
    with _locked(cache_dir):
        # The stamp, written last, says "layout version, loader name".
        recorded = stamp.read_text().split() if stamp.exists() else []
        if len(recorded) == 2 and recorded[0] == LAYOUT_VERSION and archive.exists() \
                and root.is_dir():
            return IperfKit(root, archive, recorded[1])
        _ensure_system_apt_lists()
        debs_dir = cache_dir / "debs-iperf3"
        debs = [_apt_download(package, debs_dir) for package in IPERF3_PACKAGES]
        staging = Path(tempfile.mkdtemp(prefix="iperf3-", dir=cache_dir))
        try:
            unpacked = staging / "unpacked"
            for deb in debs:
                _unpack_deb(deb, unpacked)
            collected = staging / "collected"
            loader_name = _collect(unpacked, collected)
            temporary = archive.with_suffix(".tmp")
            temporary.write_bytes(guest_archive(collected, loader_name))
            if root.exists():
                shutil.rmtree(root)
            collected.rename(root)
            temporary.replace(archive)
            stamp.write_text(f"{LAYOUT_VERSION} {loader_name}\n")
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return IperfKit(root, archive, loader_name)


def main() -> int:
    try:
        kit = build_iperf_kit()
    except KitError as error:
        print(f"guestkit_iperf: {error}", file=sys.stderr)
        return 1
    print(kit.describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
