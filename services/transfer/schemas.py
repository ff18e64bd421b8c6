"""What the transfer API accepts."""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

from libs.events.catalog.common import Location
from libs.web.fields import Instant, Text


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


class Step(StrEnum):
    acknowledged = "acknowledged"
    en_route = "en_route"
    at_pickup = "at_pickup"
    patient_aboard = "patient_aboard"
    at_destination = "at_destination"
    handed_over = "handed_over"


class StepIn(Strict):
    step: Step
    at: Instant
    client_event_id: Text = Field(min_length=1, max_length=100)
    position: Location | None = None
    received_by: Text | None = Field(default=None, max_length=100)


class HandoverIn(Strict):
    facility_id: Text = Field(min_length=1, max_length=64)
    received_by: Text = Field(min_length=1, max_length=100)
    at: Instant


class ReturnRequestIn(Strict):
    """The hospital (HIS) asks for the return leg (R11); `facility_id` is where the patient is."""

    facility_id: Text = Field(min_length=1, max_length=64)
    at: Instant


class AdmissionIn(Strict):
    """The hospital admits the patient instead of sending them back: the loop closes (R11)."""

    facility_id: Text = Field(min_length=1, max_length=64)
    at: Instant


class AbortCode(StrEnum):
    patient_absent = "patient_absent"
    patient_refused = "patient_refused"
    other = "other"


class DispatchAction(StrEnum):
    cancel = "cancel"
    requeue = "requeue"


class AbortIn(Strict):
    """The crew ends the trip before pickup. By default a refusal cancels the transfer and an
    absent patient puts it back in the queue; `dispatch_action` says otherwise."""

    code: AbortCode
    reason: Text = Field(min_length=1, max_length=500)
    at: Instant
    dispatch_action: DispatchAction | None = None


class NoticeAckIn(Strict):
    """The hospital acknowledges the pre-arrival notice (`notice_id` from the webhook body;
    without it, the trip's current notice)."""

    notice_id: Text | None = Field(default=None, max_length=64)
    acknowledged_by: Text = Field(min_length=1, max_length=100)
    at: Instant


class PositionIn(Strict):
    location: Location
    at: Instant
