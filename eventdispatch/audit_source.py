"""Where the audit's facts come from: the `events` topic (Pulsar Reader) and the projections.

The scan uses the synchronous client: a CLI has nothing else to do meanwhile, and
`pulsar.asyncio.Reader.read_next` costs an event-loop turn per message. It seeks by publish
time, tests each message's key and bytes (`audit.Prefilter`) and decodes only what may match,
with the writer's registered schema version (`AvroCodec`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pulsar

from eventdispatch import wire
from eventdispatch.audit import Prefilter, ScanPlan
from eventdispatch.config import Settings
from eventdispatch.events import Event
from eventdispatch.wire import AvroCodec
from projections.reducers import Doc
from projections.store import collection_name, connect, current_generations, find_by_ids

READ_TIMEOUT_MS = 10_000
"""How long one read may wait before the log is taken as ended: `has_message_available` said
there was more, so only a broker in trouble makes it wait this long."""
RECEIVER_QUEUE = 5000
PROGRESS_EVERY = 5000


class SourceError(RuntimeError):
    """The log or the projections cannot be read; the message says what to check or run."""


@dataclass(frozen=True, slots=True)
class Progress:
    """How far a scan has got: messages read and decoded, and the publish time reached."""

    read: int
    decoded: int
    first_publish_ms: int | None
    publish_ms: int | None
    stop_ms: int
    done: bool = False


def scan(
    settings: Settings,
    plan: ScanPlan,
    prefilter: Prefilter,
    on_progress: Callable[[Progress], None] = lambda p: None,
) -> Iterator[Event]:
    """The events between the plan's bounds that pass the prefilter, in log order."""
    topic = settings.topic("events")
    # The client's own file logger, not a Python one: with a Python logger the client's
    # shutdown thread sometimes outlives it and the process aborts at exit
    # (apache/pulsar-client-python#256). Failures reach us as exceptions anyway.
    quiet = pulsar.FileLogger(pulsar.LoggerLevel.Error, os.devnull)
    client = pulsar.Client(settings.pulsar_url, operation_timeout_seconds=30, logger=quiet)
    try:
        try:
            reader = client.create_reader(
                topic,
                pulsar.MessageId.earliest,
                schema=AvroCodec("events"),
                receiver_queue_size=RECEIVER_QUEUE,
            )
            if plan.start_ms is not None:
                reader.seek(plan.start_ms)
        except Exception as e:
            raise SourceError(
                f"cannot read {topic} ({type(e).__name__}: {e}); is the stack up "
                "(eventdispatch stack status) and EVENTDISPATCH_NAMESPACE right?"
            ) from e
        yield from _read(reader, plan, prefilter, on_progress)
        reader.close()
    finally:
        client.close()


def _read(
    reader: pulsar.Reader,
    plan: ScanPlan,
    prefilter: Prefilter,
    on_progress: Callable[[Progress], None],
) -> Iterator[Event]:
    read = decoded = 0
    first: int | None = None
    published: int | None = None

    def progress(done: bool = False) -> Progress:
        return Progress(read, decoded, first, published, plan.stop_ms, done)

    keys, needles = prefilter.keys, prefilter.needles
    while reader.has_message_available():
        try:
            msg = reader.read_next(READ_TIMEOUT_MS)
        except pulsar.Timeout:
            break
        published = msg.publish_timestamp()
        if published > plan.stop_ms:
            break
        if first is None:
            first = published
        read += 1
        if read % PROGRESS_EVERY == 0:
            on_progress(progress())
        if keys is not None and msg.partition_key() not in keys:
            continue
        if needles and not prefilter.bytes_match(msg.data()):
            continue
        decoded += 1
        yield wire.event_from_record(msg.value())
    on_progress(progress(done=True))


async def load_projections(
    settings: Settings, queries: dict[str, dict[str, Any]], ids: dict[str, list[str]]
) -> dict[str, dict[str, Doc]]:
    """The projected documents of each model that match its query or have one of its ids.

    Raises SourceError when the projections were never built, so the user learns what to run
    instead of reading a diff that says every document is missing."""
    mongo = connect(settings.mongo_url)
    try:
        db = mongo[settings.mongo_db]
        generations = await current_generations(db)
        existing = set(await db.list_collection_names())
        marker = collection_name("executions", generations["executions"])
        if marker not in existing:  # the projector creates it, with its indexes, at start
            raise SourceError(
                f"no projections in database {settings.mongo_db!r} (collection {marker} does "
                "not exist): build them from the log with `eventdispatch project` (or "
                "`eventdispatch run`), then run the diff again"
            )
        out: dict[str, dict[str, Doc]] = {}
        for model, query in queries.items():
            name = collection_name(model, generations[model])
            if name not in existing:  # a model nothing was projected into yet, e.g. rejections
                out[model] = {}
                continue
            coll = db[name]
            # a query naming `_id`s is read by equalities with the rest (an `$in` scans the
            # collection on FerretDB/SQLite); any other is a filter on other fields
            named = query["_id"]["$in"] if list(query) == ["_id"] else None
            docs = {} if named is not None else {str(d["_id"]): d async for d in coll.find(query)}
            wanted = sorted({*(named or ()), *ids.get(model, [])} - docs.keys())
            docs.update({str(k): d for k, d in (await find_by_ids(coll, wanted)).items()})
            out[model] = docs
        return out
    except SourceError:
        raise
    except Exception as e:
        name = type(e).__name__
        raise SourceError(
            f"cannot read the projections at {settings.mongo_url} ({name}: {e}); "
            "is the stack up? (eventdispatch stack status)"
        ) from e
    finally:
        await mongo.close()


def now_ms() -> int:
    return int(time.time() * 1000)
