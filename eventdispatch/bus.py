"""Pulsar adapter: one asyncio client, producers with the right batching, consumers, DLQ.

Key_Shared topics (device-inbox, device-logs) get key-based batching: default batching puts
several keys in one batch, and the broker routes a batch by its first key only, which breaks
per-device order across consumers. Timers are never batched: a batch has one delivery time.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pulsar
import pulsar.asyncio
from pulsar import BatchingType, ConsumerType, InitialPosition

from eventdispatch.config import Settings
from eventdispatch.retry import retry_in_place
from eventdispatch.wire import AvroCodec, Record

log = logging.getLogger("eventdispatch.bus")

KEY_SHARED_TOPICS = frozenset({"device-inbox", "device-logs"})
PUBLISH_WINDOW = 1000


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A record to publish, with its key and optional delivery time (epoch ms)."""

    record: Record
    key: str
    deliver_at_ms: int | None = None


MessageKey = tuple[int, int, int]


def position(msg: pulsar.Message) -> MessageKey:
    """A message's place in a non-partitioned topic, comparable with <."""
    mid = msg.message_id()
    return (mid.ledger_id(), mid.entry_id(), mid.batch_index())


class Bus:
    """The service's connection to Pulsar."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        pulsar_log = logging.getLogger("pulsar")
        pulsar_log.setLevel(logging.WARNING)
        self.client = pulsar.asyncio.Client(
            settings.pulsar_url, operation_timeout_seconds=30, logger=pulsar_log
        )
        self._dlq: dict[str, pulsar.asyncio.Producer] = {}

    def topic(self, name: str) -> str:
        return self.settings.topic(name)

    async def producer(self, name: str, *, large: bool = False) -> pulsar.asyncio.Producer:
        """A producer for a topic. `large` ones chunk messages over the broker's 5 MB limit
        (a 100,000-device task) and so cannot batch; chunks need a non-shared subscription."""
        options: dict[str, Any] = {"batching_enabled": True, "batching_max_publish_delay_ms": 1}
        if name in KEY_SHARED_TOPICS:
            options["batching_type"] = BatchingType.KeyBased
        if name == "timers":
            options = {"batching_enabled": False}
        if large:
            options = {"batching_enabled": False, "chunking_enabled": True}
        return await self.client.create_producer(
            self.topic(name),
            schema=AvroCodec(name),
            max_pending_messages=PUBLISH_WINDOW * 2,
            block_if_queue_full=False,
            **options,
        )

    async def consumer(
        self,
        name: str,
        subscription: str,
        kind: ConsumerType,
        *,
        receiver_queue_size: int = 1000,
        earliest: bool = True,
    ) -> pulsar.asyncio.Consumer:
        return await self.client.subscribe(
            self.topic(name),
            subscription,
            consumer_type=kind,
            schema=AvroCodec(name),
            receiver_queue_size=receiver_queue_size,
            initial_position=InitialPosition.Earliest if earliest else InitialPosition.Latest,
        )

    async def reader(self, name: str, start: pulsar.MessageId) -> pulsar.asyncio.Reader:
        return await self.client.create_reader(self.topic(name), start, schema=AvroCodec(name))

    async def dead_letter(self, name: str, msg: pulsar.Message, reason: str) -> None:
        """Copy an unprocessable message, bytes untouched, to `<name>-DLQ` with the reason."""
        await retry_in_place("dead-letter", lambda: self._dead_letter(name, msg, reason))

    async def _dead_letter(self, name: str, msg: pulsar.Message, reason: str) -> None:
        producer = self._dlq.get(name)
        if producer is None:
            producer = await self.client.create_producer(
                self.topic(f"{name}-DLQ"), batching_enabled=False
            )
            self._dlq[name] = producer
        props = {
            "reason": reason[:1000],
            "source_topic": self.topic(name),
            "source_message_id": str(msg.message_id()),
        }
        await producer.send(msg.data(), properties=props, partition_key=msg.partition_key() or None)
        log.warning("dead-lettered message from %s: %s", name, reason)

    async def close(self) -> None:
        for producer in self._dlq.values():
            await producer.close()
        await self.client.close()


async def publish(producer: pulsar.asyncio.Producer, items: Sequence[Outgoing]) -> None:
    """Publish in order and wait until every message is durable.

    Sends start in list order (the client keeps a producer's order), in windows that stay
    below the producer's pending limit."""
    for start in range(0, len(items), PUBLISH_WINDOW):
        window = items[start : start + PUBLISH_WINDOW]
        await asyncio.gather(
            *(
                producer.send(item.record, partition_key=item.key, deliver_at=item.deliver_at_ms)
                for item in window
            )
        )


async def receive_until(
    consumer: pulsar.asyncio.Consumer, stop: asyncio.Event
) -> pulsar.Message | None:
    """The next message, or None once `stop` is set (drain: stop receiving first)."""
    if stop.is_set():
        return None
    receive = asyncio.ensure_future(consumer.receive())
    stopped = asyncio.ensure_future(stop.wait())
    done, _ = await asyncio.wait({receive, stopped}, return_when=asyncio.FIRST_COMPLETED)
    if receive in done:
        stopped.cancel()
        return receive.result()
    receive.cancel()
    return None
