"""Settings, read once from EVENTDISPATCH_* environment variables and an optional `.env`.

Every process (service, simulator, CLI, tests) reads the same settings, so one environment
variable moves every part of the system at once.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Where the services are, and the knobs of the pipeline."""

    model_config = SettingsConfigDict(
        env_prefix="EVENTDISPATCH_", env_file=".env", extra="ignore", frozen=True
    )

    # Pulsar
    pulsar_url: str = "pulsar://127.0.0.1:6650"
    pulsar_admin_url: str = "http://127.0.0.1:8080"
    tenant: str = "eventdispatch"
    namespace: str = "default"

    # MongoDB-compatible store (projections)
    mongo_url: str = "mongodb://127.0.0.1:27017"
    mongo_db: str = "eventdispatch"

    # Redis (device processor working state)
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = "ed"

    # Central Control API (the simulator by default)
    central_url: str = "http://127.0.0.1:8700"
    central_http_timeout_s: float = 10.0
    delivery_backoff_base_s: float = 0.2
    delivery_backoff_cap_s: float = 10.0
    retry_base_s: float = 5.0
    retry_cap_s: float = 300.0

    # Task defaults
    default_timeout_s: int = 600
    default_max_attempts: int = 3

    # Projector
    projector_batch_size: int = 1000
    # How long a batch waits for more events before it is written: fewer, larger writes for
    # this much more lag (docs/benchmarks.md). 0 writes whatever has arrived at once.
    projector_linger_ms: int = Field(default=250, ge=0, le=10_000)
    drain_grace_s: float = 20.0

    # Supervisor (`run`): where it serves /status, /healthz and /readyz, on loopback
    health_port: int = 8790

    # Local stack
    stack_dir: Path = Path(".stack")
    cache_dir: Path = Field(default_factory=lambda: Path.home() / ".cache" / "eventdispatch")
    pulsar_version: str = "4.0.7"
    ferretdb_version: str = "v1.24.2"
    pulsar_port: int = 6650
    pulsar_http_port: int = 8080
    pulsar_bookie_port: int = 3181
    mongo_port: int = 27017
    redis_port: int = 6379
    pulsar_heap: str = "1g"

    log_level: str = "INFO"

    @property
    def topic_prefix(self) -> str:
        return f"persistent://{self.tenant}/{self.namespace}"

    def topic(self, name: str) -> str:
        """Full topic name for a short name such as `events` or `device-inbox`."""
        return f"{self.topic_prefix}/{name}"


def load() -> Settings:
    return Settings()
