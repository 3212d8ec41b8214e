"""MongoDB adapter for the read models: batched, idempotent writes and the generation alias.

Collections are named `g<generation>_<model>`; the document `_id: "alias"` in `projection_meta`
names the generation readers use, so a rebuild can fill a new generation and switch at once.
Only features MongoDB 7+ and FerretDB share are used (no transactions, no change streams).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from pymongo import ASCENDING, AsyncMongoClient, ReplaceOne
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase

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


async def current_generation(db: AsyncDatabase[Doc]) -> int:
    alias = await db.projection_meta.find_one({"_id": "alias"})
    return int(alias["generation"]) if alias else 1


class ProjectionStore:
    def __init__(self, db: AsyncDatabase[Doc], generation: int) -> None:
        self.db = db
        self.generation = generation

    @classmethod
    async def open(cls, db: AsyncDatabase[Doc]) -> ProjectionStore:
        store = cls(db, await current_generation(db))
        await store.ensure_indexes()
        return store

    def collection(self, model: str) -> AsyncCollection[Doc]:
        return self.db[f"g{self.generation}_{model}"]

    async def ensure_indexes(self) -> None:
        for model, indexes in INDEXES.items():
            for keys in indexes:
                await self.collection(model).create_index(keys)

    async def apply(self, events: list[Event]) -> None:
        """Fold a batch into every model: one read and one bulk write per model touched."""
        for model in MODELS:
            grouped: dict[str, list[Event]] = defaultdict(list)
            for event in events:
                key = model.key(event)
                if key is not None:
                    grouped[key].append(event)
            if not grouped:
                continue
            coll = self.collection(model.name)
            found = {d["_id"]: d async for d in coll.find({"_id": {"$in": list(grouped)}})}
            writes: list[ReplaceOne[Doc]] = []
            for key, batch in grouped.items():
                before = found.get(key)
                doc = before
                for event in batch:
                    doc = model.reduce(doc, event)
                if doc is not None and doc != before:
                    writes.append(ReplaceOne({"_id": key}, doc, upsert=True))
            if writes:
                await coll.bulk_write(writes, ordered=False)

    async def apply_logs(self, lines: list[dict[str, Any]]) -> None:
        writes = [ReplaceOne({"_id": d["_id"]}, d, upsert=True) for d in map(log_doc, lines)]
        if writes:
            await self.collection("logs").bulk_write(writes, ordered=False)
