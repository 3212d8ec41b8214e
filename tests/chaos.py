"""The chaos run (issue 4): the service keeps its promises while its parts crash.

On a private stack (its own ports and data folder, so restarting the broker and Redis disturbs
nothing else on the machine), with `eventdispatch run --workers 2` and a Central Control
simulator that answers 5% of calls with 503 and hangs on 1%, it submits tasks covering
`executions` (task, device) pairs over `devices` devices. Meanwhile it SIGKILLs a random
working (started) worker every few seconds, and at least once per twelfth of the work, and
restarts Redis, the broker and MongoDB once each. When every execution has ended in the
projections it stops the service with SIGTERM (which must exit 0) and checks, from the
simulator's record, the events log and the projections:

    I1  a device never has two attempts between Locked and their end at once (log), and
        Central Control never accepted an attempt on a device before the previous one there
        finished (record);
    I2  every (task, device) has exactly one terminal event, and the projection agrees;
    I3  Central Control accepted each exec_id at most once;
    I6  on each device, first attempts were locked in the order the tasks were accepted;
    I7  every submitted task was accepted and every one of its executions ended.

    python -m tests.chaos --executions 20000 --devices 2000     # make chaos
    tests/integration/test_chaos.py runs a short one in the suite.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import itertools
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pulsar
import pymongo

from eventdispatch import stack, wire
from eventdispatch.client import EventDispatch
from eventdispatch.config import Settings
from eventdispatch.events import Event
from projections.reducers import TERMINAL_STATES

ROOT = Path(__file__).resolve().parents[1]
TERMINAL_EVENTS = {"Succeeded", "Failed", "Canceled"}
ATTEMPT_ENDS = {"Succeeded", "Failed", "Canceled", "Retrying"}
BEHAVIOUR = [{"devices": "*", "error_rate": 0.05, "hang_rate": 0.01, "hang_s": 5}]


@dataclass
class Report:
    """What happened and what was checked; `violations` is empty when all invariants hold."""

    executions: int = 0
    devices: int = 0
    tasks: int = 0
    seconds: float = 0.0
    kills: int = 0
    restarts: int = 0
    redis_restarts: int = 0
    broker_restarts: int = 0
    mongo_restarts: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    accepted_calls: int = 0
    repeated_calls: int = 0
    events: int = 0
    drained_exit: int | None = None
    violations: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        return [
            f"executions      {self.executions:,} over {self.devices:,} devices in "
            f"{self.tasks} tasks, {self.seconds:.0f}s",
            f"outcomes        {dict(sorted(self.outcomes.items()))}",
            f"chaos           {self.kills} worker SIGKILLs, {self.restarts} restarts by the "
            f"supervisor, {self.redis_restarts} Redis, {self.broker_restarts} broker and "
            f"{self.mongo_restarts} MongoDB restart",
            f"central control {self.accepted_calls:,} attempts accepted, "
            f"{self.repeated_calls:,} repeated calls answered from the Idempotency-Key",
            f"log             {self.events:,} events",
            f"SIGTERM         supervisor exit {self.drained_exit}",
            "invariants      "
            + ("I1 I2 I3 I6 I7 hold" if not self.violations else f"{len(self.violations)} broken"),
            *(f"  - {v}" for v in self.violations[:30]),
        ]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def private_settings(folder: Path) -> Settings:
    """A stack of its own: every port free, data under `folder`."""
    pulsar_port, http_port, mongo_port, redis_port = (_free_port() for _ in range(4))
    return Settings(
        stack_dir=folder / "stack",
        pulsar_port=pulsar_port,
        pulsar_http_port=http_port,
        pulsar_bookie_port=_free_port(),
        pulsar_url=f"pulsar://127.0.0.1:{pulsar_port}",
        pulsar_admin_url=f"http://127.0.0.1:{http_port}",
        mongo_port=mongo_port,
        mongo_url=f"mongodb://127.0.0.1:{mongo_port}",
        redis_port=redis_port,
        redis_url=f"redis://127.0.0.1:{redis_port}/0",
        namespace="chaos",
        mongo_db="chaos",
        redis_prefix="chaos",
        central_url=f"http://127.0.0.1:{_free_port()}",
        health_port=_free_port(),
        central_http_timeout_s=2.0,
        retry_base_s=0.2,
        retry_cap_s=1.0,
        delivery_backoff_base_s=0.05,
        delivery_backoff_cap_s=0.5,
        drain_grace_s=10.0,
        pulsar_heap="768m",
    )


def _env(settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    for name, value in settings.model_dump().items():
        env[f"EVENTDISPATCH_{name.upper()}"] = str(value)
    return env


@contextmanager
def _process(argv: list[str], settings: Settings, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("ab") as out:
        proc = subprocess.Popen(argv, env=_env(settings), stdout=out, stderr=out, cwd=ROOT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_for(what: str, check: Any, timeout: float, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.2)
    tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
    raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}\n{tail}")


class _Finished:
    """Counts the simulator's `finished` records as they are appended."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.seen = 0

    def count(self) -> int:
        if self.path.exists():
            with self.path.open("rb") as f:
                f.seek(self.offset)
                chunk = f.read()
            whole = chunk[: chunk.rfind(b"\n") + 1]
            self.offset += len(whole)
            self.seen += whole.count(b'"event": "finished"')
        return self.seen


def _workers(settings: Settings) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{settings.health_port}/status"
    workers: list[dict[str, Any]] = httpx.get(url, timeout=2).json()["workers"]
    return workers


def _ended(settings: Settings) -> int:
    client: pymongo.MongoClient[dict[str, Any]]
    with pymongo.MongoClient(settings.mongo_url, serverSelectionTimeoutMS=2000) as client:
        return client[settings.mongo_db]["g1_executions"].count_documents(
            {"state": {"$in": list(TERMINAL_STATES)}}
        )


def _projected_states(settings: Settings) -> dict[str, str]:
    client: pymongo.MongoClient[dict[str, Any]]
    with pymongo.MongoClient(settings.mongo_url) as client:
        docs: pymongo.cursor.Cursor[dict[str, Any]] = client[settings.mongo_db][
            "g1_executions"
        ].find()
        return {str(d["_id"]): str(d["state"]) for d in docs}


TASK_TIMEOUT_S = 120
"""Long enough for a result to wait behind every Enqueue submitted up front on a loaded
machine (with 20 s, queueing alone timed out most first attempts); short enough that a
result lost with the broker's restart is retried within the run."""


async def _submit(settings: Settings, plan: list[tuple[str, list[str]]]) -> None:
    async with EventDispatch(settings) as ed:
        await ed.register_script("chaos", "echo chaos", timeout_s=120)
        for task_id, devices in plan:
            await ed.submit(task_id, "chaos", devices, max_attempts=5, timeout_s=TASK_TIMEOUT_S)


def read_events(settings: Settings) -> list[Event]:
    client = pulsar.Client(
        settings.pulsar_url, logger=pulsar.ConsoleLogger(pulsar.LoggerLevel.Error)
    )
    try:
        reader = client.create_reader(
            settings.topic("events"), pulsar.MessageId.earliest, schema=wire.AvroCodec("events")
        )
        out = []
        while reader.has_message_available():
            out.append(wire.event_from_record(reader.read_next(10_000).value()))
        reader.close()
        return out
    finally:
        client.close()


def check(
    plan: list[tuple[str, list[str]]],
    events: list[Event],
    record: list[dict[str, Any]],
    projected: dict[str, str],
    report: Report,
) -> None:
    """The invariants, from the log, the simulator's record and the projected states."""
    v = report.violations
    unique = list({e.event_id: e for e in events}.values())  # a retried publish: same id
    report.events = len(unique)

    accepted_order = [e.task_id for e in unique if e.type == "TaskAccepted"]
    for task_id, _ in plan:  # I7
        if task_id not in accepted_order:
            v.append(f"I7: task {task_id} was submitted but never accepted")
    rank = {t: i for i, t in enumerate(accepted_order)}

    terminal: dict[tuple[str, str], set[str]] = collections.defaultdict(set)
    by_device: dict[str, list[Event]] = collections.defaultdict(list)
    for e in unique:
        if e.device_id is not None and e.task_id is not None:
            by_device[e.device_id].append(e)
            if e.type in TERMINAL_EVENTS:
                terminal[(e.task_id, e.device_id)].add(e.type)
    for task_id, devices in plan:  # I2 and I7
        for d in devices:
            ends = terminal.get((task_id, d), set())
            if len(ends) != 1:
                v.append(f"I2: {task_id} on {d} ended {len(ends)} ways: {sorted(ends)}")
            state = projected.get(f"{task_id}:{d}")
            if ends and state != next(iter(ends)).lower():
                v.append(f"I2: {task_id} on {d} projected {state}, the log says {ends}")
    report.outcomes = dict(collections.Counter(projected.values()))

    for device, evs in by_device.items():
        evs.sort(key=lambda e: e.seq)
        active: str | None = None
        first_locks: list[str] = []
        for e in evs:  # I1 from the log
            key = f"{e.task_id}:{e.attempt}"
            if e.type == "Locked":
                if active is not None:
                    v.append(f"I1: {device} locked {key} while {active} was running")
                active = key
                if e.attempt == 1:
                    first_locks.append(e.task_id or "")
            elif e.type in ATTEMPT_ENDS and (
                active == key
                or (e.type == "Canceled" and (active or "").startswith(f"{e.task_id}:"))
            ):
                active = None
        ranks = [rank.get(t, -1) for t in first_locks]  # I6
        if ranks != sorted(ranks):
            v.append(f"I6: {device} started tasks out of acceptance order: {first_locks}")

    accepted = collections.Counter(r["exec_id"] for r in record if r["event"] == "accepted")
    report.accepted_calls = len(accepted)
    report.repeated_calls = sum(1 for r in record if r["event"] == "repeat")
    for exec_id, n in accepted.items():  # I3
        if n > 1:
            v.append(f"I3: Central Control accepted {exec_id} {n} times")
    windows: dict[str, list[tuple[int, int, str]]] = collections.defaultdict(list)
    finished = {r["exec_id"]: r["at_ms"] for r in record if r["event"] == "finished"}
    for r in record:
        if r["event"] == "accepted" and r["exec_id"] in finished:
            windows[r["device_id"]].append((r["at_ms"], finished[r["exec_id"]], r["exec_id"]))
    for device, spans in windows.items():  # I1 as the device saw it
        spans.sort()
        for (_, end, a), (start, _, b) in itertools.pairwise(spans):
            if start < end:
                v.append(f"I1: {device} accepted {b} at {start} before {a} finished at {end}")


def run(
    executions: int,
    devices: int,
    workers: int = 2,
    kill_every_s: float = 6.0,
    timeout_s: float = 1800.0,
    folder: Path | None = None,
    say: Any = print,
) -> Report:
    """One chaos run; see the module docstring."""
    own = folder is None
    folder = Path(tempfile.mkdtemp(prefix="chaos-")) if folder is None else folder
    settings = private_settings(folder)
    per_task = min(devices, max(1, devices // 2))
    fleet = [f"chaos-{i:05d}" for i in range(devices)]
    rnd = random.Random(4)
    plan: list[tuple[str, list[str]]] = []
    left = executions
    while left > 0:
        size = min(per_task, left)
        plan.append((f"chaos-task-{len(plan):03d}", rnd.sample(fleet, size)))
        left -= size
    report = Report(executions=executions, devices=devices, tasks=len(plan))
    say(f"chaos: private stack in {folder}; {executions:,} executions, {len(plan)} tasks")
    stack.up(settings, log=lambda m: None)
    try:
        behaviour = folder / "behaviour.json"
        behaviour.write_text(json.dumps(BEHAVIOUR))
        record = folder / "record.jsonl"
        sim_argv = [sys.executable, "-m", "eventdispatch.cli", "simulate"]
        sim_argv += ["--port", settings.central_url.rsplit(":", 1)[1], "--record", str(record)]
        sim_argv += ["--behaviour", str(behaviour), "--latency-ms", "5:20"]
        svc_argv = [sys.executable, "-m", "eventdispatch.cli", "run", "--workers", str(workers)]
        svc_log = folder / "service.log"
        with (
            _process(sim_argv, settings, folder / "simulator.log"),
            _process(svc_argv, settings, svc_log) as service,
        ):
            _wait_for(
                "the workers", lambda: all(w["ready"] for w in _workers(settings)), 120, svc_log
            )
            started = time.monotonic()
            asyncio.run(_submit(settings, plan))
            say(f"chaos: submitted; killing a worker every {kill_every_s:.0f}s")
            redis_done = broker_done = mongo_done = False
            next_kill = time.monotonic() + kill_every_s
            # Also a kill every twelfth of the work, so a run that goes fast (a quiet machine
            # did 1,000 executions in 30 s) still sees its workers die many times.
            kill_step = max(1, executions // 12)
            next_kill_at = kill_step
            last_kill = 0.0
            deadline = started + timeout_s
            ended = 0
            finished = _Finished(record)  # the devices' progress, ahead of the projections
            while ended < executions:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"only {ended}/{executions} executions ended in {timeout_s}s"
                    )
                now = time.monotonic()
                done = finished.count()
                due = now >= next_kill or done >= next_kill_at
                if due and now >= last_kill + 1.0:
                    victims = [  # a worker at work, not one still starting
                        w
                        for w in _safe_workers(settings)
                        if w["role"] == "stages" and w["pid"] and w["alive"] and w["stages"]
                    ]
                    if victims:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(rnd.choice(victims)["pid"], signal.SIGKILL)
                            report.kills += 1
                            last_kill = now
                    next_kill = now + kill_every_s
                    next_kill_at = done + kill_step
                if not redis_done and done >= executions * 0.2:
                    say(f"chaos: restarting Redis at {done:,} finished on the devices")
                    stack.down(settings, log=lambda m: None, only=("redis",))
                    stack.up(settings, log=lambda m: None)
                    redis_done, report.redis_restarts = True, 1
                if not broker_done and done >= executions * 0.45:
                    say(f"chaos: restarting the broker at {done:,} finished on the devices")
                    stack.down(settings, log=lambda m: None, only=("pulsar",))
                    stack.up(settings, log=lambda m: None)
                    broker_done, report.broker_restarts = True, 1
                if not mongo_done and done >= executions * 0.7:
                    say(f"chaos: restarting MongoDB at {done:,} finished on the devices")
                    stack.down(settings, log=lambda m: None, only=("mongo",))
                    stack.up(settings, log=lambda m: None)
                    mongo_done, report.mongo_restarts = True, 1
                time.sleep(0.5)
                with contextlib.suppress(pymongo.errors.PyMongoError):
                    ended = _ended(settings)
            report.seconds = time.monotonic() - started
            report.restarts = sum(w["restarts"] for w in _safe_workers(settings))
            service.send_signal(signal.SIGTERM)
            report.drained_exit = service.wait(120)
        projected = _projected_states(settings)
        lines = [json.loads(x) for x in record.read_text().splitlines() if x.strip()]
        check(plan, read_events(settings), lines, projected, report)
        if report.drained_exit != 0:
            report.violations.append(f"SIGTERM: the supervisor exited {report.drained_exit}")
        return report
    finally:
        stack.down(settings, log=lambda m: None)
        if own and not os.environ.get("CHAOS_KEEP"):
            shutil.rmtree(folder, ignore_errors=True)


def _safe_workers(settings: Settings) -> list[dict[str, Any]]:
    try:
        return _workers(settings)
    except httpx.HTTPError:
        return []


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--executions", type=int, default=20_000)
    parser.add_argument("--devices", type=int, default=2_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--kill-every", type=float, default=6.0, help="seconds between SIGKILLs")
    parser.add_argument("--timeout", type=float, default=3600.0)
    args = parser.parse_args()
    report = run(args.executions, args.devices, args.workers, args.kill_every, args.timeout)
    print("\n".join(report.lines()))
    sys.exit(1 if report.violations else 0)


if __name__ == "__main__":
    main()
