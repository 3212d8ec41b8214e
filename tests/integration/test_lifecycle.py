"""The whole task lifecycle on the real stack: scheduling, retries, timeouts, cancellation and
per-device order, each checked from the simulator's record and from the projections."""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from eventdispatch.client import EventDispatch
from eventdispatch.config import Settings
from projections.reducers import Doc
from projections.store import ProjectionStore, connect
from tests.integration.conftest import Service, read_log, read_record

pytestmark = pytest.mark.integration


@pytest.fixture
async def ed(settings: Settings, service: Service) -> AsyncIterator[EventDispatch]:
    async with EventDispatch(settings) as client:
        await client.register_script("lifecycle", "echo lifecycle\n")
        yield client


@pytest.fixture
async def store(settings: Settings) -> AsyncIterator[ProjectionStore]:
    mongo = connect(settings.mongo_url)
    yield await ProjectionStore.open(mongo[settings.mongo_db])
    await mongo.close()


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


async def submit(ed: EventDispatch, devices: list[str], **kw: Any) -> str:
    task_id = uid("task")
    await ed.wait_accepted(await ed.submit(task_id, "lifecycle", devices, **kw))
    return task_id


async def execution(store: ProjectionStore, task_id: str, device: str) -> Doc:
    doc = await store.collection("executions").find_one({"_id": f"{task_id}:{device}"})
    assert doc is not None
    return doc


async def wait_state(
    store: ProjectionStore, task_id: str, device: str, state: str, timeout: float = 30
) -> Doc:
    deadline = time.monotonic() + timeout
    doc: Doc | None = None
    while time.monotonic() < deadline:
        doc = await store.collection("executions").find_one({"_id": f"{task_id}:{device}"})
        if doc is not None and doc["state"] == state:
            return doc
        await asyncio.sleep(0.1)
    raise AssertionError(f"{task_id}:{device} never reached {state}; last: {doc}")


async def attempts(store: ProjectionStore, task_id: str, device: str) -> list[Doc]:
    cursor = store.collection("attempts").find({"task_id": task_id, "device_id": device})
    return sorted([d async for d in cursor], key=lambda d: d["attempt"])


def seen(record: Path, task_id: str, event: str = "accepted") -> list[dict[str, Any]]:
    return [
        r
        for r in read_record(record)
        if r["event"] == event and r["exec_id"].startswith(f"{task_id}:")
    ]


async def test_a_scheduled_start_is_never_early_and_at_most_a_second_late(
    settings: Settings, ed: EventDispatch, store: ProjectionStore, sim_record: Path
) -> None:
    devices = [uid("sched") for _ in range(5)]
    since_ms = int(time.time() * 1000)
    # A lead long enough that planning on a loaded machine ends before the start is due.
    at = datetime.now(UTC) + timedelta(seconds=6)
    at_ms = int(at.timestamp() * 1000)
    task_id = await submit(ed, devices, execute_at=at)
    summary = await ed.wait_done(task_id, timeout_s=60)
    assert summary.counts == {"succeeded": 5}
    steps: dict[str, list[str]] = {d: [] for d in devices}
    for e in await read_log(settings, "events", since_ms=since_ms - 1000):
        if e["task_id"] == task_id and e["device_id"] in steps:
            steps[e["device_id"]].append(e["type"])
    for d in devices:  # the log: scheduled first, started only when due
        assert steps[d][:4] == ["Created", "Scheduled", "Waiting", "Locked"], steps[d]
    calls = seen(sim_record, task_id)
    assert len(calls) == 5
    for call in calls:  # the devices' view
        assert at_ms <= call["at_ms"] <= at_ms + 1000, call["at_ms"] - at_ms
    for d in devices:  # the projections' view
        (attempt,) = await attempts(store, task_id, d)
        assert at_ms <= attempt["locked_at_ms"] <= at_ms + 1000


async def test_a_start_in_the_past_starts_now(ed: EventDispatch) -> None:
    task_id = await submit(ed, [uid("past")], execute_at=datetime.now(UTC) - timedelta(hours=1))
    assert (await ed.wait_done(task_id, timeout_s=30)).counts == {"succeeded": 1}


async def test_failure_then_success_on_retry(
    ed: EventDispatch, store: ProjectionStore, sim_record: Path
) -> None:
    device = uid("fail-then-ok")
    task_id = await submit(ed, [device], max_attempts=3)
    assert (await ed.wait_done(task_id, timeout_s=30)).counts == {"succeeded": 1}
    assert [c["exec_id"] for c in seen(sim_record, task_id)] == [
        f"{task_id}:{device}:1",
        f"{task_id}:{device}:2",
    ]
    tries = await attempts(store, task_id, device)
    assert [a["outcome"] for a in tries] == ["failed", "succeeded"]
    assert (await execution(store, task_id, device))["attempt"] == 2


async def test_attempts_exhausted_fail_with_the_last_error(
    ed: EventDispatch, store: ProjectionStore, sim_record: Path
) -> None:
    device = uid("always-fail")
    task_id = await submit(ed, [device], max_attempts=2)
    assert (await ed.wait_done(task_id, timeout_s=30)).counts == {"failed": 1}
    assert len(seen(sim_record, task_id)) == 2
    doc = await execution(store, task_id, device)
    assert doc["reason_code"] == "SCRIPT_ERROR"
    assert doc["error"] == "exit 1: simulated failure"


async def test_timeout_then_retry_then_success(
    ed: EventDispatch, store: ProjectionStore, sim_record: Path
) -> None:
    device = uid("silent-then-ok")
    task_id = await submit(ed, [device], max_attempts=2, timeout_s=1)
    assert (await ed.wait_done(task_id, timeout_s=30)).counts == {"succeeded": 1}
    tries = await attempts(store, task_id, device)
    assert [(a["timed_out"], a["outcome"]) for a in tries] == [
        (True, "failed"),
        (False, "succeeded"),
    ]
    assert tries[0]["ended_at_ms"] - tries[0]["sent_at_ms"] >= 1000  # not before the deadline
    assert len(seen(sim_record, task_id)) == 2


async def test_a_timeout_on_the_last_attempt_fails(
    ed: EventDispatch, store: ProjectionStore
) -> None:
    device = uid("silent")
    task_id = await submit(ed, [device], max_attempts=1, timeout_s=1)
    assert (await ed.wait_done(task_id, timeout_s=30)).counts == {"failed": 1}
    assert (await execution(store, task_id, device))["reason_code"] == "TIMED_OUT"


async def test_cancel_a_scheduled_execution(
    ed: EventDispatch, store: ProjectionStore, sim_record: Path
) -> None:
    device = uid("cancel-sched")
    task_id = await submit(ed, [device], execute_at=datetime.now(UTC) + timedelta(minutes=5))
    await wait_state(store, task_id, device, "scheduled")
    await ed.cancel(task_id, reason="not today")
    doc = await wait_state(store, task_id, device, "canceled")
    assert doc["error"] == "not today"
    assert seen(sim_record, task_id) == []


async def test_cancel_waiting_and_sent_executions(
    ed: EventDispatch, store: ProjectionStore, sim_record: Path
) -> None:
    device = uid("silent")  # never answers: its first task holds the device
    holder = await submit(ed, [device], timeout_s=600)
    waiter = await submit(ed, [device])
    await wait_state(store, holder, device, "sent")
    await wait_state(store, waiter, device, "waiting")

    await ed.cancel(waiter)
    await wait_state(store, waiter, device, "canceled")
    assert (await execution(store, holder, device))["state"] == "sent"  # undisturbed

    await ed.cancel(holder)
    await wait_state(store, holder, device, "canceled")
    stopped = seen(sim_record, holder, "stopped")
    assert [s["exec_id"] for s in stopped] == [f"{holder}:{device}:1"]
    assert seen(sim_record, waiter) == []


async def test_cancel_a_locked_execution_whose_delivery_hangs(
    ed: EventDispatch, store: ProjectionStore, sim_record: Path
) -> None:
    device = uid("hang")
    task_id = await submit(ed, [device])
    await wait_state(store, task_id, device, "locked")
    started = time.monotonic()
    await ed.cancel(task_id)
    await wait_state(store, task_id, device, "canceled", timeout=10)
    assert time.monotonic() - started < 10
    assert seen(sim_record, task_id) == []


async def test_a_late_result_after_cancel_changes_nothing(
    ed: EventDispatch, store: ProjectionStore
) -> None:
    # answers 2.5 s after the POST: the cancel, sent once Sent is projected (the projector
    # lingers up to 250 ms), comes first even on a loaded machine; with 300-400 ms it did not
    device = uid("late")
    task_id = await submit(ed, [device])
    await wait_state(store, task_id, device, "sent")
    await ed.cancel(task_id)
    await wait_state(store, task_id, device, "canceled")
    await asyncio.sleep(3)  # past the answer (the simulator was stopped, usually)
    assert (await execution(store, task_id, device))["state"] == "canceled"


async def test_fifo_on_a_busy_device_across_three_tasks(
    ed: EventDispatch, store: ProjectionStore, sim_record: Path
) -> None:
    device = uid("slow")
    tasks = [await submit(ed, [device]) for _ in range(3)]
    for t in tasks:
        assert (await ed.wait_done(t, timeout_s=30)).counts == {"succeeded": 1}
    calls = [c for t in tasks for c in seen(sim_record, t)]
    order = [c["exec_id"].split(":")[0] for c in sorted(calls, key=lambda c: c["at_ms"])]
    assert order == tasks
    finished = {r["exec_id"]: r for r in read_record(sim_record) if r["event"] == "finished"}
    spans = sorted(
        (finished[c["exec_id"]]["received_at_ms"], finished[c["exec_id"]]["at_ms"]) for c in calls
    )
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert end <= start, "two attempts overlapped on one device (I1)"


async def test_a_5xx_burst_uses_no_attempts(
    ed: EventDispatch, store: ProjectionStore, sim_record: Path
) -> None:
    devices = [uid("flaky") for _ in range(10)]  # half of all POSTs answered 503
    task_id = await submit(ed, devices, max_attempts=1)
    assert (await ed.wait_done(task_id, timeout_s=60)).counts == {"succeeded": 10}
    assert sorted(c["exec_id"] for c in seen(sim_record, task_id)) == sorted(
        f"{task_id}:{d}:1" for d in devices
    )


async def test_unknown_device_and_refused_script_fail_with_their_reason(
    ed: EventDispatch, store: ProjectionStore
) -> None:
    unknown, refused = uid("unknown"), uid("refuse")
    task_id = await submit(ed, [unknown, refused], max_attempts=3)
    assert (await ed.wait_done(task_id, timeout_s=30)).counts == {"failed": 2}
    assert (await execution(store, task_id, unknown))["reason_code"] == "UNKNOWN_DEVICE"
    assert (await execution(store, task_id, refused))["reason_code"] == "SCRIPT_REFUSED"
    assert len(await attempts(store, task_id, unknown)) == 1  # no retry


async def test_every_log_line_is_attached_to_its_attempt(
    ed: EventDispatch, store: ProjectionStore
) -> None:
    device = uid("fail-then-ok")
    task_id = await submit(ed, [device])
    await ed.wait_done(task_id, timeout_s=30)
    await asyncio.sleep(0.5)  # logs are projected from their own subscription
    lines = [d async for d in store.collection("logs").find({"task_id": task_id})]
    by_attempt = sorted((d["attempt"], d["level"]) for d in lines)
    assert by_attempt == [(1, "ERROR"), (1, "INFO"), (2, "INFO"), (2, "SUCCESS")]
    assert {d["exec_id"] for d in lines} == {f"{task_id}:{device}:1", f"{task_id}:{device}:2"}


async def test_the_same_task_again_is_a_no_op(ed: EventDispatch, sim_record: Path) -> None:
    task_id, device = uid("again"), uid("again-dev")
    first = await ed.submit(task_id, "lifecycle", [device])
    await ed.wait_accepted(first)
    await ed.wait_done(task_id, timeout_s=30)
    await ed.wait_accepted(await ed.submit(task_id, "lifecycle", [device]))
    await asyncio.sleep(1)
    assert len(seen(sim_record, task_id)) == 1
