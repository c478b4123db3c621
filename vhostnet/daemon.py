"""Running as passt runs: fork into the background once ready, pid file, log file.

Launchers (libvirt, QEMU's ``-netdev passt``) run the command and wait for it to
exit 0; by then the socket must listen and the pid file must name the process
that serves it. So the process forks early, before any event loop, and the
parent waits on a pipe: the child writes one byte once it is ready, or exits
(having printed its one sentence on the shared stderr) if it cannot start. The
parent exits 0 on that byte, or with the child's status otherwise.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys

LOG_FORMAT = "vhostnet: %(levelname)s %(name)s: %(message)s"
# Share of a full log file dropped from its start to make room (passt cuts 30%).
LOG_CUT_RATIO = 0.3
SYSLOG_SOCKET = "/dev/log"
READY = b"R"


class Daemon:
    """Forks at once; ``ready()`` in the child lets the parent exit 0."""

    def __init__(self) -> None:
        self._ready_fd: int | None = None
        self._null: int | None = None

    def fork(self) -> None:
        """Return in the child (a new session); the parent never returns from here."""
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid:
            os.close(write_end)
            with os.fdopen(read_end, "rb") as pipe:
                signal = pipe.read(1)
            if signal == READY:
                os._exit(0)
            _, status = os.waitpid(pid, 0)
            code = os.waitstatus_to_exitcode(status)
            os._exit(code if code > 0 else 1)
        os.close(read_end)
        os.setsid()
        self._ready_fd = write_end
        # Opened now: by ready() time the seccomp filter allows no opening for writing.
        self._null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)

    def ready(self) -> None:
        """The socket listens and the pid file is written: release the parent, and
        leave the terminal (stdin, stdout and stderr go to /dev/null)."""
        if self._ready_fd is None:
            return
        os.write(self._ready_fd, READY)
        os.close(self._ready_fd)
        self._ready_fd = None
        assert self._null is not None
        sys.stdout.flush()
        sys.stderr.flush()
        for fd in (0, 1, 2):
            os.dup2(self._null, fd)
        os.close(self._null)
        self._null = None


class PidFile:
    """``-P FILE``: created before the parent exits, removed when vhostnet stops."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        with open(self.path, "w", encoding="ascii") as handle:
            handle.write(f"{os.getpid()}\n")

    def remove(self) -> None:
        try:
            os.unlink(self.path)
        except OSError:
            pass


class SizedLogFile(logging.Handler):
    """``-l PATH`` with ``--log-size``: the file never grows past ``limit`` bytes.

    As passt does, the file is truncated at start, and when a line would not fit,
    the oldest ``LOG_CUT_RATIO`` of the file (up to a line end) is dropped.
    """

    def __init__(self, path: str, limit: int) -> None:
        super().__init__()
        self.limit = limit
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        self.file = os.fdopen(fd, "r+b", buffering=0)
        self.size = 0

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = (self.format(record) + "\n").encode("utf-8", "replace")[: self.limit // 2]
            if self.size + len(line) > self.limit:
                self._cut()
            self.file.write(line)
            self.size += len(line)
        except Exception:  # logging must never stop vhostnet
            self.handleError(record)

    def _cut(self) -> None:
        self.file.seek(0)
        content = self.file.read()
        start = content.find(b"\n", int(len(content) * LOG_CUT_RATIO)) + 1
        kept = content[start:] if start > 0 else b""
        self.file.seek(0)
        self.file.truncate()
        self.file.write(kept)
        self.size = len(kept)

    def close(self) -> None:
        self.file.close()
        super().close()


def set_up_logging(level: int, foreground: bool, log_file: str | None, log_size: int) -> None:
    """stderr in the foreground; else the log file, or syslog (as passt) when there is one.
    A log file is written in the foreground too."""
    handlers: list[logging.Handler] = []
    if foreground:
        handlers.append(logging.StreamHandler(sys.stderr))
    if log_file is not None:
        sized = SizedLogFile(log_file, log_size)
        sized.setFormatter(logging.Formatter("%(asctime)s " + LOG_FORMAT))
        handlers.append(sized)
    elif not foreground and os.path.exists(SYSLOG_SOCKET):
        try:
            handlers.append(logging.handlers.SysLogHandler(SYSLOG_SOCKET))
        except OSError:
            pass
    root = logging.getLogger()
    for handler in handlers:
        if handler.formatter is None:
            handler.setFormatter(logging.Formatter(LOG_FORMAT))
        root.addHandler(handler)
    root.setLevel(level)


def start_error_handler() -> logging.Handler:
    """Until the daemon is ready, errors also go to stderr (the launcher sees them)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.ERROR)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logging.getLogger().addHandler(handler)
    return handler
