"""The device decider: what one device does with one input. Pure: no I/O, no clock.

`decide(state, input, now_ms)` returns the events to append to the log and the effects for the
shell to carry out; `evolve(state, event)` folds one event into the state. The shell persists
only what `evolve` produced, so replaying a device's events through `evolve` rebuilds its state.

One device runs one attempt at a time (I1): an execution is "active" from Locked until its
attempt ends, and `_start_next` locks the next waiting execution only when none is active,
choosing by priority and then by arrival order (I6).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Literal

from eventdispatch import events as ev
from eventdispatch.events import Event, Payload, parse_exec_id_for_device
from eventdispatch.inputs import (
    CancelRequested,
    Delivery,
    DeliveryOutcome,
    Enqueue,
    Input,
    ResultReported,
    TimerFired,
    TimerKind,
)
from eventdispatch.reasons import Reason

Status = Literal["scheduled", "waiting", "locked", "sent", "retrying"]
ACTIVE: frozenset[str] = frozenset({"locked", "sent"})
RESULT_LEVELS = {"SUCCESS", "ERROR", "SYSTEM_ERROR"}


@dataclass(frozen=True, slots=True)
class Execution:
    """One (task, device) pair that has not ended yet."""

    task_id: str
    script_id: str
    script_version: int
    max_attempts: int
    timeout_s: int
    priority: int
    order: int
    status: Status
    attempt: int = 0
    execute_at_ms: int | None = None
    deadline_ms: int | None = None
    params_json: str = "{}"


@dataclass(frozen=True, slots=True)
class DeviceState:
    """Everything a device processor knows about one device. Mappings are never mutated."""

    device_id: str
    seq: int = 0
    live: Mapping[str, Execution] = field(default_factory=dict)
    ended: Mapping[str, str] = field(default_factory=dict)
    next_order: int = 0

    @property
    def active(self) -> Execution | None:
        """The execution holding the device, if any (at most one: I1)."""
        return next((x for x in self.live.values() if x.status in ACTIVE), None)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    base_ms: int = 1_000
    cap_ms: int = 60_000

    def backoff_ms(self, exec_key: str, attempt: int) -> int:
        """Exponential backoff with jitter drawn from the exec_id, so a replay decides alike."""
        ceiling = min(self.cap_ms, self.base_ms * 2 ** max(attempt - 1, 0))
        digest = hashlib.sha256(exec_key.encode()).digest()
        fraction = int.from_bytes(digest[:4], "big") / 2**32
        return int(ceiling * (0.5 + fraction / 2))


# Effects: what the shell must do after the events are durable.
@dataclass(frozen=True, slots=True)
class Deliver:
    task_id: str
    attempt: int
    script_id: str
    script_version: int
    timeout_s: int
    params_json: str


@dataclass(frozen=True, slots=True)
class StopAttempt:
    task_id: str
    attempt: int


@dataclass(frozen=True, slots=True)
class StartTimer:
    kind: TimerKind
    task_id: str
    attempt: int
    due_at_ms: int


Effect = Deliver | StopAttempt | StartTimer


@dataclass(frozen=True, slots=True)
class Decision:
    state: DeviceState
    events: tuple[Event, ...] = ()
    effects: tuple[Effect, ...] = ()


def evolve(state: DeviceState, event: Event) -> DeviceState:
    """Fold one of this device's events into its state."""
    p = event.payload
    task = event.task_id or ""
    live = state.live
    ex = live.get(task)
    next_order = state.next_order
    ended = state.ended
    match p:
        case ev.Created():
            ex = Execution(
                task_id=task,
                script_id=p.script_id,
                script_version=p.script_version,
                max_attempts=p.max_attempts,
                timeout_s=p.timeout_s,
                priority=p.priority,
                order=next_order,
                status="waiting",
                execute_at_ms=p.execute_at_ms,
                params_json=p.params_json,
            )
            live = {**live, task: ex}
            next_order += 1
        case ev.Scheduled() if ex:
            live = {**live, task: replace(ex, status="scheduled")}
        case ev.Waiting() if ex:
            live = {**live, task: replace(ex, status="waiting")}
        case ev.Locked() if ex:
            attempt = event.attempt or ex.attempt + 1
            live = {**live, task: replace(ex, status="locked", attempt=attempt, deadline_ms=None)}
        case ev.Sent() if ex:
            live = {**live, task: replace(ex, status="sent", deadline_ms=p.deadline_ms)}
        case ev.Retrying() if ex:
            live = {**live, task: replace(ex, status="retrying", deadline_ms=None)}
        case ev.Succeeded() | ev.Failed() | ev.Canceled() if ex:
            live = {k: v for k, v in live.items() if k != task}
            ended = {**ended, task: event.type}
        case _:
            pass  # TimedOut, LateResult and stale events change nothing but seq
    return DeviceState(state.device_id, event.seq, live, ended, next_order)


class _Step:
    """Accumulates one decision, applying each event at once so later rules see it."""

    def __init__(self, state: DeviceState, now_ms: int) -> None:
        self.state = state
        self.now_ms = now_ms
        self.events: list[Event] = []
        self.effects: list[Effect] = []

    def emit(self, payload: Payload, task_id: str, attempt: int | None = None) -> None:
        seq = self.state.seq + 1
        device = self.state.device_id
        event = Event(f"{device}:{seq}", self.now_ms, seq, device, task_id, attempt, payload)
        self.events.append(event)
        self.state = evolve(self.state, event)

    def decision(self) -> Decision:
        return Decision(self.state, tuple(self.events), tuple(self.effects))


def decide(
    state: DeviceState, inp: Input, now_ms: int, policy: RetryPolicy | None = None
) -> Decision:
    """The events and effects one input causes on one device."""
    step = _Step(state, now_ms)
    policy = policy or RetryPolicy()
    match inp:
        case Enqueue():
            _enqueue(step, inp)
        case TimerFired():
            _timer(step, inp, policy)
        case ResultReported():
            _result(step, inp, policy)
        case CancelRequested():
            _cancel(step, inp)
        case DeliveryOutcome():
            _delivered(step, inp)
    _start_next(step)
    return step.decision()


def pending_effects(state: DeviceState) -> tuple[Effect, ...]:
    """Effects a crash may have cut off: a Locked attempt whose delivery was never confirmed.

    Redelivering it is safe: Central Control honours the Idempotency-Key (I3)."""
    active = state.active
    if active is None or active.status != "locked":
        return ()
    return (_deliver(active, active.attempt),)


def _deliver(ex: Execution, attempt: int) -> Deliver:
    return Deliver(
        ex.task_id, attempt, ex.script_id, ex.script_version, ex.timeout_s, ex.params_json
    )


def _enqueue(step: _Step, inp: Enqueue) -> None:
    if inp.task_id in step.state.live or inp.task_id in step.state.ended:
        return  # a redelivered Enqueue: the execution exists already
    created = ev.Created(
        inp.script_id,
        inp.script_version,
        inp.execute_at_ms,
        inp.max_attempts,
        inp.timeout_s,
        inp.priority,
        inp.params_json,
    )
    step.emit(created, inp.task_id)
    if inp.execute_at_ms is not None and inp.execute_at_ms > step.now_ms:
        step.emit(ev.Scheduled(inp.execute_at_ms), inp.task_id)
        step.effects.append(StartTimer(TimerKind.START_AT, inp.task_id, 0, inp.execute_at_ms))


def _timer(step: _Step, inp: TimerFired, policy: RetryPolicy) -> None:
    ex = step.state.live.get(inp.task_id)
    if ex is None:
        return
    if inp.kind == TimerKind.START_AT and ex.status == "scheduled":
        due = ex.execute_at_ms or 0
        if step.now_ms < due:  # never start early (I4), whatever the timer said
            step.effects.append(StartTimer(TimerKind.START_AT, ex.task_id, 0, due))
            return
        step.emit(ev.Waiting(), ex.task_id)
    elif inp.kind == TimerKind.RETRY_AT and ex.status == "retrying" and ex.attempt == inp.attempt:
        step.emit(ev.Waiting(), ex.task_id, ex.attempt)
    elif inp.kind == TimerKind.TIMEOUT_AT and ex.status == "sent" and ex.attempt == inp.attempt:
        step.emit(ev.TimedOut(), ex.task_id, ex.attempt)
        error = f"no result within {ex.timeout_s}s"
        _end_attempt(step, ex, Reason.TIMED_OUT, error, policy)


def _result(step: _Step, inp: ResultReported, policy: RetryPolicy) -> None:
    if inp.level not in RESULT_LEVELS:
        return
    parsed = parse_exec_id_for_device(inp.exec_id, step.state.device_id)
    if parsed is None:
        return
    task_id, attempt = parsed
    ex = step.state.live.get(task_id)
    if ex is None or ex.status not in ACTIVE or ex.attempt != attempt:
        if ex is not None or task_id in step.state.ended:
            step.emit(ev.LateResult(inp.exec_id, inp.level, inp.message), task_id, attempt)
        return
    if inp.level == "SUCCESS":
        step.emit(ev.Succeeded(inp.message), task_id, attempt)
    else:
        code = Reason.SYSTEM_ERROR if inp.level == "SYSTEM_ERROR" else Reason.SCRIPT_ERROR
        _end_attempt(step, ex, code, inp.message, policy)


def _cancel(step: _Step, inp: CancelRequested) -> None:
    ex = step.state.live.get(inp.task_id)
    if ex is None:
        return
    was_active = ex.status in ACTIVE
    step.emit(ev.Canceled(inp.reason), ex.task_id, ex.attempt if was_active else None)
    if was_active:
        step.effects.append(StopAttempt(ex.task_id, ex.attempt))


def _delivered(step: _Step, inp: DeliveryOutcome) -> None:
    ex = step.state.live.get(inp.task_id)
    if ex is None or ex.status != "locked" or ex.attempt != inp.attempt:
        return  # the attempt ended meanwhile (canceled): nothing to confirm
    if inp.outcome == Delivery.ACCEPTED:
        deadline = step.now_ms + ex.timeout_s * 1000
        step.emit(ev.Sent(deadline), ex.task_id, ex.attempt)
        step.effects.append(StartTimer(TimerKind.TIMEOUT_AT, ex.task_id, ex.attempt, deadline))
        return
    code = {
        Delivery.UNKNOWN_DEVICE: Reason.UNKNOWN_DEVICE,
        Delivery.SCRIPT_REFUSED: Reason.SCRIPT_REFUSED,
    }.get(inp.outcome, Reason.DELIVERY_REFUSED)
    step.emit(ev.Failed(code, inp.detail), ex.task_id, ex.attempt)


def _end_attempt(step: _Step, ex: Execution, code: Reason, error: str, policy: RetryPolicy) -> None:
    """An attempt failed: retry after a backoff while attempts are left, else fail for good."""
    if ex.attempt < ex.max_attempts:
        key = ev.exec_id(ex.task_id, step.state.device_id, ex.attempt)
        retry_at = step.now_ms + policy.backoff_ms(key, ex.attempt)
        step.emit(ev.Retrying(retry_at, error), ex.task_id, ex.attempt)
        step.effects.append(StartTimer(TimerKind.RETRY_AT, ex.task_id, ex.attempt, retry_at))
    else:
        step.emit(ev.Failed(code, error), ex.task_id, ex.attempt)


def _start_next(step: _Step) -> None:
    """Lock the next waiting execution when the device is free (I1, I6)."""
    if step.state.active is not None:
        return
    waiting = [x for x in step.state.live.values() if x.status == "waiting"]
    if not waiting:
        return
    ex = min(waiting, key=lambda x: (-x.priority, x.order))
    attempt = ex.attempt + 1
    step.emit(ev.Locked(), ex.task_id, attempt)
    step.effects.append(_deliver(ex, attempt))
