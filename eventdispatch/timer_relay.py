"""The timer relay: forwards each due timer from `timers` into `device-inbox`.

Timers live on a topic of their own because delayed messages inside a Key_Shared subscription
stall the dispatch of other keys (Pulsar issues 8703 and 15397); device-inbox never holds a
delayed message. The broker delivers a timer at its due time (strict deliver-at); the relay
still checks, and never forwards a timer early.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time

import pulsar
from pulsar import ConsumerType

from eventdispatch import wire
from eventdispatch.bus import Bus, Outgoing, acknowledge, publish
from eventdispatch.inputs import TimerFired
from eventdispatch.retry import retry_in_place

log = logging.getLogger("eventdispatch.timers")


class TimerRelay:
    def __init__(self, bus: Bus) -> None:
        self.bus = bus

    async def run(self, stop: asyncio.Event) -> None:
        receiver = await self.bus.receiver("timers", "timer-relay", ConsumerType.Shared)
        inbox = await self.bus.producer("device-inbox")
        try:
            while (batch := await receiver.next(stop)) is not None:
                out = [o for o in [await self._due(msg) for msg in batch] if o is not None]
                await retry_in_place("forward timers", functools.partial(publish, inbox, out))
                for msg in batch:
                    await acknowledge(receiver.consumer, msg)
        finally:
            await receiver.close()
            await inbox.flush()

    async def _due(self, msg: pulsar.Message) -> Outgoing | None:
        """The TimerFired input for a timer, once it is due; None if it cannot be decoded."""
        try:
            t = msg.value()
            fired = TimerFired(t["kind"], t["task_id"], t["attempt"], t["due_at_ms"])
            device, timer_id = str(t["device_id"]), str(t["timer_id"])
        except Exception as e:
            await self.bus.dead_letter("timers", msg, f"undecodable: {e}")
            return None
        early_s = (fired.due_at_ms - time.time() * 1000) / 1000
        if early_s > 0:
            await asyncio.sleep(early_s)
        record = wire.input_to_record(timer_id, device, int(time.time() * 1000), fired)
        return Outgoing(record, device)
