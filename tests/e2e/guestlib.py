"""Helpers for the end-to-end tests: the vhostnet process and guest-script snippets.

Guest script conventions (the script becomes /test.sh, run by the kit's /init
with `sh` after the virtio modules are loaded and `lo` is up):

* report results as lines `RESULT name=value` (one per line, no spaces around
  `=`); `GuestRun.results` / `QemuGuest.results()` parse them into a dict,
  a later line with the same name wins;
* the script's exit status appears as `VHOSTNET-TEST-EXIT rc=N`, then the guest
  powers off by itself, so a test waits for QEMU to exit;
* keep every command bounded (`ping -c`, `udhcpc -n -t`, `timeout 10 ...`).
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]

GUEST_MARKERS = ("VHOSTNET-TEST-BEGIN", "VHOSTNET-TEST-END")
SCRIPT_EXIT = re.compile(r"^VHOSTNET-TEST-EXIT rc=(\d+)", re.MULTILINE)

GUEST_ADDRESS = "10.0.2.15"
GATEWAY = "10.0.2.2"
DNS_SERVER = "10.0.2.3"


class VhostnetError(RuntimeError):
    """vhostnet did not come up, or died."""


class VhostnetProcess:
    """`python3 -m vhostnet --socket PATH ...` as a child process.

    stderr goes to `log_path`; `stop()` ends it with SIGTERM (then SIGKILL).
    `expected_exit` is set when the test itself ended the process, so the
    fixture can tell a crash from a deliberate kill.
    """

    def __init__(self, socket_path: Path, extra_args: tuple[str, ...], log_path: Path,
                 wrapper: tuple[str, ...] = ()) -> None:
        self.socket_path = Path(socket_path)
        self.extra_args = extra_args
        self.wrapper = wrapper  # e.g. setpriv ... --, to run vhostnet with fewer capabilities
        self.log_path = Path(log_path)
        self.process: subprocess.Popen[bytes] | None = None
        self.expected_exit = False

    def command(self) -> list[str]:
        return [*self.wrapper, sys.executable, "-m", "vhostnet", "-f", "--socket",
                str(self.socket_path), *self.extra_args]

    def start(self, timeout: float = 30.0) -> VhostnetProcess:
        """Start it and wait until the socket exists; raise VhostnetError otherwise."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                          env.get("PYTHONPATH")]))
        self.expected_exit = False
        with open(self.log_path, "ab") as log:
            log.write(f"=== {' '.join(self.command())}\n".encode())
            log.flush()
            self.process = subprocess.Popen(self.command(), cwd=REPO_ROOT, env=env,
                                            stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                            start_new_session=True)
        deadline = time.monotonic() + timeout
        while not self.socket_path.exists():
            if self.process.poll() is not None:
                raise VhostnetError(f"vhostnet exited with {self.process.returncode} before "
                                    f"creating {self.socket_path}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise VhostnetError(f"vhostnet did not create {self.socket_path} within "
                                    f"{timeout} s:\n{self.log_tail()}")
            time.sleep(0.05)
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def kill(self, sig: int = signal.SIGKILL, timeout: float = 10.0) -> int | None:
        """Send `sig` on purpose (a test simulating a crash) and wait for the exit."""
        if not self.running():
            return self.returncode()
        self.expected_exit = True
        assert self.process is not None
        self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(timeout=timeout)

    def stop(self, timeout: float = 10.0) -> int | None:
        """End it politely (SIGTERM), forcefully after `timeout`."""
        return self.kill(signal.SIGTERM, timeout)

    def remove_stale_socket(self) -> None:
        """After a kill the socket file stays behind; a new server needs the path."""
        self.socket_path.unlink(missing_ok=True)

    def restart(self, timeout: float = 30.0) -> VhostnetProcess:
        if self.running():
            raise VhostnetError("restart() called while vhostnet is still running")
        self.remove_stale_socket()
        return self.start(timeout)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


@dataclasses.dataclass
class GuestRun:
    """What a guest that ran to completion left behind."""

    results: dict[str, str]
    output: str
    qemu_exit_code: int
    script_exit_code: int | None

    def check_completed(self) -> None:
        """Fail loudly (with the console) if the guest did not run the script to the end."""
        missing = [marker for marker in GUEST_MARKERS if marker not in self.output]
        if missing or self.script_exit_code is None:
            raise AssertionError(f"guest did not complete (missing {missing or 'exit line'}):"
                                 f"\n{tail(self.output)}")


def script_exit_code(output: str) -> int | None:
    match = SCRIPT_EXIT.search(output)
    return int(match.group(1)) if match else None


def tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


def compile_guest_tool(source: Path, into: Path) -> bytes:
    """Compile a freestanding static guest helper (udpecho.c, dhcp6c.c); skip the test if
    there is no C compiler."""
    import shutil

    import pytest

    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        reason = f"no C compiler to build the guest's {source.stem} (gcc is needed for Cython too)"
        print(reason)
        pytest.skip(reason)
    binary = into / source.stem
    subprocess.run([compiler, "-Os", "-static", "-nostdlib", "-fno-stack-protector",
                    "-fno-builtin", "-fno-asynchronous-unwind-tables", "-fno-pie", "-no-pie",
                    "-Wl,--build-id=none", "-s", "-o", str(binary), str(source)],
                   check=True, capture_output=True, timeout=60)
    return binary.read_bytes()


def guest_binary(path: str, data: bytes) -> str:
    """A script snippet that writes ``data`` to ``path`` in the guest, executable."""
    import base64

    return (f"base64 -d > {path} <<'B64'\n{base64.encodebytes(data).decode()}B64\n"
            f"chmod +x {path}\n")


# --- guest shell snippets ----------------------------------------------------


def static_ipv4(address: str = f"{GUEST_ADDRESS}/24", gateway: str | None = GATEWAY,
                interface: str = "eth0") -> str:
    """Configure the interface by hand (no DHCP); prints RESULT link=up|missing."""
    lines = [
        f"if ip link show {interface} >/dev/null 2>&1; then echo RESULT link=up; "
        f"else echo RESULT link=missing; fi",
        f"ip addr add {address} dev {interface}",
        f"ip link set {interface} up",
    ]
    if gateway:
        lines.append(f"ip route add default via {gateway} dev {interface}")
    return "\n".join(lines) + "\n"


def ping_check(target: str, count: int = 3, name: str = "ping", extra: str = "-W 5") -> str:
    """Ping `target`; prints RESULT <name>=ok|fail and RESULT <name>_loss=<percent>."""
    out = f"/tmp/{name}.out"
    return (
        f"if ping -c {count} {extra} {target} > {out} 2>&1; then echo RESULT {name}=ok; "
        f"else echo RESULT {name}=fail; fi\n"
        f"cat {out}\n"
        f"echo \"RESULT {name}_loss=$(sed -n 's/.* \\([0-9]*\\)% packet loss.*/\\1/p' {out})\"\n"
    )


STOP_PING_LINE = "VHOSTNET-STOP-PING"


def ping_until_stopped(target: str, count: int, interval: float) -> str:
    """Ping `target` until the host types STOP_PING_LINE on the console
    (`QemuGuest.type_line`, the guest started with console_input=True) or `count` pings
    have gone out, whichever is first: the count stays the bound a slow host needs, the
    test stops waiting once it has seen what it checks. busybox ping ends on SIGINT as on
    its count, with its summary and status 0 if any reply came. Prints RESULT ping_rc and
    RESULT ping_done=yes."""
    return (
        f"ping -c {count} -i {interval} -W 2 {target} &\n"
        "ping_pid=$!\n"
        "(while read -r line; do\n"
        f"    [ \"$line\" = {STOP_PING_LINE} ] && kill -INT $ping_pid && break\n"
        "done) < /dev/console &\n"
        "reader_pid=$!\n"
        "wait $ping_pid\n"
        "echo \"RESULT ping_rc=$?\"\n"
        "kill $reader_pid 2>/dev/null\n"
        "echo RESULT ping_done=yes\n"
    )


PING_REPLY = r"^\d+ bytes from {target}: seq=(\d+)"


def ping_replies(output: str, target: str) -> list[int]:
    """Sequence numbers of the echo replies busybox ping printed."""
    pattern = re.compile(PING_REPLY.format(target=re.escape(target)), re.MULTILINE)
    return [int(seq) for seq in pattern.findall(output)]


def destination_diagnosis(destination: Any, control: Path | str) -> str:
    """What a migration destination looks like: QEMU's run state and vhostnet's counters
    (ring positions included), for the message of a test that found it silent."""
    from vhostnet.control import control_request

    lines = []
    try:
        lines.append(f"destination QEMU: {destination.qmp('query-status')}")
    except Exception as error:  # noqa: BLE001 (a diagnosis must not hide the failure)
        lines.append(f"destination QEMU did not answer query-status: {error!r}")
    try:
        counters = control_request(str(control), "stats")["counters"]
        lines.append(f"destination vhostnet counters: {counters}")
    except Exception as error:  # noqa: BLE001
        lines.append(f"destination vhostnet did not answer stats: {error!r}")
    return "\n".join(lines)
