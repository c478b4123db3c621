"""Run-time control of a running vhostnet with a real guest: ``vhostnet ctl add tcp`` forwards
a host port to the guest's listener while both run, a host client gets the guest's answer
through it, ``vhostnet ctl remove`` closes it and the host port binds again."""

from __future__ import annotations

import socket
import time

import pytest

from tests.e2e.guestlib import static_ipv4
from tests.e2e.hostservers import LOOPBACK, free_port
from tests.support.daemon import run_cli

pytestmark = pytest.mark.e2e

GUEST_PORT = 8081
ANSWER = b"hello from the guest"
CONNECT_ATTEMPTS = 20

GUEST_SCRIPT = static_ipv4() + f"""
echo '{ANSWER.decode()}' | timeout 150 nc -l -p {GUEST_PORT} > /tmp/got &
nc_pid=$!
sleep 1
echo LISTENER-READY
wait $nc_pid
echo "RESULT nc_rc=$?"
echo "RESULT got=$(cat /tmp/got)"
"""


def ctl(control: str, *args: str) -> str:
    result = run_cli("ctl", control, *args)
    assert result.returncode == 0, result.stderr
    return result.stdout


def ask_guest(port: int) -> bytes:
    """Connect to the forwarded port, say hello, read the guest's answer to EOF; a reset
    (the guest's nc not accepting yet) is tried again, a bounded number of times."""
    for _ in range(CONNECT_ATTEMPTS):
        try:
            with socket.create_connection((LOOPBACK, port), timeout=30) as sock:
                sock.settimeout(30)
                sock.sendall(b"hello from the host\n")
                chunks = []
                while chunk := sock.recv(4096):
                    chunks.append(chunk)
                if chunks:
                    return b"".join(chunks)
        except ConnectionError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"no answer through port {port}")


def port_binds(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOOPBACK, port))
            sock.listen()
        except OSError:
            return False
        return True


@pytest.mark.parametrize("qemu_version", ["10.0"], indirect=True)
def test_a_forward_added_and_removed_while_the_guest_runs(vhostnet, guest, qemu_version,
                                                          e2e_tmp):
    control = str(e2e_tmp / "control.sock")
    host_port = free_port()
    server = vhostnet("--control", control)
    machine = guest(qemu_version, GUEST_SCRIPT, socket_path=server.socket_path)
    machine.wait_for("LISTENER-READY", timeout=300)
    assert ctl(control, "list") == "no forwarded ports\n"

    added = ctl(control, "add", "tcp", f"{host_port}:{GUEST_PORT}")
    row = added.splitlines()[1].split()
    assert row == ["tcp", "*", str(host_port), "guest", str(GUEST_PORT), "run", "time",
                   "listening"]
    assert not port_binds(host_port)
    assert ask_guest(host_port) == ANSWER + b"\n"

    assert ctl(control, "list") == added
    assert ctl(control, "remove", "tcp", f"{host_port}:{GUEST_PORT}") == "no forwarded ports\n"
    assert port_binds(host_port)
    machine.wait_exit(timeout=120)
    results = machine.results()
    assert results["nc_rc"] == "0" and results["got"] == "hello from the host"
