"""What the pure views read: the fact rows, with their JSON columns parsed. Loading is in
queries.py; everything here and in the view modules is free of I/O."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from services.projection.facts import SPECS

# A load plan as SQL for a worker process (queries.plan_sql): (AuditData attribute, SQL, its
# JSON columns, whether it takes the share's ids as its one argument).
PlanSql = list[tuple[str, str, tuple[str, ...], bool]]


def parse_json(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> list[dict[str, Any]]:
    """Parses these JSON columns of loaded rows, in place."""
    loads = orjson.loads
    for row in rows:
        for c in columns:
            if row[c] is not None:
                row[c] = loads(row[c])
    return rows


def ts(value: str | None) -> datetime | None:
    """RFC 3339 text to an aware datetime; None stays None."""
    if not value:
        return None
    return datetime.fromisoformat(value)


def seconds(a: str | None, b: str | None) -> float | None:
    """b - a in seconds, when both are known."""
    ta, tb = ts(a), ts(b)
    if ta is None or tb is None:
        return None
    return (tb - ta).total_seconds()


def received_by(trip: dict[str, Any]) -> str | None:
    """Who at the hospital received the patient: the hospital's confirmation names them;
    the crew's handover step does when the crew knew (it often records none, and the
    hospital confirms afterwards)."""
    for column in ("confirmed", "handover"):
        if name := (trip.get(column) or {}).get("received_by"):
            return str(name)
    return None


def unit_dispatch(transfer: dict[str, Any], trip: dict[str, Any] | None) -> dict[str, Any] | None:
    """When the vehicle of this trip was dispatched (a proof): the assignment the trip opened
    from, when it is the transfer's first or latest one; else the trip's opening (the
    transfer row keeps those two assignments, and a trip opens as its vehicle is given).
    A trip opened before it named its assignment: the first assignment when it went to
    this trip's vehicle."""
    assigned = transfer.get("assigned")
    if not trip:
        return assigned
    opened: dict[str, Any] | None = trip.get("opened")
    source = (opened or {}).get("assignment_event_id")
    if source:
        return next((a for a in (assigned, transfer.get("reassigned")) if a and a.get("event_id") == source),
                    opened)
    return assigned if (assigned or {}).get("vehicle_id") == trip.get("vehicle_id") else opened


@dataclass
class AuditData:
    transfers: dict[str, dict[str, Any]] = field(default_factory=dict)
    trips: dict[str, dict[str, Any]] = field(default_factory=dict)
    cycles: dict[str, dict[str, Any]] = field(default_factory=dict)
    swabs: dict[str, dict[str, Any]] = field(default_factory=dict)
    vehicles: dict[str, dict[str, Any]] = field(default_factory=dict)
    facilities: dict[str, dict[str, Any]] = field(default_factory=dict)
    vehicle_log: list[dict[str, Any]] = field(default_factory=list)
    facility_loads: list[dict[str, Any]] = field(default_factory=list)
    decisions: list[dict[str, Any]] = field(default_factory=list)
    others: list[dict[str, Any]] = field(default_factory=list)

    # -- joins the views share -----------------------------------------------------

    def trips_of_transfer(self, transfer_id: str) -> list[dict[str, Any]]:
        found = [t for t in self.trips.values() if t.get("transfer_id") == transfer_id]
        return sorted(found, key=_trip_order)

    def trips_of_vehicle(self, vehicle_id: str) -> list[dict[str, Any]]:
        found = [t for t in self.trips.values() if t.get("vehicle_id") == vehicle_id]
        return sorted(found, key=_trip_order_by_server)

    def cycles_of_trip(self, trip_id: str) -> list[dict[str, Any]]:
        found = [c for c in self.cycles.values() if c.get("trip_id") == trip_id]
        return sorted(found, key=_cycle_order)

    def swabs_of_cycle(self, cycle_id: str) -> list[dict[str, Any]]:
        found = [s for s in self.swabs.values() if s.get("cycle_id") == cycle_id]
        return sorted(found, key=_swab_order)

    def carrying_trip(self, transfer_id: str) -> dict[str, Any] | None:
        """The trip that took the patient to the destination: the one that handed them
        over; else the latest not aborted (a vehicle that broke down before pickup aborts,
        and the next one carries); else the first."""
        trips = self.trips_of_transfer(transfer_id)
        handed = [t for t in trips if t.get("handover") or t.get("s_handed_over")]
        going = [t for t in trips if not t.get("aborted")]
        return handed[-1] if handed else going[-1] if going else trips[0] if trips else None

    def assemble(self, name: str, rows: list[dict[str, Any]]) -> None:
        """Loaded rows of a fact table into this data: by key, or listed."""
        target = getattr(self, name)
        if isinstance(target, dict):
            key = SPECS[name].key[0]
            target.update({r[key]: r for r in rows})
        else:
            target.extend(rows)

    def scope_ids(self, scope: str) -> set[str]:
        """Every vehicle id ("vehicle") or transfer id ("transfer") these rows name."""
        column = f"{scope}_id"
        found: set[str] = set()
        for name in ("transfers", "trips", "cycles", "swabs", "vehicles"):
            found.update(r.get(column) for r in getattr(self, name).values())
        for name in ("vehicle_log", "decisions", "others"):
            found.update(r.get(column) for r in getattr(self, name))
        found.discard(None)
        return found

    def indexed(self) -> AuditData:
        """Builds the by-key indexes once, so the joins above stay linear on large data."""
        by_transfer: dict[str, list[dict[str, Any]]] = {}
        by_vehicle: dict[str, list[dict[str, Any]]] = {}
        for t in self.trips.values():
            by_transfer.setdefault(t.get("transfer_id") or "", []).append(t)
            by_vehicle.setdefault(t.get("vehicle_id") or "", []).append(t)
        cycles_by_trip: dict[str, list[dict[str, Any]]] = {}
        for c in self.cycles.values():
            cycles_by_trip.setdefault(c.get("trip_id") or "", []).append(c)
        swabs_by_cycle: dict[str, list[dict[str, Any]]] = {}
        for s in self.swabs.values():
            swabs_by_cycle.setdefault(s.get("cycle_id") or "", []).append(s)
        return _Indexed(self, by_transfer, by_vehicle, cycles_by_trip, swabs_by_cycle)


def _recorded(ref: dict[str, Any] | None) -> str | None:
    return ref.get("recorded_at") if ref else None


_EARLIEST = datetime.min.replace(tzinfo=UTC)


def instant(value: Any) -> datetime:
    """An RFC 3339 text as a point in time to sort by: texts with different offsets (a
    crew phone at +08:00, a lab posting UTC) do not sort as text. Missing or unreadable
    (a forged payload) comes first."""
    if not isinstance(value, str) or not value:
        return _EARLIEST
    try:
        at = datetime.fromisoformat(value)
    except ValueError:
        return _EARLIEST
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


def _trip_order(t: dict[str, Any]) -> tuple[datetime, str]:
    return instant(t.get("opened_at")), t["trip_id"]


def _trip_order_by_server(t: dict[str, Any]) -> tuple[datetime, str]:
    return instant(_recorded(t.get("opened")) or t.get("opened_at")), t["trip_id"]


def _cycle_order(c: dict[str, Any]) -> tuple[datetime, str]:
    return instant(c.get("opened_at")), c["cycle_id"]


def _swab_order(s: dict[str, Any]) -> tuple[datetime, str]:
    return instant(s.get("collected_at")), s["sample_id"]


class _Indexed(AuditData):
    def __init__(self, base: AuditData, by_transfer: dict[str, list[dict[str, Any]]],
                 by_vehicle: dict[str, list[dict[str, Any]]],
                 cycles_by_trip: dict[str, list[dict[str, Any]]],
                 swabs_by_cycle: dict[str, list[dict[str, Any]]]) -> None:
        super().__init__(**{k: getattr(base, k) for k in base.__dataclass_fields__})
        # Rows in the order of their streams, not of the query that loaded them: what the
        # checks find (and the order of its evidence) must not depend on how rows came back.
        self.decisions = sorted(base.decisions, key=lambda r: (r["position"], r["event_id"]))
        self.facility_loads = sorted(base.facility_loads, key=lambda r: (r["position"], r["event_id"]))
        self.vehicle_log = sorted(base.vehicle_log, key=lambda r: (r["vehicle_id"], r["stream_version"],
                                                                   r["event_id"]))
        self.others = sorted(base.others, key=lambda r: (r["stream_id"], r["stream_version"], r["event_id"]))
        self._by_transfer, self._by_vehicle = by_transfer, by_vehicle
        self._cycles_by_trip, self._swabs_by_cycle = cycles_by_trip, swabs_by_cycle

    def trips_of_transfer(self, transfer_id: str) -> list[dict[str, Any]]:
        return sorted(self._by_transfer.get(transfer_id, []), key=_trip_order)

    def trips_of_vehicle(self, vehicle_id: str) -> list[dict[str, Any]]:
        return sorted(self._by_vehicle.get(vehicle_id, []), key=_trip_order_by_server)

    def cycles_of_trip(self, trip_id: str) -> list[dict[str, Any]]:
        return sorted(self._cycles_by_trip.get(trip_id, []), key=_cycle_order)

    def swabs_of_cycle(self, cycle_id: str) -> list[dict[str, Any]]:
        return sorted(self._swabs_by_cycle.get(cycle_id, []), key=_swab_order)

    def indexed(self) -> AuditData:
        return self


def from_rows(rows: dict[str, dict[tuple[Any, ...], dict[str, Any]]]) -> AuditData:
    """AuditData straight from folded fact rows (facts.Buffer.rows), with no database:
    what the unit tests and the benchmarks evaluate views on."""
    from services.projection.facts import JSON_COLUMNS

    data = AuditData()
    for name, table in rows.items():
        spec = SPECS[name]
        for key, row in table.items():
            full = {**dict(zip(spec.key, key, strict=True)), **{c: row.get(c) for c in spec.columns}}
            for k, v in full.items():
                if k in JSON_COLUMNS and k != "data" and isinstance(v, str):
                    full[k] = orjson.loads(v)
            target = getattr(data, name)
            if isinstance(target, dict):
                target[key[0]] = full
            else:
                target.append(full)
    return data
