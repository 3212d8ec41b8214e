"""The local stack answers, and the broker behaves the way the pipeline relies on.

Runs against the stack of this checkout (`python -m eventdispatch.stack up`); `stack.up` is
called once, so a stopped stack is started (slow the first time) and a running one reused.
Each session provisions a fresh namespace and force-deletes it afterwards.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta

import httpx
import pulsar
import pytest
from pulsar.schema import AvroSchema

from eventdispatch import admin, stack
from eventdispatch.bus import position, reached, within
from eventdispatch.config import Settings
from projections.store import connect, find_by_ids

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack_settings() -> Iterator[Settings]:
    """Settings pointing at a fresh, provisioned namespace (`t-<hex>`), deleted afterwards."""
    base = Settings()
    stack.up(base, log=lambda _: None)
    settings = Settings(namespace=f"t-{uuid.uuid4().hex[:6]}")
    admin.provision(settings)
    yield settings
    admin.delete_namespace(settings)


@pytest.fixture(scope="module")
def pulsar_client(stack_settings: Settings) -> Iterator[pulsar.Client]:
    client = pulsar.Client(stack_settings.pulsar_url, operation_timeout_seconds=10)
    yield client
    client.close()


def test_status_reports_every_service_answering(stack_settings: Settings) -> None:
    statuses = {s.name: s for s in stack.status(stack_settings)}
    assert set(statuses) == {"pulsar", "mongo", "redis"}
    assert all(s.running for s in statuses.values()), statuses


def test_up_again_is_a_fast_no_op(stack_settings: Settings) -> None:
    started = time.monotonic()
    stack.up(Settings(), log=lambda _: None)
    assert time.monotonic() - started < 5.0


def test_provision_creates_topics_and_policies_idempotently(stack_settings: Settings) -> None:
    admin.provision(stack_settings)  # second call: nothing to do, must not fail
    base = f"{stack_settings.pulsar_admin_url}/admin/v2"
    ns = f"{stack_settings.tenant}/{stack_settings.namespace}"
    topics = httpx.get(f"{base}/persistent/{ns}", timeout=5).json()
    assert sorted(topics) == sorted(stack_settings.topic(t) for t in admin.all_topics())
    strategy = httpx.get(f"{base}/namespaces/{ns}/schemaCompatibilityStrategy", timeout=5)
    assert strategy.json() == "BACKWARD_TRANSITIVE"
    for name in ("events", "device-logs"):
        retention = httpx.get(f"{base}/persistent/{ns}/{name}/retention", timeout=5).json()
        assert retention == {"retentionTimeInMinutes": -1, "retentionSizeInMB": -1}


def test_schema_of_reads_back_the_registered_avro_schema(
    stack_settings: Settings, pulsar_client: pulsar.Client
) -> None:
    assert admin.schema_of(stack_settings, "timers") is None
    definition = {
        "type": "record",
        "name": "Probe",
        "namespace": "test",
        "fields": [{"name": "n", "type": "long"}],
    }
    producer = pulsar_client.create_producer(
        stack_settings.topic("timers"), schema=AvroSchema(None, schema_definition=definition)
    )
    producer.close()
    schema = admin.schema_of(stack_settings, "timers")
    assert schema is not None
    assert schema["name"] == "Probe"
    assert [f["name"] for f in schema["fields"]] == ["n"]


def test_produce_and_consume(stack_settings: Settings, pulsar_client: pulsar.Client) -> None:
    topic = stack_settings.topic("events")
    consumer = pulsar_client.subscribe(
        topic, "test-stack", initial_position=pulsar.InitialPosition.Earliest
    )
    producer = pulsar_client.create_producer(topic)
    producer.send(b"hello")
    message = consumer.receive(timeout_millis=10_000)
    consumer.acknowledge(message)
    assert message.data() == b"hello"
    producer.close()
    consumer.close()


def test_delayed_message_is_never_delivered_early(
    stack_settings: Settings, pulsar_client: pulsar.Client
) -> None:
    """Timers rely on isDelayedDeliveryDeliverAtTimeStrict: due time is a lower bound."""
    topic = stack_settings.topic("commands")
    consumer = pulsar_client.subscribe(
        topic, "test-stack-delay", consumer_type=pulsar.ConsumerType.Shared
    )
    producer = pulsar_client.create_producer(topic, batching_enabled=False)
    sent = time.time()
    producer.send(b"later", deliver_after=timedelta(seconds=1))
    message = consumer.receive(timeout_millis=10_000)
    received = time.time()
    consumer.acknowledge(message)
    assert message.data() == b"later"
    assert received - sent >= 1.0
    assert received - sent < 3.0  # tick is 100 ms; anything slower means timers lag
    producer.close()
    consumer.close()


def test_last_position_names_the_last_message_of_a_batch(
    stack_settings: Settings, pulsar_client: pulsar.Client
) -> None:
    """Reads "through the last message now" (rebuild, replay, state rebuild) stop there: it must
    be the batch's last message, or the rest of a batched last entry is never read."""
    topic = stack_settings.topic("device-logs")
    producer = pulsar_client.create_producer(
        topic,
        batching_enabled=True,
        batching_max_publish_delay_ms=100,
        batching_type=pulsar.BatchingType.KeyBased,
    )
    for n in range(3):
        producer.send_async(f"line {n}".encode(), None, partition_key="dev-1")
    producer.flush()
    producer.close()
    end = admin.last_position(stack_settings, "device-logs")
    reader = pulsar_client.create_reader(topic, pulsar.MessageId.earliest)
    read = []
    while reader.has_message_available():
        read.append(position(reader.read_next(timeout_millis=5_000)))
    reader.close()
    assert end is not None and len(read) == 3
    assert read[0][:2] == read[2][:2]  # one entry: a batch of three
    assert end == read[-1]
    assert [within(p, end) for p in read] == [True] * 3
    assert [reached(p, end) for p in read] == [False, False, True]


def test_find_by_ids_returns_exactly_the_documents_present(stack_settings: Settings) -> None:
    """The projector's reads by `_id` (equalities, since `$in` scans on FerretDB/SQLite)."""

    async def go() -> None:
        client = connect(stack_settings.mongo_url)
        name = f"t_ids_{uuid.uuid4().hex[:6]}"
        coll = client[name]["docs"]
        try:
            await coll.insert_many([{"_id": f"d{i}", "n": i} for i in range(100)])
            wanted = ["d3", "absent", "d99", *(f"d{i}" for i in range(40, 80))]
            found = await find_by_ids(coll, wanted)
            assert set(found) == {k for k in wanted if k != "absent"}
            assert all(found[k]["n"] == int(k[1:]) for k in found)
            assert await find_by_ids(coll, []) == {}
        finally:
            await client.drop_database(name)
            await client.close()

    asyncio.run(go())
