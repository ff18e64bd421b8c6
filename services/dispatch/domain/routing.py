"""R6 and R7: where a patient may go, nearest first, and overflow to backups."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from libs.events.aggregate import Aggregate
from libs.events.catalog import dispatch as ev
from libs.events.catalog.common import Location


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
    engine can stand in for it: anything with this `minutes` method."""

    road_factor: float = 1.3
    speed_kmh: float = 40.0

    def minutes(self, a: Location, b: Location) -> float:
        return distance_km(a, b) * self.road_factor / self.speed_kmh * 60


class Facility(Aggregate):
    stream_prefix = "facility"

    name: str = ""
    roles: list[str] = []
    location: Location = Location(lat=0, lon=0)
    fever_clinic_capacity: int | None = None
    fever_clinic_occupied: int = 0
    load_ratio: float | None = None
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
        """R7: past the threshold the backups take new patients; back under, they stand down."""
        was = self.overflowing
        ratio = (occupied / self.fever_clinic_capacity) if self.fever_clinic_capacity else None
        now = ratio is not None and ratio > self.overflow_threshold
        self.record(ev.FacilityLoadReported(
            facility_id=self.id, fever_clinic_occupied=occupied, reported_at=reported_at,
            load_ratio=ratio, overflowing=now))
        if now and not was:
            self.record(ev.BackupsActivated(facility_id=self.id, backup_ids=self.backup_ids,
                                            load_ratio=ratio or 0, threshold=self.overflow_threshold))
        elif was and not now:
            self.record(ev.BackupsStoodDown(facility_id=self.id, backup_ids=self.backup_ids,
                                            load_ratio=ratio or 0, threshold=self.overflow_threshold))

    def _on_FacilityLoadReported(self, e: ev.FacilityLoadReported) -> None:
        self.fever_clinic_occupied, self.load_ratio = e.fever_clinic_occupied, e.load_ratio
        self.status = "overflowing" if e.overflowing else "active"

    @property
    def overflowing(self) -> bool:
        return self.status == "overflowing"


@dataclass(frozen=True)
class Routing:
    facility: Facility | None
    reason: str
    candidates: list[dict[str, Any]]


def eligible_facilities(roles: list[str], facilities: list[Facility],
                        excluding: str | None = None) -> list[tuple[Facility, str]]:
    """Facilities whose own role fits the patient (R6). R7 is about the fever clinic: past
    its threshold a facility takes no new fever-clinic patients (its other wards still take
    theirs), and its backups take them instead. A backup takes only patients its own roles
    fit, and no one while it stands down. `excluding` (a redirect's current destination) is
    no candidate, but its overflow still activates its backups."""
    wanted = set(roles)
    activated = {b for f in facilities if f.overflowing for b in f.backup_ids}
    out: list[tuple[Facility, str]] = []
    for f in facilities:
        if f.id == excluding:
            continue
        fit = (set(f.roles) - {"backup"}) & wanted
        if not fit:
            continue
        if f.overflowing and fit <= {"fever_clinic"}:
            continue
        if "backup" in f.roles:
            if f.id in activated:
                out.append((f, "backup activated by overflow (R7)"))
            continue
        out.append((f, f"role fits: {', '.join(sorted(fit))} (R6)"))
    return out


def choose_destination(
    origin: Location, pclass: str, roles: list[str], facilities: list[Facility], eta: StraightLineEta,
    *, critical: bool, wish: str | None = None, excluding: str | None = None,
) -> Routing:
    """就急、就近、就自愿: a critical patient goes to the nearest eligible facility; another
    patient to the one they wish for when it is eligible, else the nearest. `excluding`:
    a facility that is no candidate (a redirect's current destination)."""
    timed = sorted(((eta.minutes(origin, f.location), i, f, why)
                    for i, (f, why) in enumerate(eligible_facilities(roles, facilities, excluding))),
                   key=lambda t: t[:2])
    ranked = [(f, why) for _, _, f, why in timed]
    candidates: list[dict[str, Any]] = [
        {"facility_id": f.id, "eta_min": round(minutes, 1), "why": why} for minutes, _, f, why in timed
    ]
    candidates += [{"facility_id": f.id, "skipped": "overflowing (R7)"}
                   for f in facilities if f.overflowing and f.id != excluding]
    if not ranked:
        return Routing(None, f"no open facility has a role in {roles} for {pclass} (R6)", candidates)
    if wish and not critical:
        wished = next((f for f, _ in ranked if f.id == wish), None)
        if wished is not None:
            return Routing(wished, f"the patient's wish, eligible for {pclass} (就自愿, R6)", candidates)
    best = ranked[0][0]
    why = "nearest eligible" + (" (就急)" if critical else " (就近)")
    if wish and wish != best.id:
        why += f"; the wish {wish} is not eligible or not open" if not critical else (
            "; urgency before the wish")
    return Routing(best, f"{why} for {pclass} (R6)", candidates)
