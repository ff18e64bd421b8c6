"""What the disinfection API accepts."""

from __future__ import annotations

from enum import StrEnum

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True, populate_by_name=True)


class StageName(StrEnum):
    initial = "initial"
    terminal = "terminal"


class Video(Strict):
    camera_id: str = Field(min_length=1, max_length=100)
    clip_ref: str = Field(min_length=1, max_length=500)
    from_: AwareDatetime = Field(alias="from")
    to: AwareDatetime


class StageIn(Strict):
    stage: StageName
    disinfectant: str = Field(min_length=1, max_length=50)
    concentration_mg_per_l: float = Field(gt=0, le=100_000)
    method: str = Field(min_length=1, max_length=50)
    started_at: AwareDatetime
    ended_at: AwareDatetime
    operator: str = Field(min_length=1, max_length=100)
    location: str = Field(min_length=1, max_length=200)
    video: Video


class SwabSite(StrEnum):
    stretcher = "stretcher"
    handrail = "handrail"
    door_handle = "door_handle"
    seat = "seat"
    steering_wheel = "steering_wheel"
    equipment = "equipment"
    floor = "floor"
    wall = "wall"


class SwabIn(Strict):
    sample_id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")
    sites: list[SwabSite] = Field(min_length=1)
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
