"""Fixtures of the TCP tests."""

from __future__ import annotations

import pytest

from tests.support.guest_ram import SPLIT_LAYOUT, GuestRam


@pytest.fixture
def ram():
    """Guest RAM (memfd) with split-ring layout, for the direct RX tests."""
    guest_ram = GuestRam(SPLIT_LAYOUT)
    yield guest_ram
    guest_ram.close()
