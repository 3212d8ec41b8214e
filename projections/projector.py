"""The live projector: reads `events` and `device-logs` and keeps the read models current.

Each topic has one Failover subscription, so one projector applies a given event at a time;
its acknowledgements are the checkpoint. Batches are written before they are acknowledged, so a
crash mid-batch redelivers events that the reducers then skip (seq guard).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import pulsar
from pulsar import ConsumerType

from eventdispatch import wire
from eventdispatch.bus import Bus, Receiver
from eventdispatch.events import Event
from eventdispatch.retry import retry_in_place
from projections.store import ProjectionStore

log = logging.getLogger("eventdispatch.projector")


async def _batches(
    receiver: Receiver,
    stop: asyncio.Event,
    handle: Callable[[list[pulsar.Message]], Awaitable[None]],
) -> None:
    """Apply each received batch, then acknowledge it (cumulatively: Failover keeps order)."""
    try:
        while (batch := await receiver.next(stop)) is not None:
            await handle(batch)
            await receiver.consumer.acknowledge_cumulative(batch[-1])
    finally:
        await receiver.close()


class Projector:
    def __init__(self, bus: Bus, store: ProjectionStore, batch_size: int) -> None:
        self.bus = bus
        self.store = store
        self.batch_size = batch_size
        self.applied = 0

    async def run(self, stop: asyncio.Event) -> None:
        size = self.batch_size
        events = await self.bus.receiver("events", "projector", ConsumerType.Failover, size)
        logs = await self.bus.receiver("device-logs", "projector-logs", ConsumerType.Failover, size)
        await asyncio.gather(
            _batches(events, stop, self._apply_events),
            _batches(logs, stop, self._apply_logs),
        )

    async def _decode(self, topic: str, batch: list[pulsar.Message]) -> list[Any]:
        out = []
        for msg in batch:
            try:
                out.append(msg.value())
            except Exception as e:
                await self.bus.dead_letter(topic, msg, f"undecodable: {e}")
        return out

    async def _apply_events(self, batch: list[pulsar.Message]) -> None:
        decoded: list[Event] = []
        for record in await self._decode("events", batch):
            decoded.append(wire.event_from_record(record))
        await retry_in_place("project events", lambda: self.store.apply(decoded))
        self.applied += len(decoded)

    async def _apply_logs(self, batch: list[pulsar.Message]) -> None:
        lines = await self._decode("device-logs", batch)
        await retry_in_place("project logs", lambda: self.store.apply_logs(lines))
