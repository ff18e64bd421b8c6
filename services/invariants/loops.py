"""Every loop closed or explicitly ended: transfers, trips, disinfection cycles, swabs and
exposure lists. What is still open is listed with its age and what it waits for; it only
counts as a failure past `max_open_age` (a simulation that drives everything home sets
it), or when nothing will close it any more: a trip left open after its transfer ended, a
completed trip whose vehicle never got a cycle, a queued transfer beside a free vehicle
that fits it (a vehicle takes the queue when it becomes free, R4; once the consumers have
caught up, nothing else will)."""

from __future__ import annotations

from datetime import datetime

from services.dispatch.domain import vehicle_needs
from services.invariants.history import Ev
from services.invariants.report import Check, Item
from services.invariants.rules import CycleRec, Fold


class _Ages:
    def __init__(self, now: datetime, max_open_age: float | None) -> None:
        self.now, self.max_open_age = now, max_open_age

    def age(self, since: Ev) -> float:
        return round((self.now - datetime.fromisoformat(since.recorded_at)).total_seconds(), 1)

    def still_open(self, check: Check, since: Ev, detail: str, rule: str | None = None,
                   **context: str | None) -> None:
        age = self.age(since)
        item = Item(f"open_{check.code.rstrip('s')}", f"{detail}, for {age:.0f} s", (since.ref(),), rule,
                    {**{k: v for k, v in context.items() if v is not None}, "age_s": age})
        if self.max_open_age is not None and age > self.max_open_age:
            check.add(item)
        else:
            check.add_open(item)


def loops(fold: Fold, now: datetime, max_open_age: float | None = None,
          settled_heads: dict[str, int] | None = None) -> list[Check]:
    ages = _Ages(now, max_open_age)
    heads = settled_heads or {}
    return [_transfers(fold, ages), _trips(fold, ages), _cycles(fold, ages, heads), _swabs(fold, ages),
            _exposures(fold, ages)]


def _transfers(fold: Fold, ages: _Ages) -> Check:
    check = Check("loops", "transfers", "every transfer cancelled, or handed over (and brought back or "
                  "admitted where R11 asks), or open with its age")
    closed_loops = {ev.payload["transfer_id"] for ev in fold.loops_closed}
    free = [(vid, v.as_vehicle(vid)) for vid, v in fold.vehicles.items() if v.free]
    for tid, t in fold.transfers.items():
        check.count("transfers")
        if t.status == "cancelled":
            check.count("cancelled")
        elif t.status == "handed_over" and (not t.return_required or tid in closed_loops):
            check.count("closed")
        elif t.status == "handed_over":
            asked = fold.return_requests.get(tid)
            ages.still_open(check, t.requested, f"transfer {tid} handed over, waiting for "
                            + (f"its return leg {asked.payload['return_transfer_id']}" if asked
                               else "a return request or an admission"), "R11", transfer_id=tid,
                            state="awaiting_return")
        else:
            needs = vehicle_needs(t.risk_category, t.condition)
            idle = next((vid for vid, v in free if v.fits(needs)), None) if t.status == "queued" else None
            if idle is not None:
                check.add(Item("waits_beside_free_vehicle", f"transfer {tid} queued for "
                               f"{ages.age(t.requested):.0f} s while vehicle {idle}, which fits it, is free",
                               (t.requested.ref(),), "R4", {"transfer_id": tid, "vehicle_id": idle}))
                continue
            ages.still_open(check, t.requested, f"transfer {tid} {t.status}", transfer_id=tid, state=t.status)
    return check


def _trips(fold: Fold, ages: _Ages) -> Check:
    check = Check("loops", "trips", "every trip completed or aborted, or open with its age")
    for trip_id, trip in fold.trips.items():
        check.count("trips")
        if trip.ended is not None:
            check.count("completed" if trip.completed else "aborted")
            continue
        transfer = fold.transfers.get(trip.transfer_id)
        if transfer is not None and transfer.ended is not None:
            check.add(Item("trip_left_open", f"trip {trip_id} of vehicle {trip.vehicle_id} still open, its "
                           f"transfer {trip.transfer_id} {transfer.status}",
                           (trip.opened.ref(), transfer.ended.ref()), None,
                           {"trip_id": trip_id, "vehicle_id": trip.vehicle_id}))
            continue
        ages.still_open(check, trip.opened, f"trip {trip_id} of vehicle {trip.vehicle_id} at "
                        f"{trip.last_step or 'opened'}", trip_id=trip_id, vehicle_id=trip.vehicle_id,
                        state=trip.last_step or "opened")
    return check


def next_step(c: CycleRec) -> str:
    if c.initial is None:
        return "initial_stage"
    if c.terminal is None:
        return "terminal_stage"
    if not c.swabs or c.result(c.last_sample) == "invalid":
        return "swab"
    return "lab_result"


def _cycles(fold: Fold, ages: _Ages, heads: dict[str, int]) -> Check:
    check = Check("loops", "cycles", "every completed trip has its cycle; every cycle released, "
                  "quarantined (its re-disinfection answers) or superseded, or open with what it waits for")
    has_cycle = {c.trip_id for c in fold.cycles.values() if c.kind == "trip"}
    for trip_id, trip in fold.trips.items():
        done = trip.completed
        settled = done is not None and done.position <= heads.get(done.store, done.position)
        if done is not None and settled and trip_id not in has_cycle:
            check.add(Item("trip_without_cycle", f"trip {trip_id} of vehicle {trip.vehicle_id} completed; "
                           "no disinfection cycle opened (一车一消)", (done.ref(),), "R2",
                           {"trip_id": trip_id, "vehicle_id": trip.vehicle_id}))
    for cid, c in fold.cycles.items():
        check.count("cycles")
        ended = "superseded" if c.superseded else "quarantined" if c.quarantined else \
            "released" if c.released else None
        if ended is not None:
            check.count(ended)
            continue
        step = next_step(c)
        ages.still_open(check, c.opened, f"{c.kind} cycle {cid} of vehicle {c.vehicle_id} waits for {step}",
                        cycle_id=cid, vehicle_id=c.vehicle_id, state=step)
    return check


def _swabs(fold: Fold, ages: _Ages) -> Check:
    check = Check("loops", "swabs", "every surface swab's result back, or pending with its age")
    for c in fold.cycles.values():
        for sid, swab in c.swabs.items():
            check.count("swabs")
            if swab.result is not None:
                check.count(swab.result.payload["result"])
            else:
                ages.still_open(check, swab.collected, f"sample {sid} of vehicle {c.vehicle_id} waits for "
                                "the lab", "R14", sample_id=sid, vehicle_id=c.vehicle_id)
    return check


def _exposures(fold: Fold, ages: _Ages) -> Check:
    check = Check("loops", "exposures", "every exposure list acknowledged by a dispatcher, or open")
    for sid, last in fold.exposures.items():
        check.count("lists")
        if last.type == "ExposureListAcknowledged":
            check.count("acknowledged")
        else:
            ages.still_open(check, last, f"exposure list of vehicle {last.payload['vehicle_id']} (positive "
                            f"sample {sid}) not acknowledged", "R9", sample_id=sid)
    return check
