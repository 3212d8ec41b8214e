"""Integration fixtures: the real Pulsar, MongoDB-compatible store and Redis (started by
`make test` through `eventdispatch stack up`), a fresh namespace, database and Redis prefix per
test session, and the service and the Central Control simulator as real subprocesses."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pymongo
import pytest
import redis

from eventdispatch import admin
from eventdispatch.config import Settings

ROOT = Path(__file__).resolve().parents[2]
BEHAVIOUR = [
    {"devices": "unknown-*", "status": 404},
    {"devices": "refuse-*", "status": 422},
    {"devices": "flaky-*", "error_rate": 0.5},
    {"devices": "fail-then-ok-*", "outcomes": ["ERROR", "SUCCESS"]},
    {"devices": "always-fail-*", "outcomes": ["ERROR"]},
    {"devices": "silent-then-ok-*", "outcomes": ["SILENT", "SUCCESS"]},
    {"devices": "silent-*", "outcomes": ["SILENT"]},
    {"devices": "hang-*", "hang_rate": 1.0, "hang_s": 30},
    {"devices": "slow-*", "latency_ms": [300, 400]},
    {"devices": "late-*", "latency_ms": [2500, 2500]},
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        EVENTDISPATCH_NAMESPACE=settings.namespace,
        EVENTDISPATCH_MONGO_DB=settings.mongo_db,
        EVENTDISPATCH_REDIS_PREFIX=settings.redis_prefix,
        EVENTDISPATCH_CENTRAL_URL=settings.central_url,
        EVENTDISPATCH_HEALTH_PORT=str(settings.health_port),
        EVENTDISPATCH_RETRY_BASE_S=str(settings.retry_base_s),
        EVENTDISPATCH_RETRY_CAP_S=str(settings.retry_cap_s),
        EVENTDISPATCH_DELIVERY_BACKOFF_BASE_S=str(settings.delivery_backoff_base_s),
        EVENTDISPATCH_DELIVERY_BACKOFF_CAP_S=str(settings.delivery_backoff_cap_s),
    )
    return env


class Service:
    """A subprocess whose output goes to a file, kept for the failure report."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self.argv = argv
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=log, stderr=log, cwd=ROOT)

    def stop(self, timeout: float = 20) -> int | None:
        if self.proc is None:
            return None
        self.proc.terminate()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def wait_for_log(self, text: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.log_path.exists() and text in self.log_path.read_text(errors="replace"):
                return
            if self.proc is not None and self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} did not log {text!r}; see {self.log_path}:\n{self.tail()}")

    def tail(self, n: int = 40) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])


@contextlib.contextmanager
def environment() -> Iterator[Settings]:
    """A namespace, database and Redis prefix of their own, removed afterwards."""
    ns = f"t-{uuid.uuid4().hex[:8]}"
    s = Settings(
        namespace=ns,
        mongo_db=f"test_{ns.replace('-', '_')}",
        redis_prefix=ns,
        central_url=f"http://127.0.0.1:{_free_port()}",
        health_port=_free_port(),
        retry_base_s=0.2,
        retry_cap_s=1.0,
        delivery_backoff_base_s=0.05,
        delivery_backoff_cap_s=0.5,
    )
    try:
        admin.provision(s)
    except Exception as e:
        pytest.exit(f"the stack is not reachable ({e}); run `eventdispatch stack up` first", 3)
    try:
        yield s
    finally:
        pymongo.MongoClient(s.mongo_url).drop_database(s.mongo_db)
        r = redis.Redis.from_url(s.redis_url)
        keys = list(r.scan_iter(f"{s.redis_prefix}:*", count=1000))
        for i in range(0, len(keys), 1000):
            r.delete(*keys[i : i + 1000])
        admin.delete_namespace(s)


@contextlib.contextmanager
def running_simulator(settings: Settings, record: Path, logs: Path) -> Iterator[Service]:
    behaviour = logs / "behaviour.json"
    behaviour.write_text(json.dumps(BEHAVIOUR))
    port = settings.central_url.rsplit(":", 1)[1]
    argv = [sys.executable, "-m", "eventdispatch.cli", "simulate", "--port", port]
    argv += ["--record", str(record), "--behaviour", str(behaviour), "--latency-ms", "5:20"]
    sim = Service("simulator", argv, _env(settings), logs)
    sim.start()
    try:
        sim.wait_for_log("simulator record")
        yield sim
    finally:
        sim.stop()


@contextlib.contextmanager
def running_service(settings: Settings, logs: Path) -> Iterator[Service]:
    argv = [sys.executable, "-m", "eventdispatch.cli", "run"]
    svc = Service("service", argv, _env(settings), logs)
    svc.start()
    svc.wait_for_log("worker started")
    yield svc
    code = svc.stop()
    assert code == 0, f"the service did not drain cleanly (exit {code}):\n{svc.tail()}"


@pytest.fixture(scope="session")
def settings() -> Iterator[Settings]:
    with environment() as s:
        yield s


@pytest.fixture(scope="session")
def sim_record(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sim") / "record.jsonl"


@pytest.fixture(scope="session")
def simulator(
    settings: Settings, sim_record: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    with running_simulator(settings, sim_record, tmp_path_factory.mktemp("logs")) as sim:
        yield sim


@pytest.fixture(scope="session")
def service(
    settings: Settings, simulator: Service, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    with running_service(settings, tmp_path_factory.mktemp("service")) as svc:
        yield svc


def read_record(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


async def read_log(
    settings: Settings, topic: str = "events", since_ms: int | None = None
) -> list[dict[str, Any]]:
    """The records on a topic (published since `since_ms`, if given), decoded with the schema
    registered on the broker, not ours."""
    import io

    import fastavro
    import pulsar
    import pulsar.asyncio

    registered = admin.schema_of(settings, topic)
    assert registered is not None, f"no schema registered for {topic}"
    parsed = fastavro.parse_schema(registered)
    client = pulsar.asyncio.Client(settings.pulsar_url)
    try:
        reader = await client.create_reader(settings.topic(topic), pulsar.MessageId.earliest)
        if since_ms is not None:
            await reader.seek(since_ms)
        out: list[dict[str, Any]] = []
        while await reader.has_message_available():
            msg = await reader.read_next()
            record = fastavro.schemaless_reader(io.BytesIO(msg.data()), parsed, None)
            assert isinstance(record, dict)
            out.append(record)
        await reader.close()
        return out
    finally:
        await client.close()


def cli(settings: Settings, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run the real command line, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "eventdispatch.cli", *args],
        env=_env(settings),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def supervised(settings: Settings) -> dict[str, dict[str, Any]]:
    """What the supervisor of a running service reports, by process name."""
    import httpx

    url = f"http://127.0.0.1:{settings.health_port}/status"
    return {w["name"]: w for w in httpx.get(url, timeout=5).json()["workers"]}


def wait_until(what: str, check: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting until {what}")
        time.sleep(0.2)
