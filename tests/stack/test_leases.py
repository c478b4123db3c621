"""LeasePool: leases per MAC, reservations, pool order, IPv6, names, resolve, bounds, state."""

from __future__ import annotations

import json

import pytest

from vhostnet.stack.config import StackConfig, ip4, ip6
from vhostnet.stack.leases import (
    TYPE_A,
    TYPE_AAAA,
    LeasePool,
    NxDomain,
    PoolExhausted,
    Reservation,
    check_domain,
    parse_dhcp_host,
    parse_dhcp_range,
    sanitise_name,
)

MAC1, MAC2, MAC3 = (bytes.fromhex(f"5254000000{n:02x}") for n in (1, 2, 3))
RESERVED_MAC = bytes.fromhex("5254000000aa")


def pool(**fields) -> LeasePool:
    return StackConfig(**fields).lease_pool()


def test_leases_follow_the_first_address_and_stay_with_their_mac() -> None:
    leases = pool()
    first, second = leases.lease_for(MAC1), leases.lease_for(MAC2)
    assert (first.ipv4, second.ipv4) == (ip4("10.0.2.15"), ip4("10.0.2.16"))
    assert (first.ipv6, second.ipv6) == (ip6("fec0::100"), ip6("fec0::101"))
    assert leases.lease_for(MAC1) == first and leases.lease_for(MAC2) == second
    assert [lease.mac for lease in leases.leases()] == [MAC1, MAC2]


def test_the_pool_skips_vhostnets_own_addresses_and_wraps_round_the_subnet() -> None:
    leases = pool(guest_ipv4="10.0.2.253", gateway="10.0.2.254", dns="10.0.2.1")
    got = [leases.lease_for(bytes([0x52, 0x54, 0, 0, 1, n])).ipv4 for n in range(3)]
    # .254 is the gateway, .255 the broadcast, .0 the network, .1 the DNS address.
    assert got == [ip4("10.0.2.253"), ip4("10.0.2.2"), ip4("10.0.2.3")]


def test_a_range_is_the_only_source_and_exhaustion_is_counted() -> None:
    leases = pool(dhcp_range=(ip4("10.0.2.100"), ip4("10.0.2.101")))
    assert leases.lease_for(MAC1).ipv4 == ip4("10.0.2.100")
    assert leases.lease_for(MAC2).ipv4 == ip4("10.0.2.101")
    with pytest.raises(PoolExhausted):
        leases.lease_for(MAC3)
    assert leases.counters()["leases.exhausted"] == 1
    assert leases.lease_for(MAC1).ipv4 == ip4("10.0.2.100")  # a holder still gets its own


def test_at_most_max_leases_macs_hold_a_lease() -> None:
    leases = pool(max_leases=2)
    leases.lease_for(MAC1)
    leases.lease_for(MAC2)
    with pytest.raises(PoolExhausted):
        leases.lease_for(MAC3)


def test_a_reservation_wins_and_is_never_leased_to_another_mac() -> None:
    leases = pool(dhcp_hosts=[Reservation(RESERVED_MAC, ip4("10.0.2.16"), "db"),
                              Reservation(RESERVED_MAC, ip6("fec0::100"))])
    assert leases.lease_for(MAC1).ipv4 == ip4("10.0.2.15")
    lease = leases.lease_for(MAC2)
    assert lease.ipv4 == ip4("10.0.2.17") and lease.ipv6 == ip6("fec0::102")
    reserved = leases.lease_for(RESERVED_MAC)
    assert (reserved.ipv4, reserved.ipv6, reserved.name, reserved.reserved) == (
        ip4("10.0.2.16"), ip6("fec0::100"), "db", True)
    assert leases.held_by_other(MAC1, ip4("10.0.2.16"))
    assert not leases.held_by_other(RESERVED_MAC, ip4("10.0.2.16"))
    assert leases.mac_of(ip6("fec0::100")) == RESERVED_MAC


@pytest.mark.parametrize(("reservations", "sentence"), [
    ([Reservation(MAC1, ip4("10.0.2.50")), Reservation(MAC2, ip4("10.0.2.50"))],
     "reserved twice"),
    ([Reservation(MAC1, ip4("10.0.2.50")), Reservation(MAC1, ip4("10.0.2.51"))],
     "two addresses of one family"),
    ([Reservation(MAC1, ip4("10.0.2.50"), "a"), Reservation(MAC2, ip4("10.0.2.51"), "a")],
     "given to two guests"),
    ([Reservation(MAC1, ip4("10.0.3.50"))], "outside"),
    ([Reservation(MAC1, ip6("2001:db8::1"))], "outside"),
    ([Reservation(MAC1, ip4("10.0.2.3"))], "vhostnet's own"),
    ([Reservation(MAC1, ip4("10.0.2.50"), "host")], "given to two guests"),
])
def test_reservations_that_cannot_be_are_refused(reservations, sentence: str) -> None:
    with pytest.raises(ValueError, match=sentence):
        pool(dhcp_hosts=reservations)


def test_held_by_other_covers_leases_and_learned_ipv6() -> None:
    leases = pool()
    one = leases.lease_for(MAC1)
    leases.lease_for(MAC2)
    leases.add_ipv6(MAC1, ip6("fec0::5054:ff:fe00:1"))
    assert leases.held_by_other(MAC2, one.ipv4) and leases.held_by_other(None, one.ipv4)
    assert not leases.held_by_other(MAC1, one.ipv4)
    assert leases.held_by_other(MAC2, ip6("fec0::5054:ff:fe00:1"))
    assert not leases.held_by_other(MAC2, ip4("10.0.2.99"))
    leases.add_ipv6(MAC2, ip6("fec0::5054:ff:fe00:1"))  # MAC1's: not taken from it
    assert leases.mac_of(ip6("fec0::5054:ff:fe00:1")) == MAC1
    assert leases.counters()["leases.ipv6_conflict"] == 1


def test_names_are_one_label_and_first_come_first_served() -> None:
    assert sanitise_name("My_Laptop.example.org") == "my-laptop"
    assert sanitise_name("--") is None and sanitise_name("x" * 80) == "x" * 63
    leases = pool()
    leases.lease_for(MAC1)
    leases.lease_for(MAC2)
    leases.set_name(MAC1, "Web")
    leases.set_name(MAC2, "web")  # MAC1 holds it
    leases.set_name(MAC3, "other")  # no lease yet
    leases.set_name(MAC2, "!!!")
    assert [lease.name for lease in leases.leases()] == ["web", None]
    counters = leases.counters()
    assert (counters["leases.name_refused"], counters["leases.name_no_lease"],
            counters["leases.name_invalid"]) == (1, 1, 1)
    leases.set_name(MAC1, "web2")  # a new name frees the old one
    leases.set_name(MAC2, "web")
    assert [lease.name for lease in leases.leases()] == ["web2", "web"]


def test_a_reserved_name_is_kept() -> None:
    leases = pool(dhcp_hosts=[Reservation(MAC1, ip4("10.0.2.50"), "db")])
    leases.lease_for(MAC1)
    leases.set_name(MAC1, "something-else")
    assert leases.lease_for(MAC1).name == "db"


def test_resolve_answers_our_domain_and_leaves_the_rest_upstream() -> None:
    leases = pool(dhcp_hosts=[Reservation(RESERVED_MAC, ip6("fec0::99"), "six")])
    lease = leases.lease_for(MAC1)
    leases.set_name(MAC1, "web")
    assert leases.resolve("web.vhostnet.internal", TYPE_A) == [lease.ipv4]
    assert leases.resolve("WEB.Vhostnet.Internal.", TYPE_A) == [lease.ipv4]
    # The dynamic IPv6 lease is not answered until the guest uses (or is given) it.
    assert leases.resolve("web.vhostnet.internal", TYPE_AAAA) == []
    leases.add_ipv6(MAC1, lease.ipv6)
    leases.add_ipv6(MAC1, ip6("fe80::1"))  # link-local: never answered
    assert leases.resolve("web.vhostnet.internal", TYPE_AAAA) == [lease.ipv6]
    assert leases.resolve("six.vhostnet.internal", TYPE_AAAA) == [ip6("fec0::99")]
    assert leases.resolve("six.vhostnet.internal", TYPE_A) == []
    assert leases.resolve("web.vhostnet.internal", 16) == []  # TXT: no data, NOERROR
    assert leases.resolve("host.vhostnet.internal", TYPE_A) == [ip4("10.0.2.2")]
    assert leases.resolve("host.vhostnet.internal", TYPE_AAAA) == [ip6("fec0::2")]
    missing = leases.resolve("nobody.vhostnet.internal", TYPE_A)
    assert isinstance(missing, NxDomain) and missing == []
    assert not isinstance(leases.resolve("web.vhostnet.internal", 16), NxDomain)
    assert leases.resolve("example.org", TYPE_A) is None
    assert leases.resolve("internal", TYPE_A) is None


def test_the_domain_and_host_mapping_follow_the_config() -> None:
    leases = pool(dns_domain="lab.test", map_host_loopback=None, map_host_loopback6=None)
    leases.lease_for(MAC1)
    leases.set_name(MAC1, "a")
    assert leases.resolve("a.lab.test", TYPE_A) == [ip4("10.0.2.15")]
    assert isinstance(leases.resolve("host.lab.test", TYPE_A), NxDomain)
    assert leases.resolve("a.vhostnet.internal", TYPE_A) is None


def test_snapshot_and_restore_keep_leases_names_and_learned_addresses() -> None:
    reservations = [Reservation(RESERVED_MAC, ip4("10.0.2.50"), "db")]
    leases = pool(dhcp_hosts=reservations)
    for mac in (MAC1, MAC2, RESERVED_MAC):
        leases.lease_for(mac)
    leases.set_name(MAC2, "two")
    leases.add_ipv6(MAC2, ip6("fec0::2:2"))
    state = json.loads(json.dumps(leases.snapshot()))
    again = pool(dhcp_hosts=reservations)
    again.restore(state)
    assert again.leases() == leases.leases()
    assert again.resolve("two.vhostnet.internal", TYPE_AAAA) == [ip6("fec0::2:2")]
    assert again.lease_for(MAC3).ipv4 == ip4("10.0.2.17")  # next after the restored ones


def test_restore_lets_reservations_win_and_refuses_garbage() -> None:
    leases = pool()
    leases.lease_for(MAC1)  # 10.0.2.15
    state = leases.snapshot()
    reserved = pool(dhcp_hosts=[Reservation(MAC2, ip4("10.0.2.15"))])
    reserved.restore(state)
    assert reserved.lease_for(MAC2).ipv4 == ip4("10.0.2.15")
    assert reserved.lease_for(MAC1).ipv4 == ip4("10.0.2.16")
    assert reserved.counters()["leases.restore_conflict"] == 1
    for bad in ({}, {"leases": [{"mac": "zz"}]}, {"leases": [{"mac": "00", "ipv4": None,
                                                             "ipv6": None, "name": None,
                                                             "learned6": []}]}):
        with pytest.raises(ValueError):
            reserved.restore(bad)
    assert reserved.lease_for(MAC2).ipv4 == ip4("10.0.2.15")  # unchanged


def test_command_line_values() -> None:
    assert parse_dhcp_host("52:54:00:00:00:01,10.0.2.50,DB") == Reservation(
        MAC1, ip4("10.0.2.50"), "db")
    assert parse_dhcp_host("52:54:00:00:00:01,fec0::50") == Reservation(MAC1, ip6("fec0::50"))
    for bad in ("52:54:00:00:00:01", "52:54:00:00:01,10.0.2.50", "53:54:00:00:00:01,10.0.2.5",
                "52:54:00:00:00:01,10.0.2.500", "52:54:00:00:00:01,10.0.2.5,a.b",
                "52:54:00:00:00:01,10.0.2.5,x,y"):
        with pytest.raises(ValueError, match="--dhcp-host"):
            parse_dhcp_host(bad)
    assert parse_dhcp_range("10.0.2.100") == (ip4("10.0.2.100"), None)
    assert parse_dhcp_range("10.0.2.100-10.0.2.120") == (ip4("10.0.2.100"), ip4("10.0.2.120"))
    for bad in ("10.0.2.120-10.0.2.100", "fec0::1", "10.0.2.1-x"):
        with pytest.raises(ValueError, match="--dhcp-range"):
            parse_dhcp_range(bad)
    assert check_domain("Lab.Example.") == "lab.example"
    for bad in ("", "a..b", "a_b.test", "-a.test"):
        with pytest.raises(ValueError, match="--dns-domain"):
            check_domain(bad)
    config = StackConfig(dhcp_range=(ip4("10.0.2.100"), None))
    assert config.dhcp_range == (ip4("10.0.2.100"), ip4("10.0.2.254"))
    with pytest.raises(ValueError, match="outside the guest subnet"):
        StackConfig(dhcp_range=(ip4("10.0.3.100"), None))
    with pytest.raises(ValueError, match="max-guests"):
        StackConfig(max_guests=65)
