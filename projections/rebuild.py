"""Rebuild read models from the log into a new generation, then switch readers to it.

    1. Any rebuild left `building` by an interrupted run is discarded (its collections dropped,
       its subscription deleted); the live generation is never touched.
    2. A new generation is filled from the first event through the last one that existed when
       the rebuild started, with its own subscription (so its backlog measures progress).
    3. The alias document is switched for the rebuilt models, and the rebuild records the
       position it read through. The live projector sees the switch, replays the log from that
       position into the new generation (`adopt`), and carries on there: no gap, and no double
       count, because every reducer applies an event once.
With `verify`, the new generation is a shadow compared with the live one and then dropped.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import pulsar
from pulsar import ConsumerType
from pymongo.asynchronous.database import AsyncDatabase

from eventdispatch import admin, wire
from eventdispatch.bus import Bus, position
from eventdispatch.config import Settings
from projections.reducers import MODELS, Doc
from projections.store import (
    ALL_MODELS,
    Generations,
    ProjectionStore,
    collection_name,
    connect,
    current_generations,
)

EVENT_MODELS = frozenset(m.name for m in MODELS)
Position = list[int]


@dataclass(frozen=True, slots=True)
class Progress:
    """Callbacks for a progress display: a topic's backlog once known, then each batch. The
    backlog counts broker entries, and a batched entry holds several messages, so it is a
    lower bound of the messages to read."""

    total: Callable[[int], None] = lambda _: None
    advance: Callable[[int], None] = lambda _: None


@dataclass(frozen=True, slots=True)
class Difference:
    model: str
    key: str
    live: Doc | None
    rebuilt: Doc | None


@dataclass
class Outcome:
    generation: int
    models: tuple[str, ...]
    events: int = 0
    seconds: float = 0.0
    differences: list[Difference] = field(default_factory=list)
    switched: bool = False

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0


def _meta_id(generation: int) -> str:
    return f"rebuild:{generation}"


async def _next_generation(db: AsyncDatabase[Doc], live: Generations) -> int:
    used = [
        int(d["generation"])
        async for d in db.projection_meta.find({"_id": {"$regex": "^rebuild:"}})
    ]
    return max([*live.values(), *used]) + 1


async def _discard_interrupted(settings: Settings, db: AsyncDatabase[Doc]) -> list[int]:
    """Drop what an interrupted rebuild left behind; the live generation is untouched."""
    dropped = []
    async for doc in db.projection_meta.find({"_id": {"$regex": "^rebuild:"}, "state": "building"}):
        gen = int(doc["generation"])
        for model in doc["models"]:
            await db.drop_collection(collection_name(model, gen))
        for topic in ("events", "device-logs"):
            admin.drop_subscription(settings, topic, f"rebuild-g{gen}")
        await db.projection_meta.update_one({"_id": doc["_id"]}, {"$set": {"state": "discarded"}})
        dropped.append(gen)
    return dropped


async def _read_into(
    bus: Bus,
    settings: Settings,
    topic: str,
    subscription: str,
    apply: Callable[[list[pulsar.Message]], Awaitable[None]],
    progress: Progress,
) -> tuple[int, Position | None]:
    """Feed a topic from its first message through the last one present now to `apply`.
    Returns (messages read, position read through)."""
    end = admin.last_position(settings, topic)
    if end is None:
        return 0, None
    receiver = await bus.receiver(topic, subscription, ConsumerType.Exclusive, 5000)
    progress.total(admin.backlog(settings, topic, subscription) or 0)  # entries, see Progress
    never = asyncio.Event()
    read = 0
    last: Position | None = None
    try:
        while True:
            batch = await receiver.next(never)
            assert batch is not None  # `never` is never set
            wanted = [m for m in batch if position(m)[:2] <= end]
            if wanted:
                await apply(wanted)
                read += len(wanted)
                last = list(position(wanted[-1]))
                progress.advance(len(wanted))
            await receiver.consumer.acknowledge_cumulative(batch[-1])
            if position(batch[-1])[:2] >= end:
                return read, last
    finally:
        await receiver.close()
        admin.drop_subscription(settings, topic, subscription)


async def rebuild(
    settings: Settings,
    models: tuple[str, ...] = ALL_MODELS,
    verify: bool = False,
    progress: Progress | None = None,
) -> Outcome:
    """Rebuild `models` from the log (see the module docstring)."""
    unknown = set(models) - set(ALL_MODELS)
    if unknown:
        raise ValueError(f"unknown projection(s) {sorted(unknown)}; choose from {list(ALL_MODELS)}")
    mongo = connect(settings.mongo_url)
    bus = Bus(settings)
    try:
        db = mongo[settings.mongo_db]
        await _discard_interrupted(settings, db)
        live = await current_generations(db)
        gen = await _next_generation(db, live)
        outcome = Outcome(gen, tuple(models))
        await db.projection_meta.insert_one(
            {
                "_id": _meta_id(gen),
                "generation": gen,
                "models": list(models),
                "state": "building",
                "verify": verify,
                "started_at_ms": int(time.time() * 1000),
            }
        )
        store = ProjectionStore(db, {**live, **{m: gen for m in models}}, frozenset(models))
        await store.ensure_indexes()
        only = frozenset(models)
        topics = []
        if only & EVENT_MODELS:
            topics.append("events")
        if "logs" in only:
            topics.append("device-logs")

        async def apply_events(batch: list[pulsar.Message]) -> None:
            await store.apply([wire.event_from_record(m.value()) for m in batch], only)

        async def apply_logs(batch: list[pulsar.Message]) -> None:
            await store.apply_logs([m.value() for m in batch])

        started = time.monotonic()
        through: dict[str, Position | None] = {}
        for topic in topics:
            n, last = await _read_into(
                bus,
                settings,
                topic,
                f"rebuild-g{gen}",
                apply_events if topic == "events" else apply_logs,
                progress or Progress(),
            )
            outcome.events += n
            through[topic] = last
        outcome.seconds = time.monotonic() - started
        meta = {
            "through": through,
            "events": outcome.events,
            "finished_at_ms": int(time.time() * 1000),
        }
        if verify:
            outcome.differences = await _compare(db, live, gen, models)
            for model in models:
                await db.drop_collection(collection_name(model, gen))
            meta["state"] = "verified"
        else:
            alias = await db.projection_meta.find_one({"_id": "alias"}) or {"models": {}}
            switched = {**alias.get("models", {}), **{m: gen for m in models}}
            meta["state"] = "switched"
            await db.projection_meta.update_one({"_id": _meta_id(gen)}, {"$set": meta})
            await db.projection_meta.replace_one(
                {"_id": "alias"}, {"_id": "alias", "models": switched}, upsert=True
            )
            outcome.switched = True
            return outcome
        await db.projection_meta.update_one({"_id": _meta_id(gen)}, {"$set": meta})
        return outcome
    finally:
        await bus.close()
        await mongo.close()


async def _compare(
    db: AsyncDatabase[Doc], live: Generations, shadow: int, models: tuple[str, ...]
) -> list[Difference]:
    """Every document that differs between the live generation and the shadow."""
    out: list[Difference] = []
    for model in models:
        a = {d["_id"]: d async for d in db[collection_name(model, live[model])].find()}
        b = {d["_id"]: d async for d in db[collection_name(model, shadow)].find()}
        for key in sorted(set(a) | set(b), key=str):
            if a.get(key) != b.get(key):
                out.append(Difference(model, str(key), a.get(key), b.get(key)))
    return out


async def adoption_point(
    db: AsyncDatabase[Doc], old: Generations, new: Generations
) -> dict[str, Position | None]:
    """Where the log must be replayed from, per topic, for the models that `new` switched to a
    rebuilt generation: the earliest position their rebuilds read through (None: the start)."""
    points: dict[str, Position | None] = {}
    for model, gen in new.items():
        if old.get(model) == gen:
            continue
        meta = await db.projection_meta.find_one({"_id": _meta_id(gen)})
        for topic, pos in (meta or {}).get("through", {}).items():
            known = points.get(topic, pos)
            points[topic] = None if pos is None or known is None else min(pos, known)
    return points
