"""The `eventdispatch` command line. Every command has --help; settings come from
EVENTDISPATCH_* environment variables or a `.env` file (see eventdispatch/config.py)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn
from urllib.parse import urlsplit

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from eventdispatch import bus, logs
from eventdispatch.client import CommandRejected, EventDispatch
from eventdispatch.config import Settings
from projections import queries
from projections.queries import TaskSummary
from projections.reducers import TERMINAL_STATES

app = typer.Typer(
    help="Event-sourced script dispatch to device fleets, on Apache Pulsar.",
    no_args_is_help=True,
    add_completion=False,
)
stack_app = typer.Typer(help="Start, stop and inspect the local Pulsar, MongoDB and Redis.")
script_app = typer.Typer(help="Register scripts that tasks can run.")
app.add_typer(stack_app, name="stack")
app.add_typer(script_app, name="script")
tasks_app = typer.Typer(help="List tasks and their progress (from the projections).")
device_app = typer.Typer(help="Look at one device (from the projections).")
app.add_typer(tasks_app, name="tasks")
app.add_typer(device_app, name="device")
state_app = typer.Typer(help="The device processors' working state in Redis.")
app.add_typer(state_app, name="state")

out = Console()
err = Console(stderr=True)
STATE_ORDER = ("scheduled", "waiting", "locked", "sent", "retrying", *TERMINAL_STATES)


# Exit codes: 0 done; 1 refused, failed or a value to fix; 2 a usage error (unknown option or
# command, from the parser); 3 the service did not answer in time (a command stays queued).
NO_ANSWER = 3


def plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


def settings() -> Settings:
    return Settings()


# --- stack -----------------------------------------------------------------------------------
@stack_app.command("up")
def stack_up() -> None:
    """Install what is missing (first run only), start Pulsar, MongoDB/FerretDB and Redis on
    loopback, and create the tenant, namespace and topics."""
    from eventdispatch import stack

    stack.up(settings(), log=lambda m: err.print(f"[dim]{m}[/]"))
    _print_status()


@stack_app.command("down")
def stack_down() -> None:
    """Stop the services this checkout started (never ones it found running)."""
    from eventdispatch import stack

    stack.down(settings(), log=lambda m: err.print(f"[dim]{m}[/]"))


@stack_app.command("status")
def stack_status() -> None:
    """Say which services run where."""
    _print_status()


def _print_status() -> None:
    from eventdispatch import stack

    table = Table("service", "address", "running", "pid", "detail")
    for s in stack.status(settings()):
        running = "[green]yes[/]" if s.running else "[red]no[/]"
        pid = str(s.pid) if s.pid else ("-" if s.started_by_us else "not ours")
        table.add_row(s.name, s.address, running, pid, s.detail)
    out.print(table)


# --- service ---------------------------------------------------------------------------------
@app.command()
def run(
    workers: Annotated[
        int,
        typer.Option(
            "--workers",
            "-w",
            min=1,
            help="Worker processes, each running the planner, device processor, timer relay "
            "and log bridge. Add more here or on other machines that reach the broker. "
            "The default is this machine's CPU count.",
        ),
    ] = os.cpu_count() or 1,
    with_projector: Annotated[
        bool,
        typer.Option(
            "--with-projector/--no-projector",
            help="Also run the projector (one process). Without it, run `eventdispatch "
            "project` elsewhere, or the read models (status, tasks, device) stand still.",
        ),
    ] = True,
    health_port: Annotated[
        int | None,
        typer.Option(
            help="Serve /status, /healthz and /readyz on this loopback port (default: "
            "EVENTDISPATCH_HEALTH_PORT, else 8790)."
        ),
    ] = None,
) -> None:
    """Run the service: a supervisor with N worker processes and the projector.

    A worker that dies is started again with backoff. Ctrl-C or SIGTERM drains:
    each worker stops receiving, finishes its in-flight devices, acknowledges,
    flushes and exits; then the supervisor exits 0. `eventdispatch health` shows
    the workers."""
    from eventdispatch import admin, supervisor

    s = settings()
    logs.setup(s.log_level)
    admin.provision(s)
    port = health_port if health_port is not None else s.health_port
    try:
        code = asyncio.run(supervisor.supervise(s, workers, with_projector, port))
    except supervisor.SupervisorError as e:
        fail(str(e))
    raise typer.Exit(code)


@app.command(hidden=True)
def worker(
    role: Annotated[str, typer.Option(help="stages, projector or all.")] = "all",
) -> None:
    """One worker process in the foreground (what `run` supervises)."""
    from eventdispatch import worker as worker_module

    if role not in ("stages", "projector", "all"):
        fail(f"unknown role {role!r}; choose stages, projector or all")
    s = settings()
    logs.setup(s.log_level)
    fd = os.environ.get("EVENTDISPATCH_HEALTH_FD")
    code = asyncio.run(
        worker_module.run(
            s,
            with_stages=role in ("stages", "all"),
            with_projector=role in ("projector", "all"),
            heartbeat_fd=int(fd) if fd else None,
        )
    )
    raise typer.Exit(code)


@app.command()
def project() -> None:
    """Run only the projector: keep the MongoDB read models current from the log. Use it
    with `run --no-projector` to place the projector apart from the workers."""
    from eventdispatch import admin
    from eventdispatch import worker as worker_module

    s = settings()
    logs.setup(s.log_level)
    admin.provision(s)
    raise typer.Exit(asyncio.run(worker_module.run(s, with_stages=False, with_projector=True)))


@state_app.command("rebuild")
def state_rebuild() -> None:
    """Rebuild Redis' working state (device states, scripts, tasks) from the events topic.

    Run it after Redis lost its data or was replaced: workers refuse to process
    until then (`eventdispatch health` says so) and resume by themselves when it
    ends. Safe while they run: they pause during the rebuild. Every key under
    the Redis prefix is replaced."""
    from eventdispatch import state

    s = settings()
    with _entries_bar("state rebuild") as shown:
        rebuilt = _run(state.rebuild(s, shown))
    out.print(
        f"read {rebuilt.events:,} events in {rebuilt.seconds:.1f}s: {rebuilt.devices:,} "
        f"device states, {rebuilt.scripts:,} script versions, {rebuilt.tasks:,} tasks; "
        f"state generation {rebuilt.generation}"
    )


@app.command()
def health(
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw status.")] = False,
    health_port: Annotated[
        int | None,
        typer.Option(
            help="The supervisor's health port (default: EVENTDISPATCH_HEALTH_PORT, else 8790)."
        ),
    ] = None,
) -> None:
    """Show the workers of a running `eventdispatch run`: alive, ready, restarts, and what
    each is waiting on. Exits 1 unless every worker is ready, 3 if no supervisor answers."""
    import httpx

    port = health_port if health_port is not None else settings().health_port
    url = f"http://127.0.0.1:{port}/status"
    try:
        status = httpx.get(url, timeout=5).json()
    except httpx.HTTPError as e:
        why = f"no supervisor answers on {url} ({type(e).__name__}); is `eventdispatch run` up?"
        fail(why, NO_ANSWER)
    if as_json:
        out.print_json(data=status)
    else:
        table = Table("process", "pid", "alive", "ready", "up", "restarts", "waiting on")
        for w in status["workers"]:
            waiting = "; ".join(f"{k}: {v}" for k, v in w["waiting_on"].items())
            failed = [f"{k} {v}" for k, v in w["stages"].items() if v != "running"]
            table.add_row(
                w["name"],
                str(w["pid"] or "-"),
                "[green]yes[/]" if w["alive"] else "[red]no[/]",
                "[green]yes[/]" if w["ready"] else "[yellow]no[/]",
                f"{w['uptime_s']:.0f}s",
                str(w["restarts"]),
                "; ".join([*failed, waiting] if waiting else failed)[:120],
            )
        out.print(table)
    if not status["ready"]:
        raise typer.Exit(1)


@app.command()
def simulate(
    port: Annotated[
        int | None,
        typer.Option(
            help="Port to listen on (default: the port of EVENTDISPATCH_CENTRAL_URL, 8700), so "
            "the service and the simulator agree."
        ),
    ] = None,
    host: Annotated[
        str, typer.Option(help="Address to listen on; loopback unless in a container.")
    ] = "127.0.0.1",
    record: Annotated[
        Path, typer.Option(help="JSONL file the simulator appends what it saw to.")
    ] = Path(".stack/simulator.jsonl"),
    latency_ms: Annotated[
        str, typer.Option(help="Default run time of a script, MIN:MAX milliseconds.")
    ] = "5:20",
    behaviour: Annotated[
        Path | None,
        typer.Option(
            help="JSON or YAML file of rules per device pattern, first match wins; keys: "
            "devices (a glob), status (answer every POST with it: 404, 422, 500...), outcomes "
            "(by attempt, the last repeats: SUCCESS, ERROR, SYSTEM_ERROR, SILENT), latency_ms "
            "([min, max]), error_rate (share answered 503), throttle_rate (429), hang_rate and "
            "hang_s. Example: - {devices: 'flaky-*', outcomes: [ERROR, SUCCESS]}"
        ),
    ] = None,
) -> None:
    """Run a Central Control simulator: accepts scripts over HTTP, honours Idempotency-Key,
    publishes log lines to device-logs and records what each device saw."""
    from eventdispatch import simulator

    s = settings()
    logs.setup(s.log_level)
    try:
        low, _, high = latency_ms.partition(":")
        latency = (int(low), int(high or low))
    except ValueError:
        fail(f"--latency-ms must look like 5:20, got {latency_ms!r}")
    if behaviour is not None and not behaviour.exists():
        fail(f"behaviour file {behaviour} does not exist")
    try:
        rules = simulator.load_behaviours(behaviour, latency)
    except (ValueError, TypeError) as e:
        fail(str(e))
    from eventdispatch import admin

    admin.provision(s)
    if port is None:
        port = urlsplit(s.central_url).port or 8700
    sim = simulator.Simulator(s, record, rules)
    err.print(f"simulator: Central Control on http://{host}:{port}")
    try:
        asyncio.run(simulator.serve(sim, host, port))
    except SystemExit as e:  # uvicorn exits 1 when it cannot bind
        fail(
            f"the simulator could not listen on {host}:{port} (see above; a port in use?); "
            "choose another with --port and point EVENTDISPATCH_CENTRAL_URL at it",
            code=int(e.code or 1) if isinstance(e.code, int) else 1,
        )


# --- producer commands -----------------------------------------------------------------------
@script_app.command("register")
def script_register(
    file: Annotated[Path, typer.Argument(help="The script file to register.")],
    script_id: Annotated[
        str | None, typer.Option("--id", help="Script id; defaults to the file name's stem.")
    ] = None,
    language: Annotated[str, typer.Option(help="sh, bash, python or powershell.")] = "sh",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Register FILE as a new version of a script (the same content keeps its version)."""
    if not file.is_file():
        fail(f"{file} is not a file")
    content = file.read_text()
    sid = script_id or file.stem

    async def go() -> None:
        async with EventDispatch(settings()) as ed:
            info = await ed.register_script(sid, content, language)
        if as_json:
            out.print_json(
                data={"script_id": info.script_id, "version": info.version, "sha256": info.sha256}
            )
        else:
            out.print(
                f"script [bold]{info.script_id}[/] version {info.version} ({info.sha256[:12]})"
            )

    _run(go())


def _devices(devices: str | None, devices_file: Path | None) -> list[str]:
    if (devices is None) == (devices_file is None):
        fail("give the devices with exactly one of --devices a,b,c or --devices-file FILE")
    if devices_file is not None:
        if not devices_file.is_file():
            fail(f"devices file {devices_file} does not exist")
        items = re.split(r"[\s,]+", devices_file.read_text())  # lines, spaces or commas
    else:
        items = (devices or "").split(",")
    return [d.strip() for d in items if d.strip()]


@app.command()
def submit(
    script: Annotated[str, typer.Option("--script", help="Id of a registered script.")],
    devices: Annotated[
        str | None, typer.Option(help="Comma-separated device ids, e.g. dev-1,dev-2.")
    ] = None,
    devices_file: Annotated[
        Path | None,
        typer.Option(help="File with device ids, separated by newlines, spaces or commas."),
    ] = None,
    task_id: Annotated[
        str | None, typer.Option(help="Task id (idempotency key); a random one by default.")
    ] = None,
    version: Annotated[
        int | None, typer.Option(help="Script version; the latest by default.")
    ] = None,
    at: Annotated[
        str | None,
        typer.Option(help="Start time, ISO-8601 with offset: 2026-12-03T18:00:00+01:00."),
    ] = None,
    max_attempts: Annotated[
        int | None,
        typer.Option(
            help="Attempts per device, 1..20 (default: EVENTDISPATCH_DEFAULT_MAX_ATTEMPTS, 3)."
        ),
    ] = None,
    timeout: Annotated[
        int | None,
        typer.Option(
            help="Seconds per attempt, 1..86400 (default: EVENTDISPATCH_DEFAULT_TIMEOUT_S, 600)."
        ),
    ] = None,
    priority: Annotated[int, typer.Option(help="0..9; higher runs first on a busy device.")] = 0,
    params: Annotated[str, typer.Option(help="Script parameters as a JSON object.")] = "{}",
    wait: Annotated[bool, typer.Option("--wait", help="Wait for every device to finish.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    accept_timeout: Annotated[
        float, typer.Option(help="Seconds to wait for the planner's verdict.", min=0.1)
    ] = 30,
) -> None:
    """Ask for SCRIPT to run on a set of devices. Prints the task id once the planner has
    accepted it; exits 1 with the reason if it was rejected, 3 if no planner answered within
    --accept-timeout (the command stays queued). With --wait, shows progress and exits 0 only
    if every device succeeded, else 1 with the failures' reasons."""
    device_list = _devices(devices, devices_file)
    execute_at = None
    if at is not None:
        try:
            execute_at = datetime.fromisoformat(at)
        except ValueError:
            fail(f"--at {at!r} is not an ISO-8601 time, e.g. 2026-12-03T18:00:00+00:00")
        if execute_at.tzinfo is None:
            fail(f"--at {at!r} has no UTC offset; add one, e.g. {at}+00:00")
        if execute_at < datetime.now(UTC):
            err.print(f"note: --at {at} is in the past; the task starts now")
    try:
        param_obj = json.loads(params)
    except json.JSONDecodeError as e:
        fail(f"--params is not JSON: {e}")
    if not isinstance(param_obj, dict):
        fail('--params must be a JSON object, e.g. \'{"path": "/var/log"}\'')
    tid = task_id or f"task-{uuid.uuid4().hex[:12]}"

    async def go() -> int:
        async with EventDispatch(settings()) as ed:
            sub = await ed.submit(
                tid,
                script,
                device_list,
                script_version=version,
                execute_at=execute_at,
                max_attempts=max_attempts,
                timeout_s=timeout,
                priority=priority,
                params=param_obj,
            )
            if not as_json and sys.stderr.isatty():
                err.print("[dim]waiting for the planner to accept it...[/]")
            summary = await ed.wait_accepted(sub, accept_timeout)
            if not as_json:
                out.print(f"task [bold]{tid}[/] accepted: {plural(summary.total, 'device')}")
            if wait:
                summary = await _wait_with_progress(ed, tid, quiet=as_json)
            if as_json:
                out.print_json(data=summary.as_json())
            elif wait:
                _print_summary(summary)
            if not wait or summary.counts.get("succeeded", 0) == summary.total:
                return 0
            if not as_json:
                await _print_failures(ed, tid)
            return 1

    raise typer.Exit(_run(go()))


async def _wait_with_progress(ed: EventDispatch, task_id: str, quiet: bool) -> TaskSummary:
    if quiet:
        return await ed.wait_done(task_id)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=err, transient=False) as progress:
        bar = progress.add_task(task_id, total=None, detail="")

        def update(s: TaskSummary) -> None:
            detail = " ".join(f"{k}={v}" for k, v in _ordered(s.counts))
            progress.update(bar, total=s.total, completed=s.ended, detail=detail)

        return await ed.wait_done(task_id, on_progress=update)


def _ordered(counts: dict[str, int]) -> list[tuple[str, int]]:
    return sorted(
        counts.items(), key=lambda kv: STATE_ORDER.index(kv[0]) if kv[0] in STATE_ORDER else 99
    )


async def _print_failures(ed: EventDispatch, task_id: str, limit: int = 10) -> None:
    """Why devices did not succeed: the first few, and where to look for the rest."""
    found, total = await queries.unsuccessful(await ed.store(), task_id, limit)
    for doc in found:
        why = ": ".join(str(x) for x in (doc.get("reason_code"), doc.get("error")) if x)
        err.print(f"  {doc['device_id']}: {doc['state']} ({why or 'no reason recorded'})")
    if total > len(found):
        err.print(
            f"  ... and {total - len(found):,} more: eventdispatch audit --task {task_id} --stats"
        )


def _print_summary(summary: TaskSummary) -> None:
    t = summary.task
    out.print(f"task [bold]{t['_id']}[/], script {t['script_id']} v{t['script_version']}")
    table = Table()
    table.add_column("state")
    table.add_column("executions", justify="right")
    for state, n in _ordered(summary.counts):
        table.add_row(state, str(n))
    pending = summary.total - sum(summary.counts.values())
    if pending:
        table.add_row("not yet created", str(pending))
    table.add_row("[bold]total[/]", f"[bold]{summary.total}[/]")
    out.print(table)


@app.command()
def status(
    task_id: Annotated[str, typer.Argument(help="The task to show.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show a task and how many of its devices are in each state (from the projections)."""

    s = settings()

    async def go() -> int:
        async with EventDispatch(s) as ed:
            summary = await ed.status(task_id)
        if summary is None:
            fail(
                f"no task {task_id!r} in the projections of namespace {s.namespace!r}, "
                f"database {s.mongo_db!r} (rejected, mistyped, not yet projected, or another "
                "namespace: see EVENTDISPATCH_NAMESPACE and EVENTDISPATCH_MONGO_DB)"
            )
        if as_json:
            out.print_json(data=summary.as_json())
        else:
            _print_summary(summary)
        return 0

    raise typer.Exit(_run(go()))


@app.command()
def cancel(
    task_id: Annotated[str, typer.Argument(help="The task to cancel.")],
    devices: Annotated[
        str | None, typer.Option(help="Only these devices (comma-separated); all by default.")
    ] = None,
    reason: Annotated[str, typer.Option(help="Why; stored with each Canceled event.")] = "",
    accept_timeout: Annotated[
        float, typer.Option(help="Seconds to wait for the planner's verdict.", min=0.1)
    ] = 30,
) -> None:
    """Cancel a task's executions that have not ended; running attempts are stopped. Exits 1
    if the cancel was rejected, 3 if no planner answered within --accept-timeout (the cancel
    stays queued, behind the commands before it)."""
    device_list = [d for d in devices.split(",") if d] if devices else None

    async def go() -> int:
        async with EventDispatch(settings()) as ed:
            command_id = await ed.cancel(task_id, device_list, reason)
            await ed.wait_cancel_accepted(task_id, command_id, accept_timeout)
        out.print(f"cancel accepted for task [bold]{task_id}[/]: its live executions end now")
        return 0

    raise typer.Exit(_run(go()))


@tasks_app.command("list")
def tasks_list(
    state: Annotated[
        str | None, typer.Option(help="Only tasks that are `running` or `done`.")
    ] = None,
    limit: Annotated[int, typer.Option(help="How many of the newest tasks.")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """The newest tasks, with how many devices are in each state."""
    if state not in (None, "running", "done"):
        fail(f"--state must be running or done, not {state!r}")

    async def go() -> int:
        async with EventDispatch(settings()) as ed:
            found = await queries.tasks_overview(await ed.store(), limit)
        if state is not None:
            found = [s for s in found if s.done == (state == "done")]
        if as_json:
            out.print_json(data=[s.as_json() for s in found])
            return 0
        table = Table("task", "script", "devices", "states", "done")
        for s in found:
            states = " ".join(f"{k}={v}" for k, v in _ordered(s.counts))
            table.add_row(
                s.task["_id"],
                f"{s.task['script_id']} v{s.task['script_version']}",
                str(s.total),
                states,
                "yes" if s.done else "no",
            )
        out.print(table if found else "no tasks")
        return 0

    raise typer.Exit(_run(go()))


@device_app.command("show")
def device_show(
    device_id: Annotated[str, typer.Argument(help="The device to show.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """What a device runs now, what waits for it, and its last attempts."""

    async def go() -> int:
        async with EventDispatch(settings()) as ed:
            view = await queries.device_view(await ed.store(), device_id)
        if view.device is None:
            fail(f"no device {device_id!r} in the projections: no task has named it yet")
        if as_json:
            out.print_json(
                data={
                    "device": view.device,
                    "executions": view.executions,
                    "attempts": view.attempts,
                },
                default=str,
            )
            return 0
        d = view.device
        doing = f"busy with {d['current_task']}" if d["busy"] else "idle"
        out.print(f"device [bold]{device_id}[/]: {doing}, {d['queued']} queued")
        table = Table("task", "state", "attempt", "created")
        for x in view.executions:
            table.add_row(x["task_id"], x["state"], str(x["attempt"]), _time(x["created_at_ms"]))
        if view.executions:
            out.print(table)
        attempts = Table("attempt", "locked", "outcome", "error", title="last attempts")
        for a in view.attempts:
            attempts.add_row(
                a["_id"], _time(a["locked_at_ms"]), a["outcome"] or a["state"], a["error"] or ""
            )
        if view.attempts:
            out.print(attempts)
        return 0

    raise typer.Exit(_run(go()))


def _time(ms: int | None) -> str:
    return (
        "-"
        if ms is None
        else datetime.fromtimestamp(ms / 1000).astimezone().isoformat(timespec="seconds")
    )


@app.command()
def lag() -> None:
    """How far the projector is behind the log: messages not yet applied per topic, and the
    age of the newest event it applied when any are waiting."""
    from eventdispatch import admin

    s = settings()

    async def checkpoint() -> dict[str, Any] | None:
        async with EventDispatch(s) as ed:
            return await (await ed.store()).db.projection_meta.find_one({"_id": "checkpoint"})

    last = _run(checkpoint())
    table = Table("topic", "subscription", "behind (messages)", "behind (seconds)")
    for topic, sub in (("events", "projector"), ("device-logs", "projector-logs")):
        n = admin.backlog(s, topic, sub)
        seconds = "-"
        if topic == "events" and n and last:
            seconds = f"{max(0.0, time.time() - last['published_at_ms'] / 1000):.1f}"
        elif n == 0:
            seconds = "0"
        table.add_row(topic, sub, "no projector yet" if n is None else f"{n:,}", seconds)
    out.print(table)


@app.command()
def rebuild(
    projection: Annotated[
        list[str] | None,
        typer.Option(
            "--projection",
            help="A read model to rebuild (repeatable): executions, attempts, devices, tasks, "
            "scripts, rejections, logs. All by default.",
        ),
    ] = None,
    verify: Annotated[
        bool,
        typer.Option(
            "--verify",
            help="Rebuild into a shadow generation, print how it differs from the live one "
            "and drop it; exit 1 if anything differs. Run it while no traffic flows.",
        ),
    ] = False,
) -> None:
    """Rebuild read models from the log into a new generation and switch readers to it.

    The live generation is untouched until the switch; a running projector
    follows the switch by itself. An interrupted rebuild is discarded by the
    next one."""
    from projections import rebuild as rb
    from projections.store import ALL_MODELS

    models = tuple(projection or ALL_MODELS)
    unknown = sorted(set(models) - set(ALL_MODELS))
    if unknown:
        fail(f"unknown projection {', '.join(unknown)}; choose from {', '.join(ALL_MODELS)}")
    with _entries_bar("rebuild") as shown:
        outcome = asyncio.run(rb.rebuild(settings(), models, verify, shown))
    out.print(
        f"read {outcome.events:,} messages in {outcome.seconds:.1f}s "
        f"({outcome.rate:,.0f}/s) into generation {outcome.generation}"
    )
    if verify:
        if not outcome.differences:
            out.print("[green]no differences[/]: the rebuilt projections equal the live ones")
            return
        table = Table("model", "document", "live", "rebuilt")
        for d in outcome.differences[:50]:
            table.add_row(d.model, d.key, _short(d.live), _short(d.rebuilt))
        out.print(table)
        fail(f"{len(outcome.differences)} document(s) differ between live and rebuilt")
    out.print(f"switched {', '.join(models)} to generation {outcome.generation}")


@contextmanager
def _entries_bar(label: str) -> Iterator[bus.Progress]:
    """A progress bar for reading topics, counted in broker entries (what the broker can
    count ahead: a batched entry holds several messages), with the messages' rate beside it;
    yields the callbacks to hand the reader."""
    columns = (
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("entries"),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err) as progress:
        bar = progress.add_task(label, total=None, rate="")
        started = time.monotonic()
        messages = 0

        def total(entries: int) -> None:  # once per topic
            task = progress.tasks[bar]
            progress.update(bar, total=(task.total or 0) + entries)

        def advance(entries: int, read: int) -> None:
            nonlocal messages
            messages += read
            rate = messages / max(time.monotonic() - started, 1e-6)
            progress.update(bar, advance=entries, rate=f"{rate:,.0f} events/s")

        yield bus.Progress(total, advance)


def _short(doc: dict[str, Any] | None) -> str:
    if doc is None:
        return "(missing)"
    return json.dumps({k: v for k, v in doc.items() if k != "_id"}, default=str)[:120]


def _run(coro: Any) -> Any:
    """Run a client coroutine, turning the errors a user can act on into one clear line."""
    try:
        return asyncio.run(coro)
    except CommandRejected as e:
        fail(f"rejected: {e.code}: {e.reason}")
    except TimeoutError as e:
        fail(str(e), code=NO_ANSWER)
    except Exception as e:  # connection trouble: say what and where, not a traceback
        name = type(e).__name__
        if "Pulsar" in name or "ServerSelection" in name or "Connect" in name:
            hint = "is the stack up? (eventdispatch stack status)"
            fail(f"cannot reach a service ({name}: {e}); {hint}")
        raise


@app.command()
def bench(
    only: Annotated[
        str,
        typer.Option(
            help="Parts to run, comma-separated: floor (raw pulsar-client round trip), e2e "
            "(executions/s, command to Succeeded projected), latency (command to Sent at a "
            "fixed rate), timers (lateness of scheduled starts and timeouts), fanout (a "
            "100,000-device task, peak memory), projector and rebuild (events/s).",
        ),
    ] = "floor,e2e,latency,timers,fanout,projector,rebuild",
    json_out: Annotated[Path, typer.Option(help="Where to write the results as JSON.")] = Path(
        "bench-results.json"
    ),
    workers: Annotated[str, typer.Option(help="Worker process counts for e2e.")] = "1,2",
    devices: Annotated[str, typer.Option(help="Fleet sizes for e2e.")] = "1000,10000",
    rate: Annotated[float, typer.Option(help="Commands/s offered in the latency part.")] = 200,
    duration: Annotated[float, typer.Option(help="Seconds the latency part offers them.")] = 10,
    fanout_devices: Annotated[int, typer.Option(help="Devices of the fan-out task.")] = 100_000,
    projector_devices: Annotated[
        int, typer.Option(help="Executions in the log the projector and rebuild parts read.")
    ] = 5_000,
    keep: Annotated[
        bool, typer.Option(help="Keep the scratch namespaces, databases and Redis keys.")
    ] = False,
    profile: Annotated[
        Path | None,
        typer.Option(
            help="py-spy record every process of the e2e runs into this folder (collapsed "
            "stacks; needs `pip install py-spy`)."
        ),
    ] = None,
) -> None:
    """Measure the service on the running stack and print a table.

    Each part runs its own simulator (zero latency) and service processes in a
    scratch namespace, database and Redis prefix, deleted afterwards. Record the
    machine's load with the numbers (it is in the JSON): these are benchmark
    figures, not tests. All parts take 30 to 45 minutes on a loaded 2-core
    machine, most of it the 10,000-device e2e runs; `--devices 1000` or `--only
    floor,latency` take a few minutes. See docs/benchmarks.md."""
    from eventdispatch import bench as b

    try:
        parts = b.parse_list(only, b.PARTS)
        opts = b.Options(
            workers=[int(w) for w in b.parse_list(workers)],
            devices=[int(d) for d in b.parse_list(devices)],
            rate=rate,
            duration_s=duration,
            fanout_devices=fanout_devices,
            projector_devices=projector_devices,
            keep=keep,
            log=lambda m: err.print(f"[dim]{m}[/]"),
            profile=str(profile) if profile else None,
        )
    except ValueError as e:
        fail(str(e))
    if profile and b.py_spy_path() is None:
        fail("--profile needs py-spy, which is not installed: pip install py-spy")
    result = b.run(parts, opts)
    json_out.write_text(json.dumps(result, indent=2) + "\n")
    table = Table("part", "measurement", "value", "target", title="eventdispatch bench")
    for row in b.rows(result):
        table.add_row(*row)
    out.print(table)
    m = result["machine"]
    out.print(
        f"load average {m['load_average_at_start']} -> {m['load_average_at_end']} on "
        f"{m['cpus']} CPUs; workers: {m['workers_mode']}; JSON: {json_out}"
    )


from eventdispatch.audit_cli import audit  # noqa: E402

app.command()(audit)


def main() -> None:
    """Run the CLI, then leave without the interpreter's finalization.

    pulsar-client with a Python logger aborts now and then while the interpreter tears down
    (`terminate called without an active exception`, exit -6, after every client was closed;
    apache/pulsar-client-python#256): a client thread still waiting to log is destroyed.
    Everything a command writes is flushed or closed by the time it returns, so the exit
    code is taken, the streams flushed and the process ends with `os._exit`."""
    try:
        app()
        code: object = 0
    except SystemExit as stop:
        code = stop.code
    except KeyboardInterrupt:
        code = 130
    except Exception:  # a bug: the traceback as Python would print it, then the same exit
        exc_type, exc, tb = sys.exc_info()
        assert exc_type is not None and exc is not None
        sys.excepthook(exc_type, exc, tb)
        code = 1
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        # a reader that went away (`| head`) or a closed stream has nothing left to get
        with suppress(BrokenPipeError, ValueError):
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
