"""Questions operators and producers ask of the read models."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from projections.reducers import TERMINAL_STATES, Doc
from projections.store import ProjectionStore


@dataclass(frozen=True, slots=True)
class TaskSummary:
    task: Doc
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return int(self.task["device_count"])

    @property
    def ended(self) -> int:
        return sum(self.counts.get(s, 0) for s in TERMINAL_STATES)

    @property
    def done(self) -> bool:
        return self.ended >= self.total

    def as_json(self) -> dict[str, Any]:
        return {
            "task_id": self.task["_id"],
            "script_id": self.task["script_id"],
            "script_version": self.task["script_version"],
            "devices": self.total,
            "accepted_at_ms": self.task["accepted_at_ms"],
            "counts": self.counts,
            "pending": self.total - sum(self.counts.values()),
            "done": self.done,
        }


async def task_summary(store: ProjectionStore, task_id: str) -> TaskSummary | None:
    """The task and how many of its executions are in each state (read from executions)."""
    task = await store.collection("tasks").find_one({"_id": task_id})
    if task is None:
        return None
    pipeline: list[dict[str, Any]] = [
        {"$match": {"task_id": task_id}},
        {"$group": {"_id": "$state", "n": {"$sum": 1}}},
    ]
    cursor = await store.collection("executions").aggregate(pipeline)
    counts = {d["_id"]: int(d["n"]) async for d in cursor}
    return TaskSummary(task, counts)


async def rejection(store: ProjectionStore, command_id: str) -> Doc | None:
    return await store.collection("rejections").find_one({"_id": command_id})


async def script_version_by_sha(store: ProjectionStore, script_id: str, sha256: str) -> Doc | None:
    return await store.collection("scripts").find_one({"script_id": script_id, "sha256": sha256})


async def executions(store: ProjectionStore, task_id: str, limit: int = 0) -> list[Doc]:
    cursor = store.collection("executions").find({"task_id": task_id}).sort("device_id", 1)
    if limit:
        cursor = cursor.limit(limit)
    return [d async for d in cursor]
