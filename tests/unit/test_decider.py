"""The device decider, without any service: examples, then properties over random histories."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eventdispatch import events as ev
from eventdispatch.decider import (
    Decision,
    Deliver,
    DeviceState,
    RetryPolicy,
    StartTimer,
    StopAttempt,
    decide,
    evolve,
    pending_effects,
)
from eventdispatch.events import Event, exec_id
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

DEV = "dev-1"
POLICY = RetryPolicy(base_ms=1_000, cap_ms=8_000)


def enqueue(task: str, *, at: int | None = None, attempts: int = 3, priority: int = 0) -> Enqueue:
    return Enqueue(task, "s", 1, at, attempts, 60, priority)


def types(d: Decision) -> list[str]:
    return [e.type for e in d.events]


def run(state: DeviceState, *inputs: tuple[Input, int]) -> tuple[DeviceState, list[Event]]:
    out: list[Event] = []
    for inp, now in inputs:
        d = decide(state, inp, now, POLICY)
        state = d.state
        out.extend(d.events)
    return state, out


def test_enqueue_on_a_free_device_locks_and_delivers() -> None:
    d = decide(DeviceState(DEV), enqueue("t1"), 1_000, POLICY)
    assert types(d) == ["Created", "Locked"]
    assert [e.seq for e in d.events] == [1, 2]
    assert d.events[1].attempt == 1
    assert d.effects == (Deliver("t1", 1, "s", 1, 60, "{}"),)


def test_accepted_then_success_ends_the_execution() -> None:
    s = decide(DeviceState(DEV), enqueue("t1"), 1_000, POLICY).state
    d = decide(s, DeliveryOutcome("t1", 1, Delivery.ACCEPTED), 1_010, POLICY)
    assert types(d) == ["Sent"]
    assert d.effects == (StartTimer(TimerKind.TIMEOUT_AT, "t1", 1, 61_010),)
    d = decide(d.state, ResultReported(exec_id("t1", DEV, 1), "SUCCESS", "ok"), 1_020, POLICY)
    assert types(d) == ["Succeeded"]
    assert d.state.live == {} and d.state.ended == {"t1": "Succeeded"}


def test_second_task_waits_for_the_first() -> None:
    s, _ = run(
        DeviceState(DEV), (enqueue("t1"), 1), (DeliveryOutcome("t1", 1, Delivery.ACCEPTED), 2)
    )
    d = decide(s, enqueue("t2"), 3, POLICY)
    assert types(d) == ["Created"]
    d = decide(d.state, ResultReported(exec_id("t1", DEV, 1), "SUCCESS", ""), 4, POLICY)
    assert types(d) == ["Succeeded", "Locked"]
    assert d.events[1].task_id == "t2"


def test_error_retries_after_backoff_then_fails_with_last_error() -> None:
    s, _ = run(
        DeviceState(DEV),
        (enqueue("t1", attempts=2), 0),
        (DeliveryOutcome("t1", 1, Delivery.ACCEPTED), 0),
    )
    d = decide(s, ResultReported(exec_id("t1", DEV, 1), "ERROR", "boom"), 10, POLICY)
    assert types(d) == ["Retrying"]
    (timer,) = d.effects
    assert isinstance(timer, StartTimer) and timer.kind == TimerKind.RETRY_AT
    assert 10 + 500 <= timer.due_at_ms <= 10 + 1_000
    d = decide(d.state, TimerFired("RetryAt", "t1", 1, timer.due_at_ms), timer.due_at_ms, POLICY)
    assert types(d) == ["Waiting", "Locked"] and d.events[1].attempt == 2
    s, _ = run(d.state, (DeliveryOutcome("t1", 2, Delivery.ACCEPTED), 2_000))
    d = decide(s, ResultReported(exec_id("t1", DEV, 2), "SYSTEM_ERROR", "disk"), 2_001, POLICY)
    assert types(d) == ["Failed"]
    assert d.events[0].payload == ev.Failed("SYSTEM_ERROR", "disk")


def test_timeout_then_retry() -> None:
    s, _ = run(
        DeviceState(DEV), (enqueue("t1"), 0), (DeliveryOutcome("t1", 1, Delivery.ACCEPTED), 0)
    )
    d = decide(s, TimerFired("TimeoutAt", "t1", 1, 60_000), 60_000, POLICY)
    assert types(d) == ["TimedOut", "Retrying"]


def test_unknown_device_and_refused_script_fail_at_once() -> None:
    for outcome, code in [
        (Delivery.UNKNOWN_DEVICE, "UNKNOWN_DEVICE"),
        (Delivery.SCRIPT_REFUSED, "SCRIPT_REFUSED"),
    ]:
        s = decide(DeviceState(DEV), enqueue("t1"), 0, POLICY).state
        d = decide(s, DeliveryOutcome("t1", 1, outcome, "nope"), 1, POLICY)
        assert types(d) == ["Failed"]
        assert d.events[0].payload == ev.Failed(code, "nope")


def test_scheduled_execution_waits_for_its_timer_and_never_starts_early() -> None:
    d = decide(DeviceState(DEV), enqueue("t1", at=5_000), 1_000, POLICY)
    assert types(d) == ["Created", "Scheduled"]
    assert d.effects == (StartTimer(TimerKind.START_AT, "t1", 0, 5_000),)
    early = decide(d.state, TimerFired("StartAt", "t1", 0, 5_000), 4_999, POLICY)
    assert types(early) == [] and early.effects == (StartTimer(TimerKind.START_AT, "t1", 0, 5_000),)
    d = decide(d.state, TimerFired("StartAt", "t1", 0, 5_000), 5_000, POLICY)
    assert types(d) == ["Waiting", "Locked"]


def test_a_time_in_the_past_starts_now() -> None:
    d = decide(DeviceState(DEV), enqueue("t1", at=500), 1_000, POLICY)
    assert types(d) == ["Created", "Locked"]


def test_cancel_a_sent_attempt_stops_it_and_a_late_result_changes_nothing() -> None:
    s, _ = run(
        DeviceState(DEV), (enqueue("t1"), 0), (DeliveryOutcome("t1", 1, Delivery.ACCEPTED), 0)
    )
    d = decide(s, CancelRequested("t1", "operator"), 5, POLICY)
    assert types(d) == ["Canceled"]
    assert d.effects == (StopAttempt("t1", 1),)
    late = decide(d.state, ResultReported(exec_id("t1", DEV, 1), "SUCCESS", ""), 6, POLICY)
    assert types(late) == ["LateResult"] and late.effects == ()
    assert replace(late.state, seq=d.state.seq) == d.state


def test_redelivered_enqueue_is_ignored() -> None:
    s = decide(DeviceState(DEV), enqueue("t1"), 0, POLICY).state
    d = decide(s, enqueue("t1"), 1, POLICY)
    assert d.events == () and d.effects == () and d.state == s


def test_priority_then_fifo() -> None:
    s, _ = run(
        DeviceState(DEV),
        (enqueue("busy"), 0),
        (enqueue("low-1"), 1),
        (enqueue("high", priority=5), 2),
        (enqueue("low-2"), 3),
    )
    order = []
    for _ in range(3):
        active = s.active
        assert active is not None
        s, evs = run(s, (DeliveryOutcome(active.task_id, 1, Delivery.ACCEPTED), 10))
        s, evs = run(s, (ResultReported(exec_id(active.task_id, DEV, 1), "SUCCESS", ""), 11))
        order += [e.task_id for e in evs if e.type == "Locked"]
    assert order == ["high", "low-1", "low-2"]


def test_pending_effects_redo_an_unconfirmed_delivery_only() -> None:
    s = decide(DeviceState(DEV), enqueue("t1"), 0, POLICY).state
    assert pending_effects(s) == (Deliver("t1", 1, "s", 1, 60, "{}"),)
    s = decide(s, DeliveryOutcome("t1", 1, Delivery.ACCEPTED), 1, POLICY).state
    assert pending_effects(s) == ()


# --- properties over random histories ----------------------------------------------------


@dataclass
class World:
    """Drives one device like the real shell: delivers timers when due, answers deliveries."""

    state: DeviceState = field(default_factory=lambda: DeviceState(DEV))
    now: int = 0
    timers: list[StartTimer] = field(default_factory=list)
    log: list[Event] = field(default_factory=list)
    pending_delivery: list[Deliver] = field(default_factory=list)
    enqueued: dict[str, Enqueue] = field(default_factory=dict)

    def feed(self, inp: Input) -> Decision:
        before = self.state
        d = decide(self.state, inp, self.now, POLICY)
        # state is a fold of the events (what `state rebuild` relies on)
        folded = before
        for e in d.events:
            folded = evolve(folded, e)
        assert folded == d.state
        self.state = d.state
        self.log.extend(d.events)
        for effect in d.effects:
            if isinstance(effect, StartTimer):
                self.timers.append(effect)
            elif isinstance(effect, Deliver):
                self.pending_delivery.append(effect)
        return d

    def advance(self, ms: int) -> None:
        self.now += ms
        due = sorted((t for t in self.timers if t.due_at_ms <= self.now), key=lambda t: t.due_at_ms)
        self.timers = [t for t in self.timers if t.due_at_ms > self.now]
        for t in due:
            self.feed(TimerFired(str(t.kind), t.task_id, t.attempt, t.due_at_ms))


ops = st.one_of(
    st.tuples(
        st.just("enqueue"),
        st.integers(0, 5),
        st.sampled_from([None, 0, 3_000, 20_000]),
        st.integers(1, 3),
        st.integers(0, 1),
    ),
    st.tuples(st.just("deliver"), st.sampled_from(list(Delivery))),
    st.tuples(
        st.just("result"),
        st.sampled_from(["SUCCESS", "ERROR", "SYSTEM_ERROR", "INFO"]),
        st.integers(-1, 1),
    ),
    st.tuples(st.just("cancel"), st.integers(0, 5)),
    st.tuples(st.just("advance"), st.integers(1, 30_000)),
    st.tuples(st.just("early"), st.integers(0, 5)),
)


def apply(world: World, op: tuple) -> None:  # type: ignore[type-arg]
    kind = op[0]
    if kind == "enqueue":
        _, n, at, attempts, prio = op
        task = f"t{n}"
        inp = Enqueue(task, "s", 1, None if at is None else world.now + at, attempts, 10, prio)
        world.enqueued.setdefault(task, inp)
        world.feed(inp)
    elif kind == "deliver" and world.pending_delivery:
        effect = world.pending_delivery.pop(0)
        world.feed(DeliveryOutcome(effect.task_id, effect.attempt, op[1], "x"))
    elif kind == "result":
        active = world.state.active
        ended = list(world.state.ended)
        if active is not None:
            attempt = max(active.attempt + op[2], 1)
            target = exec_id(active.task_id, DEV, attempt)
        elif ended:
            target = exec_id(ended[0], DEV, 1)
        else:
            return
        before = world.state
        matches = active is not None and target == exec_id(active.task_id, DEV, active.attempt)
        d = world.feed(ResultReported(target, op[1], "m"))
        if not matches or op[1] == "INFO":  # a late or stray result changes nothing
            assert d.effects == ()
            assert all(e.type == "LateResult" for e in d.events)
            assert replace(d.state, seq=before.seq) == before
    elif kind == "cancel":
        world.feed(CancelRequested(f"t{op[1]}"))
    elif kind == "advance":
        world.advance(op[1])
    elif kind == "early":  # a timer delivered before its time must not start anything
        ex = world.state.live.get(f"t{op[1]}")
        if ex is not None and ex.status == "scheduled":
            world.feed(TimerFired("StartAt", ex.task_id, 0, ex.execute_at_ms or 0))


def drain(world: World) -> None:
    """Let every execution finish: confirm deliveries, report success, run out the clock."""
    for _ in range(200):
        if world.pending_delivery:
            e = world.pending_delivery.pop(0)
            world.feed(DeliveryOutcome(e.task_id, e.attempt, Delivery.ACCEPTED))
            continue
        active = world.state.active
        if active is not None and active.status == "sent":
            world.feed(ResultReported(exec_id(active.task_id, DEV, active.attempt), "SUCCESS", ""))
            continue
        if not world.state.live:
            return
        world.advance(10_000)
    raise AssertionError(f"device never drained: {world.state}")


def check_invariants(world: World) -> None:
    open_attempt: tuple[str, int] | None = None
    terminal: dict[str, list[str]] = {}
    created: list[str] = []
    first_lock: list[str] = []
    seqs = [e.seq for e in world.log]
    assert seqs == list(range(1, len(seqs) + 1))
    for e in world.log:
        task = e.task_id or ""
        if e.type == "Created":
            created.append(task)
        if e.type == "Locked":
            # I1: a device never has two attempts between Locked and their end
            assert open_attempt is None, f"{task} locked while {open_attempt} holds the device"
            open_attempt = (task, e.attempt or 0)
            if task not in first_lock:
                first_lock.append(task)
            # I4: a scheduled execution never starts before execute_at
            at = world.enqueued[task].execute_at_ms
            assert at is None or e.occurred_at_ms >= at
        if e.type in ev.ATTEMPT_END_TYPES and open_attempt == (task, e.attempt):
            open_attempt = None
        if e.type in ev.TERMINAL_TYPES:
            terminal.setdefault(task, []).append(e.type)
    # I2: every execution ends in exactly one terminal state
    assert set(terminal) == set(created)
    assert all(len(v) == 1 for v in terminal.values()), terminal
    # I6: immediate executions of one priority start in the order they were accepted
    for prio in (0, 1):
        immediate = [
            t
            for t in created
            if world.enqueued[t].execute_at_ms is None and world.enqueued[t].priority == prio
        ]
        started = [t for t in first_lock if t in immediate]
        assert started == [t for t in immediate if t in started]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(ops, max_size=60))
def test_invariants_hold_over_random_histories(history: list[tuple]) -> None:  # type: ignore[type-arg]
    world = World()
    for op in history:
        apply(world, op)
    drain(world)
    check_invariants(world)
