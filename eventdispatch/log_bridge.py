"""The log bridge: hands result lines from `device-logs` to the device that ran them.

Only SUCCESS, ERROR and SYSTEM_ERROR change an execution, so only they are forwarded into
device-inbox; every line, INFO and WARN included, reaches the logs projection, which reads
device-logs itself. Key_Shared keeps one device's lines in order.
"""

from __future__ import annotations

import asyncio
import functools
import logging

import pulsar
from pulsar import ConsumerType

from eventdispatch import wire
from eventdispatch.bus import Bus, Outgoing, acknowledge, publish
from eventdispatch.decider import RESULT_LEVELS
from eventdispatch.inputs import ResultReported
from eventdispatch.retry import retry_in_place

log = logging.getLogger("eventdispatch.logs")


class LogBridge:
    def __init__(self, bus: Bus) -> None:
        self.bus = bus

    async def run(self, stop: asyncio.Event) -> None:
        receiver = await self.bus.receiver("device-logs", "log-bridge", ConsumerType.KeyShared)
        inbox = await self.bus.producer("device-inbox")
        try:
            while (batch := await receiver.next(stop)) is not None:
                out = [o for o in [await self._result(msg) for msg in batch] if o is not None]
                await retry_in_place("forward results", functools.partial(publish, inbox, out))
                for msg in batch:
                    await acknowledge(receiver.consumer, msg)
        finally:
            await receiver.close()
            await inbox.flush()

    async def _result(self, msg: pulsar.Message) -> Outgoing | None:
        """The ResultReported input for a result line; None for other lines."""
        try:
            line = msg.value()
            level, device = str(line["level"]), str(line["device_id"])
            result = ResultReported(str(line["exec_id"]), level, str(line["message"]))
            input_id = f"log:{line['log_id']}"
            at = int(line["ts_ms"])
        except Exception as e:
            await self.bus.dead_letter("device-logs", msg, f"undecodable: {e}")
            return None
        if level not in RESULT_LEVELS:
            return None
        return Outgoing(wire.input_to_record(input_id, device, at, result), device)
