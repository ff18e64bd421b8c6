"""The transfer service's configuration (CLOSEDLOOP_TRANSFER_*)."""

from __future__ import annotations

from functools import lru_cache

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class TransferSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CLOSEDLOOP_TRANSFER_")

    # Pre-arrival notices: where they are POSTed (the hospitals' HIS gateway; the body names
    # the facility), signed with the secret; each sending is retried on errors.
    notice_webhook_url: str | None = None
    notice_webhook_secret: str = "change-me"
    notice_max_attempts: int = Field(default=5, ge=1)
    notice_retry_base_s: float = Field(default=0.5, gt=0)
    # Not acknowledged within notice_ack_timeout_s: resent, up to notice_max_resends times,
    # then escalated to the dispatcher. Checked every notice_check_interval_s.
    notice_ack_timeout_s: float = Field(default=300.0, gt=0)
    notice_max_resends: int = Field(default=1, ge=0)
    notice_check_interval_s: float = Field(default=15.0, gt=0)
    # The ETA: straight-line distance times the road factor, at this speed.
    eta_road_factor: float = Field(default=1.3, gt=0)
    eta_speed_kmh: float = Field(default=40.0, gt=0)
    # Positions: one is recorded (a track point) when the vehicle moved this far or this
    # long passed since the last one, so many reports a minute do not flood the store.
    track_min_distance_m: float = Field(default=200.0, ge=0)
    track_min_interval_s: float = Field(default=60.0, ge=0)
    track_max_points: int = Field(default=500, ge=1)


@lru_cache
def settings() -> TransferSettings:
    return TransferSettings()
