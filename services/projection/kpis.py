"""Indicators in the NEMSIS style: the segments of each transfer and of each vehicle's
trips and turnaround, as p50 / p90 / p95 per day, facility and vehicle, and two 3-minute
rates against 95%: the national 3分钟出车率 (`departure_within_3_min`: a dispatched
vehicle on its way within 3 minutes, one count per trip) and the wait for a vehicle
(`dispatch_within_3_min`: a request given one within 3 minutes; dispatch decides at once
when a vehicle is free, so this is what the queue costs). Pure: no I/O.

Times: crew steps carry the phone's clock (`device`, the default: a phone that was
offline resends its steps late, and the server's receive time would stretch the
segments), or the server's (`server`). A segment that comes out negative (a phone clock
behind the server's) is not averaged in: it is counted under `negative` so skew shows.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from services.projection.data import AuditData, seconds, ts, unit_dispatch
from services.projection.facts import local_day
from services.projection.findings import RETURN_TO_ORIGIN

TARGET_SECONDS = 180  # the national 3-minute targets, at 95%
TARGET_RATE = 0.95

# (segment, from milestone, to milestone). A trip's, of each trip a vehicle made: milestones
# named in `trip_milestones`; its turnaround runs from the trip's end (the handover, or the
# trip completed when the vehicle was taken off with the patient aboard) to its release.
TRIP_SEGMENTS = (
    ("dispatch_to_en_route", "unit_dispatched", "en_route"),
    ("en_route_to_at_pickup", "en_route", "at_pickup"),
    ("at_pickup_to_at_destination", "at_pickup", "at_destination"),
    ("at_destination_to_handover", "at_destination", "handed_over"),
    ("vehicle_turnaround", "trip_ended", "released"),
    ("swab_turnaround", "swab_collected", "swab_result"),
)
# A transfer's: its own, and those of the trip that carried the patient to the end (`milestones`).
SEGMENTS = (
    ("request_to_dispatch", "requested", "dispatched"),
    *TRIP_SEGMENTS[:4],
    ("response", "requested", "first_at_pickup"),
    ("request_to_handover", "requested", "handed_over"),
    *TRIP_SEGMENTS[4:],
)
TRIP_MILESTONES = ("unit_dispatched", "en_route", "at_pickup", "at_destination", "handed_over", "trip_ended",
                   "released", "swab_collected", "swab_result")


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile: always a value that was observed."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def _at(ref: dict[str, Any] | None, clock: str) -> str | None:
    if not ref:
        return None
    return ref.get("recorded_at") if clock == "server" else ref.get("at")


def trip_milestones(data: AuditData, transfer: dict[str, Any], trip: dict[str, Any],
                    clock: str = "device") -> dict[str, str | None]:
    """One trip's milestones: its own vehicle's dispatch, its crew's steps, its handover, its
    own disinfection cycle's release and that cycle's swab. A trip taken off with the patient
    aboard (a breakdown; another vehicle takes them over) hands nobody over: its vehicle's
    turnaround runs from the trip's end."""
    # The trip's own cycle: a re-disinfection after a positive swab names the trip too.
    cycles = [c for c in data.cycles_of_trip(trip.get("trip_id") or "")
              if (c.get("opened") or {}).get("kind", "trip") == "trip"]
    cycle = cycles[0] if cycles else {}
    swabs = data.swabs_of_cycle(cycle.get("cycle_id") or "") if cycle else []
    swab = swabs[0] if swabs else {}
    handed = trip.get("handover") or trip.get("s_handed_over")
    return {
        "unit_dispatched": _at(unit_dispatch(transfer, trip), clock),
        "en_route": _at(trip.get("s_en_route"), clock),
        "at_pickup": _at(trip.get("s_at_pickup"), clock),
        "at_destination": _at(trip.get("s_at_destination"), clock),
        "handed_over": _at(handed, clock),
        "trip_ended": _at(handed or trip.get("completed"), clock),
        "ended_short": _at(None if handed else trip.get("completed") or trip.get("aborted"), clock),
        "released": _at(cycle.get("released"), clock),
        "swab_collected": (swab.get("collected_at") if clock == "device"
                           else _at(swab.get("collected"), clock)),
        "swab_result": ((swab.get("result") or {}).get("reported_at") if clock == "device"
                        else _at(swab.get("result"), clock)),
    }


Memo = dict[str, dict[str, str | None]]  # a trip's milestones by its id, within one computation


def _of_trip(data: AuditData, t: dict[str, Any], trip: dict[str, Any], clock: str,
             memo: Memo | None) -> dict[str, str | None]:
    """trip_milestones, once per trip when a memo is given (a transfer's row and its trips'
    rows read the carrying trip's alike)."""
    if memo is None:
        return trip_milestones(data, t, trip, clock)
    if (found := memo.get(trip["trip_id"])) is None:
        found = memo[trip["trip_id"]] = trip_milestones(data, t, trip, clock)
    return found


def milestones(data: AuditData, transfer_id: str, clock: str = "device",
               memo: Memo | None = None) -> dict[str, str | None]:
    """A transfer's milestones. The crew's steps are those of the trip that carried the
    patient to the destination, each segment within one vehicle (NEMSIS times a responding
    unit): after a breakdown and a takeover, the takeover vehicle's steps are timed from
    its own dispatch (its trip opened; the first assignment went to the other vehicle).
    The response ends when the first vehicle reached the patient, whichever it was."""
    t = data.transfers.get(transfer_id) or {}
    trip = data.carrying_trip(transfer_id)
    # The first vehicle at the patient: (when, as written) of each trip's arrival.
    arrivals = [(when, a) for x in data.trips_of_transfer(transfer_id)
                if (when := ts(a := _at(x.get("s_at_pickup"), clock))) is not None]
    own = _of_trip(data, t, trip, clock, memo) if trip else dict.fromkeys(TRIP_MILESTONES)
    return {
        "requested": _at(t.get("request"), clock),
        "dispatched": _at(t.get("assigned"), clock),
        "first_at_pickup": min(arrivals)[1] if arrivals else None,
        **{name: own[name] for name in TRIP_MILESTONES},
        "unit_dispatched": own["unit_dispatched"] if trip else _at(t.get("assigned"), clock),
    }


@dataclass(frozen=True)
class Row:
    transfer_id: str
    day: str
    facility_id: str | None
    vehicle_id: str | None
    segments: dict[str, float | None]


@dataclass(frozen=True)
class TripRow:
    """One trip of a selected transfer: what its vehicle did. `dispatched` and `ended_short`
    say whether its 3 minutes have run out without it leaving (departure_rate)."""

    trip_id: str
    transfer_id: str
    vehicle_id: str | None
    segments: dict[str, float | None]
    dispatched: str | None
    ended_short: str | None


def rows(data: AuditData, clock: str = "device", day_from: str | None = None,
         day_to: str | None = None, memo: Memo | None = None) -> list[Row]:
    """One row per transfer requested in [day_from, day_to) (local days)."""
    out = []
    for tid, t in data.transfers.items():
        if not t.get("request"):
            continue
        day = t.get("day") or local_day(t["request"]["at"])
        if (day_from and day < day_from) or (day_to and day >= day_to):
            continue
        m = milestones(data, tid, clock, memo)
        segs = {name: seconds(m[a], m[b]) for name, a, b in SEGMENTS}
        carried = (data.carrying_trip(tid) or {}).get("vehicle_id")
        out.append(Row(tid, day, t.get("destination_id"), carried or t.get("vehicle_id"), segs))
    return out


def trip_rows(data: AuditData, selected: list[Row], clock: str = "device",
              memo: Memo | None = None) -> list[TripRow]:
    """Every trip of these transfers, the ones that did not carry the patient to the end
    too (aborted before pickup, taken off after it): each counts for its own vehicle."""
    out = []
    for r in selected:
        t = data.transfers[r.transfer_id]
        for trip in data.trips_of_transfer(r.transfer_id):
            m = _of_trip(data, t, trip, clock, memo)
            out.append(TripRow(trip["trip_id"], r.transfer_id, trip.get("vehicle_id"),
                               {name: seconds(m[a], m[b]) for name, a, b in TRIP_SEGMENTS},
                               m["unit_dispatched"], m["ended_short"]))
    return out


def summarize(values: Iterable[float | None]) -> dict[str, Any]:
    good = [v for v in values if v is not None and v >= 0]
    negative = sum(1 for v in values if v is not None and v < 0)
    return {"n": len(good), "negative": negative,
            "p50": percentile(good, 50), "p90": percentile(good, 90), "p95": percentile(good, 95)}


def _within_target(cases: Iterable[tuple[float | None, datetime | None, datetime]]) -> dict[str, Any]:
    """The share of cases done within 3 minutes. A case is (seconds it took, when it began,
    when it stopped waiting): one not done yet, or never (it ended first), is a miss once
    it has waited 3 minutes and not counted before; one that took less than nothing (a
    phone's clock behind the server's) is counted apart, under `negative`, not as met."""
    met = missed = negative = 0
    for took, began, until in cases:
        if took is not None:
            negative, met, missed = ((negative + 1, met, missed) if took < 0 else
                                     (negative, met + 1, missed) if took <= TARGET_SECONDS else
                                     (negative, met, missed + 1))
        elif began is not None and until - began > timedelta(seconds=TARGET_SECONDS):
            missed += 1
    total = met + missed
    rate = met / total if total else None
    return {"within_seconds": TARGET_SECONDS, "target": TARGET_RATE, "counted": total, "met": met,
            "negative": negative, "rate": rate,
            # Nothing counted is no verdict, not a miss.
            "meets_target": None if rate is None else rate >= TARGET_RATE}


def dispatch_rate(data: AuditData, selected: list[Row], now: datetime) -> dict[str, Any]:
    """Share of requests given a vehicle within 3 minutes (the time a request waits for a
    free vehicle); a request cancelled while it waited stopped waiting then."""
    def case(r: Row) -> tuple[float | None, datetime | None, datetime]:
        t = data.transfers[r.transfer_id]
        cancelled = ts((t.get("cancelled") or {}).get("recorded_at"))
        requested = ts((t.get("request") or {}).get("recorded_at"))
        return r.segments["request_to_dispatch"], requested, cancelled or now
    return _within_target(case(r) for r in selected)


def departure_rate(trips: list[TripRow], now: datetime) -> dict[str, Any]:
    """The national 3分钟出车率: the share of vehicles dispatched that left (the crew's
    en_route step) within 3 minutes of their dispatch, one count per trip; a trip that
    ended before leaving (the transfer cancelled, the vehicle withdrawn) stopped then."""
    return _within_target((x.segments["dispatch_to_en_route"], ts(x.dispatched), ts(x.ended_short) or now)
                          for x in trips)


READS = ("transfers", "trips", "cycles", "swabs")  # the fact tables indicators() reads


def indicators(data: AuditData, now: datetime, clock: str = "device", day_from: str | None = None,
               day_to: str | None = None) -> dict[str, Any]:
    """Per day and facility, the transfers' segments; per vehicle, those of the transfers it
    carried to the end (request to dispatch, response, request to handover) and those of
    every trip it made (its own dispatch, crew steps, turnaround and swab), taken over or
    aborted ones too."""
    indexed = data.indexed()
    memo: Memo = {}
    selected = rows(indexed, clock, day_from, day_to, memo)
    trips = trip_rows(indexed, selected, clock, memo)

    def name_of(value: str | None) -> str:
        # A transfer with no vehicle or destination yet, and a return leg's destination
        # (dispatch's "origin"), are groups by name, not a "None" or a facility.
        return "unassigned" if value is None else "return_to_origin" if value == RETURN_TO_ORIGIN else value

    def figures(group: list[Row], its_trips: list[TripRow] | None = None) -> dict[str, Any]:
        segments = {name: summarize([r.segments[name] for r in group]) for name, _, _ in SEGMENTS}
        if its_trips is not None:  # a vehicle's: its trips' own segments
            segments |= {name: summarize([x.segments[name] for x in its_trips])
                         for name, _, _ in TRIP_SEGMENTS}
        return {"transfers": len(group), "segments": segments,
                "dispatch_within_3_min": dispatch_rate(indexed, group, now),
                **({"trips": len(its_trips), "departure_within_3_min": departure_rate(its_trips, now)}
                   if its_trips is not None else {})}

    def group(key: str) -> dict[str, Any]:
        groups: dict[str, list[Row]] = {}
        for r in selected:
            groups.setdefault(name_of(getattr(r, key)), []).append(r)
        return {k: figures(g) for k, g in sorted(groups.items())}

    carried: dict[str, list[Row]] = {}
    for r in selected:
        carried.setdefault(name_of(r.vehicle_id), []).append(r)
    made: dict[str, list[TripRow]] = {}
    for x in trips:
        made.setdefault(name_of(x.vehicle_id), []).append(x)
    by_vehicle = {v: figures(carried.get(v, []), made.get(v, [])) for v in sorted({*carried, *made})}
    overall = figures(selected)
    overall["departure_within_3_min"] = departure_rate(trips, now)
    return {
        "clock": clock, "from": day_from, "to": day_to, "unit": "seconds",
        "percentiles": "nearest rank",
        "transfers": len(selected), "trips": len(trips),
        "overall": {k: overall[k] for k in ("segments", "dispatch_within_3_min", "departure_within_3_min")},
        "by_day": group("day"), "by_facility": group("facility_id"), "by_vehicle": by_vehicle,
    }
