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
from eventdispatch.bus import Bus
from eventdispatch.events import Event
from eventdispatch.retry import retry_in_place
from projections.store import ProjectionStore

log = logging.getLogger("eventdispatch.projector")


async def _pump(consumer: Any, queue: asyncio.Queue[pulsar.Message]) -> None:
    """Receive into a queue; batching then waits on the queue, never on a receive call."""
    while True:
        await queue.put(await consumer.receive())


async def _batches(
    consumer: Any,
    stop: asyncio.Event,
    size: int,
    flush_s: float,
    handle: Callable[[list[pulsar.Message]], Awaitable[None]],
) -> None:
    queue: asyncio.Queue[pulsar.Message] = asyncio.Queue(maxsize=size * 2)
    pump = asyncio.create_task(_pump(consumer, queue))
    stopped = asyncio.create_task(stop.wait())
    try:
        while not stop.is_set():
            first = asyncio.create_task(queue.get())
            done, _ = await asyncio.wait({first, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if first not in done:
                first.cancel()
                break
            batch = [first.result()]
            deadline = asyncio.get_running_loop().time() + flush_s
            while len(batch) < size:
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(queue.get(), remaining))
                except TimeoutError:
                    break
            await handle(batch)
            await consumer.acknowledge_cumulative(batch[-1])
    finally:
        pump.cancel()
        stopped.cancel()


class Projector:
    def __init__(self, bus: Bus, store: ProjectionStore, batch_size: int, flush_ms: int) -> None:
        self.bus = bus
        self.store = store
        self.batch_size = batch_size
        self.flush_s = flush_ms / 1000
        self.applied = 0

    async def run(self, stop: asyncio.Event) -> None:
        events = await self.bus.consumer("events", "projector", ConsumerType.Failover)
        logs = await self.bus.consumer("device-logs", "projector-logs", ConsumerType.Failover)
        try:
            await asyncio.gather(
                _batches(events, stop, self.batch_size, self.flush_s, self._apply_events),
                _batches(logs, stop, self.batch_size, self.flush_s, self._apply_logs),
            )
        finally:
            await events.close()
            await logs.close()

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
