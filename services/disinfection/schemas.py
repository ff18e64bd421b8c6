"""What the disinfection API accepts. A missing or malformed field answers 422 naming it;
what the protocols refuse is the domain's to say (also 422, naming the field)."""

from __future__ import annotations

from enum import StrEnum

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

IDENT = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True, populate_by_name=True)


class StageName(StrEnum):
    initial = "initial"
    terminal = "terminal"


class Video(Strict):
    """The video-surveillance evidence: which camera, a reference that retrieves the clip
    from the recorder, and the time window it covers."""

    camera_id: str = Field(min_length=1, max_length=100)
    clip_ref: str = Field(min_length=1, max_length=500)
    from_: AwareDatetime = Field(alias="from")
    to: AwareDatetime


class AirTreatmentIn(Strict):
    """Spraying the closed cabin's air in the same stage (e.g. hydrogen peroxide 3%, i.e.
    30000 mg/L, at 20 mL/m³, closed for 60 minutes)."""

    disinfectant: str = Field(min_length=1, max_length=50)
    concentration_mg_per_l: float = Field(gt=0, le=1_000_000)
    dose_ml_per_m3: float = Field(gt=0, le=1000)
    method: str = Field(default="aerosol_spray", min_length=1, max_length=50)
    started_at: AwareDatetime
    ended_at: AwareDatetime


class StageIn(Strict):
    """A stage's surface treatment (the fields of API-EXAMPLES.md), optionally the air."""

    stage: StageName
    disinfectant: str = Field(min_length=1, max_length=50)
    concentration_mg_per_l: float = Field(gt=0, le=1_000_000)
    method: str = Field(min_length=1, max_length=50)
    started_at: AwareDatetime
    ended_at: AwareDatetime
    operator: str = Field(min_length=1, max_length=100)
    location: str = Field(min_length=1, max_length=200)
    video: Video
    air: AirTreatmentIn | None = None


class SwabSite(StrEnum):
    """The high-touch surfaces a vehicle's swab is taken from."""

    stretcher = "stretcher"
    handrail = "handrail"
    door_handle = "door_handle"
    seat = "seat"
    steering_wheel = "steering_wheel"
    equipment = "equipment"


class SwabIn(Strict):
    sample_id: str = Field(pattern=IDENT)
    sites: list[SwabSite] = Field(min_length=1, max_length=20)
    collected_by: str = Field(min_length=1, max_length=100)
    collected_at: AwareDatetime


class SwabResult(StrEnum):
    negative = "negative"
    positive = "positive"
    invalid = "invalid"


class ResultIn(Strict):
    result: SwabResult
    lab: str = Field(min_length=1, max_length=200)
    reported_at: AwareDatetime


class EarlyReleaseIn(Strict):
    """A supervisor's release before the cycle would release (R2 override)."""

    reason: str = Field(min_length=4, max_length=500)


class AcknowledgeIn(Strict):
    note: str | None = Field(default=None, max_length=500)
