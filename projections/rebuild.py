"""Rebuild read models from the log into a new generation, then switch readers to it.

    1. Any rebuild left `building` by an interrupted run is discarded (its collections dropped,
       its subscription deleted); the live generation is never touched.
    2. A new generation is filled from the first event through the last one that existed when
       the rebuild started, with its own subscription; progress is counted in broker entries,
       the unit the broker can count ahead.
    3. The alias document is switched for the rebuilt models, and the rebuild records the
       position it read through. The live projector sees the switch, replays the log from that
       position into the new generation (`adopt`), and carries on there: no gap, and no double
       count, because every reducer applies an event once.
With `verify`, the new generation is a shadow compared with the live one and then dropped.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from itertools import islice

import pulsar
from pulsar import ConsumerType
from pymongo.asynchronous.database import AsyncDatabase

from eventdispatch import admin, wire
from eventdispatch.bus import Bus, MessageKey, Progress, count_entries, position, reached, within
from eventdispatch.config import Settings
from eventdispatch.events import Event
from projections.reducers import MODELS, Doc, Model
from projections.store import (
    ALL_MODELS,
    Generations,
    ProjectionStore,
    Taken,
    collection_name,
    connect,
    current_generations,
    find_by_ids,
)

__all__ = ["Difference", "Fold", "Outcome", "Progress", "adoption_point", "rebuild"]

EVENT_MODELS = frozenset(m.name for m in MODELS)
Position = list[int]
WINDOW_DOCS = 100_000  # documents changed in memory before the coldest are handed to a write
KEEP_DOCS = 25_000  # written documents per model kept in memory for later events to fold into


class Fold:
    """A rebuild's in-memory fold of events into the documents of a generation it alone writes.

    Changed documents wait in memory in two generations, *young* and *old*. An event folds into
    its document wherever it is and moves it to young. When young holds `window` documents,
    `take` hands over the old ones, untouched for a whole window, for writing (those never
    written to insert, the others to replace), and young becomes old. So a document still
    changing (a device, an execution being retried) stays in memory, and most documents are
    written once. The last written ones are kept (`keep` per model) so a later event folds into
    them without a read; an event touching a written document no longer in memory is *blocked*,
    with every later event of that document, until `load` gives the stored document back.
    Documents change only through the reducers, so the result is the reducers' fold of the
    whole log (`projections.reducers.fold`).
    """

    def __init__(
        self, models: Iterable[Model], window: int = WINDOW_DOCS, keep: int = KEEP_DOCS
    ) -> None:
        self.models = tuple(models)
        self.window = window
        self.keep = keep
        names = [m.name for m in self.models]
        self.young: dict[str, dict[str, Doc]] = {n: {} for n in names}
        self.old: dict[str, dict[str, Doc]] = {n: {} for n in names}
        self.kept: dict[str, dict[str, Doc]] = {n: {} for n in names}
        self.written: dict[str, set[str]] = {n: set() for n in names}
        self.blocked: dict[str, dict[str, list[Event]]] = {n: {} for n in names}
        self.count: dict[str, int] = dict.fromkeys(names, 0)  # documents handed over

    @property
    def full(self) -> bool:
        return sum(map(len, self.young.values())) >= self.window

    def blocked_keys(self) -> dict[str, list[str]]:
        """Per model, the keys whose stored documents `load` must supply."""
        return {name: list(keys) for name, keys in self.blocked.items() if keys}

    def add(self, events: list[Event]) -> None:
        for model in self.models:
            self._add(model, events)

    def _add(self, model: Model, events: Iterable[Event]) -> None:
        key_of, reduce = model.key, model.reduce
        young, old, kept = self.young[model.name], self.old[model.name], self.kept[model.name]
        written, blocked = self.written[model.name], self.blocked[model.name]
        for event in events:
            key = key_of(event)
            if key is None:
                continue
            if blocked and key in blocked:
                blocked[key].append(event)
                continue
            before = young.get(key)
            if before is None:
                before = old.pop(key, None)
                if before is not None:  # changed before, touched again: stays in memory
                    young[key] = before
                else:
                    before = kept.get(key)
                    if before is None and key in written:
                        blocked[key] = [event]
                        continue
            doc = reduce(before, event)
            if doc is not None and doc is not before:
                young[key] = doc

    def load(self, model: str, docs: Iterable[Doc]) -> None:
        """Stored documents for blocked keys: fold their blocked events into them, in order."""
        blocked, kept = self.blocked[model], self.kept[model]
        found = {d["_id"]: d for d in docs}
        for key in list(blocked):
            events = blocked.pop(key)
            if key in found:
                kept[key] = found[key]
            else:  # never stored after all: as if it were new
                self.written[model].discard(key)
            self._add(next(m for m in self.models if m.name == model), events)

    def take(self, everything: bool = False) -> dict[str, tuple[list[Doc], list[Doc]]]:
        """Documents to write per model, as (to insert, to replace): the old generation, or
        with `everything` all changed ones (at the end). They count as written from now on,
        so they must be stored before any document is read back."""
        if any(self.blocked.values()):
            raise RuntimeError("take() with blocked events: load() their documents first")
        out = {}
        for name in self.young:
            docs = self.old[name]
            if everything:
                docs.update(self.young[name])
                self.young[name] = {}
            self.old[name] = self.young[name]
            self.young[name] = {}
            if docs:
                out[name] = self._hand_over(name, docs)
        return out

    def _hand_over(self, name: str, docs: dict[str, Doc]) -> tuple[list[Doc], list[Doc]]:
        written, kept = self.written[name], self.kept[name]
        inserts = [d for k, d in docs.items() if k not in written]
        replaces = [d for k, d in docs.items() if k in written]
        written.update(docs)
        kept.update(docs)
        excess = len(kept) - self.keep
        if excess > 0:  # the oldest first (a key written again keeps its first place: fine)
            for key in list(islice(kept, excess)):
                del kept[key]
        self.count[name] += len(docs)
        return inserts, replaces


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
    end: MessageKey,
    subscription: str,
    apply: Callable[[list[pulsar.Message]], Awaitable[None]],
    progress: Progress,
) -> tuple[int, Position | None]:
    """Feed a topic from its first message through the message `end` to `apply`, reporting
    each batch's new entries and messages to `progress`. Returns (messages read, position
    read through)."""
    receiver = await bus.receiver(topic, subscription, ConsumerType.Exclusive, 5000, gather_ms=1)
    never = asyncio.Event()
    read = 0
    last: Position | None = None
    entry: tuple[int, int] | None = None
    try:
        while True:
            batch = await receiver.next(never)
            assert batch is not None  # `never` is never set
            # A batch can arrive twice (the receiver may re-offer one the loop took just as
            # the hand-over timed out); the log is read in order, so skip what was read.
            seen = tuple(last) if last is not None else None
            wanted = [
                m
                for m in batch
                if within(position(m), end) and (seen is None or position(m) > seen)
            ]
            if wanted:
                await apply(wanted)
                read += len(wanted)
                last = list(position(wanted[-1]))
                entries, entry = count_entries(map(position, wanted), entry)
                progress.advance(entries, len(wanted))
            await receiver.consumer.acknowledge_cumulative(batch[-1])
            if reached(position(batch[-1]), end):
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
        only = frozenset(models)
        topics = []
        if only & EVENT_MODELS:
            topics.append("events")
        if "logs" in only:
            topics.append("device-logs")
        fold = Fold(m for m in MODELS if m.name in only)
        writing: asyncio.Task[None] | None = None
        shown = progress or Progress()
        # Each topic is read through its last entry now, the entries counted up front so
        # the progress display has its total from the start.
        ends = {t: end for t in topics if (end := admin.last_position(settings, t)) is not None}
        totals = {t: admin.entry_count(settings, t, end[:2]) or 0 for t, end in ends.items()}
        for n in totals.values():
            if n:
                shown.total(n)

        async def settle() -> None:
            """Wait for the write in flight (and raise its error)."""
            nonlocal writing
            if writing is not None:
                task, writing = writing, None
                await task

        async def write(taken: Taken) -> None:
            await store.write_once(taken)

        async def flush(everything: bool = False) -> int:
            """Hand the cold documents to a write that runs while the next events fold;
            returns how many."""
            nonlocal writing
            await settle()  # one write at a time: a replacement follows its insert
            taken = fold.take(everything)
            if taken:
                writing = asyncio.create_task(write(taken))
            return sum(len(i) + len(r) for i, r in taken.values())

        async def read_back() -> None:
            await settle()  # what left memory may still be on its way to the store
            for model, keys in fold.blocked_keys().items():
                found = await find_by_ids(store.collection(model), keys)
                fold.load(model, list(found.values()))

        async def apply_events(batch: list[pulsar.Message]) -> None:
            fold.add([wire.event_from_record(m.value()) for m in batch])
            if any(fold.blocked.values()):
                await read_back()
            if fold.full:
                await flush()

        async def apply_logs(batch: list[pulsar.Message]) -> None:
            await store.apply_logs([m.value() for m in batch])

        started = time.monotonic()
        through: dict[str, Position | None] = dict.fromkeys(topics)  # empty: replay it all
        phases: dict[str, float] = {}  # seconds from the start, recorded in the meta document
        last_write = 0  # documents written after the last event was read
        try:
            for topic, end in ends.items():
                n, last = await _read_into(
                    bus,
                    settings,
                    topic,
                    end,
                    f"rebuild-g{gen}",
                    apply_events if topic == "events" else apply_logs,
                    shown,
                )
                outcome.events += n
                through[topic] = last
                phases[f"read {topic}"] = time.monotonic() - started
                if topic == "events":
                    await settle()
                    phases["earlier writes"] = time.monotonic() - started
                    last_write = await flush(everything=True)
                    await settle()
                    phases["written"] = time.monotonic() - started
        finally:
            if writing is not None:  # failed: the next rebuild discards this generation
                writing.cancel()
        indexed = not verify and await store.indexes_used()
        if indexed:  # built after the load: cheaper than keeping them up to date through it
            await store.ensure_indexes()
            phases["indexed"] = time.monotonic() - started
        outcome.seconds = time.monotonic() - started
        meta = {
            "through": through,
            "indexes": indexed,
            "events": outcome.events,
            "documents": fold.count,
            "last_write": last_write,
            "seconds": {k: round(v, 1) for k, v in phases.items()},
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
