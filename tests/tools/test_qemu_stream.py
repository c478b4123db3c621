"""QemuGuest's -netdev stream command line, as libvirt starts passt (QEMU 7.2 and 10.0)."""

from __future__ import annotations

from pathlib import Path

from tools.guestkit import Kit, Qemu10
from tools.qemu import QemuGuest


def _kit(tmp_path: Path) -> Kit:
    return Kit(kernel=tmp_path / "vmlinuz", kernel_version="6.1", initramfs=tmp_path / "initrd",
               qemu10=Qemu10(tmp_path / "qemu10"), qemu10_reason="")


def _after(args: list[str], option: str) -> str:
    return args[args.index(option) + 1]


def test_stream_netdev_with_any_nic_and_reconnect_only_where_qemu_has_it(tmp_path: Path) -> None:
    kit = _kit(tmp_path)
    old = QemuGuest(kit, "7.2", socket_path="/tmp/s.sock", stream=True, nic_model="e1000").command()
    assert _after(old, "-netdev") == ("stream,id=n0,addr.type=unix,addr.path=/tmp/s.sock,"
                                      "server=off")
    assert _after(old, "-device").startswith("e1000,netdev=n0,mac=")
    assert "-chardev" not in old
    new = QemuGuest(kit, "10.0", socket_path="/tmp/s.sock", stream=True).command()
    assert _after(new, "-netdev").endswith(",server=off,reconnect-ms=1000")
    assert _after(new, "-device").startswith("virtio-net-pci,netdev=n0,mac=")
    assert "vectors=0" not in _after(new, "-device")
    vhost_user = QemuGuest(kit, "7.2", socket_path="/tmp/s.sock").command()
    assert _after(vhost_user, "-netdev") == "vhost-user,id=n0,chardev=c0"
