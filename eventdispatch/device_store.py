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


class DeviceStore:
    """Device states under `<prefix>:dev:<device_id>`; delivery markers under `<prefix>:sent:`."""

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.redis = client
        self.prefix = prefix

    def _key(self, device_id: str) -> str:
        return f"{self.prefix}:dev:{device_id}"

    async def load(self, device_id: str) -> tuple[DeviceState, MessageKey | None]:
        raw = await self.redis.get(self._key(device_id))
        if raw is None:
            return DeviceState(device_id), None
        return decode_state(raw)

    async def save(self, state: DeviceState, last_input: MessageKey | None) -> None:
        await self.redis.set(self._key(state.device_id), encode_state(state, last_input))

    async def mark_delivery(self, exec_id: str) -> bool:
        """Note that a call for this attempt is about to be made; False if one was made before."""
        return bool(await self.redis.set(f"{self.prefix}:sent:{exec_id}", 1, nx=True))
