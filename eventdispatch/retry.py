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


async def retry_in_place(what: str, action: Callable[[], Awaitable[T]], cap_s: float = 5.0) -> T:
    """Run `action` until it succeeds."""
    delay = 0.1
    failures = 0
    while True:
        try:
            result = await action()
        except asyncio.CancelledError:
            raise
        except Exception as e:  # any dependency failure: wait and try again
            failures += 1
            log.warning("%s failed (%s: %s), retry in %.1fs", what, type(e).__name__, e, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, cap_s)
        else:
            if failures:
                log.info("%s succeeded after %d failures", what, failures)
            return result
