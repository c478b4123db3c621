"""Read-only access to the TFTP root directory: the file side of the TFTP server.

The sans-IO ``TftpServer`` asks this object for files by the name the guest
sent. All the security rules live here, in one place:

- a leading ``/`` (or several) is stripped, as tftp-hpa's ``-s`` and most boot
  servers do, because PXE ROMs commonly ask for ``/pxelinux.0``: the name is
  always relative to the root, never a host absolute path;
- a NUL byte, or any ``..`` component, is refused outright (access violation),
  even where the result would stay inside the root: simple rules are easy to
  check;
- the root directory is opened once, when vhostnet starts (``O_PATH``, before it
  drops root: the folders above the root need not be reachable by ``nobody``,
  only the root itself and its files), and every name is walked component by
  component from that descriptor (``openat`` with ``O_NOFOLLOW``), so nothing
  outside the root is ever looked up. A symlink met on the way is read and
  followed only while it stays inside the root: a relative target whose ``..``
  would climb above the root, or an absolute one outside the root, is an access
  violation; at most 40 symlinks per name;
- the file is opened ``O_RDONLY | O_NOFOLLOW | O_NONBLOCK`` (a FIFO cannot
  block the server) relative to its folder's descriptor and re-checked through
  its own descriptor: it must be a regular file, and the path the kernel reports
  for it must be inside the root.

A missing file is "file not found" (code 1), a directory too; anything else
that is not a regular file inside the root is an access violation (code 2).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import weakref
from dataclasses import dataclass

from vhostnet.wire.tftp import ErrorCode, TftpError

log = logging.getLogger("vhostnet.tftp")

# Bounds each read loop: a regular file short-reads only at EOF, so a few
# rounds are plenty; the bound just guarantees termination.
_MAX_READ_ROUNDS = 16
# As the kernel's own bound on symlinks followed in one lookup (MAXSYMLINKS).
_MAX_SYMLINKS = 40


@dataclass
class OpenFile:
    """An open file of the TFTP root: the descriptor, its size at open time, its name."""

    fd: int
    size: int
    name: str


class TftpRoot:
    """Serves regular files from under ``root_dir`` and nothing else."""

    def __init__(self, root_dir: str | os.PathLike[str]) -> None:
        self.root = os.path.realpath(root_dir)
        try:
            self._root_fd = os.open(self.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            raise ValueError(f"TFTP root {os.fspath(root_dir)!r} is not a directory") from None
        weakref.finalize(self, os.close, self._root_fd)
        self._refusals_logged: set[str] = set()

    # -- the interface the TftpServer uses --------------------------------

    def open(self, name: str) -> OpenFile:
        """Open ``name`` for reading; ``TftpError`` (with the TFTP error code) if refused."""
        fd = self._open_beneath(name, self._components(name))
        try:
            size = self._check_open_file(name, fd)
        except BaseException:
            os.close(fd)
            raise
        return OpenFile(fd, size, name)

    def size(self, handle: OpenFile) -> int:
        return handle.size

    def read(self, handle: OpenFile, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``offset``; fewer only at end of file."""
        chunks: list[bytes] = []
        remaining = length
        for _ in range(_MAX_READ_ROUNDS):
            if remaining <= 0:
                break
            try:
                chunk = os.pread(handle.fd, remaining, offset)
            except OSError as exc:
                raise TftpError(ErrorCode.NOT_DEFINED, f"read error: {exc.strerror}") from None
            if not chunk:
                break
            chunks.append(chunk)
            offset += len(chunk)
            remaining -= len(chunk)
        return b"".join(chunks)

    def close(self, handle: OpenFile) -> None:
        """Close the descriptor; closing twice is harmless."""
        if handle.fd >= 0:
            fd, handle.fd = handle.fd, -1
            os.close(fd)

    # -- the rules ----------------------------------------------------------

    def _components(self, name: str) -> list[str]:
        """The components of ``name`` under the root, or ``TftpError`` if it cannot be one."""
        if "\0" in name:
            raise self._refuse(name, "NUL byte in the file name")
        relative = name.lstrip("/")
        if ".." in relative.split("/"):
            raise self._refuse(name, "'..' in the file name")
        if not relative:
            raise TftpError(ErrorCode.FILE_NOT_FOUND, "no file name")
        return _split(relative)

    def _open_beneath(self, name: str, pending: list[str]) -> int:
        """Walk ``pending`` from the root's descriptor (symlinks followed while they stay in
        the root) and open the last component read-only; its descriptor."""
        folders: list[int] = []  # descriptors of the folders walked, the root excluded
        links = 0
        try:
            while pending:
                component = pending.pop(0)
                if component == "..":  # only from a symlink's target
                    if not folders:
                        raise self._refuse(name, "resolves outside the TFTP root")
                    os.close(folders.pop())
                    continue
                here = folders[-1] if folders else self._root_fd
                try:
                    fd = os.open(component, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC,
                                 dir_fd=here)
                except OSError as exc:
                    raise self._open_error(name, exc) from None
                mode = os.fstat(fd).st_mode
                if stat.S_ISLNK(mode):
                    os.close(fd)
                    links += 1
                    if links > _MAX_SYMLINKS:
                        raise self._refuse(name, "too many symlinks")
                    target = os.readlink(component, dir_fd=here)
                    if os.path.isabs(target):
                        if not self._inside_root(os.path.normpath(target)):
                            raise self._refuse(name, "resolves outside the TFTP root")
                        while folders:  # start again from the root
                            os.close(folders.pop())
                        target = os.path.relpath(os.path.normpath(target), self.root)
                    pending[:0] = _split(target)
                elif not pending:  # the file itself
                    os.close(fd)
                    try:
                        return os.open(component, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
                                       | os.O_CLOEXEC, dir_fd=here)
                    except OSError as exc:
                        raise self._open_error(name, exc) from None
                elif stat.S_ISDIR(mode):
                    folders.append(fd)
                else:
                    os.close(fd)
                    raise TftpError(ErrorCode.FILE_NOT_FOUND, "file not found")
            # The name ended on a folder ("." or a symlink to the root).
            raise TftpError(ErrorCode.FILE_NOT_FOUND, "is a directory")
        finally:
            for fd in folders:
                os.close(fd)

    def _check_open_file(self, name: str, fd: int) -> int:
        """Re-check through the descriptor; returns the file size."""
        try:
            info = os.fstat(fd)
        except OSError as exc:
            raise TftpError(ErrorCode.NOT_DEFINED, f"cannot open: {exc.strerror}") from None
        if stat.S_ISDIR(info.st_mode):
            raise TftpError(ErrorCode.FILE_NOT_FOUND, "is a directory")
        if not stat.S_ISREG(info.st_mode):
            raise self._refuse(name, "not a regular file")
        if not self._inside_root(self._descriptor_path(fd)):
            raise self._refuse(name, "opened file is outside the TFTP root")
        return info.st_size

    @staticmethod
    def _descriptor_path(fd: int) -> str:
        # Linux names the file an open descriptor refers to in /proc; that is
        # the truth after the open, whatever happened to the path meanwhile.
        try:
            return os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return ""  # no /proc: treated as outside, refusing is the safe answer

    def _inside_root(self, real_path: str) -> bool:
        if not os.path.isabs(real_path):
            return False
        return os.path.commonpath([self.root, real_path]) == self.root

    def _open_error(self, name: str, exc: OSError) -> TftpError:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG):
            return TftpError(ErrorCode.FILE_NOT_FOUND, "file not found")
        if exc.errno == errno.ELOOP:
            # O_NOFOLLOW met a symlink that realpath did not: the tree changed under us.
            return self._refuse(name, "symlink appeared during open")
        if exc.errno in (errno.EACCES, errno.EPERM):
            return TftpError(ErrorCode.ACCESS_VIOLATION, "permission denied")
        return TftpError(ErrorCode.NOT_DEFINED, f"cannot open: {exc.strerror}")

    def _refuse(self, name: str, reason: str) -> TftpError:
        """An access violation, logged (once per reason: a guest can repeat it forever)."""
        if reason not in self._refusals_logged:
            self._refusals_logged.add(reason)
            log.warning(
                "TFTP access violation for %r: %s (further ones of this kind not logged)",
                name, reason,
            )
        return TftpError(ErrorCode.ACCESS_VIOLATION, "access violation")


def _split(path: str) -> list[str]:
    """The components of a relative path, without empty ones and ``.``."""
    return [part for part in path.split("/") if part not in ("", ".")]
