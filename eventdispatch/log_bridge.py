"""The log bridge: hands result lines from `device-logs` to the device that ran them.

Only SUCCESS, ERROR and SYSTEM_ERROR change an execution, so only they are forwarded into
device-inbox; every line, INFO and WARN included, reaches the logs projection, which reads
device-logs itself. Key_Shared keeps one device's lines in order.
"""

from __future__ import annotations

import asyncio
import logging

import pulsar
from pulsar import ConsumerType

from eventdispatch import wire
from eventdispatch.bus import Bus, Outgoing, publish, receive_until
from eventdispatch.decider import RESULT_LEVELS
from eventdispatch.inputs import ResultReported
from eventdispatch.retry import retry_in_place

log = logging.getLogger("eventdispatch.logs")


class LogBridge:
    def __init__(self, bus: Bus) -> None:
        self.bus = bus

    async def run(self, stop: asyncio.Event) -> None:
        consumer = await self.bus.consumer("device-logs", "log-bridge", ConsumerType.KeyShared)
        inbox = await self.bus.producer("device-inbox")
        try:
            while (msg := await receive_until(consumer, stop)) is not None:
                await self._forward(msg, inbox)
                await consumer.acknowledge(msg)
        finally:
            await consumer.close()
            await inbox.flush()

    async def _forward(self, msg: pulsar.Message, inbox: pulsar.asyncio.Producer) -> None:
        try:
            line = msg.value()
            level, device = str(line["level"]), str(line["device_id"])
            result = ResultReported(str(line["exec_id"]), level, str(line["message"]))
            input_id = f"log:{line['log_id']}"
            at = int(line["ts_ms"])
        except Exception as e:
            await self.bus.dead_letter("device-logs", msg, f"undecodable: {e}")
            return
        if level not in RESULT_LEVELS:
            return
        record = wire.input_to_record(input_id, device, at, result)
        await retry_in_place("forward result", lambda: publish(inbox, [Outgoing(record, device)]))
