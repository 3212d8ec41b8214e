"""A Central Control simulator: the one external system the tests do not run for real.

It speaks the contract in `central.py`, "runs" each accepted script after a latency, publishes
the log lines to `device-logs` like the real service, and appends what it saw to a JSONL record:
    {"event": "accepted", "exec_id", "device_id", "at_ms"}     first POST of an exec_id
    {"event": "repeat",   "exec_id", "device_id", "at_ms"}     a POST with a known key
    {"event": "finished", "exec_id", "device_id", "received_at_ms", "at_ms", "outcome"}  at_ms: the
                                   script ended, before its result lines were published
    {"event": "stopped",  "exec_id", "device_id", "at_ms"}     a DELETE of a running attempt
    {"event": "refused",  "exec_id", "device_id", "at_ms", "status"}
The record is how tests see what the devices saw (I1, I3, I4 from the device side).

Behaviour per device id pattern comes from a JSON or YAML file (`--behaviour`), a list of rules;
the first whose `devices` glob matches applies:
    - devices: "dead-*"        # fnmatch pattern
      status: 404              # answer every POST with this status (404, 422, 500, ...)
      outcomes: [ERROR, SUCCESS]  # by attempt number, the last repeats (SUCCESS, ERROR,
                               # SYSTEM_ERROR, SILENT = never answers)
      latency_ms: [10, 50]
      error_rate: 0.05         # share of POSTs answered 503 (transient)
      throttle_rate: 0.0       # share of POSTs answered 429
      hang_rate: 0.0           # share of POSTs that hang for `hang_s` before answering
      hang_s: 30
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import json
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn
import yaml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from eventdispatch.bus import Bus, Outgoing, publish
from eventdispatch.config import Settings

log = logging.getLogger("eventdispatch.simulator")


@dataclass(frozen=True)
class Behaviour:
    devices: str = "*"
    status: int | None = None
    outcomes: tuple[str, ...] = ("SUCCESS",)
    latency_ms: tuple[int, int] = (5, 20)
    error_rate: float = 0.0
    throttle_rate: float = 0.0
    hang_rate: float = 0.0
    hang_s: float = 30.0


def load_behaviours(path: Path | None, default_latency: tuple[int, int]) -> list[Behaviour]:
    rules: list[Behaviour] = []
    if path is not None:
        data = yaml.safe_load(path.read_text()) or []
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a list of rules, got {type(data).__name__}")
        for i, rule in enumerate(data):
            if not isinstance(rule, dict):
                raise ValueError(f"{path}: rule {i + 1} is not a mapping")
            unknown = set(rule) - set(Behaviour.__dataclass_fields__)
            if unknown:
                raise ValueError(f"{path}: rule {i + 1} has unknown keys {sorted(unknown)}")
            rule = dict(rule)
            if "outcomes" in rule:
                rule["outcomes"] = tuple(str(o).upper() for o in rule["outcomes"])
            rule["latency_ms"] = tuple(rule.get("latency_ms", default_latency))
            rules.append(Behaviour(**rule))
    rules.append(Behaviour(latency_ms=default_latency))
    return rules


@dataclass
class Simulator:
    settings: Settings
    record_path: Path
    behaviours: list[Behaviour]
    answers: dict[str, tuple[int, dict[str, Any]]] = field(default_factory=dict)
    running: dict[str, asyncio.Task[None]] = field(default_factory=dict)

    def behaviour(self, device_id: str) -> Behaviour:
        return next(b for b in self.behaviours if fnmatch.fnmatchcase(device_id, b.devices))

    def record(self, **fields: Any) -> None:
        self._file.write(json.dumps(fields) + "\n")

    def _reload(self) -> None:
        """A restarted simulator still honours the keys it answered before."""
        if not self.record_path.exists():
            return
        for line in self.record_path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                r = json.loads(line)
                if r.get("event") == "accepted":
                    self.answers[r["exec_id"]] = (
                        202,
                        {"exec_id": r["exec_id"], "status": "accepted"},
                    )

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        self.record_path.parent.mkdir(parents=True, exist_ok=True)
        self._reload()
        self._file = self.record_path.open("a", buffering=1)
        self.bus = Bus(self.settings)
        self.logs = await self.bus.producer("device-logs")
        log.info("simulator record: %s", self.record_path)
        try:
            yield
        finally:
            for task in self.running.values():
                task.cancel()
            await self.logs.flush()
            await self.bus.close()
            self._file.close()

    async def post(self, request: Request) -> JSONResponse:
        device_id = request.path_params["device_id"]
        try:
            body = await request.json()
        except ValueError:
            return JSONResponse({"detail": "body is not JSON"}, status_code=400)
        key = request.headers.get("idempotency-key") or body.get("exec_id")
        if not key:
            return JSONResponse({"detail": "Idempotency-Key header is required"}, status_code=400)
        now = _now_ms()
        if key in self.answers:
            self.record(event="repeat", exec_id=key, device_id=device_id, at_ms=now)
            status, answer = self.answers[key]
            return JSONResponse(answer, status_code=status)
        b = self.behaviour(device_id)
        roll = random.random()
        if roll < b.hang_rate:
            await asyncio.sleep(b.hang_s)
            return JSONResponse({"detail": "hung"}, status_code=504)
        if roll < b.hang_rate + b.error_rate:
            return JSONResponse({"detail": "simulated outage"}, status_code=503)
        if roll < b.hang_rate + b.error_rate + b.throttle_rate:
            return JSONResponse({"detail": "slow down"}, status_code=429)
        if b.status is not None and b.status >= 400:
            self.record(
                event="refused", exec_id=key, device_id=device_id, at_ms=now, status=b.status
            )
            answer = {"detail": f"simulated {b.status} for device {device_id}"}
            if b.status < 500:
                self.answers[key] = (b.status, answer)
            return JSONResponse(answer, status_code=b.status)
        self.answers[key] = (202, {"exec_id": key, "status": "accepted"})
        self.record(event="accepted", exec_id=key, device_id=device_id, at_ms=now)
        outcome = b.outcomes[min(_attempt_of(key) - 1, len(b.outcomes) - 1)]
        self.running[key] = asyncio.create_task(self._run(key, device_id, now, outcome, b))
        return JSONResponse({"exec_id": key, "status": "accepted"}, status_code=202)

    async def delete(self, request: Request) -> JSONResponse:
        exec_id = request.path_params["exec_id"]
        task = self.running.pop(exec_id, None)
        if task is None:
            return JSONResponse({"detail": "not running"}, status_code=404)
        task.cancel()
        self.record(
            event="stopped",
            exec_id=exec_id,
            device_id=request.path_params["device_id"],
            at_ms=_now_ms(),
        )
        return JSONResponse({"exec_id": exec_id, "status": "stopped"})

    async def _run(
        self, exec_id: str, device_id: str, received: int, outcome: str, b: Behaviour
    ) -> None:
        try:
            await asyncio.sleep(random.uniform(*b.latency_ms) / 1000)
            lines = [("INFO", f"running {exec_id}")]
            if outcome == "SUCCESS":
                lines.append(("SUCCESS", "exit 0"))
            elif outcome in ("ERROR", "SYSTEM_ERROR"):
                lines.append((outcome, "exit 1: simulated failure"))
            ended = _now_ms()  # the script ends, then the device reports it
            await self._publish(exec_id, device_id, lines)
            if outcome == "SILENT":
                await asyncio.Future()  # runs until stopped, never reports a result
            self.record(
                event="finished",
                exec_id=exec_id,
                device_id=device_id,
                received_at_ms=received,
                at_ms=ended,
                outcome=outcome,
            )
        finally:
            self.running.pop(exec_id, None)

    async def _publish(self, exec_id: str, device_id: str, lines: list[tuple[str, str]]) -> None:
        out = [
            Outgoing(
                {
                    "log_id": str(uuid.uuid4()),
                    "exec_id": exec_id,
                    "device_id": device_id,
                    "level": level,
                    "message": message,
                    "ts_ms": _now_ms(),
                },
                device_id,
            )
            for level, message in lines
        ]
        await publish(self.logs, out)


def _attempt_of(exec_id: str) -> int:
    """exec_id is `{task}:{device}:{attempt}`; anything else counts as a first attempt."""
    tail = exec_id.rsplit(":", 1)[-1]
    return int(tail) if tail.isdigit() and int(tail) > 0 else 1


def _now_ms() -> int:
    return int(time.time() * 1000)


def app(sim: Simulator) -> Starlette:
    routes = [
        Route("/v1/devices/{device_id}/executions", sim.post, methods=["POST"]),
        Route("/v1/devices/{device_id}/executions/{exec_id}", sim.delete, methods=["DELETE"]),
    ]
    return Starlette(routes=routes, lifespan=sim.lifespan)


async def serve(sim: Simulator, host: str, port: int) -> None:
    config = uvicorn.Config(app(sim), host=host, port=port, log_level="warning", lifespan="on")
    await uvicorn.Server(config).serve()
