"""The events of the log: one frozen dataclass per Avro payload record in schemas/events.avsc.

The envelope (`Event`) carries what every consumer filters on (device, task, attempt, seq);
payloads carry only what is particular to their type. Class names equal Avro record names, so
the codec in `wire.py` maps them both ways without a table.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Created:
    script_id: str
    script_version: int
    execute_at_ms: int | None
    max_attempts: int
    timeout_s: int
    priority: int
    params_json: str = "{}"


@dataclass(frozen=True, slots=True)
class Scheduled:
    execute_at_ms: int


@dataclass(frozen=True, slots=True)
class Waiting:
    """A scheduled or retrying execution became due and waits for its device."""


@dataclass(frozen=True, slots=True)
class Locked:
    """The device is now this attempt's; nothing else runs on it until the attempt ends."""


@dataclass(frozen=True, slots=True)
class Sent:
    deadline_ms: int


@dataclass(frozen=True, slots=True)
class Succeeded:
    message: str


@dataclass(frozen=True, slots=True)
class Failed:
    reason_code: str
    error: str


@dataclass(frozen=True, slots=True)
class Retrying:
    retry_at_ms: int
    error: str


@dataclass(frozen=True, slots=True)
class TimedOut:
    pass


@dataclass(frozen=True, slots=True)
class Canceled:
    reason: str


@dataclass(frozen=True, slots=True)
class LateResult:
    """A result for an attempt that had already ended: recorded for the audit, changes nothing."""

    exec_id: str
    level: str
    message: str


@dataclass(frozen=True, slots=True)
class TaskAccepted:
    command_id: str
    script_id: str
    script_version: int
    devices: tuple[str, ...]
    execute_at_ms: int | None
    max_attempts: int
    timeout_s: int
    priority: int
    params_json: str
    fingerprint: str


@dataclass(frozen=True, slots=True)
class ScriptRegistered:
    command_id: str
    script_id: str
    version: int
    language: str
    content: str
    sha256: str


@dataclass(frozen=True, slots=True)
class CancelAccepted:
    command_id: str
    devices: tuple[str, ...]
    reason: str


@dataclass(frozen=True, slots=True)
class Rejected:
    command_id: str
    subject: str
    reason_code: str
    reason: str


Payload = (
    Created
    | Scheduled
    | Waiting
    | Locked
    | Sent
    | Succeeded
    | Failed
    | Retrying
    | TimedOut
    | Canceled
    | LateResult
    | TaskAccepted
    | ScriptRegistered
    | CancelAccepted
    | Rejected
)

PAYLOAD_TYPES: dict[str, type[Payload]] = {
    cls.__name__: cls
    for cls in (
        Created,
        Scheduled,
        Waiting,
        Locked,
        Sent,
        Succeeded,
        Failed,
        Retrying,
        TimedOut,
        Canceled,
        LateResult,
        TaskAccepted,
        ScriptRegistered,
        CancelAccepted,
        Rejected,
    )
}

TERMINAL_TYPES = frozenset({"Succeeded", "Failed", "Canceled"})
"""Event types that end an execution (I2: exactly one of them per task and device)."""

ATTEMPT_END_TYPES = frozenset({"Succeeded", "Failed", "Retrying", "Canceled"})
"""Event types that end the attempt holding the device (TimedOut is always followed by one)."""


@dataclass(frozen=True, slots=True)
class Event:
    """One entry of the log. `seq` orders a device's execution events; 0 elsewhere."""

    event_id: str
    occurred_at_ms: int
    seq: int
    device_id: str | None
    task_id: str | None
    attempt: int | None
    payload: Payload

    @property
    def type(self) -> str:
        return type(self.payload).__name__

    @property
    def exec_id(self) -> str | None:
        if self.task_id is None or self.device_id is None or self.attempt is None:
            return None
        return exec_id(self.task_id, self.device_id, self.attempt)


def exec_id(task_id: str, device_id: str, attempt: int) -> str:
    """The idempotency key toward Central Control: one per attempt."""
    return f"{task_id}:{device_id}:{attempt}"


def parse_exec_id(value: str) -> tuple[str, str, int] | None:
    """Split an exec_id into (task_id, device_id, attempt); None if it is not one of ours.

    Ids may contain ':' themselves, so the attempt is the last part and the device id is
    recovered from the right; task ids are the rest. Callers that know the device id should
    prefer `parse_exec_id_for_device`.
    """
    task_and_device, sep, attempt = value.rpartition(":")
    if not sep or not attempt.isdigit():
        return None
    task_id, sep, device_id = task_and_device.rpartition(":")
    if not sep or not task_id or not device_id:
        return None
    return task_id, device_id, int(attempt)


def parse_exec_id_for_device(value: str, device_id: str) -> tuple[str, int] | None:
    """(task_id, attempt) of an exec_id known to belong to `device_id`."""
    head, sep, attempt = value.rpartition(":")
    suffix = f":{device_id}"
    if not sep or not attempt.isdigit() or not head.endswith(suffix):
        return None
    task_id = head[: -len(suffix)]
    return (task_id, int(attempt)) if task_id else None
