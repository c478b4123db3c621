"""Routing between guests through the gateway MAC, VM-less against a real ``vhostnet
--max-guests 2``: a datagram guest 1 sends to the gateway's MAC for guest 2's address
reaches guest 2 from the gateway (TTL one less, header checksum right) and is not NATed
out by guest 1's router."""

from __future__ import annotations

from tests.support.daemon import VhostnetProcess
from tests.support.frames import GATEWAY_IP, checksum
from tests.test_several_guests import (
    MAC1,
    MAC2,
    SECOND,
    Guest,
    gateway_mac_of,
    is_udp,
    vhostnet,  # noqa: F401  (the fixture)
)


def test_a_frame_to_the_gateway_for_the_other_guest_is_routed_to_it(
        vhostnet: VhostnetProcess) -> None:  # noqa: F811
    one = Guest(vhostnet.socket_path, MAC1)
    two = Guest(vhostnet.socket_path, MAC2)
    try:
        one.dhcp()
        assert two.dhcp() == SECOND
        gateway = gateway_mac_of(one)
        assert gateway_mac_of(two) == gateway
        two.drain()
        sent = one.udp_to(gateway, SECOND, 4000, 5000, b"through the gateway")
        got = two.wait_for(lambda f: is_udp(f, dport=5000), "guest 1's routed datagram")
        assert got[:6] == MAC2 and got[6:12] == gateway
        assert got[22] == sent[22] - 1 and checksum(got[14:34]) == 0
        assert got[34:] == sent[34:]
        stats = vhostnet.stats()
        assert stats["switch.routed"] == 1
        assert stats.get("udp.flows", 0) == 0  # guest 1's router NATed nothing
        # To the gateway's own address it still goes to guest 1's router, as before.
        one.udp_to(gateway, GATEWAY_IP, 4001, 9, b"for the host")
        assert not [f for f in two.drain() if is_udp(f, dport=9)]
        assert vhostnet.stats()["switch.routed"] == 1
    finally:
        one.close()
        two.close()
