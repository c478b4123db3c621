"""The TCP fast path (ext/tcp_fast.pyx) through Network.receive_batch, with real sockets on 127.0.0.1.

A scripted guest connects through the real engine and glue to a listening
socket, then sends batches of data frames. In-order segments of the established
flow are written by the C kernel; anything the engine must see (out of order,
FIN, RST, a new ack or window, a bad checksum, an unknown flow, and every later
frame of a flow in the batch once one of its frames went the Python way) goes
through the stack. Whatever the mix, the host peer must receive the guest's byte
stream exactly, once.

Every scenario runs over IPv4 (127.0.0.1) and over IPv6 (the gateway fec0::2, mapped to
::1); IPv6 adds an extension header (not plain: left to the stack) and a guest address that
folds to the same table key as the flow's (compared in full: not taken).
"""

from __future__ import annotations

import asyncio
import os
import socket
import time

import pytest

from tests.support.frames import (
    GATEWAY_IP,
    GATEWAY_MAC,
    GUEST_IP,
    GUEST_IP6,
    guest_ipv4_frame,
    ipv6_frame,
)
from tests.support.loop import run
from tests.support.tcp import GATEWAY6
from vhostnet.network import Network
from vhostnet.stack.config import StackConfig
from vhostnet.virtqueue import FrameBatch
from vhostnet.wire.offload import NEEDS_CSUM, vnet_word
from vhostnet.wire.tcp import (
    ACK,
    CSUM_FULL,
    CSUM_PARTIAL,
    FIN,
    PSH,
    RST,
    SYN,
    TcpSegment,
    build_options,
    emit_segment,
)

GUEST_PORT = 41000
WINDOW = 4096  # raw; the guest's SYN says window scale 7
PARTIAL = vnet_word(NEEDS_CSUM, 0, 0, 34, 16)  # checksum left to the "device" at the TCP header
PARTIAL6 = vnet_word(NEEDS_CSUM, 0, 0, 54, 16)
HOP_BY_HOP = bytes([6, 0, 1, 4, 0, 0, 0, 0])  # an empty hop-by-hop header (padding), TCP next
FAMILIES = pytest.mark.parametrize("family", [4, 6])



class Guest:
    """One guest connection: builds frames, reads our segments, keeps the stream it sends."""

    def __init__(self, network: Network, port: int, guest_port: int = GUEST_PORT,
                 family: int = 4) -> None:
        self.network = network
        self.family = family
        self.port = port
        self.guest_port = guest_port
        self.isn = 1_000_000
        self.peer_isn = 0
        self.data = b""  # the whole stream; offset 0 is relative sequence 1
        self.acked = 0  # stream offset our peer (vhostnet) acknowledged
        self.acks: list[TcpSegment] = []
        self.window = WINDOW

    def frame(self, flags: int, offset: int = 0, payload: bytes = b"", *, ack: int | None = None,
              window: int | None = None, csum: int = CSUM_FULL, corrupt: bool = False,
              sport: int | None = None, src6: bytes = GUEST_IP6,
              extension: bool = False) -> tuple[bytes, int]:
        ack = (self.peer_isn + 1) & 0xFFFFFFFF if ack is None else ack
        options = build_options(1460, 7) if flags & SYN else b""
        src, dst = (src6, GATEWAY6) if self.family == 6 else (GUEST_IP, GATEWAY_IP)
        segment = bytearray(emit_segment(src, dst, sport or self.guest_port, self.port,
                                         (self.isn + 1 + offset) & 0xFFFFFFFF, ack, flags,
                                         self.window if window is None else window, payload,
                                         options, checksum=csum))
        if corrupt:
            segment[-1] ^= 0x5A
        if self.family == 4:
            return (guest_ipv4_frame(GATEWAY_IP, 6, bytes(segment)),
                    PARTIAL if csum == CSUM_PARTIAL else 0)
        # (A partial IPv6 checksum field holds an IPv4-style seed: the engine does not read it.)
        frame = ipv6_frame(src, dst, (HOP_BY_HOP if extension else b"") + bytes(segment),
                           hop_limit=64, next_header=0 if extension else 6, dst_mac=GATEWAY_MAC)
        return frame, PARTIAL6 if csum == CSUM_PARTIAL else 0

    def data_frame(self, offset: int, length: int, **kwargs) -> tuple[bytes, int]:
        return self.frame(ACK | PSH, offset, self.data[offset:offset + length], **kwargs)

    def send(self, frames: list[tuple[bytes, int]], now: float | None = None) -> None:
        batch = FrameBatch(max(64, len(frames)), 8 << 20)
        for frame, vnet in frames:
            assert batch.append(frame, vnet)
        # The network's own timers (an owed ACK's) run on time.monotonic(): so does this.
        self.network.receive_batch(batch, batch.count,
                                   time.monotonic() if now is None else now)
        self.network.flush()
        self.read_segments()

    def read_segments(self) -> list[TcpSegment]:
        """Our segments for this connection since the last call; ``acked`` follows them."""
        got = []
        queue = self.network.frames_to_guest
        while queue:
            entry = queue.popleft()
            frame = entry[0] if isinstance(entry, tuple) else entry
            ipv6 = frame[12:14] == b"\x86\xdd"
            start = 54 if ipv6 else 34
            if len(frame) < start + 20 or frame[20 if ipv6 else 23] != 6:
                continue
            segment = TcpSegment.parse(frame[start:])
            if segment.dst_port != self.guest_port:
                continue
            got.append(segment)
            if segment.flags & ACK and not segment.flags & SYN:
                self.acked = max(self.acked, (segment.ack - self.isn - 1) & 0xFFFFFFFF)
        self.acks += got
        return got

    async def connect(self) -> None:
        seen = len(self.acks)
        self.send([self.frame(SYN, -1, ack=0)])  # on loopback the SYN-ACK may come at once
        for _ in range(200):
            self.read_segments()
            synacks = [s for s in self.acks[seen:] if s.flags == SYN | ACK]
            if synacks:
                self.peer_isn = synacks[0].seq
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("no SYN-ACK from the engine")
        self.send([self.frame(ACK)])

    async def finish(self, peer: socket.socket, received: bytearray, size: int = 1000,
                     per_batch: int = 16, csum: int = CSUM_FULL) -> None:
        """Send the rest (from what was acknowledged) until all is acknowledged and received."""
        for _ in range(2000):
            drain(peer, received)
            if self.acked >= len(self.data) and len(received) >= len(self.data):
                return
            if self.acked < len(self.data):
                end = min(len(self.data), self.acked + per_batch * size)
                self.send([self.data_frame(offset, size, csum=csum)
                           for offset in range(self.acked, end, size)])
            await asyncio.sleep(0.002)
        raise AssertionError(f"stream stuck: acked {self.acked}, received {len(received)}")


def drain(peer: socket.socket, into: bytearray) -> None:
    while True:
        try:
            chunk = peer.recv(1 << 20)
        except BlockingIOError:
            return
        if not chunk:
            return
        into += chunk


async def established(loop, family: int, rcvbuf: int | None = None):
    """(network, guest, peer socket) for one connection through the fast-path-enabled Network."""
    listener = socket.socket(socket.AF_INET6 if family == 6 else socket.AF_INET,
                             socket.SOCK_STREAM)
    if rcvbuf is not None:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    listener.bind(("::1" if family == 6 else "127.0.0.1", 0))
    listener.listen(4)
    network = Network(StackConfig(), loop)
    guest = Guest(network, listener.getsockname()[1], family=family)
    await guest.connect()
    peer, _ = listener.accept()
    listener.close()
    peer.setblocking(False)
    return network, guest, peer


def counter(network: Network, name: str) -> int:
    return network.counters().get(name, 0)


@FAMILIES
def test_in_order_data_goes_fast_with_one_ack_per_batch(family: int) -> None:
    async def scenario(loop) -> None:
        network, guest, peer = await established(loop, family)
        try:
            guest.data = os.urandom(5000)
            before = network.counters()
            seen = len(guest.acks)
            guest.send([guest.data_frame(i, 1000) for i in range(0, 5000, 1000)])
            after = network.counters()
            assert after["tcp.fast_segments"] - before.get("tcp.fast_segments", 0) == 5
            assert after["tcp.fast_bytes"] == 5000
            assert after["tcp.segments_in"] - before["tcp.segments_in"] == 5
            assert after["tcp.bytes_to_host"] - before.get("tcp.bytes_to_host", 0) == 5000
            assert after["eth.rx"] - before["eth.rx"] == 5
            ip_rx = "ipv6.rx" if family == 6 else "ipv4.rx"
            assert after[ip_rx] - before[ip_rx] == 5
            assert after.get("tcp6.fast_segments", 0) == (5 if family == 6 else 0)
            acks = guest.acks[seen:]
            assert len(acks) == 1  # one ACK for the whole batch
            assert acks[0].ack == (guest.isn + 1 + 5000) & 0xFFFFFFFF and not acks[0].payload
            flow = next(iter(network.tcp.flows.values()))
            assert acks[0].window == network.tcp.tx.advertised_window(flow)
            assert flow.rcv_nxt == flow.rcv_queued == 5001
            # The checksum may also be left partial (NEEDS_CSUM): not verified, taken.
            guest.data += os.urandom(3000)
            guest.send([guest.data_frame(5000, 3000, csum=CSUM_PARTIAL)])
            assert counter(network, "tcp.fast_segments") == 6
            received = bytearray()
            await guest.finish(peer, received)
            assert bytes(received) == guest.data
        finally:
            peer.close()
            network.close()
    run(scenario)


SLOW_CASES = ["out_of_order", "bad_checksum", "new_window", "zero_window", "new_ack",
              "unregistered", "no_psh"]


@pytest.mark.parametrize("family, case", [(family, case) for family in (4, 6)
                                          for case in SLOW_CASES] + [(6, "extension")])
def test_frames_the_engine_must_see_go_the_python_way(family: int, case: str) -> None:
    async def scenario(loop) -> None:
        network, guest, peer = await established(loop, family)
        try:
            guest.data = os.urandom(6000)
            first = guest.data_frame(0, 1000)
            odd = {
                "out_of_order": guest.data_frame(3000, 1000),
                "bad_checksum": guest.data_frame(1000, 1000, corrupt=True),
                "new_window": guest.data_frame(1000, 1000, window=WINDOW - 1),  # fast: taken
                "zero_window": guest.data_frame(1000, 1000, window=0),
                "new_ack": guest.data_frame(1000, 1000, ack=guest.peer_isn),  # an older ack
                "unregistered": guest.frame(ACK, 0, b"x" * 100, sport=GUEST_PORT + 1),
                "no_psh": guest.frame(ACK, 1000, guest.data[1000:2000]),  # plain ACK is fine: fast
                "extension": guest.data_frame(1000, 1000, extension=True),
            }[case]
            if case == "new_window":
                guest.window = WINDOW - 1  # from now on
            if case == "zero_window":
                guest.window = 0  # from now on: its receive buffer stays full
            later = guest.data_frame(2000, 1000)  # in order after the odd frame, if that was taken
            guest.send([first, odd, later])
            fast = counter(network, "tcp.fast_segments")
            fallbacks = {k: v for k, v in network.counters().items() if "fast_fallback" in k}
            if case in ("no_psh", "new_window"):
                # A new window on data is taken in C too; the engine learns it after the batch.
                assert fast == 3 and not fallbacks, fallbacks
            elif case == "unregistered":
                assert fallbacks["tcp.fast_fallback.not_registered"] == 1
                assert fast == 1  # "later" does not follow "first": out of order
            elif case == "extension":
                # Not TCP right after the fixed header: not even looked at (so not a fallback);
                # the stack walks the header and takes the data, "later" is out of order for C.
                assert fast == 1 and fallbacks["tcp.fast_fallback.out_of_order"] == 1, fallbacks
            else:
                assert fast == 1, fallbacks
                assert fallbacks["tcp.fast_fallback.after_fallback"] == 1
            if case == "zero_window":
                assert fallbacks["tcp.fast_fallback.zero_window"] == 1
            if case == "new_ack":
                assert fallbacks["tcp.fast_fallback.ack_old"] == 1
            if case == "bad_checksum":
                assert counter(network, "tcp.drop.bad_checksum") == 1
            if case == "new_window":
                flow = next(iter(network.tcp.flows.values()))
                assert flow.snd_wnd == (WINDOW - 1) << 7  # the engine learnt it
            received = bytearray()
            await guest.finish(peer, received)
            assert bytes(received) == guest.data
            if case in ("new_window", "zero_window"):
                # Still registered: data with the window the engine has is taken (0 too).
                assert counter(network, "tcp.fast_segments") > fast
        finally:
            peer.close()
            network.close()
    run(scenario)


@FAMILIES
def test_fin_goes_the_python_way_and_unregisters(family: int) -> None:
    async def scenario(loop) -> None:
        network, guest, peer = await established(loop, family)
        try:
            guest.data = os.urandom(3000)
            guest.send([guest.data_frame(0, 1000), guest.data_frame(1000, 1000),
                        guest.frame(ACK | FIN, 2000, guest.data[2000:])])
            assert counter(network, "tcp.fast_segments") == 2
            assert counter(network, "tcp.fast_fallback.flags") == 1
            network.tcp_fast.refresh()
            assert network.tcp_fast.flows == 0  # half-closed: no longer simple
            received = bytearray()
            for _ in range(200):
                drain(peer, received)
                if len(received) == 3000:
                    break
                await asyncio.sleep(0.005)
            assert bytes(received) == guest.data
            await asyncio.sleep(0.01)
            assert peer.recv(10) == b""  # the guest's FIN became shutdown(SHUT_WR)
        finally:
            peer.close()
            network.close()
    run(scenario)


@FAMILIES
def test_rst_unregisters_before_the_socket_closes(family: int) -> None:
    async def scenario(loop) -> None:
        network, guest, peer = await established(loop, family)
        try:
            guest.data = os.urandom(2000)
            fast = network.tcp_fast
            flow_id = next(iter(network.tcp.flows_by_id))
            fd = fast.host.connected_fd(flow_id)
            seen = []

            def before_close(closing: int) -> None:
                os.fstat(fd)  # raises once the socket is closed
                seen.append((closing, fast.kernel.contains(closing)))
                fast.unregister(closing)
            fast.host.set_before_close(before_close)
            guest.send([guest.data_frame(0, 1000), guest.frame(RST | ACK, 1000)])
            assert counter(network, "tcp.fast_segments") == 1
            assert seen == [(flow_id, True)]  # told while the socket was still open and registered
            assert fast.flows == 0 and not fast.kernel.contains(flow_id)
            received = bytearray()
            with pytest.raises(ConnectionResetError):
                for _ in range(200):
                    drain(peer, received)
                    await asyncio.sleep(0.005)
            assert bytes(received) == guest.data[:1000]
            # A late frame of the gone flow is not written anywhere: it is answered with a RST.
            guest.send([guest.data_frame(1000, 1000)])
            assert counter(network, "tcp.fast_segments") == 1
            assert counter(network, "tcp.fast_fallback.not_registered") == 0  # table empty: no pass
        finally:
            peer.close()
            network.close()
    run(scenario)


@FAMILIES
def test_partial_write_when_the_host_socket_is_full_loses_and_repeats_nothing(family: int) -> None:
    async def scenario(loop) -> None:
        network, guest, peer = await established(loop, family, rcvbuf=4096)
        try:
            chunk = 60000
            guest.data = os.urandom(chunk * 150)
            offset = 0
            # The peer does not read: the host socket fills up and one write comes back short.
            for _ in range(150):
                if network.tcp_fast.kernel.partial_writes:
                    break
                frames = [guest.data_frame(o, chunk, csum=CSUM_PARTIAL)
                          for o in range(offset, min(offset + 8 * chunk, len(guest.data)), chunk)]
                guest.send(frames)
                offset = guest.acked
            assert network.tcp_fast.kernel.partial_writes, "the host socket never filled"
            assert counter(network, "tcp.partial_writes") >= 1
            flow = next(iter(network.tcp.flows.values()))
            assert flow.rcv_nxt == guest.acked + 1 == flow.rcv_queued
            received = bytearray()
            await guest.finish(peer, received, size=chunk, per_batch=8, csum=CSUM_PARTIAL)
            assert len(received) == len(guest.data) and bytes(received) == guest.data
        finally:
            peer.close()
            network.close()
    run(scenario)


@FAMILIES
def test_acks_on_data_are_taken_and_a_frame_the_host_did_not_take_keeps_its_ack(family) -> None:
    """Guest data carrying ever newer acks of host data: C takes the acks with the data. When
    the host socket fills, the engine gets the ack of the last frame written from C, and the
    frames not written go the Python way with theirs, in order (also a pure ACK after them)."""
    async def scenario(loop) -> None:
        network, guest, peer = await established(loop, family, rcvbuf=4096)
        try:
            engine = network.tcp
            delivered: list[int] = []
            on_acked = engine.on_acked_elsewhere

            def spy(flow_id: int, ack: int, window: int, now: float) -> None:
                delivered.append(ack)
                on_acked(flow_id, ack, window, now)
            engine.on_acked_elsewhere = spy
            on_streamed = engine.on_streamed_elsewhere

            def streamed_spy(flow_id: int, ack: int, *rest) -> None:  # (relative ack)
                delivered.append(engine.flows_by_id[flow_id].send_seq(ack))
                on_streamed(flow_id, ack, *rest)
            engine.on_streamed_elsewhere = streamed_spy
            flow = next(iter(engine.flows.values()))
            peer.sendall(os.urandom(8000))  # host data for the guest to acknowledge
            for _ in range(200):
                await asyncio.sleep(0.005)
                guest.read_segments()
                if flow.snd_max == 8001:
                    break
            assert flow.snd_max == 8001
            chunk = 60000
            guest.data = os.urandom(chunk * 150)
            acked = 0  # host bytes the guest acknowledges: one more with every frame
            for _ in range(150):
                start = guest.acked
                end = min(start + 8 * chunk, len(guest.data))
                frames = []
                for offset in range(start, end, chunk):
                    acked += 1
                    frames.append(guest.data_frame(offset, chunk, csum=CSUM_PARTIAL,
                                                   ack=(guest.peer_isn + 1 + acked) & 0xFFFFFFFF))
                acked += 1
                frames.append(guest.frame(ACK, end, ack=(guest.peer_isn + 1 + acked) & 0xFFFFFFFF))
                before = counter(network, "tcp.fast_segments")
                delivered.clear()
                guest.send(frames)
                if network.tcp_fast.kernel.partial_writes:
                    break
                assert delivered == [(guest.peer_isn + 1 + acked) & 0xFFFFFFFF]
            assert network.tcp_fast.kernel.partial_writes, "the host socket never filled"
            written = counter(network, "tcp.fast_segments") - before
            assert 0 < written < len(frames) - 1
            last_written = acked - len(frames) + written
            assert delivered == [(guest.peer_isn + 1 + last_written) & 0xFFFFFFFF]
            assert flow.snd_una == 1 + acked  # the frames left to Python brought theirs
            received = bytearray()
            await guest.finish(peer, received, size=chunk, per_batch=8, csum=CSUM_PARTIAL)
            assert bytes(received) == guest.data
        finally:
            peer.close()
            network.close()
    run(scenario)


@FAMILIES
def test_fast_path_counters_reach_the_network_counters_and_sync_is_idempotent(family: int) -> None:
    async def scenario(loop) -> None:
        network, guest, peer = await established(loop, family)
        try:
            guest.data = os.urandom(1000)
            guest.send([guest.data_frame(0, 1000)])
            flow = next(iter(network.tcp.flows.values()))
            state = (flow.rcv_nxt, flow.rcv_queued)
            network.tcp_fast.sync_all(2.0)
            assert (flow.rcv_nxt, flow.rcv_queued) == state == (1001, 1001)
            assert counter(network, "tcp.fast_bytes") == 1000
        finally:
            peer.close()
            network.close()
    run(scenario)


@FAMILIES
def test_truncated_and_bit_flipped_frames_of_a_registered_flow_change_nothing(family: int) -> None:
    async def scenario(loop) -> None:
        network, guest, peer = await established(loop, family)
        try:
            guest.data = os.urandom(4000)
            good, _ = guest.data_frame(0, 1000)
            # Every truncation (the batch holds exactly the short frame) and every single bit
            # flip past the MAC addresses: the checksums or the length checks refuse them all.
            # (IPv6 has no header checksum: its traffic class, flow label and hop limit change
            # nothing the engine reads, so flips there are left out.)
            unchecked = {15, 16, 17, 21} if family == 6 else set()
            broken = [(good[:n], 0) for n in range(len(good))]
            for bit in range(12 * 8, len(good) * 8, 7):
                if bit // 8 in unchecked or (family == 6 and bit // 8 == 14 and bit % 8 < 4):
                    continue
                flipped = bytearray(good)
                flipped[bit // 8] ^= 1 << (bit % 8)
                broken.append((bytes(flipped), 0))
            for start in range(0, len(broken), 60):
                guest.send(broken[start:start + 60])
            assert counter(network, "tcp.fast_segments") == 0
            received = bytearray()
            await guest.finish(peer, received)
            assert bytes(received) == guest.data
            assert counter(network, "tcp.fast_segments") > 0
        finally:
            peer.close()
            network.close()
    run(scenario)


def test_ipv6_guest_address_on_the_same_fold_is_not_taken_for_the_flow() -> None:
    async def scenario(loop) -> None:
        network, guest, peer = await established(loop, 6)
        try:
            guest.data = os.urandom(2000)
            guest.send([guest.data_frame(0, 1000)])
            assert counter(network, "tcp.fast_segments") == 1
            # Two words swapped: the XOR fold (and so the hash and the short key) is the
            # flow's, the address is not. In order, same ack and window: only the address differs.
            twin = GUEST_IP6[8:16] + GUEST_IP6[:8]
            guest.send([guest.data_frame(1000, 1000, src6=twin)])
            assert counter(network, "tcp.fast_segments") == 1
            assert counter(network, "tcp.fast_fallback.not_registered") == 1
            flow = next(iter(network.tcp.flows.values()))
            assert flow.rcv_nxt == 1001  # nothing of the twin's reached the flow
            await asyncio.sleep(0.02)
            received = bytearray()
            drain(peer, received)
            assert bytes(received) == guest.data[:1000]
        finally:
            peer.close()
            network.close()
    run(scenario)


def test_the_mirror_is_brought_up_to_date_when_the_work_is_done() -> None:
    """After the network's flush (the end of a guest batch's work) no changed flow waits
    for the next batch's refresh: that one then goes straight to its write."""
    async def scenario(loop) -> None:
        network, guest, peer = await established(loop, 4)
        try:
            flow = next(iter(network.tcp.flows.values()))
            assert network.tcp_fast.flows == 1  # the handshake's last ACK registered it
            network.tcp.table.touch(flow.flow_id)
            network.flush()
            assert not network.tcp.table.take_changed()
        finally:
            peer.close()
            network.close()
    run(scenario)


def test_a_flow_that_changed_leaves_the_mirror_at_the_flush() -> None:
    """The refresh returns at once when nothing changed, but a changed flow is still seen: one
    that is no longer simple (its host side at EOF) is dropped from the C table."""
    async def scenario(loop) -> None:
        network, guest, peer = await established(loop, 4)
        try:
            flow = next(iter(network.tcp.flows.values()))
            assert network.tcp_fast.flows == 1
            network.flush()  # nothing changed: the entry stays
            assert network.tcp_fast.flows == 1
            flow.host_eof = True
            network.tcp.table.touch(flow.flow_id)
            network.flush()
            assert network.tcp_fast.flows == 0
            assert not network.tcp.table.changed
        finally:
            peer.close()
            network.close()
    run(scenario)


def test_a_window_no_raw_field_gives_back_leaves_the_mirror() -> None:
    """The C entry carries the raw window the engine's snd_wnd comes from; a scaled window no
    raw field gives back exactly keeps the flow on the Python path, and one that does brings
    it back."""
    async def scenario(loop) -> None:
        network, guest, peer = await established(loop, 4)
        try:
            flow = next(iter(network.tcp.flows.values()))
            assert network.tcp_fast.flows == 1
            flow.snd_wscale, saved = 2, flow.snd_wnd
            flow.snd_wnd = 4 * 1000 + 1
            network.tcp.table.touch(flow.flow_id)
            network.flush()
            assert network.tcp_fast.flows == 0
            flow.snd_wnd = 4 * 1000
            network.tcp.table.touch(flow.flow_id)
            network.flush()
            assert network.tcp_fast.flows == 1
            flow.snd_wscale, flow.snd_wnd = 0, saved
            network.tcp.table.touch(flow.flow_id)
            network.flush()
        finally:
            peer.close()
            network.close()
    run(scenario)
