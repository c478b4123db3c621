"""The guest kit: a Debian kernel, a busybox initramfs and (optionally) QEMU 10.0.

`build_kit()` downloads what is missing into a cache folder and returns a `Kit`.
Everything is cached: a second call costs a few file checks. Run
`python3 -m tools.guestkit` to build the kit and print its paths.

Guest conventions (the harness in tools/qemu.py and tests/e2e rely on them):

* /init mounts proc, sys and dev, loads the virtio modules, brings `lo` up and
  prints `VHOSTNET-TEST-BEGIN`. If /test.sh exists it runs it with `sh` and
  prints `VHOSTNET-TEST-EXIT rc=N`. It then prints `VHOSTNET-TEST-END` and
  powers off with `poweroff -f`, which makes QEMU (run with -no-reboot) exit.
* The test script reports results as lines `RESULT name=value` on the serial
  console (ttyS0).
* /usr/share/udhcpc/default.script (also at /etc/udhcpc/, where Debian's
  busybox looks) configures the interface, the default
  route and /etc/resolv.conf from a DHCP lease.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CACHE_DIR = REPO_ROOT / ".cache" / "guestkit"

KERNEL_COMMAND_LINE = "console=ttyS0 quiet panic=-1"

# virtio_net and what it needs, in the order insmod must see them (no modprobe
# and no modules.dep in the guest, so the order is ours to get right).
VIRTIO_MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "failover",
    "net_failover",
    "virtio_net",
)
# Other NIC models, for QEMU's -netdev stream (it works with any model).
NIC_MODULES = ("e1000",)

BUSYBOX = Path("/bin/busybox")

# QEMU 10.0 comes from bookworm-backports; these are the packages that hold the
# binary, its loadable modules and its firmware/data files.
QEMU10_SUITE = "bookworm-backports"
QEMU10_PACKAGES = ("qemu-system-x86", "qemu-system-common", "qemu-system-data", "qemu-system-gui")
DEBIAN_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
# libvirt 11.3 (passt back-end in stream and vhost-user mode) comes from the same suite; it
# runs on bookworm's libraries (the system libvirt 9.0 packages pull them in). With it, QEMU
# 10.0's OpenGL and SPICE modules: libvirt's probe loads every module, and QEMU looks for one
# missing from its own folder in the system's 7.2 folder, which makes it abort.
LIBVIRT11_PACKAGES = ("libvirt0", "libvirt-common", "libvirt-daemon", "libvirt-daemon-common",
                      "libvirt-daemon-log", "libvirt-daemon-driver-qemu", "libvirt-clients",
                      "qemu-system-modules-opengl", "qemu-system-modules-spice")
# passt's passt-repair, and the C library it needs, come from trixie.
PASST_SUITE = "trixie"
PASST_PACKAGES = ("passt", "libc6")

INIT_SCRIPT = f"""#!/bin/sh
# PID 1 of the test guest. It must never exit: the kernel would panic. It
# ends with poweroff -f so QEMU (run with -no-reboot) exits by itself.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /tmp /run /var/run /etc
echo "VHOSTNET-GUEST-UP kernel=$(uname -r)"
for module in {" ".join(VIRTIO_MODULES + NIC_MODULES)}; do
    # A module missing from the kernel image is reported, not fatal: the test
    # that needs the network will fail with a clear line in the log.
    insmod /lib/modules/$module.ko 2>/dev/null || echo "VHOSTNET-MODULE-FAILED $module"
done
ip link set lo up
echo VHOSTNET-TEST-BEGIN
if [ -f /test.sh ]; then
    sh /test.sh
    echo "VHOSTNET-TEST-EXIT rc=$?"
fi
echo VHOSTNET-TEST-END
sync
poweroff -f
# poweroff should not return; if it does, stop here without exiting PID 1.
while true; do sleep 60; done
"""

UDHCPC_SCRIPT = """#!/bin/sh
# Called by busybox udhcpc with $1 = event and the lease in the environment
# ($ip, $subnet or $mask, $router, $dns, $domain, $mtu).
case "$1" in
    deconfig)
        ip addr flush dev "$interface"
        ip link set "$interface" up
        ;;
    bound|renew)
        prefix=${mask:-24}
        ip addr flush dev "$interface"
        ip addr add "$ip/$prefix" dev "$interface"
        if [ -n "$mtu" ]; then ip link set "$interface" mtu "$mtu"; fi
        ip link set "$interface" up
        for gateway in $router; do
            ip route replace default via "$gateway" dev "$interface"
            break
        done
        : > /etc/resolv.conf
        if [ -n "$domain" ]; then echo "search $domain" >> /etc/resolv.conf; fi
        for server in $dns; do echo "nameserver $server" >> /etc/resolv.conf; done
        echo "udhcpc: $1 ip=$ip/$prefix router=$router dns=$dns domain=$domain"
        ;;
    leasefail|nak)
        echo "udhcpc: $1"
        ;;
esac
exit 0
"""


class KitError(RuntimeError):
    """The kit could not be built; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class Qemu10:
    """An unpacked QEMU 10.0 that runs beside the system QEMU 7.2."""

    root: Path

    @property
    def binary(self) -> Path:
        return self.root / "usr/bin/qemu-system-x86_64"

    @property
    def module_dir(self) -> Path:
        return self.root / "usr/lib/x86_64-linux-gnu/qemu"

    def data_dir_args(self) -> list[str]:
        """-L options: its own firmware first, then the system's for the BIOS."""
        return ["-L", str(self.root / "usr/share/qemu"), "-L", "/usr/share/seabios",
                "-L", "/usr/share/qemu"]

    def environment(self) -> dict[str, str]:
        """Without QEMU_MODULE_DIR it would load 7.2's modules and abort."""
        return {"QEMU_MODULE_DIR": str(self.module_dir)}


@dataclasses.dataclass(frozen=True)
class Kit:
    kernel: Path
    kernel_version: str
    initramfs: Path
    qemu10: Qemu10 | None
    qemu10_reason: str  # why qemu10 is None ("" when it is available)

    def describe(self) -> str:
        lines = [
            f"kernel:    {self.kernel} ({self.kernel_version})",
            f"initramfs: {self.initramfs}",
            f"cmdline:   {KERNEL_COMMAND_LINE}",
        ]
        if self.qemu10:
            lines.append(f"qemu 10.0: {self.qemu10.binary}")
        else:
            lines.append(f"qemu 10.0: unavailable ({self.qemu10_reason})")
        return "\n".join(lines)


# --- newc cpio writer -------------------------------------------------------
# Written here rather than calling cpio(1) so the archive can hold /dev/console
# (a device node) without root, and so per-test archives are plain bytes.


class CpioWriter:
    """Builds an uncompressed newc ("070701") archive in memory."""

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._next_inode = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0),
               nlink: int = 1) -> None:
        encoded_name = name.encode() + b"\0"
        fields = (
            self._next_inode, mode, 0, 0, nlink, 0, len(data),
            0, 0, rdev[0], rdev[1], len(encoded_name), 0,
        )
        self._next_inode += 1
        header = b"070701" + b"".join(b"%08X" % value for value in fields)
        self._chunks.append(_pad4(header + encoded_name))
        self._chunks.append(_pad4(data))

    def directory(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755, nlink=2)

    def file(self, name: str, data: bytes, executable: bool = False) -> None:
        self._entry(name, stat.S_IFREG | (0o755 if executable else 0o644), data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def char_device(self, name: str, major: int, minor: int) -> None:
        self._entry(name, stat.S_IFCHR | 0o600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return b"".join(self._chunks)


def _pad4(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 4)


def script_archive(script_text: str) -> bytes:
    """A small cpio holding /test.sh, to concatenate after the base initramfs."""
    archive = CpioWriter()
    archive.file("test.sh", script_text.encode(), executable=True)
    return archive.finish()


# --- downloads through apt ------------------------------------------------------


def _run(command: list[str], cwd: Path | None = None,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``env`` is added to this process's environment."""
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600,
                          check=False, env={**os.environ, **env} if env else None)


def _apt_lists_present(lists_dir: Path = Path("/var/lib/apt/lists")) -> bool:
    return any(lists_dir.glob("*_Packages*"))


def _ensure_system_apt_lists() -> None:
    if _apt_lists_present():
        return
    if os.geteuid() != 0:
        raise KitError("the apt package lists are missing; run as root: apt-get update")
    result = _run(["apt-get", "update"])
    if result.returncode != 0:
        raise KitError(f"apt-get update failed: {result.stderr.strip()[-500:]}")


def _apt_download(package: str, dest: Path, apt_options: list[str] = ()) -> Path:
    """Download one .deb into dest and return its path (apt names the file)."""
    dest.mkdir(parents=True, exist_ok=True)
    before = set(dest.glob("*.deb"))
    result = _run(["apt-get", *apt_options, "download", package], cwd=dest)
    if result.returncode != 0:
        raise KitError(f"apt-get download {package} failed: {result.stderr.strip()[-500:]}")
    new = sorted(set(dest.glob("*.deb")) - before)
    if new:
        return new[0]
    # Already there from an earlier run: apt does not download it again.
    name = package.split("/")[0].split("=")[0]
    existing = sorted(dest.glob(f"{name}_*.deb"))
    if not existing:
        raise KitError(f"apt-get download {package} produced no .deb file")
    return existing[-1]


def _unpack_deb(deb: Path, into: Path) -> None:
    into.mkdir(parents=True, exist_ok=True)
    result = _run(["dpkg", "-x", str(deb), str(into)])
    if result.returncode != 0:
        raise KitError(f"dpkg -x {deb.name} failed: {result.stderr.strip()}")


# --- the kernel -----------------------------------------------------------------


def _fetch_kernel(cache_dir: Path) -> tuple[Path, str, Path]:
    """Return (vmlinuz, kernel version, modules directory), downloading if needed."""
    root = cache_dir / "kernel"
    found = _find_kernel(root)
    if found:
        return found
    _ensure_system_apt_lists()
    debs = cache_dir / "debs"
    # The meta-package only depends on the real one; its Depends names it.
    meta = _apt_download("linux-image-amd64", debs)
    depends = _run(["dpkg-deb", "-f", str(meta), "Depends"]).stdout
    real = next((part.strip().split()[0] for part in depends.split(",")
                 if part.strip().startswith("linux-image-")), None)
    if real is None:
        raise KitError(f"cannot find the kernel package in {meta.name} Depends: {depends!r}")
    image = _apt_download(real, debs)
    staging = Path(tempfile.mkdtemp(prefix="kernel-", dir=cache_dir))
    _unpack_deb(image, staging)
    if root.exists():
        shutil.rmtree(root)
    staging.rename(root)
    found = _find_kernel(root)
    if not found:
        raise KitError(f"{image.name} holds no /boot/vmlinuz-*")
    return found


def _find_kernel(root: Path) -> tuple[Path, str, Path] | None:
    kernels = sorted(root.glob("boot/vmlinuz-*"))
    if not kernels:
        return None
    version = kernels[-1].name.removeprefix("vmlinuz-")
    modules = root / "lib/modules" / version
    if not modules.is_dir():
        return None
    return kernels[-1], version, modules


def _module_files(modules_dir: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for name in VIRTIO_MODULES + NIC_MODULES:
        matches = sorted(modules_dir.glob(f"kernel/**/{name}.ko"))
        if not matches:
            raise KitError(f"module {name}.ko not found under {modules_dir} "
                           "(compressed modules are not supported)")
        found[name] = matches[0]
    return found


# --- the initramfs --------------------------------------------------------------


def _busybox_applets() -> list[str]:
    result = _run([str(BUSYBOX), "--list-full"])
    if result.returncode != 0:
        raise KitError("busybox-static is needed: apt-get install busybox-static")
    return [line.strip() for line in result.stdout.splitlines() if line.strip()]


def _build_initramfs(modules: dict[str, Path]) -> bytes:
    archive = CpioWriter()
    for directory in ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "usr/share",
                      "usr/share/udhcpc", "lib", "lib/modules", "etc", "dev", "proc", "sys",
                      "tmp", "run", "var", "root", "etc/udhcpc"):
        archive.directory(directory)
    # The kernel opens /dev/console for PID 1 before anything is mounted.
    archive.char_device("dev/console", 5, 1)
    archive.file("bin/busybox", BUSYBOX.read_bytes(), executable=True)
    for applet in _busybox_applets():
        path = applet.lstrip("/")
        if path == "bin/busybox" or path.count("/") not in (1, 2):
            continue
        archive.symlink(path, "/bin/busybox")
    for name, source in modules.items():
        archive.file(f"lib/modules/{name}.ko", source.read_bytes())
    archive.file("init", INIT_SCRIPT.encode(), executable=True)
    archive.file("usr/share/udhcpc/default.script", UDHCPC_SCRIPT.encode(), executable=True)
    # Debian's busybox looks for the script here instead of the upstream path.
    archive.symlink("etc/udhcpc/default.script", "/usr/share/udhcpc/default.script")
    archive.file("etc/hosts", b"127.0.0.1 localhost\n")
    archive.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    archive.file("etc/group", b"root:x:0:\n")
    return archive.finish()


# --- QEMU 10.0 ------------------------------------------------------------------


def debian_archive_uri(release: str = "bookworm") -> str | None:
    """The archive address the machine's own apt uses for ``release``.

    bookworm-backports lives in the same archive as bookworm, so we reuse
    whatever mirror the machine is configured with rather than naming one.
    Reads deb822 ``*.sources`` files and the one-line ``sources.list``.
    """
    candidates = sorted(Path("/etc/apt/sources.list.d").glob("*.sources"))
    for path in candidates:
        try:
            stanzas = path.read_text(errors="replace").split("\n\n")
        except OSError:
            continue
        for stanza in stanzas:
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                key, sep, value = line.partition(":")
                if sep and not line.startswith(("#", " ")):
                    fields[key.strip().lower()] = value.strip()
            if release in fields.get("suites", "").split() and "deb" in fields.get("types", ""):
                uris = fields.get("uris", "").split()
                if uris:
                    return uris[0]
    for path in [Path("/etc/apt/sources.list"), *Path("/etc/apt/sources.list.d").glob("*.list")]:
        try:
            lines = path.read_text(errors="replace").splitlines()
        except OSError:
            continue
        for line in lines:
            words = [w for w in line.split() if not w.startswith("[")]
            if len(words) >= 3 and words[0] == "deb" and words[2] == release:
                return words[1]
    return None


def _private_apt(cache_dir: Path, suite: str, state_name: str) -> list[str]:
    """apt-get options for ``suite`` with a private apt state (our own sources list,
    lists and caches under ``cache_dir/state_name``), so the machine's apt
    configuration is left untouched; the suite's lists are fetched once."""
    apt_dir = cache_dir / state_name
    lists = apt_dir / "lists"
    (lists / "partial").mkdir(parents=True, exist_ok=True)
    (apt_dir / "cache" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
    archive = debian_archive_uri()
    if archive is None:
        raise KitError(f"no bookworm entry in the machine's apt sources to take {suite} from")
    sources = apt_dir / "sources.list"
    sources.write_text(f"deb [signed-by={DEBIAN_KEYRING}] {archive} {suite} main\n")
    options = [
        "-o", f"Dir::Etc::SourceList={sources}",
        "-o", "Dir::Etc::SourceParts=/dev/null",
        "-o", f"Dir::State::Lists={lists}",
        "-o", f"Dir::Cache={apt_dir / 'cache'}",
        "-o", "APT::Sandbox::User=root" if os.geteuid() == 0 else "Debug::NoLocking=1",
        "-q",
    ]
    if not any(lists.glob("*_Packages*")):
        result = _run(["apt-get", *options, "update"])
        if result.returncode != 0 or not any(lists.glob("*_Packages*")):
            raise KitError(f"apt-get update for {suite} failed: "
                           f"{(result.stderr or result.stdout).strip()[-500:]}")
    return options


def _unpack_from_suite(cache_dir: Path, suite: str, state_name: str, packages: tuple[str, ...],
                       debs: Path, target: Path, check: Callable[[Path], None]) -> None:
    """Download ``packages`` from ``suite``, unpack them together and move the result to
    ``target`` once ``check(unpacked)`` passed (it raises ``KitError`` otherwise)."""
    options = _private_apt(cache_dir, suite, state_name)
    staging = Path(tempfile.mkdtemp(prefix=f"{target.name}-", dir=cache_dir))
    try:
        for package in packages:
            _unpack_deb(_apt_download(f"{package}/{suite}", debs, options), staging)
        check(staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def _fetch_qemu10(cache_dir: Path) -> Qemu10:
    qemu = Qemu10(cache_dir / "qemu10")
    if qemu.binary.exists():
        return qemu

    def check(unpacked: Path) -> None:
        binary = Qemu10(unpacked).binary
        if not binary.exists():
            raise KitError(f"the {QEMU10_SUITE} packages hold no qemu-system-x86_64")
        version = _run([str(binary), "--version"])
        if version.returncode != 0:
            raise KitError(f"the downloaded QEMU does not run: {version.stderr.strip()[-300:]}")

    _unpack_from_suite(cache_dir, QEMU10_SUITE, "apt-backports", QEMU10_PACKAGES,
                       cache_dir / "debs-qemu10", qemu.root, check)
    return qemu


# --- libvirt 11.3 (bookworm-backports) ------------------------------------------


@dataclasses.dataclass(frozen=True)
class Libvirt11:
    """An unpacked libvirt 11.3: its programs run with ``LD_LIBRARY_PATH=libdir``; the daemon
    looks for its driver modules and data at its compiled-in /usr paths, so whoever runs it
    puts ``module_dir`` and ``data_dir`` there (bind mounts in a private mount namespace)."""

    root: Path

    @property
    def libvirtd(self) -> Path:
        return self.root / "usr/sbin/libvirtd"

    @property
    def virsh(self) -> Path:
        return self.root / "usr/bin/virsh"

    @property
    def libdir(self) -> Path:
        return self.root / "usr/lib/x86_64-linux-gnu"

    @property
    def module_dir(self) -> Path:
        """Goes over /usr/lib/x86_64-linux-gnu/libvirt."""
        return self.libdir / "libvirt"

    @property
    def data_dir(self) -> Path:
        """Goes over /usr/share/libvirt (cpu_map, schemas)."""
        return self.root / "usr/share/libvirt"

    @property
    def config_dir(self) -> Path:
        """Its default /etc/libvirt."""
        return self.root / "etc/libvirt"

    @property
    def qemu10_modules(self) -> Path:
        """QEMU 10.0's modules that the kit's QEMU 10.0 lacks (see LIBVIRT11_PACKAGES)."""
        return self.libdir / "qemu"

    def environment(self) -> dict[str, str]:
        return {"LD_LIBRARY_PATH": str(self.libdir)}


def fetch_libvirt11(cache_dir: Path = DEFAULT_CACHE_DIR) -> Libvirt11:
    """bookworm-backports' libvirt 11.3 in the kit cache, downloaded once; ``KitError`` if it
    cannot be had or does not run here."""
    cache_dir = Path(cache_dir).resolve()
    libvirt = Libvirt11(cache_dir / "libvirt11")
    with _locked(cache_dir):
        if all(path.exists() for path in (libvirt.libvirtd, libvirt.virsh,
                                          libvirt.qemu10_modules)):
            return libvirt

        def check(unpacked: Path) -> None:
            candidate = Libvirt11(unpacked)
            for program in (candidate.libvirtd, candidate.virsh):
                version = _run([str(program), "--version"], env=candidate.environment())
                if version.returncode != 0:
                    raise KitError(f"{QEMU10_SUITE}'s {program.name} does not run here: "
                                   f"{(version.stderr or version.stdout).strip()[-300:]}")

        _unpack_from_suite(cache_dir, QEMU10_SUITE, "apt-backports", LIBVIRT11_PACKAGES,
                           cache_dir / "debs-libvirt11", libvirt.root, check)
    return libvirt


# --- passt-repair (Debian trixie) ---------------------------------------------


@dataclasses.dataclass(frozen=True)
class PasstRepair:
    """passt's own TCP_REPAIR helper from Debian trixie, run through trixie's loader
    (it needs glibc 2.38; bookworm has 2.36), nothing installed."""

    root: Path

    @property
    def binary(self) -> Path:
        return self.root / "usr/bin/passt-repair"

    @property
    def libdir(self) -> Path:
        return self.root / "usr/lib/x86_64-linux-gnu"

    def command(self, *args: str) -> list[str]:
        return self.run_command(self.binary, *args)

    def passt_command(self, *args: str) -> list[str]:
        """passt itself from the same package (the AVX2 build where the CPU has AVX2; run
        through the loader, it says it cannot re-exec itself and goes on as the image it is)."""
        avx2 = self.root / "usr/bin/passt.avx2"
        with open("/proc/cpuinfo") as cpuinfo:
            has_avx2 = " avx2" in cpuinfo.read()
        return self.run_command(avx2 if has_avx2 and avx2.exists() else self.root / "usr/bin/passt",
                                *args)

    def run_command(self, binary: Path, *args: str) -> list[str]:
        """``binary`` (unpacked from trixie) through trixie's loader and C library."""
        return [str(self.libdir / "ld-linux-x86-64.so.2"), "--library-path", str(self.libdir),
                str(binary), *args]


def fetch_passt_repair(cache_dir: Path = DEFAULT_CACHE_DIR) -> PasstRepair:
    """trixie's passt-repair in the kit cache, downloaded once; ``KitError`` if it cannot be had."""
    cache_dir = Path(cache_dir).resolve()
    passt = PasstRepair(cache_dir / "passt-trixie")
    with _locked(cache_dir):
        if passt.binary.exists():
            return passt

        def check(unpacked: Path) -> None:
            candidate = PasstRepair(unpacked)
            if not candidate.binary.exists():
                raise KitError(f"trixie's {' and '.join(PASST_PACKAGES)} hold no passt-repair")
            # Without arguments it prints its usage and exits 2: proof that it runs.
            usage = _run(candidate.command())
            if "Usage" not in usage.stdout + usage.stderr:
                raise KitError(f"trixie's passt-repair does not run here: "
                               f"{(usage.stderr or usage.stdout).strip()[-300:]}")

        _unpack_from_suite(cache_dir, PASST_SUITE, "apt-trixie", PASST_PACKAGES,
                           cache_dir / "debs-trixie", passt.root, check)
    return passt


# --- putting it together --------------------------------------------------------


@contextmanager
def _locked(cache_dir: Path) -> Iterator[None]:
    """Serialise builds: several test sessions may share one cache."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def build_kit(cache_dir: Path = DEFAULT_CACHE_DIR, *, want_qemu10: bool = True) -> Kit:
    """Build (or reuse) the guest kit. Raises KitError if the kernel cannot be had."""
    cache_dir = Path(cache_dir).resolve()
    with _locked(cache_dir):
        kernel, version, modules_dir = _fetch_kernel(cache_dir)
        modules = _module_files(modules_dir)
        initramfs = _cached_initramfs(cache_dir, modules)
        qemu10: Qemu10 | None = None
        reason = "not requested"
        if want_qemu10:
            try:
                qemu10 = _fetch_qemu10(cache_dir)
                reason = ""
            except (KitError, OSError, subprocess.TimeoutExpired) as error:
                reason = str(error)
    return Kit(kernel=kernel, kernel_version=version, initramfs=initramfs,
               qemu10=qemu10, qemu10_reason=reason)


def _cached_initramfs(cache_dir: Path, modules: dict[str, Path]) -> Path:
    """Rebuild the base initramfs only when its inputs changed."""
    fingerprint = hashlib.sha256()
    # This file's own text stands for "how the archive is laid out".
    fingerprint.update(Path(__file__).read_bytes())
    for source in (BUSYBOX, *modules.values()):
        info = source.stat()
        fingerprint.update(f"{source}:{info.st_size}:{info.st_mtime_ns}".encode())
    digest = fingerprint.hexdigest()[:16]
    # One file per fingerprint: work trees that share the cache but differ in this
    # file (another module list) must not replace each other's archive under a
    # guest about to boot it.
    target = cache_dir / f"initramfs-{digest}.cpio"
    if target.exists():
        return target
    temporary = target.with_suffix(".tmp")
    temporary.write_bytes(_build_initramfs(modules))
    temporary.replace(target)
    return target


def main() -> int:
    try:
        kit = build_kit()
    except KitError as error:
        print(f"guestkit: {error}", file=sys.stderr)
        return 1
    print(kit.describe())
    try:  # for `make bench`, which compares against passt inside the namespace (no downloads)
        fetch_passt_repair()
    except KitError as error:
        print(f"guestkit: trixie's passt is unavailable, the bench will skip it: {error}",
              file=sys.stderr)
    try:  # for the libvirt e2e test, which runs inside the namespace (no downloads)
        print(f"libvirt 11: {fetch_libvirt11().libvirtd}")
    except (KitError, OSError, subprocess.TimeoutExpired) as error:
        print(f"guestkit: libvirt 11.3 is unavailable, the libvirt test falls back to the "
              f"system's libvirt: {error}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
