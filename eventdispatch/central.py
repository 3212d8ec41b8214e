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
import contextlib
import json
import logging
import random
import ssl
import time
from urllib.parse import urlsplit

import h11

from eventdispatch.inputs import Delivery
from eventdispatch.registry import ScriptVersion
from eventdispatch.retry import trouble_began, trouble_ended

TROUBLE = "deliver to Central Control"
SUSTAINED_S = 3.0
"""A delivery failing this long makes its worker report the trouble (and not ready)."""
log = logging.getLogger("eventdispatch.central")

TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
MAX_CONNECTIONS = 16


class TransportError(Exception):
    """The request did not get an answer: connection refused or lost, a protocol error, or no
    complete answer within the timeout. Always transient."""


class Response:
    def __init__(self, status_code: int, content: bytes) -> None:
        self.status_code = status_code
        self.content = content

    @property
    def text(self) -> str:
        return self.content.decode(errors="replace")

    def json(self) -> object:
        return json.loads(self.content)


class _Connection:
    """One HTTP/1.1 keep-alive connection: h11 over asyncio streams."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.h11 = h11.Connection(h11.CLIENT)

    async def exchange(self, request: h11.Request, body: bytes) -> Response:
        h = self.h11
        out = h.send(request) or b""
        if body:
            out += h.send(h11.Data(data=body)) or b""
        self.writer.write(out + (h.send(h11.EndOfMessage()) or b""))
        status = 0
        chunks: list[bytes] = []
        while True:
            event = h.next_event()
            if event is h11.NEED_DATA:
                h.receive_data(await self.reader.read(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return Response(status, b"".join(chunks))
            elif isinstance(event, h11.ConnectionClosed):
                raise TransportError("the server closed the connection before answering")

    def reusable(self) -> bool:
        if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
            self.h11.start_next_cycle()
            return not self.reader.at_eof()
        return False

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


class HttpPool:
    """Keep-alive HTTP/1.1 connections to one origin, at most `size` at a time.

    httpx cost ~4.7 ms of CPU per POST on the 2-core development machine (its connection pool
    checks every pooled connection's socket on each request, through anyio); h11, the same
    parser httpx uses, over plain asyncio streams costs ~0.5 ms (docs/benchmarks.md)."""

    def __init__(self, base_url: str, timeout_s: float, size: int) -> None:
        url = urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"central control URL {base_url!r} is not http(s)://host[:port]")
        self.host = url.hostname
        self.port = url.port or (443 if url.scheme == "https" else 80)
        self.ssl = ssl.create_default_context() if url.scheme == "https" else None
        self.prefix = url.path.rstrip("/")
        self.authority = url.netloc
        self.timeout_s = timeout_s
        self.slots = asyncio.Semaphore(size)
        self.idle: list[_Connection] = []

    async def _connect(self) -> _Connection:
        reader, writer = await asyncio.open_connection(self.host, self.port, ssl=self.ssl)
        return _Connection(reader, writer)

    async def request(
        self, method: str, path: str, body: bytes = b"", headers: tuple[tuple[str, str], ...] = ()
    ) -> Response:
        head = [("Host", self.authority), ("User-Agent", "eventdispatch"), *headers]
        if body or method in ("POST", "PUT", "PATCH"):
            head += [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
        request = h11.Request(method=method, target=self.prefix + path, headers=head)
        async with self.slots:
            # A kept-alive connection the server has meanwhile closed fails at once; the
            # request is then sent once more on a new one (every call is idempotent).
            for reused in (True, False):
                conn = self.idle.pop() if reused and self.idle else None
                if conn is None:
                    reused = False
                try:
                    async with asyncio.timeout(self.timeout_s):
                        if conn is None:
                            conn = await self._connect()
                        response = await conn.exchange(request, body)
                except (OSError, h11.ProtocolError, TransportError, TimeoutError) as e:
                    if conn is not None:
                        conn.close()
                    if reused and not isinstance(e, TimeoutError):
                        continue
                    raise TransportError(f"{type(e).__name__}: {e}") from e
                except BaseException:  # canceled mid-exchange: the connection is unusable
                    if conn is not None:
                        conn.close()
                    raise
                if conn.reusable():
                    self.idle.append(conn)
                else:
                    conn.close()
                return response
        raise AssertionError("unreachable")

    async def close(self) -> None:
        for conn in self.idle:
            conn.close()
        self.idle.clear()


class CentralControl:
    def __init__(
        self, base_url: str, timeout_s: float, backoff_base_s: float, backoff_cap_s: float
    ) -> None:
        # Requests wait for a connection in the pool's semaphore, never in a queue whose
        # bookkeeping grows with the number waiting (10,000 devices wait at once).
        self.http = HttpPool(base_url, timeout_s, MAX_CONNECTIONS)
        self.base_url = base_url
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
        data = json.dumps(body, separators=(",", ":")).encode()
        url = f"/v1/devices/{device_id}/executions"
        tries = 0
        troubled = False
        started = time.monotonic()
        try:
            while True:
                tries += 1
                try:
                    r = await self.http.request("POST", url, data, (("Idempotency-Key", exec_id),))
                except TransportError as e:
                    trouble = str(e)
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
                if not troubled and time.monotonic() - started > SUSTAINED_S:
                    # `health` shows it: Central Control down or misaddressed, not one 503
                    trouble_began(TROUBLE, f"{self.base_url}: {trouble}")
                    troubled = True
                delay = self._backoff(tries)
                log.warning(
                    "central control trouble for %s (%s), retry %d in %.2fs",
                    exec_id,
                    trouble,
                    tries,
                    delay,
                )
                await asyncio.sleep(delay)
        finally:
            if troubled:
                trouble_ended(TROUBLE)

    async def stop(self, device_id: str, exec_id: str, tries: int = 5) -> bool:
        """Ask Central Control to stop an attempt; best effort, a late result is ignored anyway."""
        for n in range(1, tries + 1):
            try:
                r = await self.http.request(
                    "DELETE", f"/v1/devices/{device_id}/executions/{exec_id}"
                )
                if r.status_code < 500 and r.status_code != 429:
                    return r.status_code < 300
            except TransportError:
                pass
            await asyncio.sleep(self._backoff(n))
        log.warning("could not stop %s on %s after %d tries", exec_id, device_id, tries)
        return False

    def _backoff(self, tries: int) -> float:
        ceiling = min(self.backoff_cap_s, self.backoff_base_s * 2 ** (tries - 1))
        return float(ceiling * (0.5 + random.random() / 2))

    async def close(self) -> None:
        await self.http.close()


def _detail(r: Response) -> str:
    try:
        data = r.json()
    except ValueError:
        return r.text[:500]
    if isinstance(data, dict) and "detail" in data:
        return str(data["detail"])[:500]
    return r.text[:500]
