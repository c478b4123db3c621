"""Least privilege (issue 15, item 4): root dropped, no capability, seccomp, no core dump.

These tests run as root (``make test``'s namespace root), as vhostnet is started by a
launcher that is root: vhostnet must come out as ``nobody`` with nothing left.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from testkit.frontend import Frontend
from tests.support.daemon import REPO, VhostnetProcess, gateway_mac
from vhostnet import sandbox

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to be dropped from")

NOBODY = 65534
CAP_NET_ADMIN_ONLY = f"{1 << sandbox.CAP_NET_ADMIN:016x}"

# Run in a child: the whole sandbox, then what is still possible.
SANDBOXED_CHILD = r"""
import errno, json, os, socket, sys
from vhostnet import sandbox

def attempt(call):
    try:
        result = call()
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    if isinstance(result, int) and result == 0:  # the forked child
        os._exit(0)
    return "allowed"

sandbox.harden_early()
sandbox.drop_privileges(sandbox.user_to_run_as(None))
dumpable = sandbox.dumpable()
allowed = sandbox.install_seccomp()
status = sandbox.status()
print(json.dumps({
    "allowed": allowed, "dumpable": dumpable,
    "status": {key: status[key] for key in ("Uid", "Gid", "Groups", "CapEff", "CapPrm",
                                            "CapBnd", "CapAmb", "NoNewPrivs", "Seccomp",
                                            "Umask")},
    "fork": attempt(os.fork),
    "exec": attempt(lambda: os.execv("/bin/true", ["true"])),
    "open_write": attempt(lambda: open(sys.argv[1] + "/written", "w")),
    "open_create": attempt(lambda: os.open(sys.argv[1] + "/created", os.O_RDONLY | os.O_CREAT)),
    "packet_socket": attempt(lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW)),
    "netlink_socket": attempt(lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW)),
    "udp_socket": attempt(lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).close()),
    "read_file": attempt(lambda: open("/etc/passwd").read(1)),
    "mkdir": attempt(lambda: os.mkdir(sys.argv[1] + "/dir")),
    "chmod": attempt(lambda: os.chmod(sys.argv[1], 0o777)),
    "io_uring": attempt(_io_uring),
    "clone_newuser": attempt(_clone_newuser),
    "unshare": attempt(_unshare_newuser),
}), flush=True)
"""

IO_URING_PROBE = r"""
import ctypes
def _io_uring():
    libc = ctypes.CDLL(None, use_errno=True)
    params = ctypes.create_string_buffer(120)
    if libc.syscall(425, 8, params) < 0:  # io_uring_setup
        raise OSError(ctypes.get_errno(), "io_uring_setup")
    return "allowed"

def _unshare_newuser():
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(0x10000000) < 0:  # CLONE_NEWUSER
        raise OSError(ctypes.get_errno(), "unshare")
    return "allowed"

def _clone_newuser():
    libc = ctypes.CDLL(None, use_errno=True)
    pid = libc.syscall(56, 0x10000000 | 17, 0, 0, 0, 0)  # clone(CLONE_NEWUSER | SIGCHLD)
    if pid == 0:
        libc._exit(0)
    if pid < 0:
        raise OSError(ctypes.get_errno(), "clone")
    return "allowed"
"""


def run_sandboxed_child(tmp_path: Path) -> dict:
    tmp_path.chmod(0o777)  # nobody may try (and must fail) to write here
    script = IO_URING_PROBE + SANDBOXED_CHILD
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=REPO,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_the_sandboxed_process_is_nobody_with_nothing_left(tmp_path: Path) -> None:
    report = run_sandboxed_child(tmp_path)
    status = report["status"]
    assert status["Uid"].split() == [str(NOBODY)] * 4
    assert status["Gid"].split() == [str(NOBODY)] * 4
    assert status["Groups"].strip() == ""
    for field in ("CapEff", "CapPrm", "CapBnd", "CapAmb"):
        assert int(status[field], 16) == 0, (field, status[field])
    assert status["NoNewPrivs"] == "1"
    assert status["Seccomp"] == "2"
    assert report["dumpable"] == 0
    assert status["Umask"] == "0077"
    assert report["allowed"] > 50


def test_the_filter_refuses_what_vhostnet_never_does(tmp_path: Path) -> None:
    report = run_sandboxed_child(tmp_path)
    for call in ("exec", "open_write", "open_create", "packet_socket",
                 "netlink_socket", "mkdir", "chmod", "clone_newuser", "unshare"):
        assert report[call] == "EPERM", (call, report[call])
    assert report["io_uring"] in ("ENOSYS", "EPERM")  # io_uring would bypass the filter
    # ... and allows what it does.
    assert report["udp_socket"] == "allowed"
    assert report["fork"] == "allowed"  # the --state-file catcher keeper
    assert report["read_file"] == "allowed"
    assert not (tmp_path / "written").exists() and not (tmp_path / "created").exists()


def _proc_status(pid: int) -> dict[str, str]:
    return sandbox.status(pid)


def test_vhostnet_started_as_root_serves_as_nobody_under_the_filter(tmp_path: Path) -> None:
    server = VhostnetProcess(tmp_path)
    try:
        status = _proc_status(server.process.pid)
        assert status["Uid"].split()[0] == str(NOBODY)
        assert int(status["CapEff"], 16) == 0 and int(status["CapBnd"], 16) == 0
        assert status["NoNewPrivs"] == "1" and status["Seccomp"] == "2"
        # Not dumpable: /proc/PID/status belongs to root although the process is nobody's.
        assert os.stat(f"/proc/{server.process.pid}/status").st_uid == 0
        limits = Path(f"/proc/{server.process.pid}/limits").read_text()
        core = next(line for line in limits.splitlines() if line.startswith("Max core file size"))
        assert core.split()[4:6] == ["0", "0"], core
        fds = [os.readlink(f"/proc/{server.process.pid}/fd/{fd}")
               for fd in os.listdir(f"/proc/{server.process.pid}/fd")]
        assert os.readlink(f"/proc/{server.process.pid}/fd/0") == "/dev/null"
        assert "anon_inode:[io_uring]" not in fds  # refused before the event loop made one
        # Still serving: a front-end gets ARP answered, the control socket answers.
        with Frontend(server.socket_path) as frontend:
            frontend.connect()
            frontend.start()
            assert len(gateway_mac(frontend)) == 6
        assert server.stats()["arp.rx"] >= 1
    finally:
        assert server.stop() in (0, -15)
    log = server.log_path.read_text()
    assert f"running as uid {NOBODY} gid {NOBODY}" in log
    assert "seccomp filter:" in log and "Operation not permitted" not in log


def test_runas_and_keep_cap_net_admin(tmp_path: Path) -> None:
    server = VhostnetProcess(tmp_path, "--runas", "4321:4322", "--keep-cap-net-admin")
    try:
        status = _proc_status(server.process.pid)
        assert status["Uid"].split()[0] == "4321" and status["Gid"].split()[0] == "4322"
        assert status["CapEff"] == CAP_NET_ADMIN_ONLY
        assert status["CapPrm"] == CAP_NET_ADMIN_ONLY
        assert status["CapBnd"] == CAP_NET_ADMIN_ONLY
        assert int(status["CapInh"], 16) == 0
    finally:
        assert server.stop() in (0, -15)
    assert "TCP_REPAIR available (CAP_NET_ADMIN)" in server.log_path.read_text()


def test_ping_group_range_decides_whether_icmp_echo_can_leave(tmp_path: Path) -> None:
    sysctl = tmp_path / "ping_group_range"
    sysctl.write_text("1\t0\n")  # the kernel's default: nobody
    assert not sandbox.ping_sockets_allowed(NOBODY, str(sysctl))
    sysctl.write_text("0\t2147483647\n")
    assert sandbox.ping_sockets_allowed(NOBODY, str(sysctl))
    assert not sandbox.ping_sockets_allowed(NOBODY, str(tmp_path / "missing"))


def test_an_unknown_runas_user_is_one_sentence(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "vhostnet", "-f", "--socket",
                             str(tmp_path / "s"), "--runas", "no-such-user"], cwd=REPO,
                            capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == "vhostnet: --runas: there is no user 'no-such-user'"


TFTP_AFTER_DROP = r"""
import json, os, sys
from vhostnet import sandbox
from vhostnet.hostio.tftp_files import TftpRoot
from vhostnet.wire.tftp import TftpError

files = TftpRoot(sys.argv[1])  # at start, as root
sandbox.drop_privileges(sandbox.user_to_run_as(None))
sandbox.install_seccomp()
report = {}
for name in ("boot.bin", "cfg/up", "../secret", "cfg/escape"):
    try:
        handle = files.open(name)
        report[name] = files.read(handle, 0, 100).decode()
        files.close(handle)
    except TftpError as exc:
        report[name] = exc.code.name
try:
    open(os.path.join(sys.argv[1], "boot.bin")).close()
    report["by_path"] = "allowed"
except OSError as exc:
    report["by_path"] = exc.strerror
print(json.dumps(report))
"""


def test_a_tftp_root_below_a_folder_only_root_reaches_serves_after_the_drop(
        tmp_path: Path) -> None:
    """The folders above the TFTP root need not be reachable by nobody: the root is opened
    once at start and every name is walked from that descriptor."""
    hidden = tmp_path / "root-only"
    root = hidden / "tftp"
    (root / "cfg").mkdir(parents=True, mode=0o755)
    hidden.chmod(0o700)
    root.chmod(0o755)
    (root / "cfg").chmod(0o755)
    (root / "boot.bin").write_text("boot image")
    (root / "boot.bin").chmod(0o644)
    (hidden / "secret").write_text("secret")
    (root / "cfg" / "up").symlink_to("../boot.bin")  # '..' inside the root: followed
    (root / "cfg" / "escape").symlink_to("../../secret")
    result = subprocess.run([sys.executable, "-c", TFTP_AFTER_DROP, str(root)], cwd=REPO,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["boot.bin"] == "boot image" and report["cfg/up"] == "boot image"
    assert report["../secret"] == report["cfg/escape"] == "ACCESS_VIOLATION"
    assert report["by_path"] == "Permission denied"  # what an open by path would meet
