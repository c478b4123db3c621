"""Command line: ``vhostnet [--socket PATH] [options]``, passt's command line.

The options are in ``vhostnet.options``, running as a daemon in ``vhostnet.daemon``;
this module wires them to the network and the server. Every mistake is reported in
one sentence on stderr with exit status 2; no traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import resource
import signal
import socket
import stat
import sys
import weakref

from vhostnet import __version__, daemon, option_checks, options, sandbox
from vhostnet.options import UsageError, build_parser  # noqa: F401 (the command line's API)

log = logging.getLogger("vhostnet")

# --incoming: how long to wait for the migration source to free forwarded ports.
INCOMING_LISTEN_SECONDS = 600.0
# Fds kept out of the flow budget: the vhost-user and control sockets and their
# clients, memory regions, kick/call eventfds, forwarded-port listeners, logs.
FD_RESERVE = 256
MAX_FLOW_LIMIT = 65536
DEFAULT_SOCKET_TRIES = 64


def raise_fd_limit() -> int:
    """Raise the soft fd limit to the hard one (as passt does); return the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (OSError, ValueError):
            pass
    return soft


def flow_limit_for(fd_limit: int) -> int:
    """Flows per engine that the fd limit can hold: UDP and ICMP flows each take one
    socket and are limited separately, TCP connections take one each too."""
    return max(1, min(MAX_FLOW_LIMIT, (fd_limit - FD_RESERVE) // 2))

def config_from_args(args: argparse.Namespace, fd_limit: int | None = None):  # -> StackConfig
    """The stack's configuration from parsed options (warnings logged); ``fd_limit``: the
    fd limit in force (default: as it is now), which the default flow limit follows."""
    if fd_limit is None:
        fd_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    config, warnings = options.config_from_args(args, fd_limit, FD_RESERVE, flow_limit_for)
    for warning in warnings:
        log.warning("%s", warning)
    return config


def repair_socket_path(args: argparse.Namespace) -> str | None:
    """Where a TCP_REPAIR helper connects: SOCKET.repair unless --repair-path says
    otherwise (passt's default in vhost-user mode); None for --repair-path none, and
    by default with --fd (there is no socket path to derive it from)."""
    if args.repair_path is None:
        return f"{args.socket}.repair" if args.socket else None
    if args.repair_path == "none":
        return None
    if not args.repair_path:
        raise UsageError("--repair-path needs a path, or 'none'")
    return args.repair_path


def default_socket_path() -> str:
    """As passt picks /tmp/passt_N.socket: the first /tmp/vhostnet_N.socket not in use."""
    for number in range(1, DEFAULT_SOCKET_TRIES + 1):
        path = f"/tmp/vhostnet_{number}.socket"
        if not os.path.exists(path):
            return path
    raise UsageError(f"/tmp/vhostnet_1.socket to _{DEFAULT_SOCKET_TRIES}.socket all exist: "
                     "give a path with --socket")


def frontend_options(args: argparse.Namespace, loop: asyncio.AbstractEventLoop
                     ) -> dict[str, object]:
    """What the command line tells the connections about their front-end, for ``Server``:
    ``--vhost-user`` (vhost-user only, no stream framing) and the capture (-p/--pcap,
    --pcap-size) and the vhost-user device's queue pairs (--queues)."""
    from vhostnet.capture import Capture

    try:
        capture = Capture(args.pcap, loop, args.pcap_size) if args.pcap else None
    except OSError as exc:
        raise UsageError(f"cannot open capture file {args.pcap}: {exc.strerror}") from None
    return {"vhost_user_only": args.vhost_user, "capture": capture, "queue_pairs": args.queues}


async def _serve(args: argparse.Namespace, config, runner: daemon.Daemon,
                 runas: tuple[int, int] | None) -> int:
    with contextlib.ExitStack() as cleanup:
        return await _serve_until_closed(args, config, runner, runas, cleanup)


async def _serve_until_closed(args: argparse.Namespace, config, runner: daemon.Daemon,
                              runas: tuple[int, int] | None, cleanup: contextlib.ExitStack) -> int:
    from vhostnet.migration.repair_helper import HelperLink, RepairAccess
    from vhostnet.migration.restart import Several, StateFile, restore_at_start, save_on_exit
    from vhostnet.migration.tcp_migrate import TcpMigration
    from vhostnet.migration.transfer import DeviceStateTransfer, GuestPortScope, OneNetwork
    from vhostnet.network import Network
    from vhostnet.server import Server, SocketPathError, open_listening_socket

    loop = asyncio.get_running_loop()
    listener = connected = None
    try:
        if args.fd is not None:
            connected = socket.socket(fileno=args.fd)
            cleanup.callback(connected.close)
        else:
            listener = open_listening_socket(args.socket)
            cleanup.callback(_remove_socket, listener, args.socket)
        if args.pid:
            pid_file = daemon.PidFile(args.pid)
            cleanup.callback(pid_file.remove)
    except SocketPathError as exc:
        raise UsageError(str(exc)) from None
    except OSError as exc:
        raise UsageError(f"cannot write the pid file {args.pid}: {exc.strerror or exc}") from None
    try:
        # Opened before the drop and kept: nobody may create files in its folder.
        state = StateFile.open(args.state_file) if args.state_file else None
    except OSError as exc:
        raise UsageError(f"cannot open the state file {args.state_file}: "
                         f"{exc.strerror or exc}") from None
    if state is not None:
        cleanup.callback(state.close)
    # A restart's forwarded ports stay caught until its state is restored.
    held = args.incoming or (state is not None and state.pending)
    listen_retry = INCOMING_LISTEN_SECONDS if held else 0.0
    guests = None
    try:
        if config.max_guests > 1:
            guests = _start_guests(config, loop, listen_retry)
            network = guests.first
            cleanup.callback(guests.close)
        else:
            network = Network(config, loop, listen_retry=listen_retry)
            cleanup.callback(network.close)
    except OSError as exc:
        raise UsageError(f"cannot set up the network: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.discard_tx:
        # Benchmarks only (the ring case times the TX ring alone): guest frames are
        # dropped unseen instead of reaching the stack, counted as guest.tx_to_sink.
        network.set_tx_sink(_discard)

    # Created whether or not we have CAP_NET_ADMIN, as passt does: whoever starts
    # passt-repair for a migration (KubeVirt's virt-handler, a script written for
    # passt) does not know our privileges, and passt-repair fails on a missing path.
    # Except without --vhost-user (libvirt's stream launch, where passt makes none
    # either) when the user we are about to become could not remove the file at exit:
    # libvirt removes only the socket and the pid file.
    helper = None
    repair_path = repair_socket_path(args)
    if repair_path is not None and args.repair_path is None and runas is not None \
            and not args.vhost_user and not _removable_by(repair_path, *runas):
        log.info("no default repair socket: uid %d could not remove %s at exit "
                 "(--repair-path or --vhost-user creates it)", runas[0], repair_path)
        repair_path = None
    if repair_path is not None:
        try:
            helper = HelperLink(repair_path, loop)
        except OSError as exc:
            if args.repair_path is not None:
                raise UsageError(f"cannot listen on --repair-path {repair_path}: "
                                 f"{exc.strerror or exc}") from None
            # Not asked for: TCP_REPAIR may still be ours.
            log.warning("cannot listen on the repair socket %s (%s): no helper can connect",
                        repair_path, exc.strerror or exc)
    frontend = frontend_options(args, loop)  # the capture file is opened here
    control = None
    if args.control:
        from vhostnet.control import ControlServer, register_network_commands

        try:
            control_listener = open_listening_socket(args.control)
        except SocketPathError as exc:
            raise UsageError(str(exc)) from None
        control = ControlServer(args.control)
        cleanup.callback(control.close)
    # Everything that needs root is open: drop it, then learn what is left.
    _drop_privileges(args, runas)
    repair = RepairAccess.probe(helper)
    cleanup.callback(repair.close)
    migration = TcpMigration.attach(network, repair)
    log.info("%s", repair.describe())
    several = None  # with several guests: every guest's Network and the pool
    if guests is not None:
        migrations = weakref.WeakKeyDictionary({network: migration})

        def migration_of(guest_network):  # -> TcpMigration
            if guest_network not in migrations:
                migrations[guest_network] = TcpMigration.attach(guest_network, repair)
            return migrations[guest_network]

        several = Several(guests, migration_of)
    if state is not None:
        # Before the front-end is served: the guest's segments must find their flows.
        await restore_at_start(network, migration, state, several)
    if guests is None:
        def device_state(_side):  # -> DeviceStateTransfer
            return DeviceStateTransfer(loop, OneNetwork(network, migration))
    else:
        # Several guests: a connection's state is its port's Network's, with its lease.
        def device_state(port):  # -> DeviceStateTransfer
            return DeviceStateTransfer(loop, GuestPortScope(port, migration_of))
    server = Server(loop, listener, network, one_off=args.one_off, device_state=device_state,
                    guests=guests, **frontend)
    cleanup.callback(server.close)
    if control is not None:
        from vhostnet.migration.commands import register_state_commands

        control.commands["stats"] = lambda _request: {"counters": server.counters()}
        register_state_commands(control.commands, network, migration)
        register_network_commands(control.commands, network, server.counters,
                                  option_checks.ephemeral_ports(), targets=guests)
        if guests is not None:
            from vhostnet.control import register_guest_commands

            register_guest_commands(control.commands, guests, _port_counters(server))
        await control.start(control_listener)
    if connected is not None:
        server.serve_connected(connected)

    def terminate() -> None:
        if state is not None and not server.closed.is_set():
            for front_end in list(server.front_ends):
                front_end.close()  # the device stops first, as before a migration's save
            save_on_exit(network, migration, state, several)
        server.close()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, terminate)
    if args.stats:
        _log_stats_every(loop, args.stats, server)
    try:
        count = sandbox.install_seccomp()
    except sandbox.SandboxError as exc:
        raise UsageError(str(exc)) from None
    log.info("seccomp filter: %d system calls allowed, any other is refused (EPERM)", count)
    log.info("vhostnet %s serving %s", __version__,
             args.socket if args.fd is None else f"fd {args.fd}")
    runner.ready()
    await server.closed.wait()
    log.info("stopped")
    return 0


def _start_guests(config, loop: asyncio.AbstractEventLoop, listen_retry: float):  # -> Guests
    """--max-guests N > 1: the lease pool, the switch, and the first guest's Network (and
    those command-line forwards name); every other guest's Network is made on demand."""
    from vhostnet.guests import Guests
    from vhostnet.network import Network
    from vhostnet.virtqueue.switch import Switch

    pool = config.lease_pool()
    switch = Switch(config.max_guests, config.gateway_mac)

    def build_network(guest_config):  # -> Network
        # One pool for all: DHCP, ARP/NDP and DNS of every guest's router see every lease.
        return Network(guest_config, loop, listen_retry=listen_retry, leases=pool)

    return Guests.start(config, pool, switch, config.max_guests, build_network)


def _port_counters(server):  # -> Callable[[GuestPort], dict[str, int]]
    """A guest port's device counters (unprefixed), for the ``guests`` command."""
    def counters(port) -> dict[str, int]:
        front_end = server.front_end_of(port)
        return {} if front_end is None else front_end.counters()
    return counters


def _drop_privileges(args: argparse.Namespace, runas: tuple[int, int] | None) -> None:
    """Switch to nobody (or --runas) with no capability but those asked for; say what
    that leaves out."""
    keep = (sandbox.CAP_NET_ADMIN,) if args.keep_cap_net_admin else ()
    try:
        sandbox.drop_privileges(runas, keep)
    except sandbox.SandboxError as exc:
        raise UsageError(str(exc)) from None
    if runas is not None:
        log.info("running as uid %d gid %d", *runas)
    if not args.no_icmp and not sandbox.ping_sockets_allowed():
        log.warning("ICMP echo beyond vhostnet's own addresses needs group %d in sysctl "
                    "net.ipv4.ping_group_range", os.getegid())


def _removable_by(path: str, uid: int, gid: int) -> bool:
    """Whether ``uid``/``gid`` may unlink a root-owned file ``path`` (its folder's mode
    bits; ACLs aside): write access to the folder, and its sticky bit not in the way."""
    try:
        folder = os.stat(os.path.dirname(os.path.abspath(path)))
    except OSError:
        return False
    if folder.st_uid == uid:
        writable = bool(folder.st_mode & stat.S_IWUSR)
    elif folder.st_gid == gid:
        writable = bool(folder.st_mode & stat.S_IWGRP)
    else:
        writable = bool(folder.st_mode & stat.S_IWOTH)
    return writable and (not folder.st_mode & stat.S_ISVTX or folder.st_uid == uid)


def _remove_socket(listener: socket.socket, path: str) -> None:
    """After a failed start: the listener and its socket file go (Server.close does it once
    the server runs)."""
    if listener.fileno() >= 0:
        listener.close()
        with contextlib.suppress(OSError):
            os.unlink(path)


def _log_stats_every(loop: asyncio.AbstractEventLoop, delay: int, server) -> None:
    """--stats DELAY: one log line of the non-zero counters every DELAY seconds."""
    def tick() -> None:
        if server.closed.is_set():
            return
        counts = server.counters()
        log.info("stats: %s", " ".join(f"{k}={v}" for k, v in sorted(counts.items()) if v))
        loop.call_later(delay, tick)

    loop.call_later(delay, tick)


def _discard(_batch: object, _count: int, _now: float) -> None:
    """A TX sink that drops every frame (``--discard-tx``)."""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["repair"]:
        from vhostnet.migration.repair_helper import main as repair_main

        return repair_main(argv[1:])
    if argv[:1] == ["ctl"]:
        from vhostnet.ctl import main as ctl_main

        return ctl_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        sandbox.harden_early()  # before any file is created, before the event loop
    except sandbox.SandboxError as exc:
        print(f"vhostnet: {exc}", file=sys.stderr)
        return 2
    debug = args.debug or args.trace
    level = logging.DEBUG if debug else logging.ERROR if args.quiet else logging.INFO
    try:
        fd_limit = raise_fd_limit()
        config, warnings = options.config_from_args(args, fd_limit, FD_RESERVE, flow_limit_for)
        repair_socket_path(args)  # a mistake in it is reported before anything is opened
        runas = sandbox.user_to_run_as(args.runas)
        if args.fd is None and args.socket is None:
            args.socket = default_socket_path()
            print(f"vhostnet: UNIX domain socket at {args.socket}", file=sys.stderr)
    except (UsageError, ValueError) as exc:
        print(f"vhostnet: {exc}", file=sys.stderr)
        return 2
    runner = daemon.Daemon()
    if not args.foreground:
        runner.fork()  # the parent exits here: 0 once the child is ready
        daemon.start_error_handler()
    try:
        daemon.set_up_logging(level, args.foreground, args.log_file, args.log_size)
    except OSError as exc:
        print(f"vhostnet: cannot open the log file {args.log_file}: {exc.strerror or exc}",
              file=sys.stderr)
        return 2
    for warning in warnings:
        log.warning("%s", warning)
    try:
        import uvloop

        return uvloop.run(_serve(args, config, runner, runas))
    except UsageError as exc:
        print(f"vhostnet: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
