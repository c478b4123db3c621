"""Run a command inside a fresh private network namespace that has only loopback.

    python3 -m tools.netns -- CMD ARGS...

The project's network rule: vhostnet, QEMU and every host-side test server
run where the only interface is `lo`, so nothing they send can leave the
machine. As root this is `unshare --net`; otherwise `unshare --net
--map-root-user` (a user namespace gives the rights to bring `lo` up).

Inside, `lo` is brought up, the namespace is checked to hold nothing but `lo`,
VHOSTNET_NETNS=1 is set and CMD replaces this process, so its exit code is the
exit code of the whole command. If VHOSTNET_NETNS=1 is already set the command
is simply executed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ENV_FLAG = "VHOSTNET_NETNS"
REPO_ROOT = Path(__file__).resolve().parent.parent
INSIDE_OPTION = "--inside"


def in_private_netns() -> bool:
    """True when this process was started by tools.netns (the flag is set)."""
    return os.environ.get(ENV_FLAG) == "1"


def interfaces() -> list[str]:
    """Interfaces of this process's network namespace.

    /proc/self/net follows the calling process's namespace; /sys/class/net
    would show the namespace sysfs was mounted in, which unshare keeps.
    """
    lines = Path("/proc/self/net/dev").read_text().splitlines()[2:]
    return sorted(line.split(":", 1)[0].strip() for line in lines if ":" in line)


def only_loopback() -> bool:
    return interfaces() == ["lo"]


def _enter_inside(command: list[str]) -> int:
    """Second stage, already in the new namespace: lo up, check, exec."""
    up = subprocess.run(["ip", "link", "set", "lo", "up"], capture_output=True, text=True,
                        timeout=10, check=False)
    if up.returncode != 0:
        print(f"netns: cannot bring lo up: {up.stderr.strip()}", file=sys.stderr)
        return 1
    found = interfaces()
    if found != ["lo"]:
        print(f"netns: refusing to run, the namespace has interfaces {found}", file=sys.stderr)
        return 1
    os.environ[ENV_FLAG] = "1"
    return _exec(command)


def _exec(command: list[str]) -> int:
    try:
        os.execvp(command[0], command)
    except OSError as error:
        print(f"netns: cannot run {command[0]}: {error}", file=sys.stderr)
        return 127
    return 0  # not reached: execvp replaces the process


def main(argv: list[str]) -> int:
    inside = bool(argv) and argv[0] == INSIDE_OPTION
    if inside:
        argv = argv[1:]
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        print("usage: python3 -m tools.netns -- CMD [ARGS...]", file=sys.stderr)
        return 2
    if inside:
        return _enter_inside(argv)
    if in_private_netns():
        return _exec(argv)
    unshare = ["unshare", "--net"]
    if os.geteuid() != 0:
        unshare.append("--map-root-user")
    # The second stage is this module again, so it must be importable from
    # wherever the caller stands.
    python_path = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = f"{REPO_ROOT}{os.pathsep}{python_path}" if python_path \
        else str(REPO_ROOT)
    return _exec([*unshare, "--", sys.executable, "-m", "tools.netns", INSIDE_OPTION, "--",
                  *argv])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
