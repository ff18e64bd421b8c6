"""What the dispatch API accepts. Field checks answer 422 naming the field."""

from __future__ import annotations

import re
from datetime import datetime
from enum import StrEnum
from typing import Annotated
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, field_validator

from libs.events.catalog.common import Location
from libs.web.fields import Day, Flag, Instant, Real, Text, Whole

IDENT = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$"
Ident = Annotated[Text, Field(pattern=IDENT)]  # optional ids keep their pattern in the document
_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK = "10X98765432"
_MOBILE = re.compile(r"^1[3-9]\d{9}$")
_LANDLINE = re.compile(r"^0\d{2,3}-?\d{7,8}$")


def resident_id_ok(number: str) -> bool:
    """GB 11643-1999: 17 digits, then a check character from the weighted sum mod 11."""
    if not re.fullmatch(r"\d{17}[\dX]", number):
        return False
    try:
        datetime.strptime(number[6:14], "%Y%m%d")
    except ValueError:
        return False
    total = sum(int(d) * w for d, w in zip(number[:17], _ID_WEIGHTS, strict=True))
    return _ID_CHECK[total % 11] == number[17]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


class FacilityRole(StrEnum):
    fever_clinic = "fever_clinic"
    designated = "designated"
    sub_designated = "sub_designated"
    backup = "backup"
    fangcang = "fangcang"
    temporary_emergency = "temporary_emergency"
    specialty_cardio_cerebro = "specialty_cardio_cerebro"
    maternity = "maternity"
    county_hospital = "county_hospital"
    isolation_site = "isolation_site"


class FacilityIn(Strict):
    id: Text = Field(pattern=IDENT)
    name: Text = Field(min_length=1, max_length=200)
    roles: list[FacilityRole] = Field(min_length=1)
    location: Location
    fever_clinic_capacity: Whole | None = Field(default=None, ge=0, le=100_000)
    backup_ids: list[Text] = []
    overflow_threshold: Real | None = Field(default=None, gt=0, le=1)  # the region's default


class LoadIn(Strict):
    fever_clinic_occupied: Whole = Field(ge=0, le=100_000)
    reported_at: Instant


class VehicleKind(StrEnum):
    negative_pressure_ambulance = "negative_pressure_ambulance"
    ambulance = "ambulance"
    dedicated_vehicle = "dedicated_vehicle"


class VehicleIn(Strict):
    id: Text = Field(pattern=IDENT)
    plate: Text = Field(min_length=1, max_length=20)
    kind: VehicleKind
    dedicated_pool: Flag
    life_support: Flag = False
    station: Text = Field(min_length=1, max_length=200)
    location: Location


class Patient(Strict):
    name: Text = Field(min_length=1, max_length=100)
    id_number: Text | None = None
    phone: Text | None = None

    @field_validator("id_number")
    @classmethod
    def _id_number(cls, v: str | None) -> str | None:
        if v is not None and not resident_id_ok(v.upper()):
            raise ValueError("not a valid 18-digit resident id number (GB 11643 check digit)")
        return v.upper() if v else v

    @field_validator("phone")
    @classmethod
    def _phone(cls, v: str | None) -> str | None:
        if v is not None and not (_MOBILE.match(v) or _LANDLINE.match(v)):
            raise ValueError("not a mainland mobile (11 digits) or landline number")
        return v


class RiskCategory(StrEnum):
    isolation_site = "isolation_site"
    sealed_area = "sealed_area"
    controlled_area = "controlled_area"
    precaution_area = "precaution_area"
    home_monitoring = "home_monitoring"
    confirmed = "confirmed"
    suspected = "suspected"
    fever_clinic = "fever_clinic"
    fangcang = "fangcang"


class CriticalKind(StrEnum):
    stroke = "stroke"
    chest_pain = "chest_pain"
    severe_trauma = "severe_trauma"
    shock = "shock"
    high_fever = "high_fever"
    childbirth = "childbirth"


class Condition(Strict):
    fever: Flag = False
    critical: Flag = False
    covid_symptoms: Flag = False
    kind: CriticalKind | None = None
    severity: Text | None = Field(default=None, max_length=50)


class Place(Strict):
    kind: Text = Field(min_length=1, max_length=50)
    name: Text = Field(min_length=1, max_length=200)
    location: Location
    facility_id: Text | None = None


class Purpose(StrEnum):
    outpatient_visit = "outpatient_visit"
    admission = "admission"
    transfer_to_designated = "transfer_to_designated"
    scheduled_care = "scheduled_care"
    emergency = "emergency"
    return_leg = "return_leg"


class Channel(StrEnum):
    console = "console"
    isolation_site = "isolation_site"
    community = "community"
    hospital_his = "hospital_his"
    direct_call = "direct_call"


class RequestedBy(Strict):
    channel: Channel
    org: Text | None = Field(default=None, max_length=200)
    name: Text | None = Field(default=None, max_length=100)


class TransferIn(Strict):
    patient: Patient
    risk_category: RiskCategory
    condition: Condition = Condition()
    origin: Place
    purpose: Purpose
    # R11: an outpatient visit returns to its origin (true when not given, never false).
    return_required: Flag | None = None
    requested_by: RequestedBy
    destination_wish: Ident | None = None


Reason = Annotated[Text, Field(min_length=1, max_length=500)]


class AssignIn(Strict):
    vehicle_id: Text = Field(pattern=IDENT)
    override_reason: Reason | None = None


class ReprioritizeIn(Strict):
    priority: Whole = Field(ge=1, le=4)
    reason: Reason


class RedirectIn(Strict):
    reason: Reason
    facility_id: Ident | None = None
    condition: Condition | None = None


class CancelIn(Strict):
    reason: Reason


class DutyIn(Strict):
    on_duty: Flag
    reason: Text = Field(default="", max_length=500)


class OutOfServiceIn(Strict):
    reason: Reason


class PositionIn(Strict):
    location: Location
    at: Instant


class CareSeriesIn(Strict):
    transfer: TransferIn
    weekdays: list[Annotated[Whole, Field(ge=1, le=7)]] = Field(min_length=1, max_length=7)  # ISO
    time: Text = Field(pattern=r"^([01]\d|2[0-3]):[0-5]\d$")
    timezone: Text = "Asia/Shanghai"
    starts_on: Day
    until: Day | None = None
    lead_minutes: Whole = Field(default=60, ge=0, le=1440)

    @field_validator("weekdays")
    @classmethod
    def _weekdays(cls, v: list[int]) -> list[int]:
        return sorted(set(v))

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {v}") from exc
        return v
