"""Guest shell for IPv6 (QEMU's user-network plan, which vhostnet follows): the gateway's
address and the wait for the guest's SLAAC address, shared by the e2e tests and the
benchmark guest."""

GATEWAY6 = "fec0::2"
SLAAC_WAIT_TENTHS = 100  # the guest must have its address and route within 10 s of link up

# Polls every 0.1 s from link up: an address beyond link-local (fec0::/10 has site scope,
# 2001:db8::/32 global) out of DAD (not tentative) and a default route via a link-local
# address (the gateway's, from the RA).
WAIT_FOR_SLAAC = f"""
i=0
while [ $i -lt {SLAAC_WAIT_TENTHS} ]; do
    if ip -6 addr show dev eth0 | grep 'inet6 ' | grep -v 'scope link' | grep -qv tentative \\
        && ip -6 route show default | grep -q 'via fe80:'; then break; fi
    sleep 0.1
    i=$((i+1))
done
if [ $i -lt {SLAAC_WAIT_TENTHS} ]; then echo RESULT slaac=ok; else echo RESULT slaac=none; fi
echo "RESULT slaac_tenths=$i"
echo "RESULT address6=$(ip -6 addr show dev eth0 | grep -v 'scope link' | sed -n 's/.*inet6 \\([^/ ]*\\).*/\\1/p' | head -n 1)"
echo "RESULT route6=$(ip -6 route show default | head -n 1 | tr ' ' _)"
"""
