"""Events of the dispatch service: facilities, vehicles, transfers (streams facility-*,
vehicle-*, transfer-*)."""

from __future__ import annotations

from typing import Any

from libs.events.catalog.common import Location
from libs.events.contracts import Event, registry


@registry.register
class FacilityRegistered(Event):
    facility_id: str
    name: str
    roles: list[str]
    location: Location
    fever_clinic_capacity: int | None = None
    backup_ids: list[str] = []
    overflow_threshold: float = 0.8


@registry.register
class FacilityLoadReported(Event):
    facility_id: str
    fever_clinic_occupied: int
    reported_at: str
    load_ratio: float | None
    overflowing: bool


@registry.register
class VehicleRegistered(Event):
    vehicle_id: str
    plate: str
    kind: str
    dedicated_pool: bool
    life_support: bool
    station: str
    location: Location


@registry.register
class VehicleReserved(Event):
    """The vehicle took a transfer (R1: at most one at a time)."""

    vehicle_id: str
    transfer_id: str


@registry.register
class VehicleAwaitingDisinfection(Event):
    """Its risk trip ended: not assignable until disinfection releases it (R2)."""

    vehicle_id: str
    trip_id: str
    transfer_id: str | None = None  # the trip's (absent before 2026-11-24)


@registry.register
class VehicleReleaseReceivedEarly(Event):
    """Disinfection's release of a trip reached dispatch before that trip's end did (they
    come from two services); kept so the trip's end finds it."""

    vehicle_id: str
    trip_id: str
    cycle_id: str


@registry.register
class VehicleReturnedToService(Event):
    """Disinfection released it. `quarantine_lifted`: a re-disinfection ended its
    quarantine (R9), which covers every trip it had completed."""

    vehicle_id: str
    trip_id: str
    cycle_id: str
    quarantine_lifted: bool = False


@registry.register
class VehicleHoldLifted(Event):
    """The trip of a transfer it was taken off ended without the patient aboard: nothing of
    that trip is owed, and the vehicle need not wait for it any longer (R2)."""

    vehicle_id: str
    transfer_id: str
    reason: str


@registry.register
class VehicleTakenOutOfService(Event):
    vehicle_id: str
    reason: str
    rule: str | None = None
    # The transfer it was taken off: whether that trip had its patient aboard is the transfer
    # service's to say (its trip completes or aborts), and until it has, the vehicle is held.
    withdrawn_from: str | None = None


@registry.register
class VehicleDutyChanged(Event):
    vehicle_id: str
    on_duty: bool
    reason: str = ""


@registry.register
class VehiclePositionReported(Event):
    vehicle_id: str
    location: Location
    at: str


@registry.register
class VehicleStoodDown(Event):
    """Freed from a transfer it never carried (cancelled, or reassigned elsewhere)."""

    vehicle_id: str
    transfer_id: str
    reason: str


@registry.register
class BackupsActivated(Event):
    """R7: the facility's load passed its threshold; its backups take new patients."""

    facility_id: str
    backup_ids: list[str]
    load_ratio: float
    threshold: float


@registry.register
class BackupsStoodDown(Event):
    facility_id: str
    backup_ids: list[str]
    load_ratio: float
    threshold: float


@registry.register
class TransferRequested(Event):
    transfer_id: str
    patient: dict[str, Any]
    risk_category: str
    condition: dict[str, Any]
    origin: dict[str, Any]
    purpose: str
    return_required: bool
    requested_by: dict[str, Any]
    destination_wish: str | None = None
    series_id: str | None = None
    return_of: str | None = None


@registry.register
class TransferPrioritized(Event):
    transfer_id: str
    priority: int
    reason: str


@registry.register
class TransferReprioritized(Event):
    transfer_id: str
    priority: int
    previous: int
    reason: str


@registry.register
class DestinationAssigned(Event):
    transfer_id: str
    facility_id: str
    reason: str
    candidates: list[dict[str, Any]] = []


@registry.register
class TransferQueued(Event):
    transfer_id: str
    reason: str


@registry.register
class VehicleAssigned(Event):
    """The transfer has its vehicle; the transfer service opens the trip from this."""

    transfer_id: str
    vehicle_id: str
    destination_id: str | None
    origin: dict[str, Any]
    return_required: bool
    manual: bool = False
    override_reason: str | None = None
    reason: str
    candidates: list[dict[str, Any]] = []
    return_of: str | None = None  # the outbound transfer this return leg brings back (R11)
    takeover_of: str | None = None  # the broken-down vehicle whose patient this one takes over
    risk_category: str = ""  # for the receiving hospital's pre-arrival notice
    condition: dict[str, Any] = {}


@registry.register
class RuleOverridden(Event):
    """A dispatcher or supervisor chose to break a soft rule, with a reason (an audit finding)."""

    rule: str
    transfer_id: str
    vehicle_id: str | None
    reason: str
    detail: str


@registry.register
class VehicleWithdrawn(Event):
    """The assigned vehicle cannot go on (a breakdown): the transfer needs another. After
    pickup (patient_aboard) the next vehicle takes the patient over from this one."""

    transfer_id: str
    vehicle_id: str
    reason: str
    patient_aboard: bool = False


@registry.register
class TransferPickedUp(Event):
    transfer_id: str
    trip_id: str
    vehicle_id: str


@registry.register
class TransferRedirected(Event):
    transfer_id: str
    from_facility_id: str | None
    to_facility_id: str
    reason: str
    candidates: list[dict[str, Any]] = []
    condition: dict[str, Any] | None = None


@registry.register
class TransferCancelled(Event):
    transfer_id: str
    reason: str


@registry.register
class DestinationUnresolved(Event):
    """No open facility fits this patient now: the vehicle still goes for the patient, and
    the dispatcher names a destination (redirect) before arrival."""

    transfer_id: str
    reason: str
    candidates: list[dict[str, Any]] = []


@registry.register
class ReportDelivered(Event):
    """报备 reached the county health bureau's system (R10)."""

    transfer_id: str
    url: str
    attempts: int
    status_code: int


@registry.register
class ReportDeliveryFailed(Event):
    transfer_id: str
    url: str
    attempts: int
    error: str


@registry.register
class CareSeriesScheduled(Event):
    """Recurring care that must not lapse (dialysis, chemotherapy, pregnancy checks)."""

    series_id: str
    template: dict[str, Any]
    weekdays: list[int]
    time: str
    timezone: str
    starts_on: str
    until: str | None
    lead_minutes: int


@registry.register
class CareOccurrenceRequested(Event):
    series_id: str
    appointment_at: str
    transfer_id: str


@registry.register
class CareSeriesCancelled(Event):
    series_id: str
    reason: str


@registry.register
class TransferReported(Event):
    """报备 to the county health bureau (R10)."""

    transfer_id: str
    reported_to: str
    reported_by: str


@registry.register
class TransferHandedOver(Event):
    transfer_id: str
    trip_id: str
    facility_id: str
