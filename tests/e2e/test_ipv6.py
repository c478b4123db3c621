"""IPv6 in a real guest: SLAAC from our Router Advertisements, DHCPv6 with -a (a small
client of our own, dhcp6c.c: the kit's busybox has no udhcpc6), ping -6 to the gateway,
and -4 / -6 switching the other family off."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import pytest

from tests.e2e.guestlib import compile_guest_tool, guest_binary, ping_check
from tools.guest_ipv6 import GATEWAY6, SLAAC_WAIT_TENTHS, WAIT_FOR_SLAAC
from tools.guestkit import Kit

pytestmark = pytest.mark.e2e

BOOT_FILE_SIZE = 1024 * 1024 + 100  # blocks of 1448 (IPv6 at MTU 1500), a short last one

LINK_UP = (
    "if ip link show eth0 >/dev/null 2>&1; then echo RESULT link=up; "
    "else echo RESULT link=missing; fi\n"
    "ip link set eth0 up\n"
)


def dhcp4_beside(script: str, tries: int, seconds: int) -> str:
    """udhcpc (`tries` discovers `seconds` apart) runs while `script` does, rather than
    before or after it: each is a bounded wait, and the one with no answer runs to its
    bound. RESULT dhcp4=ok|fail once both are over."""
    return (f"(udhcpc -n -q -t {tries} -T {seconds} -i eth0 >/dev/null 2>&1 && echo ok "
            "|| echo fail) > /tmp/dhcp4 &\n"
            "dhcp4_pid=$!\n" + script + "wait $dhcp4_pid\n"
            "echo \"RESULT dhcp4=$(cat /tmp/dhcp4)\"\n")


def one_version(kit: Kit) -> str:
    return "10.0" if kit.qemu10 is not None else "7.2"


def test_slaac_and_ping6_gateway(vhostnet, run_guest, qemu_version):
    server = vhostnet()
    script = LINK_UP + WAIT_FOR_SLAAC + ping_check(f"-6 {GATEWAY6}", count=3, name="ping6")
    run = run_guest(qemu_version, script, socket_path=server.socket_path)
    run.check_completed()
    assert run.results["link"] == "up"
    assert run.results["slaac"] == "ok", run.output
    # The guest's address is built from the advertised prefix (fec0::/64) and its MAC.
    assert run.results["address6"] == "fec0::5054:ff:fe12:3456", run.output
    assert run.results["route6"].startswith("default_via_fe80::5056:ff:fe00:2_"), run.output
    assert run.results["ping6"] == "ok", run.output
    assert run.results["ping6_loss"] == "0"


def test_dhcpv6_gives_the_configured_address_and_a_boot_file_fetched_over_ipv6(
        vhostnet, run_guest, kit, tmp_path: Path):
    """DHCPv6 hands out the address, the DNS server and a Boot File URL (RFC 5970); the guest
    fetches that file with busybox tftp from the URL's IPv6 address, byte-exact."""
    client = compile_guest_tool(Path(__file__).with_name("dhcp6c.c"), tmp_path)
    root = tmp_path / "tftp"
    (root / "boot").mkdir(parents=True)
    boot_file = random.Random(6).randbytes(BOOT_FILE_SIZE)
    (root / "boot" / "stage1.efi").write_bytes(boot_file)
    server = vhostnet("-a", "2001:db8:1::15", "-g", "2001:db8:1::2", "-D", "2001:db8:1::3",
                      "--tftp", str(root), "--bootfile", "boot/stage1.efi")
    script = LINK_UP + guest_binary("/tmp/dhcp6c", client) + """
# The client sends from its link-local address: wait until duplicate detection let it go.
i=0
while [ $i -lt 100 ]; do
    ip -6 addr show dev eth0 scope link | grep inet6 | grep -qv tentative && break
    sleep 0.1
    i=$((i+1))
done
/tmp/dhcp6c $(cat /sys/class/net/eth0/ifindex) > /tmp/dhcp6.out
echo "RESULT dhcp6_rc=$?"
cat /tmp/dhcp6.out
address=$(sed -n 's/^dhcp6 address=\\([^ ]*\\).*/\\1/p' /tmp/dhcp6.out)
echo "RESULT dhcp6_address=$address"
echo "RESULT dhcp6_dns=$(sed -n 's/.* dns=\\([^ ]*\\).*/\\1/p' /tmp/dhcp6.out)"
ip -6 addr add "$address/128" dev eth0
""" + WAIT_FOR_SLAAC + ping_check("-6 2001:db8:1::2", count=3, name="ping6") + """
url=$(sed -n 's/.* bootfile_url=\\([^ ]*\\).*/\\1/p' /tmp/dhcp6.out)
echo "RESULT bootfile_url=$url"
host=$(echo "$url" | sed -n 's,^tftp://\\[\\(.*\\)\\]/.*,\\1,p')
timeout 60 tftp -b 1448 -g -r "${url#*]/}" -l /tmp/boot.efi "$host" > /tmp/tftp6.err 2>&1
echo "RESULT tftp6_rc=$?"
cat /tmp/tftp6.err
echo "RESULT tftp6_sha256=$(sha256sum /tmp/boot.efi | cut -d' ' -f1)"
"""
    run = run_guest(one_version(kit), script, socket_path=server.socket_path)
    run.check_completed()
    assert run.results["dhcp6_rc"] == "0", run.output
    assert run.results["dhcp6_address"] == "2001:0db8:0001:0000:0000:0000:0000:0015"
    assert run.results["dhcp6_dns"] == "2001:0db8:0001:0000:0000:0000:0000:0003"
    assert run.results["ping6"] == "ok", run.output
    assert run.results["ping6_loss"] == "0"
    assert run.results["bootfile_url"] == "tftp://[2001:db8:1::2]/boot/stage1.efi", run.output
    assert run.results["tftp6_rc"] == "0", run.output
    assert run.results["tftp6_sha256"] == hashlib.sha256(boot_file).hexdigest()


def test_ipv4_only_sends_no_router_advertisement(vhostnet, run_guest, kit):
    server = vhostnet("-4")
    # Six seconds cover the guest's router solicitations (sent 0, 4 and 8 s after link up
    # by Linux, the first answered at once when IPv6 is on); IPv4 must still work.
    script = LINK_UP + dhcp4_beside(WAIT_FOR_SLAAC.replace(str(SLAAC_WAIT_TENTHS), "60"),
                                    tries=5, seconds=2)
    run = run_guest(one_version(kit), script, socket_path=server.socket_path)
    run.check_completed()
    assert run.results["slaac"] == "none", run.output
    assert run.results["route6"] == "", run.output
    assert run.results["dhcp4"] == "ok", run.output


def test_ipv6_only_gives_no_dhcpv4_lease(vhostnet, run_guest, kit):
    server = vhostnet("-6")
    script = LINK_UP + dhcp4_beside(WAIT_FOR_SLAAC, tries=3, seconds=1)
    run = run_guest(one_version(kit), script, socket_path=server.socket_path)
    run.check_completed()
    assert run.results["dhcp4"] == "fail", run.output
    assert run.results["slaac"] == "ok", run.output
