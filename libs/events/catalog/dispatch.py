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


@registry.register
class VehicleReturnedToService(Event):
    """Disinfection released it. `quarantine_lifted`: a re-disinfection ended its
    quarantine (R9), which covers every trip it had completed."""

    vehicle_id: str
    trip_id: str
    cycle_id: str
    quarantine_lifted: bool = False


@registry.register
class VehicleTakenOutOfService(Event):
    vehicle_id: str
    reason: str
    rule: str | None = None


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


@registry.register
class TransferPrioritized(Event):
    transfer_id: str
    priority: int
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
