"""Redis adapter for device state: the decider's state plus the position of the last input
applied, so a redelivered input is recognised and skipped. A cache of the log: it can be
rebuilt by folding each device's events with `decider.evolve`."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

import redis.asyncio as redis

from eventdispatch.bus import MessageKey
from eventdispatch.decider import DeviceState, Execution
from eventdispatch.generation import StateGuard, StateLost


def encode_state(state: DeviceState, last_input: MessageKey | None) -> str:
    return json.dumps(
        {
            "device_id": state.device_id,
            "seq": state.seq,
            "next_order": state.next_order,
            "live": {k: asdict(v) for k, v in state.live.items()},
            "ended": dict(state.ended),
            "last_input": list(last_input) if last_input else None,
        },
        separators=(",", ":"),
    )


def decode_state(raw: str | bytes) -> tuple[DeviceState, MessageKey | None]:
    data: dict[str, Any] = json.loads(raw)
    state = DeviceState(
        device_id=data["device_id"],
        seq=data["seq"],
        live={k: Execution(**v) for k, v in data["live"].items()},
        ended=data["ended"],
        next_order=data["next_order"],
    )
    last = data.get("last_input")
    return state, ((last[0], last[1], last[2]) if last else None)


# Save only while the generation marker is the one this process checked: a state written
# into a wiped or rebuilding Redis would look like the log's when it is not.
_SAVE_IF_GENERATION = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    redis.call('SET', KEYS[2], ARGV[2])
    return 1
end
return 0
"""


class DeviceStore:
    """Device states under `<prefix>:dev:<device_id>`; delivery markers under `<prefix>:sent:`.
    Every load and save is checked against the state generation (see `state.StateGuard`)."""

    def __init__(self, client: redis.Redis, prefix: str, guard: StateGuard) -> None:
        self.redis = client
        self.prefix = prefix
        self.guard = guard
        self._save = client.register_script(_SAVE_IF_GENERATION)

    def _key(self, device_id: str) -> str:
        return f"{self.prefix}:dev:{device_id}"

    async def load(self, device_id: str) -> tuple[DeviceState, MessageKey | None]:
        """The device's state and last input, once Redis holds the log's generation."""
        while True:
            marker, raw = await self.redis.mget(self.guard.key, self._key(device_id))
            try:
                self.guard.verify(marker)
                break
            except StateLost:
                await self.guard.valid()  # paused until Redis is the log's again
        if raw is None:
            return DeviceState(device_id), None
        return decode_state(raw)

    async def save(self, state: DeviceState, last_input: MessageKey | None) -> None:
        keys = [self.guard.key, self._key(state.device_id)]
        encoded = encode_state(state, last_input)
        while not await self._save(keys=keys, args=[self.guard.expected or "", encoded]):
            await self.guard.valid()

    async def mark_delivery(self, exec_id: str, ttl_s: int) -> bool:
        """Note that a call for this attempt is about to be made; False if one was made before.
        The marker expires after `ttl_s` (the attempt's life and more): one is set per attempt,
        and without an expiry they would fill Redis for ever."""
        key = f"{self.prefix}:sent:{exec_id}"
        return bool(await self.redis.set(key, 1, nx=True, ex=ttl_s))
