"""The host socket's reader across request/response exchanges: registered once, not removed
and added again per reply (each would be an epoll_ctl), and no reply is missed."""

from __future__ import annotations

import asyncio

from tests.tcp.test_hostio_tcp import GATEWAY, GuestTcp, new_setup, run_until
from vhostnet.stack.config import StackConfig
from vhostnet.tcp.host import TcpHost

EXCHANGES = 30


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()


def test_the_reader_stays_registered_across_exchanges() -> None:
    loop, net, engine = new_setup(StackConfig())
    calls: list[str] = []
    add_reader, remove_reader = loop.add_reader, loop.remove_reader

    def counting_add(fd, callback, *args):
        calls.append("add")
        return add_reader(fd, callback, *args)

    def counting_remove(fd):
        calls.append("remove")
        return remove_reader(fd)

    async def scenario() -> None:
        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        host = TcpHost(engine, loop)
        try:
            guest = GuestTcp(net, 42000, GATEWAY, port)
            net.conns[42000] = guest
            guest.connect()
            await run_until(net, engine, host, lambda: guest.established, timeout=10)
            loop.add_reader, loop.remove_reader = counting_add, counting_remove
            expected = 0
            for index in range(EXCHANGES):
                request = f"request {index} ".encode() * (index + 1)
                expected += len(request)
                guest.send(request)
                await run_until(net, engine, host,
                                lambda want=expected: len(guest.received) == want, timeout=10)
            assert guest.received == guest.outgoing
            # Old behaviour: removed on every reply, added again after its peek.
            assert calls.count("add") <= 1 and calls.count("remove") == 0, calls
            guest.send(b"", then_close=True)
            await run_until(net, engine, host, lambda: not engine.flows, timeout=10)
        finally:
            host.close()
            server.close()
            await server.wait_closed()

    loop.run_until_complete(scenario())
    loop.close()
