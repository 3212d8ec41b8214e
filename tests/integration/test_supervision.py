"""The supervisor and the working state (issue 4): restarts, draining on SIGTERM, health, and
Redis lost and rebuilt from the log. Each test runs its own service in its own namespace:
they kill processes and wipe Redis, which the session's shared service must not see."""

from __future__ import annotations

import os
import signal
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from eventdispatch.client import EventDispatch
from eventdispatch.config import Settings
from eventdispatch.generation import marker_key
from tests.integration.conftest import (
    Service,
    cli,
    environment,
    read_log,
    read_record,
    running_service,
    running_simulator,
    supervised,
    wait_until,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def own(tmp_path: Path) -> Iterator[tuple[Settings, Service, Path]]:
    """A namespace, simulator and supervised service (2 workers and the projector) of its own."""
    with (
        environment() as settings,
        running_simulator(settings, tmp_path / "record.jsonl", tmp_path) as _,
        running_service(settings, tmp_path) as service,
    ):
        wait_until("every worker is ready", lambda: _ready(settings))
        yield settings, service, tmp_path / "record.jsonl"


def _ready(settings: Settings) -> bool:
    try:
        return all(w["ready"] for w in supervised(settings).values())
    except httpx.HTTPError:
        return False


def _accepted(record: Path) -> Counter[str]:
    return Counter(r["exec_id"] for r in read_record(record) if r["event"] == "accepted")


async def test_a_killed_worker_is_restarted_and_its_devices_finish(
    own: tuple[Settings, Service, Path],
) -> None:
    settings, _, record = own
    workers = supervised(settings)
    assert sorted(workers) == ["projector", "worker-1", "worker-2"]
    assert httpx.get(f"http://127.0.0.1:{settings.health_port}/readyz").status_code == 200
    tag = uuid.uuid4().hex[:6]
    devices = [f"k-{tag}-{i}" for i in range(300)]
    async with EventDispatch(settings) as ed:
        await ed.register_script("kill", "echo kill\n")
        await ed.wait_accepted(await ed.submit(f"kill-{tag}", "kill", devices))
        os.kill(workers["worker-1"]["pid"], signal.SIGKILL)
        wait_until(
            "worker-1 is restarted", lambda: supervised(settings)["worker-1"]["restarts"] == 1
        )
        summary = await ed.wait_done(f"kill-{tag}", timeout_s=120)
    assert summary.counts == {"succeeded": 300}
    accepted = _accepted(record)
    assert all(accepted[f"kill-{tag}:{d}:1"] == 1 for d in devices)  # I3
    # the restarted worker may still be connecting when a small task is already done
    wait_until("the restarted worker-1 is ready", lambda: cli(settings, "health").returncode == 0)
    status = cli(settings, "health")
    assert status.returncode == 0, status.stdout + status.stderr
    assert "worker-1" in status.stdout


async def test_sigterm_under_load_drains_without_losing_or_half_sending(
    own: tuple[Settings, Service, Path], tmp_path: Path
) -> None:
    settings, service, record = own
    tag = uuid.uuid4().hex[:6]
    devices = [f"t-{tag}-{i}" for i in range(400)]
    async with EventDispatch(settings) as ed:
        await ed.register_script("term", "echo term\n")
        await ed.wait_accepted(await ed.submit(f"term-{tag}", "term", devices))
        wait_until("some executions were sent", lambda: len(read_record(record)) > 40)
        assert service.stop() == 0  # SIGTERM: drain and exit 0

        # Nothing half sent: every attempt Locked before the stop was confirmed (Sent) or
        # ended; none waits for a delivery nobody will make.
        attempts: dict[tuple[str, int], list[str]] = defaultdict(list)
        for e in await read_log(settings):
            if e["task_id"] == f"term-{tag}" and e["attempt"]:
                attempts[(e["device_id"], e["attempt"])].append(e["type"])
        assert attempts, "no attempt started before the stop"
        half = [k for k, types in attempts.items() if types == ["Locked"]]
        assert half == [], f"attempts left Locked by the drain: {half[:5]}"

        service.start()  # nothing lost: the rest runs after a restart
        service.wait_for_log("worker started")
        summary = await ed.wait_done(f"term-{tag}", timeout_s=120)
    assert summary.counts == {"succeeded": 400}
    accepted = _accepted(record)
    assert sorted(k for k in accepted if k.startswith(f"term-{tag}:")) == sorted(
        f"term-{tag}:{d}:1" for d in devices
    )
    assert max(accepted.values()) == 1  # I3


async def test_a_wiped_redis_pauses_processing_until_state_rebuild(
    own: tuple[Settings, Service, Path],
) -> None:
    settings, _, record = own
    tag = uuid.uuid4().hex[:6]
    first = [f"w-{tag}-{i}" for i in range(100)]
    async with EventDispatch(settings) as ed:
        await ed.register_script("wipe", "echo wipe\n")
        await ed.wait_accepted(await ed.submit(f"before-{tag}", "wipe", first))
        assert (await ed.wait_done(f"before-{tag}", timeout_s=120)).counts == {"succeeded": 100}

        r = redis.Redis.from_url(settings.redis_url)
        keys = list(r.scan_iter(f"{settings.redis_prefix}:*"))
        assert r.delete(*keys) == len(keys)  # Redis lost everything

        # Half the next task's devices are the first's: their state is what was lost.
        second = first[:50] + [f"w2-{tag}-{i}" for i in range(50)]
        sub = await ed.submit(f"after-{tag}", "wipe", second)
        wait_until(
            "a worker says why it refuses",
            lambda: any(
                "state rebuild" in " ".join(w["waiting_on"].values())
                for w in supervised(settings).values()
            ),
        )
        refused = cli(settings, "health")
        assert refused.returncode == 1 and "state" in refused.stdout
        assert await ed.status(f"after-{tag}") is None  # not planned on a lost registry

        rebuilt = cli(settings, "state", "rebuild")
        assert rebuilt.returncode == 0, rebuilt.stderr
        assert "100 device states, 1 script versions, 1 tasks" in rebuilt.stdout
        await ed.wait_accepted(sub, timeout_s=60)
        assert (await ed.wait_done(f"after-{tag}", timeout_s=120)).counts == {"succeeded": 100}
        # The first task again is still a no-op: the rebuilt registry knows it.
        await ed.submit(f"before-{tag}", "wipe", first)
        assert (await ed.wait_done(f"before-{tag}", timeout_s=30)).counts == {"succeeded": 100}

    accepted = _accepted(record)
    assert max(accepted.values()) == 1  # I3: no duplicate sends across the wipe
    assert sum(k.startswith(f"before-{tag}:") for k in accepted) == 100
    assert sum(k.startswith(f"after-{tag}:") for k in accepted) == 100
    assert r.get(marker_key(settings.redis_prefix)) is not None


async def test_a_redis_of_another_generation_is_refused(
    own: tuple[Settings, Service, Path],
) -> None:
    settings, _, _ = own
    r = redis.Redis.from_url(settings.redis_url)
    key = marker_key(settings.redis_prefix)
    original = r.get(key)
    assert original is not None
    r.set(key, "someone-elses")
    async with EventDispatch(settings) as ed:
        with pytest.raises(TimeoutError):
            await ed.register_script("other", "echo other\n", timeout_s=8)
        workers = supervised(settings).values()
        assert "another deployment" in " ".join(" ".join(w["waiting_on"].values()) for w in workers)
        assert all(w["alive"] for w in workers)
        r.set(key, original)
        # The command waited; it was not lost: it is planned once Redis is the log's again.
        info = await ed.register_script("other", "echo other\n", timeout_s=60)
        assert info.version == 1
