"""The supervisor behind `eventdispatch run --workers N`.

It starts N worker processes (each runs the planner, device processor, timer relay and log
bridge) and, with the projector, one projector process. A child that exits or dies is started
again after a backoff that doubles while it keeps failing fast. On SIGTERM or SIGINT it passes
SIGTERM on, waits for the children to drain (their grace period plus a margin), and exits 0
if every child did. No locks are needed between workers: Key_Shared hands each device to one
consumer, and every effect is idempotent.

Each child reports once a second over a pipe (see `worker.Heartbeat`); the supervisor serves
what it knows on http://127.0.0.1:<port>/: `/healthz` (200 while it runs), `/readyz` (200 when
every child is alive and ready, else 503) and `/status` (JSON), which `eventdispatch health`
prints.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from eventdispatch.config import Settings

log = logging.getLogger("eventdispatch.supervisor")

BEAT_STALE_S = 5.0
"""A child silent for longer is reported not alive (hung), though its process exists."""
BACKOFF_START_S = 0.5
BACKOFF_CAP_S = 30.0
STEADY_S = 30.0
"""A child that ran this long, or became ready, before dying is restarted after the shortest
backoff: it was not failing in a loop."""
STOP_MARGIN_S = 15.0


class SupervisorError(RuntimeError):
    """The supervisor cannot start; the message says what to change."""


@dataclass
class Child:
    """One supervised process and what the supervisor knows of it."""

    name: str
    role: str  # "stages" or "projector"
    process: asyncio.subprocess.Process | None = None
    started_at: float = 0.0
    restarts: int = 0
    last_exit: int | None = None
    last_beat: float = 0.0
    report: dict[str, Any] = field(default_factory=dict)
    was_ready: bool = False

    def alive(self, now: float) -> bool:
        running = self.process is not None and self.process.returncode is None
        return running and now - self.last_beat < BEAT_STALE_S

    def ready(self, now: float) -> bool:
        return self.alive(now) and bool(self.report.get("ready"))

    def status(self, now: float) -> dict[str, Any]:
        running = self.process is not None and self.process.returncode is None
        return {
            "name": self.name,
            "role": self.role,
            "pid": self.process.pid if running and self.process else None,
            "alive": self.alive(now),
            "ready": self.ready(now),
            "uptime_s": round(now - self.started_at, 1) if running else 0.0,
            "restarts": self.restarts,
            "last_exit": self.last_exit,
            "stages": self.report.get("stages", {}),
            "waiting_on": self.report.get("waiting_on", {}),
        }


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM if the supervisor dies, so no worker outlives
    it (Linux prctl PR_SET_PDEATHSIG)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


class Supervisor:
    def __init__(
        self, settings: Settings, workers: int, with_projector: bool, health_port: int
    ) -> None:
        if workers < 1:
            raise SupervisorError(f"--workers must be at least 1, got {workers}")
        self.settings = settings
        self.health_port = health_port
        self.children = [Child(f"worker-{i + 1}", "stages") for i in range(workers)]
        if with_projector:
            self.children.append(Child("projector", "projector"))
        self.stop = asyncio.Event()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop.set)
        try:
            server = await asyncio.start_server(self._serve, "127.0.0.1", self.health_port)
        except OSError as e:
            raise SupervisorError(
                f"cannot serve health on 127.0.0.1:{self.health_port} ({e.strerror}); is "
                "another `eventdispatch run` there? Choose another with --health-port "
                "(or EVENTDISPATCH_HEALTH_PORT)"
            ) from e
        log.info(
            "supervisor started: %d worker(s)%s, health on http://127.0.0.1:%d/status",
            sum(c.role == "stages" for c in self.children),
            " and the projector" if any(c.role == "projector" for c in self.children) else "",
            self.health_port,
        )
        keepers = [asyncio.create_task(self._keep(c)) for c in self.children]
        try:
            await self.stop.wait()
            log.info("stopping: draining %d process(es)", len(self.children))
            codes = await asyncio.gather(*keepers)
        finally:
            server.close()
        clean = all(code == 0 for code in codes)
        log.info("supervisor stopped%s", "" if clean else f" (exit codes {codes})")
        return 0 if clean else 1

    async def _keep(self, child: Child) -> int:
        """Run `child` until the supervisor stops, starting it again whenever it ends."""
        backoff = BACKOFF_START_S
        while True:
            code = await self._run_once(child)
            if self.stop.is_set():
                return code
            ran = time.monotonic() - child.started_at
            backoff = BACKOFF_START_S if ran >= STEADY_S or child.was_ready else backoff
            log.warning(
                "%s (pid %s) exited with %s after %.1fs; starting it again in %.1fs",
                child.name,
                child.process.pid if child.process else "?",
                code,
                ran,
                backoff,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), backoff)
            if self.stop.is_set():
                return 0
            backoff = min(backoff * 2, BACKOFF_CAP_S)
            child.restarts += 1

    async def _run_once(self, child: Child) -> int:
        read_fd, write_fd = os.pipe()
        env = {
            **os.environ,
            "EVENTDISPATCH_HEALTH_FD": str(write_fd),
            "EVENTDISPATCH_PROCESS_NAME": child.name,
        }
        argv = [sys.executable, "-m", "eventdispatch.cli", "worker", "--role", child.role]
        try:
            child.process = await asyncio.create_subprocess_exec(
                *argv, env=env, pass_fds=(write_fd,), preexec_fn=_die_with_parent
            )
        finally:
            os.close(write_fd)
        child.started_at = child.last_beat = time.monotonic()
        child.report = {}
        child.was_ready = False
        beats = asyncio.create_task(self._read_beats(child, read_fd))
        waited = asyncio.create_task(child.process.wait())
        stopping = asyncio.create_task(self.stop.wait())
        await asyncio.wait([waited, stopping], return_when="FIRST_COMPLETED")
        stopping.cancel()  # else every restart leaves one more waiter behind
        if not waited.done():  # stopping: let it drain, then insist
            with contextlib.suppress(ProcessLookupError):
                child.process.terminate()
            try:
                await asyncio.wait_for(
                    asyncio.shield(waited), self.settings.drain_grace_s + STOP_MARGIN_S
                )
            except TimeoutError:
                log.error("%s did not drain in time; killing it", child.name)
                with contextlib.suppress(ProcessLookupError):
                    child.process.kill()
                await waited
        code = waited.result()
        child.last_exit = code
        await beats
        if self.stop.is_set() and code == -signal.SIGTERM:
            # SIGTERM before the worker had set its handler: it had not started any work.
            return 0
        return code

    async def _read_beats(self, child: Child, fd: int) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb")
        )
        try:
            while line := await reader.readline():
                with contextlib.suppress(ValueError):
                    child.report = json.loads(line)
                    child.last_beat = time.monotonic()
                    child.was_ready = child.was_ready or bool(child.report.get("ready"))
        finally:
            transport.close()

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        children = [c.status(now) for c in self.children]
        return {
            "ready": all(c["ready"] for c in children) and not self.stop.is_set(),
            "stopping": self.stop.is_set(),
            "workers": children,
        }

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A minimal HTTP/1.0 endpoint: enough for curl, probes and `eventdispatch health`."""
        try:
            request = await asyncio.wait_for(reader.readline(), 5.0)
            path = request.decode(errors="replace").split(" ")[1] if request.count(b" ") else ""
            status = self.status()
            if path in ("/healthz", "/livez"):
                code, body = 200, {"alive": True, "stopping": status["stopping"]}
            elif path == "/readyz":
                code, body = (200 if status["ready"] else 503), {"ready": status["ready"]}
            elif path in ("/", "/status"):
                code, body = 200, status
            else:
                code, body = 404, {"error": f"no {path}; try /status, /healthz or /readyz"}
            data = json.dumps(body).encode()
            reason = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}[code]
            writer.write(
                f"HTTP/1.0 {code} {reason}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
                + data
            )
            await writer.drain()
        except (TimeoutError, ConnectionError, IndexError):
            pass
        finally:
            writer.close()


async def supervise(
    settings: Settings, workers: int, with_projector: bool, health_port: int
) -> int:
    return await Supervisor(settings, workers, with_projector, health_port).run()
