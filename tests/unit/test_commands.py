"""Command validation: every refusal has a reason code and says what to fix."""

from __future__ import annotations

from typing import Any

import pytest

from eventdispatch.commands import CreateTask, Refusal, RegisterScript, parse
from eventdispatch.reasons import Reason


def task(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"task_id": "t-1", "script_id": "s", "devices": ["a", "b"]}
    body.update(overrides)
    return body


def refusal(type_name: str, body: dict[str, Any]) -> Refusal:
    result = parse(type_name, body)
    assert isinstance(result, Refusal), result
    return result


def test_a_valid_task_parses() -> None:
    parsed = parse("CreateTask", task())
    assert isinstance(parsed, CreateTask)
    assert parsed.max_attempts == 3 and parsed.timeout_s == 600


@pytest.mark.parametrize(
    ("body", "code", "mentions"),
    [
        (task(devices=[]), Reason.EMPTY_DEVICE_LIST, "devices"),
        (task(devices=["a", "a"]), Reason.DUPLICATE_DEVICE, "device a is listed twice"),
        (task(devices=["bad id"]), Reason.INVALID_COMMAND, "devices.0"),
        (task(task_id="x" * 129), Reason.INVALID_COMMAND, "task_id"),
        (task(max_attempts=0), Reason.INVALID_COMMAND, "max_attempts"),
        (task(max_attempts=21), Reason.INVALID_COMMAND, "max_attempts"),
        (task(timeout_s=0), Reason.INVALID_COMMAND, "timeout_s"),
        (task(timeout_s=86_401), Reason.INVALID_COMMAND, "timeout_s"),
        (task(params_json="[1]"), Reason.INVALID_COMMAND, "JSON object"),
        (task(params_json="{"), Reason.INVALID_COMMAND, "not JSON"),
        (task(params_json='{"a": "' + "x" * 70_000 + '"}'), Reason.INVALID_COMMAND, "larger"),
        (task(surprise=1), Reason.INVALID_COMMAND, "surprise"),
    ],
)
def test_bad_tasks_are_refused_with_a_code_and_the_field(
    body: dict[str, Any], code: Reason, mentions: str
) -> None:
    r = refusal("CreateTask", body)
    assert r.code == code
    assert mentions in r.reason


def test_an_unknown_command_type_is_malformed() -> None:
    assert refusal("DropEverything", {}).code == Reason.MALFORMED_COMMAND


def test_scripts_are_limited_to_one_mebibyte() -> None:
    ok = parse("RegisterScript", {"script_id": "s", "content": "x" * 1024 * 1024})
    assert isinstance(ok, RegisterScript)
    r = refusal("RegisterScript", {"script_id": "s", "content": "x" * (1024 * 1024 + 1)})
    assert r.code == Reason.INVALID_COMMAND and "content" in r.reason


def test_the_fingerprint_tells_content_apart() -> None:
    a = CreateTask.model_validate(task())
    assert a.fingerprint() == CreateTask.model_validate(task()).fingerprint()
    assert a.fingerprint() != CreateTask.model_validate(task(devices=["a"])).fingerprint()
