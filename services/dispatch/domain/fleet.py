"""Vehicles: R1 (one patient at a time), R2 (no trip before disinfection releases it),
R3 and R5 (what may carry whom), and the overrides a dispatcher may make with a reason."""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from libs.events.aggregate import Aggregate, RuleRefused, StateConflict
from libs.events.catalog import dispatch as ev
from libs.events.catalog.common import Location
from libs.events.store import StateChange
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
    # A transfer it was taken off whose trip the transfer service has not ended yet: had the
    # patient boarded (the crew's step may not have reached dispatch), the vehicle carried
    # them and needs disinfection, so it is not assigned again until that trip ends (R2).
    trip_end_awaited: str | None = None

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

    def trip_aborted(self, transfer_id: str) -> None:
        """The trip of a transfer it was taken off ended without the patient aboard."""
        if self.trip_end_awaited == transfer_id:
            self.record(ev.VehicleHoldLifted(vehicle_id=self.id, transfer_id=transfer_id,
                                             reason="its trip ended before the patient was aboard"))

    def _on_VehicleHoldLifted(self, e: ev.VehicleHoldLifted) -> None:
        self.trip_end_awaited = None
        if self.status == "awaiting_disinfection" and not self.awaiting_trips:
            self.status = "available"

    def trip_completed(self, trip_id: str, transfer_id: str | None = None) -> None:
        if trip_id in self.awaiting_trips:
            return
        self.record(ev.VehicleAwaitingDisinfection(vehicle_id=self.id, trip_id=trip_id,
                                                   transfer_id=transfer_id))
        if trip_id in self.released_early:
            # The release overtook the trip's end on its way here; the cycle is done.
            self.released(trip_id, cycle_id=self.early_cycle.get(trip_id, ""))

    def _on_VehicleAwaitingDisinfection(self, e: ev.VehicleAwaitingDisinfection) -> None:
        # Only the current transfer's trip ends the assignment. The end of a trip it was
        # taken off, or of an earlier trip, arriving once it carries a transfer (by an R2
        # override, even the same one again) leaves that one assigned, its disinfection owed.
        withdrawn = e.transfer_id is not None and e.transfer_id == self.trip_end_awaited
        earlier = self.status == "assigned" and e.transfer_id not in (None, self.transfer_id)
        if withdrawn:
            self.trip_end_awaited = None
        elif not earlier:
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
            self.out_reason, self.trip_end_awaited = None, None
            return
        self.awaiting_trips = [t for t in self.awaiting_trips if t != e.trip_id]
        self.released_early = [t for t in self.released_early if t != e.trip_id]
        if not self.awaiting_trips and self.status == "awaiting_disinfection":
            self.status = "available"

    def take_out_of_service(self, reason: str, rule: str | None = None,
                            withdrawn_from: str | None = None) -> None:
        self.record(ev.VehicleTakenOutOfService(vehicle_id=self.id, reason=reason, rule=rule,
                                                withdrawn_from=withdrawn_from))

    def _on_VehicleTakenOutOfService(self, e: ev.VehicleTakenOutOfService) -> None:
        self.status = "quarantined" if e.rule == "R9" else "out_of_service"
        self.out_reason = e.reason
        if e.withdrawn_from is not None:  # off that transfer, waiting for its trip's end
            self.trip_end_awaited, self.transfer_id = e.withdrawn_from, None

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
            held = self.awaiting_trips or self.trip_end_awaited is not None
            self.status = "awaiting_disinfection" if held else "available"
            self.out_reason = None

    def report_position(self, location: Location, at: str) -> None:
        self.record(ev.VehiclePositionReported(vehicle_id=self.id, location=location, at=at))

    def _on_VehiclePositionReported(self, e: ev.VehiclePositionReported) -> None:
        self.location, self.position_at = e.location, e.at


Kit = tuple[str, bool, bool]  # kind, dedicated pool, life support: all that decides a fit
Cell = tuple[int, int]
# The ranking order: least over-equipped, nearest (squared planar distance), then update order
# (store position, stream id); the vehicle rides along and is never compared.
Ranked = tuple[int, float, int, str, Vehicle]


def _kit(v: Vehicle) -> Kit:
    return (v.kind, v.dedicated_pool, v.life_support)


def _verdict(v: Vehicle, needs: VehicleNeeds) -> int | None:
    """How over-equipped the vehicle is for these needs, or None when it does not fit."""
    return v.over_equipped_for(needs) if v.fits(needs) else None


def _planar_scale(pickup: Location) -> float:
    """Planar distance scaled at the pickup's latitude: over a city it orders as the great
    circle does, at a fraction of the cost."""
    return math.cos(math.radians(pickup.lat))


def _ranking(first: list[Ranked], everyone: Callable[[], list[Ranked]], available: int,
             fitting: int, pickup: Location, eta: StraightLineEta,
             shown: int) -> tuple[Iterator[Vehicle], list[dict[str, Any]]]:
    considered: list[dict[str, Any]] = [
        {"vehicle_id": v.id, "eta_min": round(eta.minutes(v.location, pickup), 1), "over_equipped": over}
        for over, _, _, _, v in first
    ]
    if available > len(considered):
        considered.append({"others": {"fitting_free": max(fitting - shown, 0),
                                      "not_fitting_or_busy": available - fitting}})

    def ranked() -> Iterator[Vehicle]:
        yield from (r[-1] for r in first)
        yield from (r[-1] for r in sorted(everyone())[shown:])

    return ranked(), considered


def rank_vehicles(
    needs: VehicleNeeds, pickup: Location, vehicles: list[Vehicle], eta: StraightLineEta,
    shown: int = 10,
) -> tuple[Iterator[Vehicle], list[dict[str, Any]]]:
    """The free vehicles that may carry this patient: least over-equipped, then nearest; and
    what the decision considered: the first `shown` with their ETA, and how many others.
    Only the first `shown` are ordered up front; the rest only if the caller reads on."""
    # A fit depends on the equipment alone: judged once per kit, not once per vehicle.
    verdicts: dict[Kit, int | None] = {}
    scale = _planar_scale(pickup)
    keyed: list[Ranked] = []
    for i, v in enumerate(vehicles):
        if v.status != "available":
            continue
        kit = _kit(v)
        if kit not in verdicts:
            verdicts[kit] = _verdict(v, needs)
        over = verdicts[kit]
        if over is None:
            continue
        dlat, dlon = v.location.lat - pickup.lat, (v.location.lon - pickup.lon) * scale
        keyed.append((over, dlat * dlat + dlon * dlon, i, v.id, v))
    return _ranking(heapq.nsmallest(shown, keyed), lambda: keyed, len(vehicles), len(keyed),
                    pickup, eta, shown)


class FreeFleet:
    """The available vehicles, filed by kit and by grid cell as their states change (an
    IndexView of the vehicles), so a decision looks at the cells around the pickup instead
    of every free vehicle. Ranks exactly as rank_vehicles does over the same vehicles."""

    CELL = 0.02  # degrees: about 2 km north-south

    def __init__(self) -> None:
        self._grid: dict[Kit, dict[Cell, dict[str, tuple[int, Vehicle]]]] = {}
        self._count: dict[Kit, int] = {}
        self._placed: dict[str, tuple[Kit, Cell]] = {}

    def _cell(self, at: Location) -> Cell:
        return (math.floor(at.lat / self.CELL), math.floor(at.lon / self.CELL))

    def put(self, change: StateChange, state: Callable[[], Any]) -> None:
        stream_id = change.stream_id
        placed = self._placed.pop(stream_id, None)
        if placed is not None:
            kit, cell = placed
            cells = self._grid[kit]
            del cells[cell][stream_id]
            if not cells[cell]:
                del cells[cell]
            self._count[kit] -= 1
            if not self._count[kit]:
                del self._grid[kit], self._count[kit]
        if change.status == "available":
            vehicle: Vehicle = state()
            kit, cell = _kit(vehicle), self._cell(vehicle.location)
            self._grid.setdefault(kit, {}).setdefault(cell, {})[stream_id] = (change.position, vehicle)
            self._count[kit] = self._count.get(kit, 0) + 1
            self._placed[stream_id] = (kit, cell)

    def rank(self, needs: VehicleNeeds, pickup: Location, eta: StraightLineEta,
             shown: int = 10) -> tuple[Iterator[Vehicle], list[dict[str, Any]]]:
        """As rank_vehicles(needs, pickup, <the available vehicles in update order>, eta)."""
        levels: dict[int, list[Kit]] = {}
        for kit, cells in self._grid.items():
            sample = next(iter(next(iter(cells.values())).values()))[1]
            over = _verdict(sample, needs)
            if over is not None:
                levels.setdefault(over, []).append(kit)
        fitting = sum(self._count[k] for kits in levels.values() for k in kits)
        first: list[Ranked] = []
        for over in sorted(levels):
            if len(first) >= shown:
                break
            first += self._nearest(over, levels[over], pickup, shown - len(first))

        def everyone() -> list[Ranked]:
            return [r for over, kits in levels.items() for r in self._all(over, kits, pickup)]

        return _ranking(first, everyone, len(self._placed), fitting, pickup, eta, shown)

    def _nearest(self, over: int, kits: list[Kit], pickup: Location, want: int) -> list[Ranked]:
        """The `want` first of these kits around the pickup: ring after ring of cells, until
        no unseen cell can hold anything nearer; a scan when rings would cost more."""
        total = sum(self._count[k] for k in kits)
        scale = _planar_scale(pickup)
        cy, cx = self._cell(pickup)
        found: list[Ranked] = []
        r = 0
        while len(found) < total:
            if (2 * r + 1) ** 2 > total:
                return heapq.nsmallest(want, self._all(over, kits, pickup))
            ring = ([(cy + dy, cx + dx) for dy in (-r, r) for dx in range(-r, r + 1)]
                    + [(cy + dy, cx + dx) for dy in range(-r + 1, r) for dx in (-r, r)]) if r else [(cy, cx)]
            for cell in ring:
                for kit in kits:
                    found += self._ranked(over, self._grid[kit].get(cell, {}), pickup, scale)
            # Whatever lies beyond this ring is at least r cells away in latitude or longitude
            # (less a hair, for a position the float division put in the next cell).
            beyond = (r * self.CELL * scale * 0.999) ** 2
            if len(found) >= want and heapq.nsmallest(want, found)[-1][1] < beyond:
                break
            r += 1
        return heapq.nsmallest(want, found)

    def _all(self, over: int, kits: list[Kit], pickup: Location) -> list[Ranked]:
        scale = _planar_scale(pickup)
        return [r for kit in kits for members in self._grid[kit].values()
                for r in self._ranked(over, members, pickup, scale)]

    @staticmethod
    def _ranked(over: int, members: dict[str, tuple[int, Vehicle]], pickup: Location,
                scale: float) -> list[Ranked]:
        out: list[Ranked] = []
        for sid, (position, v) in members.items():
            dlat, dlon = v.location.lat - pickup.lat, (v.location.lon - pickup.lon) * scale
            out.append((over, dlat * dlat + dlon * dlon, position, sid, v))
        return out
