"""A connection's guest side moving between engines (live migration): dump, restore, resume.

The socket side (TCP_REPAIR) is ``vhostnet.migration``'s; this module is the
engine's side of it, on the engine's public methods, so that no code outside
this package writes a flow's numbers or queues its commands.
"""

from __future__ import annotations

import ipaddress

from vhostnet.tcp.engine import TcpEngine
from vhostnet.tcp.flow import SEQ_MOD, Flow, Phase, Send, seq_diff

Key = tuple[bytes, int, bytes, int]


def dump_flow(flow: Flow) -> dict[str, object]:
    """The guest side of a flow: 4-tuple (either family), wire sequence numbers, windows,
    bytes for the host, and which FINs were seen (a half-closed flow moves too)."""
    return {
        "guest_ip": str(ipaddress.ip_address(flow.guest_ip)), "guest_port": flow.guest_port,
        "remote_ip": str(ipaddress.ip_address(flow.remote_ip)), "remote_port": flow.remote_port,
        "inbound": flow.inbound, "phase": flow.phase.name,
        "snd_una": flow.send_seq(flow.snd_una), "snd_nxt": flow.send_seq(flow.snd_nxt),
        "snd_max": flow.send_seq(flow.snd_max), "rcv_nxt": flow.recv_seq(flow.rcv_nxt),
        "snd_wnd": flow.snd_wnd, "snd_wscale": flow.snd_wscale,
        "rcv_wscale": flow.rcv_wscale, "mss": flow.mss,
        "to_host": bytes(flow.to_host).hex(),
        "half_close": {name: getattr(flow, name) for name in HALF_CLOSE_FLAGS},
    }


# The flags of a half-closed flow (see ``Flow``): the guest's FIN arrived, the host socket
# was shut down for writing, the host reached EOF, our FIN to the guest went, and was acked.
HALF_CLOSE_FLAGS = ("guest_fin", "host_shut", "host_eof", "fin_sent", "fin_acked")


def restore_flow(engine: TcpEngine, key: Key, *, inbound: bool, snd_una: int, snd_max: int,
                 rcv_nxt: int, snd_wnd: int, snd_wscale: int, rcv_wscale: int, mss: int,
                 to_host: bytes, host_space: int | None, now: float,
                 half_close: dict[str, bool] | None = None) -> Flow:
    """An established flow with the wire numbers of a migrated connection, timers armed;
    ``half_close``: the ``HALF_CLOSE_FLAGS`` that were set (wire numbers include the FINs).

    Its host socket must be adopted by the glue next, then ``resume_host_io`` called.
    """
    flow = engine.add_flow(key, inbound=inbound, phase=Phase.ESTABLISHED)
    # Relative numbers start afresh at 1 with the same wire values.
    flow.iss = (snd_una - 1) % SEQ_MOD
    flow.snd_una = flow.snd_nxt = 1  # in-flight data goes again from the socket
    flow.snd_max = 1 + seq_diff(snd_max, snd_una)
    flow.irs = (rcv_nxt - 1) % SEQ_MOD
    flow.rcv_nxt = 1
    flow.to_host = bytearray(to_host)
    flow.rcv_queued = 1 + len(flow.to_host)
    flow.snd_wnd, flow.snd_wscale, flow.rcv_wscale = snd_wnd, snd_wscale, rcv_wscale
    flow.mss = min(mss, engine.tx.mss_limit(key[0]))
    for name in HALF_CLOSE_FLAGS:
        setattr(flow, name, bool((half_close or {}).get(name, False)))
    if flow.guest_fin or flow.fin_sent:
        flow.fin_at = now + engine.timeouts.fin  # the close goes on from here
    flow.rto = engine.timeouts.rto_initial
    flow.idle_at = now + engine.timeouts.idle
    if flow.snd_max > flow.snd_una:
        flow.rto_at = now + flow.rto
    engine.schedule(flow)
    if host_space is not None:
        flow.host_space = host_space
    return flow


def resume_host_io(engine: TcpEngine, flow_id: int, now: float) -> None:
    """The flow's host socket is served again (restored, or back from a frozen state).

    Commands issued while it was away were dropped: write the guest's pending
    bytes again and look for host data.
    """
    flow = engine.flows_by_id.get(flow_id)
    if flow is None:
        return
    flow.peek_pending = False
    flow.peek_seq = -1
    if flow.to_host:
        flow.send_queued = True
        engine.commands.append(Send(flow_id, flow.to_host))
    else:
        flow.send_queued = False
    engine.on_readable(flow_id, now)
