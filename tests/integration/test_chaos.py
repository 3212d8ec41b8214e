"""The short chaos run (the long one is `make chaos`): see tests/chaos.py for what it does and
checks. It runs on a private stack, so its broker and Redis restarts touch no other test."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import chaos

pytestmark = pytest.mark.integration


def test_invariants_hold_while_workers_redis_mongodb_and_the_broker_crash(tmp_path: Path) -> None:
    report = chaos.run(executions=1000, devices=100, kill_every_s=6, timeout_s=900, folder=tmp_path)
    print("\n".join(report.lines()))
    assert report.violations == []
    assert report.outcomes.get("succeeded", 0) + report.outcomes.get("failed", 0) == 1000
    assert report.kills >= 3 and report.restarts >= report.kills
    assert (report.redis_restarts, report.broker_restarts, report.mongo_restarts) == (1, 1, 1)
    assert report.drained_exit == 0
