"""What the disinfection API accepts. A missing or malformed field answers 422 naming it;
what the protocols refuse is the domain's to say (also 422, naming the field)."""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

from libs.web.fields import Instant, Real, Text

IDENT = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True, populate_by_name=True)


class StageName(StrEnum):
    initial = "initial"
    terminal = "terminal"


class Video(Strict):
    """The video-surveillance evidence: which camera, a reference that retrieves the clip
    from the recorder, and the time window it covers."""

    camera_id: Text = Field(min_length=1, max_length=100)
    clip_ref: Text = Field(min_length=1, max_length=500)
    from_: Instant = Field(alias="from")
    to: Instant


class AirTreatmentIn(Strict):
    """Spraying the closed cabin's air in the same stage (e.g. hydrogen peroxide 3%, i.e.
    30000 mg/L, at 20 mL/m³, closed for 60 minutes)."""

    disinfectant: Text = Field(min_length=1, max_length=50)
    concentration_mg_per_l: Real = Field(gt=0, le=1_000_000)
    dose_ml_per_m3: Real = Field(gt=0, le=1000)
    method: Text = Field(default="aerosol_spray", min_length=1, max_length=50)
    started_at: Instant
    ended_at: Instant


class StageIn(Strict):
    """A stage's surface treatment (the fields of API-EXAMPLES.md), optionally the air."""

    stage: StageName
    disinfectant: Text = Field(min_length=1, max_length=50)
    concentration_mg_per_l: Real = Field(gt=0, le=1_000_000)
    method: Text = Field(min_length=1, max_length=50)
    started_at: Instant
    ended_at: Instant
    operator: Text = Field(min_length=1, max_length=100)
    location: Text = Field(min_length=1, max_length=200)
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
    sample_id: Text = Field(pattern=IDENT)
    sites: list[SwabSite] = Field(min_length=1, max_length=20)
    collected_by: Text = Field(min_length=1, max_length=100)
    collected_at: Instant


class SwabResult(StrEnum):
    negative = "negative"
    positive = "positive"
    invalid = "invalid"


class ResultIn(Strict):
    result: SwabResult
    lab: Text = Field(min_length=1, max_length=200)
    reported_at: Instant


class EarlyReleaseIn(Strict):
    """A supervisor's release before the cycle would release (R2 override)."""

    reason: Text = Field(min_length=4, max_length=500)


class AcknowledgeIn(Strict):
    note: Text | None = Field(default=None, max_length=500)
