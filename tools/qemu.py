"""Start a test guest in QEMU (7.2 from the system, or the kit's 10.0) and watch it.

`QemuGuest` builds the command line (TCG, memfd-backed shared memory for
vhost-user, the kit's kernel and initramfs with the test script appended),
captures the serial console to a file and offers bounded waits on it. A tiny
blocking QMP client is included for tests that drive QEMU (migration).

Every wait has a timeout; `kill()` (and leaving the context manager) always
ends QEMU.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from tools.guestkit import KERNEL_COMMAND_LINE, Kit, script_archive

SYSTEM_QEMU = Path("/usr/bin/qemu-system-x86_64")
DEFAULT_MAC = "52:54:00:12:34:56"
VERSIONS = ("7.2", "10.0")

RESULT_LINE = re.compile(r"^RESULT ([A-Za-z0-9_.-]+)=(.*?)\s*$", re.MULTILINE)
POLL_INTERVAL = 0.1


class GuestError(RuntimeError):
    """QEMU exited, or a wait ran out of time; the message ends with the log tail."""


class QmpError(RuntimeError):
    """QMP answered with an error, or the QMP socket misbehaved."""


class QmpClient:
    """Blocking QMP over a UNIX socket: greeting, qmp_capabilities, then commands.

    Asynchronous events that arrive while waiting for a reply are kept in
    `events` in order.
    """

    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        self.events: list[dict] = []
        self._timeout = timeout
        self._buffer = b""
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._sock.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    self._sock.close()
                    raise QmpError(f"no QMP socket at {path} after {timeout} s") from None
                time.sleep(POLL_INTERVAL)
        greeting = self._read_message()
        if "QMP" not in greeting:
            raise QmpError(f"unexpected QMP greeting: {greeting}")
        self.execute("qmp_capabilities")

    def _read_message(self) -> dict:
        while b"\n" not in self._buffer:
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                raise QmpError(f"QMP: no answer within {self._timeout} s") from None
            if not chunk:
                raise QmpError("QMP socket closed by QEMU")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        try:
            return json.loads(line)
        except ValueError:
            raise QmpError(f"QMP sent something that is not JSON: {line[:200]!r}") from None

    def execute(self, command: str, **arguments: object) -> object:
        """Run one command and return its "return" value; raise QmpError on "error"."""
        request: dict[str, object] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        self._sock.sendall(json.dumps(request).encode() + b"\n")
        while True:
            message = self._read_message()
            if "event" in message:
                self.events.append(message)
            elif "error" in message:
                error = message["error"]
                raise QmpError(f"{command}: {error.get('class')}: {error.get('desc')}")
            elif "return" in message:
                return message["return"]

    def close(self) -> None:
        self._sock.close()


class QemuGuest:
    """One QEMU process running the kit's kernel with a test script.

    socket_path: the vhost-user socket (QEMU is the client); None means no
    network device at all (use extra_args to add another one).
    boot_args: replaces `-kernel/-initrd/-append` (e.g. `("-boot", "n")` for PXE).
    nic_options: appended to the virtio-net-pci device (e.g. `romfile=...` for PXE).
    stream: QEMU's `-netdev stream` on socket_path (as libvirt 9.0 to 11.0 starts passt)
    instead of vhost-user; nic_model: the guest's NIC (any model works with stream).
    packed: the vhost-user NIC offers packed virtqueues (`packed=on`; the guest then uses them
    if the back-end offers VIRTIO_F_RING_PACKED too).
    queues: vhost-user queue pairs (`queues=N` on the netdev, `mq=on,vectors=2N+2` on the
    NIC, as many vCPUs as pairs: Linux enables one pair per online CPU).
    console_input: QEMU's stdin (the serial console's input) is a pipe `type_line` writes
    to, instead of /dev/null: how a test tells the guest's script it has seen enough.
    """

    def __init__(
        self,
        kit: Kit,
        version: str = "7.2",
        socket_path: Path | str | None = None,
        script: str | None = None,
        memory_mb: int = 256,
        extra_args: Sequence[str] = (),
        reconnect: bool = True,
        serial_log: Path | str | None = None,
        qmp_path: Path | str | None = None,
        boot_args: Sequence[str] | None = None,
        mac: str = DEFAULT_MAC,
        append: str = "",
        nic_options: str = "",
        stream: bool = False,
        nic_model: str = "virtio-net-pci",
        packed: bool = False,
        queues: int = 1,
        console_input: bool = False,
    ) -> None:
        if version not in VERSIONS:
            raise ValueError(f"QEMU version must be one of {VERSIONS}, not {version!r}")
        if version == "10.0" and kit.qemu10 is None:
            raise GuestError(f"QEMU 10.0 is unavailable: {kit.qemu10_reason}")
        self.kit = kit
        self.version = version
        self.socket_path = Path(socket_path) if socket_path is not None else None
        self.script = script
        self.memory_mb = memory_mb
        self.extra_args = tuple(extra_args)
        self.reconnect = reconnect
        self.qmp_path = Path(qmp_path) if qmp_path is not None else None
        self.boot_args = tuple(boot_args) if boot_args is not None else None
        self.mac = mac
        self.append = append
        self.nic_options = nic_options
        self.stream = stream
        self.nic_model = nic_model
        self.packed = packed
        self.queues = queues
        self.console_input = console_input
        self._workdir = Path(tempfile.mkdtemp(prefix="vhostnet-guest-"))
        self.serial_log = Path(serial_log) if serial_log else self._workdir / "serial.log"
        self.qemu_log = self.serial_log.with_name(self.serial_log.name + ".qemu-stderr")
        self.process: subprocess.Popen[bytes] | None = None
        self._qmp: QmpClient | None = None

    # --- command line --------------------------------------------------------

    def _initrd(self) -> Path:
        """The base initramfs, followed by the test script's archive if any."""
        if self.script is None:
            return self.kit.initramfs
        combined = self._workdir / "initrd.cpio"
        combined.write_bytes(self.kit.initramfs.read_bytes() + script_archive(self.script))
        return combined

    def command(self) -> list[str]:
        memory = f"{self.memory_mb}M"
        args: list[str] = []
        if self.version == "10.0":
            assert self.kit.qemu10 is not None
            args += [str(self.kit.qemu10.binary), *self.kit.qemu10.data_dir_args(),
                     "-audio", "none"]
        else:
            args.append(str(SYSTEM_QEMU))
        args += [
            "-accel", "tcg", "-m", memory, "-smp", str(self.queues),
            # vhost-user needs guest RAM in a shareable file (memfd) the back-end maps.
            "-object", f"memory-backend-memfd,id=mem,size={memory},share=on",
            "-numa", "node,memdev=mem",
            # -nodefaults: no default NIC, VGA or monitor we did not ask for.
            "-nodefaults", "-display", "none", "-serial", "stdio", "-no-reboot",
        ]
        if self.socket_path is not None and self.stream:
            args += ["-netdev", self._stream_netdev(),
                     "-device", f"{self.nic_model},netdev=n0,mac={self.mac}"
                     + (f",{self.nic_options}" if self.nic_options else "")]
        elif self.socket_path is not None:
            chardev = f"socket,id=c0,path={self.socket_path}"
            if self.reconnect:
                chardev += ",reconnect=1" if self.version == "7.2" else ",reconnect-ms=1000"
            device = f"virtio-net-pci,netdev=n0,mac={self.mac}"
            if self.version == "7.2":
                # 7.2 under TCG crashes with vhost-user and MSI-X: use INTx.
                device += ",vectors=0"
            if self.packed:
                device += ",packed=on"
            netdev = "vhost-user,id=n0,chardev=c0"
            if self.queues > 1:
                netdev += f",queues={self.queues}"
                # An MSI-X vector per ring plus config and control (7.2 keeps INTx).
                device += ",mq=on" + (f",vectors={2 * self.queues + 2}"
                                      if self.version != "7.2" else "")
            if self.nic_options:
                device += f",{self.nic_options}"
            args += ["-chardev", chardev, "-netdev", netdev, "-device", device]
        if self.qmp_path is not None:
            args += ["-qmp", f"unix:{self.qmp_path},server=on,wait=off"]
        if self.boot_args is not None:
            args += list(self.boot_args)
        else:
            cmdline = KERNEL_COMMAND_LINE + (f" {self.append}" if self.append else "")
            args += ["-kernel", str(self.kit.kernel), "-initrd", str(self._initrd()),
                     "-append", cmdline]
        args += list(self.extra_args)
        return args

    def _stream_netdev(self) -> str:
        """libvirt's `-netdev stream` for passt; 7.2 has no reconnect option (8.0 added it)."""
        netdev = f"stream,id=n0,addr.type=unix,addr.path={self.socket_path},server=off"
        if self.reconnect and self.version != "7.2":
            netdev += ",reconnect-ms=1000"
        return netdev

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.version == "10.0" and self.kit.qemu10 is not None:
            env.update(self.kit.qemu10.environment())
        return env

    # --- life cycle ----------------------------------------------------------

    def start(self) -> QemuGuest:
        if self.process is not None:
            raise GuestError("this guest was already started")
        command = self.command()
        self.serial_log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.serial_log, "wb") as serial, open(self.qemu_log, "wb") as stderr:
            stderr.write((" ".join(command) + "\n").encode())
            stderr.flush()
            self.process = subprocess.Popen(
                command, stdin=subprocess.PIPE if self.console_input else subprocess.DEVNULL,
                stdout=serial, stderr=stderr,
                env=self.environment(), start_new_session=True)
        return self

    def __enter__(self) -> QemuGuest:
        if self.process is None:
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.kill()

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """End QEMU (politely first) and close QMP and the console input; safe to call
        twice."""
        if self._qmp is not None:
            self._qmp.close()
            self._qmp = None
        if self.process is not None and self.process.stdin is not None:
            self.process.stdin.close()
        # The combined initrd is a few MiB per guest; the logs stay for reading.
        (self._workdir / "initrd.cpio").unlink(missing_ok=True)
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)

    def wait_exit(self, timeout: float) -> int:
        """Wait for QEMU to exit by itself (the guest powers off); return its exit code."""
        if self.process is None:
            raise GuestError("the guest was never started")
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise GuestError(f"QEMU still running after {timeout} s\n{self.log_tail()}") from None

    def type_line(self, line: str) -> None:
        """Send `line` and a newline to the guest's serial console (console_input=True)."""
        if self.process is None or self.process.stdin is None:
            raise GuestError("this guest was started without console_input")
        try:
            self.process.stdin.write(line.encode() + b"\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            raise GuestError(f"QEMU exited before {line!r} was typed\n{self.log_tail()}") from None

    # --- reading the console -------------------------------------------------

    def output(self) -> str:
        """Everything the guest printed so far (serial line endings normalised)."""
        try:
            data = self.serial_log.read_bytes()
        except FileNotFoundError:
            return ""
        return data.decode("utf-8", "replace").replace("\r\n", "\n").replace("\r", "")

    def qemu_stderr(self) -> str:
        try:
            return self.qemu_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        serial = "\n".join(self.output().splitlines()[-lines:])
        stderr = "\n".join(self.qemu_stderr().splitlines()[-lines:])
        return f"--- serial (last {lines} lines) ---\n{serial}\n--- QEMU stderr ---\n{stderr}"

    def wait_for(self, pattern: str | re.Pattern[str], timeout: float,
                 start: int = 0) -> re.Match[str]:
        """Wait until the console matches `pattern` (searched from offset `start`).

        Raises GuestError if QEMU exits first or the time runs out.
        """
        regex = re.compile(pattern, re.MULTILINE) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            exited = not self.running()  # read before the output, so no line is missed
            match = regex.search(self.output(), start)
            if match:
                return match
            if exited:
                raise GuestError(f"QEMU exited (code {self._exit_code()}) before "
                                 f"{regex.pattern!r} appeared\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise GuestError(f"{regex.pattern!r} did not appear within {timeout} s\n"
                                 f"{self.log_tail()}")
            time.sleep(POLL_INTERVAL)

    def _exit_code(self) -> int | None:
        return self.process.poll() if self.process is not None else None

    def results(self) -> dict[str, str]:
        """The `RESULT name=value` lines printed so far (a later line wins)."""
        return parse_results(self.output())

    # --- QMP -----------------------------------------------------------------

    def qmp(self, command: str, **arguments: object) -> object:
        if self.qmp_path is None:
            raise QmpError("this guest was started without qmp_path")
        if self._qmp is None:
            self._qmp = QmpClient(self.qmp_path)
        return self._qmp.execute(command, **arguments)


def parse_results(text: str) -> dict[str, str]:
    return {name: value for name, value in RESULT_LINE.findall(text.replace("\r", ""))}
