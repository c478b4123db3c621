"""The pcap writer: a file tcpdump and tshark read, bounded, never blocking the data path."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from vhostnet.capture import LINKTYPE_ETHERNET, PCAP_MAGIC_NS, Capture
from vhostnet.virtqueue import FrameBatch


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


FRAMES = [bytes(12) + b"\x88\xb5" + bytes([n]) * (46 + n) for n in range(10)]


def test_frames_both_ways_are_written_as_pcap(tmp_path: Path) -> None:
    path = tmp_path / "c.pcap"
    capture = Capture(str(path), None)
    batch = FrameBatch(16)
    for frame in FRAMES[:5]:
        batch.append(frame)
    capture.add_batch(batch, 5)
    capture.add(FRAMES[5:])
    capture.close()
    assert [frame for _, frame in read_pcap(path)] == FRAMES
    assert capture.counters == {"frames": 10, "dropped": 0, "write_errors": 0}
    assert len(tshark_frames(path)) == 10


def test_the_file_stops_at_its_size_limit_with_whole_records(tmp_path: Path) -> None:
    path = tmp_path / "c.pcap"
    capture = Capture(str(path), None, size_limit=24 + 3 * (16 + 60) + 10)
    for frame in FRAMES:
        capture.add([frame[:60]])
        capture.flush()
    capture.close()
    assert [frame for _, frame in read_pcap(path)] == [frame[:60] for frame in FRAMES[:3]]
    assert capture.stopped


def test_a_full_buffer_drops_and_counts_instead_of_growing(tmp_path: Path) -> None:
    path = tmp_path / "c.pcap"
    capture = Capture(str(path), None, max_buffered=24 + 2 * (16 + 60))
    capture.add(frame[:60] for frame in FRAMES)  # no flush between: the disk "is slow"
    capture.close()
    assert len(read_pcap(path)) == 2
    assert capture.counters["dropped"] == 8
