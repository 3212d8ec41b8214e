"""The planner: validates commands, records the outcome on `events`, fans tasks out to devices.

Every id it writes is derived from the command, so a redelivered command produces the same
messages and the consumers downstream recognise them (device processors ignore an Enqueue for
an execution they already have; projections apply an event once).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time

import pulsar
from pulsar import ConsumerType

from eventdispatch import commands, events, wire
from eventdispatch.bus import Bus, Outgoing, acknowledge, publish
from eventdispatch.commands import CancelTask, CreateTask, Refusal, RegisterScript
from eventdispatch.events import Event
from eventdispatch.generation import StateGuard
from eventdispatch.inputs import CancelRequested, Enqueue
from eventdispatch.reasons import Reason
from eventdispatch.registry import Registry
from eventdispatch.retry import retry_in_place

log = logging.getLogger("eventdispatch.planner")


def now_ms() -> int:
    return int(time.time() * 1000)


def _event(event_id: str, payload: events.Payload, task_id: str | None = None) -> Event:
    return Event(event_id, now_ms(), 0, None, task_id, None, payload)


class Planner:
    def __init__(self, bus: Bus, registry: Registry, guard: StateGuard) -> None:
        self.bus = bus
        self.registry = registry
        self.guard = guard

    async def run(self, stop: asyncio.Event) -> None:
        # Failover, not Shared: commands are planned in the order they were published (a
        # script is registered before the task that uses it), and chunked commands need it.
        receiver = await self.bus.receiver("commands", "planner", ConsumerType.Failover)
        self.events = await self.bus.producer("events", large=True)
        self.inbox = await self.bus.producer("device-inbox")
        try:
            while (batch := await receiver.next(stop)) is not None:
                for msg in batch:
                    await self.handle(msg)
                    await acknowledge(receiver.consumer, msg)
        finally:
            await receiver.close()
            await self.events.flush()
            await self.inbox.flush()

    async def handle(self, msg: pulsar.Message) -> None:
        # The registry must be the log's: a wiped one would number scripts again.
        await self.guard.valid()
        try:
            record = msg.value()
            command_id = str(record["command_id"])
            type_name = str(record["type"])
            body = dict(record["body"])
        except Exception as e:
            reason = f"the message could not be decoded as a command: {type(e).__name__}: {e}"
            await self.bus.dead_letter("commands", msg, reason)
            subject = msg.partition_key() or str(msg.message_id())
            await self._reject(
                f"msg:{msg.message_id()}", subject, Refusal(Reason.MALFORMED_COMMAND, reason)
            )
            return
        parsed = commands.parse(type_name, body)
        if isinstance(parsed, Refusal):
            await self._reject(command_id, commands.subject_of(type_name, body), parsed)
        elif isinstance(parsed, RegisterScript):
            await self._register(command_id, parsed)
        elif isinstance(parsed, CreateTask):
            await self._create(command_id, parsed)
        else:
            await self._cancel(command_id, parsed)

    async def _reject(self, command_id: str, subject: str, refusal: Refusal) -> None:
        log.info(
            "rejected command %s (%s): %s %s", command_id, subject, refusal.code, refusal.reason
        )
        payload = events.Rejected(command_id, subject, str(refusal.code), refusal.reason)
        await self._emit([_event(f"rejected:{command_id}", payload)])

    async def _register(self, command_id: str, cmd: RegisterScript) -> None:
        sha = hashlib.sha256(cmd.content.encode()).hexdigest()
        version, new = await retry_in_place(
            "register script",
            lambda: self.registry.register_script(cmd.script_id, cmd.language, cmd.content, sha),
        )
        log.info("script %s version %d (%s)", cmd.script_id, version, "new" if new else "known")
        payload = events.ScriptRegistered(
            command_id, cmd.script_id, version, cmd.language, cmd.content, sha
        )
        # Emitted again for known content too: the producer waits for it; the projection
        # applies one per (script, version).
        await self._emit([_event(f"script:{cmd.script_id}:{version}", payload)])

    async def _create(self, command_id: str, cmd: CreateTask) -> None:
        too_far = commands.check_schedule(cmd, now_ms())
        if too_far is not None:
            await self._reject(command_id, cmd.task_id, too_far)
            return
        script = await retry_in_place(
            "look up script", lambda: self.registry.script(cmd.script_id, cmd.script_version)
        )
        if script is None:
            if cmd.script_version is None or await self.registry.script(cmd.script_id) is None:
                refusal = Refusal(
                    Reason.UNKNOWN_SCRIPT, f"script {cmd.script_id!r} is not registered"
                )
            else:
                refusal = Refusal(
                    Reason.UNKNOWN_SCRIPT_VERSION,
                    f"script {cmd.script_id!r} has no version {cmd.script_version}",
                )
            await self._reject(command_id, cmd.task_id, refusal)
            return
        fingerprint = cmd.fingerprint()
        devices = tuple(cmd.devices)
        holder = await retry_in_place(
            "claim task",
            lambda: self.registry.claim_task(cmd.task_id, fingerprint, command_id, devices),
        )
        if holder is not None and holder.fingerprint != fingerprint:
            refusal = Refusal(
                Reason.TASK_ID_CONFLICT,
                f"task {cmd.task_id!r} was accepted before with different content; "
                "choose another task id",
            )
            await self._reject(command_id, cmd.task_id, refusal)
            return
        if holder is not None and holder.fanned_out:
            log.info("task %s: same content again, nothing to do", cmd.task_id)
            return
        if holder is not None:
            command_id = holder.command_id  # finish the first command's fan-out, ids unchanged
        accepted = events.TaskAccepted(
            command_id,
            cmd.script_id,
            script.version,
            devices,
            cmd.execute_at_ms,
            cmd.max_attempts,
            cmd.timeout_s,
            cmd.priority,
            cmd.params_json,
            fingerprint,
        )
        await self._emit([_event(f"task:{cmd.task_id}:accepted", accepted, cmd.task_id)])
        enqueue = Enqueue(
            cmd.task_id,
            cmd.script_id,
            script.version,
            cmd.execute_at_ms,
            cmd.max_attempts,
            cmd.timeout_s,
            cmd.priority,
            cmd.params_json,
        )
        at = now_ms()
        inputs = [
            Outgoing(wire.input_to_record(f"{cmd.task_id}:{d}:enqueue", d, at, enqueue), d)
            for d in devices
        ]
        await retry_in_place("fan out", lambda: publish(self.inbox, inputs))
        await retry_in_place("mark fanned out", lambda: self.registry.mark_fanned_out(cmd.task_id))
        log.info("task %s accepted: %d devices", cmd.task_id, len(devices))

    async def _cancel(self, command_id: str, cmd: CancelTask) -> None:
        task = await retry_in_place("look up task", lambda: self.registry.task(cmd.task_id))
        if task is None:
            refusal = Refusal(Reason.UNKNOWN_TASK, f"task {cmd.task_id!r} was never accepted")
            await self._reject(command_id, cmd.task_id, refusal)
            return
        devices = tuple(cmd.devices) if cmd.devices else task.devices
        if cmd.devices:
            strangers = sorted(set(cmd.devices) - set(task.devices))
            if strangers:
                shown = ", ".join(strangers[:5]) + (" ..." if len(strangers) > 5 else "")
                refusal = Refusal(
                    Reason.NOT_IN_TASK,
                    f"{len(strangers)} device(s) are not part of task {cmd.task_id!r}: {shown}",
                )
                await self._reject(command_id, cmd.task_id, refusal)
                return
        payload = events.CancelAccepted(command_id, devices, cmd.reason)
        await self._emit([_event(f"cancel:{command_id}", payload, cmd.task_id)])
        at = now_ms()
        body = CancelRequested(cmd.task_id, cmd.reason or "canceled by request")
        inputs = [
            Outgoing(wire.input_to_record(f"{command_id}:{d}:cancel", d, at, body), d)
            for d in devices
        ]
        await retry_in_place("fan out cancel", lambda: publish(self.inbox, inputs))

    async def _emit(self, items: list[Event]) -> None:
        out = [Outgoing(wire.event_to_record(e), e.task_id or e.event_id) for e in items]
        await retry_in_place("publish events", lambda: publish(self.events, out))
