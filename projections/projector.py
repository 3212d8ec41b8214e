"""The live projector: reads `events` and `device-logs` and keeps the read models current.

Each topic has one Failover subscription, so one projector applies a given event at a time;
its acknowledgements are the checkpoint. Batches are written before they are acknowledged, so a
crash mid-batch redelivers events that the reducers then skip (seq guard).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pulsar
from pulsar import ConsumerType

from eventdispatch import admin, wire
from eventdispatch.bus import Bus, Receiver, position, reached
from eventdispatch.events import Event
from eventdispatch.retry import retry_in_place
from projections.rebuild import adoption_point
from projections.store import ProjectionStore, current_generations

log = logging.getLogger("eventdispatch.projector")


async def _batches(
    receiver: Receiver,
    stop: asyncio.Event,
    handle: Callable[[list[pulsar.Message]], Awaitable[None]],
    size: int,
    linger_s: float,
) -> None:
    """Apply each batch, then acknowledge it (cumulatively: Failover keeps order).

    A batch waits up to `linger_s` for more events: an execution's events (Created, Locked,
    Sent, Succeeded) arrive within a fraction of a second, and folded into one batch they
    are one write per document instead of an insert and three replacements, which is most of
    what MongoDB (FerretDB above all) spends on the projections."""
    try:
        while (batch := await receiver.gather(stop, size, linger_s)) is not None:
            await handle(batch)
            await receiver.consumer.acknowledge_cumulative(batch[-1])
    finally:
        await receiver.close()


ALIAS_CHECK_S = 1.0


class Projector:
    def __init__(
        self, bus: Bus, store: ProjectionStore, batch_size: int, linger_s: float = 0.0
    ) -> None:
        self.bus = bus
        self.store = store
        self.batch_size = batch_size
        self.linger_s = linger_s
        self.applied = 0
        self._alias_checked = 0.0
        # One writer at a time: the events batch, the logs batch and a replay all read and
        # write documents, and must not interleave on the same ones.
        self._lock = asyncio.Lock()

    async def run(self, stop: asyncio.Event) -> None:
        size = self.batch_size
        events = await self.bus.receiver(
            "events", "projector", ConsumerType.Failover, size, gather_ms=1
        )
        logs = await self.bus.receiver(
            "device-logs", "projector-logs", ConsumerType.Failover, size, gather_ms=1
        )
        await asyncio.gather(
            _batches(events, stop, self._apply_events, size, self.linger_s),
            _batches(logs, stop, self._apply_logs, size, self.linger_s),
            self._watch_alias(stop),
        )

    async def _watch_alias(self, stop: asyncio.Event) -> None:
        """Follow a rebuild's switch even when no event arrives to trigger it."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), ALIAS_CHECK_S)
            if not stop.is_set():
                async with self._lock:
                    await retry_in_place("follow alias", self._follow_alias)

    async def _decode(self, topic: str, batch: list[pulsar.Message]) -> list[Any]:
        out = []
        for msg in batch:
            try:
                out.append(msg.value())
            except Exception as e:
                await self.bus.dead_letter(topic, msg, f"undecodable: {e}")
        return out

    async def _follow_alias(self) -> None:
        """Move to the generations a rebuild switched readers to, replaying what the rebuild
        did not read (idempotent: whatever is applied twice changes nothing)."""
        now = time.monotonic()
        if now - self._alias_checked < ALIAS_CHECK_S:
            return
        self._alias_checked = now
        new = await current_generations(self.store.db)
        if new == self.store.generations:
            return
        points = await adoption_point(self.store.db, self.store.generations, new)
        changed = frozenset(m for m, g in new.items() if self.store.generations.get(m) != g)
        log.info("switching %s to generations %s; replaying from %s", sorted(changed), new, points)
        self.store.switch(new)
        # Built by the rebuild before its switch where the server uses them; a no-op then.
        await self.store.ensure_indexes(changed)
        for topic, start in points.items():
            await self._replay(topic, start, changed)

    async def _replay(self, topic: str, start: list[int] | None, only: frozenset[str]) -> None:
        end = admin.last_position(self.bus.settings, topic)
        if end is None:
            return
        first = pulsar.MessageId.earliest if start is None else pulsar.MessageId(-1, *start)
        reader = await self.bus.reader(topic, first)
        pending: list[Any] = []
        replayed = 0

        async def flush() -> None:
            batch = list(pending)
            pending.clear()
            if topic == "events":
                events = [wire.event_from_record(r) for r in batch]
                await retry_in_place("replay", lambda: self.store.apply(events, only))
            else:
                await retry_in_place("replay", lambda: self.store.apply_logs(batch))

        try:
            while await reader.has_message_available():
                msg = await reader.read_next()
                pending.append(msg.value())
                replayed += 1
                if len(pending) >= self.batch_size:
                    await flush()
                if reached(position(msg), end):  # the whole last batch, not its first message
                    break
            await flush()
        finally:
            await reader.close()
        log.info("replayed %d messages of %s into the new generation", replayed, topic)

    async def _apply_events(self, batch: list[pulsar.Message]) -> None:
        async with self._lock:
            await self._follow_alias()
            await self._apply_events_now(batch)

    async def _apply_events_now(self, batch: list[pulsar.Message]) -> None:
        decoded: list[Event] = []
        for record in await self._decode("events", batch):
            decoded.append(wire.event_from_record(record))
        await retry_in_place("project events", lambda: self.store.apply(decoded))
        self.applied += len(decoded)
        if batch:
            await retry_in_place("checkpoint", lambda: self._checkpoint(batch[-1]))

    async def _checkpoint(self, last: pulsar.Message) -> None:
        """Record when the newest applied event was published, for `eventdispatch lag`."""
        await self.store.db.projection_meta.replace_one(
            {"_id": "checkpoint"},
            {
                "_id": "checkpoint",
                "published_at_ms": last.publish_timestamp(),
                "applied_at_ms": int(time.time() * 1000),
            },
            upsert=True,
        )

    async def _apply_logs(self, batch: list[pulsar.Message]) -> None:
        lines = await self._decode("device-logs", batch)
        async with self._lock:
            await retry_in_place("project logs", lambda: self.store.apply_logs(lines))
