"""Dispatch's configuration (CLOSEDLOOP_DISPATCH_*) and the region file it names."""

from __future__ import annotations

import tomllib
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_REGION = Path(__file__).parent / "regions" / "yinchuan-yongning.toml"


class DispatchSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CLOSEDLOOP_DISPATCH_")

    region_file: Path = DEFAULT_REGION
    # 报备 (R10): where TransferReported is delivered, signed with the secret.
    report_webhook_url: str | None = None
    report_webhook_secret: str = "change-me"
    report_max_attempts: int = 8
    report_retry_base_s: float = 0.5
    # Recurring care: how often due occurrences are looked for, and how long before the
    # appointment the transfer is requested.
    schedule_interval_s: float = 30.0


class Eta(BaseModel):
    road_factor: float = Field(default=1.3, gt=0)
    speed_kmh: float = Field(default=40.0, gt=0)


class Region(BaseModel):
    name: str
    eta: Eta = Eta()
    overflow_threshold: float = Field(default=0.8, gt=0, le=1)
    roles: dict[str, list[str]]
    facilities: list[dict[str, Any]] = []
    vehicles: list[dict[str, Any]] = []


def parse_region(raw: dict[str, Any]) -> Region:
    return Region(
        name=raw["name"], eta=Eta(**raw.get("eta", {})),
        overflow_threshold=raw.get("overflow", {}).get("threshold", 0.8),
        roles=raw["roles"], facilities=raw.get("facilities", []), vehicles=raw.get("vehicles", []),
    )


@lru_cache
def settings() -> DispatchSettings:
    return DispatchSettings()


@lru_cache
def region() -> Region:
    with settings().region_file.open("rb") as f:
        return parse_region(tomllib.load(f))
