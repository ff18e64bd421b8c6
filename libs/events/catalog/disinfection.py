"""Events of the disinfection service (streams cycle-*, sample-*, history-*, exposure-*).

Dispatch reads VehicleReleased (the vehicle is assignable again, R2) and VehicleQuarantined
(out of service at once, R9); everything else is the evidence the audit reads."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from libs.events.contracts import Event, registry


@registry.register
class CycleOpened(Event):
    """A disinfection cycle for the vehicle: after a risk trip (kind "trip"), or after a
    positive swab (kind "redisinfection", for the trip whose swab was positive)."""

    cycle_id: str
    vehicle_id: str
    trip_id: str
    transfer_id: str
    reason: str
    kind: str = "trip"
    # When the trip ended (the crew's clock) or the positive result was reported.
    opened_at: str | None = None
    after_sample_id: str | None = None
    # When the crew handed the patient over, for a trip that ended so (R8: the first stage
    # follows it). None for a trip dispatch ended (its time is when the transfer service
    # heard of it, late if a consumer lagged) and for a re-disinfection.
    trip_ended_at: str | None = None


@registry.register
class InitialDisinfectionLogged(Event):
    """首次消毒 (R8). `stage` holds: stage, disinfectant, concentration_mg_per_l, method,
    started_at, ended_at, contact_minutes, earliest_end_at, operator, location, the
    protocol applied, an optional `air` treatment, and video {camera_id, clip_ref, from, to}:
    the footage that shows it."""

    cycle_id: str
    vehicle_id: str
    stage: dict[str, Any]


@registry.register
class TerminalDisinfectionLogged(Event):
    """终末消毒 (R8); `stage` as in InitialDisinfectionLogged."""

    cycle_id: str
    vehicle_id: str
    stage: dict[str, Any]


@registry.register
class SampleRegistered(Event):
    """Claims a swab sample id for one cycle (sample ids are unique)."""

    sample_id: str
    cycle_id: str


@registry.register
class SurfaceSwabCollected(Event):
    """物体表面核酸采样 (R9); the lab's result is due by `due_at` (R14)."""

    cycle_id: str
    vehicle_id: str
    sample_id: str
    sites: list[str]
    collected_by: str
    collected_at: str
    due_at: str | None = None


@registry.register
class SwabResultRecorded(Event):
    """The lab's result: negative, positive, or invalid (a new sample is needed)."""

    cycle_id: str
    vehicle_id: str
    sample_id: str
    result: str
    lab: str
    reported_at: str
    turnaround_minutes: float | None = None
    overdue: bool = False


@registry.register
class SwabResultOverdue(Event):
    """R14: no result by the lab SLA. Flagged once per sample, by the service's clock."""

    cycle_id: str
    vehicle_id: str
    sample_id: str
    collected_at: str
    due_at: str
    flagged_at: str
    sla_hours: float
    rule: str = "R14"


@registry.register
class VehicleReleased(Event):
    """The cycle lets the vehicle carry patients again (R2). `policy` says why: the
    configured release policy, or "supervisor_override" (then `override` is true, with the
    reason, the rules overridden and what was still missing). `quarantine_lifted` is set
    when a re-disinfection cycle ends a quarantine (R9)."""

    cycle_id: str
    vehicle_id: str
    trip_id: str
    policy: str
    override: bool = False
    override_reason: str | None = None
    overridden_rules: list[str] = []
    missing: list[str] = []
    quarantine_lifted: bool = False


@registry.register
class VehicleQuarantined(Event):
    """R9: a positive surface swab takes the vehicle out of service at once, whatever its
    state; `redisinfection_cycle_id` is the cycle that will release it."""

    cycle_id: str
    vehicle_id: str
    sample_id: str
    reason: str
    rule: str = "R9"
    redisinfection_cycle_id: str | None = None


@registry.register
class CycleSuperseded(Event):
    """A re-disinfection cycle gives way to a newer one: another positive swab arrived
    before it released the vehicle, so the newer cycle answers for both."""

    cycle_id: str
    vehicle_id: str
    by_cycle_id: str
    sample_id: str


@registry.register
class VehicleCycleLogged(Event):
    """The vehicle's own history (stream history-<vehicle>): its cycles in the order they
    opened, so that an exposure list can be cut from the last negative swab."""

    vehicle_id: str
    cycle_id: str
    kind: str
    trip_id: str
    transfer_id: str


class ExposedPatient(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    id_number: str | None = None
    phone: str | None = None


class ExposedTransfer(BaseModel):
    """One transfer on an exposure list. `relation`: "before_swab" (carried since the last
    negative swab, before the swabbed trip), "swabbed_trip" (the trip whose disinfection the
    positive swab tested), "after_swab" (carried after it, in a vehicle later found
    positive), "during_quarantine" (a trip that was under way when the quarantine began)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    transfer_id: str
    trip_id: str
    cycle_id: str
    relation: str
    completed_at: str | None = None
    patient: ExposedPatient | None = None


@registry.register
class ExposureListProduced(Event):
    """R9: every transfer the vehicle carried since its last negative swab (up to the first
    negative swab after the positive one, when there is one), with the patients. The
    dispatcher's alert: it stays unacknowledged until a dispatcher acknowledges it."""

    vehicle_id: str
    sample_id: str
    cycle_id: str
    transfer_id: str
    last_negative_sample_id: str | None
    bounded_by_sample_id: str | None
    transfers: list[ExposedTransfer]
    rule: str = "R9"


@registry.register
class ExposureListAmended(Event):
    """A trip under way when the quarantine began ended afterwards: its patient was exposed
    too, and the list is unacknowledged again."""

    vehicle_id: str
    sample_id: str
    transfer: ExposedTransfer


@registry.register
class ExposureListAcknowledged(Event):
    """A dispatcher took the alert."""

    vehicle_id: str
    sample_id: str
    acknowledged_by: str
    note: str | None = None
