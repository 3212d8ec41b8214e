"""Audit: what happened, in order, and what the system believed, straight from the log.

Pure: no Pulsar, no MongoDB, no clock. The shell (`audit_source`, `audit_cli`) reads the
`events` topic and the projections and hands the events here. State is never re-implemented:
device state is `decider.evolve` folded over a device's events, read models are the projector's
own reducers (`projections.reducers.MODELS`) folded over the selected events.

Event time is `occurred_at_ms` (when the decider decided). The log is read in publish order,
which for one device is its `seq` order; that order is kept, never re-sorted by event time.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from rich.table import Table

from eventdispatch import events as ev
from eventdispatch.decider import DeviceState, evolve
from eventdispatch.events import PAYLOAD_TYPES, Event, parse_exec_id
from projections.reducers import MODELS, Doc
from projections.reducers import fold as fold_models

# --- time ------------------------------------------------------------------------------------

TIME_FORMATS = (
    "ISO-8601 with a UTC offset (2026-12-03T18:00:00+01:00 or 2026-12-03T17:00:00.250Z), "
    "a time before now (-30s, -30m, -2h, -1d, -1h30m) or 'now'"
)
_UNITS_MS = {"w": 604_800_000, "d": 86_400_000, "h": 3_600_000, "m": 60_000, "s": 1_000}
_DURATION = re.compile(r"(?:(\d+)w)?(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class TimeFormatError(ValueError):
    """A time or duration the user typed that we cannot read; the message says what we accept."""


def _devices(n: int) -> str:
    return f"{n} device" if n == 1 else f"{n} devices"


def parse_duration_ms(text: str) -> int:
    """'1h30m' -> 5_400_000. Also '0' and '90s'; units w, d, h, m, s, largest first."""
    value = text.strip()
    if value == "0":
        return 0
    match = _DURATION.fullmatch(value)
    if not value or match is None:
        raise TimeFormatError(f"{text!r} is not a duration; use e.g. 30s, 5m, 2h, 1d or 1h30m")
    amounts = [int(g) if g else 0 for g in match.groups()]
    return sum(n * _UNITS_MS[u] for n, u in zip(amounts, "wdhms", strict=True))


def parse_time_ms(text: str, now_ms: int) -> int:
    """An absolute or relative time as epoch milliseconds; relative times count back from now."""
    value = text.strip()
    if value.lower() == "now":
        return now_ms
    if value.startswith("-"):
        try:
            return now_ms - parse_duration_ms(value[1:])
        except TimeFormatError:
            raise TimeFormatError(f"{text!r} is not a time; use {TIME_FORMATS}") from None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise TimeFormatError(f"{text!r} is not a time; use {TIME_FORMATS}") from None
    if parsed.tzinfo is None:
        raise TimeFormatError(
            f"{text!r} has no UTC offset; add one, e.g. {value}+00:00 or {value}Z"
        )
    return (parsed - EPOCH) // timedelta(milliseconds=1)  # exact, unlike timestamp() * 1000


def iso(ms: int | None) -> str:
    """Epoch ms as ISO-8601 UTC with milliseconds: 2026-12-03T17:00:00.250Z."""
    if ms is None:
        return ""
    return (EPOCH + timedelta(milliseconds=ms)).isoformat(timespec="milliseconds")[:-6] + "Z"


def human_ms(ms: int | None) -> str:
    """A duration for people: 12ms, 3.402s, 4m05s, 2h03m, 3d04h."""
    if ms is None:
        return ""
    sign, ms = ("-", -ms) if ms < 0 else ("", ms)
    if ms < 1_000:
        return f"{sign}{ms}ms"
    if ms < 60_000:
        return f"{sign}{ms / 1000:.3f}s"
    s = ms // 1000
    if s < 3600:
        return f"{sign}{s // 60}m{s % 60:02d}s"
    if s < 86_400:
        return f"{sign}{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{sign}{s // 86_400}d{s % 86_400 // 3600:02d}h"


# --- selection -------------------------------------------------------------------------------

EVENT_TYPES = tuple(PAYLOAD_TYPES)


class SelectionError(ValueError):
    """An --exec or --type value we cannot use; the message lists what would work."""


def _split(values: Iterable[str] | None) -> frozenset[str]:
    """Repeated options and comma-separated lists both work: --device a,b --device c."""
    return frozenset(v.strip() for item in values or () for v in item.split(",") if v.strip())


def event_types(values: Iterable[str] | None) -> frozenset[str]:
    """Event type names, matched without regard to case: 'failed' is 'Failed'."""
    by_lower = {t.lower(): t for t in EVENT_TYPES}
    out = set()
    for v in _split(values):
        if v.lower() not in by_lower:
            raise SelectionError(f"unknown event type {v!r}; known: {', '.join(EVENT_TYPES)}")
        out.add(by_lower[v.lower()])
    return frozenset(out)


@dataclass(frozen=True, slots=True)
class Selection:
    """What the user asked for. Criteria of different kinds must all hold (AND); several values
    of one kind are alternatives (OR). The window applies to event time."""

    devices: frozenset[str] = frozenset()
    tasks: frozenset[str] = frozenset()
    exec_ids: frozenset[str] = frozenset()
    types: frozenset[str] = frozenset()
    since_ms: int | None = None
    until_ms: int | None = None

    @classmethod
    def build(
        cls,
        devices: Iterable[str] | None = None,
        tasks: Iterable[str] | None = None,
        exec_ids: Iterable[str] | None = None,
        types: Iterable[str] | None = None,
        since_ms: int | None = None,
        until_ms: int | None = None,
    ) -> Selection:
        execs = _split(exec_ids)
        for x in execs:
            if parse_exec_id(x) is None:
                raise SelectionError(f"--exec {x!r} is not an exec id: TASK:DEVICE:ATTEMPT")
        return cls(_split(devices), _split(tasks), execs, event_types(types), since_ms, until_ms)

    @property
    def executions(self) -> frozenset[tuple[str, str]]:
        """(task, device) of every --exec."""
        return frozenset(p[:2] for x in self.exec_ids if (p := parse_exec_id(x)) is not None)

    @property
    def exec_devices(self) -> frozenset[str]:
        return frozenset(device for _, device in self.executions)

    @property
    def is_everything(self) -> bool:
        return not (self.devices or self.tasks or self.exec_ids)

    def in_window(self, event: Event) -> bool:
        t = event.occurred_at_ms
        return (self.since_ms is None or t >= self.since_ms) and (
            self.until_ms is None or t <= self.until_ms
        )

    def is_subject(self, event: Event, *, whole_executions: bool = False) -> bool:
        """Whether the event is about the selected devices, tasks and attempts. With
        `whole_executions`, an --exec selects every event of its (task, device), which is what
        rebuilding the execution's documents needs."""
        if self.devices and event.device_id not in self.devices:
            return False
        if self.tasks and event.task_id not in self.tasks:
            return False
        if self.exec_ids:
            if whole_executions:
                return (event.task_id, event.device_id) in self.executions
            return event.exec_id in self.exec_ids
        return True

    def matches(self, event: Event) -> bool:
        """The timeline's test: subject, type and window."""
        return (
            (not self.types or event.type in self.types)
            and self.in_window(event)
            and self.is_subject(event)
        )


@dataclass(frozen=True, slots=True)
class Prefilter:
    """A cheap test on a message before it is decoded, which must never reject a match.

    Execution events are keyed by device id, so a device selection is a test on the key alone.
    Avro writes strings as plain UTF-8, so a selected task id, device id or type name must occur
    in the raw bytes of a matching record: a byte search, with false positives left to the exact
    test after decoding.
    """

    keys: frozenset[str] | None = None
    needles: tuple[tuple[bytes, ...], ...] = ()

    def may_match(self, key: str, data: bytes) -> bool:
        return (self.keys is None or key in self.keys) and self.bytes_match(data)

    def bytes_match(self, data: bytes) -> bool:
        return all(any(n in data for n in group) for group in self.needles)


def prefilter(selection: Selection, *, for_timeline: bool, device_history: bool) -> Prefilter:
    """The pre-decode test for a scan.

    `for_timeline` adds the type names. `device_history` (for --at) must let through every
    event of the selected devices, whatever its task, because device state folds all of them;
    without a device to key on that means every message.
    """
    devices = selection.devices or selection.exec_devices
    if device_history:
        return Prefilter(keys=devices or None)
    needles: list[tuple[bytes, ...]] = []
    if selection.tasks:
        needles.append(tuple(t.encode() for t in selection.tasks))
    if selection.exec_ids:
        needles.append(tuple(t.encode() for t, _ in selection.executions))
    if for_timeline and selection.types:
        needles.append(tuple(t.encode() for t in selection.types))
    return Prefilter(keys=devices or None, needles=tuple(needles))


@dataclass(frozen=True, slots=True)
class ScanPlan:
    """Which stretch of the log to read, in publish time: seek to `start_ms` (None: from the
    first message) and stop at the first message published after `stop_ms`."""

    start_ms: int | None
    stop_ms: int


def plan_scan(
    selection: Selection, now_ms: int, slack_ms: int, *, from_start: bool = False
) -> ScanPlan:
    """Publish time follows event time by the time a publish takes (more during a broker
    outage, when stages retry in place) and may lead it by clock skew between hosts; `slack_ms`
    widens the window on both sides for that. Rebuilding state (`from_start`) must read from
    the first event. Nothing published after `now_ms` is read, so a scan of a live log ends."""
    start = None
    if not from_start and selection.since_ms is not None:
        start = max(selection.since_ms - slack_ms, 0)
    stop = now_ms
    if selection.until_ms is not None:
        stop = min(selection.until_ms + slack_ms, now_ms)
    return ScanPlan(start, stop)


# --- timeline --------------------------------------------------------------------------------


def detail(event: Event) -> str:
    """One line saying what the event means, in the words of the lifecycle."""
    p = event.payload
    match p:
        case ev.Created():
            parts = [f"script {p.script_id} v{p.script_version}", f"{p.max_attempts} attempts"]
            parts.append(f"timeout {p.timeout_s}s")
            if p.priority:
                parts.append(f"priority {p.priority}")
            if p.execute_at_ms is not None:
                parts.append(f"execute at {iso(p.execute_at_ms)}")
            return ", ".join(parts)
        case ev.Scheduled():
            return f"starts at {iso(p.execute_at_ms)}"
        case ev.Waiting():
            return "due; waits for the device"
        case ev.Locked():
            return "holds the device"
        case ev.Sent():
            return f"accepted by Central Control; deadline {iso(p.deadline_ms)}"
        case ev.Succeeded():
            return p.message
        case ev.Failed():
            return f"{p.reason_code}: {p.error}"
        case ev.Retrying():
            return f"retry at {iso(p.retry_at_ms)} after: {p.error}"
        case ev.TimedOut():
            return "no result by the deadline"
        case ev.Canceled():
            return p.reason or "canceled"
        case ev.LateResult():
            return f"late {p.level} for {p.exec_id}: {p.message}"
        case ev.TaskAccepted():
            return f"script {p.script_id} v{p.script_version} on {_devices(len(p.devices))}"
        case ev.ScriptRegistered():
            return f"{p.script_id} v{p.version} ({p.language}, sha256 {p.sha256[:12]})"
        case ev.CancelAccepted():
            return f"cancel on {_devices(len(p.devices))}" + (f": {p.reason}" if p.reason else "")
        case ev.Rejected():
            return f"{p.reason_code}: {p.reason}"
    return ""


@dataclass(frozen=True, slots=True)
class Row:
    """One line of the timeline; `gap_ms` is the time since the line before it."""

    event: Event
    gap_ms: int | None

    def as_json(self) -> dict[str, Any]:
        e = self.event
        return {
            "time": iso(e.occurred_at_ms),
            "occurred_at_ms": e.occurred_at_ms,
            "gap_ms": self.gap_ms,
            "device_id": e.device_id,
            "task_id": e.task_id,
            "attempt": e.attempt,
            "exec_id": e.exec_id,
            "type": e.type,
            "seq": e.seq,
            "event_id": e.event_id,
            "detail": detail(e),
            "payload": dataclasses.asdict(e.payload),
        }


def timeline(events: Iterable[Event], selection: Selection) -> list[Row]:
    """The selected events in log order, each with the gap since the previous one."""
    rows: list[Row] = []
    previous: int | None = None
    for e in events:
        if not selection.matches(e):
            continue
        gap = None if previous is None else e.occurred_at_ms - previous
        rows.append(Row(e, gap))
        previous = e.occurred_at_ms
    return rows


TABLE_COLUMNS = ("time", "device", "task", "attempt", "event", "detail", "gap")
CSV_COLUMNS = (
    "time",
    "device_id",
    "task_id",
    "attempt",
    "type",
    "detail",
    "gap_ms",
    "seq",
    "event_id",
)
EVENT_STYLE = {
    "Succeeded": "green",
    "Failed": "bold red",
    "Retrying": "yellow",
    "TimedOut": "magenta",
    "Canceled": "dim",
    "Rejected": "red",
    "LateResult": "dim",
}


def timeline_table(rows: Sequence[Row], title: str = "") -> Table:
    table = Table(title=title or None, title_justify="left")
    for name in TABLE_COLUMNS:
        table.add_column(name, no_wrap=name != "detail", overflow="fold")
    for r in rows:
        e = r.event
        style = EVENT_STYLE.get(e.type, "")
        table.add_row(
            iso(e.occurred_at_ms),
            e.device_id or "",
            e.task_id or "",
            "" if e.attempt is None else str(e.attempt),
            f"[{style}]{e.type}[/]" if style else e.type,
            detail(e),
            "" if r.gap_ms is None else f"+{human_ms(r.gap_ms)}",
        )
    return table


def to_jsonl(items: Iterable[Mapping[str, Any]]) -> str:
    return "".join(json.dumps(i, separators=(",", ":")) + "\n" for i in items)


def to_json(value: Any) -> str:
    return json.dumps(value, indent=2) + "\n"


def timeline_csv(rows: Iterable[Row]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for r in rows:
        j = r.as_json()
        writer.writerow([j["time"] if c == "time" else j[c] for c in CSV_COLUMNS])
    return buffer.getvalue()


# --- state as of a time ----------------------------------------------------------------------


def fold_devices(events: Iterable[Event], devices: Iterable[str]) -> dict[str, DeviceState]:
    """Each device's state from its events, the service's own way: `evolve`, in log order.

    An event whose seq the state has passed is a republished duplicate and is skipped; the
    first copy counts, as it does for the projections."""
    states = {d: DeviceState(d) for d in devices}
    for e in events:
        state = states.get(e.device_id or "")
        if state is not None and e.seq > state.seq:
            states[state.device_id] = evolve(state, e)
    return states


def device_state_json(state: DeviceState) -> dict[str, Any]:
    active = state.active
    return {
        "device_id": state.device_id,
        "seq": state.seq,
        "active": None if active is None else f"{active.task_id}:{active.attempt}",
        "live": [dataclasses.asdict(x) for x in sorted(state.live.values(), key=lambda x: x.order)],
        "ended": dict(state.ended),
    }


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What the system believed at `at_ms`: device states and read-model documents."""

    at_ms: int
    events: int
    devices: dict[str, DeviceState]
    models: dict[str, dict[str, Doc]]

    def as_json(self) -> dict[str, Any]:
        return {
            "at": iso(self.at_ms),
            "at_ms": self.at_ms,
            "events_folded": self.events,
            "device_states": [device_state_json(s) for _, s in sorted(self.devices.items())],
            **{name: [docs[k] for k in sorted(docs)] for name, docs in self.models.items()},
        }


def snapshot(events: Sequence[Event], selection: Selection, at_ms: int) -> Snapshot:
    """State as of `at_ms`: every event that occurred by then, folded.

    Devices are the selected ones (--device, or the devices of --exec); with only --task, the
    devices that task touched by then. Their state, and their `devices` documents, fold all of
    their events, other tasks' too, since what a device does next depends on everything
    queued on it. Executions and attempts fold the selected executions' events."""
    past = [e for e in events if e.occurred_at_ms <= at_ms]
    subject = [e for e in past if selection.is_subject(e, whole_executions=True)]
    devices = selection.devices or selection.exec_devices
    if not devices:
        devices = frozenset(e.device_id for e in subject if e.device_id is not None)
    device_events = [e for e in past if e.device_id in devices]
    names = ["executions", "attempts"]
    if selection.tasks or selection.is_everything:
        names.append("tasks")
    if selection.is_everything:
        names += ["scripts", "rejections"]
    models = fold_models(subject, names)
    if selection.exec_ids:
        models["attempts"] = {
            k: v for k, v in models["attempts"].items() if k in selection.exec_ids
        }
    models["devices"] = fold_models(device_events, ["devices"])["devices"]
    return Snapshot(at_ms, len(subject), fold_devices(device_events, devices), models)


def snapshot_table(snap: Snapshot) -> list[Table]:
    """Device states, then executions and attempts, as tables."""
    title = "device states (the decider's, folded with evolve)"
    devices = Table("device", "seq", "active attempt", "live executions", "ended", title=title)
    for d, s in sorted(snap.devices.items()):
        live = ", ".join(
            f"{x.task_id} {x.status}" + (f" #{x.attempt}" if x.attempt else "")
            for x in sorted(s.live.values(), key=lambda x: x.order)
        )
        ended = ", ".join(f"{t} {kind}" for t, kind in s.ended.items())
        active = s.active
        devices.add_row(
            d,
            str(s.seq),
            "" if active is None else f"{active.task_id} #{active.attempt}",
            live,
            ended,
        )
    executions = Table(
        "task", "device", "state", "attempt", "reason", "updated", title="executions"
    )
    for _, doc in sorted(snap.models.get("executions", {}).items()):
        executions.add_row(
            str(doc["task_id"]),
            str(doc["device_id"]),
            str(doc["state"]),
            str(doc["attempt"]),
            " ".join(str(doc[k]) for k in ("reason_code", "error") if doc.get(k)),
            iso(doc.get("updated_at_ms")),
        )
    attempts = Table("exec id", "state", "locked", "sent", "ended", "outcome", title="attempts")
    for key, doc in sorted(snap.models.get("attempts", {}).items()):
        outcome = str(doc.get("outcome") or "") + (" (timed out)" if doc.get("timed_out") else "")
        attempts.add_row(
            key,
            str(doc["state"]),
            iso(doc.get("locked_at_ms")),
            iso(doc.get("sent_at_ms")),
            iso(doc.get("ended_at_ms")),
            outcome,
        )
    return [devices, executions, attempts]


# --- diff against the projections -----------------------------------------------------------


def diff_models(selection: Selection) -> tuple[str, ...]:
    """The read models a diff can compare for this selection: only documents whose every
    event the selection holds. A `devices` document folds all of a device's tasks, a `tasks`
    document is about no device, scripts and rejections are about no task."""
    if selection.is_everything:
        return tuple(m.name for m in MODELS)
    only_devices = selection.devices and not (selection.tasks or selection.exec_ids)
    only_tasks = selection.tasks and not (selection.devices or selection.exec_ids)
    extra = ("devices",) if only_devices else ("tasks",) if only_tasks else ()
    return ("executions", "attempts", *extra)


def rebuild(events: Iterable[Event], selection: Selection) -> dict[str, dict[str, Doc]]:
    """The read models the selection is about, rebuilt from the whole log (for --diff)."""
    subject = (e for e in events if selection.is_subject(e, whole_executions=True))
    return fold_models(subject, diff_models(selection))


def projection_query(selection: Selection, model: str) -> dict[str, Any]:
    """The MongoDB filter for the documents of `model` the selection is about, so documents
    the projections have and the log does not show up too."""
    if model == "tasks":
        return {"_id": {"$in": sorted(selection.tasks)}} if selection.tasks else {}
    if model == "devices":
        return {"_id": {"$in": sorted(selection.devices)}} if selection.devices else {}
    clauses: list[dict[str, Any]] = []
    if selection.devices:
        clauses.append({"device_id": {"$in": sorted(selection.devices)}})
    if selection.tasks:
        clauses.append({"task_id": {"$in": sorted(selection.tasks)}})
    if selection.exec_ids:
        pairs = sorted(selection.executions)
        clauses.append({"$or": [{"task_id": t, "device_id": d} for t, d in pairs]})
    if not clauses:
        return {}
    return clauses[0] if len(clauses) == 1 else {"$and": clauses}


@dataclass(frozen=True, slots=True)
class Difference:
    """One document on which the log and the projections disagree."""

    model: str
    key: str
    kind: str  # "missing" (not projected), "extra" (not in the log) or "different"
    fields: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # field: (log, projection)

    def as_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "id": self.key,
            "kind": self.kind,
            "fields": {k: {"log": a, "projection": b} for k, a, b in self._items()},
        }

    def _items(self) -> list[tuple[str, Any, Any]]:
        return [(k, a, b) for k, (a, b) in sorted(self.fields.items())]

    def rows(self) -> list[tuple[str, str, str, str, str, str]]:
        if not self.fields:
            return [(self.model, self.key, self.kind, "", "", "")]
        return [(self.model, self.key, self.kind, k, repr(a), repr(b)) for k, a, b in self._items()]


_ABSENT = "<absent>"


def compare(
    rebuilt: Mapping[str, Mapping[str, Doc]], projected: Mapping[str, Mapping[str, Doc]]
) -> list[Difference]:
    """Document by document, field by field: what the log says against what MongoDB says."""
    out: list[Difference] = []
    for model in sorted(set(rebuilt) | set(projected)):
        ours, theirs = rebuilt.get(model, {}), projected.get(model, {})
        for key in sorted(set(ours) | set(theirs)):
            a, b = ours.get(key), theirs.get(key)
            if b is None:
                out.append(Difference(model, key, "missing"))
            elif a is None:
                out.append(Difference(model, key, "extra"))
            elif a != b:
                fields = {
                    f: (a.get(f, _ABSENT), b.get(f, _ABSENT))
                    for f in sorted(set(a) | set(b))
                    if a.get(f, _ABSENT) != b.get(f, _ABSENT)
                }
                out.append(Difference(model, key, "different", fields))
    return out


def diff_table(differences: Sequence[Difference]) -> Table:
    table = Table("model", "id", "kind", "field", "log", "projection", title="differences")
    for d in differences:
        for row in d.rows():
            table.add_row(*row)
    return table


# --- statistics ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Percentiles:
    n: int
    p50: int
    p90: int
    p95: int
    p99: int
    max: int
    mean: float

    @classmethod
    def of(cls, values: Sequence[int]) -> Percentiles | None:
        """Nearest-rank percentiles: each one is a value that was observed."""
        if not values:
            return None
        s = sorted(values)

        def rank(p: float) -> int:
            return s[max(math.ceil(p / 100 * len(s)) - 1, 0)]

        return cls(len(s), rank(50), rank(90), rank(95), rank(99), s[-1], sum(s) / len(s))


@dataclass(frozen=True, slots=True)
class Failures:
    """Attempts that ended badly (Retrying or Failed), executions that failed for good, and
    how many attempts timed out, for one device or script."""

    name: str
    failed_attempts: int = 0
    failed_executions: int = 0
    timeouts: int = 0


LATENCIES = (
    ("wait", "Created→Locked (wait: from due to holding the device)"),
    ("delivery", "Locked→Sent (delivery to Central Control)"),
    ("run", "Sent→result (Succeeded, Failed, Retrying or TimedOut)"),
)


@dataclass(frozen=True, slots=True)
class Stats:
    events: int
    first_ms: int | None
    last_ms: int | None
    by_type: dict[str, int]
    devices: int
    tasks: int
    failing_devices: list[Failures]
    failing_scripts: list[Failures]
    latencies: dict[str, Percentiles | None]

    def as_json(self) -> dict[str, Any]:
        return {
            "events": self.events,
            "first": iso(self.first_ms),
            "last": iso(self.last_ms),
            "by_type": self.by_type,
            "devices": self.devices,
            "tasks": self.tasks,
            "failing_devices": [dataclasses.asdict(f) for f in self.failing_devices],
            "failing_scripts": [dataclasses.asdict(f) for f in self.failing_scripts],
            "latencies_ms": {
                k: None if v is None else dataclasses.asdict(v) for k, v in self.latencies.items()
            },
        }


def _top(counts: Mapping[str, Counter[str]], limit: int) -> list[Failures]:
    items = [
        Failures(name, c["failed_attempts"], c["failed_executions"], c["timeouts"])
        for name, c in counts.items()
        if c["failed_attempts"] or c["failed_executions"]
    ]
    items.sort(key=lambda f: (-f.failed_attempts, -f.failed_executions, f.name))
    return items[:limit]


def stats(events: Sequence[Event], top: int = 10) -> Stats:
    """Counts, what fails most and latency distributions for these (already selected) events.

    Latencies pair events of one attempt seen in the window; a pair cut by the window's edge is
    left out rather than guessed. The wait is counted from Created, or from Waiting when the
    execution was scheduled or retried (when it became due), to Locked."""
    by_type = Counter(e.type for e in events)
    scripts: dict[str, str] = {}  # task -> script, from TaskAccepted or Created
    per_device: dict[str, Counter[str]] = defaultdict(Counter)
    per_script: dict[str, Counter[str]] = defaultdict(Counter)
    due: dict[tuple[str | None, str | None], int] = {}
    locked: dict[str, int] = {}
    sent: dict[str, int] = {}
    lat: dict[str, list[int]] = {"wait": [], "delivery": [], "run": []}
    for e in events:
        p, t, x = e.payload, e.occurred_at_ms, e.exec_id
        execution = (e.task_id, e.device_id)
        if isinstance(p, ev.TaskAccepted | ev.Created) and e.task_id:
            scripts.setdefault(e.task_id, p.script_id)
        if isinstance(p, ev.Created | ev.Waiting):
            due[execution] = t
        elif isinstance(p, ev.Scheduled):
            due.pop(execution, None)
        elif isinstance(p, ev.Locked) and x:
            if execution in due:
                lat["wait"].append(t - due.pop(execution))
            locked[x] = t
        elif isinstance(p, ev.Sent) and x:
            if x in locked:
                lat["delivery"].append(t - locked.pop(x))
            sent[x] = t
        elif isinstance(p, ev.Succeeded | ev.Failed | ev.Retrying | ev.TimedOut) and x in sent:
            lat["run"].append(t - sent.pop(x))
        if isinstance(p, ev.Canceled | ev.Succeeded | ev.Failed | ev.Retrying) and x:
            locked.pop(x, None)
            sent.pop(x, None)
        if e.device_id is None:
            continue
        kinds = []
        if isinstance(p, ev.Failed | ev.Retrying):
            kinds.append("failed_attempts")
        if isinstance(p, ev.Failed):
            kinds.append("failed_executions")
        if isinstance(p, ev.TimedOut):
            kinds.append("timeouts")
        script = scripts.get(e.task_id or "", "(unknown: created before the window)")
        for k in kinds:
            per_device[e.device_id][k] += 1
            per_script[script][k] += 1
    times = [e.occurred_at_ms for e in events]
    return Stats(
        events=len(events),
        first_ms=min(times, default=None),
        last_ms=max(times, default=None),
        by_type=dict(sorted(by_type.items(), key=lambda kv: (-kv[1], kv[0]))),
        devices=len({e.device_id for e in events if e.device_id}),
        tasks=len({e.task_id for e in events if e.task_id}),
        failing_devices=_top(per_device, top),
        failing_scripts=_top(per_script, top),
        latencies={k: Percentiles.of(v) for k, v in lat.items()},
    )


def stats_tables(s: Stats) -> list[Table]:
    summary = Table("events", "devices", "tasks", "first", "last", title="window")
    summary.add_row(str(s.events), str(s.devices), str(s.tasks), iso(s.first_ms), iso(s.last_ms))
    types = Table("event", "count", title="events per type")
    for name, n in s.by_type.items():
        types.add_row(name, str(n))
    tables = [summary, types]
    for title, rows in (
        ("devices that fail most", s.failing_devices),
        ("scripts that fail most", s.failing_scripts),
    ):
        t = Table("name", "failed attempts", "failed executions", "timeouts", title=title)
        for f in rows:
            t.add_row(f.name, str(f.failed_attempts), str(f.failed_executions), str(f.timeouts))
        tables.append(t)
    lat = Table("latency", "n", "p50", "p90", "p95", "p99", "max", title="latencies")
    for key, label in LATENCIES:
        p = s.latencies.get(key)
        if p is None:
            lat.add_row(label, "0", "", "", "", "", "")
        else:
            values = (p.p50, p.p90, p.p95, p.p99, p.max)
            lat.add_row(label, str(p.n), *(human_ms(v) for v in values))
    tables.append(lat)
    return tables


# --- device occupancy (the report's chart) ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class Span:
    """One attempt holding its device, from Locked to its end (or to the window's end)."""

    device_id: str
    exec_id: str
    start_ms: int
    end_ms: int
    outcome: str  # succeeded, failed, retried, timed out, canceled, open


def occupancy(events: Iterable[Event], end_ms: int) -> list[Span]:
    """Spans from each Locked to the event that ended that attempt; attempts still holding
    their device at the end are 'open' up to `end_ms`."""
    open_: dict[str, tuple[str, int, bool]] = {}  # exec_id -> (device, start, timed out)
    spans: list[Span] = []
    for e in events:
        x, p = e.exec_id, e.payload
        if x is None or e.device_id is None:
            continue
        if isinstance(p, ev.Locked):
            open_[x] = (e.device_id, e.occurred_at_ms, False)
        elif x in open_ and isinstance(p, ev.TimedOut):
            device, start, _ = open_[x]
            open_[x] = (device, start, True)
        elif x in open_ and isinstance(p, ev.Succeeded | ev.Failed | ev.Retrying | ev.Canceled):
            device, start, timed_out = open_.pop(x)
            outcome = {
                "Succeeded": "succeeded",
                "Failed": "timed out" if timed_out else "failed",
                "Retrying": "timed out" if timed_out else "retried",
                "Canceled": "canceled",
            }[e.type]
            spans.append(Span(device, x, start, e.occurred_at_ms, outcome))
    for x, (device, start, _) in open_.items():
        spans.append(Span(device, x, start, max(end_ms, start), "open"))
    return sorted(spans, key=lambda s: (s.device_id, s.start_ms))
