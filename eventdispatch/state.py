"""`eventdispatch state rebuild`: refill Redis' working state from the events topic.

Device states are the fold of each device's events through `decider.evolve`; scripts and
tasks come from ScriptRegistered and TaskAccepted. The new state gets a new generation (see
eventdispatch.generation), so stages paused on a lost Redis resume by themselves.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field

import redis.asyncio as redis
from pulsar import ConsumerType

from eventdispatch import admin, wire
from eventdispatch import events as ev
from eventdispatch.bus import Bus, Progress, count_entries, position, reached, within
from eventdispatch.config import Settings
from eventdispatch.decider import DeviceState, evolve
from eventdispatch.device_store import encode_state
from eventdispatch.events import Event
from eventdispatch.generation import PROPERTY, REBUILDING, marker_key


@dataclass
class Rebuilt:
    """What `rebuild` wrote, for its report."""

    generation: str
    events: int = 0
    devices: int = 0
    scripts: int = 0
    tasks: int = 0
    seconds: float = 0.0


@dataclass
class Fold:
    """The state the log implies, folded event by event. Pure."""

    devices: dict[str, DeviceState] = field(default_factory=dict)
    scripts: dict[tuple[str, int], ev.ScriptRegistered] = field(default_factory=dict)
    tasks: dict[str, ev.TaskAccepted] = field(default_factory=dict)

    def apply(self, event: Event) -> None:
        p = event.payload
        if isinstance(p, ev.ScriptRegistered):
            self.scripts.setdefault((p.script_id, p.version), p)
        elif isinstance(p, ev.TaskAccepted) and event.task_id is not None:
            self.tasks.setdefault(event.task_id, p)
        elif event.device_id is not None:
            state = self.devices.get(event.device_id) or DeviceState(event.device_id)
            if event.seq > state.seq:  # a duplicate (a retried publish) was applied once
                self.devices[event.device_id] = evolve(state, event)


def fold_state(events: Iterable[Event]) -> Fold:
    out = Fold()
    for e in events:
        out.apply(e)
    return out


def writes(fold: Fold, prefix: str) -> Iterable[tuple[str, str, str]]:
    """(kind, key, value) for every Redis write the folded state needs: `set` a string or
    `hset` a hash field (key "hash|field"). The layout is the one Registry and DeviceStore use."""
    for device_id, state in fold.devices.items():
        yield "set", f"{prefix}:dev:{device_id}", encode_state(state, None)
    latest: dict[str, int] = {}
    for (script_id, version), s in fold.scripts.items():
        record = {"language": s.language, "content": s.content, "sha256": s.sha256}
        yield "set", f"{prefix}:script:{script_id}:v:{version}", json.dumps(record)
        yield "hset", f"{prefix}:script:{script_id}:shas|{s.sha256}", str(version)
        latest[script_id] = max(version, latest.get(script_id, 0))
    for script_id, version in latest.items():
        yield "set", f"{prefix}:script:{script_id}:latest", str(version)
        yield "set", f"{prefix}:script:{script_id}:counter", str(version)
    for task_id, t in fold.tasks.items():
        # Not marked fanned out: a command redelivered after this rebuild fans out again,
        # with the same ids, which the deciders ignore; marking it could lose an Enqueue.
        value = {"fingerprint": t.fingerprint, "command_id": t.command_id, "devices": t.devices}
        yield "hset", f"{prefix}:task:{task_id}|record", json.dumps(value)


async def _clear(client: redis.Redis, prefix: str, keep: str) -> int:
    cleared = 0
    batch: list[bytes] = []
    async for key in client.scan_iter(f"{prefix}:*", count=1000):
        if key.decode() != keep:
            batch.append(key)
        if len(batch) >= 1000:
            cleared += await client.delete(*batch)
            batch = []
    if batch:
        cleared += await client.delete(*batch)
    return cleared


async def rebuild(
    settings: Settings,
    progress: Progress | None = None,
    settle_s: float = 2.0,
) -> Rebuilt:
    """Refill Redis from the events topic under a new generation.

    1. The marker is set to `rebuilding`: running stages pause at their next check, and
       after `settle_s` the decisions already in flight have published their events.
    2. Every key under the prefix is deleted, the events are folded from the first through
       the last one present now, and the folded state is written.
    3. The new generation is recorded with the namespace, then in Redis: stages resume.
    """
    generation = uuid.uuid4().hex[:12]
    client = redis.Redis.from_url(settings.redis_url)
    key = marker_key(settings.redis_prefix)
    out = Rebuilt(generation)
    started = time.monotonic()
    try:
        await client.set(key, f"{REBUILDING}:{generation}")
        await asyncio.sleep(settle_s)
        await _clear(client, settings.redis_prefix, keep=key)
        fold = Fold()
        out.events = await _read_events(settings, fold, progress or Progress())
        pipe = client.pipeline(transaction=False)
        pending = 0
        for kind, k, value in writes(fold, settings.redis_prefix):
            if kind == "set":
                pipe.set(k, value)
            else:
                name, _, field_name = k.rpartition("|")
                pipe.hset(name, field_name, value)
            pending += 1
            if pending >= 2000:
                await pipe.execute()
                pending = 0
        if pending:
            await pipe.execute()
        await asyncio.to_thread(admin.set_namespace_property, settings, PROPERTY, generation)
        await client.set(key, generation)
        out.devices, out.scripts, out.tasks = len(fold.devices), len(fold.scripts), len(fold.tasks)
        out.seconds = time.monotonic() - started
        return out
    finally:
        await client.aclose()


async def _read_events(settings: Settings, fold: Fold, progress: Progress) -> int:
    """Fold the events topic from its first message through the last one present now;
    progress in broker entries (see `bus.Progress`)."""
    end = await asyncio.to_thread(admin.last_position, settings, "events")
    if end is None:
        return 0
    total = await asyncio.to_thread(admin.entry_count, settings, "events", end[:2])
    if total:
        progress.total(total)
    bus = Bus(settings)
    subscription = f"state-rebuild-{uuid.uuid4().hex[:8]}"
    receiver = await bus.receiver("events", subscription, ConsumerType.Exclusive, 5000, gather_ms=1)
    never = asyncio.Event()
    read = 0
    entry: tuple[int, int] | None = None
    try:
        while True:
            batch = await receiver.next(never)
            assert batch is not None  # `never` is never set
            wanted = [m for m in batch if within(position(m), end)]
            for msg in wanted:
                fold.apply(wire.event_from_record(msg.value()))
            read += len(wanted)
            entries, entry = count_entries(map(position, wanted), entry)
            progress.advance(entries, len(wanted))
            if reached(position(batch[-1]), end):
                return read
    finally:
        await receiver.close()
        await bus.close()
        await asyncio.to_thread(admin.drop_subscription, settings, "events", subscription)
