"""Vehicles: R1 (one patient at a time), R2 (no trip before disinfection releases it),
R3 and R5 (what may carry whom), and the overrides a dispatcher may make with a reason."""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from libs.events.aggregate import Aggregate, RuleRefused, StateConflict
from libs.events.catalog import dispatch as ev
from libs.events.catalog.common import Location
from services.dispatch.domain.routing import StraightLineEta

RISK_AREAS_NEEDING_NPA = ("isolation_site", "sealed_area", "controlled_area")


@dataclass(frozen=True)
class VehicleNeeds:
    negative_pressure: bool
    life_support: bool
    dedicated_pool: bool = True


@dataclass(frozen=True)
class Unmet:
    """One way a vehicle does not fit a patient: which rule, and what to say."""

    rule: str
    code: str
    detail: str
    message_zh: str


def vehicle_needs(risk_category: str, condition: dict[str, Any]) -> VehicleNeeds:
    """R5: negative pressure for confirmed or suspected cases, and for fever or COVID-like
    symptoms from isolation sites and sealed/controlled areas; life support when critical.
    R3: every risk transfer rides a dedicated-pool vehicle."""
    covid_like = bool(condition.get("fever") or condition.get("covid_symptoms"))
    npa = risk_category in ("confirmed", "suspected") or (
        risk_category in RISK_AREAS_NEEDING_NPA and covid_like)
    return VehicleNeeds(negative_pressure=npa, life_support=bool(condition.get("critical")))


class Vehicle(Aggregate):
    stream_prefix = "vehicle"

    plate: str = ""
    kind: str = ""
    dedicated_pool: bool = True
    life_support: bool = False
    station: str = ""
    location: Location = Location(lat=0, lon=0)
    position_at: str | None = None
    status: str = "available"
    transfer_id: str | None = None
    awaiting_trips: list[str] = []
    released_early: list[str] = []
    early_cycle: dict[str, str] = {}
    out_reason: str | None = None

    @classmethod
    def register(cls, event: ev.VehicleRegistered) -> Vehicle:
        vehicle = cls(id=event.vehicle_id)
        vehicle.record(event)
        return vehicle

    def _on_VehicleRegistered(self, e: ev.VehicleRegistered) -> None:
        self.plate, self.kind, self.dedicated_pool = e.plate, e.kind, e.dedicated_pool
        self.life_support, self.station, self.location = e.life_support, e.station, e.location

    @property
    def negative_pressure(self) -> bool:
        return self.kind == "negative_pressure_ambulance"

    def unmet(self, needs: VehicleNeeds) -> list[Unmet]:
        out: list[Unmet] = []
        if needs.negative_pressure and not self.negative_pressure:
            out.append(Unmet("R5", "negative_pressure_required",
                             f"the patient needs a negative-pressure ambulance; {self.id} is a {self.kind}",
                             f"该患者须乘负压救护车，{self.id}不是负压车"))
        if needs.dedicated_pool and not self.dedicated_pool:
            out.append(Unmet("R3", "dedicated_pool_required",
                             f"risk transfers ride dedicated-pool vehicles; {self.id} is not one",
                             f"风险人员须专车转运，{self.id}不在专用车辆池"))
        if needs.life_support and not self.life_support:
            out.append(Unmet("life_support", "life_support_required",
                             f"a critical patient needs life support; {self.id} has none",
                             f"危重患者须配备生命支持的车辆，{self.id}不具备"))
        return out

    def fits(self, needs: VehicleNeeds) -> bool:
        return not self.unmet(needs)

    def over_equipped_for(self, needs: VehicleNeeds) -> int:
        """A negative-pressure or life-support vehicle this patient does not need stays free
        for one who does."""
        return int(self.negative_pressure and not needs.negative_pressure) + int(
            self.life_support and not needs.life_support)

    def reserve(self, transfer_id: str, overrides: frozenset[str] = frozenset()) -> None:
        if self.status == "assigned":  # R1 has no override
            raise RuleRefused(
                "R1", "vehicle_already_assigned",
                f"vehicle {self.id} already carries transfer {self.transfer_id} (one patient, one vehicle)",
                f"车辆{self.id}已承担转运任务{self.transfer_id}，一人一车",
                vehicle_id=self.id, transfer_id=self.transfer_id)
        if self.status == "awaiting_disinfection" and "R2" not in overrides:
            raise RuleRefused(
                "R2", "vehicle_awaiting_disinfection",
                f"vehicle {self.id} has not been released by disinfection (one vehicle, one disinfection)",
                f"车辆{self.id}尚未完成洗消，一车一消", vehicle_id=self.id)
        if self.status == "quarantined":
            raise RuleRefused("R9", "vehicle_quarantined",
                              f"vehicle {self.id} is quarantined after a positive surface swab",
                              f"车辆{self.id}因物表核酸阳性已停用", vehicle_id=self.id)
        if self.status not in ("available", "awaiting_disinfection"):
            raise StateConflict("vehicle_not_available", f"vehicle {self.id} is {self.status}",
                                f"车辆{self.id}当前不可派（{self.status}）", vehicle_id=self.id)
        self.record(ev.VehicleReserved(vehicle_id=self.id, transfer_id=transfer_id))

    def _on_VehicleReserved(self, e: ev.VehicleReserved) -> None:
        self.status, self.transfer_id = "assigned", e.transfer_id

    def stand_down(self, transfer_id: str, reason: str) -> None:
        if self.transfer_id != transfer_id:
            return
        self.record(ev.VehicleStoodDown(vehicle_id=self.id, transfer_id=transfer_id, reason=reason))

    def _on_VehicleStoodDown(self, e: ev.VehicleStoodDown) -> None:
        self.transfer_id = None
        if self.status == "assigned":
            self.status = "awaiting_disinfection" if self.awaiting_trips else "available"

    def trip_completed(self, trip_id: str) -> None:
        if trip_id in self.awaiting_trips:
            return
        self.record(ev.VehicleAwaitingDisinfection(vehicle_id=self.id, trip_id=trip_id))
        if trip_id in self.released_early:
            # The release overtook the trip's end on its way here; the cycle is done.
            self.released(trip_id, cycle_id=self.early_cycle.get(trip_id, ""))

    def _on_VehicleAwaitingDisinfection(self, e: ev.VehicleAwaitingDisinfection) -> None:
        if self.status in ("assigned", "available"):
            self.status = "awaiting_disinfection"
        self.transfer_id = None
        self.awaiting_trips = [*self.awaiting_trips, e.trip_id]

    def released(self, trip_id: str, cycle_id: str, quarantine_lifted: bool = False) -> None:
        if quarantine_lifted:  # R9: the re-disinfection after a positive swab released it
            if self.status == "quarantined":
                self.record(ev.VehicleReturnedToService(
                    vehicle_id=self.id, trip_id=trip_id, cycle_id=cycle_id, quarantine_lifted=True))
            return
        if trip_id not in self.awaiting_trips:
            if trip_id not in self.released_early:
                self.record(ev.VehicleReleaseReceivedEarly(vehicle_id=self.id, trip_id=trip_id,
                                                           cycle_id=cycle_id))
            return
        self.record(ev.VehicleReturnedToService(vehicle_id=self.id, trip_id=trip_id, cycle_id=cycle_id))

    def _on_VehicleReleaseReceivedEarly(self, e: ev.VehicleReleaseReceivedEarly) -> None:
        self.released_early = [*self.released_early, e.trip_id]
        self.early_cycle = {**self.early_cycle, e.trip_id: e.cycle_id}

    def _on_VehicleReturnedToService(self, e: ev.VehicleReturnedToService) -> None:
        if e.quarantine_lifted:
            # The re-disinfection was done on the parked vehicle after all its trips.
            self.status, self.awaiting_trips, self.released_early = "available", [], []
            self.out_reason = None
            return
        self.awaiting_trips = [t for t in self.awaiting_trips if t != e.trip_id]
        self.released_early = [t for t in self.released_early if t != e.trip_id]
        if not self.awaiting_trips and self.status == "awaiting_disinfection":
            self.status = "available"

    def take_out_of_service(self, reason: str, rule: str | None = None) -> None:
        self.record(ev.VehicleTakenOutOfService(vehicle_id=self.id, reason=reason, rule=rule))

    def _on_VehicleTakenOutOfService(self, e: ev.VehicleTakenOutOfService) -> None:
        self.status = "quarantined" if e.rule == "R9" else "out_of_service"
        self.out_reason = e.reason

    def set_duty(self, on_duty: bool, reason: str) -> None:
        if self.status == "quarantined" and on_duty:
            raise RuleRefused("R9", "vehicle_quarantined",
                              f"vehicle {self.id} is quarantined: disinfection must release it",
                              f"车辆{self.id}已停用，须经洗消放行", vehicle_id=self.id)
        if self.status == "assigned" and not on_duty:
            raise StateConflict("vehicle_on_a_transfer",
                                f"vehicle {self.id} is on transfer {self.transfer_id}",
                                f"车辆{self.id}正在执行转运任务", vehicle_id=self.id)
        self.record(ev.VehicleDutyChanged(vehicle_id=self.id, on_duty=on_duty, reason=reason))

    def _on_VehicleDutyChanged(self, e: ev.VehicleDutyChanged) -> None:
        if not e.on_duty:
            self.status = "off_duty"
        elif self.status in ("off_duty", "out_of_service"):
            self.status = "awaiting_disinfection" if self.awaiting_trips else "available"
            self.out_reason = None

    def report_position(self, location: Location, at: str) -> None:
        self.record(ev.VehiclePositionReported(vehicle_id=self.id, location=location, at=at))

    def _on_VehiclePositionReported(self, e: ev.VehiclePositionReported) -> None:
        self.location, self.position_at = e.location, e.at


def rank_vehicles(
    needs: VehicleNeeds, pickup: Location, vehicles: list[Vehicle], eta: StraightLineEta,
    shown: int = 10,
) -> tuple[Iterator[Vehicle], list[dict[str, Any]]]:
    """The free vehicles that may carry this patient: least over-equipped, then nearest; and
    what the decision considered: the first `shown` with their ETA, and how many others.
    Only the first `shown` are ordered up front; the rest only if the caller reads on."""
    # Whether a vehicle fits, and how over-equipped it is, depends on its equipment alone:
    # judged once per kind of equipment, not once per vehicle.
    verdicts: dict[tuple[str, bool, bool], int | None] = {}
    # Planar distance scaled at the pickup's latitude: over a city it orders as the great
    # circle does, at a fraction of the cost.
    scale = math.cos(math.radians(pickup.lat))
    keyed: list[tuple[int, float, int]] = []
    for i, v in enumerate(vehicles):
        if v.status != "available":
            continue
        kit = (v.kind, v.dedicated_pool, v.life_support)
        if kit not in verdicts:
            verdicts[kit] = v.over_equipped_for(needs) if v.fits(needs) else None
        over = verdicts[kit]
        if over is None:
            continue
        dlat, dlon = v.location.lat - pickup.lat, (v.location.lon - pickup.lon) * scale
        keyed.append((over, dlat * dlat + dlon * dlon, i))
    first = heapq.nsmallest(shown, keyed)
    considered: list[dict[str, Any]] = [
        {"vehicle_id": vehicles[i].id, "eta_min": round(eta.minutes(vehicles[i].location, pickup), 1),
         "over_equipped": over}
        for over, _, i in first
    ]
    if len(vehicles) > len(considered):
        considered.append({"others": {"fitting_free": max(len(keyed) - shown, 0),
                                      "not_fitting_or_busy": len(vehicles) - len(keyed)}})

    def ranked() -> Iterator[Vehicle]:
        yield from (vehicles[i] for _, _, i in first)
        yield from (vehicles[i] for _, _, i in sorted(keyed)[shown:])

    return ranked(), considered
