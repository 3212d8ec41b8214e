"""Retry in place: what a stage reports while it waits, and that many waiters log once."""

from __future__ import annotations

import asyncio
import logging

import pytest

from eventdispatch.retry import retry_in_place, troubles


async def test_waiting_is_reported_until_the_dependency_is_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    back = asyncio.Event()

    async def call() -> str:
        if not back.is_set():
            raise ConnectionError("redis refused")
        return "ok"

    caplog.set_level(logging.DEBUG, "eventdispatch.retry")
    loops = [asyncio.create_task(retry_in_place("load state", call)) for _ in range(50)]
    await asyncio.sleep(0.35)
    assert troubles() == {"load state": "ConnectionError: redis refused"}
    back.set()
    assert await asyncio.gather(*loops) == ["ok"] * 50
    assert troubles() == {}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    # One loop speaks for the fifty: a warning per retry of its own, the rest at DEBUG.
    assert "(1 waiting)" in warnings[0].getMessage() and len(warnings) <= 4
    assert len([r for r in caplog.records if r.levelno == logging.DEBUG]) >= 49
    assert len([r for r in caplog.records if r.levelno == logging.INFO]) == 1
