"""Pure reducers: one per read model, `reduce(doc, event) -> doc`.

Each model says which document an event touches (`key`) and how the event changes it. A reducer
returns the document unchanged for an event it has already applied: execution events carry the
device's `seq`, and a document remembers the last seq it took; task- and script-level documents
are written once. That makes replays, redeliveries and rebuilds harmless (I5).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from eventdispatch import events as ev
from eventdispatch.events import Event

Doc = dict[str, Any]

EXECUTION_STATE = {
    "Scheduled": "scheduled",
    "Waiting": "waiting",
    "Locked": "locked",
    "Sent": "sent",
    "Retrying": "retrying",
    "Succeeded": "succeeded",
    "Failed": "failed",
    "Canceled": "canceled",
}
TERMINAL_STATES = ("succeeded", "failed", "canceled")


def _applied(doc: Doc | None, event: Event) -> bool:
    return doc is not None and event.seq <= doc.get("seq", 0)


def execution_key(event: Event) -> str | None:
    if event.device_id is None or event.task_id is None:
        return None
    return f"{event.task_id}:{event.device_id}"


def reduce_execution(doc: Doc | None, event: Event) -> Doc | None:
    """executions: one document per (task, device), its current state."""
    if _applied(doc, event):
        return doc
    p = event.payload
    if isinstance(p, ev.Created):
        doc = {
            "_id": execution_key(event),
            "task_id": event.task_id,
            "device_id": event.device_id,
            "script_id": p.script_id,
            "script_version": p.script_version,
            "state": "waiting",
            "attempt": 0,
            "max_attempts": p.max_attempts,
            "timeout_s": p.timeout_s,
            "priority": p.priority,
            "execute_at_ms": p.execute_at_ms,
            "created_at_ms": event.occurred_at_ms,
            "ended_at_ms": None,
            "reason_code": None,
            "error": None,
        }
    elif doc is None:
        return None  # no execution without its Created event
    else:
        doc = dict(doc)
        state = EXECUTION_STATE.get(event.type)
        if state is not None:
            doc["state"] = state
        if isinstance(p, ev.Locked):
            doc["attempt"] = event.attempt
        elif isinstance(p, ev.Failed):
            doc.update(reason_code=p.reason_code, error=p.error)
        elif isinstance(p, ev.Retrying):
            doc.update(error=p.error, retry_at_ms=p.retry_at_ms)
        elif isinstance(p, ev.Canceled):
            doc.update(reason_code="CANCELED", error=p.reason or None)
        if state in TERMINAL_STATES:
            doc["ended_at_ms"] = event.occurred_at_ms
    doc["seq"] = event.seq
    doc["updated_at_ms"] = event.occurred_at_ms
    return doc


def attempt_key(event: Event) -> str | None:
    return event.exec_id if event.device_id is not None else None


ATTEMPT_OUTCOME = {
    "Succeeded": "succeeded",
    "Failed": "failed",
    "Retrying": "failed",
    "Canceled": "canceled",
}


def reduce_attempt(doc: Doc | None, event: Event) -> Doc | None:
    """attempts: one document per attempt (exec_id): when it ran and how it ended."""
    if _applied(doc, event):
        return doc
    p = event.payload
    if isinstance(p, ev.Locked):
        doc = {
            "_id": event.exec_id,
            "task_id": event.task_id,
            "device_id": event.device_id,
            "attempt": event.attempt,
            "state": "locked",
            "locked_at_ms": event.occurred_at_ms,
            "sent_at_ms": None,
            "ended_at_ms": None,
            "outcome": None,
            "error": None,
            "timed_out": False,
            "late_results": 0,
        }
    elif doc is None:
        return None
    else:
        doc = dict(doc)
        if isinstance(p, ev.Sent):
            doc.update(state="sent", sent_at_ms=event.occurred_at_ms, deadline_ms=p.deadline_ms)
        elif isinstance(p, ev.TimedOut):
            doc.update(timed_out=True)
        elif isinstance(p, ev.LateResult):
            doc["late_results"] = doc.get("late_results", 0) + 1
        elif event.type in ATTEMPT_OUTCOME:
            doc.update(
                state="ended", outcome=ATTEMPT_OUTCOME[event.type], ended_at_ms=event.occurred_at_ms
            )
            if isinstance(p, ev.Failed | ev.Retrying):
                doc["error"] = p.error
            if isinstance(p, ev.Succeeded):
                doc["message"] = p.message
    doc["seq"] = event.seq
    return doc


def device_key(event: Event) -> str | None:
    return event.device_id if event.device_id is not None and event.task_id is not None else None


ACTIVE_STATES = ("locked", "sent")


def reduce_device(doc: Doc | None, event: Event) -> Doc | None:
    """devices: what each device is doing now and how much waits for it. Live executions are
    a list of pairs, not a map: task ids may hold '.', which field names may not."""
    if _applied(doc, event):
        return doc
    if doc is None:
        doc = {"_id": event.device_id, "live": [], "last_outcome": None}
    live = [pair for pair in doc["live"] if pair["task_id"] != event.task_id]
    last_outcome = doc["last_outcome"]
    state = EXECUTION_STATE.get(event.type, "waiting" if event.type == "Created" else None)
    if state in TERMINAL_STATES:
        last_outcome = {"task_id": event.task_id, "state": state, "at_ms": event.occurred_at_ms}
    elif state is None:  # TimedOut, LateResult: the execution keeps its state
        live = doc["live"]
    else:
        live.append({"task_id": event.task_id, "state": state})
    current = next((p for p in live if p["state"] in ACTIVE_STATES), None)
    return {
        "_id": event.device_id,
        "live": live,
        "current_task": current["task_id"] if current else None,
        "busy": current is not None,
        "queued": sum(1 for p in live if p["state"] not in ACTIVE_STATES),
        "last_outcome": last_outcome,
        "seq": event.seq,
        "updated_at_ms": event.occurred_at_ms,
    }


def task_key(event: Event) -> str | None:
    is_task_event = isinstance(event.payload, ev.TaskAccepted | ev.CancelAccepted)
    return event.task_id if is_task_event else None


def reduce_task(doc: Doc | None, event: Event) -> Doc | None:
    """tasks: what was accepted. Counts per state are not stored: they are read from
    executions, so they can never disagree with them."""
    p = event.payload
    if isinstance(p, ev.TaskAccepted):
        if doc is not None:
            return doc
        return {
            "_id": event.task_id,
            "command_id": p.command_id,
            "script_id": p.script_id,
            "script_version": p.script_version,
            "device_count": len(p.devices),
            "execute_at_ms": p.execute_at_ms,
            "max_attempts": p.max_attempts,
            "timeout_s": p.timeout_s,
            "priority": p.priority,
            "params_json": p.params_json,
            "fingerprint": p.fingerprint,
            "accepted_at_ms": event.occurred_at_ms,
            "cancel_requests": [],
        }
    if isinstance(p, ev.CancelAccepted) and doc is not None:
        if p.command_id in doc["cancel_requests"]:
            return doc
        return {**doc, "cancel_requests": [*doc["cancel_requests"], p.command_id]}
    return doc


def script_key(event: Event) -> str | None:
    p = event.payload
    return f"{p.script_id}:{p.version}" if isinstance(p, ev.ScriptRegistered) else None


def reduce_script(doc: Doc | None, event: Event) -> Doc | None:
    """scripts: one document per script version."""
    p = event.payload
    if doc is not None or not isinstance(p, ev.ScriptRegistered):
        return doc
    return {
        "_id": f"{p.script_id}:{p.version}",
        "script_id": p.script_id,
        "version": p.version,
        "language": p.language,
        "sha256": p.sha256,
        "content": p.content,
        "registered_at_ms": event.occurred_at_ms,
    }


def rejection_key(event: Event) -> str | None:
    p = event.payload
    return p.command_id if isinstance(p, ev.Rejected) else None


def reduce_rejection(doc: Doc | None, event: Event) -> Doc | None:
    """rejections: every refused command, by command id, so a producer can learn why."""
    p = event.payload
    if doc is not None or not isinstance(p, ev.Rejected):
        return doc
    return {
        "_id": p.command_id,
        "subject": p.subject,
        "reason_code": p.reason_code,
        "reason": p.reason,
        "at_ms": event.occurred_at_ms,
    }


@dataclass(frozen=True, slots=True)
class Model:
    name: str
    key: Callable[[Event], str | None]
    reduce: Callable[[Doc | None, Event], Doc | None]


MODELS = (
    Model("executions", execution_key, reduce_execution),
    Model("attempts", attempt_key, reduce_attempt),
    Model("devices", device_key, reduce_device),
    Model("tasks", task_key, reduce_task),
    Model("scripts", script_key, reduce_script),
    Model("rejections", rejection_key, reduce_rejection),
)


def fold(events: Iterable[Event], names: Iterable[str] | None = None) -> dict[str, dict[str, Doc]]:
    """The documents of the read models (all, or `names`) that these events make, in memory:
    what the projector would write, for audits and tests."""
    wanted = set(names) if names is not None else {m.name for m in MODELS}
    models = [m for m in MODELS if m.name in wanted]
    out: dict[str, dict[str, Doc]] = {m.name: {} for m in models}
    for e in events:
        for m in models:
            key = m.key(e)
            if key is None:
                continue
            doc = m.reduce(out[m.name].get(key), e)
            if doc is not None:
                out[m.name][key] = doc
    return out


def log_doc(line: dict[str, Any]) -> Doc:
    """logs: one document per log line, with its attempt split out of the exec_id."""
    parsed = ev.parse_exec_id_for_device(str(line["exec_id"]), str(line["device_id"]))
    task_id, attempt = parsed if parsed else (None, None)
    return {
        "_id": line["log_id"],
        "exec_id": line["exec_id"],
        "task_id": task_id,
        "device_id": line["device_id"],
        "attempt": attempt,
        "level": line["level"],
        "message": line["message"],
        "ts_ms": line["ts_ms"],
    }
