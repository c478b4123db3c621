"""libvirt starts vhostnet as it starts passt: libvirt 11.3 (bookworm-backports), in stream
mode with bookworm's QEMU 7.2 and in vhost-user mode with QEMU 10.0.

A TCG domain with ``<interface type='user'><backend type='passt'/>`` (stream) or
``<interface type='vhostuser'><backend type='passt'/>`` with shared memfd memory (vhost-user)
is defined and started with ``virsh``; libvirt runs the ``passt`` it finds first on its PATH
(a wrapper that runs vhostnet) with its own argument list (printed), then QEMU with
``-netdev stream`` or a vhost-user chardev on vhostnet's socket. The guest takes its DHCP
lease and downloads 20 MiB from a host HTTP server (sha256 checked); ``virsh destroy`` then
leaves no vhostnet process, socket or pid file.

libvirt 11.3 comes unpacked from the guest kit (tools/guestkit.py, `make kit`); it runs on
bookworm's libraries, which Debian's own libvirt packages pull in (tools/system-packages.sh).
libvirtd runs by hand, as root, without systemd or D-Bus, in a private mount namespace
(``unshare --mount``): there tmpfs hide /run, /var/lib, /var/log and /var/cache, whose
libvirt directories are bind mounts of this test's own; /etc/libvirt, /etc/passwd and
/etc/group are this test's copies; the unpacked driver modules and data go over
/usr/lib/x86_64-linux-gnu/libvirt and /usr/share/libvirt, where libvirt looks for them.
Nothing of the machine's is changed. QEMU and passt run as libvirt-qemu, as with Debian's
default qemu.conf (the passwd copy adds that user where it does not exist): started as root,
vhostnet (like passt) drops to nobody and could no longer remove its files from libvirt's
root-owned folder.

Only where libvirt 11.3 cannot be had (no kit download) does the stream case run the
system's libvirt instead, saying so: Debian bookworm's libvirt 9.0.0 refuses the domain
("XML error: Invalid value for attribute 'type' in element 'backend': 'passt'", libvirt
issue 462), an expected failure at ``virsh define``. With libvirt 11.3 any failure fails.
Skipped, with the reason, only where libvirt or QEMU is not installed.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.e2e.guestlib import GATEWAY, GUEST_ADDRESS, REPO_ROOT
from tests.e2e.hostservers import HttpFileServer, generated_bytes, sha256_hex
from tools.guestkit import (
    KERNEL_COMMAND_LINE,
    Kit,
    KitError,
    Libvirt11,
    fetch_libvirt11,
    script_archive,
)
from tools.qemu import DEFAULT_MAC, POLL_INTERVAL, SYSTEM_QEMU, parse_results

pytestmark = pytest.mark.e2e

DOWNLOAD_BYTES = 20 * 1024 * 1024
DOWNLOAD_SEED = 20260107
DOMAIN = "vhostnet-libvirt"
START_TIMEOUT = 30.0
GUEST_TIMEOUT = 600.0
GONE_TIMEOUT = 15.0
PASST_REJECTED = "Invalid value for attribute 'type' in element 'backend': 'passt'"

# libvirt's directories, each a tmpfs-hidden parent and the test's own copy inside it.
STATE_DIRS = {"run": "/run/libvirt", "lib": "/var/lib/libvirt", "log": "/var/log/libvirt",
              "cache": "/var/cache/libvirt"}
SYSTEM_MODULE_DIR = "/usr/lib/x86_64-linux-gnu/libvirt"
SYSTEM_DATA_DIR = "/usr/share/libvirt"
DOMAIN_USER = "libvirt-qemu"
QEMU_CONF = f"""user = "{DOMAIN_USER}"
group = "{DOMAIN_USER}"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
cgroup_controllers = [ ]
stdio_handler = "file"
"""
LIBVIRTD_CONF = """unix_sock_dir = "{sock_dir}"
auth_unix_rw = "none"
log_outputs = "3:file:{log}"
"""
# libvirt runs "passt" from its PATH with a cleared environment: the wrapper finds vhostnet.
PASST_WRAPPER = """#!/bin/sh
cd {repo} && exec {python} -m vhostnet "$@"
"""
# The unpacked QEMU 10.0 as libvirt's <emulator>: its modules and firmware, as tools/qemu.py.
# Its module folder holds links to the kit's modules and to the ones libvirt's kit adds.
EMULATOR_WRAPPER = """#!/bin/sh
export QEMU_MODULE_DIR={module_dir}
exec {binary} {data_dir_args} "$@"
"""
# $1 test folder, $2 etc folder to copy, $3 qemu.conf, $4 libvirtd.conf, $5 passwd, $6 group,
# $7 the wrapper's folder, $8 libvirtd, then optionally $9 driver modules, ${10} data.
# $EXPOSE, when set: a folder the domain's user must read (Python's) below $HIDDEN, a folder
# it cannot pass through; a tmpfs hides $HIDDEN and only $EXPOSE comes back in it.
NAMESPACE_SCRIPT = """set -e
for name in {names}; do mkdir -p "$1/$name"; done
mkdir -p "$1/etc"
cp -a "$2/." "$1/etc/"
cp "$3" "$1/etc/qemu.conf"; cp "$4" "$1/etc/libvirtd.conf"
for dir in {dirs}; do
    mount -t tmpfs -o mode=0755 tmpfs "$(dirname "$dir")"
    mkdir "$dir"
done
mount --bind "$1/run" /run/libvirt
mount --bind "$1/lib" /var/lib/libvirt
mount --bind "$1/log" /var/log/libvirt
mount --bind "$1/cache" /var/cache/libvirt
mount --bind "$1/etc" /etc/libvirt
mount --bind "$5" /etc/passwd
mount --bind "$6" /etc/group
if [ -n "${{EXPOSE:-}}" ]; then
    mkdir -p "$1/expose"
    mount --bind "$EXPOSE" "$1/expose"
    mount -t tmpfs -o mode=0755 tmpfs "$HIDDEN"
    mkdir -p "$EXPOSE"
    mount --bind "$1/expose" "$EXPOSE"
fi
if [ -n "${{9:-}}" ]; then
    mount --bind "$9" {module_dir}
    mount --bind "${{10}}" {data_dir}
fi
export PATH="$7:$PATH"
exec "$8" -f /etc/libvirt/libvirtd.conf
"""


def guest_script(http_port: int) -> str:
    # The guest stays up after its work: the domain is ended by virsh destroy.
    return f"""
ip link set eth0 up
timeout 60 udhcpc -i eth0 -n -q -t 10 -T 2
echo "RESULT dhcp_ip=$(ip -4 -o addr show eth0 | sed -n 's/.* inet \\([0-9.]*\\)\\/.*/\\1/p')"
echo "RESULT route=$(ip route show default | cut -d' ' -f3)"
timeout 400 wget -q -O - http://{GATEWAY}:{http_port}/big.bin | sha256sum > /tmp/sum
echo "RESULT download_sha256=$(cut -d' ' -f1 /tmp/sum)"
echo "RESULT done=1"
sleep 600
"""


# The rest of libvirt's argument list too: --interface, --address/--netmask (the guest's
# usual address) and port forwards with an address, ranges, a mapping and an exclusion.
# Not --mtu: with <mtu> and a passt back-end, libvirt 11.3 looks for a host device to set it
# on and fails the start ("Cannot set interface MTU on '(null)': No such device").
STREAM_INTERFACE = f"""<interface type='user'>
      <mac address='{{mac}}'/>
      <source dev='lo'/>
      <ip family='ipv4' address='{GUEST_ADDRESS}' prefix='24'/>
      <backend type='passt' logFile='{{log}}'/>
      <portForward proto='tcp' address='127.0.0.1'>
        <range start='20022' to='22'/>
        <range start='21000' end='21009' to='31000'/>
        <range start='21005' exclude='yes'/>
      </portForward>
      <portForward proto='udp'>
        <range start='20053' to='53'/>
      </portForward>
      <model type='virtio'/>
    </interface>"""
VHOST_USER_INTERFACE = """<interface type='vhostuser'>
      <mac address='{mac}'/>
      <backend type='passt' logFile='{log}'/>
      <model type='virtio'/>
    </interface>"""
# vhost-user needs guest memory the back-end can map.
SHARED_MEMORY = """<memoryBacking>
    <source type='memfd'/>
    <access mode='shared'/>
  </memoryBacking>"""


def domain_xml(kit: Kit, initrd: Path, serial: Path, emulator: Path, interface: str,
               memory_backing: str = "") -> str:
    return f"""<domain type='qemu'>
  <name>{DOMAIN}</name>
  <memory unit='MiB'>256</memory>
  {memory_backing}
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kit.kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>{KERNEL_COMMAND_LINE}</cmdline>
  </os>
  <on_reboot>destroy</on_reboot>
  <devices>
    <emulator>{emulator}</emulator>
    {interface}
    <serial type='file'>
      <source path='{serial}'/>
      <target port='0'/>
    </serial>
    <memballoon model='none'/>
  </devices>
</domain>
"""


def _python_exposure() -> dict[str, str]:
    """The namespace script's EXPOSE and HIDDEN when this Python's installation lies below a
    folder other users cannot pass through (a pyenv in /root): passt runs as the domain's
    user, and it runs vhostnet with this Python."""
    prefix = Path(sys.base_prefix).resolve()
    for folder in (*reversed(prefix.parents), prefix):
        if not folder.stat().st_mode & stat.S_IXOTH:
            return {"EXPOSE": str(prefix), "HIDDEN": str(folder)}
    return {}


def _missing(libvirt: Libvirt11 | None) -> str | None:
    tools = ("unshare",) if libvirt else ("libvirtd", "virsh", "unshare")
    for tool in tools:
        if shutil.which(tool) is None and not Path("/usr/sbin", tool).exists():
            return f"{tool} is not installed (Debian: libvirt-daemon, libvirt-daemon-driver-qemu, " \
                   "libvirt-clients, util-linux)"
    if libvirt:
        for mount_point in (SYSTEM_MODULE_DIR, SYSTEM_DATA_DIR, "/etc/libvirt"):
            if not Path(mount_point).is_dir():
                return f"{mount_point} is missing: libvirt 11.3 is mounted where Debian's " \
                       "libvirt-daemon-driver-qemu and libvirt-clients put theirs (install them)"
    if not SYSTEM_QEMU.exists():
        return f"{SYSTEM_QEMU} is not installed (Debian: qemu-system-x86)"
    if os.geteuid() != 0:
        return "libvirtd's system instance needs root"
    return None


class Libvirtd:
    """libvirtd in its own mount namespace; ``virsh`` talks to it on a private socket.
    ``libvirt``: the unpacked libvirt 11.3 to run, or None for the system's."""

    def __init__(self, root: Path, libvirt: Libvirt11 | None) -> None:
        self.root = root
        self.libvirt = libvirt
        self.sock_dir = root / "sock"
        self.log = root / "libvirtd.log"
        self.bin = root / "bin"
        # The domain's own files (initrd, console, vhostnet's log), owned by its user.
        self.domain_dir = root / "domain"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"qemu:///system?socket={self.sock_dir}/libvirt-sock"

    def start(self) -> None:
        for path in (self.sock_dir, self.bin, self.domain_dir):
            path.mkdir(parents=True)
        wrapper = self.bin / "passt"
        wrapper.write_text(PASST_WRAPPER.format(repo=REPO_ROOT, python=sys.executable))
        wrapper.chmod(0o755)
        qemu_conf = self.root / "qemu.conf"
        qemu_conf.write_text(QEMU_CONF)
        libvirtd_conf = self.root / "libvirtd.conf"
        libvirtd_conf.write_text(LIBVIRTD_CONF.format(sock_dir=self.sock_dir, log=self.log))
        passwd, group = self.root / "passwd", self.root / "group"
        users = Path("/etc/passwd").read_text()
        groups = Path("/etc/group").read_text()
        if not re.search(rf"^{DOMAIN_USER}:", users, re.MULTILINE):
            users += f"{DOMAIN_USER}:x:64055:64055:libvirt:/var/lib/libvirt:/usr/sbin/nologin\n"
        if not re.search(rf"^{DOMAIN_USER}:", groups, re.MULTILINE):
            groups += f"{DOMAIN_USER}:x:64055:\n"
        # In group kvm, as Debian makes it: otherwise libvirt finds /dev/kvm unusable for
        # it, holds QEMU's capabilities (probed with KVM) stale and probes QEMU again at
        # every call, a minute per test. The domain stays type 'qemu' (TCG).
        groups = re.sub(r"^(kvm:[^:]*:\d+:)(.*)$",
                        lambda line: line.group(1) + ",".join(filter(None, (line.group(2),
                                                                            DOMAIN_USER))),
                        groups, count=1, flags=re.MULTILINE)
        passwd.write_text(users)
        group.write_text(groups)
        user = re.search(rf"^{DOMAIN_USER}:[^:]*:(\d+):(\d+):", users, re.MULTILINE)
        assert user, users
        os.chown(self.domain_dir, int(user.group(1)), int(user.group(2)))
        for path in (self.root, *self.root.parents):  # the domain's user must get through
            if path == Path("/tmp"):
                break
            path.chmod(path.stat().st_mode | 0o055)
        script = NAMESPACE_SCRIPT.format(names=" ".join(STATE_DIRS),
                                         dirs=" ".join(STATE_DIRS.values()),
                                         module_dir=SYSTEM_MODULE_DIR, data_dir=SYSTEM_DATA_DIR)
        if self.libvirt:
            program = [str(self.libvirt.config_dir), str(qemu_conf), str(libvirtd_conf),
                       str(passwd), str(group), str(self.bin), str(self.libvirt.libvirtd),
                       str(self.libvirt.module_dir), str(self.libvirt.data_dir)]
        else:
            program = ["/etc/libvirt", str(qemu_conf), str(libvirtd_conf), str(passwd),
                       str(group), str(self.bin), shutil.which("libvirtd") or "/usr/sbin/libvirtd"]
        self.process = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "libvirtd",
             str(self.root / "ns"), *program],
            stdout=open(self.root / "libvirtd.out", "wb"), stderr=subprocess.STDOUT,
            env={**os.environ, **self.environment(), **_python_exposure()},
            start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            if self.virsh("version", check=False).returncode == 0:
                print(self.virsh("version").stdout.strip())
                return
            time.sleep(0.3)
        raise AssertionError(f"libvirtd did not come up: {self.diagnosis()}")

    def environment(self) -> dict[str, str]:
        return self.libvirt.environment() if self.libvirt else {}

    def virsh(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        program = str(self.libvirt.virsh) if self.libvirt else "virsh"
        result = subprocess.run([program, "-c", self.uri, *args], capture_output=True,
                                text=True, timeout=120, check=False,
                                env={**os.environ, **self.environment()})
        if check and result.returncode != 0:
            raise AssertionError(f"virsh {' '.join(args)}: {result.stderr.strip()}\n"
                                 f"{self.diagnosis()}")
        return result

    def state_dir(self, name: str) -> Path:
        """The test's own copy of one of libvirt's directories (``run``, ``log``...)."""
        return self.root / "ns" / name

    def diagnosis(self) -> str:
        parts = []
        for path in (self.root / "libvirtd.out", self.log):
            if path.exists():
                lines = [line for line in path.read_text(errors="replace").splitlines()
                         if " error " in line or "rror:" in line]
                parts.append(f"{path.name}:\n" + "\n".join(lines[-15:]))
        qemu_logs = self.state_dir("log") / "qemu"
        for path in sorted(qemu_logs.glob("*.log")) if qemu_logs.exists() else ():
            parts.append(f"{path.name}:\n" + path.read_text(errors="replace")[-3000:])
        return "\n".join(parts)

    def stop(self) -> None:
        if self.process is None:
            return
        self.virsh("destroy", DOMAIN, check=False)
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)


@pytest.fixture(scope="module")
def libvirt11() -> Libvirt11 | str:
    """The kit's libvirt 11.3, or why it cannot be had (no download inside the namespace:
    `make kit` fetches it beforehand)."""
    try:
        return fetch_libvirt11()
    except (KitError, OSError, subprocess.TimeoutExpired) as error:
        return str(error)


@contextmanager
def running_libvirtd(root: Path, libvirt: Libvirt11 | None) -> Iterator[Libvirtd]:
    if reason := _missing(libvirt):
        print(reason)
        pytest.skip(reason)
    daemon = Libvirtd(root, libvirt)
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.stop()


def _vhostnet_pids(log_file: Path) -> list[int]:
    """vhostnet processes libvirt started for this test's domain: their --log-file is
    ``log_file`` (the domain's name alone would also find another run's leftovers)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            status = (entry / "stat").read_text()
        except OSError:
            continue
        ours = str(log_file).encode() in argv
        if b"vhostnet" in argv and ours and status.rsplit(") ", 1)[1][0] != "Z":
            found.append(int(entry.name))
    return found


def _wait_for_result(serial: Path, name: str, timeout: float) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = serial.read_text(errors="replace") if serial.exists() else ""
        if name in parse_results(text):
            return parse_results(text)
        time.sleep(POLL_INTERVAL)
    raise AssertionError(f"the guest printed no {name} within {timeout:.0f} s; console:\n"
                         + (serial.read_text(errors="replace")[-3000:] if serial.exists() else ""))


def _run_domain(libvirtd: Libvirtd, kit: Kit, e2e_tmp: Path, emulator: Path, interface: str,
                memory_backing: str = "", while_running: Callable[[], None] = lambda: None
                ) -> tuple[list[str], str, str]:
    """Define, start and check the domain (``while_running`` checks more while the guest
    works), then destroy it and check vhostnet is gone. Returns the arguments libvirt gave
    passt, QEMU's log and vhostnet's log."""
    data = generated_bytes(DOWNLOAD_BYTES, DOWNLOAD_SEED)
    serial = libvirtd.domain_dir / "serial.log"
    passt_log = libvirtd.domain_dir / "vhostnet.log"
    initrd = libvirtd.domain_dir / "initrd.cpio"
    with HttpFileServer("big.bin", data) as http:
        initrd.write_bytes(kit.initramfs.read_bytes() + script_archive(guest_script(http.port)))
        xml = e2e_tmp / "domain.xml"
        xml.write_text(domain_xml(kit, initrd, serial, emulator,
                                  interface.format(mac=DEFAULT_MAC, log=passt_log),
                                  memory_backing))
        defined = libvirtd.virsh("define", str(xml), check=False)
        if libvirtd.libvirt is None and defined.returncode != 0 \
                and PASST_REJECTED in defined.stderr:
            # Debian bookworm's libvirt 9.0.0 (libvirt issue 462): it has the passt code but
            # its XML parser refuses the backend, so it never starts a passt.
            pytest.xfail("libvirt 11.3 could not be had, and the system's libvirt cannot run a "
                         f"passt back-end: {defined.stderr.strip()}")
        assert defined.returncode == 0, defined.stderr + libvirtd.diagnosis()
        libvirtd.virsh("start", DOMAIN)
        passt_dir = libvirtd.state_dir("run") / "qemu" / "passt"
        sockets = list(passt_dir.glob("*.socket"))
        pid_files = list(passt_dir.glob("*.pid"))
        pids = _vhostnet_pids(passt_log)
        argv = (Path("/proc") / str(pids[0]) / "cmdline").read_bytes().decode().split("\0") \
            if pids else []
        while_running()
        results = _wait_for_result(serial, "done", GUEST_TIMEOUT)

    qemu_log = (libvirtd.state_dir("log") / "qemu" / f"{DOMAIN}.log").read_text(errors="replace")
    vhostnet_log = passt_log.read_text(errors="replace") if passt_log.exists() else ""
    assert len(sockets) == 1 and len(pid_files) == 1, (sockets, pid_files, vhostnet_log)
    assert re.search(r"-accel tcg|accel=tcg", qemu_log), "the domain is not on TCG:\n" + qemu_log
    assert len(pids) == 1, (pids, vhostnet_log)
    assert pid_files[0].read_text().strip() == str(pids[0])
    passt_args = argv[argv.index("vhostnet") + 1:]
    while passt_args and not passt_args[-1]:
        passt_args.pop()
    print(f"\nlibvirt ran: passt {' '.join(passt_args)}")
    assert "--one-off" in passt_args and "--socket" in passt_args
    # libvirt names its socket as it sees it: its /run/libvirt is this test's folder.
    assert f"{STATE_DIRS['run']}/qemu/passt/{sockets[0].name}" in passt_args
    assert results.get("dhcp_ip") == GUEST_ADDRESS, serial.read_text()[-3000:]
    assert results.get("route") == GATEWAY
    assert results.get("download_sha256") == sha256_hex(data), serial.read_text()[-3000:]

    libvirtd.virsh("destroy", DOMAIN)
    deadline = time.monotonic() + GONE_TIMEOUT
    while time.monotonic() < deadline and (_vhostnet_pids(passt_log) or any(passt_dir.iterdir())):
        time.sleep(0.2)
    assert not _vhostnet_pids(passt_log), "vhostnet still runs after virsh destroy"
    assert not any(passt_dir.iterdir()), list(passt_dir.iterdir())
    return passt_args, qemu_log, vhostnet_log


def _port_taken(kind: int, address: str, port: int) -> bool:
    """Whether someone holds ``port`` (``kind``: SOCK_STREAM or SOCK_DGRAM) on ``address``."""
    with socket.socket(socket.AF_INET, kind) as probe:
        try:
            probe.bind((address, port))
        except OSError as error:
            if error.errno != errno.EADDRINUSE:
                raise
            return True
    return False


def _check_forwards() -> None:
    """vhostnet holds the ports of the domain's portForward elements, not the excluded one."""
    tcp, udp = socket.SOCK_STREAM, socket.SOCK_DGRAM
    held = {"tcp 20022": _port_taken(tcp, "127.0.0.1", 20022),
            "tcp 21000": _port_taken(tcp, "127.0.0.1", 21000),
            "tcp 21009": _port_taken(tcp, "127.0.0.1", 21009),
            "udp 20053": _port_taken(udp, "0.0.0.0", 20053)}
    assert all(held.values()), held
    assert not _port_taken(tcp, "127.0.0.1", 21005), "the excluded port 21005 is forwarded"


def _print_netdev(qemu_log: str, kind: str) -> None:
    """Finds and prints QEMU's -netdev of type ``kind`` (JSON or key=value, as libvirt writes
    it for that QEMU)."""
    netdev = re.search(rf"-netdev (?:'\{{[^']*\"type\":\"{kind}\"[^']*\}}'|{kind},\S*)",
                       qemu_log)
    assert netdev, f"no -netdev {kind} in QEMU's command line:\n{qemu_log[-3000:]}"
    print(f"QEMU: {netdev.group(0)}")


def test_libvirt_passt_stream(libvirt11: Libvirt11 | str, kit: Kit,
                              e2e_tmp: Path) -> None:
    """libvirt 11.3 and bookworm's QEMU 7.2: ``-netdev stream`` on vhostnet's socket."""
    libvirt = libvirt11 if isinstance(libvirt11, Libvirt11) else None
    if libvirt is None:
        print(f"libvirt 11.3 is unavailable ({libvirt11}): running the system's libvirt")
    with running_libvirtd(e2e_tmp / "libvirt", libvirt) as libvirtd:
        passt_args, qemu_log, vhostnet_log = _run_domain(libvirtd, kit, e2e_tmp, SYSTEM_QEMU,
                                                         STREAM_INTERFACE,
                                                         while_running=_check_forwards)
        assert "--vhost-user" not in passt_args
        for option in ("--interface", "--address", "--netmask", "--tcp-ports", "--udp-ports"):
            assert option in passt_args, option
        _print_netdev(qemu_log, "stream")
        assert "stream front-end (-netdev stream)" in vhostnet_log, vhostnet_log[-3000:]


@pytest.mark.slow
def test_libvirt_passt_vhost_user(libvirt11: Libvirt11 | str, kit: Kit,
                                  e2e_tmp: Path) -> None:
    """libvirt 11.3 (``<interface type='vhostuser'>``, libvirt >= 11.1) and QEMU 10.0."""
    if isinstance(libvirt11, str) or kit.qemu10 is None:
        reason = f"libvirt 11.3 is unavailable: {libvirt11}" if isinstance(libvirt11, str) \
            else f"QEMU 10.0 is unavailable: {kit.qemu10_reason}"
        print(reason)
        pytest.skip(reason)
    modules = e2e_tmp / "qemu-modules"
    modules.mkdir()
    for module in (*kit.qemu10.module_dir.glob("*.so"), *libvirt11.qemu10_modules.glob("*.so")):
        if not (modules / module.name).exists():
            (modules / module.name).symlink_to(module)
    emulator = e2e_tmp / "qemu-system-x86_64"
    emulator.write_text(EMULATOR_WRAPPER.format(
        module_dir=modules, binary=kit.qemu10.binary,
        data_dir_args=" ".join(kit.qemu10.data_dir_args())))
    emulator.chmod(0o755)
    with running_libvirtd(e2e_tmp / "libvirt", libvirt11) as libvirtd:
        passt_args, qemu_log, vhostnet_log = _run_domain(libvirtd, kit, e2e_tmp, emulator,
                                                         VHOST_USER_INTERFACE, SHARED_MEMORY)
        assert "--vhost-user" in passt_args
        _print_netdev(qemu_log, "vhost-user")
        assert "vhost-user front-end" in vhostnet_log, vhostnet_log[-3000:]
