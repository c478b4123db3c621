#!/bin/sh
# Installs the Debian packages vhostnet's build, tests and demo need.
# As root it runs apt-get; otherwise it prints the one command to run.
set -eu

PACKAGES="qemu-system-x86 busybox-static cpio ipxe-qemu iproute2 util-linux kmod gcc make python3-venv python3-dev tshark libseccomp2"
# The libvirt e2e test: Debian's libvirt provides the folders and the run-time libraries of
# libvirt 11.3, which the guest kit unpacks from bookworm-backports (libjson-c5 and libbsd0:
# 11.3 needs them, 9.0 does not pull them in).
PACKAGES="$PACKAGES libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients libjson-c5 libbsd0"
# `system-packages.sh bench` (make bench): also dpdk-testpmd, the VM-less front-end of the
# bench's testpmd cases; the tests do not need it.
if [ "${1:-}" = bench ]; then
    PACKAGES="$PACKAGES dpdk-dev"
fi

missing=""
for pkg in $PACKAGES; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing="$missing $pkg"
    fi
done
[ -z "$missing" ] && exit 0

if [ "$(id -u)" = 0 ]; then
    echo "installing Debian packages:$missing"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # shellcheck disable=SC2086
    apt-get install -y -qq --no-install-recommends $missing
else
    echo "vhostnet needs these Debian packages; run as root:" >&2
    echo "  apt-get install -y$missing" >&2
    exit 1
fi
