"""One worker process: planner, device processor, timer relay, log bridge and (optionally) the
projector, sharing one Pulsar client. SIGTERM or SIGINT drains: every stage stops receiving,
finishes what it holds, acknowledges, flushes, and the process exits 0."""

from __future__ import annotations

import asyncio
import logging
import signal

import redis.asyncio as redis

from eventdispatch.bus import Bus
from eventdispatch.central import CentralControl
from eventdispatch.config import Settings
from eventdispatch.decider import RetryPolicy
from eventdispatch.device_store import DeviceStore
from eventdispatch.log_bridge import LogBridge
from eventdispatch.planner import Planner
from eventdispatch.processor import DeviceProcessor
from eventdispatch.registry import Registry
from eventdispatch.timer_relay import TimerRelay
from projections.projector import Projector
from projections.store import ProjectionStore, connect

log = logging.getLogger("eventdispatch.worker")


async def run_projector(settings: Settings) -> None:
    """The projector alone, for deployments that scale it apart from the workers."""
    stop = _stop_on_signals()
    bus = Bus(settings)
    mongo = connect(settings.mongo_url)
    try:
        store = await ProjectionStore.open(mongo[settings.mongo_db])
        projector = Projector(bus, store, settings.projector_batch_size)
        log.info("projector started: namespace=%s/%s", settings.tenant, settings.namespace)
        await projector.run(stop)
    finally:
        await mongo.close()
        await bus.close()


def _stop_on_signals() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def run(settings: Settings, with_projector: bool = True) -> None:
    stop = _stop_on_signals()
    bus = Bus(settings)
    # A blocking pool: thousands of devices share 64 connections and wait their turn, where
    # the default pool raises "Too many connections" past its limit (redis-py 6+).
    pool = redis.BlockingConnectionPool.from_url(
        settings.redis_url, max_connections=64, timeout=None
    )
    r = redis.Redis(connection_pool=pool)
    registry = Registry(r, settings.redis_prefix)
    central = CentralControl(
        settings.central_url,
        settings.central_http_timeout_s,
        settings.delivery_backoff_base_s,
        settings.delivery_backoff_cap_s,
    )
    policy = RetryPolicy(int(settings.retry_base_s * 1000), int(settings.retry_cap_s * 1000))
    mongo = connect(settings.mongo_url)
    stages = [
        Planner(bus, registry).run(stop),
        DeviceProcessor(
            bus,
            DeviceStore(r, settings.redis_prefix),
            registry,
            central,
            policy,
            settings.drain_grace_s,
        ).run(stop),
        TimerRelay(bus).run(stop),
        LogBridge(bus).run(stop),
    ]
    if with_projector:
        store = await ProjectionStore.open(mongo[settings.mongo_db])
        stages.append(Projector(bus, store, settings.projector_batch_size).run(stop))
    log.info(
        "worker started: pulsar=%s namespace=%s/%s central=%s projector=%s",
        settings.pulsar_url,
        settings.tenant,
        settings.namespace,
        settings.central_url,
        with_projector,
    )
    tasks = [asyncio.create_task(s) for s in stages]
    try:
        done, _ = await asyncio.wait(
            [*tasks, asyncio.create_task(stop.wait())], return_when=asyncio.FIRST_COMPLETED
        )
        for t in done:
            if t in tasks and t.exception() is not None:
                log.error("a stage failed: %r; stopping", t.exception())
                stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        await central.close()
        await r.aclose()
        await mongo.close()
        await bus.close()
        log.info("worker stopped")
