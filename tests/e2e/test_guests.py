"""Several guests on one vhostnet (issue 16), with real guests: one boot of the whole LAN.

One vhostnet started with ``--max-guests 3``, a ``--dhcp-host`` reservation for guest 2 and a
control socket. On it, booted once for the whole module:

* guest 1 and guest 2: QEMU 10.0 under TCG, ``-netdev vhost-user``, shared memfd memory,
  different MACs. Guest 1 gives its host name with udhcpc's ``-x hostname:guest1``; guest 2
  gets address and name from the reservation (``--dhcp-host MAC,ADDR,guest2``);
* guest 3: QEMU 7.2 with ``-netdev stream`` (started once guest 1 holds its lease, so the
  pool's next free address is known), host name ``guest3``.

The module's tests then read what the guests printed, in this order: different leases (and
``vhostnet ctl guests``/``leases``: address, name, connected); pings between guests 1 and 2 by
address and by name, IPv4 and IPv6; ``host.vhostnet.internal``; ARP requests answered by the
peer itself (not by the guest's own router) and by the router for the gateway; a 20 MiB
guest-to-guest transfer checked by sha256 (the receiver's ``nc -e sha256sum`` answers the
digest); a download from a host server by each guest; guest 3 reaching the other two (ARP,
ping by address and name, a broadcast ping answered by both); a fourth front-end refused while
the three stay; a forward to guest 2 added and removed with ``vhostnet ctl``; guest 1 killed
(SIGKILL) and restarted while two transfers are held half way (guest 2's download from a paced
host server, guest 3's upload to guest 2): both end whole (sha256), and guest 1 gets its old
lease back.

A guest script waits for its peers with bounded retries (``wait_until``), so boot order and
speed do not matter; every wait here is bounded too.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import LOG_SECTIONS
from tests.e2e.guestlib import GATEWAY, GUEST_ADDRESS, VhostnetError, VhostnetProcess, ping_check
from tests.e2e.hostservers import (
    HttpFileServer,
    PacedHttpServer,
    free_port,
    generated_bytes,
    sha256_hex,
)
from tests.e2e.test_ctl import ask_guest, ctl, port_binds
from tools.guest_ipv6 import WAIT_FOR_SLAAC
from tools.guestkit import Kit
from tools.qemu import QemuGuest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

DOMAIN = "vhostnet.internal"
MACS = {1: "52:54:00:16:00:01", 2: "52:54:00:16:00:02", 3: "52:54:00:16:00:03"}
ADDRESSES = {1: GUEST_ADDRESS,   # the first -a address: the first guest without a reservation
             2: "10.0.2.20",     # reserved with --dhcp-host
             3: "10.0.2.16"}     # the next free address after guest 1's
BROADCAST = "10.0.2.255"
GATEWAY_MAC = "52:56:00:00:00:02"  # QEMU's, vhostnet's default -M
FORWARD_PORT = 8081              # guest 2's listener for the run-time forward
TRANSFER_PORT = 5001             # guest 2's `nc -l -e sha256sum`
HELD_PORT = 5002                 # guest 2's listener for guest 3's transfer held over the kill
HELD_MIB = 8                     # half of it goes before the kill, the rest after the restart
TRANSFER_MIB = 20
TRANSFER_LIMIT = 240             # seconds for the whole transfer, retries included
DOWNLOAD_BYTES = 4 * 1024 * 1024
DOWNLOAD_SEED = 16_0001
PACED_BYTES = 8 * 1024 * 1024
PACED_SEED = 16_0002
PACED_SECONDS = 8.0              # the body's pace before and after the hold
ANSWER = "hello from guest2"
PEER_WAIT = 120                  # tries (a second or two each) for a peer to come up
CHECK_WAIT = 10                  # tries for a check once the peer is known to be up
BOOT_TIMEOUT = 300.0             # boot + DHCP of a TCG guest on a loaded 2-core machine
STEP_TIMEOUT = 300.0             # one step of a guest script (pings, transfer...)
GUEST_MEMORY_MB = 320            # 20 MiB of transfer data and an 8 MiB download in RAM


def name(index: int) -> str:
    return f"guest{index}.{DOMAIN}"


def slaac_address(mac: str) -> str:
    """The guest's SLAAC address in fec0::/64 (EUI-64 from the MAC, as test_ipv6 checks)."""
    octets = bytes.fromhex(mac.replace(":", ""))
    eui = bytes([octets[0] ^ 2]) + octets[1:3] + b"\xff\xfe" + octets[3:]
    return str(ipaddress.IPv6Address(b"\xfe\xc0" + bytes(6) + eui))


def answered_by(macs: str) -> list[str]:
    """The MACs of an `arp_check` result, written as MACS are (two lower-case digits each)."""
    return sorted(":".join(f"{int(part, 16):02x}" for part in mac.split(":"))
                  for mac in macs.split())


# --- guest shell ------------------------------------------------------------------

WAIT_UNTIL = """
wait_until() {  # wait_until TRIES COMMAND...: retry about once a second, bounded
    left=$1; shift
    while [ "$left" -gt 0 ]; do
        if "$@" >/dev/null 2>&1; then return 0; fi
        left=$((left-1)); sleep 1
    done
    return 1
}
"""


def join_lan(hostname: str | None) -> str:
    """Link up, broadcast pings answered, DHCP (with a host name if given): RESULT ip4."""
    option = f" -x hostname:{hostname}" if hostname else ""
    return WAIT_UNTIL + f"""
ip link set eth0 up
echo 0 > /proc/sys/net/ipv4/icmp_echo_ignore_broadcasts
timeout 90 udhcpc -i eth0 -n -q -t 20 -T 2{option}
echo "RESULT ip4=$(ip -4 -o addr show eth0 | sed -n 's/.* inet \\([0-9.]*\\)\\/.*/\\1/p')"
cat /etc/resolv.conf
"""


def reach(target: str, result: str, family: str = "", tries: int = CHECK_WAIT) -> str:
    """Wait (bounded) until `target` answers one ping, then ping it 3 times: RESULT result."""
    ping = f"{family} {target}".strip()
    return f"wait_until {tries} ping -c 1 -W 1 {ping}\n" + ping_check(ping, name=result)


def resolve(host: str, result: str, qtype: str = "a") -> str:
    """nslookup `host` (A or AAAA) through the DHCP-given server: RESULT result=first address."""
    return (f"wait_until {CHECK_WAIT} timeout 3 nslookup -type={qtype} {host}\n"
            f"timeout 5 nslookup -type={qtype} {host} > /tmp/{result}.out 2>&1\n"
            f"cat /tmp/{result}.out\n"
            f"echo \"RESULT {result}=$(sed -n '/^Name:/,$ s/^Address:* *\\([0-9a-f.:]*\\).*/\\1/p'"
            f" /tmp/{result}.out | head -n 1)\"\n")


def arp_check(target: str, result: str) -> str:
    """arping `target` (its first request a broadcast): RESULT result=ok|fail and
    result_macs= the MACs that answered (space separated)."""
    return (f"if arping -c 2 -w 10 -I eth0 {target} > /tmp/{result}.out 2>&1; "
            f"then echo RESULT {result}=ok; else echo RESULT {result}=fail; fi\n"
            f"cat /tmp/{result}.out\n"
            f"echo \"RESULT {result}_macs=$(sed -n 's/.*reply from [0-9.]* \\[\\([0-9a-fA-F:]*\\)\\].*/"
            f"\\1/p' /tmp/{result}.out | sort -u | tr '\\n' ' ')\"\n")


def download(port: int, result: str) -> str:
    return (f"timeout 200 wget -q -O - http://{GATEWAY}:{port}/small.bin | sha256sum > /tmp/dl\n"
            f"echo \"RESULT {result}=$(cut -d' ' -f1 /tmp/dl)\"\n")


def pings_to(peer: int) -> str:
    """Guest to `peer`: IPv4 and IPv6 by address (waiting for the peer to come up), then by
    name (the names resolved first). The peer's IPv6 address is reached before its name is
    asked: the peer may answer IPv4 before its SLAAC address has passed duplicate detection,
    and vhostnet names only addresses it has seen the guest claim."""
    return (reach(ADDRESSES[peer], "ping4_address", tries=PEER_WAIT)
            + reach(slaac_address(MACS[peer]), "ping6_address", "-6")
            + resolve(name(peer), "name4") + resolve(name(peer), "name6", "aaaa")
            + reach(name(peer), "ping4_name")
            + reach(name(peer), "ping6_name", "-6"))


def send_data(address: str, port: int) -> str:
    """Send TRANSFER_MIB random MiB to a listener that answers their sha256 (`nc -e sha256sum`):
    RESULT sent_sha256, peer_sha256, transfer_seconds, transfer_retries, and the MAC the
    guest's neighbour table had for `address` (transfer_neighbour)."""
    return f"""
dd if=/dev/urandom of=/tmp/data bs=1M count={TRANSFER_MIB} 2>/dev/null
echo "RESULT sent_sha256=$(sha256sum /tmp/data | cut -d' ' -f1)"
echo "RESULT transfer_neighbour=$(ip neigh show {address} | sed -n 's/.*lladdr \\([0-9a-f:]*\\).*/\\1/p')"
started=$(date +%s)
uptime_started=$(cut -d' ' -f1 /proc/uptime)
i=0
# Retried while the listener is not up yet (refused at once); {TRANSFER_LIMIT} s in all.
while [ $i -lt 30 ] && [ $(( $(date +%s) - started )) -lt {TRANSFER_LIMIT} ]; do
    timeout {TRANSFER_LIMIT} nc {address} {port} < /tmp/data > /tmp/peer.sum \
        && [ -s /tmp/peer.sum ] && break
    i=$((i+1)); sleep 2
done
echo "RESULT transfer_seconds=$(awk -v t0=$uptime_started '{{print $1 - t0}}' /proc/uptime)"
echo "RESULT transfer_retries=$i"
echo "RESULT peer_sha256=$(cut -d' ' -f1 /tmp/peer.sum)"
rm -f /tmp/data
"""


IDLE = "echo RESULT script=idle\nsleep 900\n"  # stay on the switch until the test ends


def guest1_script(http_port: int) -> str:
    return (join_lan("guest1") + WAIT_FOR_SLAAC + pings_to(2)
            + resolve(f"host.{DOMAIN}", "host_name")
            + arp_check(ADDRESSES[2], "arp_peer") + arp_check(GATEWAY, "arp_gateway")
            + send_data(ADDRESSES[2], TRANSFER_PORT)
            + download(http_port, "download_sha256") + IDLE)


def listeners() -> str:
    """Guest 2's listeners: the two transfers' (answer the sha256 of what came) and the forward's
    (answers ANSWER; RESULT got= what the host sent, once the connection is over)."""
    return f"""
timeout 600 nc -l -p {TRANSFER_PORT} -e sha256sum &
timeout 900 nc -l -p {HELD_PORT} -e sha256sum &
(echo '{ANSWER}' | timeout 900 nc -l -p {FORWARD_PORT} > /tmp/got
 echo "RESULT got=$(cat /tmp/got)") &
"""


def paced_download(port: int) -> str:
    """Retry (bounded) until the test's paced server is up, then download: RESULT paced_*."""
    return f"""
i=0
while [ $i -lt 600 ]; do
    timeout 600 wget -q -O /tmp/paced.bin http://{GATEWAY}:{port}/paced.bin && break
    i=$((i+1)); sleep 1
done
echo "RESULT paced_waits=$i"
echo "RESULT paced_sha256=$(sha256sum /tmp/paced.bin | cut -d' ' -f1)"
"""


def guest2_script(http_port: int, paced_port: int) -> str:
    return (join_lan(None) + listeners() + WAIT_FOR_SLAAC + pings_to(1)
            + arp_check(ADDRESSES[1], "arp_peer") + arp_check(GATEWAY, "arp_gateway")
            + download(http_port, "download_sha256") + paced_download(paced_port) + IDLE)


def held_transfer(trigger_port: int) -> str:
    """Guest 3 to guest 2 over one TCP connection that spans guest 1's kill and restart: half
    the data, RESULT held_half_sent, then the rest once the test serves `trigger_port`."""
    half = HELD_MIB * 1024 * 1024 // 2
    return f"""
dd if=/dev/urandom of=/tmp/held bs=1M count={HELD_MIB} 2>/dev/null
echo "RESULT held_sha256=$(sha256sum /tmp/held | cut -d' ' -f1)"
(
    head -c {half} /tmp/held
    echo "RESULT held_half_sent=1" >&2
    wait_until 600 wget -q -O /dev/null http://{GATEWAY}:{trigger_port}/go
    tail -c +{half + 1} /tmp/held
) | timeout 900 nc {ADDRESSES[2]} {HELD_PORT} > /tmp/held.sum
echo "RESULT held_peer_sha256=$(cut -d' ' -f1 /tmp/held.sum)"
"""


def guest3_script(trigger_port: int) -> str:
    return (join_lan("guest3") + WAIT_FOR_SLAAC
            + reach(ADDRESSES[1], "ping_guest1_address", tries=PEER_WAIT)
            + reach(name(1), "ping_guest1_name")
            + reach(ADDRESSES[2], "ping_guest2_address") + reach(name(2), "ping_guest2_name")
            + reach(slaac_address(MACS[2]), "ping6_guest2_address", "-6")
            + arp_check(ADDRESSES[1], "arp_guest1") + arp_check(ADDRESSES[2], "arp_guest2")
            + f"""
ping -c 3 -W 5 {BROADCAST} > /tmp/bcast.out 2>&1
cat /tmp/bcast.out
echo "RESULT broadcast_repliers=$(sed -n 's/^[0-9]* bytes from \\([0-9.]*\\):.*/\\1/p' \\
    /tmp/bcast.out | sort -u | tr '\\n' ' ')"
""" + held_transfer(trigger_port) + IDLE)


def restarted_guest1_script() -> str:
    return join_lan("guest1") + reach(name(2), "ping4_name", tries=PEER_WAIT) + IDLE


# --- the LAN, booted once ---------------------------------------------------------


@dataclasses.dataclass
class Lan:
    server: VhostnetProcess
    control: str
    kit: Kit
    folder: Path
    guests: dict[int, QemuGuest]
    http: HttpFileServer
    paced_port: int
    trigger_port: int
    boots: int = 0

    def start_guest(self, index: int, version: str, script: str, **kwargs: Any) -> QemuGuest:
        self.boots += 1
        serial = self.folder / f"guest{index}-{self.boots}.serial"
        machine = QemuGuest(self.kit, version, socket_path=self.server.socket_path,
                            script=script, mac=MACS[index], memory_mb=GUEST_MEMORY_MB,
                            serial_log=serial, **kwargs)
        self.guests[index] = machine
        return machine.start()

    def log_readers(self) -> list[tuple[str, Callable[[], str]]]:
        """(title, read) for vhostnet's log and each guest's console and QEMU stderr, read
        when a report is made (the guest booted last under each number)."""
        readers: list[tuple[str, Callable[[], str]]] = [("vhostnet log", self.server.log_text)]
        for index in MACS:
            readers += [
                (f"guest {index} console",
                 lambda i=index: self.guests[i].output() if i in self.guests else ""),
                (f"guest {index} QEMU stderr",
                 lambda i=index: self.guests[i].qemu_stderr() if i in self.guests else "")]
        return readers

    def result(self, index: int, field: str, timeout: float = STEP_TIMEOUT) -> str:
        """Wait for guest `index` to print `RESULT field=...`; its value."""
        machine = self.guests[index]
        machine.wait_for(rf"^RESULT {field}=", timeout)
        return machine.results()[field]

    def ctl_json(self, *args: str) -> dict[str, Any]:
        return json.loads(ctl(self.control, "--json", *args))


@pytest.fixture(scope="module")
def lan(kit: Kit) -> Iterator[Lan]:
    if kit.qemu10 is None:
        reason = f"QEMU 10.0 unavailable: {kit.qemu10_reason}"
        print(reason)
        pytest.skip(reason)
    folder = Path(tempfile.mkdtemp(prefix="vhn-lan-", dir="/tmp"))  # short socket paths
    control = str(folder / "control.sock")
    server = VhostnetProcess(
        folder / "vhost.sock",
        ("--max-guests", "3", "--control", control,
         "--dhcp-host", f"{MACS[2]},{ADDRESSES[2]},guest2"),
        folder / "vhostnet.log")
    http = HttpFileServer("small.bin", generated_bytes(DOWNLOAD_BYTES, DOWNLOAD_SEED))
    lan = Lan(server, control, kit, folder, {}, http, free_port(), free_port())
    try:
        try:
            server.start()
        except VhostnetError as error:
            pytest.fail(str(error), pytrace=False)
        lan.start_guest(1, "10.0", guest1_script(http.port))
        lan.start_guest(2, "10.0", guest2_script(http.port, lan.paced_port))
        yield lan
    finally:
        for machine in lan.guests.values():
            machine.kill()
        http.close()
        crashed = not server.running() and not server.expected_exit
        code = server.stop()
        shutil.rmtree(folder, ignore_errors=True)
        if crashed or code not in (0, -15, None):
            pytest.fail(f"vhostnet exited with {code} during the module:\n{server.log_tail()}",
                        pytrace=False)


@pytest.fixture(autouse=True)
def _lan_logs(request: pytest.FixtureRequest, lan: Lan) -> Iterator[None]:
    """On a failure, the vhostnet log and every guest's console go with the report."""
    request.node.stash.setdefault(LOG_SECTIONS, []).extend(lan.log_readers())
    yield
    assert lan.server.running(), f"vhostnet died:\n{lan.server.log_tail()}"


def guest3(lan: Lan) -> QemuGuest:
    """Guest 3 (7.2, stream) boots once guest 1 holds its lease: the next free one is known."""
    if 3 not in lan.guests:
        lan.result(1, "ip4", BOOT_TIMEOUT)
        lan.start_guest(3, "7.2", guest3_script(lan.trigger_port), stream=True)
    return lan.guests[3]


def by_mac(lan: Lan, command: str) -> dict[str, dict[str, Any]]:
    """`vhostnet ctl CONTROL --json guests|leases` as {MAC: entry}; each MAC listed once."""
    entries = lan.ctl_json(command)[command]
    macs = [entry["mac"] for entry in entries]
    assert len(macs) == len(set(macs)), f"a MAC listed twice by {command}: {entries}"
    return {entry["mac"]: entry for entry in entries}


def check_listed(lan: Lan, index: int) -> None:
    """Guest `index` appears in `guests` and `leases`: its address, name, connected."""
    guest, lease = by_mac(lan, "guests").get(MACS[index]), by_mac(lan, "leases").get(MACS[index])
    assert guest is not None and lease is not None, (guest, lease)
    assert (guest["ipv4"], guest["name"], guest["connected"]) == (
        ADDRESSES[index], f"guest{index}", True), guest
    assert (lease["ipv4"], lease["name"], lease["connected"]) == (
        ADDRESSES[index], f"guest{index}", True), lease


# --- the tests, in the order the guests get there -----------------------------------


def test_each_guest_gets_its_own_lease(lan: Lan) -> None:
    guest3(lan)
    assert lan.result(1, "ip4", BOOT_TIMEOUT) == ADDRESSES[1]
    assert lan.result(2, "ip4", BOOT_TIMEOUT) == ADDRESSES[2]
    for index in (1, 2):
        assert lan.result(index, "slaac") == "ok"
        assert lan.result(index, "address6") == slaac_address(MACS[index])
    for index in (1, 2):
        check_listed(lan, index)
    assert by_mac(lan, "leases")[MACS[2]]["reserved"] is True
    table = ctl(lan.control, "guests")
    assert MACS[1] in table and MACS[2] in table, table


@pytest.mark.parametrize("index, peer", [(1, 2), (2, 1)])
def test_guests_ping_each_other_by_address_and_name(lan: Lan, index: int, peer: int) -> None:
    assert lan.result(index, "name4") == ADDRESSES[peer]
    assert lan.result(index, "name6") == slaac_address(MACS[peer])
    for check in ("ping4_address", "ping4_name", "ping6_address", "ping6_name"):
        assert lan.result(index, check) == "ok", check
        assert lan.result(index, f"{check}_loss") == "0", check


def test_host_name_is_the_gateway(lan: Lan) -> None:
    assert lan.result(1, "host_name") == GATEWAY


@pytest.mark.parametrize("index", [1, 2])
def test_arp_broadcast_reaches_the_peer_and_the_router(lan: Lan, index: int) -> None:
    peer = 3 - index
    assert lan.result(index, "arp_peer") == "ok"
    # The guest itself answers for its address, not its own router (ARP for a leased address
    # is left to the switch).
    assert answered_by(lan.result(index, "arp_peer_macs")) == [MACS[peer]]
    assert lan.result(index, "arp_gateway") == "ok"
    assert answered_by(lan.result(index, "arp_gateway_macs")) == [GATEWAY_MAC]


def test_20_mib_transfer_between_guests(lan: Lan) -> None:
    sent = lan.result(1, "sent_sha256")
    neighbour = lan.result(1, "transfer_neighbour")
    assert lan.result(1, "peer_sha256", TRANSFER_LIMIT + 60) == sent and len(sent) == 64, (
        f"guest 1's neighbour entry for guest 2: {neighbour} (guest 2 is {MACS[2]})")
    seconds = float(lan.result(1, "transfer_seconds"))
    rate = f"{TRANSFER_MIB / seconds:.1f} MiB/s" if seconds > 0 else "-"
    print(f"\nguest 1 -> guest 2 through the switch: {TRANSFER_MIB} MiB in {seconds:.2f} s "
          f"({rate}; {lan.result(1, 'transfer_retries')} connection retries)")


@pytest.mark.parametrize("index", [1, 2])
def test_each_guest_downloads_from_the_host(lan: Lan, index: int) -> None:
    assert lan.result(index, "download_sha256") == sha256_hex(lan.http.data)


def test_stream_guest_on_qemu_7_2_joins_and_reaches_both(lan: Lan) -> None:
    guest3(lan)
    assert lan.result(3, "ip4", BOOT_TIMEOUT) == ADDRESSES[3]
    for check in ("ping_guest1_address", "ping_guest1_name", "ping_guest2_address",
                  "ping_guest2_name", "ping6_guest2_address", "arp_guest1", "arp_guest2"):
        assert lan.result(3, check) == "ok", check
    for index in (1, 2):
        assert answered_by(lan.result(3, f"arp_guest{index}_macs")) == [MACS[index]]
    repliers = lan.result(3, "broadcast_repliers").split()
    assert ADDRESSES[1] in repliers and ADDRESSES[2] in repliers, repliers
    assert "stream front-end (-netdev stream)" in lan.server.log_text()
    check_listed(lan, 3)


def test_a_fourth_front_end_is_refused_and_the_others_stay(lan: Lan) -> None:
    """All three ports taken: a fourth front-end is closed at once with one log line."""
    guest3(lan)
    lan.result(3, "held_half_sent", BOOT_TIMEOUT + STEP_TIMEOUT)  # all three are on the switch
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as fourth:
        fourth.settimeout(10)
        fourth.connect(str(lan.server.socket_path))
        assert fourth.recv(1) == b"", "the fourth front-end was not closed"
    assert "all 3 guest ports are in use" in lan.server.log_text()
    stats = lan.ctl_json("stats")["counters"]
    assert [value for key, value in stats.items() if key.endswith("refused_full")] == [1], stats
    assert [entry["connected"] for entry in by_mac(lan, "guests").values()] == [True] * 3


def test_forward_to_guest2_added_and_removed_at_run_time(lan: Lan) -> None:
    lan.result(2, "ip4", BOOT_TIMEOUT)
    host_port = free_port()
    spec = f"{host_port}:{ADDRESSES[2]}/{FORWARD_PORT}"
    added = ctl(lan.control, "add", "tcp", spec)
    assert ADDRESSES[2] in added and str(host_port) in added, added
    assert not port_binds(host_port)
    assert ask_guest(host_port) == (ANSWER + "\n").encode()
    assert ctl(lan.control, "list") == added
    forwards = lan.ctl_json("list")["forwards"]
    assert [(f["host_port"], f["guest_address"], f["guest_port"]) for f in forwards] == [
        (host_port, ADDRESSES[2], FORWARD_PORT)], forwards
    assert ctl(lan.control, "remove", "tcp", spec) == "no forwarded ports\n"
    assert port_binds(host_port)
    assert lan.result(2, "got") == "hello from the host"


def test_guest_killed_and_restarted_leaves_the_others_transfers_whole(lan: Lan) -> None:
    """Guest 1 is SIGKILLed and rebooted while two TCP transfers are held half way: guest 2's
    download from a paced host server and guest 3's upload to guest 2 (through the switch)."""
    guest3(lan)
    lan.result(2, "download_sha256", BOOT_TIMEOUT)  # guest 2 is at its paced download
    lan.result(3, "held_half_sent", BOOT_TIMEOUT + STEP_TIMEOUT)
    data = generated_bytes(PACED_BYTES, PACED_SEED)
    with PacedHttpServer("paced.bin", data, PACED_SECONDS, hold_at=PACED_BYTES // 2,
                         port=lan.paced_port) as paced:
        deadline = time.monotonic() + STEP_TIMEOUT  # guest 2 retries once a second
        while paced.sent < PACED_BYTES // 2 and time.monotonic() < deadline:
            assert lan.guests[2].running(), lan.guests[2].log_tail()
            time.sleep(0.2)
        assert paced.sent >= PACED_BYTES // 2, "guest 2 never started the paced download"
        old = lan.guests[1]
        assert old.process is not None
        old.process.send_signal(signal.SIGKILL)
        old.process.wait(timeout=30)
        assert not paced.finished.is_set(), "the download was not in flight during the kill"
        restarted = lan.start_guest(1, "10.0", restarted_guest1_script())
        assert lan.result(1, "ip4", BOOT_TIMEOUT) == ADDRESSES[1], restarted.log_tail()
        assert "held_peer_sha256" not in lan.guests[3].results()
        paced.release()
        with HttpFileServer("go", b"go\n", port=lan.trigger_port):
            assert lan.result(2, "paced_sha256", STEP_TIMEOUT) == sha256_hex(data)
            assert lan.result(3, "held_peer_sha256", STEP_TIMEOUT) == lan.result(3, "held_sha256")
        assert paced.requests == 1, "guest 2's download was broken and retried"
    assert lan.result(1, "ping4_name") == "ok"
    check_listed(lan, 1)
    assert [entry["connected"] for entry in by_mac(lan, "guests").values()] == [True] * 3
