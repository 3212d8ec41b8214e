"""Every reason code the service writes, in one place, so docs and tests can list them."""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    # Rejected: a command refused by the planner
    MALFORMED_COMMAND = "MALFORMED_COMMAND"
    INVALID_COMMAND = "INVALID_COMMAND"
    EMPTY_DEVICE_LIST = "EMPTY_DEVICE_LIST"
    DUPLICATE_DEVICE = "DUPLICATE_DEVICE"
    UNKNOWN_SCRIPT = "UNKNOWN_SCRIPT"
    UNKNOWN_SCRIPT_VERSION = "UNKNOWN_SCRIPT_VERSION"
    TASK_ID_CONFLICT = "TASK_ID_CONFLICT"
    UNKNOWN_TASK = "UNKNOWN_TASK"
    SCHEDULE_TOO_FAR = "SCHEDULE_TOO_FAR"
    NOT_IN_TASK = "NOT_IN_TASK"
    # Failed: an execution that ended without success
    UNKNOWN_DEVICE = "UNKNOWN_DEVICE"
    SCRIPT_REFUSED = "SCRIPT_REFUSED"
    DELIVERY_REFUSED = "DELIVERY_REFUSED"
    SCRIPT_ERROR = "SCRIPT_ERROR"
    SYSTEM_ERROR = "SYSTEM_ERROR"
    TIMED_OUT = "TIMED_OUT"


DESCRIPTIONS: dict[Reason, str] = {
    Reason.MALFORMED_COMMAND: "The message on `commands` could not be decoded with its Avro "
    "schema; it is also copied to commands-DLQ.",
    Reason.INVALID_COMMAND: "A field is out of range or badly formed (the reason names it).",
    Reason.EMPTY_DEVICE_LIST: "CreateTask without any device.",
    Reason.DUPLICATE_DEVICE: "CreateTask names the same device twice.",
    Reason.UNKNOWN_SCRIPT: "CreateTask names a script id that was never registered.",
    Reason.UNKNOWN_SCRIPT_VERSION: "CreateTask names a version the script does not have.",
    Reason.TASK_ID_CONFLICT: "A task with this id was accepted before with different content.",
    Reason.UNKNOWN_TASK: "CancelTask names a task that was never accepted.",
    Reason.SCHEDULE_TOO_FAR: "CreateTask asks for a start more than 366 days ahead.",
    Reason.NOT_IN_TASK: "CancelTask names devices the task does not have.",
    Reason.UNKNOWN_DEVICE: "Central Control answered 404: it does not know the device.",
    Reason.SCRIPT_REFUSED: "Central Control answered 422: it refused the script.",
    Reason.DELIVERY_REFUSED: "Central Control answered another non-transient 4xx.",
    Reason.SCRIPT_ERROR: "The script reported ERROR on its last allowed attempt.",
    Reason.SYSTEM_ERROR: "The device reported SYSTEM_ERROR on the last allowed attempt.",
    Reason.TIMED_OUT: "No result arrived before the deadline of the last allowed attempt.",
}
