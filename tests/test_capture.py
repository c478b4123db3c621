"""The pcap writer: a file tcpdump and tshark read, bounded, never blocking the data path."""

from __future__ import annotations

import fcntl
import os
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


def test_a_burst_bigger_than_the_buffer_goes_to_the_file_whole(tmp_path: Path) -> None:
    path = tmp_path / "c.pcap"
    capture = Capture(str(path), None, max_buffered=24 + 2 * (16 + 60))
    capture.add(frame[:60] for frame in FRAMES)  # one turn, five buffers' worth
    capture.close()
    assert [frame for _, frame in read_pcap(path)] == [frame[:60] for frame in FRAMES]
    assert capture.counters["dropped"] == 0


def test_a_fifo_that_takes_nothing_drops_and_counts_instead_of_growing(tmp_path: Path) -> None:
    path = tmp_path / "c.fifo"
    os.mkfifo(path)
    reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a reader that never reads
    try:
        capture = Capture(str(path), None, max_buffered=4096)
        frames = 5000  # 76 bytes each with its record header: the pipe fills up first
        capture.add(frame[:60] for frame in FRAMES * (frames // len(FRAMES)))
        buffered = capture.counters["frames"]
        assert capture.counters["dropped"] > 0
        assert buffered + capture.counters["dropped"] == frames
        # What was kept fits the pipe plus the buffer: memory did not grow with the burst.
        assert buffered * (16 + 60) <= 4096 + fcntl.fcntl(reader, fcntl.F_GETPIPE_SZ)
        capture.close()
    finally:
        os.close(reader)
