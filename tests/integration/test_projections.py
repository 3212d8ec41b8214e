"""Read models rebuilt from the log equal the live ones (I5), through crashes, traffic and
schema changes."""

from __future__ import annotations

import asyncio
import copy
import os
import signal
import time
import uuid

import pulsar
import pulsar.asyncio
import pytest

from eventdispatch import admin, wire
from eventdispatch.client import EventDispatch
from eventdispatch.config import Settings
from eventdispatch.events import Created, Event
from projections import rebuild as rb
from projections.store import ProjectionStore, connect, current_generations
from tests.integration.conftest import Service, supervised, wait_until

pytestmark = pytest.mark.integration


async def caught_up(settings: Settings, timeout: float = 120) -> None:
    """Wait until the live projector has applied everything on both of its topics."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        backlogs = [
            admin.backlog(settings, "events", "projector"),
            admin.backlog(settings, "device-logs", "projector-logs"),
        ]
        if backlogs == [0, 0]:
            await asyncio.sleep(0.5)  # the last batch is acknowledged after its write
            return
        await asyncio.sleep(0.3)
    raise AssertionError(f"the projector did not catch up within {timeout}s")


async def mixed_workload(ed: EventDispatch, tag: str) -> list[str]:
    """Successes, a retry, a timeout and a cancellation."""
    await ed.register_script("mixed", "echo mixed\n")
    devices = [f"{tag}-{i}" for i in range(20)] + [
        f"fail-then-ok-{tag}",
        f"silent-then-ok-{tag}",
        f"always-fail-{tag}",
    ]
    task = f"mixed-{tag}"
    await ed.wait_accepted(await ed.submit(task, "mixed", devices, max_attempts=2, timeout_s=1))
    held = f"silent-{tag}"
    holder = f"hold-{tag}"
    await ed.wait_accepted(await ed.submit(holder, "mixed", [held], timeout_s=600))
    waiter = f"wait-{tag}"
    await ed.wait_accepted(await ed.submit(waiter, "mixed", [held]))
    await ed.cancel(waiter)
    await ed.cancel(holder)
    return [task, holder, waiter]


async def test_a_rebuild_equals_the_live_projections(settings: Settings, service: Service) -> None:
    async with EventDispatch(settings) as ed:
        tasks = await mixed_workload(ed, uuid.uuid4().hex[:6])
        for t in tasks:
            await ed.wait_done(t, timeout_s=60)
    await caught_up(settings)
    outcome = await rb.rebuild(settings, verify=True)
    assert outcome.events > 0
    assert outcome.differences == []


async def test_verify_reports_a_corrupted_document(settings: Settings, service: Service) -> None:
    async with EventDispatch(settings) as ed:
        tag = uuid.uuid4().hex[:6]
        await ed.register_script("mixed", "echo mixed\n")
        await ed.wait_accepted(await ed.submit(f"corrupt-{tag}", "mixed", [f"c-{tag}"]))
        await ed.wait_done(f"corrupt-{tag}", timeout_s=30)
    await caught_up(settings)
    mongo = connect(settings.mongo_url)
    try:
        store = ProjectionStore(
            mongo[settings.mongo_db], await current_generations(mongo[settings.mongo_db])
        )
        key = f"corrupt-{tag}:c-{tag}"
        await store.collection("executions").update_one({"_id": key}, {"$set": {"state": "failed"}})
        outcome = await rb.rebuild(settings, ("executions",), verify=True)
        assert [(d.model, d.key) for d in outcome.differences] == [("executions", key)]
        assert outcome.differences[0].rebuilt is not None
        assert outcome.differences[0].rebuilt["state"] == "succeeded"
        # repair it: rebuild and switch
        switched = await rb.rebuild(settings, ("executions",))
        assert switched.switched
        await asyncio.sleep(1.5)  # the live projector follows the alias
        gens = await current_generations(mongo[settings.mongo_db])
        assert gens["executions"] == switched.generation
        fixed = ProjectionStore(mongo[settings.mongo_db], gens)
        doc = await fixed.collection("executions").find_one({"_id": key})
        assert doc is not None and doc["state"] == "succeeded"
    finally:
        await mongo.close()


async def test_a_rebuild_while_traffic_flows_ends_consistent(
    settings: Settings, service: Service
) -> None:
    tag = uuid.uuid4().hex[:6]
    devices = [f"live-{tag}-{i}" for i in range(300)]
    async with EventDispatch(settings) as ed:
        await ed.register_script("mixed", "echo mixed\n")
        await ed.wait_accepted(await ed.submit(f"live-{tag}", "mixed", devices))
        outcome = await rb.rebuild(settings)  # switches while executions still run
        assert outcome.switched
        summary = await ed.wait_done(f"live-{tag}", timeout_s=120)
        assert summary.counts == {"succeeded": 300}  # no gap, no double count
    await caught_up(settings)
    assert (await rb.rebuild(settings, verify=True)).differences == []


async def test_a_projector_killed_mid_batch_converges(settings: Settings, service: Service) -> None:
    tag = uuid.uuid4().hex[:6]
    devices = [f"kill-{tag}-{i}" for i in range(300)]
    async with EventDispatch(settings) as ed:
        await ed.register_script("mixed", "echo mixed\n")
        await ed.wait_accepted(await ed.submit(f"kill-{tag}", "mixed", devices))
        await asyncio.sleep(1.0)  # let batches be in flight
        projector = supervised(settings)["projector"]
        os.kill(projector["pid"], signal.SIGKILL)  # no drain, no flush; the supervisor restarts it
        wait_until(
            "the projector runs again",
            lambda: supervised(settings)["projector"]["restarts"] > projector["restarts"],
        )
        summary = await ed.wait_done(f"kill-{tag}", timeout_s=120)
        assert summary.counts == {"succeeded": 300}
    await caught_up(settings)
    assert (await rb.rebuild(settings, verify=True)).differences == []


async def test_an_interrupted_rebuild_is_discarded_and_the_live_generation_untouched(
    settings: Settings, service: Service
) -> None:
    mongo = connect(settings.mongo_url)
    try:
        db = mongo[settings.mongo_db]
        before = await current_generations(db)
        task = asyncio.create_task(rb.rebuild(settings))
        await asyncio.sleep(0.3)
        task.cancel()  # interrupted mid-way
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await current_generations(db) == before
        await caught_up(settings)
        outcome = await rb.rebuild(settings, verify=True)  # discards the leftover first
        leftovers = [d async for d in db.projection_meta.find({"state": "building"})]
        assert leftovers == []
        assert outcome.differences == []
    finally:
        await mongo.close()


async def test_an_event_written_with_the_previous_schema_still_projects(
    settings: Settings, service: Service
) -> None:
    """`params_json` was added to Created with a default; a producer still on the schema
    before that change must still be understood."""
    previous = copy.deepcopy(wire.definition("events"))
    created = next(r for r in previous["fields"][-1]["type"] if r["name"] == "Created")
    created["fields"] = [f for f in created["fields"] if f["name"] != "params_json"]

    tag = uuid.uuid4().hex[:6]
    device, task = f"old-{tag}", f"old-schema-{tag}"
    event = Event(
        f"{device}:1",
        int(time.time() * 1000),
        1,
        device,
        task,
        None,
        Created("s", 1, None, 3, 60, 0),
    )
    record = wire.event_to_record(event)
    del record["payload"][1]["params_json"]
    client = pulsar.asyncio.Client(settings.pulsar_url)
    try:
        producer = await client.create_producer(
            settings.topic("events"), schema=wire.AvroCodec("events", previous)
        )
        await producer.send(record, partition_key=device)
        await producer.close()
    finally:
        await client.close()
    await caught_up(settings)
    mongo = connect(settings.mongo_url)
    try:
        db = mongo[settings.mongo_db]
        store = ProjectionStore(db, await current_generations(db))
        doc = await store.collection("executions").find_one({"_id": f"{task}:{device}"})
        assert doc is not None and doc["state"] == "waiting" and doc["max_attempts"] == 3
    finally:
        await mongo.close()


async def test_queries_show_a_busy_device_and_the_task_list(
    settings: Settings, service: Service
) -> None:
    import json

    from tests.integration.conftest import cli

    tag = uuid.uuid4().hex[:6]
    device = f"silent-q-{tag}"
    async with EventDispatch(settings) as ed:
        await ed.register_script("mixed", "echo mixed\n")
        holder, waiter = f"q-hold-{tag}", f"q-wait-{tag}"
        await ed.wait_accepted(await ed.submit(holder, "mixed", [device], timeout_s=600))
        await ed.wait_accepted(await ed.submit(waiter, "mixed", [device]))
        await caught_up(settings)
        r = cli(settings, "device", "show", device, "--json")
        assert r.returncode == 0, r.stderr
        view = json.loads(r.stdout)
        assert view["device"]["current_task"] == holder and view["device"]["queued"] == 1
        assert [x["task_id"] for x in view["executions"]] == [holder, waiter]
        r = cli(settings, "tasks", "list", "--state", "running", "--json")
        listed = {t["task_id"]: t for t in json.loads(r.stdout)}
        assert listed[holder]["counts"] == {"sent": 1} and listed[waiter]["counts"] == {
            "waiting": 1
        }
        await ed.cancel(holder)
        await ed.cancel(waiter)
        await ed.wait_done(waiter, timeout_s=30)
    r = cli(settings, "device", "show", "never-seen-device")
    assert r.returncode == 1 and "no device" in r.stderr
    await caught_up(settings)
    r = cli(settings, "lag")
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stdout.splitlines() if "projector" in line]
    assert len(rows) == 2 and all(" 0 " in row for row in rows)
