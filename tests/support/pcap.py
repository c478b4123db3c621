"""Reading capture files back: a tiny pcap reader, and tshark when it is installed."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from vhostnet.capture import LINKTYPE_ETHERNET, PCAP_MAGIC_NS


def read_pcap(path: Path) -> list[tuple[float, bytes]]:
    """(time, frame) of every record of a classic nanosecond pcap file, checked field by field."""
    data = path.read_bytes()
    magic, major, minor, _zone, _sigfigs, snaplen, linktype = struct.unpack_from("<IHHiIII", data)
    assert (magic, major, minor, linktype) == (PCAP_MAGIC_NS, 2, 4, LINKTYPE_ETHERNET)
    records = []
    position = 24
    while position < len(data):
        seconds, nanoseconds, captured, original = struct.unpack_from("<IIII", data, position)
        assert captured == original <= snaplen and nanoseconds < 1_000_000_000
        position += 16
        frame = data[position:position + captured]
        assert len(frame) == captured, "truncated record"
        records.append((seconds + nanoseconds / 1e9, frame))
        position += captured
    return records


def tshark_frames(path: Path) -> list[str]:
    """``tshark -r``'s lines for the file (it must read it without an error)."""
    tshark = shutil.which("tshark")
    if tshark is None:
        pytest.skip("tshark is not installed (tools/system-packages.sh installs it)")
    result = subprocess.run([tshark, "-r", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "appears to have been cut short" not in result.stderr, result.stderr
    return result.stdout.splitlines()
