"""MongoDB adapter for the read models: batched, idempotent writes and the generation alias.

Collections are named `g<generation>_<model>`; the document `_id: "alias"` in `projection_meta`
maps each model to the generation readers use, so a rebuild can fill a new generation and
switch at once. Only features MongoDB 7+ and FerretDB share are used (no transactions, no
change streams).
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from pymongo import ASCENDING, AsyncMongoClient, ReplaceOne
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import BulkWriteError

from eventdispatch.events import Event
from projections.reducers import MODELS, Doc, log_doc

INDEXES: dict[str, list[list[tuple[str, int]]]] = {
    "executions": [[("task_id", ASCENDING), ("state", ASCENDING)], [("device_id", ASCENDING)]],
    "attempts": [[("task_id", ASCENDING)], [("device_id", ASCENDING), ("attempt", ASCENDING)]],
    "scripts": [[("script_id", ASCENDING), ("version", ASCENDING)]],
    "logs": [[("exec_id", ASCENDING)], [("device_id", ASCENDING), ("ts_ms", ASCENDING)]],
}
ALL_MODELS = (*(m.name for m in MODELS), "logs")
WRITE_ORDER = sorted(MODELS, key=lambda m: m.name == "executions")  # executions last


def connect(url: str) -> AsyncMongoClient[Doc]:
    return AsyncMongoClient(url, serverSelectionTimeoutMS=5000, tz_aware=True)


Generations = dict[str, int]


async def current_generations(db: AsyncDatabase[Doc]) -> Generations:
    """The generation of each model that readers use (1 until a rebuild switches one)."""
    alias = await db.projection_meta.find_one({"_id": "alias"})
    found = alias.get("models", {}) if alias else {}
    return {m: int(found.get(m, 1)) for m in ALL_MODELS}


def collection_name(model: str, generation: int) -> str:
    return f"g{generation}_{model}"


def uses_secondary_indexes(build_info: Mapping[str, Any], plan: Mapping[str, Any]) -> bool:
    """Whether the server can answer a query on a field other than `_id` with an index, from
    its `buildInfo` and the `explain` of such a query. MongoDB can. FerretDB 1.x filters
    documents itself and hands SQL only the filters it can push down; on SQLite that is `_id`
    alone (`filterPushdown: false`, plan `SCAN <table>`), so an index on another field is
    never used there and only slows writes. Pure."""
    if "ferretdbVersion" not in build_info:
        return True
    return plan.get("filterPushdown") is True


CACHE_DOCS = 200_000
READ_CONCURRENCY = 32  # `_id` lookups in flight at once (the client's pool holds 100)
WRITE_BATCH = 10_000  # documents per insert_many/bulk_write of a rebuild
WRITE_STREAMS = 2  # concurrent insert_many/bulk_write calls of a rebuild's write
DUPLICATE_KEY = 11000
Taken = Mapping[str, tuple[list[Doc], list[Doc]]]  # per model: (to insert, to replace)


async def find_by_ids(coll: AsyncCollection[Doc], ids: Sequence[str]) -> dict[str, Doc]:
    """The documents with these `_id`s (absent ones left out), one equality query each,
    READ_CONCURRENCY at a time. FerretDB 1.x on SQLite pushes down an `_id` equality only:
    `{"_id": {"$in": [...]}}` and `$or` scan the whole collection (30 s for 20 ids among
    211,533 executions, against ~1 ms an equality), so reads by `$in` grew with the log.
    On MongoDB each equality is an index lookup too."""
    pending = iter(ids)  # shared by the readers: each id is taken once
    out: dict[str, Doc] = {}

    async def reader() -> None:
        for key in pending:
            doc = await coll.find_one({"_id": key})
            if doc is not None:
                out[key] = doc

    await asyncio.gather(*(reader() for _ in range(min(READ_CONCURRENCY, len(ids)))))
    return out


def write_chunks(taken: Taken, size: int) -> Iterator[tuple[str, bool, list[Doc]]]:
    """(model, replace?, documents) in chunks of at most `size`: the calls a write makes."""
    for model, (inserts, replaces) in taken.items():
        for docs, replace in ((inserts, False), (replaces, True)):
            for start in range(0, len(docs), size):
                yield model, replace, docs[start : start + size]


class ProjectionStore:
    """Writes one generation. The projector is its only writer, so the documents it wrote
    last are kept in memory (up to CACHE_DOCS) and a batch reads from MongoDB only the
    documents it has not seen."""

    def __init__(
        self, db: AsyncDatabase[Doc], generations: Generations, empty: frozenset[str] = frozenset()
    ) -> None:
        """`empty` names models whose collections start empty (a rebuild's new generation):
        for them the store remembers every key it wrote, and a key it never wrote needs no
        lookup."""
        self.db = db
        self.generations = dict(generations)
        self._cache: dict[str, dict[str, Doc]] = defaultdict(dict)
        self._written: dict[str, set[str]] = {m: set() for m in empty}
        self._indexes_used: bool | None = None

    @classmethod
    async def open(cls, db: AsyncDatabase[Doc]) -> ProjectionStore:
        store = cls(db, await current_generations(db))
        await store.ensure_indexes()
        return store

    def collection(self, model: str) -> AsyncCollection[Doc]:
        return self.db[collection_name(model, self.generations[model])]

    def switch(self, generations: Generations) -> None:
        """Write to other generations from now on (after a rebuild switched the alias)."""
        for model, gen in generations.items():
            if self.generations.get(model) != gen:
                self._cache.pop(model, None)
                self._written.pop(model, None)
        self.generations = dict(generations)

    async def indexes_used(self) -> bool:
        """Whether the server uses secondary indexes (see `uses_secondary_indexes`)."""
        if self._indexes_used is None:
            info = await self.db.client.admin.command("buildInfo")
            plan: Mapping[str, Any] = {}
            if "ferretdbVersion" in info:  # a query on another field than `_id`: how?
                plan = await self.db.projection_meta.find({"state": "switched"}).explain()
            self._indexes_used = uses_secondary_indexes(info, plan)
        return self._indexes_used

    async def ensure_indexes(self, models: Iterable[str] | None = None) -> None:
        """Create the secondary indexes of `models` (all by default) where the server uses
        them: on MongoDB, not on FerretDB's SQLite backend (they would only slow writes)."""
        if not await self.indexes_used():
            return
        for model in INDEXES if models is None else models:
            for keys in INDEXES.get(model, []):
                await self.collection(model).create_index(keys)

    async def apply(self, events: list[Event], only: frozenset[str] | None = None) -> None:
        """Fold a batch into every model (or `only` those): one read and one bulk write per
        model touched. Executions are written last: a reader that sees an execution end (what
        `status` and `wait_done` look at) finds the same batch's attempts and devices there."""
        for model in WRITE_ORDER:
            if only is not None and model.name not in only:
                continue
            grouped: dict[str, list[Event]] = defaultdict(list)
            for event in events:
                key = model.key(event)
                if key is not None:
                    grouped[key].append(event)
            if not grouped:
                continue
            coll = self.collection(model.name)
            cache = self._cache[model.name]
            written = self._written.get(model.name)
            missing = [k for k in grouped if k not in cache and (written is None or k in written)]
            found = {k: cache[k] for k in grouped if k in cache}
            if missing:
                found.update(await find_by_ids(coll, missing))
            inserts: list[Doc] = []
            replaces: list[ReplaceOne[Doc]] = []
            changed: dict[str, Doc] = {}
            for key, batch in grouped.items():
                before = found.get(key)
                doc = before
                for event in batch:
                    doc = model.reduce(doc, event)
                if doc is not None and doc != before:
                    changed[key] = doc
                    if before is None:
                        inserts.append(doc)
                    else:
                        replaces.append(ReplaceOne({"_id": key}, doc))
            if written is not None:  # before the write: a retry after a partial one looks up
                written.update(changed)
            if inserts:  # cheaper than upserts; a concurrent writer would be a bug
                await coll.insert_many(inserts, ordered=False)
            if replaces:
                await coll.bulk_write(replaces, ordered=False)
            if len(cache) + len(changed) > CACHE_DOCS:
                cache.clear()

            cache.update(changed)  # only after the write: a failed batch is read again

    async def apply_logs(self, lines: list[dict[str, Any]]) -> None:
        """Log lines never change: insert them, and a line seen before is no error."""
        if not lines:
            return
        try:
            await self.collection("logs").insert_many(map(log_doc, lines), ordered=False)
        except BulkWriteError as e:
            others = [w for w in e.details.get("writeErrors", []) if w.get("code") != DUPLICATE_KEY]
            if others:
                raise

    async def write_once(self, taken: Taken, streams: int = WRITE_STREAMS) -> None:
        """Write documents of a generation this store alone fills (a rebuild's): new ones with
        unordered `insert_many`, ones written before with unordered `bulk_write` of
        replacements, in chunks of WRITE_BATCH shared by `streams` concurrent calls (FerretDB
        decodes and encodes on several threads though SQLite takes one writer: two streams
        insert ~15% more than one, more do not help). `taken` holds each document once, so
        the chunks may go in any order; a replacement follows its insert because a rebuild
        writes again only after the previous write ended."""
        chunks = write_chunks(taken, WRITE_BATCH)

        async def stream() -> None:
            for model, replace, docs in chunks:  # shared: each chunk goes to one stream
                coll = self.collection(model)
                if replace:
                    await coll.bulk_write(
                        [ReplaceOne({"_id": d["_id"]}, d) for d in docs], ordered=False
                    )
                else:
                    await coll.insert_many(docs, ordered=False)

        async with asyncio.TaskGroup() as group:  # one failing cancels the others
            for _ in range(streams):
                group.create_task(stream())
