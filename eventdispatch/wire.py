"""The wire format: Avro schemas loaded from schemas/*.avsc, and dataclass <-> record codecs.

The .avsc files are the source of truth. Each topic's schema is registered with Pulsar's schema
registry when the first producer or consumer attaches (`AvroCodec.schema_info`), and readers
decode with the writer's registered version, so events written by an older schema still read.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

import _pulsar
import fastavro
import pulsar

from eventdispatch.events import PAYLOAD_TYPES, Event
from eventdispatch.inputs import WIRE_INPUT_TYPES, WireInput

SCHEMA_DIR = Path(
    os.environ.get("EVENTDISPATCH_SCHEMA_DIR", Path(__file__).parent.parent / "schemas")
)
TOPIC_SCHEMAS = {
    "commands": "commands.avsc",
    "device-inbox": "device-inbox.avsc",
    "timers": "timers.avsc",
    "device-logs": "device-logs.avsc",
    "events": "events.avsc",
}

Record = dict[str, Any]
T = TypeVar("T")


@cache
def definition(topic: str) -> Record:
    """The Avro schema of a topic, as JSON."""
    path = SCHEMA_DIR / TOPIC_SCHEMAS[topic]
    value: Record = json.loads(path.read_text())
    return value


class AvroCodec(pulsar.schema.Schema):  # type: ignore[misc]
    """pulsar's AvroSchema, minus its per-message schema parsing (parsed once here)."""

    def __init__(self, topic: str, schema: Record | None = None) -> None:
        """The codec of a topic; `schema` overrides its .avsc (tests of older versions)."""
        self._definition = schema or definition(topic)
        super().__init__(None, _pulsar.SchemaType.AVRO, self._definition, "AVRO")
        self._parsed = fastavro.parse_schema(self._definition)
        self._writers: dict[tuple[str, int], Any] = {}
        self._client: Any = None

    def encode(self, obj: Record) -> bytes:
        buffer = io.BytesIO()
        fastavro.schemaless_writer(buffer, self._parsed, obj)
        return buffer.getvalue()

    def decode(self, data: bytes) -> Record:
        record = fastavro.schemaless_reader(io.BytesIO(data), self._parsed, None)
        return _as_record(record)

    def decode_message(self, msg: Any) -> Record:
        """Decode with the schema version the message was written with (schema evolution)."""
        version = msg.int_schema_version()
        if self._client is None or version < 0:
            return self.decode(msg.data())
        key = (msg.topic_name(), version)
        writer = self._writers.get(key)
        if writer is None:
            info = self._client.get_schema_info(msg.topic_name(), version)
            writer_def = json.loads(info.schema())
            writer = (
                self._parsed
                if writer_def == self._definition
                else fastavro.parse_schema(writer_def)
            )
            self._writers[key] = writer
        record = fastavro.schemaless_reader(
            io.BytesIO(msg.data()), writer, None if writer is self._parsed else self._parsed
        )
        return _as_record(record)


def _as_record(value: object) -> Record:
    if not isinstance(value, dict):
        raise ValueError(f"expected an Avro record, decoded {type(value).__name__}")
    return value


def to_record(obj: Any) -> Record:
    """A flat dataclass as an Avro record dict (tuples become arrays)."""
    return {
        f.name: list(v) if isinstance(v := getattr(obj, f.name), tuple) else v
        for f in dataclasses.fields(obj)
    }


def from_record(cls: type[T], record: Record) -> T:
    """A dataclass from an Avro record dict; arrays become tuples where the field says tuple."""
    values = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name in record:
            v = record[f.name]
            values[f.name] = tuple(v) if isinstance(v, list) else v
    return cls(**values)


def _branch(topic: str, name: str) -> str:
    return f"{definition(topic)['namespace']}.{name}"


def event_to_record(event: Event) -> Record:
    return {
        "event_id": event.event_id,
        "type": event.type,
        "occurred_at_ms": event.occurred_at_ms,
        "seq": event.seq,
        "device_id": event.device_id,
        "task_id": event.task_id,
        "attempt": event.attempt,
        "payload": (_branch("events", event.type), to_record(event.payload)),
    }


def event_from_record(record: Record) -> Event:
    payload_cls = PAYLOAD_TYPES[record["type"]]
    return Event(
        event_id=record["event_id"],
        occurred_at_ms=record["occurred_at_ms"],
        seq=record["seq"],
        device_id=record["device_id"],
        task_id=record["task_id"],
        attempt=record["attempt"],
        payload=from_record(payload_cls, record["payload"]),
    )


def input_to_record(input_id: str, device_id: str, at_ms: int, body: WireInput) -> Record:
    name = type(body).__name__
    return {
        "input_id": input_id,
        "device_id": device_id,
        "at_ms": at_ms,
        "type": name,
        "body": (_branch("device-inbox", name), to_record(body)),
    }


def input_from_record(record: Record) -> tuple[str, WireInput]:
    """(device_id, input) of a device-inbox record."""
    body = from_record(WIRE_INPUT_TYPES[record["type"]], record["body"])
    return record["device_id"], body


def command_branch(name: str) -> str:
    return _branch("commands", name)
