"""One task dispatched end to end on the real stack, checked from the log, the projections and
the simulator's record."""

from __future__ import annotations

import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import redis

from eventdispatch.client import EventDispatch
from eventdispatch.config import Settings
from projections.store import ProjectionStore, connect
from tests.integration.conftest import ROOT, Service, read_log, read_record

pytestmark = pytest.mark.integration


async def test_a_task_to_50_devices_succeeds_on_every_device(
    settings: Settings, service: Service, sim_record: Path
) -> None:
    started = int(time.time() * 1000)
    run = uuid.uuid4().hex[:6]
    task_id = f"fifty-{run}"
    devices = [f"d-{run}-{i:02d}" for i in range(50)]
    content = (ROOT / "examples" / "system_info.sh").read_text()

    async with EventDispatch(settings) as ed:
        script = await ed.register_script("system-info", content)
        sub = await ed.submit(task_id, "system-info", devices)
        accepted = await ed.wait_accepted(sub)
        assert accepted.task["script_version"] == script.version
        summary = await ed.wait_done(task_id, timeout_s=120)

    assert summary.counts == {"succeeded": 50}

    # The log: per device Created, Locked, Sent, Succeeded with increasing seq, decoded with
    # the schema registered on the broker.
    per_device: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in await read_log(settings, "events", since_ms=started - 1000):
        if e["task_id"] == task_id and e["device_id"] is not None:
            per_device[e["device_id"]].append(e)
    assert sorted(per_device) == devices
    for device, evs in per_device.items():
        assert [e["type"] for e in evs] == ["Created", "Locked", "Sent", "Succeeded"], device
        seqs = [e["seq"] for e in evs]
        assert seqs == sorted(seqs) and len(set(seqs)) == 4, (device, seqs)
        assert evs[1]["attempt"] == 1

    # The devices' side: each exec_id accepted exactly once (I3), one per device.
    accepted_ids = [
        r["exec_id"]
        for r in read_record(sim_record)
        if r["event"] == "accepted" and r["exec_id"].startswith(f"{task_id}:")
    ]
    assert sorted(accepted_ids) == sorted(f"{task_id}:{d}:1" for d in devices)

    # A delivery marker was set before each call, and it expires: one per attempt for ever
    # would fill Redis.
    r = redis.Redis.from_url(settings.redis_url)
    try:
        markers = [f"{settings.redis_prefix}:sent:{x}" for x in accepted_ids]
        ttls = [r.ttl(m) for m in markers]
        assert all(600 < ttl <= 600 + 86_400 for ttl in ttls), ttls  # timeout 600 s + a day
    finally:
        r.close()

    # The projections agree.
    mongo = connect(settings.mongo_url)
    try:
        store = await ProjectionStore.open(mongo[settings.mongo_db])
        attempts = [d async for d in store.collection("attempts").find({"task_id": task_id})]
        assert len(attempts) == 50
        assert {a["outcome"] for a in attempts} == {"succeeded"}
        assert all(a["locked_at_ms"] <= a["sent_at_ms"] <= a["ended_at_ms"] for a in attempts)
        logs = await store.collection("logs").count_documents({"task_id": task_id})
        assert logs == 100  # an INFO and a SUCCESS line per device
    finally:
        await mongo.close()


async def test_registering_the_same_content_keeps_the_version(
    settings: Settings, service: Service
) -> None:
    sid = f"same-{uuid.uuid4().hex[:6]}"
    async with EventDispatch(settings) as ed:
        first = await ed.register_script(sid, "echo one\n")
        again = await ed.register_script(sid, "echo one\n")
        second = await ed.register_script(sid, "echo two\n")
    assert first.version == again.version == 1
    assert second.version == 2
