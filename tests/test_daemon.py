"""vhostnet runs as passt runs, for the launchers that start it.

libvirt 11.1's and QEMU 10.1's argument lists (reference sections 1 and 2) run
verbatim: the command exits 0 once the socket (or the --fd 3 socketpair) is served
and the pid file names the daemon; --one-off ends it when the front-end leaves;
SIGTERM removes the socket and the pid file; a start-up error exits non-zero in
the launcher's process with one sentence.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.daemon import REPO, nobody_tmp_dir, run_cli
from vhostnet.daemon import SizedLogFile

GET_FEATURES = 1
VERSION_1 = 1 << 32


@pytest.fixture
def tmp_path():
    """Where the sockets and pid files go: a folder nobody, vhostnet's user, may clean up."""
    with nobody_tmp_dir() as path:
        yield path


def _launch(argv: list[str], **kwargs) -> subprocess.CompletedProcess[str]:
    """As libvirt and QEMU run passt: wait for the command itself to exit."""
    return subprocess.run([sys.executable, "-m", "vhostnet", *argv], cwd=REPO, text=True,
                          capture_output=True, timeout=30, check=False, **kwargs)


def _get_features(sock: socket.socket) -> int:
    """One vhost-user request, GET_FEATURES, as a front-end's first message."""
    sock.settimeout(10)
    sock.sendall(struct.pack("<III", GET_FEATURES, 1, 0))
    reply = b""
    while len(reply) < 20:
        chunk = sock.recv(20 - len(reply))
        assert chunk, "vhostnet closed the connection"
        reply += chunk
    request, _flags, size = struct.unpack_from("<III", reply)
    assert (request, size) == (GET_FEATURES, 8)
    return struct.unpack_from("<Q", reply, 12)[0]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (our grandchild was reparented, but in a netns init it may linger).
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            return handle.read().split(") ")[1][0] != "Z"
    except OSError:
        return False


def _wait_gone(pid: int, *paths: Path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while (_alive(pid) or any(p.exists() for p in paths)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pid), "vhostnet is still running"
    for path in paths:
        assert not path.exists(), f"{path} is left behind"


def _pid(path: Path) -> int:
    return int(path.read_text().strip())


@pytest.fixture
def reaped():
    """Daemons started by a test are ended by pid even when the test fails."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_libvirt_11_argv_runs_verbatim_and_one_off_ends_it(tmp_path: Path, reaped) -> None:
    sock, pid_file, log = tmp_path / "passt.sock", tmp_path / "passt.pid", tmp_path / "passt.log"
    argv = ["--vhost-user", "--one-off", "--socket", str(sock), "--pid", str(pid_file),
            "--mtu", "65520", "--interface", "lo", "--log-file", str(log), "--hostname", "guest",
            "--fqdn", "guest.example.org", "--address", "10.0.2.20", "--netmask", "24",
            "--address", "fd00::20", "--tcp-ports", "127.0.0.1%lo/18022:22",
            "--udp-ports", "15353:53"]
    result = _launch(argv)
    assert result.returncode == 0, result.stderr
    assert sock.exists() and pid_file.exists()
    pid = _pid(pid_file)
    reaped.append(pid)
    assert _alive(pid) and pid != os.getpid()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as front_end:
        front_end.connect(str(sock))
        assert _get_features(front_end) & VERSION_1
    # --one-off: the front-end went away, so does vhostnet, with its socket and pid file.
    _wait_gone(pid, sock, pid_file)
    assert "front-end went away" in log.read_text()


def test_libvirt_9_passes_the_guest_mac_and_sigterm_cleans_up(tmp_path: Path, reaped) -> None:
    sock, pid_file = tmp_path / "s", tmp_path / "pid"
    result = _launch(["--one-off", "--socket", str(sock), "--pid", str(pid_file),
                      "--mac-addr", "52:54:00:12:34:56"])
    assert result.returncode == 0, result.stderr
    pid = _pid(pid_file)
    reaped.append(pid)
    assert (sock.with_name("s.repair")).exists()
    os.kill(pid, signal.SIGTERM)
    _wait_gone(pid, sock, pid_file, sock.with_name("s.repair"))


def test_no_default_repair_socket_that_nobody_could_remove(tmp_path_factory, reaped) -> None:
    """libvirt's stream launch (no --vhost-user) as root in a folder of root's: vhostnet,
    about to run as nobody, could not remove SOCKET.repair at exit and libvirt removes only
    the socket and pid file, so there is none (passt makes none without --vhost-user);
    with --vhost-user it is made, as passt makes it. Not started as root, vhostnet stays
    who it is and can always remove it: then it is made either way."""
    for vhost_user, made in ((), os.geteuid() != 0), (("--vhost-user",), True):
        folder = tmp_path_factory.mktemp("root-only")
        os.chmod(folder, 0o700)
        sock, pid_file = folder / "s", folder / "pid"
        result = _launch(["--one-off", "--socket", str(sock), "--pid", str(pid_file),
                          *vhost_user])
        assert result.returncode == 0, result.stderr
        pid = _pid(pid_file)
        reaped.append(pid)
        assert sock.with_name("s.repair").exists() == made
        os.kill(pid, signal.SIGTERM)
        _wait_gone(pid)


def test_qemu_10_1_argv_serves_the_fd_3_socketpair(tmp_path: Path, reaped) -> None:
    pid_file = tmp_path / "passt.pid"
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    argv = ["--vhost-user", "--quiet", "--mtu", "65520", "--address", "10.0.2.15",
            "--netmask", "24", "--mac-addr", "9a:55:9a:55:9a:55", "--gateway", "10.0.2.2",
            "--interface", "lo", "--outbound", "127.0.0.1", "--dns", "10.0.2.3",
            "--fqdn", "vm.example.org", "--search", "example.org example.net",
            "--tcp-ports", "18080:80", "--udp-ports", "15353:53", "--map-host-loopback",
            "10.0.2.2", "--map-guest-addr", "10.0.2.9", "--dns-forward", "10.0.2.3",
            "--dns-host", "127.0.0.1", "--no-ndp", "--no-dhcpv6", "--no-ra", "--freebind",
            "--ipv4-only", "--pid", str(pid_file), "--fd", "3"]
    result = _launch(argv, pass_fds=(3, theirs.fileno()),
                     preexec_fn=lambda: os.dup2(theirs.fileno(), 3))
    theirs.close()
    assert result.returncode == 0, result.stderr
    pid = _pid(pid_file)
    reaped.append(pid)
    assert _get_features(ours) & VERSION_1
    ours.close()  # QEMU goes away: --fd implies --one-off
    _wait_gone(pid, pid_file)


def test_start_up_errors_exit_non_zero_in_the_launchers_process(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.write_text("keep")
    result = _launch(["--socket", str(plain), "--pid", str(tmp_path / "pid")])
    assert result.returncode == 2
    assert result.stderr.strip() == f"vhostnet: {plain} exists and is not a socket; refusing to replace it"
    assert not (tmp_path / "pid").exists()
    result = _launch(["--socket", str(tmp_path / "s"), "--pid", str(tmp_path / "no" / "pid")])
    assert result.returncode == 2 and "cannot write the pid file" in result.stderr
    assert not (tmp_path / "s").exists()
    result = run_cli("--fd", "99", "--pid", str(tmp_path / "pid"))
    assert result.returncode == 2 and result.stderr.strip() == "vhostnet: --fd 99 is not an open socket"


def test_port_in_use_is_a_start_up_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _launch(["--socket", str(tmp_path / "s"), "-t", f"127.0.0.1/{port}"])
    assert result.returncode == 2
    assert f"port {port}" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "s").exists()


def test_all_skips_ports_in_use_and_binds_within_the_fd_limit(tmp_path: Path, reaped) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 1000))
        taken.listen()
        pid_file = tmp_path / "pid"
        result = _launch(["--socket", str(tmp_path / "s"), "--pid", str(pid_file), "-t",
                          "127.0.0.1/all", "-l", str(tmp_path / "log")])
        assert result.returncode == 0, result.stderr
        pid = _pid(pid_file)
        reaped.append(pid)
        listening = set()
        for name in ("/proc/net/tcp",):
            with open(name, encoding="ascii") as handle:
                for line in handle.readlines()[1:]:
                    fields = line.split()
                    if fields[3] == "0A":  # LISTEN
                        listening.add(int(fields[1].split(":")[1], 16))
        assert {1, 999, 1001} <= listening and 32768 not in listening  # ephemeral stays free
        if "ulimit -Hn" in (tmp_path / "log").read_text():  # the fd limit holds fewer
            assert len(listening) < 32767 - 1
        else:
            assert 32767 in listening
        os.kill(pid, signal.SIGTERM)
        _wait_gone(pid, pid_file, timeout=30)


def test_log_file_stays_within_its_size_dropping_the_oldest(tmp_path: Path) -> None:
    import logging

    handler = SizedLogFile(str(tmp_path / "log"), 4096)
    handler.setFormatter(logging.Formatter("%(message)s"))
    for number in range(1000):
        handler.emit(logging.LogRecord("t", logging.INFO, "", 0, f"line {number:04d}", None, None))
        assert (tmp_path / "log").stat().st_size <= 4096
    handler.close()
    lines = (tmp_path / "log").read_text().splitlines()
    assert lines[-1] == "line 0999" and lines[0].startswith("line ")
    assert len(lines) > 4096 * 0.6 / 10
