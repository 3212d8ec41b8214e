"""`eventdispatch audit` on the real stack, after a retry, a timeout and a cancellation: a
device's timeline is exactly its events in order, --at equals the projections as they were
then, --diff finds a corrupted projection document, and the HTML report renders in Chromium
with one lane per device."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pymongo
import pytest

from eventdispatch import admin
from eventdispatch.audit import iso
from eventdispatch.client import EventDispatch
from eventdispatch.config import Settings
from projections.reducers import Doc
from projections.store import ProjectionStore, connect
from tests.integration.conftest import Service, cli, read_log

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class Scenario:
    retried: str  # fail-then-ok: ERROR, then SUCCESS on attempt 2
    timed_out: str  # silent-then-ok: no answer within 1 s, then SUCCESS on attempt 2
    canceled: str  # silent: a holder task sent and a waiter queued, both canceled
    tasks: dict[str, str]
    at_ms: int  # while the holder was sent and the waiter waiting
    projected_at: dict[str, list[Doc]]  # the canceled device's documents at at_ms


async def caught_up(settings: Settings, timeout: float = 30) -> None:
    """Wait until the live projector has applied every event."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if admin.backlog(settings, "events", "projector") == 0:
            await asyncio.sleep(0.5)  # the last batch is acknowledged after its write
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"the projector did not catch up within {timeout}s")


async def wait_state(store: ProjectionStore, key: str, state: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    doc = None
    while time.monotonic() < deadline:
        doc = await store.collection("executions").find_one({"_id": key})
        if doc is not None and doc["state"] == state:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{key} never reached {state}; last: {doc}")


async def device_docs(store: ProjectionStore, device: str) -> dict[str, list[Doc]]:
    out: dict[str, list[Doc]] = {}
    for model in ("executions", "attempts"):
        docs = [d async for d in store.collection(model).find({"device_id": device})]
        out[model] = sorted(docs, key=lambda d: str(d["_id"]))
    out["devices"] = [d async for d in store.collection("devices").find({"_id": device})]
    return out


@pytest.fixture(scope="module")
async def scenario(settings: Settings, service: Service) -> AsyncIterator[Scenario]:
    tag = uuid.uuid4().hex[:6]
    retried, timed_out, canceled = (
        f"{p}-{tag}" for p in ("fail-then-ok", "silent-then-ok", "silent")
    )
    tasks = {name: f"audit-{name}-{tag}" for name in ("retry", "timeout", "holder", "waiter")}
    mongo = connect(settings.mongo_url)
    store = await ProjectionStore.open(mongo[settings.mongo_db])
    async with EventDispatch(settings) as ed:
        await ed.register_script("audit", "echo audit\n")
        subs = [
            await ed.submit(tasks["retry"], "audit", [retried], max_attempts=3),
            await ed.submit(tasks["timeout"], "audit", [timed_out], max_attempts=2, timeout_s=1),
            await ed.submit(tasks["holder"], "audit", [canceled], timeout_s=600),
        ]
        for sub in subs:
            await ed.wait_accepted(sub)
        await ed.wait_accepted(await ed.submit(tasks["waiter"], "audit", [canceled]))
        await wait_state(store, f"{tasks['holder']}:{canceled}", "sent")
        await wait_state(store, f"{tasks['waiter']}:{canceled}", "waiting")
        await caught_up(settings)
        at_ms = int(time.time() * 1000)
        projected_at = await device_docs(store, canceled)
        await asyncio.sleep(0.05)
        await ed.cancel(tasks["waiter"], reason="audit test")
        await ed.cancel(tasks["holder"], reason="audit test")
        for task in ("retry", "timeout"):
            assert (await ed.wait_done(tasks[task], timeout_s=30)).counts == {"succeeded": 1}
        await wait_state(store, f"{tasks['holder']}:{canceled}", "canceled")
        await caught_up(settings)
    await mongo.close()
    yield Scenario(retried, timed_out, canceled, tasks, at_ms, projected_at)


def audit(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return cli(settings, "audit", "--no-progress", *args, timeout=60)


def jsonl(result: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


async def test_a_devices_timeline_is_exactly_its_events_in_log_order(
    settings: Settings, scenario: Scenario
) -> None:
    log = await read_log(settings)  # decoded independently, with the broker's schema
    expected = {
        scenario.retried: [
            "Created",
            "Locked",
            "Sent",
            "Retrying",
            "Waiting",
            "Locked",
            "Sent",
            "Succeeded",
        ],
        scenario.timed_out: [
            "Created",
            "Locked",
            "Sent",
            "TimedOut",
            "Retrying",
            "Waiting",
            "Locked",
            "Sent",
            "Succeeded",
        ],
        scenario.canceled: ["Created", "Locked", "Sent", "Created", "Canceled", "Canceled"],
    }
    for device, types in expected.items():
        rows = jsonl(audit(settings, "--device", device, "--format", "jsonl"))
        assert [r["type"] for r in rows] == types, device
        in_log = [r["event_id"] for r in log if r["device_id"] == device]
        assert [r["event_id"] for r in rows] == in_log
        assert [r["seq"] for r in rows] == list(range(1, len(types) + 1))
        times = [r["occurred_at_ms"] for r in rows]
        assert [r["gap_ms"] for r in rows] == [None, *(b - a for a, b in itertools.pairwise(times))]
    retry = jsonl(
        audit(settings, "--device", scenario.retried, "--type", "Retrying", "--format", "jsonl")
    )
    assert [(r["attempt"], r["exec_id"]) for r in retry] == [
        (1, f"{scenario.tasks['retry']}:{scenario.retried}:1")
    ]
    # a window that starts at the snapshot: only the cancellations came after it
    since = iso(scenario.at_ms)
    later = jsonl(
        audit(settings, "--device", scenario.canceled, "--since", since, "--format", "jsonl")
    )
    assert [(r["type"], r["task_id"]) for r in later] == [
        ("Canceled", scenario.tasks["waiter"]),
        ("Canceled", scenario.tasks["holder"]),
    ]


async def test_state_at_a_time_equals_the_projections_then(
    settings: Settings, scenario: Scenario
) -> None:
    result = audit(
        settings, "--device", scenario.canceled, "--at", iso(scenario.at_ms), "--format", "json"
    )
    assert result.returncode == 0, result.stderr
    snap = json.loads(result.stdout)
    for model in ("executions", "attempts", "devices"):
        assert snap[model] == scenario.projected_at[model], model
    (state,) = snap["device_states"]  # the decider's own state, folded with evolve
    assert state["device_id"] == scenario.canceled
    assert state["active"] == f"{scenario.tasks['holder']}:1"
    assert [(x["task_id"], x["status"]) for x in state["live"]] == [
        (scenario.tasks["holder"], "sent"),
        (scenario.tasks["waiter"], "waiting"),
    ]
    # and now: both canceled, nothing live
    now = json.loads(
        audit(settings, "--device", scenario.canceled, "--at", "now", "--format", "json").stdout
    )
    assert {d["state"] for d in now["executions"]} == {"canceled"}


async def test_diff_agrees_until_a_projection_document_is_corrupted(
    settings: Settings, scenario: Scenario
) -> None:
    whole = audit(settings, "--diff", "--format", "json")
    assert whole.returncode == 0, whole.stdout + whole.stderr
    compared = json.loads(whole.stdout)["compared"]
    assert compared["executions"] >= 4 and compared["attempts"] >= 5 and compared["devices"] >= 3

    execution = f"{scenario.tasks['retry']}:{scenario.retried}"
    attempt = f"{execution}:1"
    mongo = connect(settings.mongo_url)
    store = await ProjectionStore.open(mongo[settings.mongo_db])
    saved_execution = await store.collection("executions").find_one({"_id": execution})
    saved_attempt = await store.collection("attempts").find_one({"_id": attempt})
    assert saved_execution is not None and saved_attempt is not None
    await store.collection("executions").update_one(
        {"_id": execution}, {"$set": {"state": "failed"}}
    )
    await store.collection("attempts").delete_one({"_id": attempt})
    try:
        await _check_the_corruption_is_found(settings, scenario, execution, attempt)
    finally:  # the session's read models are shared: put them back as they were
        await store.collection("executions").replace_one({"_id": execution}, saved_execution)
        await store.collection("attempts").insert_one(saved_attempt)
        await mongo.close()


async def _check_the_corruption_is_found(
    settings: Settings, scenario: Scenario, execution: str, attempt: str
) -> None:
    result = audit(settings, "--diff", "--device", scenario.retried, "--format", "json")
    assert result.returncode == 1, result.stderr
    assert "2 documents differ" in result.stderr
    found = {
        (d["model"], d["id"], d["kind"]): d["fields"]
        for d in json.loads(result.stdout)["differences"]
    }
    assert found == {
        ("attempts", attempt, "missing"): {},
        ("executions", execution, "different"): {
            "state": {"log": "succeeded", "projection": "failed"}
        },
    }
    table = audit(settings, "--diff", "--task", scenario.tasks["retry"])
    assert table.returncode == 1 and "succeeded" in table.stdout and "failed" in table.stdout
    other = audit(settings, "--diff", "--device", scenario.timed_out)
    assert other.returncode == 0, other.stdout + other.stderr


async def test_diff_without_projections_says_what_to_run(settings: Settings) -> None:
    empty = settings.model_copy(update={"mongo_db": f"test_audit_empty_{uuid.uuid4().hex[:6]}"})
    try:
        result = cli(empty, "audit", "--no-progress", "--diff", "--device", "anything")
        assert result.returncode == 2
        assert "eventdispatch project" in result.stderr
    finally:
        pymongo.MongoClient(settings.mongo_url).drop_database(empty.mongo_db)


async def test_stats_and_an_empty_selection(settings: Settings, scenario: Scenario) -> None:
    devices = ",".join((scenario.retried, scenario.timed_out, scenario.canceled))
    result = audit(settings, "--device", devices, "--stats", "--format", "json")
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)
    assert stats["by_type"]["Retrying"] == 2 and stats["by_type"]["TimedOut"] == 1
    assert stats["by_type"]["Canceled"] == 2 and stats["devices"] == 3
    failing = {f["name"]: f for f in stats["failing_devices"]}
    assert failing.keys() == {scenario.retried, scenario.timed_out}
    assert failing[scenario.timed_out]["timeouts"] == 1
    assert [f["name"] for f in stats["failing_scripts"]] == ["audit"]
    run = stats["latencies_ms"]["run"]
    assert run["n"] == 4 and run["max"] >= 1000  # the timed-out attempt waited its second

    nobody = audit(settings, "--device", f"nobody-{uuid.uuid4().hex[:6]}", "--since", "-10m")
    assert nobody.returncode == 0 and "no events match" in nobody.stderr


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def lanes_in(html: str) -> list[str]:
    return re.findall(r'<g class="lane" data-device="([^"]*)"', html)


async def test_the_html_report_has_one_lane_per_device(
    settings: Settings, scenario: Scenario, tmp_path: Path
) -> None:
    devices = sorted((scenario.retried, scenario.timed_out, scenario.canceled))
    report = tmp_path / "report.html"
    result = audit(
        settings, "--device", ",".join(devices), "--format", "html", "--out", str(report)
    )
    assert result.returncode == 0, result.stderr
    html = report.read_text()
    assert lanes_in(html) == devices
    spans = html.count('<rect class="span"')
    assert spans == 5  # two attempts each on two devices, one canceled attempt
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install chromium); lanes checked in HTML")
    with tempfile.TemporaryDirectory() as profile:
        flags = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--no-first-run",
            f"--user-data-dir={profile}",
        ]
        dom = subprocess.run(
            [CHROMIUM, *flags, "--dump-dom", report.as_uri()],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        shot = tmp_path / "report.png"
        subprocess.run(
            [CHROMIUM, *flags, "--window-size=1200,800", f"--screenshot={shot}", report.as_uri()],
            capture_output=True,
            timeout=60,
            check=True,
        )
    # the page's script counts the lanes the browser laid out with a non-empty box
    assert f'data-lanes-rendered="{len(devices)}"' in dom
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
