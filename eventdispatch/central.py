"""HTTP adapter for the Central Control API.

Contract (the simulator implements the same):
  POST   /v1/devices/{device_id}/executions   Idempotency-Key: {exec_id}
         body {exec_id, script_id, script_version, language, content, sha256, params, timeout_s}
         202 accepted (a repeat of the key gets the first answer and runs nothing),
         404 unknown device, 422 script refused.
  DELETE /v1/devices/{device_id}/executions/{exec_id}   stop a running attempt.
Transient trouble (connection errors, HTTP timeouts, 429, 5xx) is retried here with capped
exponential backoff and never reaches the decider, so it uses up no attempt.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random

import httpx

from eventdispatch.inputs import Delivery
from eventdispatch.registry import ScriptVersion

log = logging.getLogger("eventdispatch.central")

TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
MAX_CONNECTIONS = 16


class CentralControl:
    def __init__(
        self, base_url: str, timeout_s: float, backoff_base_s: float, backoff_cap_s: float
    ) -> None:
        # Requests wait for a connection here, not in httpx's pool, whose bookkeeping costs
        # O(waiting x connections) per request (90% of a worker's CPU at 10,000 devices).
        self.http = httpx.AsyncClient(
            base_url=base_url,
            timeout=httpx.Timeout(timeout_s, pool=None),
            limits=httpx.Limits(
                max_connections=MAX_CONNECTIONS, max_keepalive_connections=MAX_CONNECTIONS
            ),
        )
        self.slots = asyncio.Semaphore(MAX_CONNECTIONS)
        self.backoff_base_s = backoff_base_s
        self.backoff_cap_s = backoff_cap_s

    async def deliver(
        self,
        device_id: str,
        exec_id: str,
        script: ScriptVersion,
        params_json: str,
        timeout_s: int,
    ) -> tuple[Delivery, str]:
        """POST one attempt until Central Control gives a definite answer."""
        body = {
            "exec_id": exec_id,
            "script_id": script.script_id,
            "script_version": script.version,
            "language": script.language,
            "content": script.content,
            "sha256": script.sha256,
            "params": json.loads(params_json),
            "timeout_s": timeout_s,
        }
        url = f"/v1/devices/{device_id}/executions"
        tries = 0
        while True:
            tries += 1
            try:
                async with self.slots:
                    r = await self.http.post(url, json=body, headers={"Idempotency-Key": exec_id})
            except httpx.TransportError as e:
                trouble = f"{type(e).__name__}: {e}"
            else:
                if r.status_code < 300:
                    return Delivery.ACCEPTED, ""
                if r.status_code == 404:
                    return Delivery.UNKNOWN_DEVICE, _detail(r)
                if r.status_code == 422:
                    return Delivery.SCRIPT_REFUSED, _detail(r)
                if r.status_code not in TRANSIENT_STATUS:
                    return Delivery.REFUSED, f"HTTP {r.status_code}: {_detail(r)}"
                trouble = f"HTTP {r.status_code}"
            delay = self._backoff(tries)
            log.warning(
                "central control trouble for %s (%s), retry %d in %.2fs",
                exec_id,
                trouble,
                tries,
                delay,
            )
            await asyncio.sleep(delay)

    async def stop(self, device_id: str, exec_id: str, tries: int = 5) -> bool:
        """Ask Central Control to stop an attempt; best effort, a late result is ignored anyway."""
        for n in range(1, tries + 1):
            try:
                async with self.slots:
                    r = await self.http.delete(f"/v1/devices/{device_id}/executions/{exec_id}")
                if r.status_code < 500 and r.status_code != 429:
                    return r.status_code < 300
            except httpx.TransportError:
                pass
            await asyncio.sleep(self._backoff(n))
        log.warning("could not stop %s on %s after %d tries", exec_id, device_id, tries)
        return False

    def _backoff(self, tries: int) -> float:
        ceiling = min(self.backoff_cap_s, self.backoff_base_s * 2 ** (tries - 1))
        return float(ceiling * (0.5 + random.random() / 2))

    async def close(self) -> None:
        await self.http.aclose()


def _detail(r: httpx.Response) -> str:
    try:
        data = r.json()
    except ValueError:
        return r.text[:500]
    if isinstance(data, dict) and "detail" in data:
        return str(data["detail"])[:500]
    return r.text[:500]
