"""docker-compose.yml stays in step with the CLI it runs (no Docker engine is needed)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml
from typer.main import get_command

from eventdispatch.cli import app

ROOT = Path(__file__).resolve().parents[2]


def test_compose_runs_commands_that_exist() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"pulsar", "mongo", "redis", "service", "projector", "simulator"} <= set(services)
    commands = set(get_command(app).commands)  # type: ignore[attr-defined]
    for name in ("service", "projector", "simulator"):
        assert services[name]["command"][0] in commands, name
    pulsar_env = services["pulsar"]["environment"]
    assert pulsar_env["PULSAR_PREFIX_isDelayedDeliveryDeliverAtTimeStrict"] == "true"


def test_compose_file_is_accepted_by_compose_when_installed() -> None:
    tool = shutil.which("docker-compose")
    if tool is None:
        import pytest

        pytest.skip("no docker-compose on this machine")
    r = subprocess.run(
        [tool, "-f", str(ROOT / "docker-compose.yml"), "config", "-q"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
