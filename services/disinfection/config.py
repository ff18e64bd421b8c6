"""The disinfection service's configuration (CLOSEDLOOP_DISINFECTION_*).

Protocols are per target and disinfectant. What is configured is laid over the national
defaults, a disinfectant at a time or one value at a time, e.g.
  CLOSEDLOOP_DISINFECTION_SURFACE_PROTOCOLS__CHLORINE__MIN_CONTACT_MINUTES=45
  CLOSEDLOOP_DISINFECTION_AIR_PROTOCOLS='{"ozone": {"min_concentration_mg_per_l": 20,
      "min_contact_minutes": 30, "min_dose_ml_per_m3": 1}}'
"""

from __future__ import annotations

from datetime import timedelta
from functools import lru_cache
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.disinfection.protocols import NATIONAL_AIR, NATIONAL_SURFACE, Protocol, Rules

ReleasePolicy = Literal["after_swab_collected", "after_negative_result"]


class ProtocolSetting(BaseModel):
    min_concentration_mg_per_l: float = Field(gt=0)
    min_contact_minutes: float = Field(gt=0)
    min_dose_ml_per_m3: float | None = Field(default=None, gt=0)


def _over(defaults: dict[str, Protocol], given: Any) -> Any:
    if not isinstance(given, dict):
        return given  # not a table: let validation name the error
    merged: dict[str, Any] = {name: p.as_dict() for name, p in defaults.items()}
    for name, values in given.items():
        merged[name] = {**merged.get(name, {}), **values} if isinstance(values, dict) else values
    return merged


class DisinfectionSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CLOSEDLOOP_DISINFECTION_", env_nested_delimiter="__")

    # Release after the terminal stage and a collected swab, or only after a negative result.
    release_policy: ReleasePolicy = "after_swab_collected"
    # The same choice for the re-disinfection that ends a quarantine (R9).
    quarantine_release_policy: ReleasePolicy = "after_negative_result"
    # Laid over the national defaults (NATIONAL_SURFACE, NATIONAL_AIR) by the validators below.
    surface_protocols: dict[str, ProtocolSetting] = Field(default_factory=dict, validate_default=True)
    air_protocols: dict[str, ProtocolSetting] = Field(default_factory=dict, validate_default=True)
    min_swab_sites: int = Field(default=3, ge=1, le=6)
    result_sla_hours: float = Field(default=6.0, gt=0)  # R14; the seeds give 4-6 h
    sla_check_interval_s: float = Field(default=60.0, gt=0)
    clock_skew_minutes: float = Field(default=5.0, ge=0)

    @field_validator("surface_protocols", mode="before")
    @classmethod
    def _surface_over_defaults(cls, given: Any) -> Any:
        return _over(NATIONAL_SURFACE, given)

    @field_validator("air_protocols", mode="before")
    @classmethod
    def _air_over_defaults(cls, given: Any) -> Any:
        return _over(NATIONAL_AIR, given)

    def rules(self) -> Rules:
        return Rules(
            surface={k: Protocol(**v.model_dump()) for k, v in self.surface_protocols.items()},
            air={k: Protocol(**v.model_dump()) for k, v in self.air_protocols.items()},
            release_policy=self.release_policy,
            quarantine_release_policy=self.quarantine_release_policy,
            min_swab_sites=self.min_swab_sites, result_sla=timedelta(hours=self.result_sla_hours),
            clock_skew=timedelta(minutes=self.clock_skew_minutes),
        )


@lru_cache
def settings() -> DisinfectionSettings:
    return DisinfectionSettings()


@lru_cache
def rules() -> Rules:
    return settings().rules()
