"""Producer commands and their validation (pure). The client validates before publishing so a
user hears about a mistake at once; the planner validates again, because not every producer
uses our client, and turns every refusal into a Rejected event with a reason code."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from eventdispatch.reasons import Reason

ID_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"
MAX_DEVICES = 100_000
MAX_SCRIPT_BYTES = 1024 * 1024
MAX_PARAMS_BYTES = 64 * 1024
MAX_EXECUTE_AHEAD_MS = 366 * 24 * 3600 * 1000

Id = Annotated[str, Field(pattern=ID_PATTERN)]


class _Command(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class RegisterScript(_Command):
    type: Literal["RegisterScript"] = "RegisterScript"
    script_id: Id
    language: Literal["sh", "bash", "python", "powershell"] = "sh"
    content: str = Field(min_length=1)

    @field_validator("content")
    @classmethod
    def _size(cls, v: str) -> str:
        if len(v.encode()) > MAX_SCRIPT_BYTES:
            raise ValueError(f"script content is larger than {MAX_SCRIPT_BYTES} bytes")
        return v


class CreateTask(_Command):
    type: Literal["CreateTask"] = "CreateTask"
    task_id: Id
    script_id: Id
    script_version: int | None = Field(default=None, ge=1)
    devices: list[Id] = Field(max_length=MAX_DEVICES)
    execute_at_ms: int | None = Field(default=None, ge=0)
    max_attempts: int = Field(default=3, ge=1, le=20)
    timeout_s: int = Field(default=600, ge=1, le=86_400)
    priority: int = Field(default=0, ge=0, le=9)
    params_json: str = "{}"

    @field_validator("devices")
    @classmethod
    def _devices(cls, v: list[str]) -> list[str]:
        if not v:
            raise PydanticCustomError("empty_device_list", "the task names no device")
        if len(set(v)) != len(v):
            seen: set[str] = set()
            dup = next(d for d in v if d in seen or seen.add(d))  # type: ignore[func-returns-value]
            raise PydanticCustomError(
                "duplicate_device", "device {device} is listed twice", {"device": dup}
            )
        return v

    @field_validator("params_json")
    @classmethod
    def _params(cls, v: str) -> str:
        if len(v.encode()) > MAX_PARAMS_BYTES:
            raise ValueError(f"params are larger than {MAX_PARAMS_BYTES} bytes")
        try:
            parsed = json.loads(v)
        except json.JSONDecodeError as e:
            raise ValueError(f"params are not JSON: {e}") from e
        if not isinstance(parsed, dict):
            raise ValueError("params must be a JSON object")
        return v

    def fingerprint(self) -> str:
        """Identifies the task's content: the same task_id with another fingerprint conflicts."""
        canonical = json.dumps(self.model_dump(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


class CancelTask(_Command):
    type: Literal["CancelTask"] = "CancelTask"
    task_id: Id
    devices: list[Id] | None = Field(default=None, min_length=1, max_length=MAX_DEVICES)
    reason: str = Field(default="", max_length=1024)


Command = RegisterScript | CreateTask | CancelTask
COMMAND_TYPES: dict[str, type[Command]] = {
    "RegisterScript": RegisterScript,
    "CreateTask": CreateTask,
    "CancelTask": CancelTask,
}


@dataclass(frozen=True, slots=True)
class Refusal:
    code: Reason
    reason: str


_ERROR_CODES = {
    "empty_device_list": Reason.EMPTY_DEVICE_LIST,
    "duplicate_device": Reason.DUPLICATE_DEVICE,
}


def parse(type_name: str, body: dict[str, Any]) -> Command | Refusal:
    """Validate a command body; a Refusal names the first problem and what to fix."""
    model = COMMAND_TYPES.get(type_name)
    if model is None:
        return Refusal(Reason.MALFORMED_COMMAND, f"unknown command type {type_name!r}")
    try:
        return model.model_validate({**body, "type": type_name})
    except ValidationError as e:
        return refusal_from(e)


def refusal_from(error: ValidationError) -> Refusal:
    first = error.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or "command"
    code = _ERROR_CODES.get(first["type"], Reason.INVALID_COMMAND)
    return Refusal(code, f"{field}: {first['msg']}")


def check_schedule(cmd: CreateTask, now_ms: int) -> Refusal | None:
    """A start more than 366 days ahead is refused; one in the past simply starts now."""
    if cmd.execute_at_ms is not None and cmd.execute_at_ms > now_ms + MAX_EXECUTE_AHEAD_MS:
        return Refusal(
            Reason.SCHEDULE_TOO_FAR,
            "execute_at is more than 366 days ahead; schedule it closer, or later",
        )
    return None


def subject_of(type_name: str, body: dict[str, Any]) -> str:
    """The id a command is about (its Pulsar key), even when the command is invalid."""
    value = body.get("script_id" if type_name == "RegisterScript" else "task_id")
    return str(value) if value else "?"
