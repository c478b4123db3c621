"""QMP helpers for the e2e tests that migrate a guest between two QEMUs. No tests live here."""

from __future__ import annotations

import time

import pytest

MIGRATION_TIMEOUT = 120.0


def wait_migrated(machine) -> None:
    """Poll query-migrate on the source until it completes (bounded)."""
    deadline = time.monotonic() + MIGRATION_TIMEOUT
    while time.monotonic() < deadline:
        status = machine.qmp("query-migrate").get("status")
        if status == "completed":
            return
        assert status not in ("failed", "cancelled"), f"migration {status}\n{machine.log_tail()}"
        time.sleep(0.2)
    pytest.fail(f"migration did not complete within {MIGRATION_TIMEOUT} s")
