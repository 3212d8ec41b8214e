"""A task to 10,000 devices, in a namespace, database and service of its own, so the other
tests' log and read models stay small."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from eventdispatch.client import EventDispatch
from eventdispatch.config import Settings
from tests.integration.conftest import (
    environment,
    read_record,
    running_service,
    running_simulator,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def scale(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Settings, Path]]:
    logs = tmp_path_factory.mktemp("scale")
    record = logs / "record.jsonl"
    with (
        environment() as settings,
        running_simulator(settings, record, logs),
        running_service(settings, logs),
    ):
        yield settings, record


async def test_a_task_to_10000_devices_completes(scale: tuple[Settings, Path]) -> None:
    settings, record = scale
    devices = [f"bulk-{uuid.uuid4().hex[:6]}-{i:05d}" for i in range(10_000)]
    async with EventDispatch(settings) as ed:
        await ed.register_script("bulk", "echo bulk\n")
        task_id = f"bulk-{uuid.uuid4().hex[:6]}"
        await ed.wait_accepted(await ed.submit(task_id, "bulk", devices))
        summary = await ed.wait_done(task_id, timeout_s=900)
    assert summary.counts == {"succeeded": 10_000}
    accepted = [r for r in read_record(record) if r["event"] == "accepted"]
    assert len(accepted) == len({r["exec_id"] for r in accepted}) == 10_000  # I3
