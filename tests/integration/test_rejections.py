"""Bad input gets a clear answer: a Rejected event with a reason code, a clear CLI error, a DLQ
entry for what cannot be decoded, and the service keeps running."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pulsar
import pulsar.asyncio
import pytest

from eventdispatch.client import CommandRejected, EventDispatch
from eventdispatch.config import Settings
from eventdispatch.wire import AvroCodec
from tests.integration.conftest import Service, cli, read_log

pytestmark = pytest.mark.integration


async def _publish_raw(settings: Settings, payload: Any, key: str, schema: bool) -> None:
    """Publish past the client's validation, as a foreign producer might."""
    client = pulsar.asyncio.Client(settings.pulsar_url)
    try:
        kwargs = {"schema": AvroCodec("commands")} if schema else {}
        producer = await client.create_producer(settings.topic("commands"), **kwargs)
        await producer.send(payload, partition_key=key)
        await producer.close()
    finally:
        await client.close()


async def _rejections(
    settings: Settings, subject: str, timeout: float = 30
) -> list[dict[str, Any]]:
    since = int(time.time() * 1000) - 60_000  # the reader seeks by publish time
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [
            e
            for e in await read_log(settings, "events", since)
            if e["type"] == "Rejected" and e["payload"]["subject"] == subject
        ]
        if found:
            return found
        await asyncio.sleep(0.3)
    raise AssertionError(f"no Rejected event for {subject!r} within {timeout}s")


async def test_unknown_script_is_rejected_with_its_reason(
    settings: Settings, service: Service
) -> None:
    task_id = f"unknown-script-{uuid.uuid4().hex[:6]}"
    async with EventDispatch(settings) as ed:
        sub = await ed.submit(task_id, "no-such-script", ["dev-1"])
        with pytest.raises(CommandRejected) as caught:
            await ed.wait_accepted(sub)
    assert caught.value.code == "UNKNOWN_SCRIPT"
    (rejected,) = await _rejections(settings, task_id)
    assert rejected["payload"]["reason_code"] == "UNKNOWN_SCRIPT"
    assert "no-such-script" in rejected["payload"]["reason"]


async def test_an_empty_device_list_from_a_foreign_producer_is_rejected(
    settings: Settings, service: Service
) -> None:
    task_id = f"empty-{uuid.uuid4().hex[:6]}"
    record = {
        "command_id": str(uuid.uuid4()),
        "issued_at_ms": int(time.time() * 1000),
        "type": "CreateTask",
        "body": (
            "eventdispatch.commands.CreateTask",
            {"task_id": task_id, "script_id": "whatever", "devices": []},
        ),
    }
    await _publish_raw(settings, record, task_id, schema=True)
    (rejected,) = await _rejections(settings, task_id)
    assert rejected["payload"]["reason_code"] == "EMPTY_DEVICE_LIST"
    assert rejected["payload"]["command_id"] == record["command_id"]


async def test_a_malformed_command_is_rejected_and_dead_lettered(
    settings: Settings, service: Service
) -> None:
    key = f"garbage-{uuid.uuid4().hex[:6]}"
    await _publish_raw(settings, b"\xff\x00 this is not avro", key, schema=False)
    (rejected,) = await _rejections(settings, key)
    assert rejected["payload"]["reason_code"] == "MALFORMED_COMMAND"

    client = pulsar.asyncio.Client(settings.pulsar_url)
    try:
        reader = await client.create_reader(
            settings.topic("commands-DLQ"), pulsar.MessageId.earliest
        )
        dead = []
        while await reader.has_message_available():
            msg = await reader.read_next()
            if msg.partition_key() == key:
                dead.append(msg)
        await reader.close()
    finally:
        await client.close()
    assert len(dead) == 1
    assert dead[0].data() == b"\xff\x00 this is not avro"
    assert "could not be decoded" in dead[0].properties()["reason"]


def test_the_cli_says_what_is_wrong(settings: Settings, service: Service) -> None:
    r = cli(settings, "submit", "--script", "no-such-script", "--devices", "a,b")
    assert r.returncode == 1
    assert "UNKNOWN_SCRIPT" in r.stderr and "no-such-script" in r.stderr

    r = cli(settings, "submit", "--script", "x", "--devices", ",")
    assert r.returncode == 1
    assert "EMPTY_DEVICE_LIST" in r.stderr

    r = cli(settings, "submit", "--script", "x", "--devices", "a", "--at", "2026-12-03T18:00:00")
    assert r.returncode == 1
    assert "no UTC offset" in r.stderr

    r = cli(settings, "submit", "--script", "x", "--devices", "bad device!")
    assert r.returncode == 1
    assert "INVALID_COMMAND" in r.stderr and "devices" in r.stderr


async def test_the_service_keeps_running_after_bad_input(
    settings: Settings, service: Service
) -> None:
    await test_a_malformed_command_is_rejected_and_dead_lettered(settings, service)
    task_id = f"after-bad-{uuid.uuid4().hex[:6]}"
    async with EventDispatch(settings) as ed:
        await ed.register_script("still-alive", "echo ok\n")
        await ed.wait_accepted(await ed.submit(task_id, "still-alive", ["alive-1", "alive-2"]))
        summary = await ed.wait_done(task_id, timeout_s=60)
    assert summary.counts == {"succeeded": 2}
    assert service.proc is not None and service.proc.poll() is None
