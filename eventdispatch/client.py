"""The producer API: validate a command, publish it to `commands`, and (optionally) wait for
the planner's verdict and the task's outcome, read from the projections.

    async with EventDispatch() as ed:
        script = await ed.register_script("disk-check", Path("examples/check_disk.sh").read_text())
        sub = await ed.submit("rollout-42", "disk-check", ["dev-1", "dev-2"])
        await ed.wait_accepted(sub)          # raises CommandRejected with the reason code
        summary = await ed.wait_done("rollout-42")

`SyncEventDispatch` offers the same calls for code that is not async.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Any, TypeVar

import pulsar.asyncio
from pydantic import ValidationError

from eventdispatch import commands
from eventdispatch.bus import Bus, Outgoing, publish
from eventdispatch.commands import CancelTask, Command, CreateTask, RegisterScript, refusal_from
from eventdispatch.config import Settings
from eventdispatch.reasons import Reason
from projections import queries
from projections.queries import TaskSummary
from projections.store import ProjectionStore, connect, current_generations

T = TypeVar("T")


class CommandRejected(Exception):
    """The command was refused, by local validation or by the planner."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Submission:
    task_id: str
    command_id: str
    fingerprint: str


@dataclass(frozen=True, slots=True)
class ScriptInfo:
    script_id: str
    version: int
    sha256: str


def _validate(model: type[commands.Command], **fields: Any) -> Command:
    try:
        return model.model_validate(fields)
    except ValidationError as e:
        refusal = refusal_from(e)
        raise CommandRejected(str(refusal.code), refusal.reason) from None


class EventDispatch:
    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or Settings()
        self._bus: Bus | None = None
        self._producer: pulsar.asyncio.Producer | None = None
        self._mongo = connect(self.settings.mongo_url)

    async def __aenter__(self) -> EventDispatch:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._producer is not None:
            await self._producer.close()
        if self._bus is not None:
            await self._bus.close()
        await self._mongo.close()

    async def _send(self, command: Command, key: str) -> str:
        if self._producer is None:
            self._bus = Bus(self.settings)
            self._producer = await self._bus.producer("commands", large=True)
        command_id = str(uuid.uuid4())
        body = command.model_dump(exclude={"type"})
        record = {
            "command_id": command_id,
            "issued_at_ms": int(time.time() * 1000),
            "type": command.type,
            "body": (f"eventdispatch.commands.{command.type}", body),
        }
        await publish(self._producer, [Outgoing(record, key)])
        return command_id

    async def store(self) -> ProjectionStore:
        """The read models, at the generations readers use now."""
        db = self._mongo[self.settings.mongo_db]
        return ProjectionStore(db, await current_generations(db))

    async def register_script(
        self, script_id: str, content: str, language: str = "sh", *, timeout_s: float = 30
    ) -> ScriptInfo:
        """Register a script and wait until its version is known."""
        command = _validate(RegisterScript, script_id=script_id, language=language, content=content)
        command_id = await self._send(command, script_id)
        sha = hashlib.sha256(content.encode()).hexdigest()
        store = await self.store()

        async def outcome() -> ScriptInfo | None:
            await self._raise_if_rejected(command_id)
            doc = await queries.script_version_by_sha(store, script_id, sha)
            return ScriptInfo(script_id, int(doc["version"]), sha) if doc else None

        return await _poll(outcome, timeout_s, f"script {script_id!r} to be registered")

    async def submit(
        self,
        task_id: str,
        script_id: str,
        devices: Sequence[str],
        *,
        script_version: int | None = None,
        execute_at: datetime | None = None,
        max_attempts: int | None = None,
        timeout_s: int | None = None,
        priority: int = 0,
        params: dict[str, Any] | None = None,
    ) -> Submission:
        """Publish a CreateTask; the task id is the idempotency key."""
        if execute_at is not None and execute_at.tzinfo is None:
            raise CommandRejected(
                str(Reason.INVALID_COMMAND), "execute_at needs a time zone offset, e.g. +00:00"
            )
        command = _validate(
            CreateTask,
            task_id=task_id,
            script_id=script_id,
            script_version=script_version,
            devices=list(devices),
            execute_at_ms=int(execute_at.timestamp() * 1000) if execute_at else None,
            max_attempts=self.settings.default_max_attempts
            if max_attempts is None
            else max_attempts,
            timeout_s=self.settings.default_timeout_s if timeout_s is None else timeout_s,
            priority=priority,
            params_json=json.dumps(params or {}, separators=(",", ":")),
        )
        assert isinstance(command, CreateTask)
        too_far = commands.check_schedule(command, int(time.time() * 1000))
        if too_far is not None:
            raise CommandRejected(str(too_far.code), too_far.reason)
        command_id = await self._send(command, task_id)
        return Submission(task_id, command_id, command.fingerprint())

    async def cancel(
        self, task_id: str, devices: Sequence[str] | None = None, reason: str = ""
    ) -> str:
        command = _validate(
            CancelTask, task_id=task_id, devices=list(devices) if devices else None, reason=reason
        )
        return await self._send(command, task_id)

    async def wait_cancel_accepted(
        self, task_id: str, command_id: str, timeout_s: float = 30
    ) -> None:
        """Wait for the planner's verdict on a cancel; raises CommandRejected if refused."""
        store = await self.store()

        async def outcome() -> bool | None:
            await self._raise_if_rejected(command_id)
            task = await store.collection("tasks").find_one({"_id": task_id})
            return True if task and command_id in task.get("cancel_requests", []) else None

        await _poll(outcome, timeout_s, f"the cancel of task {task_id!r} to be accepted")

    async def wait_accepted(self, sub: Submission, timeout_s: float = 30) -> TaskSummary:
        """Wait for the planner's verdict; raises CommandRejected with its reason code."""
        store = await self.store()

        async def outcome() -> TaskSummary | None:
            await self._raise_if_rejected(sub.command_id)
            summary = await queries.task_summary(store, sub.task_id)
            if summary is None:
                return None
            if summary.task["fingerprint"] != sub.fingerprint:
                raise CommandRejected(
                    str(Reason.TASK_ID_CONFLICT),
                    f"task {sub.task_id!r} exists with different content",
                )
            return summary

        return await _poll(
            outcome,
            timeout_s,
            f"task {sub.task_id!r} to be accepted",
            f"the command stays queued and is planned when the service runs; "
            f"`eventdispatch cancel {sub.task_id}` then ends whatever has not run by the time "
            "the cancel is planned",
        )

    async def status(self, task_id: str) -> TaskSummary | None:
        return await queries.task_summary(await self.store(), task_id)

    async def wait_done(
        self,
        task_id: str,
        timeout_s: float | None = None,
        on_progress: Callable[[TaskSummary], None] | None = None,
    ) -> TaskSummary:
        """Wait until every execution of the task has ended, reporting progress."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            summary = await self.status(task_id)
            if summary is not None:
                if on_progress:
                    on_progress(summary)
                if summary.done:
                    return summary
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"task {task_id!r} did not finish within {timeout_s}s")
            await asyncio.sleep(1.0)  # counting is a scan of the task's executions

    async def _raise_if_rejected(self, command_id: str) -> None:
        doc = await queries.rejection(await self.store(), command_id)
        if doc is not None:
            raise CommandRejected(doc["reason_code"], doc["reason"])


async def _poll(
    check: Callable[[], Awaitable[T | None]], timeout_s: float, what: str, meanwhile: str = ""
) -> T:
    deadline = time.monotonic() + timeout_s
    while True:
        found = await check()
        if found is not None:
            return found
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"timed out after {timeout_s}s waiting for {what}: is `eventdispatch run` "
                f"running?{' ' + meanwhile if meanwhile else ''}"
            )
        await asyncio.sleep(0.1)


class SyncEventDispatch:
    """The same client for synchronous code: each call runs on a private event loop."""

    def __init__(self, settings: Settings | None = None) -> None:
        self._loop = asyncio.new_event_loop()
        self._client = self._loop.run_until_complete(_make(settings))

    def _run(self, coro: Awaitable[T]) -> T:
        return self._loop.run_until_complete(coro)

    def register_script(self, script_id: str, content: str, language: str = "sh") -> ScriptInfo:
        return self._run(self._client.register_script(script_id, content, language))

    def submit(self, task_id: str, script_id: str, devices: Sequence[str], **kw: Any) -> Submission:
        return self._run(self._client.submit(task_id, script_id, devices, **kw))

    def wait_accepted(self, sub: Submission, timeout_s: float = 30) -> TaskSummary:
        return self._run(self._client.wait_accepted(sub, timeout_s))

    def cancel(self, task_id: str, devices: Sequence[str] | None = None, reason: str = "") -> str:
        return self._run(self._client.cancel(task_id, devices, reason))

    def status(self, task_id: str) -> TaskSummary | None:
        return self._run(self._client.status(task_id))

    def wait_done(self, task_id: str, timeout_s: float | None = None) -> TaskSummary:
        return self._run(self._client.wait_done(task_id, timeout_s))

    def close(self) -> None:
        self._run(self._client.close())
        self._loop.close()

    def __enter__(self) -> SyncEventDispatch:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


async def _make(settings: Settings | None) -> EventDispatch:
    return EventDispatch(settings)
