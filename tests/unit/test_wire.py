"""Every event and input survives the Avro round trip through the registered schemas."""

from __future__ import annotations

import dataclasses
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from eventdispatch import wire
from eventdispatch.events import PAYLOAD_TYPES, Event
from eventdispatch.inputs import WIRE_INPUT_TYPES

ids = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-:.", min_size=1, max_size=20)
ints = st.integers(0, 2**31 - 1)


def build(cls: type) -> st.SearchStrategy[Any]:
    strategies: dict[str, st.SearchStrategy[Any]] = {}
    for f in dataclasses.fields(cls):
        t = str(f.type)
        if "tuple" in t:
            strategies[f.name] = st.lists(ids, max_size=5).map(tuple)
        elif "int | None" in t:
            strategies[f.name] = st.none() | ints
        elif "int" in t:
            strategies[f.name] = ints
        else:
            strategies[f.name] = st.text(max_size=30)
    return st.builds(cls, **strategies)


payloads = st.one_of(*(build(cls) for cls in PAYLOAD_TYPES.values()))
events = st.builds(
    Event,
    event_id=ids,
    occurred_at_ms=ints,
    seq=ints,
    device_id=st.none() | ids,
    task_id=st.none() | ids,
    attempt=st.none() | st.integers(1, 20),
    payload=payloads,
)


@given(events)
def test_events_round_trip(event: Event) -> None:
    codec = wire.AvroCodec("events")
    assert wire.event_from_record(codec.decode(codec.encode(wire.event_to_record(event)))) == event


@given(ids, ids, ints, st.one_of(*(build(cls) for cls in WIRE_INPUT_TYPES.values())))
def test_inputs_round_trip(input_id: str, device: str, at: int, body: Any) -> None:
    codec = wire.AvroCodec("device-inbox")
    record = codec.decode(codec.encode(wire.input_to_record(input_id, device, at, body)))
    assert wire.input_from_record(record) == (device, body)


def test_every_payload_type_is_in_the_schema() -> None:
    union = wire.definition("events")["fields"][-1]["type"]
    assert {r["name"] for r in union} == set(PAYLOAD_TYPES)
