"""Benchmark of `eventdispatch audit` on a log of 1,000,000 events spread over 24 hours.

    python benchmarks/audit_log.py            # generate, measure, delete the scratch namespace
    python benchmarks/audit_log.py --keep     # keep it, to try more queries by hand
    python benchmarks/audit_log.py --log-only --namespace rebuild-bench --span-h 1
                                              # only write (and keep) the log, e.g. to
                                              # time `eventdispatch rebuild` on it

The log is written by the device decider itself (`decider.decide`) fed the inputs a fleet sees
(deliveries, results, timeouts, retries, cancels), so every event has a real shape, a correct
per-device `seq` and the service's key (device id; task id for TaskAccepted). It is published
with the project's codec and producer settings (`Bus`) into a scratch namespace.

Publish time is stamped by the client from its clock, and the audit seeks by it. To get a log
whose publish times span a day without waiting a day, the generator runs with a tiny
LD_PRELOAD shim (`SHIM_SOURCE` below, compiled with the system's cc) that adds an offset to
the process's wall clock: before each task the generator moves the offset to that task's place
in the day, so event time and publish time move together, as in the service. Monotonic clocks
are untouched, so the client's timers are not. (libfaketime does the same, but changing its
offset at run time made publishing 10 to 100 times slower.) Without a C compiler the log spans
only the minutes its publication takes, and the script says so.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import ctypes
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from eventdispatch import admin, wire
from eventdispatch import events as ev
from eventdispatch.audit import iso
from eventdispatch.bus import Bus, Outgoing, publish
from eventdispatch.config import Settings
from eventdispatch.decider import DeviceState, RetryPolicy, decide
from eventdispatch.events import Event
from eventdispatch.inputs import (
    CancelRequested,
    Delivery,
    DeliveryOutcome,
    Enqueue,
    Input,
    ResultReported,
    TimerFired,
    TimerKind,
)

ROOT = Path(__file__).resolve().parents[1]
HOUR_MS = 3_600_000
POLICY = RetryPolicy()
SCRIPTS = ("check-disk", "rotate-logs", "update-agent", "collect-metrics", "reboot-if-needed")
# (weight, outcome of each attempt): most succeed at once; some retry, time out, fail or cancel.
PLANS: tuple[tuple[float, tuple[str, ...]], ...] = (
    (0.86, ("SUCCESS",)),
    (0.05, ("ERROR", "SUCCESS")),
    (0.03, ("SILENT", "SUCCESS")),
    (0.02, ("ERROR", "ERROR", "ERROR")),
    (0.02, ("SILENT", "SILENT", "SILENT")),
    (0.02, ("CANCEL",)),
)


def device_name(i: int) -> str:
    return f"bench-dev-{i:05d}"


def attempt_inputs(task_id: str, device: str, plan: tuple[str, ...]) -> list[Input]:
    """The inputs one execution receives after its Enqueue, attempt by attempt."""
    out: list[Input] = []
    for attempt, outcome in enumerate(plan, start=1):
        out.append(DeliveryOutcome(task_id, attempt, Delivery.ACCEPTED))
        exec_key = ev.exec_id(task_id, device, attempt)
        if outcome == "CANCEL":
            out.append(CancelRequested(task_id, "operator request"))
            return out
        if outcome == "SUCCESS":
            out.append(ResultReported(exec_key, "SUCCESS", "exit 0"))
            return out
        if outcome == "ERROR":
            out.append(ResultReported(exec_key, "ERROR", "exit 1: disk full"))
        else:
            out.append(TimerFired(TimerKind.TIMEOUT_AT, task_id, attempt, 0))
        if attempt < len(plan):
            out.append(TimerFired(TimerKind.RETRY_AT, task_id, attempt, 0))
    return out


@dataclass
class Fleet:
    """Device states across tasks; each task's executions run to their end before the next."""

    n_devices: int
    rng: random.Random
    states: dict[str, DeviceState] = field(default_factory=dict)
    tasks: int = 0

    def task(self) -> list[Event]:
        """One task to a random set of devices, its executions interleaved step by step."""
        now_ms = int(time.time() * 1000)
        self.tasks += 1
        task_id = f"bench-task-{self.tasks:06d}"
        size = self.rng.randint(min(100, self.n_devices), min(2000, self.n_devices))
        devices = [device_name(i) for i in self.rng.sample(range(self.n_devices), size)]
        script = self.rng.choice(SCRIPTS)
        accepted = ev.TaskAccepted(
            f"cmd-{task_id}", script, 1, tuple(devices), None, 3, 60, 0, "{}", "fp"
        )
        out = [Event(f"task:{task_id}:accepted", now_ms, 0, None, task_id, None, accepted)]
        weights = [w for w, _ in PLANS]
        queues: dict[str, list[Input]] = {}
        for d in devices:
            plan = self.rng.choices([p for _, p in PLANS], weights)[0]
            enqueue = Enqueue(task_id, script, 1, None, len(plan), 60, 0)
            queues[d] = [enqueue, *attempt_inputs(task_id, d, plan)]
        step = 0
        while queues:
            for d in list(queues):
                inputs = queues[d]
                if step >= len(inputs):
                    del queues[d]
                    continue
                decision = decide(self.states.get(d) or DeviceState(d), inputs[step], now_ms)
                self.states[d] = decision.state
                out.extend(decision.events)
            step += 1
        return out


def key_of(event: Event) -> str:
    """The service's message key: device id for execution events, else task id or event id."""
    return event.device_id or event.task_id or event.event_id


SHIM_SOURCE = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <sys/time.h>
#include <time.h>

long long shift_clock_ms = 0; /* set from Python with ctypes */

int clock_gettime(clockid_t clk, struct timespec *ts) {
    static int (*real)(clockid_t, struct timespec *);
    if (!real) real = dlsym(RTLD_NEXT, "clock_gettime");
    int rc = real(clk, ts);
    if (rc == 0 && (clk == CLOCK_REALTIME || clk == CLOCK_REALTIME_COARSE)) {
        long long ns = ts->tv_sec * 1000000000LL + ts->tv_nsec + shift_clock_ms * 1000000LL;
        ts->tv_sec = ns / 1000000000LL;
        ts->tv_nsec = ns % 1000000000LL;
    }
    return rc;
}

int gettimeofday(struct timeval *tv, void *tz) {
    static int (*real)(struct timeval *, void *);
    if (!real) real = dlsym(RTLD_NEXT, "gettimeofday");
    int rc = real(tv, tz);
    if (rc == 0 && tv) {
        long long us = tv->tv_sec * 1000000LL + tv->tv_usec + shift_clock_ms * 1000LL;
        tv->tv_sec = us / 1000000LL;
        tv->tv_usec = us % 1000000LL;
    }
    return rc;
}
"""


def build_shim(directory: Path) -> Path | None:
    """Compile the clock shim; None without a C compiler."""
    source, library = directory / "shift_clock.c", directory / "shift_clock.so"
    source.write_text(SHIM_SOURCE)
    try:
        subprocess.run(["cc", "-shared", "-fPIC", "-O2", "-o", library, source, "-ldl"], check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return library


class Clock:
    """This process's wall clock, moved by the shim when it is preloaded."""

    def __init__(self) -> None:
        try:
            self._shift: ctypes.c_longlong | None = ctypes.c_longlong.in_dll(
                ctypes.CDLL(None), "shift_clock_ms"
            )
        except ValueError:  # not preloaded
            self._shift = None

    @property
    def movable(self) -> bool:
        return self._shift is not None

    def move_to(self, target_ms: int) -> None:
        if self._shift is not None:
            self._shift.value = 0
            self._shift.value = target_ms - int(time.time() * 1000)


async def publish_log(
    settings: Settings, n_events: int, n_devices: int, seed: int, start_ms: int, span_ms: int
) -> tuple[list[int], list[str]]:
    """Publish the log; returns every event's time, for counting what a window holds, and
    when each task started."""
    clock = Clock()
    fleet = Fleet(n_devices, random.Random(seed))
    bus = Bus(settings)
    producer = await bus.producer("events")
    times: list[int] = []
    starts: list[str] = []  # "first event time, task id" per task
    try:
        while len(times) < n_events:
            clock.move_to(start_ms + span_ms * len(times) // n_events)
            batch = fleet.task()[: n_events - len(times)]
            items = [Outgoing(wire.event_to_record(e), key_of(e)) for e in batch]
            await publish(producer, items)
            times += [e.occurred_at_ms for e in batch]
            starts.append(f"{batch[0].occurred_at_ms} {batch[0].task_id}")
            print(f"\rpublished {len(times):,}/{n_events:,}", end="", file=sys.stderr)
    finally:
        print(file=sys.stderr)
        await producer.close()
        await bus.close()
        clock.move_to(int(time.time() * 1000))
    return sorted(times), starts


def generate(args: argparse.Namespace, settings: Settings) -> None:
    """Runs in a child process with the clock shim; writes the event times for the parent."""
    start_ms = args.start_ms
    t0 = time.perf_counter()
    times, starts = asyncio.run(
        publish_log(settings, args.events, args.devices, args.seed, start_ms, args.span_h * HOUR_MS)
    )
    elapsed = time.perf_counter() - t0
    Path(args.times_file).write_text("\n".join(map(str, times)))
    Path(args.times_file + ".tasks").write_text("\n".join(starts))
    print(f"published {len(times):,} events in {elapsed:.0f} s ({len(times) / elapsed:,.0f}/s)")


def run_audit(settings: Settings, *args: str) -> tuple[float, str]:
    """One `eventdispatch audit` run as a user starts it (process start included)."""
    env = {**os.environ, "EVENTDISPATCH_NAMESPACE": settings.namespace}
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "eventdispatch.cli", "audit", "--no-progress", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"audit {args} exited {proc.returncode}: {proc.stderr}")
    return elapsed, proc.stdout


def in_window(times: list[int], since: int, until: int) -> int:
    return bisect.bisect_right(times, until) - bisect.bisect_left(times, since)


def measure(
    settings: Settings,
    label: str,
    repeats: int,
    times: list[int],
    span: tuple[int, int],
    *args: str,
) -> str:
    """Time the query `repeats` times; print a table row; return its output."""
    runs, out = [], ""
    for _ in range(repeats):
        elapsed, out = run_audit(settings, *args)
        runs.append(elapsed)
    slack = 60_000
    scanned = in_window(times, span[0] - slack, span[1] + slack)
    rows = len(out.splitlines())
    print(
        f"| {label} | {statistics.median(runs):.2f} s | {min(runs):.2f} to {max(runs):.2f} s "
        f"| {repeats} | {scanned:,} | {rows} | `{' '.join(args)}` |",
        flush=True,
    )
    return out


def ids(jsonl: str, window: tuple[int, int] | None = None) -> list[str]:
    rows = [json.loads(line) for line in jsonl.splitlines()]
    if window is not None:
        rows = [r for r in rows if window[0] <= r["occurred_at_ms"] <= window[1]]
    return [str(r["event_id"]) for r in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--devices", type=int, default=20_000)
    parser.add_argument("--span-h", type=int, default=24, help="hours the log spans")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--namespace", default=f"audit-bench-{uuid.uuid4().hex[:6]}")
    parser.add_argument("--keep", action="store_true", help="do not delete the namespace")
    parser.add_argument(
        "--log-only",
        action="store_true",
        help="write the log, keep the namespace and stop: no queries (the rebuild benchmark)",
    )
    parser.add_argument("--generate-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--start-ms", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--times-file", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    settings = Settings(namespace=args.namespace)
    if args.generate_only:
        generate(args, settings)
        return

    admin.provision(settings)
    print(f"namespace {settings.tenant}/{settings.namespace}", file=sys.stderr)
    try:
        start_ms = int(time.time() * 1000) - args.span_h * HOUR_MS
        times_file = Path(f"/tmp/{settings.namespace}-times.txt")
        env = dict(os.environ)
        shim_dir = tempfile.TemporaryDirectory()
        shim = build_shim(Path(shim_dir.name))
        if shim is not None:
            env["LD_PRELOAD"] = str(shim)
        else:
            print("no C compiler: the log spans only its publication time")
        child = [sys.executable, __file__, "--generate-only", "--start-ms", str(start_ms)]
        child += ["--times-file", str(times_file), "--namespace", settings.namespace]
        child += ["--events", str(args.events), "--devices", str(args.devices)]
        child += ["--span-h", str(args.span_h), "--seed", str(args.seed)]
        subprocess.run(child, env=env, check=True)
        shim_dir.cleanup()
        times = [int(t) for t in times_file.read_text().split()]
        tasks = [line.split() for line in Path(f"{times_file}.tasks").read_text().splitlines()]
        times_file.unlink()
        Path(f"{times_file}.tasks").unlink()
        first, last = times[0], times[-1]
        print(f"log: {len(times):,} events, event time {iso(first)} .. {iso(last)}")
        if args.log_only:
            db = settings.namespace.replace("-", "_")
            print(
                f"kept namespace {settings.namespace}; rebuild its projections with\n"
                f"  EVENTDISPATCH_NAMESPACE={settings.namespace} EVENTDISPATCH_MONGO_DB={db} "
                "eventdispatch rebuild"
            )
            return

        device = device_name(42)
        mid = first + (last - first) // 2
        w = (mid, mid + HOUR_MS)
        task = next(t for at, t in tasks if int(at) >= mid + 10 * 60_000)  # inside the window
        window = ["--since", iso(w[0]), "--until", iso(w[1])]
        now = int(time.time() * 1000)
        print("| query | median | min to max | runs | events in window ±1 min | rows | args |")
        print("|---|---|---|---|---|---|---|")
        n = args.repeats
        hour = measure(
            settings,
            "one device, one hour mid-log",
            n,
            times,
            w,
            "-d",
            device,
            *window,
            "-f",
            "jsonl",
        )
        measure(
            settings,
            "one device, last hour",
            n,
            times,
            (now - HOUR_MS, now),
            "-d",
            device,
            "--since",
            "-1h",
            "-f",
            "jsonl",
        )
        measure(
            settings, "one task, one hour mid-log", n, times, w, "-t", task, *window, "-f", "jsonl"
        )
        measure(
            settings,
            "stats, all devices, one hour mid-log",
            n,
            times,
            w,
            *window,
            "--stats",
            "-f",
            "json",
        )
        whole = measure(
            settings,
            "one device, whole log (no seek)",
            2,
            times,
            (first, now),
            "-d",
            device,
            "-f",
            "jsonl",
        )
        measure(settings, "process start only: --help", n, [], (0, 0), "--help")
        # the seek loses nothing: the window's rows are the whole log's rows in that window
        assert ids(hour) == ids(whole, w), "the windowed timeline differs from the full scan"
        print(
            f"check: the one-hour timeline equals the full scan's rows in that hour "
            f"({len(ids(hour))} events of {device})"
        )
    finally:
        if not (args.keep or args.log_only):
            admin.delete_namespace(settings)
            print(f"deleted namespace {settings.namespace}", file=sys.stderr)


if __name__ == "__main__":
    main()
