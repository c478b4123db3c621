"""Least privilege, as passt: drop root, keep no capability, refuse unexpected system calls.

Order (``cli`` does it): ``harden_early()`` at start (umask, no core dumps); everything
that needs root is opened (listener, repair socket, forwarded ports, pid and log files,
capture, control socket); ``drop_privileges()`` switches to ``nobody`` (or ``--runas``)
with no capability, stdin on /dev/null, no new privileges; ``install_seccomp()`` then
allows only the system calls of ``ALLOWED_SYSCALLS``, through libseccomp (Debian's
``libseccomp2``, loaded with ctypes: nothing to compile).

What is refused returns EPERM rather than killing the process (passt kills): vhostnet
runs in a Python interpreter whose rarer paths (error handling, logging fallbacks) a
traced list cannot prove complete, and Python turns the refusal into an OSError in the
code that made the call, which logs it and goes on; the call is refused either way.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import grp
import logging
import os
import pwd
import resource
import socket

log = logging.getLogger("vhostnet.sandbox")

NOBODY = "nobody"
UMASK = 0o077  # logs, pid file and captures may hold guest data: ours alone

# prctl(2) options (linux/prctl.h).
PR_SET_DUMPABLE = 4
PR_GET_DUMPABLE = 3
PR_SET_KEEPCAPS = 8
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
CAP_NET_ADMIN = 12
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
CAP_LAST_CAP_PATH = "/proc/sys/kernel/cap_last_cap"
PING_GROUP_RANGE_PATH = "/proc/sys/net/ipv4/ping_group_range"

# libseccomp (seccomp.h).
SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_FLTATR_CTL_TSYNC = 4  # the filter applies to every thread of the process
SCMP_FLTATR_CTL_LOG = 6  # the kernel logs each refused call (audit, dmesg: "type=1326")
SCMP_CMP_EQ = 4
SCMP_CMP_MASKED_EQ = 7
REFUSED_ERRNO = errno.EPERM

# The system calls vhostnet makes once started, collected with `strace -f` over the
# unit tests and e2e runs that exercise it (data path, TCP migration with direct
# TCP_REPAIR and the helper, DEVICE_STATE pipes, control socket, pcap, stream mode,
# TFTP, DNS, ICMP), grouped by what needs them. Everything else returns EPERM.
ALLOWED_SYSCALLS: dict[str, tuple[str, ...]] = {
    # The event loop (uvloop/libuv) and its wake-ups, signals (SIGTERM, SIGINT).
    "event loop": ("epoll_wait", "epoll_pwait", "epoll_ctl", "epoll_create1", "eventfd2",
                   "read", "write", "close", "rt_sigreturn", "rt_sigprocmask",
                   "rt_sigaction", "sigaltstack", "tgkill", "getpid", "gettid",
                   "clock_gettime", "clock_nanosleep", "nanosleep", "poll", "ppoll",
                   "sched_yield", "restart_syscall", "exit", "exit_group"),
    # The Python interpreter and numpy: memory, locks, randomness, the time.
    "interpreter": ("mmap", "munmap", "mremap", "madvise", "brk", "mprotect", "futex",
                    "getrandom", "gettimeofday", "getuid", "geteuid", "getgid",
                    "getegid", "uname", "getcwd", "sysinfo", "sched_getaffinity",
                    "getrlimit", "prlimit64", "rseq", "set_robust_list"),
    # Files already open, files read after start (TFTP files, modules imported on
    # demand): open is allowed read-only only, see READ_ONLY_OPEN.
    "files": ("fstat", "newfstatat", "statx", "lseek", "pread64", "pwrite64",
              "readv", "writev", "readlink", "readlinkat", "ioctl", "fcntl", "dup", "dup2",
              "dup3", "getdents64", "fsync", "ftruncate", "unlink", "unlinkat",
              "access", "faccessat", "faccessat2", "lstat", "stat"),
    # Guest memory (memfd regions from the front-end) and the TX ring kernel.
    "guest memory": ("memfd_create",),
    # --state-file at SIGTERM forks the catcher keeper (vhostnet.migration.restart); clone
    # itself is allowed only without CLONE_NEW* flags, clone3 looks absent (its flags are in
    # memory, beyond seccomp's reach: glibc then falls back to clone). The keeper lists
    # /proc/self/fd and closes what it does not keep (close_range where Python uses it).
    "processes": ("wait4", "close_range", "set_tid_address"),
    # Host sockets of the NAT (TCP, UDP, ICMP echo), the vhost-user, control and
    # repair sockets (fds passed with SCM_RIGHTS), DEVICE_STATE pipes; socket()
    # itself only for the families of SOCKET_FAMILIES.
    "sockets": ("bind", "listen", "accept", "accept4", "connect", "shutdown",
                "getsockname", "getpeername", "getsockopt", "setsockopt",
                "sendto", "recvfrom", "sendmsg", "recvmsg", "sendmmsg", "recvmmsg",
                "socketpair", "pipe2", "splice"),
}
IO_URING_SYSCALLS = ("io_uring_setup", "io_uring_enter", "io_uring_register")
# Namespace flags of clone(2) (linux/sched.h): a new namespace is never vhostnet's business.
CLONE_NEW_FLAGS = (0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000
                   | 0x20000000 | 0x40000000)  # NEWNS CGROUP UTS IPC USER PID NET
SOCKET_FAMILIES = (socket.AF_UNIX, socket.AF_INET, socket.AF_INET6)
# open/openat only when none of these flags is set: reading, never writing or creating.
READ_ONLY_OPEN_MASK = os.O_ACCMODE | os.O_CREAT | os.O_TRUNC | os.O_APPEND


class SandboxError(Exception):
    """Something the sandbox needs is missing; str() is the one sentence to print."""


def harden_early() -> None:
    """At start, before any file is created: a private umask, and no core dump (vhostnet's
    memory maps guest memory) — PR_SET_DUMPABLE 0 also keeps other processes of the
    user vhostnet will run as from reading or tracing it."""
    os.umask(UMASK)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    _prctl(PR_SET_DUMPABLE, 0)
    _prctl(PR_SET_NO_NEW_PRIVS, 1)  # vhostnet never executes anything
    refuse_io_uring()


def refuse_io_uring() -> None:
    """io_uring operations bypass seccomp, so no ring may exist: this first filter, loaded
    before the event loop, makes io_uring look absent (ENOSYS) and libuv then falls back
    to plain epoll_ctl; everything else stays allowed until ``install_seccomp``."""
    lib = _libseccomp()
    ctx = lib.seccomp_init(SCMP_ACT_ALLOW)
    if not ctx:
        raise SandboxError("seccomp_init failed")
    try:
        for name in IO_URING_SYSCALLS:
            number = lib.seccomp_syscall_resolve_name(name.encode())
            if number >= 0:
                _check(lib.seccomp_rule_add_array(ctx, _errno_action(errno.ENOSYS), number,
                                                  0, None), name)
        _check(lib.seccomp_load(ctx), "seccomp_load")
    finally:
        lib.seccomp_release(ctx)


def user_to_run_as(spec: str | None) -> tuple[int, int] | None:
    """(uid, gid) to switch to: ``--runas``, else ``nobody`` when started as root, else
    None (stay who we are). ValueError with one sentence for an unknown user or group."""
    if spec:
        return parse_runas(spec)
    if os.geteuid() == 0:
        try:
            return parse_runas(NOBODY)
        except ValueError:
            return 65534, 65534  # no passwd entry: nobody's customary ids
    return None


def parse_runas(spec: str) -> tuple[int, int]:
    """``UID[:GID]`` by number or name -> (uid, gid); ValueError with one sentence."""
    user, _, group = spec.partition(":")
    try:
        entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
        uid, gid = entry.pw_uid, entry.pw_gid
    except KeyError:
        if not user.isdigit():
            raise ValueError(f"--runas: there is no user {user!r}") from None
        uid = gid = int(user)
    if group:
        try:
            gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
        except KeyError:
            raise ValueError(f"--runas: there is no group {group!r}") from None
    return uid, gid


def drop_privileges(runas: tuple[int, int] | None, keep: tuple[int, ...] = ()) -> None:
    """Switch to ``runas`` (no supplementary groups), keep only the capabilities ``keep``,
    stdin on /dev/null, PR_SET_NO_NEW_PRIVS. Everything needing root is open by now."""
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    for cap in range(_last_cap() + 1):  # needs CAP_SETPCAP: done as root, a no-op otherwise
        if cap not in keep:
            _prctl(PR_CAPBSET_DROP, cap, check=False)
    _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, check=False)
    if runas is not None and (os.getuid(), os.getgid()) != runas:
        uid, gid = runas
        _prctl(PR_SET_KEEPCAPS, 1 if keep else 0)
        try:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
        except OSError as exc:
            raise SandboxError(f"cannot switch to user {uid}:{gid}: {exc.strerror}") from None
        _prctl(PR_SET_KEEPCAPS, 0)
    mask = _capability_set(keep)
    permitted = _read_caps()[1]
    _write_caps(mask & permitted, mask & permitted)
    _prctl(PR_SET_NO_NEW_PRIVS, 1)
    _prctl(PR_SET_DUMPABLE, 0)  # a change of credentials may have reset it


def ping_sockets_allowed(gid: int | None = None,
                         path: str = PING_GROUP_RANGE_PATH) -> bool:
    """Whether ``net.ipv4.ping_group_range`` lets group ``gid`` (ours by default) open the
    unprivileged ICMP sockets that ICMP echo to the outside uses."""
    gid = os.getegid() if gid is None else gid
    try:
        with open(path, encoding="ascii") as handle:
            low, high = (int(field) for field in handle.read().split())
    except (OSError, ValueError):
        return False
    return low <= gid <= high


def install_seccomp(allowed: dict[str, tuple[str, ...]] = ALLOWED_SYSCALLS) -> int:
    """Load the filter (every thread); return how many system calls it allows."""
    lib = _libseccomp()
    ctx = lib.seccomp_init(_errno_action(REFUSED_ERRNO))
    if not ctx:
        raise SandboxError("seccomp_init failed")
    try:
        _check(lib.seccomp_attr_set(ctx, SCMP_FLTATR_CTL_TSYNC, 1), "seccomp_attr_set")
        # Not fatal: a kernel without SECCOMP_FILTER_FLAG_LOG still refuses, silently.
        lib.seccomp_attr_set(ctx, SCMP_FLTATR_CTL_LOG, 1)
        count = 0
        for name in sorted({name for group in allowed.values() for name in group}):
            number = lib.seccomp_syscall_resolve_name(name.encode())
            if number < 0:  # not a system call of this architecture (e.g. a newer one)
                continue
            _check(lib.seccomp_rule_add_array(ctx, SCMP_ACT_ALLOW, number, 0, None), name)
            count += 1
        for family in SOCKET_FAMILIES:
            count += _allow_when(lib, ctx, "socket", (0, SCMP_CMP_EQ, family, 0))
        count += _allow_when(lib, ctx, "clone", (0, SCMP_CMP_MASKED_EQ, CLONE_NEW_FLAGS, 0))
        clone3 = lib.seccomp_syscall_resolve_name(b"clone3")
        if clone3 >= 0:
            _check(lib.seccomp_rule_add_array(ctx, _errno_action(errno.ENOSYS), clone3, 0,
                                              None), "clone3")
        for name, flags_arg in (("openat", 2), ("open", 1)):
            count += _allow_when(lib, ctx, name, (flags_arg, SCMP_CMP_MASKED_EQ,
                                                  READ_ONLY_OPEN_MASK, 0))
        _check(lib.seccomp_load(ctx), "seccomp_load")
        return count
    finally:
        lib.seccomp_release(ctx)


def status(pid: int | str = "self") -> dict[str, str]:
    """/proc/PID/status as a dict (Uid, Gid, CapEff, NoNewPrivs, Seccomp...)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as handle:
        return dict(line.rstrip("\n").split(":\t", 1) for line in handle if ":\t" in line)


def dumpable() -> int:
    return _prctl(PR_GET_DUMPABLE, 0)


# ---- the C interfaces ---------------------------------------------------------------


class _ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


_libc = ctypes.CDLL(None, use_errno=True)


def _libseccomp() -> ctypes.CDLL:
    name = ctypes.util.find_library("seccomp") or "libseccomp.so.2"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError:
        raise SandboxError("libseccomp is missing (Debian: apt-get install libseccomp2)") from None
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    lib.seccomp_attr_set.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                           ctypes.c_uint, ctypes.POINTER(_ArgCmp)]
    return lib


def _errno_action(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)  # SCMP_ACT_ERRNO(code)


def _allow_when(lib: ctypes.CDLL, ctx: int, name: str,
                condition: tuple[int, int, int, int]) -> int:
    number = lib.seccomp_syscall_resolve_name(name.encode())
    if number < 0:
        return 0
    cmp = _ArgCmp(*condition)
    _check(lib.seccomp_rule_add_array(ctx, SCMP_ACT_ALLOW, number, 1, ctypes.byref(cmp)), name)
    return 1


def _check(result: int, what: str) -> None:
    if result < 0:
        raise SandboxError(f"seccomp: {what} failed: {os.strerror(-result)}")


def _prctl(option: int, arg: int, check: bool = True) -> int:
    result = _libc.prctl(option, ctypes.c_ulong(arg), ctypes.c_ulong(0), ctypes.c_ulong(0),
                         ctypes.c_ulong(0))
    if result < 0 and check:
        code = ctypes.get_errno()
        raise SandboxError(f"prctl({option}) failed: {os.strerror(code)}")
    return result


def _last_cap() -> int:
    try:
        with open(CAP_LAST_CAP_PATH, encoding="ascii") as handle:
            return int(handle.read())
    except (OSError, ValueError):
        return 40


def _capability_set(caps: tuple[int, ...] | int) -> int:
    if isinstance(caps, int):
        return caps
    mask = 0
    for cap in caps:
        mask |= 1 << cap
    return mask


def _read_caps() -> tuple[int, int]:
    """(effective, permitted) as 64-bit masks."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    if _libc.capget(ctypes.byref(header), data) < 0:
        raise SandboxError(f"capget failed: {os.strerror(ctypes.get_errno())}")
    return (data[0].effective | data[1].effective << 32,
            data[0].permitted | data[1].permitted << 32)


def _write_caps(effective: int, permitted: int) -> None:
    """Set the effective and permitted sets; the inheritable set is emptied."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    for index in (0, 1):
        data[index].effective = (effective >> (32 * index)) & 0xFFFFFFFF
        data[index].permitted = (permitted >> (32 * index)) & 0xFFFFFFFF
    if _libc.capset(ctypes.byref(header), data) < 0:
        raise SandboxError(f"capset failed: {os.strerror(ctypes.get_errno())}")
