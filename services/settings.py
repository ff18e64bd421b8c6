"""Configuration from the environment (CLOSEDLOOP_*), for both ways to run."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CLOSEDLOOP_")

    mode: Literal["embedded", "distributed"] = "embedded"
    data_dir: Path = Path(".run/data")
    # {service} is replaced by the service's name: a database per service.
    pg_url: str = "postgresql+asyncpg://closedloop@127.0.0.1:55432/{service}"
    kafka_bootstrap: str = "127.0.0.1:59092"
    topic_prefix: str = "closedloop"
    kafka_partitions: int = 3
    kafka_replication: int = 1
    relay_lease_ms: int = 5000

    def store_url(self, service: str) -> str:
        if self.mode == "embedded":
            self.data_dir.mkdir(parents=True, exist_ok=True)
            return f"sqlite+aiosqlite:///{self.data_dir / service}.db"
        return self.pg_url.format(service=service)
