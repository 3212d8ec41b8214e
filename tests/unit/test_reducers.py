"""Projection reducers: the same events, duplicated or replayed, give the same documents."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eventdispatch.events import Event
from projections.reducers import Doc, fold
from tests.unit.test_decider import World, apply, drain, ops


def project(events: list[Event]) -> dict[str, dict[str, Doc]]:
    return fold(events)


def history_events(history: list[Any]) -> list[Event]:
    world = World()
    for op in history:
        apply(world, op)
    drain(world)
    return world.log


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(ops, max_size=40), st.data())
def test_duplicates_and_replays_change_nothing(history: list[Any], data: st.DataObject) -> None:
    events = history_events(history)
    clean = project(events)
    noisy = list(events)
    for _ in range(data.draw(st.integers(0, 10))):
        if not events:
            break
        i = data.draw(st.integers(0, len(events) - 1))
        j = data.draw(st.integers(noisy.index(events[i]) + 1, len(noisy)))
        noisy.insert(j, events[i])  # a redelivery: never before the event's first delivery
    assert project(noisy) == clean
    assert project(events + events) == clean  # a whole replay on top


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(ops, max_size=40))
def test_executions_end_in_exactly_their_terminal_state(history: list[Any]) -> None:
    events = history_events(history)
    docs = project(events)["executions"]
    terminal = {
        e.task_id: e.type.lower() for e in events if e.type in ("Succeeded", "Failed", "Canceled")
    }
    assert {d["task_id"]: d["state"] for d in docs.values()} == terminal
    attempts = project(events)["attempts"]
    locked = {e.exec_id for e in events if e.type == "Locked"}
    assert set(attempts) == locked
    assert all(a["outcome"] is not None for a in attempts.values())
    for device in project(events)["devices"].values():  # drained: nothing left on the device
        assert device["live"] == [] and not device["busy"] and device["queued"] == 0


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(ops, max_size=40))
def test_the_device_view_matches_the_deciders_state(history: list[Any]) -> None:
    world = World()
    for op in history:
        apply(world, op)
    docs = project(world.log)["devices"]
    if not world.log:
        return
    doc = docs[world.state.device_id]
    live = world.state.live
    assert {p["task_id"]: p["state"] for p in doc["live"]} == {t: x.status for t, x in live.items()}
    active = world.state.active
    assert doc["current_task"] == (active.task_id if active else None)
    assert doc["queued"] == len(live) - (1 if active else 0)
