"""`eventdispatch bench`: measure the service on a running stack (issue 7).

Every part that runs the service does so in a scratch namespace, Mongo database and Redis prefix
of its own (`bench-<part>-<hex>`), with the Central Control simulator at zero latency and the
service as real processes (N `run --no-projector` workers plus one `project`, or
`run --workers N` once the supervisor exists), and deletes them afterwards (`--keep` keeps them).

Parts (`--only`):
  floor      raw pulsar-client round trip: producer -> Key_Shared consumer -> echo producer ->
             consumer, same message size and batching as device-inbox; messages/s and latency
  e2e        executions/s from CreateTask published to the last Succeeded projected, for each
             worker count x fleet size, and the ratio to the floor
  latency    CreateTask published -> Sent event durable (seen by a consumer of `events`), single-
             device tasks offered at a fixed rate; p50/p95/p99
  timers     lateness of scheduled starts (Waiting - execute_at) and of timeouts (TimedOut -
             deadline), p50/p99, and how many were early (must be 0)
  fanout     a 100,000-device task: command published -> task claimed -> every Enqueue durable,
             and the peak resident memory (VmHWM) of every process
  projector  events/s the projector applies from a backlog (service stopped first)
  rebuild    events/s of `eventdispatch rebuild` on the projector part's log

The pure helpers (percentiles, rates) are unit-tested in tests/unit/test_bench.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import platform
import re
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("floor", "e2e", "latency", "timers", "fanout", "projector", "rebuild")
SCRIPT = "echo bench\n"


# --- pure helpers ----------------------------------------------------------------------------
def percentile(values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile (p in 0..100) of `values`; None when there are none."""
    if not values:
        return None
    if not 0 <= p <= 100:
        raise ValueError(f"percentile {p} is outside 0..100")
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return float(ordered[rank - 1])


def summary(values: Sequence[float], points: Sequence[float] = (50, 95, 99)) -> dict[str, Any]:
    """Count, percentiles (keys p50, p95, ...), min and max, rounded to 0.1."""
    out: dict[str, Any] = {"n": len(values)}
    for p in points:
        v = percentile(values, p)
        out[f"p{p:g}"] = None if v is None else round(v, 1)
    out["min"] = round(min(values), 1) if values else None
    out["max"] = round(max(values), 1) if values else None
    return out


def rate(count: int, seconds: float) -> float:
    """count per second, 0 for an empty interval."""
    return count / seconds if seconds > 0 else 0.0


def parse_list(text: str, allowed: Sequence[str] | None = None) -> list[str]:
    """A comma-separated option as a list; unknown names refused with the allowed ones."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if allowed is not None:
        unknown = [t for t in items if t not in allowed]
        if unknown:
            raise ValueError(f"unknown {', '.join(unknown)}; choose from {', '.join(allowed)}")
    return items


# --- machine and scratch environment ---------------------------------------------------------
def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def machine() -> dict[str, Any]:
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    return {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "commit": commit,
        "load_average_at_start": load_average(),
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def scratch(label: str, keep: bool, log: Callable[[str], None]) -> Iterator[Any]:
    """Settings for a namespace, database and Redis prefix of the benchmark's own."""
    import pymongo
    import redis

    from eventdispatch import admin
    from eventdispatch.config import Settings

    tag = f"bench-{label}-{uuid.uuid4().hex[:6]}"
    s = Settings(
        namespace=tag,
        mongo_db=tag.replace("-", "_"),
        redis_prefix=tag,
        central_url=f"http://127.0.0.1:{_free_port()}",
    )
    admin.provision(s)
    try:
        yield s
    finally:
        if keep:
            log(f"kept namespace {s.namespace}, database {s.mongo_db}, prefix {s.redis_prefix}")
        else:
            with contextlib.suppress(Exception):
                pymongo.MongoClient(s.mongo_url).drop_database(s.mongo_db)
            with contextlib.suppress(Exception):
                r = redis.Redis.from_url(s.redis_url)
                keys = list(r.scan_iter(f"{s.redis_prefix}:*", count=5000))
                for i in range(0, len(keys), 5000):
                    r.delete(*keys[i : i + 5000])
            try:
                admin.delete_namespace(s)
            except Exception as e:
                log(f"could not delete namespace {s.namespace}: {e}")


def env_of(s: Any, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        EVENTDISPATCH_NAMESPACE=s.namespace,
        EVENTDISPATCH_MONGO_DB=s.mongo_db,
        EVENTDISPATCH_REDIS_PREFIX=s.redis_prefix,
        EVENTDISPATCH_CENTRAL_URL=s.central_url,
        EVENTDISPATCH_DRAIN_GRACE_S="3",
        EVENTDISPATCH_HEALTH_PORT=str(_free_port()),  # the supervisor's; 8790 may be taken
    )
    env.update(extra)
    return env


def descendants(pid: int) -> list[int]:
    """A process and all its children, grandchildren, ... (from /proc)."""
    out = [pid]
    for p in out:
        for path in Path(f"/proc/{p}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                out.extend(int(c) for c in path.read_text().split())
    return out


def peak_rss_mb(pid: int) -> float | None:
    """The peak resident set size (VmHWM) of a live process, in MB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def cpu_seconds(pid: int) -> float | None:
    """User plus system CPU time a live process has used so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stack_pids() -> dict[str, int]:
    """The shared stack's processes (Pulsar, the MongoDB-compatible store, Redis), by name."""
    wanted = {
        "pulsar": "PulsarStandaloneStarter",
        "mongo": "127.0.0.1:27017",
        "redis": "redis-server",
    }
    found: dict[str, int] = {}
    for path in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            cmd = path.read_bytes().replace(b"\0", b" ").decode(errors="replace")
            for name, needle in wanted.items():
                if needle in cmd and name not in found and "bench" not in cmd:
                    found[name] = int(path.parent.name)
    return found


class CpuMeter:
    """CPU seconds each process spends between `start` and `stop`."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.before = {n: cpu_seconds(p) for n, p in pids.items()}

    def stop(self) -> dict[str, float]:
        out = {}
        for name, pid in self.pids.items():
            now, then = cpu_seconds(pid), self.before.get(name)
            if now is not None and then is not None:
                out[name] = round(now - then, 2)
        return out


class Proc:
    """A service process of the benchmark, its output in a log file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self.handle = self.log_path.open("ab")
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "eventdispatch.cli", *argv],
            env=env,
            stdout=self.handle,
            stderr=self.handle,
            cwd=ROOT,
        )

    def text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_for(self, needle: str, count: int = 1, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.text().count(needle) >= count:
                return
            if self.popen.poll() is not None:
                break
            time.sleep(0.1)
        tail = "\n".join(self.text().splitlines()[-20:])
        raise RuntimeError(f"{self.name} did not log {needle!r} ({self.log_path}):\n{tail}")

    def peaks(self) -> dict[str, float | None]:
        """VmHWM of the process and each descendant (a supervisor's workers)."""
        pids = descendants(self.popen.pid)
        if len(pids) == 1:
            return {self.name: peak_rss_mb(pids[0])}
        return {f"{self.name}[{pid}]": peak_rss_mb(pid) for pid in pids}

    def stop(self, timeout: float = 30) -> int | None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self.handle.close()
        return self.popen.returncode


def supervisor_available() -> bool:
    """Whether `eventdispatch run` has `--workers` (the supervisor, issue 4)."""
    done = subprocess.run(
        [sys.executable, "-m", "eventdispatch.cli", "run", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "COLUMNS": "200"},
    )
    return "--workers" in done.stdout


@dataclass
class Deployment:
    """The simulator, the workers and (optionally) the projector, for one scratch env."""

    settings: Any
    workers: int
    log_dir: Path
    projector: bool = True
    behaviour: list[dict[str, Any]] = field(default_factory=list)
    procs: list[Proc] = field(default_factory=list)

    def start(self) -> None:
        """Start everything, or stop what did start and raise."""
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        env = env_of(self.settings)
        behaviour = self.log_dir / "behaviour.json"
        behaviour.write_text(json.dumps(self.behaviour))
        port = self.settings.central_url.rsplit(":", 1)[1]
        sim = Proc(
            "simulator",
            [
                *("simulate", "--port", port, "--latency-ms", "0:0"),
                *("--behaviour", str(behaviour), "--record", str(self.log_dir / "sim.jsonl")),
            ],
            env,
            self.log_dir,
        )
        self.procs.append(sim)
        sim.wait_for("simulator record")
        if supervisor_available():
            sup = Proc(
                "workers",
                ["run", "--workers", str(self.workers), "--no-projector"],
                env,
                self.log_dir,
            )
            self.procs.append(sup)
            sup.wait_for("worker started", self.workers)
        else:
            for i in range(self.workers):
                self.procs.append(
                    Proc(f"worker{i + 1}", ["run", "--no-projector"], env, self.log_dir)
                )
            for p in self.procs[1:]:
                p.wait_for("worker started")
        if self.projector:
            self.start_projector()

    def start_projector(self) -> Proc:
        proj = Proc("projector", ["project"], env_of(self.settings), self.log_dir)
        self.procs.append(proj)
        proj.wait_for("projector started")
        return proj

    def pids(self) -> dict[str, int]:
        """Every live process of the deployment (a supervisor's workers too), by name."""
        out: dict[str, int] = {}
        for p in self.procs:
            pids = descendants(p.popen.pid)
            for pid in pids:
                out[p.name if len(pids) == 1 else f"{p.name}[{pid}]"] = pid
        return out

    def stop_workers(self) -> None:
        for p in self.procs:
            if p.name.startswith("worker"):
                p.stop()

    def peaks(self) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        for p in self.procs:
            if p.popen.poll() is None:
                out.update(p.peaks())
        return out

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()


# --- watching the log ------------------------------------------------------------------------
class EventWatcher:
    """A consumer of `events` on a thread: every record with the time it was received (after
    the broker made it durable), for latency and for waiting on outcomes."""

    def __init__(self, s: Any, types: frozenset[str] | None = None) -> None:
        import pulsar

        from eventdispatch.wire import AvroCodec

        self.types = types
        self.client = pulsar.Client(s.pulsar_url, logger=_quiet_pulsar_logger())
        self.consumer = self.client.subscribe(
            s.topic("events"),
            f"bench-{uuid.uuid4().hex[:6]}",
            consumer_type=pulsar.ConsumerType.Exclusive,
            schema=AvroCodec("events"),
            initial_position=pulsar.InitialPosition.Earliest,
            receiver_queue_size=5000,
        )
        self.seen: list[tuple[float, dict[str, Any]]] = []
        self.counts: dict[str, int] = {}
        self.total = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        while not self._stop.is_set():
            try:
                msg = self.consumer.receive(200)
            except Exception:
                continue
            now = time.time()
            record = msg.value()
            kind = str(record["type"])
            with self._lock:
                self.total += 1
                self.counts[kind] = self.counts.get(kind, 0) + 1
                if self.types is None or kind in self.types:
                    self.seen.append((now, record))
            self.consumer.acknowledge(msg)

    def count(self, kind: str) -> int:
        with self._lock:
            return self.counts.get(kind, 0)

    def wait_count(self, kind: str, n: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.count(kind) >= n:
                return True
            time.sleep(0.05)
        return False

    def records(self) -> list[tuple[float, dict[str, Any]]]:
        with self._lock:
            return list(self.seen)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        with contextlib.suppress(Exception):
            self.consumer.close()
        self.client.close()


def _quiet_pulsar_logger() -> Any:
    import logging

    log = logging.getLogger("pulsar.bench")
    log.setLevel(logging.WARNING)
    return log


async def _register(ed: Any, script_id: str = "bench") -> None:
    await ed.register_script(script_id, SCRIPT, timeout_s=60)


async def _wait_done(s: Any, task_id: str, n: int, timeout: float) -> float:
    """Wait until `n` executions of the task are projected Succeeded; return the wall time of
    the projector's checkpoint after its last batch (when the last one was projected)."""
    from projections.store import connect

    mongo = connect(s.mongo_url)
    try:
        db = mongo[s.mongo_db]
        deadline = time.monotonic() + timeout
        while True:
            done = await db.g1_executions.count_documents(
                {"task_id": task_id, "state": "succeeded"}
            )
            if done >= n:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{task_id}: {done} of {n} succeeded after {timeout:.0f}s")
            await asyncio.sleep(0.5)
        await asyncio.sleep(0.3)
        checkpoint = await db.projection_meta.find_one({"_id": "checkpoint"})
        assert checkpoint is not None
        return float(checkpoint["applied_at_ms"]) / 1000
    finally:
        await mongo.close()


# --- parts -----------------------------------------------------------------------------------
@dataclass
class Options:
    workers: list[int]
    devices: list[int]
    rate: float = 200.0
    duration_s: float = 10.0
    fanout_devices: int = 100_000
    timer_count: int = 200
    floor_messages: int = 20_000
    projector_devices: int = 5_000
    fanout_timeout_s: float = 300.0
    keep: bool = False
    log: Callable[[str], None] = print
    profile: str | None = None  # py-spy record the workers of the e2e part into this folder


def _message_size() -> int:
    """The size of an Enqueue on device-inbox, as the planner writes it."""
    from eventdispatch import wire
    from eventdispatch.inputs import Enqueue

    body = Enqueue("bench-task-0000", "bench", 1, None, 3, 600)
    record = wire.input_to_record("bench-task-0000:dev-000000:enqueue", "dev-000000", 0, body)
    return len(wire.AvroCodec("device-inbox").encode(record))


def echo_main() -> None:
    """Entry of the floor's echo process: argv is url, source, target, expected."""
    url, source, target, expected = sys.argv[1:5]
    _echo(url, source, target, int(expected))


def _echo(url: str, source: str, target: str, expected: int) -> None:
    """The floor's middle hop, in a process of its own: Key_Shared consumer, echo producer."""
    import pulsar

    client = pulsar.Client(url, logger=_quiet_pulsar_logger())
    consumer = client.subscribe(
        source,
        "echo",
        consumer_type=pulsar.ConsumerType.KeyShared,
        receiver_queue_size=1000,
        batch_receive_policy=pulsar.ConsumerBatchReceivePolicy(1000, -1, 1),
    )
    producer = client.create_producer(
        target,
        batching_enabled=True,
        batching_type=pulsar.BatchingType.KeyBased,
        batching_max_publish_delay_ms=1,
        max_pending_messages=2000,
        block_if_queue_full=True,
    )
    print("ready", flush=True)
    seen = 0
    idle_since = time.monotonic()
    while seen < expected and time.monotonic() - idle_since < 30:
        try:
            first = consumer.receive(200)
        except Exception:
            continue
        idle_since = time.monotonic()
        batch = [first]
        with contextlib.suppress(Exception):
            batch.extend(consumer.batch_receive())
        for msg in batch:
            producer.send_async(msg.data(), None, partition_key=msg.partition_key())
            consumer.acknowledge(msg)
        seen += len(batch)
    producer.flush()
    client.close()


def _floor_round(
    client: Any, s: Any, size: int, count: int, per_s: float | None, keys: int
) -> dict[str, Any]:
    """One round: `count` messages through producer -> echo -> consumer; paced if per_s."""
    import pulsar

    tag = uuid.uuid4().hex[:6]
    source, target = s.topic(f"floor-in-{tag}"), s.topic(f"floor-out-{tag}")
    sink = client.subscribe(
        target,
        "sink",
        consumer_type=pulsar.ConsumerType.KeyShared,
        receiver_queue_size=1000,
    )
    echo = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from eventdispatch.bench import echo_main; echo_main()",
            s.pulsar_url,
            source,
            target,
            str(count),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=ROOT,
    )
    assert echo.stdout is not None
    if echo.stdout.readline().strip() != "ready":
        echo.kill()
        raise RuntimeError("the floor's echo process did not start")
    producer = client.create_producer(
        source,
        batching_enabled=True,
        batching_type=pulsar.BatchingType.KeyBased,
        batching_max_publish_delay_ms=1,
        max_pending_messages=2000,
        block_if_queue_full=True,
    )
    latencies: list[float] = []
    received = threading.Event()
    last = [0.0]

    def drain() -> None:
        while len(latencies) < count:
            try:
                msg = sink.receive(30_000)
            except Exception:
                break
            now = time.time_ns()
            (sent,) = struct.unpack_from("<q", msg.data())
            latencies.append((now - sent) / 1e6)
            last[0] = now / 1e9
            sink.acknowledge(msg)
        received.set()

    threading.Thread(target=drain, daemon=True).start()
    pad = b"x" * max(0, size - 8)
    started = time.time()
    for i in range(count):
        if per_s:
            delay = started + i / per_s - time.time()
            if delay > 0:
                time.sleep(delay)
        payload = struct.pack("<q", time.time_ns()) + pad
        producer.send_async(payload, None, partition_key=f"dev-{i % keys:06d}")
    producer.flush()
    received.wait(120)
    try:
        echo.wait(30)
    except subprocess.TimeoutExpired:
        echo.kill()
    producer.close()
    sink.close()
    seconds = (last[0] or time.time()) - started
    return {
        "messages": len(latencies),
        "seconds": round(seconds, 2),
        "messages_per_s": round(rate(len(latencies), seconds)),
        "latency_ms": summary(latencies),
    }


def part_floor(o: Options) -> dict[str, Any]:
    import pulsar

    size = _message_size()
    with scratch("floor", o.keep, o.log) as s:
        client = pulsar.Client(s.pulsar_url, logger=_quiet_pulsar_logger())
        try:
            o.log(f"floor: {o.floor_messages:,} messages of {size} bytes, as fast as possible")
            burst = _floor_round(client, s, size, o.floor_messages, None, 1000)
            o.log(f"floor: {int(o.rate * 5):,} messages at {o.rate:g}/s")
            paced = _floor_round(client, s, size, int(o.rate * 5), o.rate, 1000)
            o.log(f"floor: {o.floor_messages:,} messages, all one key (full batches)")
            one_key = _floor_round(client, s, size, o.floor_messages, None, 1)
        finally:
            client.close()
    return {"message_bytes": size, "keys": 1000, "burst": burst, "paced": paced, "one_key": one_key}


def part_e2e(o: Options) -> dict[str, Any]:
    runs = []
    for workers in o.workers:
        for devices in o.devices:
            o.log(f"e2e: {workers} worker(s), {devices:,} devices")
            try:
                runs.append(_e2e_run(o, workers, devices))
            except Exception as e:  # one run's failure does not lose the others
                o.log(f"e2e: failed: {type(e).__name__}: {e}")
                runs.append({"workers": workers, "devices": devices, "error": str(e)})
                continue
            o.log(
                f"e2e: {runs[-1]['executions_per_s']:,} executions/s projected, "
                f"{runs[-1]['decided_per_s']:,}/s decided"
            )
    return {"runs": runs}


def _e2e_run(o: Options, workers: int, devices: int) -> dict[str, Any]:
    from eventdispatch.client import EventDispatch

    load_before = load_average()
    with (
        tempfile.TemporaryDirectory(prefix="bench-") as tmp,
        scratch(f"e2e{workers}w", o.keep, o.log) as s,
    ):
        dep = Deployment(s, workers, Path(tmp))
        dep.start()
        watcher = EventWatcher(s, frozenset({"Succeeded"}))
        spy: list[subprocess.Popen[bytes]] = []

        async def go() -> dict[str, Any]:
            async with EventDispatch(s) as ed:
                await _register(ed)
                warm = [f"warm-{i:03d}" for i in range(50)]
                await ed.wait_accepted(await ed.submit("warmup", "bench", warm))
                await _wait_done(s, "warmup", len(warm), 120)
                if o.profile:
                    spy.extend(_py_spy(dep, Path(o.profile), f"{workers}w{devices}"))
                fleet = [f"dev-{i:06d}" for i in range(devices)]
                cpu = CpuMeter({**dep.pids(), **stack_pids(), "bench": os.getpid()})
                t0 = time.time()
                await ed.submit("bench", "bench", fleet)
                # Succeeded in the log (durable, seen by a consumer), then projected.
                ok = await asyncio.to_thread(
                    watcher.wait_count, "Succeeded", devices + 50, max(300, devices / 10)
                )
                logged = max(t for t, _ in watcher.records()) if ok else float("nan")
                used = cpu.stop()
                end = await _wait_done(s, "bench", devices, max(300, devices / 10))
            return {
                "workers": workers,
                "devices": devices,
                "seconds": round(end - t0, 2),
                "executions_per_s": round(rate(devices, end - t0)),
                "decided_per_s": round(rate(devices, logged - t0)) if ok else None,
                "load_average": [load_before, load_average()],
                "peak_rss_mb": dep.peaks(),
                "cpu_s_until_logged": used,
                "cpu_ms_per_execution": round(sum(used.values()) * 1000 / devices, 2),
            }

        try:
            return asyncio.run(go())
        finally:
            for p in spy:
                p.send_signal(signal.SIGINT)
                p.wait(60)
            watcher.close()
            dep.stop()


def py_spy_path() -> str | None:
    """py-spy on PATH, or beside this interpreter (a venv's bin/ that is not activated)."""
    beside = Path(sys.executable).with_name("py-spy")
    return shutil.which("py-spy") or (str(beside) if beside.exists() else None)


def _py_spy(dep: Deployment, folder: Path, label: str) -> list[subprocess.Popen[bytes]]:
    spy = py_spy_path()
    if spy is None:
        raise RuntimeError("--profile needs py-spy: pip install py-spy")
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for p in dep.procs:
        for pid in descendants(p.popen.pid):
            svg = folder / f"{label}-{p.name}-{pid}.collapsed.txt"
            out.append(
                subprocess.Popen(
                    [
                        *(spy, "record", "-p", str(pid), "-o", str(svg)),
                        *("-f", "raw", "-r", "50", "--nonblocking"),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
    return out


def part_latency(o: Options) -> dict[str, Any]:
    from eventdispatch.client import EventDispatch

    workers = max(o.workers)
    count = int(o.rate * o.duration_s)
    with (
        tempfile.TemporaryDirectory(prefix="bench-") as tmp,
        scratch("latency", o.keep, o.log) as s,
    ):
        dep = Deployment(s, workers, Path(tmp))
        dep.start()
        watcher = EventWatcher(s, frozenset({"Sent"}))
        load_before = load_average()
        try:

            async def go() -> dict[str, float]:
                sent_at: dict[str, float] = {}
                async with EventDispatch(s) as ed:
                    await _register(ed)
                    await ed.wait_accepted(await ed.submit("warmup", "bench", ["warm-0"]))
                    o.log(f"latency: {count:,} single-device tasks at {o.rate:g}/s")
                    pending: set[asyncio.Task[Any]] = set()
                    start = time.time()
                    for i in range(count):
                        delay = start + i / o.rate - time.time()
                        if delay > 0:
                            await asyncio.sleep(delay)
                        task_id = f"lat-{i:06d}"
                        sent_at[task_id] = time.time()
                        t = asyncio.create_task(ed.submit(task_id, "bench", [f"ldev-{i:06d}"]))
                        pending.add(t)
                        t.add_done_callback(pending.discard)
                    await asyncio.gather(*pending)
                    offered = count / (time.time() - start)
                watcher.wait_count("Sent", count + 1, 120)
                sent_at["offered_per_s"] = offered
                return sent_at

            sent_at = asyncio.run(go())
            offered = sent_at.pop("offered_per_s")
            seen = {str(r["task_id"]): t for t, r in watcher.records()}
            lat = [(seen[k] - v) * 1000 for k, v in sent_at.items() if k in seen]
            return {
                "workers": workers,
                "commands": count,
                "offered_per_s": round(offered, 1),
                "sent_seen": len(lat),
                "latency_ms": summary(lat),
                "load_average": [load_before, load_average()],
            }
        finally:
            watcher.close()
            dep.stop()


def part_timers(o: Options) -> dict[str, Any]:
    from eventdispatch.client import EventDispatch

    n = o.timer_count
    with (
        tempfile.TemporaryDirectory(prefix="bench-") as tmp,
        scratch("timers", o.keep, o.log) as s,
    ):
        dep = Deployment(s, max(o.workers), Path(tmp))
        dep.behaviour = [{"devices": "silent-*", "outcomes": ["SILENT"]}]
        dep.start()
        watcher = EventWatcher(s, frozenset({"Waiting", "Sent", "TimedOut", "TaskAccepted"}))
        load_before = load_average()
        try:

            async def go() -> None:
                async with EventDispatch(s) as ed:
                    await _register(ed)
                    # Far enough ahead that planning all of them (seconds on a loaded machine)
                    # is over before the first is due: lateness is the timers', not the queue's.
                    o.log(f"timers: {n} scheduled starts 20-25 s ahead, {n} 1-second timeouts")
                    base = time.time() + 20
                    for i in range(n):
                        at = datetime.fromtimestamp(base + 5 * i / n, UTC)
                        await ed.submit(f"sched-{i:04d}", "bench", [f"sdev-{i:04d}"], execute_at=at)
                        await ed.submit(
                            f"tmo-{i:04d}",
                            "bench",
                            [f"silent-{i:04d}"],
                            timeout_s=1,
                            max_attempts=1,
                        )

            asyncio.run(go())
            watcher.wait_count("TimedOut", n, 240)
            watcher.wait_count("Waiting", n, 240)
            records = [r for _, r in watcher.records()]
            execute_at = {
                str(r["task_id"]): r["payload"]["execute_at_ms"]
                for r in records
                if r["type"] == "TaskAccepted" and r["payload"]["execute_at_ms"] is not None
            }
            deadline = {
                str(r["task_id"]): r["payload"]["deadline_ms"]
                for r in records
                if r["type"] == "Sent"
            }
            starts = [
                float(r["occurred_at_ms"] - execute_at[str(r["task_id"])])
                for r in records
                if r["type"] == "Waiting" and str(r["task_id"]) in execute_at
            ]
            timeouts = [
                float(r["occurred_at_ms"] - deadline[str(r["task_id"])])
                for r in records
                if r["type"] == "TimedOut" and str(r["task_id"]) in deadline
            ]
            return {
                "scheduled_start_lateness_ms": summary(starts, (50, 99)),
                "scheduled_early": sum(1 for x in starts if x < 0),
                "timeout_lateness_ms": summary(timeouts, (50, 99)),
                "timeouts_early": sum(1 for x in timeouts if x < 0),
                "asked": n,
                "load_average": [load_before, load_average()],
            }
        finally:
            watcher.close()
            dep.stop()


def part_fanout(o: Options) -> dict[str, Any]:
    import redis

    from eventdispatch.client import EventDispatch

    n = o.fanout_devices
    with (
        tempfile.TemporaryDirectory(prefix="bench-") as tmp,
        scratch("fanout", o.keep, o.log) as s,
    ):
        dep = Deployment(s, max(o.workers), Path(tmp))
        dep.start()
        r = redis.Redis.from_url(s.redis_url)
        key = f"{s.redis_prefix}:task:fanout"
        load_before = load_average()
        try:

            async def go() -> dict[str, Any]:
                async with EventDispatch(s) as ed:
                    await _register(ed)
                    await ed.wait_accepted(await ed.submit("warmup", "bench", ["warm-0"]))
                    fleet = [f"fdev-{i:06d}" for i in range(n)]
                    o.log(f"fanout: one task to {n:,} devices")
                    t0 = time.time()
                    await ed.submit("fanout", "bench", fleet)
                    published = time.time()
                    claimed = done = None
                    while time.time() - t0 < o.fanout_timeout_s:
                        got = await asyncio.to_thread(r.hgetall, key)
                        if claimed is None and b"record" in got:
                            claimed = time.time()
                        if got.get(b"fanned_out") == b"1":
                            done = time.time()
                            break
                        await asyncio.sleep(0.02)
                published_enqueues = _msg_in(s, "device-inbox")
                return {
                    "devices": n,
                    "command_publish_s": round(published - t0, 2),
                    "accepted_s": round(claimed - t0, 2) if claimed else None,
                    "fanned_out_s": round(done - t0, 2) if done else None,
                    "enqueues_published": published_enqueues,
                    "gave_up_after_s": None if done else o.fanout_timeout_s,
                    "enqueues_per_s": round(
                        rate(published_enqueues, (done or time.time()) - (claimed or t0))
                    ),
                }

            out = asyncio.run(go())
            o.log(f"fanout: {out}; 10 s more for the peak memory")
            time.sleep(10)
            out["peak_rss_mb"] = dep.peaks()
            out["peak_rss_mb"]["bench (client)"] = round(
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1
            )
            out["load_average"] = [load_before, load_average()]
            return out
        finally:
            r.close()
            dep.stop()


def part_projector_rebuild(o: Options, parts: Sequence[str]) -> dict[str, Any]:
    from eventdispatch import admin
    from eventdispatch.client import EventDispatch

    n = o.projector_devices
    results: dict[str, Any] = {}
    with (
        tempfile.TemporaryDirectory(prefix="bench-") as tmp,
        scratch("projector", o.keep, o.log) as s,
    ):
        dep = Deployment(s, max(o.workers), Path(tmp), projector=False)
        dep.start()
        watcher = EventWatcher(s, frozenset())
        try:

            async def go() -> None:
                async with EventDispatch(s) as ed:
                    await ed._send(_script_command(), "bench")
                    await ed.submit("bench", "bench", [f"dev-{i:06d}" for i in range(n)])

            o.log(f"projector: writing a log of {n:,} executions with the projector stopped")
            asyncio.run(go())
            if not watcher.wait_count("Succeeded", n, max(300, n / 10)):
                raise TimeoutError(f"only {watcher.count('Succeeded')} of {n} succeeded")
            dep.stop_workers()
            time.sleep(1)
            events = watcher.total
            results["log_events"] = events
            load_before = load_average()
            t0 = time.time()
            proj = dep.start_projector()
            first: float | None = None
            while time.time() - t0 < 600:
                left = admin.backlog(s, "events", "projector")
                if left is not None and first is None:
                    first = time.time()
                if left == 0:
                    break
                time.sleep(0.1)
            end = time.time()
            if "projector" in parts:
                results["projector"] = {
                    "events": events,
                    "seconds": round(end - (first or t0), 2),
                    "events_per_s": round(rate(events, end - (first or t0))),
                    "with_start_s": round(end - t0, 2),
                    "peak_rss_mb": proj.peaks(),
                    "load_average": [load_before, load_average()],
                }
            if "rebuild" in parts:
                load_before = load_average()
                o.log("rebuild: eventdispatch rebuild on that log")
                t0 = time.time()
                done = subprocess.run(
                    [sys.executable, "-m", "eventdispatch.cli", "rebuild"],
                    env=env_of(s),
                    cwd=ROOT,
                    capture_output=True,
                    text=True,
                    timeout=1800,
                )
                wall = time.time() - t0
                m = re.search(r"read ([\d,]+) messages in ([\d.]+)s", done.stdout)
                if done.returncode != 0 or m is None:
                    results["rebuild"] = {"error": (done.stdout + done.stderr)[-500:]}
                else:
                    read, secs = int(m.group(1).replace(",", "")), float(m.group(2))
                    results["rebuild"] = {
                        "messages": read,
                        "seconds": secs,
                        "events_per_s": round(rate(read, secs)),
                        "with_start_s": round(wall, 2),
                        "load_average": [load_before, load_average()],
                    }
        finally:
            watcher.close()
            dep.stop()
    return results


def _msg_in(s: Any, topic: str) -> int:
    """Messages published to a topic so far (broker statistics)."""
    import httpx

    path = s.topic(topic).replace("persistent://", "persistent/")
    stats = httpx.get(f"{s.pulsar_admin_url}/admin/v2/{path}/stats", timeout=10).json()
    return int(stats.get("msgInCounter", 0))


def _script_command() -> Any:
    from eventdispatch.commands import RegisterScript

    return RegisterScript(script_id="bench", language="sh", content=SCRIPT)


# --- running and reporting -------------------------------------------------------------------
def run(parts: Sequence[str], o: Options) -> dict[str, Any]:
    """Run the selected parts in order; a part that fails is reported, the rest still run."""
    result: dict[str, Any] = {"machine": machine(), "parts": {}}
    result["machine"]["workers_mode"] = (
        "run --workers N" if supervisor_available() else "N x run --no-projector + project"
    )
    todo: list[tuple[str, Callable[[], dict[str, Any]]]] = []
    for name, fn in (
        ("floor", lambda: part_floor(o)),
        ("e2e", lambda: part_e2e(o)),
        ("latency", lambda: part_latency(o)),
        ("timers", lambda: part_timers(o)),
        ("fanout", lambda: part_fanout(o)),
    ):
        if name in parts:
            todo.append((name, fn))
    for name, fn in todo:
        result["parts"][name] = _guarded(name, fn, o)
    if "projector" in parts or "rebuild" in parts:
        both = _guarded("projector", lambda: part_projector_rebuild(o, parts), o)
        for name in ("projector", "rebuild"):
            if name in parts:
                result["parts"][name] = both.get(name, both)
    floor = result["parts"].get("floor", {}).get("burst", {}).get("messages_per_s")
    for run_ in result["parts"].get("e2e", {}).get("runs", []):
        if "executions_per_s" not in run_:
            continue
        run_["ratio_to_floor"] = round(run_["executions_per_s"] / floor, 3) if floor else None
    result["machine"]["load_average_at_end"] = load_average()
    return result


def _guarded(name: str, fn: Callable[[], dict[str, Any]], o: Options) -> dict[str, Any]:
    started = time.time()
    try:
        out = fn()
    except Exception as e:
        o.log(f"{name}: failed: {type(e).__name__}: {e}")
        out = {"error": f"{type(e).__name__}: {e}"}
    out["part_seconds"] = round(time.time() - started, 1)
    return out


TARGETS = {
    "e2e": ">= 1,000 exec/s with 2 workers",
    "latency": "p50 <= 15 ms, p99 <= 60 ms",
    "timers": "p99 <= 250 ms, 0 early",
    "fanout": "<= 15 s, every process <= 300 MB",
    "rebuild": ">= 10,000 events/s",
}


def rows(result: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(part, measurement, value, target) rows of the summary table."""
    out: list[tuple[str, str, str, str]] = []
    p = result["parts"]

    def lat(d: dict[str, Any], keys: Sequence[str] = ("p50", "p95", "p99")) -> str:
        return " / ".join(f"{d.get(k)}" for k in keys) + " ms"

    for name, d in p.items():
        if "error" in d:
            out.append((name, "error", d["error"][:80], TARGETS.get(name, "")))
    if (f := p.get("floor")) and "burst" in f:
        b, q = f["burst"], f["paced"]
        out.append(
            (
                "floor",
                f"round trip, burst of {b['messages']:,}",
                f"{b['messages_per_s']:,} msg/s",
                "",
            )
        )
        out.append(("floor", "  latency p50/p95/p99 (burst)", lat(b["latency_ms"]), ""))
        out.append(("floor", "  latency p50/p95/p99 (paced)", lat(q["latency_ms"]), ""))
        k = f["one_key"]
        out.append(
            ("floor", "  burst, one key (full batches)", f"{k['messages_per_s']:,} msg/s", "")
        )
    for r in p.get("e2e", {}).get("runs", []):
        if "error" in r:
            out.append(
                ("e2e", f"{r['workers']} worker(s), {r['devices']:,} devices", r["error"][:80], "")
            )
            continue
        out.append(
            (
                "e2e",
                f"{r['workers']} worker(s), {r['devices']:,} devices",
                f"{r['executions_per_s']:,} exec/s projected ({r['decided_per_s']:,}/s decided), "
                f"ratio to floor {r.get('ratio_to_floor')}",
                TARGETS["e2e"] if r["workers"] == 2 else "",
            )
        )
    if (d := p.get("latency")) and "latency_ms" in d:
        out.append(
            (
                "latency",
                f"command -> Sent at {d['offered_per_s']}/s, p50/p95/p99",
                lat(d["latency_ms"]),
                TARGETS["latency"],
            )
        )
    if (d := p.get("timers")) and "timeout_lateness_ms" in d:
        s, t = d["scheduled_start_lateness_ms"], d["timeout_lateness_ms"]
        out.append(
            (
                "timers",
                "scheduled start lateness p50/p99, early",
                f"{lat(s, ('p50', 'p99'))}, {d['scheduled_early']}",
                TARGETS["timers"],
            )
        )
        out.append(
            (
                "timers",
                "timeout lateness p50/p99, early",
                f"{lat(t, ('p50', 'p99'))}, {d['timeouts_early']}",
                TARGETS["timers"],
            )
        )
    if (d := p.get("fanout")) and "fanned_out_s" in d:
        out.append(
            (
                "fanout",
                f"{d['devices']:,} devices: accepted / all Enqueues durable",
                f"{d['accepted_s']} s / {d['fanned_out_s']} s"
                if d["fanned_out_s"] is not None
                else f"{d['accepted_s']} s / not done after {d['gave_up_after_s']:g} s "
                f"({d['enqueues_published']:,} at {d['enqueues_per_s']:,}/s)",
                TARGETS["fanout"],
            )
        )
        peaks = d.get("peak_rss_mb", {})
        top = max(peaks.items(), key=lambda kv: kv[1] or 0) if peaks else ("-", None)
        out.append(("fanout", "  largest peak RSS", f"{top[1]} MB ({top[0]})", ""))
    if (d := p.get("projector")) and "events_per_s" in d:
        out.append(
            (
                "projector",
                f"backlog of {d['events']:,} events",
                f"{d['events_per_s']:,} events/s",
                "",
            )
        )
    if (d := p.get("rebuild")) and "events_per_s" in d:
        out.append(
            (
                "rebuild",
                f"log of {d['messages']:,} messages",
                f"{d['events_per_s']:,} events/s",
                TARGETS["rebuild"],
            )
        )
    return out
