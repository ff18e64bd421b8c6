"""What the system refuses, checked again from the events alone.

Each command the services refuse (DOMAIN.md's rules R1-R14 with a 409 or a 422 naming the
rule, and the state machines around them) leaves a shape that must never appear in the
stores. `Fold` reads every store once, in position order, keeping the little state each
stream needs: a vehicle's reservation, disinfection wait and quarantine; a transfer's
status; a trip's steps; a cycle's stages, swabs and release. What can only be judged
across stores (an override in the same commit, a release in another service) is settled
in `finish`. The state machines are restated here, not borrowed from the aggregates, so a
fold bug on the command side shows up as a finding instead of being shared; what the
rules *are* (which vehicle may carry whom, who a person is, a disinfection protocol's
arithmetic) comes from the domain, which defines them.

Not here: R4, R6, R7 are decisions the system makes, not commands it refuses (the audit's
findings judge them, services/projection/findings.py); R13 and R14 are SLAs that are
flagged, not refused; R11's open loops are in loops.py.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from libs.events.aggregate import DomainError
from services.disinfection.domain import StageRecord
from services.disinfection.protocols import AFTER_NEGATIVE_RESULT, AIR, Protocol, Rules, Treatment
from services.dispatch.domain import LIVE, Vehicle, patient_key, vehicle_needs
from services.invariants.history import Ev
from services.invariants.report import Check, Item

# code -> (rule, what it means when found)
RULE_CHECKS: dict[str, tuple[str | None, str]] = {
    "vehicle_reserved_twice": ("R1", "a vehicle reserved while it still held another transfer"),
    "assigned_without_reservation": ("R1", "a transfer given a vehicle whose own stream did not take it"),
    "two_patients_aboard": ("R1", "a second patient aboard a vehicle before its trip ended"),
    "r1_overridden": ("R1", "an override of R1, which has none"),
    "reserved_before_release": ("R2", "reserved while awaiting disinfection, no supervisor's override"),
    "returned_without_release": ("R2", "back in service with no disinfection release of that trip"),
    "early_release_not_supervisor": ("R2", "a cycle released early by someone who is not a supervisor"),
    "aborted_with_patient_aboard": ("R2", "a trip aborted with the patient aboard: no disinfection follows"),
    "dedicated_pool_required": ("R3", "a risk transfer in a vehicle outside the dedicated pool, no override"),
    "negative_pressure_required": ("R5", "no negative-pressure ambulance where R5 needs one, no override"),
    "life_support_required": (None, "a critical patient in a vehicle without life support, no override"),
    "terminal_before_initial": ("R8", "a terminal stage with no initial stage before it"),
    "stage_logged_twice": ("R8", "a cycle's initial or terminal stage logged twice"),
    "stage_below_protocol": ("R8", "a stage below its protocol, outside its footage, or over the initial"),
    "stage_before_trip_ended": ("R8", "a first stage begun before its handover or its positive result"),
    "swab_before_terminal": ("R8", "a surface swab before the terminal stage"),
    "released_without_both_stages": ("R8", "released by policy without both stages"),
    "released_without_swab": ("R9", "released by policy with no surface swab"),
    "released_without_negative_result": ("R9", "released before the negative result its policy needs"),
    "positive_not_quarantined": ("R9", "a positive swab that did not quarantine the vehicle at once"),
    "used_while_quarantined": ("R9", "a quarantined vehicle reserved or put back on duty"),
    "quarantine_released_early": ("R9", "a quarantine ended other than by its re-disinfection"),
    "lifted_without_release": ("R9", "dispatch lifted a quarantine that no re-disinfection released"),
    "not_reported": ("R10", "a transfer requested and never reported (报备)"),
    "direct_call_not_reported_by_120": ("R10", "a direct 120 call reported by someone other than 120"),
    "return_before_handover": ("R11", "a return leg or an admission before the patient was handed over"),
    "loop_closed_without_return": ("R11", "a loop closed as returned with no return leg handed over"),
    "trip_without_request": ("R12", "a trip of a transfer nobody requested: the ledger cannot name who rode"),
    "second_live_transfer": (None, "a person given a second live transfer"),
    "transfer_not_assignable": (None, "a vehicle assigned to a transfer that was not waiting for one"),
    "transfer_closed": (None, "a transfer cancelled or redirected after it ended, or cancelled with the "
                              "patient aboard"),
    "vehicle_not_available": (None, "reserved while off duty or out of service, or off duty on a transfer"),
    "step_without_patient": (None, "arrival or handover reported before the patient was aboard"),
    "trip_ended_twice": (None, "a trip completed or aborted twice"),
    "cycle_closed": (None, "a stage or swab on a cycle already released, quarantined or superseded"),
    "swab_not_needed": (None, "a second swab for a cycle whose first was not invalid"),
    "sample_reused": (None, "one sample id collected twice"),
    "result_out_of_place": (None, "a result for a sample the cycle did not collect, or a second one"),
    "released_twice": (None, "one cycle released twice"),
}
UNMET_CODES = {"R3": "dedicated_pool_required", "R5": "negative_pressure_required",
               "life_support": "life_support_required"}
SUPERVISOR = "supervisor"
REDISINFECTION = "redisinfection"


@dataclass
class VehicleRec:
    kind: str = ""
    dedicated_pool: bool = True
    life_support: bool = False
    status: str = "available"  # available | assigned | awaiting | out_of_service | off_duty
    holding: Ev | None = None  # the reservation it carries out
    awaiting: dict[str, Ev] = field(default_factory=dict)  # trip -> VehicleAwaitingDisinfection
    # Apart from the status: whatever the status does, only a re-disinfection lifts it.
    quarantined: Ev | None = None

    @property
    def free(self) -> bool:
        return self.status == "available" and self.quarantined is None

    def as_vehicle(self, vid: str) -> Vehicle:
        """The domain's vehicle, for what it says of who it may carry (R3, R5, life support)."""
        return Vehicle(id=vid, kind=self.kind, dedicated_pool=self.dedicated_pool,
                       life_support=self.life_support)


@dataclass
class TransferRec:
    requested: Ev
    key: str | None
    return_required: bool
    channel: str | None
    risk_category: str
    condition: dict[str, Any]
    status: str = "requested"
    reported: Ev | None = None
    ended: Ev | None = None  # TransferCancelled or TransferHandedOver
    loop_closed: Ev | None = None  # LoopClosed, from the transfer service


@dataclass
class TripRec:
    opened: Ev
    transfer_id: str
    vehicle_id: str
    aboard: Ev | None = None
    handed_over: Ev | None = None
    completed: Ev | None = None
    aborted: Ev | None = None
    last_step: str | None = None

    @property
    def ended(self) -> Ev | None:
        return self.completed or self.aborted


@dataclass
class SwabRec:
    collected: Ev
    result: Ev | None = None


@dataclass
class CycleRec:
    opened: Ev
    kind: str
    vehicle_id: str
    trip_id: str
    initial: Ev | None = None
    initial_ended_at: str | None = None  # where a terminal stage may start
    # Where the first stage may start: the handover that ended the trip (CycleOpened's
    # trip_ended_at), or a re-disinfection's positive result (its opened_at).
    bound: str | None = None
    terminal: Ev | None = None
    swabs: dict[str, SwabRec] = field(default_factory=dict)
    last_sample: str | None = None
    released: Ev | None = None
    quarantined: Ev | None = None
    superseded: Ev | None = None

    def result(self, sample_id: str | None) -> str | None:
        swab = self.swabs.get(sample_id or "")
        return swab.result.payload.get("result") if swab and swab.result else None

    @property
    def closed(self) -> str | None:
        """Why the cycle takes no more stages or swabs, if it does not."""
        if self.superseded:
            return "superseded"
        if self.quarantined:
            return "quarantined"
        if self.released and self.result(self.last_sample) == "negative":
            return "closed"
        return None


def stage_problem(stage: dict[str, Any], initial_ended_at: str | None = None) -> str | None:
    """What the domain would have refused in this logged stage, judged against the protocol the
    stage records it was held to (protocols are configurable and change over time)."""
    try:
        video = stage["video"]
        air = stage.get("air")
        surface = {stage["disinfectant"]: Protocol(**stage["protocol"])}
        record = StageRecord(
            stage=stage["stage"], disinfectant=stage["disinfectant"],
            concentration_mg_per_l=float(stage["concentration_mg_per_l"]), method=stage["method"],
            started_at=datetime.fromisoformat(stage["started_at"]),
            ended_at=datetime.fromisoformat(stage["ended_at"]), operator=stage["operator"],
            location=stage["location"], camera_id=video["camera_id"], clip_ref=video["clip_ref"],
            video_from=datetime.fromisoformat(video["from"]), video_to=datetime.fromisoformat(video["to"]),
            air=Treatment(AIR, air["disinfectant"], float(air["concentration_mg_per_l"]), air["method"],
                          datetime.fromisoformat(air["started_at"]), datetime.fromisoformat(air["ended_at"]),
                          air.get("dose_ml_per_m3")) if air else None)
        record.check(Rules(surface=surface,
                           air={air["disinfectant"]: Protocol(**air["protocol"])} if air else {}))
    except DomainError as refused:
        return refused.detail
    except (KeyError, TypeError, ValueError) as exc:
        return f"the stage record is incomplete: {exc!r}"
    started = datetime.fromisoformat(stage["started_at"])
    if initial_ended_at and started < datetime.fromisoformat(initial_ended_at):
        return f"the terminal stage starts before the initial stage ended ({initial_ended_at})"
    return None


def started_before(stage: dict[str, Any], bound: str | None) -> str | None:
    """R8 in time: a first stage (its air treatment included) begun before the cycle's bound,
    beyond the clocks' tolerance the domain allows."""
    try:
        starts = [datetime.fromisoformat(stage["started_at"])]
        if stage.get("air"):
            starts.append(datetime.fromisoformat(stage["air"]["started_at"]))
        if bound is None or min(starts) >= datetime.fromisoformat(bound) - Rules().stage_clock_tolerance:
            return None
    except (KeyError, TypeError, ValueError):
        return None  # an incomplete record is stage_below_protocol's to name
    return f"the first stage starts at {min(starts).isoformat()}, before {bound}"


class Fold:
    """Every store's events, in each store's position order (stores one after another)."""

    def __init__(self) -> None:
        self.checks = {code: Check("rules", code, summary, rule)
                       for code, (rule, summary) in RULE_CHECKS.items()}
        self.vehicles: dict[str, VehicleRec] = defaultdict(VehicleRec)
        self.transfers: dict[str, TransferRec] = {}
        self.live_by_person: dict[str, set[str]] = defaultdict(set)
        self.trips: dict[str, TripRec] = {}
        self.return_requests: dict[str, Ev] = {}  # outbound transfer -> ReturnRequested
        self.loops_closed: list[Ev] = []
        self.cycles: dict[str, CycleRec] = {}
        self.samples: set[str] = set()
        self.exposures: dict[str, Ev] = {}  # sample -> the list's last event
        # Settled in finish(): they need another stream of the commit, or another store.
        self.overrides: dict[tuple[str, str, str], list[Ev]] = defaultdict(list)
        self.reservations: dict[tuple[str, str], set[str]] = defaultdict(set)
        self.assignments: list[tuple[Ev, list[str]]] = []  # with the rules the vehicle did not meet
        self.reserved_awaiting: list[Ev] = []
        self.returned: list[Ev] = []
        self.positives: list[tuple[CycleRec, Ev]] = []
        self._handlers: dict[str, Callable[[Ev], None]] = {
            name[4:]: getattr(self, name) for name in dir(self) if name.startswith("_on_")}

    def feed(self, ev: Ev) -> None:
        handler = self._handlers.get(ev.type)
        if handler is not None:
            handler(ev)

    def flag(self, code: str, detail: str, *evs: Ev | None, **context: Any) -> None:
        check = self.checks[code]
        check.add(Item(code, detail, tuple(e.ref() for e in evs if e is not None), check.rule,
                       {k: v for k, v in context.items() if v is not None}))

    # -- dispatch: vehicles ------------------------------------------------------------

    def _on_VehicleRegistered(self, ev: Ev) -> None:
        v, p = self.vehicles[ev.payload["vehicle_id"]], ev.payload
        v.kind, v.dedicated_pool, v.life_support = p["kind"], p["dedicated_pool"], p["life_support"]

    def _on_VehicleReserved(self, ev: Ev) -> None:
        vid, tid = ev.payload["vehicle_id"], ev.payload["transfer_id"]
        v = self.vehicles[vid]
        if v.quarantined is not None:
            self.flag("used_while_quarantined", f"vehicle {vid} reserved for {tid} while quarantined",
                      v.quarantined, ev, vehicle_id=vid, transfer_id=tid)
        elif v.status == "assigned":
            held = v.holding.payload["transfer_id"] if v.holding else "?"
            self.flag("vehicle_reserved_twice", f"vehicle {vid} reserved for {tid} while carrying {held}",
                      v.holding, ev, vehicle_id=vid, transfer_id=tid)
        elif v.status == "awaiting":
            self.reserved_awaiting.append(ev.keep("vehicle_id", "transfer_id"))
        elif v.status != "available":
            self.flag("vehicle_not_available", f"vehicle {vid} reserved for {tid} while {v.status}",
                      ev, vehicle_id=vid, transfer_id=tid)
        v.status, v.holding = "assigned", ev.keep("vehicle_id", "transfer_id")
        self.reservations[(vid, tid)].add(ev.recorded_at)

    def _on_VehicleStoodDown(self, ev: Ev) -> None:
        v = self.vehicles[ev.payload["vehicle_id"]]
        v.holding = None
        if v.status == "assigned":
            v.status = "awaiting" if v.awaiting else "available"

    def _on_VehicleAwaitingDisinfection(self, ev: Ev) -> None:
        v = self.vehicles[ev.payload["vehicle_id"]]
        if v.status in ("assigned", "available"):
            v.status = "awaiting"
        v.holding = None
        v.awaiting[ev.payload["trip_id"]] = ev.keep()

    def _on_VehicleReturnedToService(self, ev: Ev) -> None:
        v = self.vehicles[ev.payload["vehicle_id"]]
        self.returned.append(ev.keep("vehicle_id", "trip_id", "cycle_id", "quarantine_lifted"))
        if ev.payload.get("quarantine_lifted"):
            v.status, v.quarantined = "available", None
            v.awaiting.clear()
            return
        v.awaiting.pop(ev.payload["trip_id"], None)
        if not v.awaiting and v.status == "awaiting":
            v.status = "available"

    def _on_VehicleTakenOutOfService(self, ev: Ev) -> None:
        v = self.vehicles[ev.payload["vehicle_id"]]
        v.status = "out_of_service"
        if ev.payload.get("rule") == "R9":
            v.quarantined = ev.keep()

    def _on_VehicleDutyChanged(self, ev: Ev) -> None:
        vid = ev.payload["vehicle_id"]
        v = self.vehicles[vid]
        if not ev.payload["on_duty"]:
            if v.status == "assigned":
                self.flag("vehicle_not_available", f"vehicle {vid} taken off duty while on a transfer",
                          v.holding, ev, vehicle_id=vid)
            v.status = "off_duty"
            return
        if v.quarantined is not None:
            self.flag("used_while_quarantined", f"vehicle {vid} put back on duty while quarantined",
                      v.quarantined, ev, vehicle_id=vid)
        if v.status in ("off_duty", "out_of_service"):
            v.status = "awaiting" if v.awaiting else "available"

    # -- dispatch: transfers ------------------------------------------------------------

    def _on_TransferRequested(self, ev: Ev) -> None:
        p = ev.payload
        tid, key = p["transfer_id"], patient_key(p.get("patient") or {})
        # R11: an outpatient visit returns, whatever the request said.
        returns = bool(p.get("return_required")) or p.get("purpose") == "outpatient_visit"
        self.transfers[tid] = TransferRec(
            ev.keep("transfer_id"), key, returns,
            (p.get("requested_by") or {}).get("channel"), p.get("risk_category", ""),
            p.get("condition") or {})
        if key is None:
            return
        live = self.live_by_person[key]
        # A return leg belongs to the outbound transfer of the same person, which has ended.
        if live and p.get("return_of") is None:
            other = self.transfers[sorted(live)[0]]
            self.flag("second_live_transfer",
                      f"transfer {tid} requested for a person whose transfer "
                      f"{other.requested.payload['transfer_id']} was still {other.status}",
                      other.requested, ev, transfer_id=tid)
        live.add(tid)

    def _transfer(self, ev: Ev) -> TransferRec | None:
        return self.transfers.get(ev.payload.get("transfer_id") or "")

    def _end(self, t: TransferRec, ev: Ev, status: str) -> None:
        t.status, t.ended = status, ev.keep("transfer_id")
        if t.key is not None:
            self.live_by_person[t.key].discard(ev.payload["transfer_id"])

    def _on_TransferQueued(self, ev: Ev) -> None:
        if (t := self._transfer(ev)) is not None:
            t.status = "queued"

    def _on_VehicleAssigned(self, ev: Ev) -> None:
        t = self._transfer(ev)
        vid = ev.payload["vehicle_id"]
        if t is None:
            return  # no request: trip_without_request names it, from its trip
        if t.status not in ("requested", "queued"):
            self.flag("transfer_not_assignable", f"transfer {ev.payload['transfer_id']} assigned {vid} "
                      f"while {t.status}", t.ended, ev, transfer_id=ev.payload["transfer_id"], vehicle_id=vid)
        t.status = "assigned"
        unmet = self.vehicles[vid].as_vehicle(vid).unmet(vehicle_needs(t.risk_category, t.condition))
        self.assignments.append((ev.keep("transfer_id", "vehicle_id"), [u.rule for u in unmet]))

    def _on_RuleOverridden(self, ev: Ev) -> None:
        p = ev.payload
        self.overrides[(p["transfer_id"], p.get("vehicle_id") or "", p["rule"])].append(
            ev.keep("reason"))
        if p["rule"] == "R1":
            self.flag("r1_overridden", f"R1 overridden on transfer {p['transfer_id']}: {p.get('reason')}",
                      ev, transfer_id=p["transfer_id"], vehicle_id=p.get("vehicle_id"))

    def _on_VehicleWithdrawn(self, ev: Ev) -> None:
        if (t := self._transfer(ev)) is not None:
            t.status = "requested"

    def _on_TransferPickedUp(self, ev: Ev) -> None:
        if (t := self._transfer(ev)) is not None:
            t.status = "picked_up"

    def _must_be_live(self, ev: Ev, what: str) -> TransferRec | None:
        t = self._transfer(ev)
        if t is not None and t.status not in LIVE:
            self.flag("transfer_closed", f"transfer {ev.payload['transfer_id']} {what} while {t.status}",
                      t.ended, ev, transfer_id=ev.payload["transfer_id"])
        return t

    def _on_TransferRedirected(self, ev: Ev) -> None:
        t = self._must_be_live(ev, "redirected")
        if t is not None and ev.payload.get("condition") is not None:
            t.condition = ev.payload["condition"]  # what the next assignment's needs follow

    def _on_TransferReprioritized(self, ev: Ev) -> None:
        self._must_be_live(ev, "reprioritised")

    def _on_TransferCancelled(self, ev: Ev) -> None:
        if (t := self._transfer(ev)) is None:
            return
        if t.status == "picked_up":  # the crew aborts or hands over instead
            self.flag("transfer_closed", f"transfer {ev.payload['transfer_id']} cancelled with the patient "
                      "aboard", ev, transfer_id=ev.payload["transfer_id"])
        else:
            self._must_be_live(ev, "cancelled")
        self._end(t, ev, "cancelled")

    def _on_TransferHandedOver(self, ev: Ev) -> None:
        if (t := self._transfer(ev)) is not None:
            self._end(t, ev, "handed_over")

    def _on_TransferReported(self, ev: Ev) -> None:
        if (t := self._transfer(ev)) is not None:
            t.reported = ev.keep("reported_by")

    # -- transfer: trips ----------------------------------------------------------------

    def _on_TripOpened(self, ev: Ev) -> None:
        p = ev.payload
        self.trips[p["trip_id"]] = TripRec(ev.keep("trip_id"), p["transfer_id"], p["vehicle_id"])

    def _trip(self, ev: Ev) -> TripRec | None:
        return self.trips.get(ev.payload.get("trip_id") or "")

    def _on_TripStepReported(self, ev: Ev) -> None:
        trip, step = self._trip(ev), ev.payload["step"]
        if trip is None:
            return
        if step == "patient_aboard" and trip.aboard is None:
            trip.aboard = ev.keep()
        elif step in ("at_destination", "handed_over") and trip.aboard is None:
            self.flag("step_without_patient", f"trip {ev.payload['trip_id']}: {step} before patient_aboard",
                      ev, trip_id=ev.payload["trip_id"])
        if not ev.payload.get("late"):
            trip.last_step = step

    def _on_PatientHandedOver(self, ev: Ev) -> None:
        if (trip := self._trip(ev)) is None:
            return
        if trip.aboard is None:
            self.flag("step_without_patient", f"trip {ev.payload['trip_id']} handed over a patient never "
                      "aboard", ev, trip_id=ev.payload["trip_id"])
        trip.handed_over = trip.handed_over or ev.keep()

    def _trip_end(self, ev: Ev) -> TripRec | None:
        trip = self._trip(ev)
        if trip is not None and trip.ended is not None:
            self.flag("trip_ended_twice", f"trip {ev.payload['trip_id']} ended again ({ev.type})",
                      trip.ended, ev, trip_id=ev.payload["trip_id"])
        return trip

    def _on_TripCompleted(self, ev: Ev) -> None:
        if (trip := self._trip_end(ev)) is not None:
            trip.completed = trip.completed or ev.keep()

    def _on_TripAborted(self, ev: Ev) -> None:
        if (trip := self._trip_end(ev)) is None:
            return
        if trip.aboard is not None:
            self.flag("aborted_with_patient_aboard", f"trip {ev.payload['trip_id']} of vehicle "
                      f"{trip.vehicle_id} aborted after the patient was aboard", trip.aboard, ev,
                      trip_id=ev.payload["trip_id"], vehicle_id=trip.vehicle_id)
        trip.aborted = trip.aborted or ev.keep()

    def _after_handover(self, ev: Ev, what: str) -> None:
        trip = self._trip(ev)
        if trip is not None and trip.handed_over is None:
            self.flag("return_before_handover", f"trip {ev.payload['trip_id']}: {what} before the handover",
                      ev, trip_id=ev.payload["trip_id"], transfer_id=ev.payload.get("transfer_id"))

    def _on_ReturnRequested(self, ev: Ev) -> None:
        self._after_handover(ev, "return leg requested")
        self.return_requests.setdefault(ev.payload["transfer_id"], ev.keep("return_transfer_id"))

    def _on_PatientAdmitted(self, ev: Ev) -> None:
        self._after_handover(ev, "admission")

    def _on_LoopClosed(self, ev: Ev) -> None:
        self.loops_closed.append(ev.keep("transfer_id", "how", "return_transfer_id"))

    # -- disinfection: cycles, swabs, release -----------------------------------------------

    def _on_CycleOpened(self, ev: Ev) -> None:
        p = ev.payload
        kind = p.get("kind") or "trip"
        bound = p.get("trip_ended_at") if kind == "trip" else p.get("opened_at")
        self.cycles[p["cycle_id"]] = CycleRec(ev.keep("cycle_id"), kind, p["vehicle_id"], p["trip_id"],
                                              bound=bound)

    def _cycle(self, ev: Ev, what: str) -> CycleRec | None:
        """The cycle, when it still takes stages or swabs (it is flagged when it does not)."""
        c = self.cycles.get(ev.payload["cycle_id"])
        if c is None:
            return None
        why = c.closed or ("released" if c.released and what == "stage" else None)
        if why:
            self.flag("cycle_closed", f"cycle {ev.payload['cycle_id']}: {ev.type} after it was {why}",
                      c.released or c.quarantined or c.superseded, ev, cycle_id=ev.payload["cycle_id"])
        return c

    def _stage(self, ev: Ev, c: CycleRec, logged: Ev | None, initial_ended_at: str | None) -> None:
        cid = ev.payload["cycle_id"]
        if logged is not None:
            self.flag("stage_logged_twice", f"cycle {cid}: {ev.type} logged twice", logged, ev, cycle_id=cid)
        problem = stage_problem(ev.payload.get("stage") or {}, initial_ended_at)
        if problem:
            self.flag("stage_below_protocol", f"cycle {cid}: {problem}", ev, cycle_id=cid,
                      vehicle_id=c.vehicle_id)

    def _on_InitialDisinfectionLogged(self, ev: Ev) -> None:
        if (c := self._cycle(ev, "stage")) is not None:
            self._stage(ev, c, c.initial, None)
            early = started_before(ev.payload.get("stage") or {}, c.bound)
            if early:
                self.flag("stage_before_trip_ended", f"cycle {ev.payload['cycle_id']}: {early}", c.opened, ev,
                          cycle_id=ev.payload["cycle_id"], vehicle_id=c.vehicle_id)
            if c.initial is None:
                c.initial, c.initial_ended_at = ev.keep(), (ev.payload.get("stage") or {}).get("ended_at")

    def _on_TerminalDisinfectionLogged(self, ev: Ev) -> None:
        if (c := self._cycle(ev, "stage")) is None:
            return
        if c.initial is None:
            self.flag("terminal_before_initial", f"cycle {ev.payload['cycle_id']}: terminal stage with no "
                      "initial stage", ev, cycle_id=ev.payload["cycle_id"], vehicle_id=c.vehicle_id)
        self._stage(ev, c, c.terminal, c.initial_ended_at)
        c.terminal = c.terminal or ev.keep()

    def _on_SurfaceSwabCollected(self, ev: Ev) -> None:
        sid, cid = ev.payload["sample_id"], ev.payload["cycle_id"]
        if sid in self.samples:
            self.flag("sample_reused", f"sample {sid} collected again (cycle {cid})", ev, sample_id=sid)
        self.samples.add(sid)
        if (c := self._cycle(ev, "swab")) is None:
            return
        if c.terminal is None:
            self.flag("swab_before_terminal", f"cycle {cid}: swab {sid} before the terminal stage", ev,
                      cycle_id=cid, vehicle_id=c.vehicle_id)
        last = c.swabs.get(c.last_sample or "")
        if last is not None and c.result(c.last_sample) != "invalid":
            self.flag("swab_not_needed", f"cycle {cid}: swab {sid} while sample {c.last_sample} stood",
                      last.collected, ev, cycle_id=cid)
        c.swabs[sid], c.last_sample = SwabRec(ev.keep("sample_id")), sid

    def _on_SwabResultRecorded(self, ev: Ev) -> None:
        c = self.cycles.get(ev.payload["cycle_id"])
        sid = ev.payload["sample_id"]
        swab = c.swabs.get(sid) if c else None
        if c is None or swab is None or swab.result is not None:
            self.flag("result_out_of_place", f"result {ev.payload['result']} for sample {sid} "
                      + ("of no swab of this cycle" if swab is None else "recorded before"),
                      swab.result if swab else None, ev, sample_id=sid)
            return
        swab.result = ev.keep("result", "sample_id", "cycle_id")
        if ev.payload["result"] == "positive":
            self.positives.append((c, swab.result))

    def _on_VehicleReleased(self, ev: Ev) -> None:
        p = ev.payload
        cid = p["cycle_id"]
        c = self.cycles.get(cid)
        if c is None:
            return
        if c.released is not None:
            self.flag("released_twice", f"cycle {cid} released again", c.released, ev, cycle_id=cid)
        quarantine = c.kind == REDISINFECTION or c.quarantined or c.superseded
        if p.get("override"):
            if ev.role != SUPERVISOR:
                self.flag("early_release_not_supervisor", f"cycle {cid} released early by {ev.actor} "
                          f"({ev.role})", ev, cycle_id=cid, vehicle_id=c.vehicle_id)
            if quarantine:
                self.flag("quarantine_released_early", f"cycle {cid} ({c.kind}) released early by "
                          f"{ev.actor}", c.quarantined, ev, cycle_id=cid, vehicle_id=c.vehicle_id)
        else:
            self._release_by_policy(ev, c)
        c.released = c.released or ev.keep("quarantine_lifted")

    def _release_by_policy(self, ev: Ev, c: CycleRec) -> None:
        cid, vid = ev.payload["cycle_id"], c.vehicle_id
        if c.quarantined or c.superseded:
            self.flag("quarantine_released_early", f"cycle {cid} released after it was "
                      f"{'quarantined' if c.quarantined else 'superseded'}",
                      c.quarantined or c.superseded, ev, cycle_id=cid, vehicle_id=vid)
        missing = [n for n, e in (("initial", c.initial), ("terminal", c.terminal)) if e is None]
        if missing:
            self.flag("released_without_both_stages", f"cycle {cid} released without the "
                      f"{' and '.join(missing)} stage", ev, cycle_id=cid, vehicle_id=vid)
        if not c.swabs:
            self.flag("released_without_swab", f"cycle {cid} released with no surface swab", ev,
                      cycle_id=cid, vehicle_id=vid)
        # The policy the release names is the one configured then (a re-disinfection's is
        # after_negative_result unless configured otherwise).
        elif ev.payload.get("policy") == AFTER_NEGATIVE_RESULT and \
                not any(s.result and s.result.payload["result"] == "negative" for s in c.swabs.values()):
            self.flag("released_without_negative_result", f"cycle {cid} ({c.kind}) released under "
                      f"{ev.payload.get('policy')} with no negative result", ev, cycle_id=cid, vehicle_id=vid)

    def _on_VehicleQuarantined(self, ev: Ev) -> None:
        if (c := self.cycles.get(ev.payload["cycle_id"])) is not None:
            c.quarantined = c.quarantined or ev.keep()

    def _on_CycleSuperseded(self, ev: Ev) -> None:
        if (c := self.cycles.get(ev.payload["cycle_id"])) is not None:
            c.superseded = c.superseded or ev.keep()

    def _on_ExposureListProduced(self, ev: Ev) -> None:
        self.exposures[ev.payload["sample_id"]] = ev.keep("vehicle_id")

    _on_ExposureListAmended = _on_ExposureListProduced
    _on_ExposureListAcknowledged = _on_ExposureListProduced

    # -- across streams and stores ---------------------------------------------------------

    def finish(self) -> list[Check]:
        self._overrides_in_commit()
        self._one_patient_at_a_time()
        self._releases_behind_returns()
        for cycle, result in self.positives:
            if cycle.quarantined is None or cycle.quarantined.recorded_at != result.recorded_at:
                self.flag("positive_not_quarantined", f"sample {result.payload['sample_id']} positive, "
                          f"vehicle {cycle.vehicle_id} not quarantined with it", result,
                          vehicle_id=cycle.vehicle_id, cycle_id=result.payload["cycle_id"])
        for tid, t in self.transfers.items():
            if t.reported is None:
                self.flag("not_reported", f"transfer {tid} never reported", t.requested, transfer_id=tid)
            elif t.channel == "direct_call" and t.reported.payload.get("reported_by") != "120":
                self.flag("direct_call_not_reported_by_120", f"transfer {tid} (a direct call) reported by "
                          f"{t.reported.payload.get('reported_by')}", t.reported, transfer_id=tid)
        handed_over = {trip.transfer_id for trip in self.trips.values() if trip.handed_over}
        for ev in self.loops_closed:
            p = ev.payload
            if p["how"] == "returned" and p.get("return_transfer_id") not in handed_over:
                self.flag("loop_closed_without_return", f"loop of {p['transfer_id']} closed as returned; "
                          f"return leg {p.get('return_transfer_id')} never handed over", ev,
                          transfer_id=p["transfer_id"])
        for trip_id, trip in self.trips.items():
            if trip.transfer_id not in self.transfers:
                self.flag("trip_without_request", f"trip {trip_id} of vehicle {trip.vehicle_id} for "
                          f"transfer {trip.transfer_id}, never requested", trip.opened, trip_id=trip_id,
                          vehicle_id=trip.vehicle_id)
        return list(self.checks.values())

    def _overrides_in_commit(self) -> None:
        """An override is an event of the assignment's own commit (same recorded_at)."""
        def override(ev: Ev, rule: str) -> Ev | None:
            p = ev.payload
            return next((o for o in self.overrides[(p["transfer_id"], p["vehicle_id"], rule)]
                         if o.recorded_at == ev.recorded_at), None)

        for ev in self.reserved_awaiting:
            o = override(ev, "R2")
            if o is None or o.role != SUPERVISOR:
                self.flag("reserved_before_release", f"vehicle {ev.payload['vehicle_id']} reserved for "
                          f"{ev.payload['transfer_id']} while awaiting disinfection"
                          + (f"; overridden by {o.actor} ({o.role}), not a supervisor" if o else ""),
                          ev, o, vehicle_id=ev.payload["vehicle_id"], transfer_id=ev.payload["transfer_id"])
        for ev, unmet in self.assignments:
            p = ev.payload
            if (p["vehicle_id"], p["transfer_id"]) not in self.reservations or \
                    ev.recorded_at not in self.reservations[(p["vehicle_id"], p["transfer_id"])]:
                self.flag("assigned_without_reservation", f"transfer {p['transfer_id']} assigned "
                          f"{p['vehicle_id']}, which was not reserved for it", ev,
                          transfer_id=p["transfer_id"], vehicle_id=p["vehicle_id"])
            for rule in unmet:
                o = override(ev, rule)
                if o is None or not (o.payload.get("reason") or "").strip():
                    self.flag(UNMET_CODES[rule], f"transfer {p['transfer_id']} assigned {p['vehicle_id']}, "
                              f"which does not meet {rule}, with no override and reason", ev,
                              transfer_id=p["transfer_id"], vehicle_id=p["vehicle_id"])

    def _one_patient_at_a_time(self) -> None:
        """R1 as the crews lived it: from patient_aboard to the trip's end, in the transfer
        store's order, no other trip of the vehicle has a patient aboard."""
        aboard: dict[str, list[TripRec]] = defaultdict(list)
        for trip in self.trips.values():
            if trip.aboard is not None:
                aboard[trip.vehicle_id].append(trip)
        def end(trip: TripRec) -> float:
            return trip.ended.position if trip.ended else float("inf")

        for vid, trips in aboard.items():
            trips.sort(key=lambda t: t.aboard.position if t.aboard else 0)
            latest: TripRec | None = None  # of the trips so far, the one that ended last
            for trip in trips:
                assert trip.aboard is not None
                if latest is not None and end(latest) > trip.aboard.position:
                    self.flag("two_patients_aboard", f"vehicle {vid}: patient of trip "
                              f"{trip.opened.payload['trip_id']} aboard while trip "
                              f"{latest.opened.payload['trip_id']} had not ended",
                              latest.aboard, trip.aboard, latest.ended, vehicle_id=vid)
                if latest is None or end(trip) > end(latest):
                    latest = trip

    def _releases_behind_returns(self) -> None:
        for ev in self.returned:
            p = ev.payload
            c = self.cycles.get(p.get("cycle_id") or "")
            release = c.released if c is not None and c.vehicle_id == p["vehicle_id"] else None
            lifted = bool(p.get("quarantine_lifted"))
            if release is None or bool(release.payload.get("quarantine_lifted")) != lifted:
                code = "lifted_without_release" if lifted else "returned_without_release"
                self.flag(code, f"vehicle {p['vehicle_id']} back in service after trip {p.get('trip_id')}; "
                          f"cycle {p.get('cycle_id')} has no matching release", ev, release,
                          vehicle_id=p["vehicle_id"])
