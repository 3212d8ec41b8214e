"""The pure parts of the working state: the fold `state rebuild` writes, and the generation
check's verdicts."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from eventdispatch import events as ev
from eventdispatch.config import Settings
from eventdispatch.decider import DeviceState, decide
from eventdispatch.device_store import decode_state
from eventdispatch.events import Event
from eventdispatch.generation import StateGuard, StateLost
from eventdispatch.inputs import Delivery, DeliveryOutcome, Enqueue, Input, ResultReported
from eventdispatch.state import fold_state, writes


def _history(tasks: int, device: str = "dev-1") -> tuple[DeviceState, list[Event]]:
    """A device's real history: `tasks` tasks enqueued, each delivered and succeeded."""
    state = DeviceState(device)
    out: list[Event] = []
    now = 1_000
    inputs: list[Input] = [Enqueue(f"t{i}", "s", 1, None, 3, 60, 0, "{}") for i in range(tasks)]
    for i in range(tasks):
        inputs.append(DeliveryOutcome(f"t{i}", 1, Delivery.ACCEPTED, ""))
        inputs.append(ResultReported(f"t{i}:{device}:1", "SUCCESS", "ok"))
    for inp in inputs:
        now += 10
        d = decide(state, inp, now)
        state = d.state
        out.extend(d.events)
    return state, out


@given(st.integers(min_value=1, max_value=6), st.lists(st.integers(min_value=0), max_size=10))
def test_the_fold_of_a_devices_events_is_its_state_even_with_duplicates(
    tasks: int, dupes: list[int]
) -> None:
    state, events = _history(tasks)
    noisy = list(events)
    for i in dupes:  # a retried publish writes an event twice
        e = events[i % len(events)]
        noisy.insert(noisy.index(e) + 1, e)
    assert fold_state(noisy).devices["dev-1"] == state


def test_writes_use_the_layout_the_registry_and_device_store_read() -> None:
    state, events = _history(2)
    script = ev.ScriptRegistered("c1", "s", 1, "sh", "echo", "abc")
    accepted = ev.TaskAccepted("c2", "s", 1, ("dev-1",), None, 3, 60, 0, "{}", "fp")
    log = [
        Event("script:s:1", 1, 0, None, None, None, script),
        Event("task:t0:accepted", 2, 0, None, "t0", None, accepted),
        *events,
    ]
    out = {(kind, key): value for kind, key, value in writes(fold_state(log), "p")}
    assert decode_state(out[("set", "p:dev:dev-1")]) == (state, None)
    assert json.loads(out[("set", "p:script:s:v:1")])["content"] == "echo"
    assert out[("hset", "p:script:s:shas|abc")] == "1"
    assert out[("set", "p:script:s:latest")] == "1"
    task = json.loads(out[("hset", "p:task:t0|record")])
    assert task == {"fingerprint": "fp", "command_id": "c2", "devices": ["dev-1"]}


def test_the_guard_says_what_is_wrong_and_what_to_run() -> None:
    guard = StateGuard(Settings(), client=None)  # type: ignore[arg-type]
    guard.expected = "g1"
    guard.verify(b"g1")
    with pytest.raises(StateLost, match=r"no state generation.*state rebuild"):
        guard.verify(None)
    with pytest.raises(StateLost, match="another deployment"):
        guard.verify(b"g0")
    with pytest.raises(StateLost, match="is running"):
        guard.verify(b"rebuilding:g2")
