"""Redis adapter for what the planner must remember between commands: registered scripts and
accepted tasks. Like device state, it is a cache of the log (ScriptRegistered and TaskAccepted
carry everything stored here)."""

from __future__ import annotations

import json
from dataclasses import dataclass

import redis.asyncio as redis


@dataclass(frozen=True, slots=True)
class ScriptVersion:
    script_id: str
    version: int
    language: str
    content: str
    sha256: str


@dataclass(frozen=True, slots=True)
class TaskRecord:
    task_id: str
    fingerprint: str
    command_id: str
    devices: tuple[str, ...]
    fanned_out: bool


class Registry:
    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.redis = client
        self.prefix = prefix
        self._scripts: dict[tuple[str, int], ScriptVersion] = {}

    def _k(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    async def register_script(
        self, script_id: str, language: str, content: str, sha256: str
    ) -> tuple[int, bool]:
        """(version, new): the same content registered again keeps its version."""
        shas = self._k("script", script_id, "shas")
        known = await self.redis.hget(shas, sha256)
        if known is not None:
            return int(known), False
        version = int(await self.redis.incr(self._k("script", script_id, "counter")))
        if not await self.redis.hsetnx(shas, sha256, version):
            winner = await self.redis.hget(shas, sha256)  # a concurrent twin won
            return int(winner or version), False
        record = {"language": language, "content": content, "sha256": sha256}
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(self._k("script", script_id, "v", str(version)), json.dumps(record))
            pipe.set(self._k("script", script_id, "latest"), version)
            await pipe.execute()
        return version, True

    async def script(self, script_id: str, version: int | None = None) -> ScriptVersion | None:
        """A registered version (the latest when `version` is None). Versions never change,
        so they are cached in the process."""
        if version is None:
            latest = await self.redis.get(self._k("script", script_id, "latest"))
            if latest is None:
                return None
            version = int(latest)
        cached = self._scripts.get((script_id, version))
        if cached is not None:
            return cached
        raw = await self.redis.get(self._k("script", script_id, "v", str(version)))
        if raw is None:
            return None
        data = json.loads(raw)
        found = ScriptVersion(script_id, version, data["language"], data["content"], data["sha256"])
        if len(self._scripts) < 10_000:
            self._scripts[(script_id, version)] = found
        return found

    async def claim_task(
        self, task_id: str, fingerprint: str, command_id: str, devices: tuple[str, ...]
    ) -> TaskRecord | None:
        """Record a new task; if the id is taken, return what holds it instead."""
        key = self._k("task", task_id)
        value = {"fingerprint": fingerprint, "command_id": command_id, "devices": list(devices)}
        if await self.redis.hsetnx(key, "record", json.dumps(value)):
            return None
        return await self.task(task_id)

    async def mark_fanned_out(self, task_id: str) -> None:
        await self.redis.hset(self._k("task", task_id), "fanned_out", 1)

    async def task(self, task_id: str) -> TaskRecord | None:
        raw = await self.redis.hgetall(self._k("task", task_id))
        if not raw or b"record" not in raw:
            return None
        data = json.loads(raw[b"record"])
        return TaskRecord(
            task_id,
            data["fingerprint"],
            data["command_id"],
            tuple(data["devices"]),
            raw.get(b"fanned_out") == b"1",
        )
