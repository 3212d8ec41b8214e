"""Structured log lines (logfmt): one line per record, `key=value`, easy to grep and to parse."""

from __future__ import annotations

import logging
import os
import sys
import time


class LogfmtFormatter(logging.Formatter):
    """`proc=` names the supervised process (worker-1, projector) whose line it is."""

    def __init__(self) -> None:
        super().__init__()
        name = os.environ.get("EVENTDISPATCH_PROCESS_NAME")
        self.proc = f" proc={name}" if name else ""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        msg = record.getMessage().replace('"', "'")
        line = (
            f"ts={ts}.{int(record.msecs):03d}Z level={record.levelname.lower()}{self.proc} "
            f'logger={record.name} msg="{msg}"'
        )
        if record.exc_info:
            exc = self.formatException(record.exc_info).replace("\n", " | ").replace('"', "'")
            line += f' exc="{exc}"'
        return line


def setup(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogfmtFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("httpx", "httpcore", "pymongo", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
