"""One worker process: planner, device processor, timer relay and log bridge, and/or the
projector, sharing one Pulsar client. SIGTERM or SIGINT drains: every stage stops receiving,
finishes what it holds, acknowledges, flushes, and the process exits 0. The supervisor
(eventdispatch.supervisor) runs several and restarts one that dies."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
from collections.abc import Coroutine
from typing import Any, TypeVar

import redis.asyncio as redis

from eventdispatch.bus import Bus
from eventdispatch.central import CentralControl
from eventdispatch.config import Settings
from eventdispatch.decider import RetryPolicy
from eventdispatch.device_store import DeviceStore
from eventdispatch.generation import StateGuard
from eventdispatch.log_bridge import LogBridge
from eventdispatch.planner import Planner
from eventdispatch.processor import DeviceProcessor
from eventdispatch.registry import Registry
from eventdispatch.retry import retry_in_place, troubles
from eventdispatch.timer_relay import TimerRelay
from projections.projector import Projector
from projections.store import ProjectionStore, connect

log = logging.getLogger("eventdispatch.worker")
T = TypeVar("T")


def _stop_on_signals() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def _unless_stopped(work: Coroutine[Any, Any, T], stop: asyncio.Event) -> T | None:
    """`work`'s result, or None if `stop` is set first (a start waiting on a dependency must
    still obey SIGTERM)."""
    task = asyncio.create_task(work)
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait([task, stopped], return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if not task.done():
        task.cancel()
        return None
    return task.result()


class Heartbeat:
    """Tells the supervisor, once a second, that this worker lives and whether it is ready:
    every stage running and nothing being retried (see `retry.troubles`). One JSON line per
    beat on the pipe the supervisor passed down (EVENTDISPATCH_HEALTH_FD); none without one."""

    def __init__(self, fd: int | None) -> None:
        self.out = os.fdopen(fd, "w", buffering=1) if fd is not None else None
        self.stages: dict[str, asyncio.Task[None]] = {}

    def report(self) -> dict[str, object]:
        stages = {}
        for name, task in self.stages.items():
            if not task.done():
                stages[name] = "running"
            elif task.cancelled() or task.exception() is None:
                stages[name] = "stopped"
            else:
                stages[name] = f"failed: {task.exception()!r}"
        waiting = troubles()
        if not stages and not waiting:
            waiting = {"start": "connecting to the broker, Redis and MongoDB"}
        ready = bool(stages) and all(v == "running" for v in stages.values()) and not waiting
        return {"pid": os.getpid(), "ready": ready, "stages": stages, "waiting_on": waiting}

    async def run(self, stop: asyncio.Event) -> None:
        if self.out is None:
            return
        while not stop.is_set():
            with contextlib.suppress(OSError):  # the supervisor went away: nothing to tell
                self.out.write(json.dumps(self.report()) + "\n")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)


async def run(
    settings: Settings,
    with_stages: bool = True,
    with_projector: bool = True,
    heartbeat_fd: int | None = None,
) -> int:
    """Run the stages (planner, device processor, timer relay, log bridge) and/or the
    projector until SIGTERM or SIGINT, then drain. Returns the exit code: 1 if a stage
    failed, which tells a supervisor to start the worker again."""
    stop = _stop_on_signals()
    heartbeat = Heartbeat(heartbeat_fd)
    beating = asyncio.create_task(heartbeat.run(stop))
    bus = Bus(settings)
    # A blocking pool: thousands of devices share 64 connections and wait their turn, where
    # the default pool raises "Too many connections" past its limit (redis-py 6+).
    pool = redis.BlockingConnectionPool.from_url(
        settings.redis_url, max_connections=64, timeout=None
    )
    r = redis.Redis(connection_pool=pool)
    central = CentralControl(
        settings.central_url,
        settings.central_http_timeout_s,
        settings.delivery_backoff_base_s,
        settings.delivery_backoff_cap_s,
    )
    mongo = connect(settings.mongo_url)
    stages: dict[str, Coroutine[Any, Any, None]] = {}
    failed = False
    try:
        if with_stages:
            guard = StateGuard(settings, r)
            # Refuses (and says why, every few seconds) while Redis is not the log's.
            if not await _unless_stopped(
                retry_in_place("check state generation", guard.establish), stop
            ):
                return 0
            registry = Registry(r, settings.redis_prefix)
            policy = RetryPolicy(
                int(settings.retry_base_s * 1000), int(settings.retry_cap_s * 1000)
            )
            store = DeviceStore(r, settings.redis_prefix, guard)
            processor = DeviceProcessor(
                bus, store, registry, central, policy, settings.drain_grace_s
            )
            stages["planner"] = Planner(bus, registry, guard).run(stop)
            stages["device-processor"] = processor.run(stop)
            stages["timer-relay"] = TimerRelay(bus).run(stop)
            stages["log-bridge"] = LogBridge(bus).run(stop)
        if with_projector:
            opening = retry_in_place(
                "open projections", lambda: ProjectionStore.open(mongo[settings.mongo_db])
            )
            projections = await _unless_stopped(opening, stop)
            if projections is None:
                return 0
            stages["projector"] = Projector(
                bus,
                projections,
                settings.projector_batch_size,
                settings.projector_linger_ms / 1000,
            ).run(stop)
        if stop.is_set():
            for coroutine in stages.values():
                coroutine.close()
            return 0
        heartbeat.stages = {name: asyncio.create_task(c) for name, c in stages.items()}
        tasks = list(heartbeat.stages.values())
        log.info(
            "worker started: pulsar=%s namespace=%s/%s central=%s stages=%s",
            settings.pulsar_url,
            settings.tenant,
            settings.namespace,
            settings.central_url,
            ",".join(stages),
        )
        if "projector" in stages:
            log.info("projector started: mongo db %s", settings.mongo_db)
        done, _ = await asyncio.wait(
            [*tasks, asyncio.create_task(stop.wait())], return_when=asyncio.FIRST_COMPLETED
        )
        for t in done:
            if t in tasks and t.exception() is not None:
                log.error("a stage failed: %r; stopping", t.exception())
                failed = True
                stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        failed = failed or any(t.exception() is not None for t in tasks)
        return 1 if failed else 0
    finally:
        stop.set()
        await beating
        await central.close()
        await r.aclose()
        await mongo.close()
        await bus.close()
        log.info("worker stopped%s", " after a stage failed" if failed else "")
