"""libvirt starts vhostnet as it starts passt: Debian bookworm's libvirt 9.0 and QEMU 7.2.

A TCG domain with ``<interface type='user'><backend type='passt'/>`` is defined and
started with ``virsh``; libvirt runs the ``passt`` it finds first on its PATH (a
wrapper that runs vhostnet) with its own argument list, then QEMU with
``-netdev stream`` on vhostnet's socket. The guest takes its DHCP lease and downloads
20 MiB from a host HTTP server (sha256 checked); ``virsh destroy`` then leaves no
vhostnet process, socket or pid file.

libvirtd runs by hand, as root, without systemd or D-Bus, in a private mount
namespace (``unshare --mount``) where its state, log, cache and configuration
directories, /etc/passwd and /etc/group are bind mounts of this test's own files:
nothing of the machine's is changed. libvirt's QEMU driver needs its build-time user
(libvirt-qemu) to exist even when qemu.conf says root, hence the passwd copy.
Skipped, with the reason, only where libvirt or bookworm's QEMU is not installed.

Debian bookworm's libvirt 9.0.0 refuses the domain: "XML error: Invalid value for
attribute 'type' in element 'backend': 'passt'" (libvirt issue 462, Debian 12), so
there the test ends as an expected failure at ``virsh define``, with that message;
any other error fails it, and a libvirt that takes the XML runs it to the end.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.guestlib import GATEWAY, GUEST_ADDRESS, REPO_ROOT
from tests.e2e.hostservers import HttpFileServer, generated_bytes, sha256_hex
from tools.guestkit import KERNEL_COMMAND_LINE, Kit, script_archive
from tools.qemu import DEFAULT_MAC, SYSTEM_QEMU, parse_results

pytestmark = pytest.mark.e2e

DOWNLOAD_BYTES = 20 * 1024 * 1024
DOWNLOAD_SEED = 20260107
DOMAIN = "vhostnet-libvirt"
START_TIMEOUT = 30.0
GUEST_TIMEOUT = 600.0
GONE_TIMEOUT = 15.0
PASST_REJECTED = "Invalid value for attribute 'type' in element 'backend': 'passt'"

# Bind-mounted over the machine's directories inside libvirtd's mount namespace.
PRIVATE_DIRS = {"run": "/run/libvirt", "lib": "/var/lib/libvirt", "log": "/var/log/libvirt",
                "cache": "/var/cache/libvirt", "etc": "/etc/libvirt"}
QEMU_CONF = """user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
cgroup_controllers = [ ]
"""
LIBVIRTD_CONF = """unix_sock_dir = "{sock_dir}"
auth_unix_rw = "none"
log_outputs = "3:file:{log}"
"""
# libvirt runs "passt" from its PATH with a cleared environment: the wrapper finds vhostnet.
PASST_WRAPPER = """#!/bin/sh
cd {repo} && exec {python} -m vhostnet "$@"
"""
NAMESPACE_SCRIPT = """set -e
for name in {names}; do mkdir -p "$1/$name"; done
cp -a /etc/libvirt/. "$1/etc/"
cp "$2" "$1/etc/qemu.conf"; cp "$3" "$1/etc/libvirtd.conf"
mount --bind "$1/run" /run/libvirt
mount --bind "$1/lib" /var/lib/libvirt
mount --bind "$1/log" /var/log/libvirt
mount --bind "$1/cache" /var/cache/libvirt
mount --bind "$1/etc" /etc/libvirt
mount --bind "$4" /etc/passwd
mount --bind "$5" /etc/group
export PATH="$6:$PATH"
exec libvirtd -f /etc/libvirt/libvirtd.conf
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


def domain_xml(kit: Kit, initrd: Path, serial: Path, passt_log: Path) -> str:
    return f"""<domain type='qemu'>
  <name>{DOMAIN}</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kit.kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>{KERNEL_COMMAND_LINE}</cmdline>
  </os>
  <on_reboot>destroy</on_reboot>
  <devices>
    <emulator>{SYSTEM_QEMU}</emulator>
    <interface type='user'>
      <mac address='{DEFAULT_MAC}'/>
      <backend type='passt' logFile='{passt_log}'/>
      <model type='virtio'/>
    </interface>
    <serial type='file'>
      <source path='{serial}'/>
      <target port='0'/>
    </serial>
    <memballoon model='none'/>
  </devices>
</domain>
"""


def _missing() -> str | None:
    for tool in ("libvirtd", "virsh", "unshare"):
        if shutil.which(tool) is None and not Path("/usr/sbin", tool).exists():
            return f"{tool} is not installed (Debian: libvirt-daemon, libvirt-daemon-driver-qemu, " \
                   "libvirt-clients)"
    if not SYSTEM_QEMU.exists():
        return f"{SYSTEM_QEMU} is not installed (Debian: qemu-system-x86)"
    if os.geteuid() != 0:
        return "libvirtd's system instance needs root"
    return None


class Libvirtd:
    """libvirtd in its own mount namespace; ``virsh`` talks to it on a private socket."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.sock_dir = root / "sock"
        self.log = root / "libvirtd.log"
        self.bin = root / "bin"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"qemu:///system?socket={self.sock_dir}/libvirt-sock"

    def start(self) -> None:
        for path in (self.sock_dir, self.bin):
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
        if not re.search(r"^libvirt-qemu:", users, re.MULTILINE):
            users += "libvirt-qemu:x:64055:64055:libvirt:/var/lib/libvirt:/usr/sbin/nologin\n"
        if not re.search(r"^libvirt-qemu:", groups, re.MULTILINE):
            groups += "libvirt-qemu:x:64055:\n"
        passwd.write_text(users)
        group.write_text(groups)
        script = NAMESPACE_SCRIPT.format(names=" ".join(PRIVATE_DIRS))
        self.process = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "libvirtd",
             str(self.root / "ns"), str(qemu_conf), str(libvirtd_conf), str(passwd), str(group),
             str(self.bin)],
            stdout=open(self.root / "libvirtd.out", "wb"), stderr=subprocess.STDOUT,
            start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            if self.virsh("version", check=False).returncode == 0:
                return
            time.sleep(0.3)
        raise AssertionError(f"libvirtd did not come up: {self.diagnosis()}")

    def virsh(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(["virsh", "-c", self.uri, *args], capture_output=True,
                                text=True, timeout=120, check=False)
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


@pytest.fixture
def libvirtd(e2e_tmp: Path) -> Iterator[Libvirtd]:
    if reason := _missing():
        print(reason)
        pytest.skip(reason)
    daemon = Libvirtd(e2e_tmp / "libvirt")
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.stop()


def _vhostnet_pids() -> list[int]:
    """vhostnet processes libvirt started for this test's domain (its name is in the socket's)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ours = any(DOMAIN.encode() in arg for arg in argv)
        if b"vhostnet" in argv and ours and stat.rsplit(") ", 1)[1][0] != "Z":
            found.append(int(entry.name))
    return found


def _wait_for_result(serial: Path, name: str, timeout: float) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = serial.read_text(errors="replace") if serial.exists() else ""
        if name in parse_results(text):
            return parse_results(text)
        time.sleep(1)
    raise AssertionError(f"the guest printed no {name} within {timeout:.0f} s; console:\n"
                         + (serial.read_text(errors="replace")[-3000:] if serial.exists() else ""))


def test_libvirt_starts_vhostnet_as_passt(libvirtd: Libvirtd, kit: Kit, e2e_tmp: Path) -> None:
    data = generated_bytes(DOWNLOAD_BYTES, DOWNLOAD_SEED)
    serial = e2e_tmp / "serial.log"
    passt_log = e2e_tmp / "vhostnet.log"
    initrd = e2e_tmp / "initrd.cpio"
    with HttpFileServer("big.bin", data) as http:
        initrd.write_bytes(kit.initramfs.read_bytes() + script_archive(guest_script(http.port)))
        xml = e2e_tmp / "domain.xml"
        xml.write_text(domain_xml(kit, initrd, serial, passt_log))
        defined = libvirtd.virsh("define", str(xml), check=False)
        if defined.returncode != 0 and PASST_REJECTED in defined.stderr:
            # Debian bookworm's libvirt 9.0.0 (libvirt issue 462): it has the passt code but
            # its XML parser refuses the backend, so it never starts a passt.
            pytest.xfail(f"this libvirt cannot run a passt back-end: {defined.stderr.strip()}")
        assert defined.returncode == 0, defined.stderr + libvirtd.diagnosis()
        libvirtd.virsh("start", DOMAIN)
        passt_dir = libvirtd.state_dir("run") / "qemu" / "passt"
        sockets = list(passt_dir.glob("*.socket"))
        pid_files = list(passt_dir.glob("*.pid"))
        pids = _vhostnet_pids()
        results = _wait_for_result(serial, "done", GUEST_TIMEOUT)

    qemu_log = (libvirtd.state_dir("log") / "qemu" / f"{DOMAIN}.log").read_text(errors="replace")
    vhostnet_log = passt_log.read_text(errors="replace") if passt_log.exists() else ""
    assert len(sockets) == 1 and len(pid_files) == 1, (sockets, pid_files, vhostnet_log)
    assert len(pids) == 1, (pids, vhostnet_log)
    assert pid_files[0].read_text().strip() == str(pids[0])
    argv = (Path("/proc") / str(pids[0]) / "cmdline").read_bytes().decode().split("\0")
    print(f"\nlibvirt ran: passt {' '.join(argv[argv.index('vhostnet') + 1:])}")
    assert "--one-off" in argv and "--socket" in argv and str(sockets[0]) in argv
    netdev = re.search(r"-netdev (stream,\S*)", qemu_log)
    assert netdev and str(sockets[0]) in netdev.group(1), qemu_log[-3000:]
    print(f"QEMU: -netdev {netdev.group(1)}")
    assert results.get("dhcp_ip") == GUEST_ADDRESS, serial.read_text()[-3000:]
    assert results.get("route") == GATEWAY
    assert results.get("download_sha256") == sha256_hex(data), serial.read_text()[-3000:]
    assert "stream front-end (-netdev stream)" in vhostnet_log, vhostnet_log[-3000:]

    libvirtd.virsh("destroy", DOMAIN)
    deadline = time.monotonic() + GONE_TIMEOUT
    while time.monotonic() < deadline and (_vhostnet_pids() or any(passt_dir.iterdir())):
        time.sleep(0.2)
    assert not _vhostnet_pids(), "vhostnet still runs after virsh destroy"
    assert not any(passt_dir.iterdir()), list(passt_dir.iterdir())
