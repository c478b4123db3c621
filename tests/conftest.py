"""Fixtures shared by unit and end-to-end tests.

  passt_repair   session: passt's own passt-repair (Debian trixie, run through
                 trixie's loader), from the kit cache; skipped, with the reason
                 printed, when trixie's packages cannot be had (an optional tool)
"""

from __future__ import annotations

import pytest

from tools.guestkit import KitError, PasstRepair, fetch_passt_repair


@pytest.fixture(scope="session")
def passt_repair() -> PasstRepair:
    try:
        return fetch_passt_repair()
    except (KitError, OSError) as error:
        reason = f"passt-repair from Debian trixie unavailable: {error}"
        print(reason)
        pytest.skip(reason)
