"""The front-end's side of a device-state transfer (vhost-user SET_DEVICE_STATE_FD and
CHECK_DEVICE_STATE over a pipe), shared by the migration tests."""

from __future__ import annotations

import os
import time

from testkit.frontend import Frontend
from vhostnet.migration.transfer import LOAD, SAVE
from vhostnet.vhost_user.codec import U64
from vhostnet.vhost_user.protocol import Request


def save_over_pipe(frontend: Frontend) -> bytes:
    read_end, write_end = os.pipe()
    try:
        assert frontend.set_device_state_fd(SAVE, write_end) == 0
        os.close(write_end)
        write_end = -1
        blob = bytearray()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            chunk = os.read(read_end, 65536)
            if not chunk:
                break
            blob += chunk
        return bytes(blob)
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)


def load_over_pipe(frontend: Frontend, blob: bytes) -> int:
    read_end, write_end = os.pipe()
    try:
        assert frontend.set_device_state_fd(LOAD, read_end) == 0
        os.close(read_end)
        read_end = -1
        os.write(write_end, blob)
    finally:
        os.close(write_end)
        if read_end >= 0:
            os.close(read_end)
    return check(frontend)


def check(frontend: Frontend) -> int:
    answer = frontend.request(Request.CHECK_DEVICE_STATE)
    assert answer is not None
    return U64.parse(answer.payload).value
