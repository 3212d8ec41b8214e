"""What a device processor reacts to: the records of schemas/device-inbox.avsc, plus the outcome
of its own Central Control call, which never travels over Pulsar."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class TimerKind(StrEnum):
    START_AT = "StartAt"
    RETRY_AT = "RetryAt"
    TIMEOUT_AT = "TimeoutAt"


@dataclass(frozen=True, slots=True)
class Enqueue:
    task_id: str
    script_id: str
    script_version: int
    execute_at_ms: int | None
    max_attempts: int
    timeout_s: int
    priority: int = 0
    params_json: str = "{}"


@dataclass(frozen=True, slots=True)
class TimerFired:
    kind: str
    task_id: str
    attempt: int
    due_at_ms: int


@dataclass(frozen=True, slots=True)
class ResultReported:
    exec_id: str
    level: str
    message: str


@dataclass(frozen=True, slots=True)
class CancelRequested:
    task_id: str
    reason: str = ""


class Delivery(StrEnum):
    """How Central Control answered the POST of an attempt (transient trouble never gets here)."""

    ACCEPTED = "accepted"
    UNKNOWN_DEVICE = "unknown_device"  # 404
    SCRIPT_REFUSED = "script_refused"  # 422
    REFUSED = "refused"  # any other non-transient 4xx


@dataclass(frozen=True, slots=True)
class DeliveryOutcome:
    task_id: str
    attempt: int
    outcome: Delivery
    detail: str = ""


WireInput = Enqueue | TimerFired | ResultReported | CancelRequested
Input = WireInput | DeliveryOutcome

WIRE_INPUT_TYPES: dict[str, type[WireInput]] = {
    cls.__name__: cls for cls in (Enqueue, TimerFired, ResultReported, CancelRequested)
}
