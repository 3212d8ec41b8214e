"""Pulsar adapter: one asyncio client, producers with the right batching, consumers, DLQ.

Key_Shared topics (device-inbox, device-logs) get key-based batching: default batching puts
several keys in one batch, and the broker routes a batch by its first key only, which breaks
per-device order across consumers. Timers are never batched: a batch has one delivery time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import _pulsar
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
Entry = tuple[int, int]  # (ledger, entry): a broker entry, one message or a batch of them


def _ignore(*_: int) -> None:
    pass


@dataclass(frozen=True, slots=True)
class Progress:
    """Callbacks for a display of reading topics through, counted in broker entries (the unit
    the broker can count ahead; a batched entry holds several messages): `total(entries)` once
    per topic before its first batch, then `advance(entries, messages)` after each batch."""

    total: Callable[[int], None] = _ignore
    advance: Callable[[int, int], None] = _ignore


def count_entries(keys: Iterable[MessageKey], after: Entry | None) -> tuple[int, Entry | None]:
    """Distinct entries among `keys` (positions in read order) that come after the entry
    `after`, and the last entry seen: what a batch adds to a read counted in entries. Pure."""
    count = 0
    last = after
    for ledger, entry, _ in keys:
        if last is None or (ledger, entry) > last:
            count += 1
            last = (ledger, entry)
    return count, last


def within(pos: MessageKey, end: MessageKey) -> bool:
    """Whether the message at `pos` comes no later than `end`, the last message of a topic as
    `admin.last_position` gives it. An end batch index of -1 (the broker did not say) means
    the whole entry. Pure."""
    return pos[:2] < end[:2] or (pos[:2] == end[:2] and (end[2] < 0 or pos[2] <= end[2]))


def reached(pos: MessageKey, end: MessageKey) -> bool:
    """Whether a reader in log order that has just read `pos` has read everything through
    `end`: the whole last batch, not just its first message. Pure."""
    return pos[:2] > end[:2] or (pos[:2] == end[:2] and (end[2] < 0 or pos[2] >= end[2]))


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
        gather_ms: int = 0,
    ) -> pulsar.asyncio.Consumer:
        # The policy only matters to a Receiver with gather_ms > 0; the client wants a timer >= 1.
        return await self.client.subscribe(
            self.topic(name),
            subscription,
            consumer_type=kind,
            schema=AvroCodec(name),
            receiver_queue_size=receiver_queue_size,
            initial_position=InitialPosition.Earliest if earliest else InitialPosition.Latest,
            batch_receive_policy=pulsar.ConsumerBatchReceivePolicy(
                receiver_queue_size, -1, max(gather_ms, 1)
            ),
        )

    async def receiver(
        self,
        name: str,
        subscription: str,
        kind: ConsumerType,
        receiver_queue_size: int = 1000,
        *,
        gather_ms: int = 0,
    ) -> Receiver:
        """A consumer read in batches (see Receiver). With `gather_ms` 0 a batch is what is
        queued already (pipeline stages: a hop costs no wait); above 0 each batch waits that
        long for more (bulk readers, which favour fewer, larger batches)."""
        consumer = await self.consumer(
            name, subscription, kind, receiver_queue_size=receiver_queue_size, gather_ms=gather_ms
        )
        return Receiver(consumer, receiver_queue_size, gather_ms)

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


async def acknowledge(consumer: pulsar.asyncio.Consumer, msg: pulsar.Message) -> None:
    """Acknowledge, and let a failure (the broker away) pass: an acknowledgement lost costs a
    redelivery, which every stage recognises, while raising here would abandon the work
    queued behind this message."""
    try:
        await consumer.acknowledge(msg)
    except Exception as e:
        log.warning(
            "acknowledgement lost (%s: %s); the message will be redelivered", type(e).__name__, e
        )


async def publish(producer: pulsar.asyncio.Producer, items: Sequence[Outgoing]) -> None:
    """Publish in order and wait until every message is durable.

    Sends start in list order (the client keeps a producer's order), in windows that stay
    below the producer's pending limit. A window wakes the event loop once, when its last
    receipt arrives: `pulsar.asyncio`'s `send` costs a task, a future and a thread-safe wake-up
    per message, about a tenth of a worker's CPU (docs/benchmarks.md). Raises
    `PulsarException` with the first failure once every send of the window has answered."""
    for start in range(0, len(items), PUBLISH_WINDOW):
        await _send_window(producer, items[start : start + PUBLISH_WINDOW])


async def _send_window(producer: pulsar.asyncio.Producer, window: Sequence[Outgoing]) -> None:
    if not window:
        return
    loop = asyncio.get_running_loop()
    receipts: asyncio.Future[None] = loop.create_future()
    lock = threading.Lock()
    left = len(window)
    failure: list[Any] = []

    def finish() -> None:
        if receipts.done():
            return
        if failure:
            receipts.set_exception(pulsar.asyncio.PulsarException(failure[0]))
        else:
            receipts.set_result(None)

    def sent(result: Any, _msg_id: Any) -> None:  # on the client's thread
        nonlocal left
        with lock:
            left -= 1
            if result != pulsar.Result.Ok and not failure:
                failure.append(result)
            last = left == 0
        if last:
            loop.call_soon_threadsafe(finish)

    # The asyncio wrapper has no batch send; its C++ producer and schema do the work.
    raw, schema = producer._producer, producer._schema
    for item in window:
        builder = _pulsar.MessageBuilder().content(schema.encode(item.record))
        builder.partition_key(item.key)
        if item.deliver_at_ms is not None:
            builder.deliver_at(item.deliver_at_ms)
        raw.send_async(builder.build(), sent)
    # No `flush_async` here: it holds the GIL while it waits for the producer's lock, which
    # the client's thread holds while it waits for the GIL to run `sent` (a deadlock, seen
    # in the simulator). Batches leave on the 1 ms timer.
    await receipts


class Receiver:
    """Receives on a thread of its own and hands the event loop whole batches.

    `pulsar.asyncio.Consumer.receive()` costs one event-loop turn per message; on a loop busy
    with thousands of devices that capped a stage at a few dozen messages per second. Here a
    thread blocks in the client's own `receive`, then takes whatever else is already queued
    (`receive(0)` until it times out) or, with `gather_ms`, whatever arrives within that time
    (`batch_receive`, which waits out its timer even when nothing else comes: ~1.1 ms a batch
    against ~0.2), and the loop wakes once per batch. Order is kept.
    """

    def __init__(
        self, consumer: pulsar.asyncio.Consumer, max_batch: int, gather_ms: int = 0
    ) -> None:
        self.consumer = consumer
        self._max_batch = max_batch
        self._gather = gather_ms > 0
        # The asyncio wrapper has no batch receive; its C++ consumer and schema do the work.
        self._raw = consumer._consumer
        self._schema = consumer._schema
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[list[pulsar.Message]] = asyncio.Queue(maxsize=2)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._pump, name="receiver", daemon=True)
        self._thread.start()

    def _wrap(self, raw: Any) -> pulsar.Message:
        msg = pulsar.Message()
        msg._message = raw
        msg._schema = self._schema
        return msg

    def _more(self) -> list[pulsar.Message]:
        """What to hand over with a first message: what is queued already, or, with
        `gather_ms`, what arrives within it."""
        more: list[pulsar.Message] = []
        with contextlib.suppress(Exception):  # nothing more queued or arrived, or closed
            if self._gather:
                more.extend(self._wrap(m) for m in self._raw.batch_receive())
            else:
                while len(more) < self._max_batch - 1:
                    more.append(self._wrap(self._raw.receive(0)))
        return more

    def _pump(self) -> None:
        while not self._closed.is_set():
            try:
                first = self._raw.receive(200)
            except Exception:  # a timeout, or the consumer closed under us
                continue
            batch = [self._wrap(first), *self._more()]
            # One offer per batch, waited on until taken: cancelling a timed-out offer could
            # race its completion and hand the same batch over twice.
            handed = asyncio.run_coroutine_threadsafe(self._queue.put(batch), self._loop)
            while True:
                try:
                    handed.result(timeout=0.5)
                    break
                except TimeoutError:  # the loop is behind: keep waiting, unless closing
                    if self._closed.is_set():
                        handed.cancel()
                        return
                except Exception:  # the loop is gone
                    return

    async def next(
        self, stop: asyncio.Event, timeout: float | None = None
    ) -> list[pulsar.Message] | None:
        """The next batch, or None once `stop` is set; an empty batch after `timeout` s."""
        if stop.is_set():
            return None
        batch = asyncio.ensure_future(self._queue.get())
        stopped = asyncio.ensure_future(stop.wait())
        done, _ = await asyncio.wait(
            {batch, stopped}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
        stopped.cancel()
        if batch in done:
            return batch.result()
        batch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await batch  # a get that won the race keeps its batch: hand it over, not lose it
        if batch.cancelled():
            return None if stop.is_set() else []
        return batch.result()

    async def gather(
        self, stop: asyncio.Event, size: int, linger_s: float
    ) -> list[pulsar.Message] | None:
        """The next batch, topped up with what arrives within `linger_s` of it, up to about
        `size` messages; None once `stop` is set and nothing was received."""
        batch = await self.next(stop)
        if batch is None:
            return None
        deadline = self._loop.time() + linger_s
        while len(batch) < size and (left := deadline - self._loop.time()) > 0:
            more = await self.next(stop, left)
            if not more:  # timed out, or stopping: apply what there is
                break
            batch.extend(more)
        return batch

    async def close(self) -> None:
        """Stop receiving and close the consumer: what was received but not acknowledged is
        redelivered to the subscription's next consumer."""
        self._closed.set()
        await asyncio.to_thread(self._thread.join, 2.0)
        await self.consumer.close()
