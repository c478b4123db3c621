"""The pcap writer: a file tcpdump and tshark read, bounded, never blocking the data path."""

from __future__ import annotations

from pathlib import Path

from tests.support.pcap import read_pcap, tshark_frames
from vhostnet.capture import Capture
from vhostnet.virtqueue import FrameBatch

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
