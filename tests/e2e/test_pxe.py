"""PXE boot end to end: QEMU's iPXE ROM boots the kit's kernel from vhostnet alone.

QEMU starts with `-boot n` and no `-kernel`. The virtio-net option ROM (iPXE,
from Debian's ipxe-qemu) asks vhostnet's DHCP for an address and a boot file,
fetches the iPXE script by TFTP, and the script fetches the kernel and the
initrd (the kit's initramfs with the test script appended) by TFTP and boots
them. The booted guest proves it came that way (the kernel command line only
the script sets) and that the network still works after the hand-over from
iPXE's virtio driver to Linux's (a ping of the gateway).

vhostnet offers `--bootfile` to plain PXE clients and `--bootfile-ipxe` to
clients sending DHCP user class "iPXE"; the plain one names a file that does
not exist, so the boot only succeeds if the user-class choice works.
"""

from __future__ import annotations

import struct
import time
from pathlib import Path

import pytest

from tests.e2e.guestlib import GATEWAY, ping_check, static_ipv4
from tools.guestkit import KERNEL_COMMAND_LINE, script_archive
from tools.qemu import GuestError
from vhostnet.control import control_request

pytestmark = pytest.mark.e2e

IPXE_ROM = Path("/usr/lib/ipxe/qemu/pxe-virtio.rom")
TRANSITIONAL_VIRTIO_NET = 0x1000  # what virtio-net-pci shows on the i440fx machine
PXE_MARKER = "vhostnet.pxe=1"  # only the iPXE script puts this on the command line
BOOT_TIMEOUT = 240.0
POLL_INTERVAL = 0.1

IPXE_SCRIPT = f"""#!ipxe
echo vhostnet PXE: script loaded from ${{next-server}}
kernel vmlinuz {KERNEL_COMMAND_LINE} {PXE_MARKER}
initrd initrd.cpio
boot
"""

GUEST_SCRIPT = (
    "echo RESULT cmdline_marker=$(grep -c 'vhostnet.pxe=1' /proc/cmdline)\n"
    + static_ipv4()
    + ping_check(GATEWAY, count=2)
)


def rom_for_device(source: Path, target: Path, device_id: int) -> Path:
    """Copy an option ROM with its PCI device ID changed, checksum kept valid.

    Debian builds the virtio ROM for the modern-only ID 1af4:1041, SeaBIOS
    runs a PCI ROM only when its ID equals the device's, and QEMU patches the
    ID only for its default ROM file (absent here); the tests' NIC is the
    transitional 1af4:1000. Byte 6 of an iPXE ROM is its checksum byte (after
    the 55 AA signature, the size and a 3-byte jump), so it absorbs the change.
    """
    rom = bytearray(source.read_bytes())
    image_length = rom[2] * 512
    if rom[:2] != b"\x55\xaa" or rom[3] != 0xE9 or image_length > len(rom):
        raise ValueError(f"{source} does not look like an iPXE option ROM")
    pcir = struct.unpack_from("<H", rom, 0x18)[0]
    if rom[pcir:pcir + 4] != b"PCIR":
        raise ValueError(f"{source} has no PCI data structure")
    old_sum = sum(rom[pcir + 6:pcir + 8])
    struct.pack_into("<H", rom, pcir + 6, device_id)
    rom[6] = (rom[6] + old_sum - sum(rom[pcir + 6:pcir + 8])) % 256
    assert sum(rom[:image_length]) % 256 == 0
    target.write_bytes(rom)
    return target


def _wait_for_socket(path: Path, timeout: float = 10.0) -> None:
    """vhostnet opens the control socket just after the vhost-user one."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            pytest.fail(f"no control socket at {path} after {timeout} s", pytrace=False)
        time.sleep(POLL_INTERVAL)


def _tftp_counters(control_path: Path) -> dict[str, int]:
    reply = control_request(str(control_path), "stats")
    assert reply["ok"], reply
    return {k: v for k, v in reply["counters"].items() if k.startswith("tftp.")}


def _watch_loads(control_path: Path, machine, timeout: float) -> tuple[float | None, float]:
    """Poll the counters until QEMU exits; return (time the kernel+initrd took, boot time).

    Transfer 1 is the script, 2 the kernel, 3 the initrd: the load time runs
    from the second transfer starting to the third completing.
    """
    started = time.monotonic()
    load_start = load_end = None
    deadline = started + timeout
    while machine.running() and time.monotonic() < deadline:
        counters = _tftp_counters(control_path)
        if load_start is None and counters.get("tftp.transfers_started", 0) >= 2:
            load_start = time.monotonic()
        if load_end is None and counters.get("tftp.transfers_completed", 0) >= 3:
            load_end = time.monotonic()
        time.sleep(POLL_INTERVAL)
    load = load_end - load_start if load_start is not None and load_end is not None else None
    return load, time.monotonic() - started


@pytest.mark.parametrize("version", ["10.0", "7.2"])
def test_pxe_boot(version, kit, vhostnet, guest, tmp_path):
    if not IPXE_ROM.is_file():
        reason = f"{IPXE_ROM} missing (Debian package ipxe-qemu)"
        print(reason)
        pytest.skip(reason)
    if version == "10.0" and kit.qemu10 is None:
        pytest.skip(f"QEMU 10.0 unavailable: {kit.qemu10_reason}")

    root = tmp_path / "tftp"
    root.mkdir()
    (root / "boot.ipxe").write_text(IPXE_SCRIPT)
    (root / "vmlinuz").write_bytes(kit.kernel.read_bytes())
    (root / "initrd.cpio").write_bytes(kit.initramfs.read_bytes()
                                       + script_archive(GUEST_SCRIPT))
    loaded_bytes = sum((root / name).stat().st_size for name in ("vmlinuz", "initrd.cpio"))
    control_path = tmp_path / "control.sock"

    server = vhostnet("--tftp", str(root), "--bootfile", "not-for-ipxe.0",
                      "--bootfile-ipxe", "boot.ipxe", "--control", str(control_path))
    _wait_for_socket(control_path)
    rom = rom_for_device(IPXE_ROM, tmp_path / "virtio-net.rom", TRANSITIONAL_VIRTIO_NET)
    machine = guest(version, None, server.socket_path, boot_args=("-boot", "n"),
                    nic_options=f"romfile={rom}")
    load_seconds, boot_seconds = _watch_loads(control_path, machine, BOOT_TIMEOUT)
    try:
        machine.wait_exit(5.0)
    except GuestError as error:
        pytest.fail(f"the PXE-booted guest did not power off: {error}", pytrace=False)

    results = machine.results()
    counters = _tftp_counters(control_path)
    assert results.get("cmdline_marker") == "1", (
        f"the guest did not boot through the iPXE script\n{machine.log_tail()}")
    assert "VHOSTNET-TEST-EXIT" in machine.output(), machine.log_tail()
    assert results.get("ping") == "ok", machine.output()
    # Three requests, all served: the plain --bootfile was never asked for.
    assert counters.get("tftp.requests") == 3, counters
    assert counters.get("tftp.transfers_completed") == 3, counters
    assert counters.get("tftp.bytes_sent", 0) >= loaded_bytes, counters

    rate = f"{loaded_bytes / load_seconds / 1e6:.2f} MB/s" if load_seconds else "n/a"
    load = f"{load_seconds:.1f} s" if load_seconds is not None else "n/a"
    print(f"QEMU {version} PXE: kernel+initrd {loaded_bytes} bytes loaded in {load} "
          f"({rate}); QEMU start to power-off {boot_seconds:.1f} s; counters {counters}")
