"""The `eventdispatch audit` command: the thin shell around `audit` (pure) and `audit_source`.

It parses what the user typed, reads the log (and for --diff the projections), and writes the
result where it was asked to go. Errors a user can fix are one line that says how.
"""

from __future__ import annotations

import asyncio
import inspect
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from eventdispatch import audit as A
from eventdispatch import audit_report, audit_source
from eventdispatch.config import Settings
from eventdispatch.events import Event

err = Console(stderr=True, soft_wrap=True)  # one line per message, also in logs


class Format(StrEnum):
    table = "table"
    json = "json"
    jsonl = "jsonl"
    csv = "csv"
    html = "html"


FORMATS_BY_VIEW = {
    "timeline": {Format.table, Format.json, Format.jsonl, Format.csv, Format.html},
    "stats": {Format.table, Format.json, Format.html},
    "at": {Format.table, Format.json},
    "diff": {Format.table, Format.json, Format.jsonl},
}


def _fail(message: str, code: int = 2) -> NoReturn:
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def _time(option: str, value: str | None, now_ms: int) -> int | None:
    if value is None:
        return None
    try:
        return A.parse_time_ms(value, now_ms)
    except A.TimeFormatError as e:
        _fail(f"{option}: {e}")


def audit(
    device: Annotated[
        list[str] | None,
        typer.Option("--device", "-d", help="Device id; repeat or comma-separate for several."),
    ] = None,
    task: Annotated[
        list[str] | None, typer.Option("--task", "-t", help="Task id; repeat for several.")
    ] = None,
    exec_id: Annotated[
        list[str] | None,
        typer.Option("--exec", "-x", help="One attempt, TASK:DEVICE:ATTEMPT; repeatable."),
    ] = None,
    event_type: Annotated[
        list[str] | None,
        typer.Option("--type", help="Event type, e.g. Failed or Retrying,TimedOut."),
    ] = None,
    since: Annotated[
        str | None,
        typer.Option(help="Start of the window: ISO-8601 with offset, or -30m, -2h, -1d."),
    ] = None,
    until: Annotated[
        str | None, typer.Option(help="End of the window, same forms as --since; now by default.")
    ] = None,
    at: Annotated[
        str | None,
        typer.Option(help="Show the state of the selection as of this time instead."),
    ] = None,
    diff: Annotated[
        bool,
        typer.Option(
            "--diff",
            help="Compare state rebuilt from the log with the projections; exit 1 if they differ.",
        ),
    ] = False,
    stats: Annotated[
        bool,
        typer.Option("--stats", help="Counts, what fails most, latency percentiles."),
    ] = False,
    fmt: Annotated[
        Format,
        typer.Option("--format", "-f", help="table, json, jsonl, csv, or html (a report file)."),
    ] = Format.table,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Write to this file instead of stdout.")
    ] = None,
    slack: Annotated[
        str,
        typer.Option(
            help="How far publish time may stray from event time (publish retries, clock "
            "skew); the scan reads this much more on each side of the window."
        ),
    ] = "1m",
    progress: Annotated[
        bool | None,
        typer.Option(
            "--progress/--no-progress", help="Progress on stderr; on when stderr is a terminal."
        ),
    ] = None,
) -> None:
    """Replay the event log to see what happened, in order, and what the system believed.

    Reads the `events` topic, the source of truth, never the projections (except to --diff
    them). A window seeks by publish time, so a narrow one reads little of a long log; a
    --device selection is matched on the message key before anything is decoded.

    Examples:

      eventdispatch audit --device dev-7 --since -2h
      eventdispatch audit --task rollout-7 --type Failed,TimedOut --format csv -o failed.csv
      eventdispatch audit --exec rollout-7:dev-7:2
      eventdispatch audit --device dev-7 --at 2026-12-03T17:05:00+01:00
      eventdispatch audit --task rollout-7 --diff
      eventdispatch audit --since -1d --stats
      eventdispatch audit --task rollout-7 --format html --out report.html

    Times: ISO-8601 with an offset (2026-12-03T17:00:00Z), relative to now (-90s, -30m,
    -2h, -1d, -1h30m) or now. Event time is when the service decided, shown in UTC.

    --at T folds every event up to T with the service's own functions (the decider's evolve
    for device state, the projector's reducers for executions and attempts); it reads from the
    start of the log. --diff rebuilds the same documents from the whole log and lists where the
    projections in MongoDB disagree; it exits 1 if they do.

    Exit codes: 0 done (an empty selection says so and is not an error), 1 --diff found
    differences, 2 the command line or a service is wrong.
    """
    s = Settings()
    now = audit_source.now_ms()
    since_ms = _time("--since", since, now)
    until_ms = _time("--until", until, now)
    at_ms = _time("--at", at, now)
    try:
        slack_ms = A.parse_duration_ms(slack)
        selection = A.Selection.build(device, task, exec_id, event_type, since_ms, until_ms)
    except (A.TimeFormatError, A.SelectionError) as e:
        _fail(str(e))
    view = _view(selection, at_ms, diff, stats, fmt)
    if since_ms is not None and until_ms is not None and since_ms > until_ms:
        _fail(f"--since ({A.iso(since_ms)}) is after --until ({A.iso(until_ms)})")
    if fmt == Format.html and out is None:
        _fail("--format html writes a file: add --out report.html")
    show_progress = err.is_terminal if progress is None else progress

    if view == "at":
        assert at_ms is not None
        plan = A.plan_scan(A.Selection(until_ms=at_ms), now, slack_ms, from_start=True)
        pre = A.prefilter(selection, for_timeline=False, device_history=True)
        events = _scan(s, plan, pre, show_progress)
        snap = A.snapshot(events, selection, at_ms)
        if not snap.events and not any(st.seq for st in snap.devices.values()):
            err.print(f"nothing selected had happened by {A.iso(at_ms)}")
        _emit(out, fmt, snap.as_json(), A.snapshot_table(snap))
        return
    if view == "diff":
        _diff(s, selection, now, show_progress, fmt, out)
        return

    plan = A.plan_scan(selection, now, slack_ms)
    pre = A.prefilter(selection, for_timeline=True, device_history=False)
    rows = A.timeline(_scan(s, plan, pre, show_progress), selection)
    if not rows:
        window = f" between {A.iso(plan.start_ms or 0)} and {A.iso(plan.stop_ms)}"
        err.print(f"no events match {_describe(selection)}{window if since_ms is not None else ''}")
        if fmt in (Format.table, Format.html):
            return
    selected = [r.event for r in rows]
    if fmt == Format.html:
        t0 = since_ms if since_ms is not None else min(e.occurred_at_ms for e in selected)
        t1 = until_ms if until_ms is not None else max(e.occurred_at_ms for e in selected)
        report = audit_report.render(
            title="eventdispatch audit",
            selection_text=_describe(selection),
            generated_ms=now,
            rows=rows,
            stats=A.stats(selected),
            spans=A.occupancy(selected, t1),
            window=(t0, t1),
            devices=selection.devices,
        )
        _write(out, report)
        err.print(f"report written to {out}")
    elif view == "stats":
        summary = A.stats(selected)
        _emit(out, fmt, summary.as_json(), A.stats_tables(summary))
    elif fmt == Format.jsonl:
        _write(out, A.to_jsonl(r.as_json() for r in rows))
    elif fmt == Format.csv:
        _write(out, A.timeline_csv(rows))
    else:
        _emit(out, fmt, [r.as_json() for r in rows], [A.timeline_table(rows)])


def _reflow(doc: str) -> str:
    """Typer's rich help keeps a docstring's line breaks; join the lines of each paragraph so
    the terminal wraps them, but keep indented lines (the examples) as they are."""
    paragraphs = []
    for block in inspect.cleandoc(doc).split("\n\n"):
        lines = block.splitlines()
        indented = all(line.startswith("  ") for line in lines)
        paragraphs.append("\n".join(lines) if indented else " ".join(lines))
    return "\n\n".join(paragraphs)


audit.__doc__ = _reflow(audit.__doc__ or "")


def _view(selection: A.Selection, at_ms: int | None, diff: bool, stats: bool, fmt: Format) -> str:
    """Which of the four views was asked for, refusing combinations that mean nothing."""
    chosen = [
        n for n, on in (("--at", at_ms is not None), ("--diff", diff), ("--stats", stats)) if on
    ]
    if len(chosen) > 1:
        _fail(f"{' and '.join(chosen)} do not combine; choose one")
    view = {"--at": "at", "--diff": "diff", "--stats": "stats"}.get(chosen[0] if chosen else "")
    view = view or "timeline"
    if view in ("at", "diff"):
        windowed = selection.since_ms is not None or selection.until_ms is not None
        if windowed or selection.types:
            what = "--since/--until" if windowed else "--type"
            reason = (
                "it folds every event from the start of the log"
                if view == "at"
                else "the projections hold everything up to now"
            )
            _fail(f"{what} does not apply to {chosen[0]}: {reason}")
    if fmt not in FORMATS_BY_VIEW[view]:
        allowed = ", ".join(sorted(FORMATS_BY_VIEW[view]))
        _fail(f"--format {fmt.value} does not fit the {view} view; use one of: {allowed}")
    return view


def _describe(selection: A.Selection) -> str:
    parts = [
        f"{name} {', '.join(sorted(values))}"
        for name, values in (
            ("device", selection.devices),
            ("task", selection.tasks),
            ("exec", selection.exec_ids),
            ("type", selection.types),
        )
        if values
    ]
    return "; ".join(parts) or "all events"


def _scan(s: Settings, plan: A.ScanPlan, pre: A.Prefilter, show: bool) -> list[Event]:
    """Read the planned stretch of the log, with a progress bar on stderr for long scans."""
    columns = (
        TextColumn("scanning events"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=err, transient=True, disable=not show) as bar:
        task = bar.add_task("scan", total=None, detail="")

        def update(p: audit_source.Progress) -> None:
            _show(bar, task, p)

        try:
            return list(audit_source.scan(s, plan, pre, update))
        except audit_source.SourceError as e:
            _fail(str(e))


def _show(bar: Progress, task: TaskID, p: audit_source.Progress) -> None:
    detail = f"{p.read:,} read, {p.decoded:,} decoded"
    if p.publish_ms is None or p.first_publish_ms is None:
        bar.update(task, detail=detail)
        return
    total = max(p.stop_ms - p.first_publish_ms, 1)
    done = total if p.done else min(p.publish_ms - p.first_publish_ms, total)
    bar.update(task, total=total, completed=done, detail=detail)


def _diff(
    s: Settings, selection: A.Selection, now: int, show: bool, fmt: Format, out: Path | None
) -> None:
    plan = A.plan_scan(selection, now, 0, from_start=True)
    pre = A.prefilter(selection, for_timeline=False, device_history=False)
    rebuilt = A.rebuild(_scan(s, plan, pre, show), selection)
    queries = {m: A.projection_query(selection, m) for m in rebuilt}
    ids = {m: sorted(docs) for m, docs in rebuilt.items()}
    try:
        projected = asyncio.run(audit_source.load_projections(s, queries, ids))
    except audit_source.SourceError as e:
        _fail(str(e))
    differences = A.compare(rebuilt, projected)
    compared = {m: len(set(rebuilt[m]) | set(projected.get(m, {}))) for m in rebuilt}
    counts = ", ".join(f"{n} {m}" for m, n in compared.items())
    if fmt == Format.jsonl:
        _write(out, A.to_jsonl(d.as_json() for d in differences))
    elif fmt == Format.json:
        doc = {"compared": compared, "differences": [d.as_json() for d in differences]}
        _write(out, A.to_json(doc))
    elif differences:
        _print(out, [A.diff_table(differences)])
    if differences:
        err.print(f"[bold red]{len(differences)} documents differ[/] (compared {counts})")
        raise typer.Exit(1)
    err.print(f"the log and the projections agree (compared {counts})")


def _emit(out: Path | None, fmt: Format, as_json: Any, tables: list[Any]) -> None:
    if fmt == Format.json:
        _write(out, A.to_json(as_json))
    else:
        _print(out, tables)


def _print(out: Path | None, renderables: list[Any]) -> None:
    if out is None:  # a pipe gets wide lines rather than a table folded to 80 columns
        console = Console(width=None if sys.stdout.isatty() else 200)
        for r in renderables:
            console.print(r)
        return
    with out.open("w") as f:
        console = Console(file=f, width=200, no_color=True)
        for r in renderables:
            console.print(r)


def _write(out: Path | None, text: str) -> None:
    if out is None:
        sys.stdout.write(text)
    else:
        out.write_text(text)
