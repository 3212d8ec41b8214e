"""The device processor: the shell around the decider.

Devices run concurrently; one device's inputs run strictly one after another, in the order the
Key_Shared subscription hands them over. Per input:
    decide -> publish events (await) -> publish timers (await) -> save state with the input's
    position -> call Central Control (feeding the answer back into the decider) -> acknowledge.
Nothing on device-inbox is ever negatively acknowledged (redelivery would reorder the device):
failures are retried in place, and only an undecodable message goes to the dead-letter topic.
A redelivered input whose position the state has seen is skipped, after finishing whatever its
first processing may have left undone (`pending_effects`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from typing import TypeVar

import pulsar
import pulsar.asyncio
from pulsar import ConsumerType

from eventdispatch import wire
from eventdispatch.bus import Bus, MessageKey, Outgoing, acknowledge, position, publish
from eventdispatch.central import CentralControl
from eventdispatch.decider import (
    Decision,
    Deliver,
    DeviceState,
    Effect,
    RetryPolicy,
    StartTimer,
    StopAttempt,
    decide,
    pending_effects,
)
from eventdispatch.device_store import DeviceStore
from eventdispatch.events import Event, exec_id
from eventdispatch.inputs import CancelRequested, Delivery, DeliveryOutcome, Input
from eventdispatch.registry import Registry
from eventdispatch.retry import retry_in_place

log = logging.getLogger("eventdispatch.processor")
T = TypeVar("T")

# Devices with work in flight per processor. Past this, receiving pauses until some finish:
# every in-flight device holds a task, a queue and its messages, and a 100,000-device fan-out
# took a worker to 620 MB resident (docs/benchmarks.md). The broker keeps the rest; other
# consumers are not held up (their keys are theirs).
MAX_DEVICES_IN_FLIGHT = 5_000
RESUME_BELOW = MAX_DEVICES_IN_FLIGHT - 500
# A delivery marker outlives its attempt's deadline by a day, then expires.
MARKER_SLACK_S = 86_400


def now_ms() -> int:
    return int(time.time() * 1000)


class DeviceProcessor:
    def __init__(
        self,
        bus: Bus,
        store: DeviceStore,
        registry: Registry,
        central: CentralControl,
        policy: RetryPolicy,
        drain_grace_s: float = 20.0,
    ) -> None:
        self.drain_grace_s = drain_grace_s
        self.bus = bus
        self.store = store
        self.registry = registry
        self.central = central
        self.policy = policy
        self._queues: dict[str, deque[pulsar.Message]] = {}
        self._arrivals: dict[str, asyncio.Event] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._room = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        receiver = await self.bus.receiver(
            "device-inbox", "device-processor", ConsumerType.KeyShared
        )
        self.events = await self.bus.producer("events")
        self.timers = await self.bus.producer("timers")
        self.consumer = receiver.consumer
        try:
            while (batch := await receiver.next(stop)) is not None:
                for msg in batch:
                    self._route(msg)
                await self._wait_for_room(stop)
            await self._drain()
        finally:
            await receiver.close()
            await self.events.flush()
            await self.timers.flush()

    async def _drain(self) -> None:
        """Finish what each device has already received, within the grace period; what is
        left unacknowledged then is redelivered to the subscription's other consumers."""
        if not self._tasks:
            return
        log.info("draining %d devices (grace %.0fs)", len(self._tasks), self.drain_grace_s)
        _, late = await asyncio.wait(set(self._tasks), timeout=self.drain_grace_s)
        for task in late:
            task.cancel()
        if late:
            log.warning("%d devices did not finish within the grace period", len(late))
            await asyncio.wait(late)

    async def _wait_for_room(self, stop: asyncio.Event) -> None:
        """Pause receiving while MAX_DEVICES_IN_FLIGHT devices are busy (or until stop)."""
        while len(self._tasks) >= MAX_DEVICES_IN_FLIGHT and not stop.is_set():
            self._room.clear()
            room = asyncio.ensure_future(self._room.wait())
            stopped = asyncio.ensure_future(stop.wait())
            await asyncio.wait({room, stopped}, return_when=asyncio.FIRST_COMPLETED)
            room.cancel()
            stopped.cancel()

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if len(self._tasks) < RESUME_BELOW:
            self._room.set()

    def _route(self, msg: pulsar.Message) -> None:
        device = msg.partition_key()
        queue = self._queues.get(device)
        if queue is not None:
            queue.append(msg)
            self._arrivals[device].set()
            return
        self._queues[device] = deque([msg])
        self._arrivals[device] = asyncio.Event()
        task = asyncio.create_task(self._device_loop(device))
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    async def _device_loop(self, device: str) -> None:
        queue = self._queues[device]
        try:
            while queue:
                await self._handle(queue[0])
                queue.popleft()
        finally:
            del self._queues[device]
            del self._arrivals[device]

    async def _handle(self, msg: pulsar.Message) -> None:
        try:
            device_id, inp = wire.input_from_record(msg.value())
        except Exception as e:
            await self.bus.dead_letter("device-inbox", msg, f"undecodable: {e}")
            await acknowledge(self.consumer, msg)
            return
        where = position(msg)
        state, last = await retry_in_place("load state", lambda: self.store.load(device_id))
        if last is not None and where <= last:
            await self._run_effects(state, pending_effects(state), last)
        else:
            decision = decide(state, inp, now_ms(), self.policy)
            state = await self._commit(decision, where)
            await self._run_effects(state, decision.effects, where)
        await acknowledge(self.consumer, msg)

    async def _commit(self, decision: Decision, where: MessageKey) -> DeviceState:
        """Make a decision durable: its events, its timers, then the state that follows."""
        state = decision.state
        if decision.events:
            await retry_in_place(
                "publish events", lambda: publish(self.events, _outgoing(decision.events))
            )
        timers = [
            Outgoing(_timer_record(state.device_id, e), state.device_id, e.due_at_ms)
            for e in decision.effects
            if isinstance(e, StartTimer)
        ]
        if timers:
            await retry_in_place("publish timers", lambda: publish(self.timers, timers))
        if decision.events:
            await retry_in_place("save state", lambda: self.store.save(state, where))
        return state

    async def _run_effects(
        self, state: DeviceState, effects: tuple[Effect, ...], where: MessageKey
    ) -> DeviceState:
        """Carry out the HTTP effects; an answer is a new input, decided and committed at once."""
        work = list(effects)
        while work:
            effect = work.pop(0)
            outcome: Input
            if isinstance(effect, Deliver):
                answer = await self._deliver_unless_canceled(state.device_id, effect)
                if answer is None:
                    continue  # the queued cancel ends the attempt (and stops it) next
                outcome = answer
            elif isinstance(effect, StopAttempt):
                await self.central.stop(
                    state.device_id, exec_id(effect.task_id, state.device_id, effect.attempt)
                )
                continue
            else:
                continue  # timers were published in _commit
            decision = decide(state, outcome, now_ms(), self.policy)
            state = await self._commit(decision, where)
            work.extend(e for e in decision.effects if not isinstance(e, StartTimer))
        return state

    async def _deliver_unless_canceled(
        self, device_id: str, effect: Deliver
    ) -> DeliveryOutcome | None:
        """Deliver, unless a cancel of this task arrives for the device meanwhile: a delivery
        can take long (Central Control down, hanging), and a Locked attempt must stay
        cancelable."""
        call = asyncio.create_task(self._deliver(device_id, effect))
        arrivals = self._arrivals[device_id]
        while True:
            if self._cancel_queued(device_id, effect.task_id):
                call.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await call
                return None
            arrivals.clear()
            arrived = asyncio.create_task(arrivals.wait())
            done, _ = await asyncio.wait({call, arrived}, return_when=asyncio.FIRST_COMPLETED)
            arrived.cancel()
            if call in done:
                return call.result()

    def _cancel_queued(self, device_id: str, task_id: str) -> bool:
        for msg in list(self._queues[device_id])[1:]:
            try:
                _, inp = wire.input_from_record(msg.value())
            except Exception:
                continue  # undecodable: dead-lettered when its turn comes
            if isinstance(inp, CancelRequested) and inp.task_id == task_id:
                return True
        return False

    async def _deliver(self, device_id: str, effect: Deliver) -> DeliveryOutcome:
        key = exec_id(effect.task_id, device_id, effect.attempt)
        script = await retry_in_place(
            "load script", lambda: self.registry.script(effect.script_id, effect.script_version)
        )
        if script is None:
            return DeliveryOutcome(
                effect.task_id,
                effect.attempt,
                Delivery.REFUSED,
                "script version not in the registry",
            )
        ttl_s = effect.timeout_s + MARKER_SLACK_S
        await retry_in_place("mark delivery", lambda: self.store.mark_delivery(key, ttl_s))
        result, detail = await self.central.deliver(
            device_id, key, script, effect.params_json, effect.timeout_s
        )
        return DeliveryOutcome(effect.task_id, effect.attempt, result, detail)


def _outgoing(events: tuple[Event, ...]) -> list[Outgoing]:
    return [Outgoing(wire.event_to_record(e), e.device_id or "") for e in events]


def _timer_record(device_id: str, timer: StartTimer) -> wire.Record:
    return {
        "timer_id": f"{device_id}:{timer.task_id}:{timer.kind}:{timer.attempt}:{timer.due_at_ms}",
        "device_id": device_id,
        "kind": str(timer.kind),
        "task_id": timer.task_id,
        "attempt": timer.attempt,
        "due_at_ms": timer.due_at_ms,
    }
