"""Indicators in the NEMSIS style: the segments of each transfer and of each vehicle's
turnaround, as p50 / p90 / p95 per day, facility and vehicle, and the share of transfers
dispatched within 3 minutes against the national target of 95%. Pure: no I/O.

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

DISPATCH_TARGET_SECONDS = 180
DISPATCH_TARGET_RATE = 0.95

# (segment, from milestone, to milestone); milestones are named in `milestones`.
SEGMENTS = (
    ("request_to_dispatch", "requested", "dispatched"),
    ("dispatch_to_en_route", "unit_dispatched", "en_route"),
    ("en_route_to_at_pickup", "en_route", "at_pickup"),
    ("at_pickup_to_at_destination", "at_pickup", "at_destination"),
    ("at_destination_to_handover", "at_destination", "handed_over"),
    ("response", "requested", "first_at_pickup"),
    ("request_to_handover", "requested", "handed_over"),
    ("vehicle_turnaround", "handed_over", "released"),
    ("swab_turnaround", "swab_collected", "swab_result"),
)


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


def milestones(data: AuditData, transfer_id: str, clock: str = "device") -> dict[str, str | None]:
    """A transfer's milestones. The crew's steps are those of the trip that carried the
    patient to the destination, each segment within one vehicle (NEMSIS times a responding
    unit): after a breakdown and a takeover, the takeover vehicle's steps are timed from
    its own dispatch (its trip opened; the first assignment went to the other vehicle).
    The response ends when the first vehicle reached the patient, whichever it was."""
    t = data.transfers.get(transfer_id) or {}
    trip = data.carrying_trip(transfer_id) or {}
    # The first vehicle at the patient: (when, as written) of each trip's arrival.
    arrivals = [(when, a) for x in data.trips_of_transfer(transfer_id)
                if (when := ts(a := _at(x.get("s_at_pickup"), clock))) is not None]
    # The trip's own cycle: a re-disinfection after a positive swab names the trip too.
    cycles = [c for c in data.cycles_of_trip(trip.get("trip_id") or "")
              if (c.get("opened") or {}).get("kind", "trip") == "trip"] if trip else []
    cycle = cycles[0] if cycles else {}
    swabs = data.swabs_of_cycle(cycle.get("cycle_id") or "") if cycle else []
    swab = swabs[0] if swabs else {}
    handed = trip.get("handover") or trip.get("s_handed_over")
    return {
        "requested": _at(t.get("request"), clock),
        "dispatched": _at(t.get("assigned"), clock),
        "unit_dispatched": _at(unit_dispatch(t, trip), clock),
        "en_route": _at(trip.get("s_en_route"), clock),
        "at_pickup": _at(trip.get("s_at_pickup"), clock),
        "first_at_pickup": min(arrivals)[1] if arrivals else None,
        "at_destination": _at(trip.get("s_at_destination"), clock),
        "handed_over": _at(handed, clock),
        "released": _at(cycle.get("released"), clock),
        "swab_collected": (swab.get("collected_at") if clock == "device"
                           else _at(swab.get("collected"), clock)),
        "swab_result": ((swab.get("result") or {}).get("reported_at") if clock == "device"
                        else _at(swab.get("result"), clock)),
    }


@dataclass(frozen=True)
class Row:
    transfer_id: str
    day: str
    facility_id: str | None
    vehicle_id: str | None
    segments: dict[str, float | None]


def rows(data: AuditData, clock: str = "device", day_from: str | None = None,
         day_to: str | None = None) -> list[Row]:
    """One row per transfer requested in [day_from, day_to) (local days)."""
    out = []
    for tid, t in data.transfers.items():
        if not t.get("request"):
            continue
        day = t.get("day") or local_day(t["request"]["at"])
        if (day_from and day < day_from) or (day_to and day >= day_to):
            continue
        m = milestones(data, tid, clock)
        segs = {name: seconds(m[a], m[b]) for name, a, b in SEGMENTS}
        carried = (data.carrying_trip(tid) or {}).get("vehicle_id")
        out.append(Row(tid, day, t.get("destination_id"), carried or t.get("vehicle_id"), segs))
    return out


def summarize(values: Iterable[float | None]) -> dict[str, Any]:
    good = [v for v in values if v is not None and v >= 0]
    negative = sum(1 for v in values if v is not None and v < 0)
    return {"n": len(good), "negative": negative,
            "p50": percentile(good, 50), "p90": percentile(good, 90), "p95": percentile(good, 95)}


def dispatch_rate(data: AuditData, selected: list[Row], now: datetime) -> dict[str, Any]:
    """Share of requests dispatched within 3 minutes. A request still waiting after 3
    minutes counts as a miss; one younger than that is not counted yet, nor one cancelled
    within them (a cancellation after them was a wait past the target)."""
    met = missed = 0
    for r in selected:
        took = r.segments["request_to_dispatch"]
        if took is not None:
            met, missed = (met + 1, missed) if took <= DISPATCH_TARGET_SECONDS else (met, missed + 1)
            continue
        t = data.transfers[r.transfer_id]
        requested = (t.get("request") or {}).get("recorded_at")
        until = datetime.fromisoformat(t["cancelled"]["recorded_at"]) if t.get("cancelled") else now
        waited = until - datetime.fromisoformat(requested) if requested else None
        if waited is not None and waited > timedelta(seconds=DISPATCH_TARGET_SECONDS):
            missed += 1
    total = met + missed
    rate = met / total if total else None
    return {"within_seconds": DISPATCH_TARGET_SECONDS, "target": DISPATCH_TARGET_RATE, "counted": total,
            "met": met, "rate": rate, "meets_target": rate is not None and rate >= DISPATCH_TARGET_RATE}


READS = ("transfers", "trips", "cycles", "swabs")  # the fact tables indicators() reads


def indicators(data: AuditData, now: datetime, clock: str = "device", day_from: str | None = None,
               day_to: str | None = None) -> dict[str, Any]:
    indexed = data.indexed()
    selected = rows(indexed, clock, day_from, day_to)

    def group(key: str) -> dict[str, Any]:
        groups: dict[str, list[Row]] = {}
        for r in selected:
            # A transfer with no vehicle or destination yet, and a return leg's destination
            # (dispatch's "origin"), are groups by name, not a "None" or a facility.
            value = getattr(r, key)
            name = ("unassigned" if value is None else
                    "return_to_origin" if value == RETURN_TO_ORIGIN else value)
            groups.setdefault(str(name), []).append(r)
        return {k: {"transfers": len(g),
                    "segments": {name: summarize([r.segments[name] for r in g]) for name, _, _ in SEGMENTS},
                    "dispatch_within_3_min": dispatch_rate(indexed, g, now)}
                for k, g in sorted(groups.items())}

    return {
        "clock": clock, "from": day_from, "to": day_to, "unit": "seconds",
        "percentiles": "nearest rank",
        "transfers": len(selected),
        "overall": {"segments": {name: summarize([r.segments[name] for r in selected])
                                 for name, _, _ in SEGMENTS},
                    "dispatch_within_3_min": dispatch_rate(indexed, selected, now)},
        "by_day": group("day"), "by_facility": group("facility_id"), "by_vehicle": group("vehicle_id"),
    }
