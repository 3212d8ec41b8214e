"""MongoDB adapter for the read models: batched, idempotent writes and the generation alias.

Collections are named `g<generation>_<model>`; the document `_id: "alias"` in `projection_meta`
maps each model to the generation readers use, so a rebuild can fill a new generation and
switch at once. Only features MongoDB 7+ and FerretDB share are used (no transactions, no
change streams).
"""

from __future__ import annotations

from collections import defaultdict
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


CACHE_DOCS = 200_000
WRITE_BATCH = 20_000  # documents per insert_many/bulk_write of a rebuild
DUPLICATE_KEY = 11000


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

    async def ensure_indexes(self) -> None:
        for model, indexes in INDEXES.items():
            for keys in indexes:
                await self.collection(model).create_index(keys)

    async def apply(self, events: list[Event], only: frozenset[str] | None = None) -> None:
        """Fold a batch into every model (or `only` those): one read and one bulk write per
        model touched."""
        for model in MODELS:
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
                found.update({d["_id"]: d async for d in coll.find({"_id": {"$in": missing}})})
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

    async def write_once(self, model: str, inserts: list[Doc], replaces: list[Doc]) -> None:
        """Write documents of a generation this store alone fills (a rebuild's): new ones with
        unordered `insert_many` in large batches (pymongo splits them into messages of at most
        48 MB), ones written before with one unordered `bulk_write` of replacements."""
        coll = self.collection(model)
        for start in range(0, len(inserts), WRITE_BATCH):
            await coll.insert_many(inserts[start : start + WRITE_BATCH], ordered=False)
        for start in range(0, len(replaces), WRITE_BATCH):
            chunk = replaces[start : start + WRITE_BATCH]
            await coll.bulk_write([ReplaceOne({"_id": d["_id"]}, d) for d in chunk], ordered=False)
