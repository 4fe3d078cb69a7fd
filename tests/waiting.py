"""Waiting for a condition, for the tests and the benches (which put tests/ on their path)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any


class TimedOut(AssertionError):
    """The condition did not come true before the deadline."""


async def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05,
                   message: str = "condition") -> Any:
    """Poll ``predicate`` (sync or async) until it returns something truthy, and return that."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimedOut(f"timed out after {timeout:g} s waiting for {message}")
        await asyncio.sleep(interval)
