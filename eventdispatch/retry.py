"""Retry in place: the service's answer to a dependency that is down.

Stages never drop or reorder work because Redis, MongoDB or the broker is away; they wait and
try again with capped backoff, logging each failure, and resume by themselves.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

log = logging.getLogger("eventdispatch.retry")
T = TypeVar("T")

_failing: dict[str, tuple[int, str]] = {}
"""What is being retried now, in this process: what -> (how many loops, the last error)."""


def troubles() -> dict[str, str]:
    """What this process is waiting on now (empty when healthy), for its readiness report."""
    return {what: error for what, (_, error) in _failing.items()}


def trouble_began(what: str, error: str) -> None:
    """For a loop that retries on its own (Central Control calls): report it as waiting."""
    _note(what, error, 1)


def trouble_ended(what: str) -> None:
    _note(what, None, -1)


def _note(what: str, error: str | None, loops: int) -> None:
    count, last = _failing.get(what, (0, ""))
    count += loops
    if count <= 0:
        _failing.pop(what, None)
    else:
        _failing[what] = (count, error or last)


async def retry_in_place(what: str, action: Callable[[], Awaitable[T]], cap_s: float = 5.0) -> T:
    """Run `action` until it succeeds.

    When many loops wait for the same thing (thousands of devices for Redis), the first one
    to fail speaks for all of them at WARNING, and the others log at DEBUG."""
    delay = 0.1
    failures = 0
    level = logging.WARNING
    try:
        while True:
            try:
                result = await action()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # any dependency failure: wait and try again
                failures += 1
                error = f"{type(e).__name__}: {e}"
                if failures == 1 and what in _failing:
                    level = logging.DEBUG
                _note(what, error, 1 if failures == 1 else 0)
                waiting = _failing[what][0]
                log.log(
                    level,
                    "%s failed (%s), retry in %.1fs (%d waiting)",
                    what,
                    error,
                    delay,
                    waiting,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, cap_s)
            else:
                if failures:
                    log.log(
                        logging.INFO if level == logging.WARNING else logging.DEBUG,
                        "%s succeeded after %d failures",
                        what,
                        failures,
                    )
                return result
    finally:
        if failures:
            _note(what, None, -1)
