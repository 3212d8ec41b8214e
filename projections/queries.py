"""Questions operators and producers ask of the read models."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from projections.reducers import TERMINAL_STATES, Doc
from projections.store import ProjectionStore, find_by_ids


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


async def unsuccessful(store: ProjectionStore, task_id: str, limit: int) -> tuple[list[Doc], int]:
    """Up to `limit` of a task's executions that ended otherwise than succeeded, and how many
    there are."""
    query = {"task_id": task_id, "state": {"$in": ["failed", "canceled"]}}
    coll = store.collection("executions")
    found = [d async for d in coll.find(query).sort("device_id", 1).limit(limit)]
    return found, await coll.count_documents(query)


async def tasks_overview(store: ProjectionStore, limit: int = 100) -> list[TaskSummary]:
    """The newest tasks with their counts per state (one aggregation for all of them)."""
    tasks = [
        d async for d in store.collection("tasks").find().sort("accepted_at_ms", -1).limit(limit)
    ]
    ids = [t["_id"] for t in tasks]
    pipeline: list[dict[str, Any]] = [
        {"$match": {"task_id": {"$in": ids}}},
        {"$group": {"_id": {"task": "$task_id", "state": "$state"}, "n": {"$sum": 1}}},
    ]
    counts: dict[str, dict[str, int]] = {t: {} for t in ids}
    async for row in await store.collection("executions").aggregate(pipeline):
        counts[row["_id"]["task"]][row["_id"]["state"]] = int(row["n"])
    return [TaskSummary(t, counts[t["_id"]]) for t in tasks]


@dataclass(frozen=True, slots=True)
class DeviceView:
    device: Doc | None
    executions: list[Doc]
    attempts: list[Doc]


async def device_view(store: ProjectionStore, device_id: str, last: int = 10) -> DeviceView:
    """A device's current and queued work, and its last attempts."""
    device = await store.collection("devices").find_one({"_id": device_id})
    live = {p["task_id"] for p in (device or {}).get("live", [])}
    ids = [f"{t}:{device_id}" for t in live]
    executions = list((await find_by_ids(store.collection("executions"), ids)).values())
    executions.sort(key=lambda d: d["created_at_ms"])
    attempts = [
        d
        async for d in store.collection("attempts")
        .find({"device_id": device_id})
        .sort("locked_at_ms", -1)
        .limit(last)
    ]
    return DeviceView(device, executions, attempts)
