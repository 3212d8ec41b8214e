"""The generation of the Redis working state, and the check that stages make before using it.

Redis holds a cache of the log: each device's decider state, the registered scripts and the
accepted tasks. A Redis that lost its data, or one that belongs to another deployment, would
make the stages act on state the log does not have: create executions again, number scripts
again. So the state carries a generation marker, `<prefix>:state:generation`, that must equal
the generation recorded with the namespace on the broker (property `eventdispatch.state-
generation`). Stages check it before they use the state (the device processor in the same
round trip as each load, the planner before each command) and pause, saying why, until
`eventdispatch state rebuild` (eventdispatch.state) has filled Redis again from the log.
"""

from __future__ import annotations

import asyncio
import logging
import uuid

import redis.asyncio as redis

from eventdispatch import admin
from eventdispatch.config import Settings
from eventdispatch.retry import retry_in_place

log = logging.getLogger("eventdispatch.generation")

PROPERTY = "eventdispatch.state-generation"
REBUILDING = "rebuilding"


class StateLost(RuntimeError):
    """Redis does not hold this deployment's state; the message says what to run."""


def marker_key(prefix: str) -> str:
    return f"{prefix}:state:generation"


class StateGuard:
    """Knows the generation the log expects and checks Redis' marker against it."""

    def __init__(self, settings: Settings, client: redis.Redis) -> None:
        self.settings = settings
        self.redis = client
        self.key = marker_key(settings.redis_prefix)
        self.expected: str | None = None
        self._waiting: asyncio.Future[None] | None = None

    async def establish(self) -> str:
        """At start: learn the expected generation (returned); a brand-new deployment (no
        generation recorded, no events yet) gets one. Raises StateLost if Redis cannot be
        used."""
        props = await asyncio.to_thread(admin.namespace_properties, self.settings)
        expected = props.get(PROPERTY)
        if expected is None:
            if await asyncio.to_thread(admin.last_position, self.settings, "events") is not None:
                raise StateLost(
                    "the log has events but no state generation is recorded for it (a "
                    "deployment older than the generation check?); run `eventdispatch state "
                    "rebuild` once"
                )
            expected = uuid.uuid4().hex[:12]
            if not await self.redis.set(self.key, expected, nx=True):
                # Another worker starting at the same moment: its property appears at once.
                await asyncio.sleep(1.0)
                props = await asyncio.to_thread(admin.namespace_properties, self.settings)
                if PROPERTY in props:
                    self.expected = props[PROPERTY]
                    await self.check()
                    return self.expected
                # Redis state older than this log, which must not be used.
                found = _text(await self.redis.get(self.key))
                raise StateLost(
                    f"Redis holds state generation {found} but the log records none (a "
                    "namespace deleted and created again?); run `eventdispatch state rebuild`"
                )
            await asyncio.to_thread(admin.set_namespace_property, self.settings, PROPERTY, expected)
            log.info("new deployment: state generation %s", expected)
        self.expected = expected
        await self.check()
        return expected

    async def refresh(self) -> None:
        props = await asyncio.to_thread(admin.namespace_properties, self.settings)
        self.expected = props.get(PROPERTY, self.expected)

    def verify(self, marker: bytes | str | None) -> None:
        """Raise StateLost unless `marker` (the value read from Redis) is the expected one."""
        found = _text(marker)
        if found is not None and found == self.expected:
            return
        if found is None:
            raise StateLost(
                "Redis holds no state generation (wiped, or a new Redis): processing is "
                "paused; run `eventdispatch state rebuild` to refill it from the log"
            )
        if found.startswith(REBUILDING):
            raise StateLost("`eventdispatch state rebuild` is running; paused until it ends")
        raise StateLost(
            f"Redis holds state generation {found}, the log expects {self.expected}: this "
            "Redis belongs to another deployment or an old backup; processing is paused; run "
            "`eventdispatch state rebuild`"
        )

    async def accept(self, marker: bytes | str | None) -> None:
        """`verify`, after re-reading the expected generation once if it does not match (a
        state rebuild moves it)."""
        try:
            self.verify(marker)
        except StateLost:
            await self.refresh()
            self.verify(marker)

    async def check(self) -> None:
        await self.accept(await self.redis.get(self.key))

    async def valid(self) -> None:
        """Return once Redis holds the expected generation. Every caller waits on one shared
        check loop, so thousands of paused devices make one check, and one log line, at a
        time; the loop reports itself in `retry.troubles()` for the health endpoint."""
        if self._waiting is None or self._waiting.done():
            self._waiting = asyncio.ensure_future(
                retry_in_place("check state generation", self.check)
            )
        await asyncio.shield(self._waiting)


def _text(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value
