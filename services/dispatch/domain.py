"""Dispatch's domain: facilities, vehicles and transfers, and the rules that decide who
rides what to where. Pure: no I/O, time passed in."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from libs.events.aggregate import Aggregate, RuleRefused, StateConflict
from libs.events.catalog import dispatch as ev
from libs.events.catalog.common import Location

CRITICAL_KINDS = ("stroke", "chest_pain", "severe_trauma", "shock", "high_fever", "childbirth")
RISK_AREAS_NEEDING_NPA = ("isolation_site", "sealed_area", "controlled_area")

# Which facility roles may receive which patients (R6). Issue 3 moves this to the region
# configuration file; the defaults follow seed 003.
ROLES_FOR = {
    "cardio_cerebro": ("specialty_cardio_cerebro",),
    "childbirth": ("maternity", "designated"),
    "critical": ("designated", "fever_clinic"),
    "confirmed": ("designated",),
    "fever": ("fever_clinic", "temporary_emergency"),
    "other": ("fever_clinic", "designated", "county_hospital"),
}


# -- pure policies --------------------------------------------------------------------


def distance_km(a: Location, b: Location) -> float:
    """Great-circle distance."""
    r = 6371.0
    p1, p2 = math.radians(a.lat), math.radians(b.lat)
    dp, dl = p2 - p1, math.radians(b.lon - a.lon)
    h = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * r * math.asin(math.sqrt(h))


@dataclass(frozen=True)
class StraightLineEta:
    """ETA from straight-line distance, a road factor and an average speed. A routing
    engine can replace it behind the same call."""

    road_factor: float = 1.3
    speed_kmh: float = 40.0

    def minutes(self, a: Location, b: Location) -> float:
        return distance_km(a, b) * self.road_factor / self.speed_kmh * 60


def triage(risk_category: str, condition: dict[str, Any], purpose: str) -> tuple[int, str]:
    """Priority (1 is first) and why (R4)."""
    if condition.get("critical"):
        return 1, f"critical condition ({condition.get('kind', 'unspecified')}) 急危重症优先"
    if risk_category in ("confirmed", "suspected") or condition.get("fever"):
        return 2, "confirmed/suspected case or fever 确诊/疑似/发热"
    if purpose == "scheduled_care":
        return 4, "scheduled care 定期治疗"
    return 3, "other risk transfer 其他风险人员"


def patient_class(risk_category: str, condition: dict[str, Any]) -> str:
    kind = condition.get("kind")
    if condition.get("critical"):
        if kind in ("stroke", "chest_pain"):
            return "cardio_cerebro"
        if kind == "childbirth":
            return "childbirth"
        return "critical"
    if risk_category == "confirmed":
        return "confirmed"
    if condition.get("fever") or risk_category == "suspected":
        return "fever"
    return "other"


@dataclass(frozen=True)
class VehicleNeeds:
    negative_pressure: bool
    life_support: bool
    dedicated_pool: bool = True

    def why(self) -> str:
        parts = ["dedicated pool 专车专用 (R3)"]
        if self.negative_pressure:
            parts.append("negative-pressure ambulance 负压救护车 (R5)")
        if self.life_support:
            parts.append("life support for a critical patient")
        return ", ".join(parts)


def vehicle_needs(risk_category: str, condition: dict[str, Any]) -> VehicleNeeds:
    covid_like = bool(condition.get("fever") or condition.get("covid_symptoms"))
    npa = risk_category in ("confirmed", "suspected") or (
        risk_category in RISK_AREAS_NEEDING_NPA and covid_like
    )
    return VehicleNeeds(negative_pressure=npa, life_support=bool(condition.get("critical")))


# -- aggregates -----------------------------------------------------------------------


class Facility(Aggregate):
    stream_prefix = "facility"

    name: str = ""
    roles: list[str] = []
    location: Location = Location(lat=0, lon=0)
    fever_clinic_capacity: int | None = None
    fever_clinic_occupied: int = 0
    backup_ids: list[str] = []
    overflow_threshold: float = 0.8
    status: str = "active"

    @classmethod
    def register(cls, event: ev.FacilityRegistered) -> Facility:
        facility = cls(id=event.facility_id)
        facility.record(event)
        return facility

    def _on_FacilityRegistered(self, e: ev.FacilityRegistered) -> None:
        self.name, self.roles, self.location = e.name, list(e.roles), e.location
        self.fever_clinic_capacity, self.backup_ids = e.fever_clinic_capacity, list(e.backup_ids)
        self.overflow_threshold = e.overflow_threshold

    def report_load(self, occupied: int, reported_at: str) -> None:
        ratio = (occupied / self.fever_clinic_capacity) if self.fever_clinic_capacity else None
        self.record(ev.FacilityLoadReported(
            facility_id=self.id, fever_clinic_occupied=occupied, reported_at=reported_at,
            load_ratio=ratio, overflowing=ratio is not None and ratio > self.overflow_threshold,
        ))

    def _on_FacilityLoadReported(self, e: ev.FacilityLoadReported) -> None:
        self.fever_clinic_occupied = e.fever_clinic_occupied
        self.status = "overflowing" if e.overflowing else "active"

    @property
    def overflowing(self) -> bool:
        return self.status == "overflowing"


def choose_destination(
    origin: Location, pclass: str, facilities: list[Facility], eta: StraightLineEta
) -> tuple[Facility | None, str, list[dict[str, Any]]]:
    """By urgency (the patient class picks eligible roles), then proximity (R6); a facility
    past its overflow threshold gives way to its backups (R7)."""
    roles = ROLES_FOR[pclass]
    by_id = {f.id: f for f in facilities}
    activated = {b for f in facilities if f.overflowing for b in f.backup_ids}
    eligible: list[tuple[Facility, str]] = []
    for f in facilities:
        if not set(f.roles) & set(roles):
            continue
        if f.overflowing:
            continue
        if "backup" in f.roles and f.id not in activated:
            continue
        why = "backup activated by overflow (R7)" if f.id in activated else "role fits (R6)"
        eligible.append((f, why))
    for backup_id in activated:
        b = by_id.get(backup_id)
        if b is not None and not b.overflowing and all(b is not f for f, _ in eligible):
            eligible.append((b, "backup activated by overflow (R7)"))
    ranked = sorted(eligible, key=lambda fw: eta.minutes(origin, fw[0].location))
    candidates = [
        {"facility_id": f.id, "eta_min": round(eta.minutes(origin, f.location), 1), "why": why}
        for f, why in ranked
    ]
    skipped = [
        {"facility_id": f.id, "skipped": "overflowing (R7)"} for f in facilities if f.overflowing
    ]
    if not ranked:
        return None, f"no facility with a role in {roles} is open", candidates + skipped
    best = ranked[0][0]
    return best, f"nearest eligible for {pclass} ({'/'.join(roles)})", candidates + skipped


class Vehicle(Aggregate):
    stream_prefix = "vehicle"

    plate: str = ""
    kind: str = ""
    dedicated_pool: bool = True
    life_support: bool = False
    station: str = ""
    location: Location = Location(lat=0, lon=0)
    status: str = "available"
    transfer_id: str | None = None
    awaiting_trips: list[str] = []
    released_early: list[str] = []

    @classmethod
    def register(cls, event: ev.VehicleRegistered) -> Vehicle:
        vehicle = cls(id=event.vehicle_id)
        vehicle.record(event)
        return vehicle

    @property
    def negative_pressure(self) -> bool:
        return self.kind == "negative_pressure_ambulance"

    def fits(self, needs: VehicleNeeds) -> bool:
        return (
            (self.negative_pressure or not needs.negative_pressure)
            and (self.life_support or not needs.life_support)
            and self.dedicated_pool == needs.dedicated_pool
        )

    def over_equipped_for(self, needs: VehicleNeeds) -> int:
        return int(self.negative_pressure and not needs.negative_pressure) + int(
            self.life_support and not needs.life_support)

    def reserve(self, transfer_id: str) -> None:
        if self.status == "assigned":
            raise RuleRefused(
                "R1", "vehicle_already_assigned",
                f"vehicle {self.id} already carries transfer {self.transfer_id} (one patient, one vehicle)",
                f"车辆{self.id}已承担转运任务{self.transfer_id}，一人一车",
                vehicle_id=self.id, transfer_id=self.transfer_id,
            )
        if self.status == "awaiting_disinfection":
            raise RuleRefused(
                "R2", "vehicle_awaiting_disinfection",
                f"vehicle {self.id} has not been released by disinfection (one vehicle, one disinfection)",
                f"车辆{self.id}尚未完成洗消，一车一消",
                vehicle_id=self.id,
            )
        if self.status == "quarantined":
            raise RuleRefused("R9", "vehicle_quarantined",
                              f"vehicle {self.id} is quarantined after a positive surface swab",
                              f"车辆{self.id}因物表核酸阳性已停用", vehicle_id=self.id)
        if self.status != "available":
            raise StateConflict(
                "vehicle_not_available", f"vehicle {self.id} is {self.status}",
                f"车辆{self.id}当前不可派（{self.status}）", vehicle_id=self.id,
            )
        self.record(ev.VehicleReserved(vehicle_id=self.id, transfer_id=transfer_id))

    def _on_VehicleRegistered(self, e: ev.VehicleRegistered) -> None:
        self.plate, self.kind, self.dedicated_pool = e.plate, e.kind, e.dedicated_pool
        self.life_support, self.station, self.location = e.life_support, e.station, e.location

    def _on_VehicleReserved(self, e: ev.VehicleReserved) -> None:
        self.status, self.transfer_id = "assigned", e.transfer_id

    def trip_completed(self, trip_id: str) -> None:
        if trip_id in self.awaiting_trips:
            return
        self.record(ev.VehicleAwaitingDisinfection(vehicle_id=self.id, trip_id=trip_id))
        if trip_id in self.released_early:
            # The release overtook the trip's end on the way here; the cycle is done.
            self.released(trip_id, cycle_id="released-before-trip-end")

    def _on_VehicleAwaitingDisinfection(self, e: ev.VehicleAwaitingDisinfection) -> None:
        if self.status != "quarantined":  # a trip under way when the quarantine began
            self.status = "awaiting_disinfection"
        self.transfer_id = None
        self.awaiting_trips = [*self.awaiting_trips, e.trip_id]

    def released(self, trip_id: str, cycle_id: str, quarantine_lifted: bool = False) -> None:
        if quarantine_lifted:
            if self.status == "quarantined":
                self.record(ev.VehicleReturnedToService(
                    vehicle_id=self.id, trip_id=trip_id, cycle_id=cycle_id, quarantine_lifted=True))
            return
        if trip_id not in self.awaiting_trips:
            self.released_early = [*self.released_early, trip_id]
            return
        self.record(ev.VehicleReturnedToService(vehicle_id=self.id, trip_id=trip_id, cycle_id=cycle_id))

    def take_out_of_service(self, reason: str, rule: str | None = None) -> None:
        self.record(ev.VehicleTakenOutOfService(vehicle_id=self.id, reason=reason, rule=rule))

    def _on_VehicleTakenOutOfService(self, e: ev.VehicleTakenOutOfService) -> None:
        self.status = "quarantined" if e.rule == "R9" else "out_of_service"

    def _on_VehicleReturnedToService(self, e: ev.VehicleReturnedToService) -> None:
        if e.quarantine_lifted:
            # The re-disinfection was done on the parked vehicle after all its trips.
            self.status, self.awaiting_trips, self.released_early = "available", [], []
            return
        self.awaiting_trips = [t for t in self.awaiting_trips if t != e.trip_id]
        self.released_early = [t for t in self.released_early if t != e.trip_id]
        if not self.awaiting_trips and self.status == "awaiting_disinfection":
            self.status = "available"


class Transfer(Aggregate):
    stream_prefix = "transfer"

    status: str = "requested"
    patient: dict[str, Any] = {}
    risk_category: str = ""
    condition: dict[str, Any] = {}
    origin: dict[str, Any] = {}
    purpose: str = ""
    return_required: bool = False
    requested_by: dict[str, Any] = {}
    requested_at: str = ""
    priority: int = 3
    priority_reason: str = ""
    destination_id: str | None = None
    vehicle_id: str | None = None
    reported: bool = False

    def ref_value(self) -> str | None:
        return str(self.patient.get("id_number")) if self.patient.get("id_number") else None

    @classmethod
    def request(cls, event: ev.TransferRequested, requested_at: str) -> Transfer:
        t = cls(id=event.transfer_id, requested_at=requested_at)
        t.record(event)
        priority, why = triage(event.risk_category, event.condition, event.purpose)
        t.record(ev.TransferPrioritized(transfer_id=t.id, priority=priority, reason=why))
        return t

    @property
    def origin_location(self) -> Location:
        return Location.model_validate(self.origin["location"])

    def _on_TransferRequested(self, e: ev.TransferRequested) -> None:
        self.patient, self.risk_category, self.condition = e.patient, e.risk_category, e.condition
        self.origin, self.purpose, self.return_required = e.origin, e.purpose, e.return_required
        self.requested_by = e.requested_by

    def _on_TransferPrioritized(self, e: ev.TransferPrioritized) -> None:
        self.priority, self.priority_reason = e.priority, e.reason

    def route(self, facility: Facility | None, reason: str, candidates: list[dict[str, Any]]) -> None:
        if facility is not None:
            self.record(ev.DestinationAssigned(
                transfer_id=self.id, facility_id=facility.id, reason=reason, candidates=candidates))

    def _on_DestinationAssigned(self, e: ev.DestinationAssigned) -> None:
        self.destination_id = e.facility_id

    def assign(self, vehicle: Vehicle, reason: str, candidates: list[dict[str, Any]],
               manual: bool = False, override_reason: str | None = None) -> None:
        if self.status not in ("requested", "queued"):
            raise StateConflict(
                "transfer_not_assignable", f"transfer {self.id} is {self.status}",
                f"转运单{self.id}当前状态为{self.status}，不能派车",
            )
        vehicle.reserve(self.id)
        self.record(ev.VehicleAssigned(
            transfer_id=self.id, vehicle_id=vehicle.id, destination_id=self.destination_id,
            origin=self.origin, return_required=self.return_required, manual=manual,
            override_reason=override_reason, reason=reason, candidates=candidates,
        ))

    def _on_VehicleAssigned(self, e: ev.VehicleAssigned) -> None:
        self.status, self.vehicle_id = "assigned", e.vehicle_id

    def queue(self, reason: str) -> None:
        self.record(ev.TransferQueued(transfer_id=self.id, reason=reason))

    def _on_TransferQueued(self, e: ev.TransferQueued) -> None:
        self.status = "queued"

    def report(self) -> None:
        """报备 (R10): 120 reports the transfers that reached it directly."""
        if self.reported:
            return
        by = self.requested_by.get("org") or "120"
        if self.requested_by.get("channel") in ("direct_call", "phone"):
            by = "120"
        self.record(ev.TransferReported(transfer_id=self.id, reported_to="county_health_bureau",
                                        reported_by=by))

    def _on_TransferReported(self, e: ev.TransferReported) -> None:
        self.reported = True

    def handed_over(self, trip_id: str, facility_id: str) -> None:
        if self.status == "handed_over":
            return
        self.record(ev.TransferHandedOver(transfer_id=self.id, trip_id=trip_id, facility_id=facility_id))

    def _on_TransferHandedOver(self, e: ev.TransferHandedOver) -> None:
        self.status = "handed_over"


def rank_vehicles(
    transfer: Transfer, vehicles: list[Vehicle], eta: StraightLineEta
) -> tuple[list[Vehicle], list[dict[str, Any]]]:
    """The free vehicles that may carry this patient, nearest first (R3, R5)."""
    needs = vehicle_needs(transfer.risk_category, transfer.condition)
    pickup = transfer.origin_location
    fitting = [v for v in vehicles if v.status == "available" and v.fits(needs)]
    # A negative-pressure or life-support vehicle that this patient does not need stays
    # free for one who does: least over-equipped first, then nearest.
    fitting.sort(key=lambda v: (v.over_equipped_for(needs), eta.minutes(v.location, pickup)))
    considered = [
        {"vehicle_id": v.id, "eta_min": round(eta.minutes(v.location, pickup), 1),
         "fits": v.fits(needs), "status": v.status}
        for v in vehicles
    ]
    return fitting, considered
