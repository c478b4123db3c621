"""Running a test scenario on a fresh event loop, bounded in time."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

SCENARIO_SECONDS = 60.0


def run(scenario: Callable[[asyncio.AbstractEventLoop], Awaitable[None]],
        timeout: float = SCENARIO_SECONDS) -> None:
    """``scenario(loop)`` to its end on a new event loop (at most ``timeout`` seconds),
    then the loop is closed."""
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(asyncio.wait_for(scenario(loop), timeout))
    finally:
        loop.close()
