"""The audit's pure core: times, selection and its pre-decode filter, folding, diff, stats and
the report. Random histories come from the decider tests' World, which drives the real decider."""

from __future__ import annotations

import csv
import io
import itertools
import json
import re
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from eventdispatch import audit as A
from eventdispatch import audit_report, wire
from eventdispatch import events as ev
from eventdispatch.decider import DeviceState
from eventdispatch.events import Event
from eventdispatch.wire import AvroCodec
from projections.reducers import TERMINAL_STATES
from tests.unit.test_decider import DEV, World, apply, drain, ops

NOW = 1_796_316_000_000  # 2026-12-03T16:40:00Z
CODEC = AvroCodec("events")
SLOW = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def e(
    seq: int,
    t: int,
    payload: ev.Payload,
    task: str | None = "t1",
    attempt: int | None = None,
    device: str | None = DEV,
) -> Event:
    return Event(f"{device}:{seq}", t, seq, device, task, attempt, payload)


def history(ops_: list[Any], finish: bool = False) -> World:
    world = World()
    for op in ops_:
        apply(world, op)
    if finish:
        drain(world)
    return world


# --- times -----------------------------------------------------------------------------------


def test_iso_times_need_an_offset_and_z_is_utc() -> None:
    assert A.parse_time_ms("2026-12-03T16:40:00Z", 0) == NOW
    assert A.parse_time_ms("2026-12-03T17:40:00+01:00", 0) == NOW
    assert A.parse_time_ms("2026-12-03T16:40:00.250+00:00", 0) == NOW + 250
    with pytest.raises(A.TimeFormatError, match=r"no UTC offset.*2026-12-03T16:40:00\+00:00"):
        A.parse_time_ms("2026-12-03T16:40:00", 0)


def test_relative_times_count_back_from_now() -> None:
    assert A.parse_time_ms("-2h", NOW) == NOW - 7_200_000
    assert A.parse_time_ms("-30m", NOW) == NOW - 1_800_000
    assert A.parse_time_ms("-1d", NOW) == NOW - 86_400_000
    assert A.parse_time_ms("-1h30m", NOW) == NOW - 5_400_000
    assert A.parse_time_ms("now", NOW) == NOW


@pytest.mark.parametrize("bad", ["yesterday", "-2x", "-", "2h", "-h", "12/03/2026", ""])
def test_an_unreadable_time_says_which_forms_work(bad: str) -> None:
    with pytest.raises(A.TimeFormatError) as info:
        A.parse_time_ms(bad, NOW)
    assert "ISO-8601" in str(info.value) and "-2h" in str(info.value)


@given(st.integers(0, 9), st.integers(0, 30), st.integers(0, 23), st.integers(0, 59))
def test_durations_add_their_parts(w: int, d: int, h: int, m: int) -> None:
    text = "".join(f"{n}{u}" for n, u in ((w, "w"), (d, "d"), (h, "h"), (m, "m")) if n) or "0"
    expected = ((w * 7 + d) * 24 * 60 + h * 60 + m) * 60_000
    assert A.parse_duration_ms(text) == expected


@given(st.integers(0, 4_102_444_800_000))
def test_iso_output_reads_back(ms: int) -> None:
    assert A.parse_time_ms(A.iso(ms), 0) == ms


# --- selection and the pre-decode filter ---------------------------------------------------


def test_selection_values_split_on_commas_and_types_ignore_case() -> None:
    s = A.Selection.build(devices=["a,b", "c"], types=["failed,TIMEDOUT"])
    assert s.devices == {"a", "b", "c"}
    assert s.types == {"Failed", "TimedOut"}
    with pytest.raises(A.SelectionError, match="known: Created"):
        A.Selection.build(types=["Exploded"])
    with pytest.raises(A.SelectionError, match="TASK:DEVICE:ATTEMPT"):
        A.Selection.build(exec_ids=["no-attempt"])


def test_criteria_of_different_kinds_must_all_hold() -> None:
    failed = e(3, NOW, ev.Failed("SCRIPT_ERROR", "x"), attempt=1)
    assert A.Selection.build(devices=[DEV], types=["Failed"]).matches(failed)
    assert not A.Selection.build(devices=[DEV], tasks=["t2"]).matches(failed)
    assert A.Selection.build(exec_ids=[f"t1:{DEV}:1"]).matches(failed)
    assert not A.Selection.build(exec_ids=[f"t1:{DEV}:2"]).matches(failed)
    assert A.Selection(since_ms=NOW, until_ms=NOW).matches(failed)  # bounds are inclusive
    assert not A.Selection(since_ms=NOW + 1).matches(failed)


def two_device_log(ops_a: list[Any], ops_b: list[Any]) -> list[Event]:
    """Two devices' histories interleaved, plus a task-level event: a log with several keys."""
    a = history(ops_a)
    b = World(state=DeviceState("dev-2"))
    for op in ops_b:
        apply(b, op)
    accepted = ev.TaskAccepted("c", "s", 1, (DEV, "dev-2"), None, 3, 10, 0, "{}", "fp")
    log = [Event("task:t1:accepted", 0, 0, None, "t1", None, accepted)]
    for i in range(max(len(a.log), len(b.log))):
        log += a.log[i : i + 1] + b.log[i : i + 1]
    return log


def key_of(event: Event) -> str:
    """The message key the service publishes an event with."""
    return event.device_id or event.task_id or event.event_id


@SLOW
@given(st.lists(ops, max_size=25), st.lists(ops, max_size=25), st.data())
def test_the_prefilter_never_drops_a_match(
    ops_a: list[Any], ops_b: list[Any], data: st.DataObject
) -> None:
    log = two_device_log(ops_a, ops_b)
    tasks = sorted({x.task_id for x in log if x.task_id})
    execs = sorted({x.exec_id for x in log if x.exec_id})
    selection = A.Selection.build(
        devices=data.draw(st.lists(st.sampled_from([DEV, "dev-2", "dev-9"]), max_size=2)),
        tasks=data.draw(st.lists(st.sampled_from([*tasks, "t-none"]), max_size=2)),
        exec_ids=data.draw(st.lists(st.sampled_from([*execs, "t9:dev-1:1"]), max_size=2)),
        types=data.draw(st.lists(st.sampled_from(A.EVENT_TYPES), max_size=3)),
    )
    timeline_filter = A.prefilter(selection, for_timeline=True, device_history=False)
    fold_filter = A.prefilter(selection, for_timeline=False, device_history=True)
    for x in log:
        raw = CODEC.encode(wire.event_to_record(x))
        if selection.matches(x):
            assert timeline_filter.may_match(key_of(x), raw), x
        devices = selection.devices or selection.exec_devices
        if not devices or x.device_id in devices:
            assert fold_filter.may_match(key_of(x), raw), x


def test_a_device_selection_is_decided_by_the_key_alone() -> None:
    pre = A.prefilter(A.Selection.build(devices=["dev-7"]), for_timeline=True, device_history=False)
    assert pre.keys == frozenset({"dev-7"}) and pre.needles == ()
    assert not pre.may_match("dev-8", b"dev-7 appears in the bytes, but the key says no")


def test_a_window_seeks_before_since_and_stops_after_until_by_the_slack() -> None:
    s = A.Selection(since_ms=NOW - 3_600_000, until_ms=NOW - 60_000)
    assert A.plan_scan(s, NOW, 60_000) == A.ScanPlan(NOW - 3_660_000, NOW)
    assert A.plan_scan(A.Selection(), NOW, 60_000) == A.ScanPlan(None, NOW)
    assert A.plan_scan(s, NOW, 0, from_start=True) == A.ScanPlan(None, NOW - 60_000)


# --- timeline and its formats --------------------------------------------------------------


@SLOW
@given(st.lists(ops, max_size=30))
def test_a_device_timeline_is_its_events_in_order_with_gaps(ops_: list[Any]) -> None:
    log = two_device_log(ops_, ops_)
    rows = A.timeline(log, A.Selection.build(devices=[DEV]))
    mine = [x for x in log if x.device_id == DEV]
    assert [r.event for r in rows] == mine
    assert [r.event.seq for r in rows] == list(range(1, len(mine) + 1))
    assert [r.gap_ms for r in rows[1:]] == [
        b.occurred_at_ms - a.occurred_at_ms for a, b in itertools.pairwise(mine)
    ]


def scenario() -> list[Event]:
    """dev-1: t1 fails once, then succeeds; t2 times out, is retried, then canceled."""
    return [
        e(1, 1_000, ev.Created("s", 1, None, 3, 60, 0)),
        e(2, 1_010, ev.Locked(), attempt=1),
        e(3, 1_030, ev.Sent(61_030), attempt=1),
        e(4, 1_530, ev.Retrying(2_530, "exit 1"), attempt=1),
        e(5, 2_000, ev.Created("other", 2, None, 2, 1, 0), task="t2"),
        e(6, 2_530, ev.Waiting(), attempt=1),
        e(7, 2_600, ev.Locked(), attempt=2),
        e(8, 2_640, ev.Sent(62_640), attempt=2),
        e(9, 3_640, ev.Succeeded("ok"), attempt=2),
        e(10, 3_640, ev.Locked(), task="t2", attempt=1),
        e(11, 3_700, ev.Sent(4_700), task="t2", attempt=1),
        e(12, 4_700, ev.TimedOut(), task="t2", attempt=1),
        e(13, 4_700, ev.Retrying(5_700, "no result within 1s"), task="t2", attempt=1),
        e(14, 5_000, ev.Canceled("operator"), task="t2"),
    ]


def test_machine_formats_carry_every_column() -> None:
    rows = A.timeline(scenario(), A.Selection())
    lines = A.to_jsonl(r.as_json() for r in rows).splitlines()
    assert [json.loads(line)["type"] for line in lines] == [x.type for x in scenario()]
    first = json.loads(lines[3])
    assert first["exec_id"] == f"t1:{DEV}:1" and first["gap_ms"] == 500
    assert first["detail"] == "retry at 1970-01-01T00:00:02.530Z after: exit 1"
    parsed = list(csv.DictReader(io.StringIO(A.timeline_csv(rows))))
    assert parsed[0].keys() == set(A.CSV_COLUMNS)
    assert [p["type"] for p in parsed] == [x.type for x in scenario()]


# --- state as of a time --------------------------------------------------------------------


@SLOW
@given(st.lists(ops, max_size=40), st.data())
def test_state_as_of_a_time_is_what_the_decider_held_then(
    ops_: list[Any], data: st.DataObject
) -> None:
    world = World()
    held: list[tuple[int, DeviceState]] = []  # (time, state after each op)
    for op in ops_:
        apply(world, op)
        held.append((world.now, world.state))
    at = data.draw(st.integers(-1, world.now + 1))
    expected = DeviceState(DEV)
    for t, state in held:
        if t <= at:
            expected = state
    with_duplicates = world.log + world.log[: len(world.log) // 2]  # republished events
    snap = A.snapshot(with_duplicates, A.Selection.build(devices=[DEV]), at)
    assert snap.devices[DEV] == expected
    # the reducers' view agrees with the decider's: same executions, same states
    states = {d["task_id"]: d["state"] for d in snap.models["executions"].values()}
    live = {t: x for t, x in states.items() if x not in TERMINAL_STATES}
    assert live == {t: x.status for t, x in expected.live.items()}
    ended = {t: x for t, x in states.items() if x in TERMINAL_STATES}
    assert ended == {t: kind.lower() for t, kind in expected.ended.items()}


def test_state_of_one_execution_folds_its_whole_history() -> None:
    snap = A.snapshot(scenario(), A.Selection.build(exec_ids=[f"t1:{DEV}:2"]), 3_000)
    (doc,) = snap.models["executions"].values()
    assert doc["state"] == "sent" and doc["attempt"] == 2
    assert list(snap.models["attempts"]) == [f"t1:{DEV}:2"]
    assert snap.devices[DEV].active is not None
    assert [x.task_id for x in snap.devices[DEV].live.values()] == ["t1", "t2"]


# --- diff ----------------------------------------------------------------------------------


def test_compare_names_the_field_that_differs_and_the_missing_and_extra_documents() -> None:
    rebuilt = A.rebuild(scenario(), A.Selection.build(devices=[DEV]))
    assert set(rebuilt) == {"executions", "attempts", "devices"}
    projected = json.loads(json.dumps(rebuilt))  # what MongoDB would hand back
    assert A.compare(rebuilt, projected) == []
    projected["executions"][f"t1:{DEV}"]["state"] = "failed"
    del projected["attempts"][f"t2:{DEV}:1"]
    projected["attempts"]["ghost"] = {"_id": "ghost"}
    diffs = A.compare(rebuilt, projected)
    assert [(d.model, d.key, d.kind) for d in diffs] == [
        ("attempts", "ghost", "extra"),
        ("attempts", f"t2:{DEV}:1", "missing"),
        ("executions", f"t1:{DEV}", "different"),
    ]
    assert diffs[2].fields == {"state": ("succeeded", "failed")}


def test_a_diff_compares_only_documents_whose_every_event_it_read() -> None:
    assert A.diff_models(A.Selection()) == (
        "executions",
        "attempts",
        "devices",
        "tasks",
        "scripts",
        "rejections",
    )
    assert A.diff_models(A.Selection.build(tasks=["t"])) == ("executions", "attempts", "tasks")
    assert A.diff_models(A.Selection.build(tasks=["t"], devices=["d"])) == (
        "executions",
        "attempts",
    )
    q = A.projection_query(A.Selection.build(devices=["d"], exec_ids=["t:d:1"]), "attempts")
    assert q == {
        "$and": [{"device_id": {"$in": ["d"]}}, {"$or": [{"task_id": "t", "device_id": "d"}]}]
    }
    assert A.projection_query(A.Selection.build(devices=["d"]), "devices") == {
        "_id": {"$in": ["d"]}
    }


# --- statistics ----------------------------------------------------------------------------


def test_stats_count_failures_and_pair_latencies_within_an_attempt() -> None:
    log = scenario()
    s = A.stats(log)
    assert s.by_type["Locked"] == 3 and s.by_type["Retrying"] == 2 and s.events == 14
    assert s.failing_devices == [A.Failures(DEV, 2, 0, 1)]
    assert s.failing_scripts == [A.Failures("other", 1, 0, 1), A.Failures("s", 1, 0, 0)]
    wait, delivery, run = (s.latencies[k] for k in ("wait", "delivery", "run"))
    # waits: t1 10 ms, t1's retry 70 ms after it was due again, t2 1,640 ms behind t1
    assert wait is not None and (wait.n, wait.p50, wait.max) == (3, 70, 1_640)
    assert delivery is not None and (delivery.n, delivery.max) == (3, 60)
    assert run is not None and run.n == 3 and run.p50 == 1_000 and run.max == 1_000


def test_a_failure_whose_task_began_before_the_window_is_not_guessed() -> None:
    s = A.stats(scenario()[3:4])
    assert s.failing_scripts[0].name.startswith("(unknown")


@given(st.lists(st.integers(0, 10**7), min_size=1, max_size=200))
def test_percentiles_are_ordered_observed_values(values: list[int]) -> None:
    p = A.Percentiles.of(values)
    assert p is not None
    assert p.p50 <= p.p90 <= p.p95 <= p.p99 <= p.max == max(values)
    assert {p.p50, p.p90, p.p95, p.p99} <= set(values)
    assert p.n == len(values)


# --- occupancy and the report --------------------------------------------------------------


def test_spans_run_from_locked_to_the_end_and_say_how_it_ended() -> None:
    spans = A.occupancy(scenario(), end_ms=9_000)
    assert [(s.exec_id.split(":")[0], s.start_ms, s.end_ms, s.outcome) for s in spans] == [
        ("t1", 1_010, 1_530, "retried"),
        ("t1", 2_600, 3_640, "succeeded"),
        ("t2", 3_640, 4_700, "timed out"),
    ]
    still = A.occupancy(scenario()[:3], end_ms=9_000)
    assert [(s.outcome, s.end_ms) for s in still] == [("open", 9_000)]


def test_the_report_is_self_contained_with_a_lane_per_device() -> None:
    evil = e(1, 1_200, ev.Created("s", 1, None, 1, 60, 0), device="<b>evil</b>", task="t3")
    log = [*scenario(), evil]
    rows = A.timeline(log, A.Selection())
    html = audit_report.render(
        title="t",
        selection_text="all events",
        generated_ms=NOW,
        rows=rows,
        stats=A.stats(log),
        spans=A.occupancy(log, 9_000),
        window=(0, 9_000),
        devices=["idle-device"],
    )
    lanes = re.findall(r'<g class="lane" data-device="([^"]*)"', html)
    assert lanes == ["&lt;b&gt;evil&lt;/b&gt;", DEV, "idle-device"]
    assert "<b>evil</b>" not in html
    assert len(re.findall(r'<rect class="span" data-outcome="', html)) == 3
    # nothing to fetch: no external scripts, styles, images or fonts
    assert not re.search(r"(src|href)\s*=|@import|url\(|<link", html)
    assert html.count("<tr><td>") >= len(rows)


# --- the command line, without any service -------------------------------------------------


def test_the_command_refuses_bad_input_with_the_accepted_forms() -> None:
    from eventdispatch.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["audit", "--since", "yesterday"])
    assert result.exit_code == 2
    assert "ISO-8601" in result.output and "-1h30m" in result.output
    result = runner.invoke(app, ["audit", "--at", "-1h", "--diff"])
    assert result.exit_code == 2 and "do not combine" in result.output
    result = runner.invoke(app, ["audit", "--format", "html"])
    assert result.exit_code == 2 and "--out" in result.output
    help_text = runner.invoke(app, ["audit", "--help"], env={"COLUMNS": "120"}).output
    assert "eventdispatch audit --device dev-7 --since -2h" in help_text
