"""Property: the read models the projection keeps live (the findings above all, kept by
re-evaluating only the scopes a batch touches) equal a rebuild's, whatever batches the
events came in and however the three stores' events interleaved.

A history is drawn from building blocks of the unit tests' histories (test_projection_findings):
rides with their trip, disinfection, swab and loop (clean ones and every rule's forbidden
variants), R4 queues, R6/R7/R13 destinations and load reports, R1 reservations, trips nobody
requested, late registrations. The blocks' phases interleave, so trips of one vehicle
overlap and positives expose other blocks' patients. Its events are then merged in a drawn
order that keeps each store's positions in order, in batches of one store's events (a
subscription delivers one store), each applied as the projection's consumer applies a
batch (consumers.on_events, in one transaction with its tracking rows). A rebuild compared
under the archive lock (rebuild(compare=...), both fold orders; on PostgreSQL both ways of
evaluating the findings) must then find every table, findings included, identical.

The last test pins the discrepancy the property found: R4's fold judged an assignment by a
vehicle registered after it when both came in one batch, not when the registration came in
a later one, while a rebuild always did."""

from __future__ import annotations

import asyncio
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, note, settings
from hypothesis import strategies as st
from sqlalchemy.ext.asyncio import AsyncConnection

from libs.events.aggregate import UnitOfWork
from libs.events.catalog import disinfection as dis
from libs.events.catalog import dispatch as dsp
from libs.events.catalog import transfer as trn
from libs.events.contracts import Event
from libs.events.envelope import Envelope
from libs.events.store import EventStore, Meta
from services.projection import queries
from services.projection.consumers import on_events
from services.projection.facts import Ev
from services.projection.rebuild import rebuild
from services.projection.tables import Generation, metadata
from tests.conftest import fresh_pg_schema, pg_store
from tests.unit.test_projection_findings import History, envelope_of, stage

HERE = {"lat": 38.0, "lon": 106.0}
STORES = ("dispatch", "disinfection", "transfer")
# kind, dedicated pool, life support
VEHICLES = {"v1": ("negative_pressure_ambulance", True, True),
            "v2": ("negative_pressure_ambulance", True, False),
            "car": ("dedicated_vehicle", True, False), "amb": ("ambulance", False, True)}
# roles, backups, fever clinic capacity
FACILITIES: dict[str, tuple[list[str], list[str], int | None]] = {
    "f": (["fever_clinic"], [], 10), "p": (["fever_clinic"], ["b"], 10),
    "b": (["fever_clinic", "backup"], [], 10), "lone": (["fever_clinic", "backup"], [], 10),
    "te": (["fever_clinic", "temporary_emergency"], [], 10), "dh": (["designated"], [], None),
    "fc": (["fangcang"], [], None), "cardio": (["specialty_cardio_cerebro"], [], None)}
# risk category, condition, origin kind, purpose, return required
PATIENTS: dict[str, tuple[str, dict[str, Any], str, str, bool]] = {
    "isolation_fever": ("isolation_site", {"fever": True}, "isolation_site", "outpatient_visit", True),
    "home": ("home_monitoring", {"fever": False}, "home", "outpatient_visit", True),
    "stroke": ("sealed_area", {"fever": False, "critical": True, "kind": "stroke"}, "sealed_area",
               "emergency", False),
    "shock": ("controlled_area", {"fever": True, "critical": True, "kind": "shock"}, "controlled_area",
              "emergency", False),
    "covid_like": ("controlled_area", {"fever": False, "covid_symptoms": True}, "controlled_area",
                   "outpatient_visit", True),
    "suspected_case": ("suspected", {"fever": True}, "fever_clinic", "transfer_to_designated", False),
    "confirmed_mild": ("confirmed", {"severity": "mild"}, "fever_clinic", "transfer_to_designated", False),
    "confirmed_severe": ("confirmed", {"severity": "severe"}, "isolation_site", "admission", False),
}
WORSE = {"fever": True, "critical": True, "covid_symptoms": False, "kind": "shock"}
PATIENT = {"name": "张三", "id_number": "640121198001011231", "phone": "13800138000"}


class Story(History):
    """The unit tests' History, with event ids that follow from the history (a drawn
    example replays the same), and events built from the catalogue's contracts: their
    payloads are what the services write."""

    def __init__(self) -> None:
        super().__init__()
        self.registered: set[str] = set()

    def add(self, store: str, stream: str, type_: str, actor: str = "system", role: str = "system",
            at: datetime | None = None, **payload: Any) -> Ev:
        ev = super().add(store, stream, type_, actor, role, at, **payload)._replace(
            event_id=str(uuid.UUID(int=len(self.events))))
        self.events[-1] = ev
        return ev

    def emit(self, store: str, stream: str, event: Event, actor: str = "system", role: str = "system",
             at: datetime | None = None) -> Ev:
        return self.add(store, stream, type(event).__name__, actor, role, at,
                        **event.model_dump(mode="json"))

    def register(self, name: str) -> None:
        if name in self.registered:
            return
        self.registered.add(name)
        if name in VEHICLES:
            kind, pool, life = VEHICLES[name]
            self.emit("dispatch", f"vehicle-{name}", dsp.VehicleRegistered(
                vehicle_id=name, plate="宁A", kind=kind, dedicated_pool=pool, life_support=life,
                station="s", location=HERE))
        else:
            roles, backups, capacity = FACILITIES[name]
            self.emit("dispatch", f"facility-{name}", dsp.FacilityRegistered(
                facility_id=name, name=f"医院{name}", roles=roles, location=HERE,
                fever_clinic_capacity=capacity, backup_ids=backups))

    # -- what the services write, a few events at a time ----------------------------------

    def request(self, tid: str, patient: str, channel: str = "console", return_of: str | None = None) -> None:
        risk, condition, origin, purpose, back = PATIENTS[patient]
        if return_of:
            origin, purpose, back = "hospital", "return_leg", False
        self.emit("dispatch", f"transfer-{tid}", dsp.TransferRequested(
            transfer_id=tid, patient=PATIENT, risk_category=risk, condition=condition,
            origin={"kind": origin, "name": f"o-{tid}"}, purpose=purpose, return_required=back,
            requested_by={"channel": channel, "org": "站"}, return_of=return_of))

    def assign(self, tid: str, vid: str, dest: str | None, manual: bool = False,
               return_of: str | None = None) -> None:
        self.emit("dispatch", f"vehicle-{vid}", dsp.VehicleReserved(vehicle_id=vid, transfer_id=tid))
        self.emit("dispatch", f"transfer-{tid}", dsp.VehicleAssigned(
            transfer_id=tid, vehicle_id=vid, destination_id=dest, origin={"name": f"o-{tid}"},
            return_required=False, manual=manual, override_reason="无车可派" if manual else None,
            reason="first queued transfer this vehicle may carry (R4)", return_of=return_of),
            *(("d1", "dispatcher") if manual else ()))

    def open_trip(self, trip: str, tid: str, vid: str, dest: str | None,
                  return_of: str | None = None) -> None:
        self.emit("transfer", f"trip-{trip}", trn.TripOpened(
            trip_id=trip, transfer_id=tid, vehicle_id=vid, destination_id=dest,
            origin={"name": f"o-{tid}"}, return_required=False, return_of=return_of))

    def step(self, trip: str, tid: str, vid: str, *steps: str) -> None:
        for name in steps:
            now = self.clock.isoformat()
            self.emit("transfer", f"trip-{trip}", trn.TripStepReported(
                trip_id=trip, step=name, client_event_id=f"{trip}-{name}", device_at=now, transfer_id=tid,
                vehicle_id=vid, received_at=now, clock_skew_s=0.0))

    def hand_over(self, trip: str, tid: str, vid: str, facility: str) -> None:
        """The crew's handover (the trip completes with it), and what dispatch writes on it."""
        self.emit("transfer", f"trip-{trip}", trn.PatientHandedOver(
            trip_id=trip, transfer_id=tid, facility_id=facility, received_by="李", confirmed_by="crew"))
        self.emit("transfer", f"trip-{trip}", trn.TripCompleted(trip_id=trip, transfer_id=tid,
                                                                vehicle_id=vid))
        self.emit("dispatch", f"transfer-{tid}", dsp.TransferHandedOver(
            transfer_id=tid, trip_id=trip, facility_id=facility))
        self.emit("dispatch", f"vehicle-{vid}", dsp.VehicleAwaitingDisinfection(
            vehicle_id=vid, trip_id=trip, transfer_id=tid))

    def stage_logged(self, cid: str, vid: str, kind: str, body: dict[str, Any]) -> None:
        logged = dis.InitialDisinfectionLogged if kind == "initial" else dis.TerminalDisinfectionLogged
        self.emit("disinfection", f"cycle-{cid}", logged(cycle_id=cid, vehicle_id=vid, stage=body),
                  "王五", "disinfection")

    def swab(self, cid: str, vid: str, sample: str) -> None:
        self.emit("disinfection", f"cycle-{cid}", dis.SurfaceSwabCollected(
            cycle_id=cid, vehicle_id=vid, sample_id=sample, sites=["a", "b", "c"], collected_by="x",
            collected_at=self.clock.isoformat(), due_at=(self.clock + timedelta(hours=6)).isoformat()))

    def result(self, cid: str, vid: str, sample: str, result: str) -> None:
        self.emit("disinfection", f"cycle-{cid}", dis.SwabResultRecorded(
            cycle_id=cid, vehicle_id=vid, sample_id=sample, result=result, lab="l",
            reported_at=self.clock.isoformat()), "lab", "lab")


Part = Callable[[Story], None]  # a phase of a block: a few events


@dataclass(frozen=True)
class Ride:
    """One transfer carried by one vehicle, with its disinfection, swab and loop (Fleet,
    full_history and the forbidden variants of the unit tests)."""

    vehicle: str
    patient: str
    dest: str | None
    channel: str  # console | direct_call
    report: str  # on_time | late | never | failed | redelivered | by_station
    priority: int
    queued: bool
    r2_override: str | None  # who recorded an R2 override before the reservation
    manual: bool  # assigned with an override reason (R3/R5 overrides recorded)
    redirect: str | None  # redirected there with the patient worse
    end: str  # handover | absent | breakdown | open
    loop: str | None  # admitted | returned | elsewhere (after a handover)
    cycle: str  # none | ok | below_protocol | before_trip | overlap | terminal_first | no_stages | no_swab
    release: str  # policy | supervisor | staff | none
    returned: bool
    result: str  # negative | positive | late | none
    positive: str  # handled | unlisted | no_redo | unhandled
    redo: str  # none | negative | positive: the re-disinfection's own swab
    amend: int | None  # the exposure list amended with another block's transfer, then acknowledged

    def phases(self, n: int) -> list[Part]:
        tid, trip, cid, sample, vid = f"t{n}", f"trip{n}", f"c{n}", f"s{n}", self.vehicle
        stream = f"transfer-{tid}"
        at: dict[str, datetime] = {}

        def ask(h: Story) -> None:
            h.request(tid, self.patient, self.channel)
            h.emit("dispatch", stream, dsp.TransferPrioritized(transfer_id=tid, priority=self.priority,
                                                               reason="r"))
            if self.report == "late":
                h.clock += timedelta(minutes=30)
            if self.report != "never":
                h.emit("dispatch", stream, dsp.TransferReported(
                    transfer_id=tid, reported_to="bureau",
                    reported_by="站" if self.report == "by_station" else "120"))
            if self.report in ("failed", "redelivered"):
                h.emit("dispatch", stream, dsp.ReportDeliveryFailed(
                    transfer_id=tid, url="http://bureau", attempts=8, error="HTTP 503"))
            if self.report == "redelivered":
                h.emit("dispatch", stream, dsp.ReportDelivered(
                    transfer_id=tid, url="http://bureau", attempts=9, status_code=200))
            if self.dest:
                h.emit("dispatch", stream, dsp.DestinationAssigned(transfer_id=tid, facility_id=self.dest,
                                                                   reason="就急、就近"))
            if self.queued:
                h.emit("dispatch", stream, dsp.TransferQueued(transfer_id=tid, reason="no vehicle"))

        def go(h: Story) -> None:
            if self.r2_override:
                who = ("sup", "supervisor") if self.r2_override == "supervisor" else ("d1", "dispatcher")
                h.emit("dispatch", stream, dsp.RuleOverridden(
                    rule="R2", transfer_id=tid, vehicle_id=vid, reason="重大事故", detail="d"), *who)
            if self.manual:
                for rule in ("R3", "R5"):
                    h.emit("dispatch", stream, dsp.RuleOverridden(
                        rule=rule, transfer_id=tid, vehicle_id=vid, reason="无车可派", detail="d"),
                        "d1", "dispatcher")
            h.assign(tid, vid, self.dest, self.manual)
            h.open_trip(trip, tid, vid, self.dest)
            h.step(trip, tid, vid, "acknowledged", "en_route", "at_pickup")
            if self.end == "absent":
                return
            h.step(trip, tid, vid, "patient_aboard")
            h.emit("dispatch", stream, dsp.TransferPickedUp(transfer_id=tid, trip_id=trip, vehicle_id=vid))
            if self.redirect:
                h.emit("dispatch", stream, dsp.TransferRedirected(
                    transfer_id=tid, from_facility_id=self.dest, to_facility_id=self.redirect,
                    reason="worsened", condition=WORSE))
                h.emit("transfer", f"trip-{trip}", trn.TripRedirected(
                    trip_id=trip, transfer_id=tid, destination_id=self.redirect, reason="worsened",
                    condition=WORSE))

        def end(h: Story) -> None:
            if self.end == "handover":
                h.step(trip, tid, vid, "at_destination")
                at["ended"] = h.clock
                facility = self.redirect or self.dest or "f"
                h.hand_over(trip, tid, vid, facility)
                h.emit("transfer", f"trip-{trip}", trn.HandoverConfirmed(
                    trip_id=trip, transfer_id=tid, facility_id=facility, received_by="李",
                    confirmed_by="his"), "his", "hospital")
            elif self.end == "absent":
                h.emit("transfer", f"trip-{trip}", trn.TripAborted(
                    trip_id=trip, transfer_id=tid, vehicle_id=vid, reason="patient absent",
                    code="patient_absent", dispatch_action="requeue", aborted_by="crew"))
                h.emit("dispatch", stream, dsp.VehicleWithdrawn(transfer_id=tid, vehicle_id=vid,
                                                                reason="crew aborted"))
                h.emit("dispatch", stream, dsp.TransferQueued(transfer_id=tid, reason="requeued"))
                h.emit("dispatch", f"vehicle-{vid}", dsp.VehicleStoodDown(
                    vehicle_id=vid, transfer_id=tid, reason="crew aborted"))
            elif self.end == "breakdown":
                at["ended"] = h.clock
                h.emit("dispatch", stream, dsp.VehicleWithdrawn(
                    transfer_id=tid, vehicle_id=vid, reason="breakdown", patient_aboard=True))
                h.emit("dispatch", f"vehicle-{vid}", dsp.VehicleTakenOutOfService(
                    vehicle_id=vid, reason="breakdown", withdrawn_from=tid))
                h.emit("transfer", f"trip-{trip}", trn.TripCompleted(
                    trip_id=trip, transfer_id=tid, vehicle_id=vid, reason="vehicle withdrawn: breakdown"))
                h.emit("dispatch", f"vehicle-{vid}", dsp.VehicleAwaitingDisinfection(
                    vehicle_id=vid, trip_id=trip, transfer_id=tid))

        def disinfect(h: Story) -> None:
            if "ended" not in at or self.cycle == "none":
                return
            h.emit("disinfection", f"cycle-{cid}", dis.CycleOpened(
                cycle_id=cid, vehicle_id=vid, trip_id=trip, transfer_id=tid, reason="trip ended",
                opened_at=at["ended"].isoformat()))
            back = h.clock
            first = {"below_protocol": stage(10, back, concentration_mg_per_l=500),
                     "before_trip": stage(start=at["ended"] - timedelta(minutes=120))}.get(
                self.cycle, stage(start=back))
            after = timedelta(minutes=20 if self.cycle == "overlap" else 40)
            last = stage(start=back + after, stage="terminal")
            if self.cycle == "terminal_first":
                h.stage_logged(cid, vid, "terminal", last)
                h.stage_logged(cid, vid, "initial", first)
            elif self.cycle != "no_stages":
                h.stage_logged(cid, vid, "initial", first)
                h.stage_logged(cid, vid, "terminal", last)
            h.clock = max(h.clock, back + timedelta(minutes=80))
            if self.cycle != "no_swab":
                h.swab(cid, vid, sample)
                at["swabbed"] = h.clock
            if self.release == "none":
                return
            forced = {"override": True, "override_reason": "急需车辆", "overridden_rules": ["R2", "R8"],
                      "missing": ["terminal", "swab"]} if self.release in ("supervisor", "staff") else {}
            who = {"supervisor": ("sup", "supervisor"), "staff": ("w1", "disinfection")}.get(
                self.release, ("system", "system"))
            h.emit("disinfection", f"cycle-{cid}", dis.VehicleReleased(
                cycle_id=cid, vehicle_id=vid, trip_id=trip,
                policy="supervisor_override" if forced else "after_swab_collected", **forced), *who)
            if self.returned:
                h.emit("dispatch", f"vehicle-{vid}", dsp.VehicleReturnedToService(
                    vehicle_id=vid, trip_id=trip, cycle_id=cid))

        def lab(h: Story) -> None:
            """The result; a positive with what the disinfection service writes in its commit
            (Fleet.positive), or part of it."""
            if "swabbed" not in at or self.result == "none":
                return
            if self.result == "late":
                h.clock += timedelta(hours=7)
            h.result(cid, vid, sample, "positive" if self.result == "positive" else "negative")
            if self.result != "positive" or self.positive == "unhandled":
                return
            h.emit("disinfection", f"cycle-{cid}", dis.VehicleQuarantined(
                cycle_id=cid, vehicle_id=vid, sample_id=sample, reason="positive swab",
                redisinfection_cycle_id=f"r{n}"))
            if self.positive != "no_redo":
                h.emit("disinfection", f"cycle-r{n}", dis.CycleOpened(
                    cycle_id=f"r{n}", vehicle_id=vid, trip_id=trip, transfer_id=tid, reason="R9",
                    kind="redisinfection", after_sample_id=sample))
                at["redo"] = h.clock
            listed = [] if self.positive == "unlisted" else [
                dis.ExposedTransfer(transfer_id=tid, trip_id=trip, cycle_id=cid, relation="swabbed_trip")]
            h.emit("disinfection", f"exposure-{sample}", dis.ExposureListProduced(
                vehicle_id=vid, sample_id=sample, cycle_id=cid, transfer_id=tid, last_negative_sample_id=None,
                bounded_by_sample_id=None, transfers=listed))
            h.emit("dispatch", f"vehicle-{vid}", dsp.VehicleTakenOutOfService(
                vehicle_id=vid, reason=f"positive surface swab {sample}", rule="R9"))

        def redo(h: Story) -> None:
            if self.amend is not None and self.result == "positive" and self.positive != "unhandled":
                listed = f"exposure-{sample}"
                h.emit("disinfection", listed, dis.ExposureListAmended(
                    vehicle_id=vid, sample_id=sample, transfer=dis.ExposedTransfer(
                        transfer_id=f"t{self.amend}", trip_id=f"trip{self.amend}", cycle_id=f"c{self.amend}",
                        relation="during_quarantine")))
                h.emit("disinfection", listed, dis.ExposureListAcknowledged(
                    vehicle_id=vid, sample_id=sample, acknowledged_by="d1"), "d1", "dispatcher")
            if "redo" not in at or self.redo == "none":
                return
            back = h.clock
            h.stage_logged(f"r{n}", vid, "initial", stage(start=back))
            h.stage_logged(f"r{n}", vid, "terminal",
                           stage(start=back + timedelta(minutes=40), stage="terminal"))
            h.clock = back + timedelta(minutes=80)
            h.swab(f"r{n}", vid, f"sr{n}")
            h.result(f"r{n}", vid, f"sr{n}", self.redo)
            if self.redo == "negative":
                h.emit("disinfection", f"cycle-r{n}", dis.VehicleReleased(
                    cycle_id=f"r{n}", vehicle_id=vid, trip_id=trip, policy="after_negative",
                    quarantine_lifted=True))
                h.emit("dispatch", f"vehicle-{vid}", dsp.VehicleReturnedToService(
                    vehicle_id=vid, trip_id=trip, cycle_id=f"r{n}", quarantine_lifted=True))

        def close(h: Story) -> None:
            """R11: admitted, or the return leg (with its own trip, in the car) home or elsewhere."""
            if self.end != "handover" or self.loop is None:
                return
            facility = self.redirect or self.dest or "f"
            if self.loop == "admitted":
                h.emit("transfer", f"trip-{trip}", trn.PatientAdmitted(
                    trip_id=trip, transfer_id=tid, facility_id=facility, admitted_at=h.clock.isoformat()))
                h.emit("transfer", f"trip-{trip}", trn.LoopClosed(transfer_id=tid, how="admitted",
                                                                   trip_id=trip))
                return
            back, leg = f"back{n}", f"tripback{n}"
            h.emit("transfer", f"trip-{trip}", trn.ReturnRequested(
                trip_id=trip, transfer_id=tid, facility_id=facility, return_transfer_id=back,
                origin={"name": f"o-{tid}"}, requested_at=h.clock.isoformat()))
            h.request(back, self.patient, "hospital_his", return_of=tid)
            h.emit("dispatch", f"transfer-{back}", dsp.TransferReported(
                transfer_id=back, reported_to="bureau", reported_by="120"))
            went = "origin" if self.loop == "returned" else "f"
            h.emit("dispatch", f"transfer-{back}", dsp.DestinationAssigned(
                transfer_id=back, facility_id=went, reason="return leg"))
            h.assign(back, "car", went, return_of=tid)
            h.open_trip(leg, back, "car", went, return_of=tid)
            h.step(leg, back, "car", "acknowledged", "en_route", "at_pickup", "patient_aboard",
                   "at_destination")
            h.hand_over(leg, back, "car", went)
            if self.loop == "returned":
                h.emit("transfer", f"trip-{trip}", trn.LoopClosed(
                    transfer_id=tid, how="returned", trip_id=leg, return_transfer_id=back))

        return [ask, go, end, disinfect, lab, redo, close]


@dataclass(frozen=True)
class Queue:
    """R4: transfers waiting at their priorities; a vehicle given to one of them, after
    cancellations, reprioritisations and a redirect that recorded the patient worse."""

    priorities: tuple[int, ...]
    queued: tuple[bool, ...]
    winner: int
    vehicle: str
    cancel: int | None
    raised: int | None
    worsened: int | None
    withdraw: bool  # the vehicle then withdrawn from the winner, which is left waiting

    def phases(self, n: int) -> list[Part]:
        ids = [f"q{n}-{i}" for i in range(len(self.priorities))]
        winner = ids[self.winner % len(ids)]

        def wait(h: Story) -> None:
            for i, tid in enumerate(ids):
                h.request(tid, "isolation_fever" if i % 2 == 0 else "home")
                h.emit("dispatch", f"transfer-{tid}", dsp.TransferPrioritized(
                    transfer_id=tid, priority=self.priorities[i], reason="r"))
                if self.queued[i]:
                    h.emit("dispatch", f"transfer-{tid}", dsp.TransferQueued(transfer_id=tid,
                                                                             reason="no vehicle"))

        def change(h: Story) -> None:
            if self.cancel is not None:
                tid = ids[self.cancel]
                h.emit("dispatch", f"transfer-{tid}", dsp.TransferCancelled(transfer_id=tid,
                                                                            reason="患者拒绝"))
            if self.worsened is not None:
                tid = ids[self.worsened]
                h.emit("dispatch", f"transfer-{tid}", dsp.TransferRedirected(
                    transfer_id=tid, from_facility_id=None, to_facility_id="te", reason="worsened",
                    condition=WORSE))
            if self.raised is not None:
                tid = ids[self.raised]
                h.emit("dispatch", f"transfer-{tid}", dsp.TransferReprioritized(
                    transfer_id=tid, priority=1, previous=self.priorities[self.raised], reason="胸痛"),
                    "d1", "dispatcher")

        def give(h: Story) -> None:
            h.assign(winner, self.vehicle, None)

        def withdraw(h: Story) -> None:
            if self.withdraw:
                h.emit("dispatch", f"transfer-{winner}", dsp.VehicleWithdrawn(
                    transfer_id=winner, vehicle_id=self.vehicle, reason="breakdown"))
                h.emit("dispatch", f"vehicle-{self.vehicle}", dsp.VehicleTakenOutOfService(
                    vehicle_id=self.vehicle, reason="breakdown", withdrawn_from=winner))

        return [wait, change, give, withdraw]


@dataclass(frozen=True)
class Sent:
    """R6, R7, R13: a patient given a destination (or redirected to it), maybe handed over
    there (test_r7_a_backup_takes_patients_only_while_a_hospital_it_backs_up_overflows)."""

    patient: str
    facility: str
    redirected_from: str | None
    handed_over: bool

    def phases(self, n: int) -> list[Part]:
        tid = f"d{n}"
        stream = f"transfer-{tid}"

        def send(h: Story) -> None:
            h.request(tid, self.patient)
            if self.redirected_from:
                h.emit("dispatch", stream, dsp.DestinationAssigned(
                    transfer_id=tid, facility_id=self.redirected_from, reason="r"))
                h.emit("dispatch", stream, dsp.TransferRedirected(
                    transfer_id=tid, from_facility_id=self.redirected_from, to_facility_id=self.facility,
                    reason="named by the dispatcher: full"))
            else:
                h.emit("dispatch", stream, dsp.DestinationAssigned(transfer_id=tid, facility_id=self.facility,
                                                                   reason="r"))

        def arrive(h: Story) -> None:
            if self.handed_over:
                h.emit("dispatch", stream, dsp.TransferHandedOver(
                    transfer_id=tid, trip_id=f"trip-{tid}", facility_id=self.facility))

        return [send, arrive]


@dataclass(frozen=True)
class Load:
    """A fever clinic's load report (R7), with dispatch's word on its backups."""

    facility: str
    occupied: int

    def phases(self, n: int) -> list[Part]:
        def report(h: Story) -> None:
            over, stream = self.occupied > 8, f"facility-{self.facility}"
            h.emit("dispatch", stream, dsp.FacilityLoadReported(
                facility_id=self.facility, fever_clinic_occupied=self.occupied,
                reported_at=h.clock.isoformat(), load_ratio=self.occupied / 10, overflowing=over))
            if backups := FACILITIES[self.facility][1]:
                said = dsp.BackupsActivated if over else dsp.BackupsStoodDown
                h.emit("dispatch", stream, said(facility_id=self.facility, backup_ids=backups,
                                                load_ratio=self.occupied / 10, threshold=0.8))

        return [report]


@dataclass(frozen=True)
class Reservations:
    """R1, R2 on a vehicle's own stream (test_r1_*): reserved, maybe ended, reserved again."""

    vehicle: str
    end: str  # none | awaiting | stood_down | hold_lifted | out_named | out_other | out_unnamed | lifted

    def phases(self, n: int) -> list[Part]:
        vid, first, second, stream = self.vehicle, f"x{n}a", f"x{n}b", f"vehicle-{self.vehicle}"

        def reserve(tid: str) -> Part:
            def phase(h: Story) -> None:
                h.emit("dispatch", stream, dsp.VehicleReserved(vehicle_id=vid, transfer_id=tid))
            return phase

        def end(h: Story) -> None:
            if self.end in ("awaiting", "lifted"):
                h.emit("dispatch", stream, dsp.VehicleAwaitingDisinfection(
                    vehicle_id=vid, trip_id=f"y{n}", transfer_id=first))
            if self.end == "lifted":
                h.emit("dispatch", stream, dsp.VehicleReturnedToService(
                    vehicle_id=vid, trip_id=f"y{n}", cycle_id=f"z{n}", quarantine_lifted=True))
            elif self.end == "stood_down":
                h.emit("dispatch", stream, dsp.VehicleStoodDown(vehicle_id=vid, transfer_id=first,
                                                                reason="cancelled"))
            elif self.end == "hold_lifted":
                h.emit("dispatch", stream, dsp.VehicleHoldLifted(vehicle_id=vid, transfer_id=first,
                                                                 reason="never boarded"))
            elif self.end.startswith("out_"):
                named = {"out_named": first, "out_other": "elsewhere", "out_unnamed": None}[self.end]
                h.emit("dispatch", stream, dsp.VehicleTakenOutOfService(vehicle_id=vid, reason="broke",
                                                                        withdrawn_from=named))
                h.emit("dispatch", stream, dsp.VehicleDutyChanged(vehicle_id=vid, on_duty=True,
                                                                  reason="fixed"))

        return [reserve(first), end, reserve(second)]


@dataclass(frozen=True)
class Ghost:
    """R12: a trip whose transfer nobody requested (maybe requested afterwards), and an
    event type no catalogue knows."""

    vehicle: str
    requested_later: bool
    aborted: bool

    def phases(self, n: int) -> list[Part]:
        tid, trip = f"g{n}", f"ghost{n}"

        def ride(h: Story) -> None:
            vid = self.vehicle
            h.open_trip(trip, tid, vid, None)
            h.emit("transfer", f"trip-{trip}", trn.TripAborted(
                trip_id=trip, transfer_id=tid, vehicle_id=vid, reason="r") if self.aborted
                else trn.TripCompleted(trip_id=trip, transfer_id=tid, vehicle_id=vid))
            h.add("transfer", f"trip-{trip}", "SomethingNobodyKnows", trip_id=trip, x=[1, 2])

        def late(h: Story) -> None:
            if self.requested_later:
                h.request(tid, "home")

        return [ride, late]


@dataclass(frozen=True)
class Register:
    """A vehicle or facility registered late, after decisions that name it (the store
    test registers a hospital after the decision that sent a patient to its backup)."""

    name: str

    def phases(self, n: int) -> list[Part]:
        return [lambda h: h.register(self.name)]


Block = Ride | Queue | Sent | Load | Reservations | Ghost | Register

vehicles = st.sampled_from(sorted(VEHICLES))
facilities = st.sampled_from(sorted(FACILITIES))
patients = st.sampled_from(sorted(PATIENTS))
rides = st.builds(
    Ride, vehicle=vehicles, patient=patients, dest=st.sampled_from([None, *sorted(FACILITIES)]),
    channel=st.sampled_from(["console", "direct_call"]),
    report=st.sampled_from(["on_time", "late", "never", "failed", "redelivered", "by_station"]),
    priority=st.integers(1, 3), queued=st.booleans(),
    r2_override=st.none() | st.sampled_from(["supervisor", "dispatcher"]), manual=st.booleans(),
    redirect=st.none() | facilities,
    end=st.sampled_from(["handover", "breakdown", "handover", "absent", "open"]),
    loop=st.sampled_from([None, "returned", "elsewhere", "admitted"]),
    cycle=st.sampled_from(["ok", "none", "below_protocol", "before_trip", "overlap", "terminal_first",
                           "no_stages", "no_swab"]),
    release=st.sampled_from(["policy", "supervisor", "staff", "none"]), returned=st.booleans(),
    result=st.sampled_from(["negative", "positive", "late", "positive", "none"]),
    positive=st.sampled_from(["handled", "unlisted", "no_redo", "unhandled"]),
    redo=st.sampled_from(["negative", "positive", "none"]), amend=st.none() | st.integers(0, 7))


@st.composite
def queues(draw: st.DrawFn) -> Queue:
    k = draw(st.integers(2, 3))
    index = st.integers(0, k - 1)
    return Queue(
        priorities=tuple(draw(st.lists(st.integers(1, 3), min_size=k, max_size=k))),
        queued=tuple(draw(st.lists(st.booleans(), min_size=k, max_size=k))), winner=draw(index),
        vehicle=draw(vehicles), cancel=draw(st.none() | index), raised=draw(st.none() | index),
        worsened=draw(st.none() | index), withdraw=draw(st.booleans()))


others: st.SearchStrategy[Block] = st.one_of(
    rides, queues(),
    st.builds(Sent, patient=patients, facility=facilities, redirected_from=st.none() | facilities,
              handed_over=st.booleans()),
    st.builds(Load, facility=st.sampled_from(["p", "f", "te", "b"]), occupied=st.integers(0, 10)),
    st.builds(Reservations, vehicle=vehicles, end=st.sampled_from([
        "none", "awaiting", "stood_down", "hold_lifted", "out_named", "out_other", "out_unnamed", "lifted"])),
    st.builds(Ghost, vehicle=vehicles, requested_later=st.booleans(), aborted=st.booleans()))


def story(data: st.DataObject) -> Story:
    """Registrations first, but for a few drawn ones registered late (a block of their own)
    or never; then the blocks' phases interleaved: each block's phases in order, the
    blocks' turns drawn."""
    h = Story()
    entities = sorted([*VEHICLES, *FACILITIES])
    later = data.draw(st.dictionaries(st.sampled_from(entities), st.booleans(), max_size=3),
                      "registered late (True) or never")
    for name in entities:
        if name not in later:
            h.register(name)
    # Rides carry most of the events and of the joins across stores: two at least.
    drawn = [*data.draw(st.lists(rides, min_size=2, max_size=4), "rides"),
             *data.draw(st.lists(others, min_size=1, max_size=4), "others"),
             *(Register(name) for name, late in sorted(later.items()) if late)]
    pending = [block.phases(n) for n, block in enumerate(drawn)]
    total = sum(map(len, pending))
    for turn in data.draw(st.lists(st.integers(0, 7), min_size=total, max_size=total), "turns"):
        live = [p for p in pending if p]
        live[turn % len(live)].pop(0)(h)
    return h


def deliveries(data: st.DataObject, events: list[Ev]) -> list[list[Envelope]]:
    """The stores' events merged in a drawn order that keeps each store's positions in
    order, as batches of one store's events (a subscription delivers one store): drawn
    (store, size) batches, then what is left store after store."""
    queued = {s: [e for e in sorted(events, key=lambda e: e.position) if e.store == s] for s in STORES}
    drawn = data.draw(st.lists(st.tuples(st.integers(0, 2), st.integers(1, 8)), min_size=len(events) // 6,
                               max_size=len(events)), "batches")
    batches: list[list[Envelope]] = []
    for pick, size in [*drawn, *((i, len(events)) for i in range(len(STORES)))]:
        nonempty = [s for s in STORES if queued[s]]
        if not nonempty:
            break
        store = nonempty[pick % len(nonempty)]
        batches.append([envelope_of(e) for e in queued[store][:size]])
        del queued[store][:size]
    return batches


async def apply_batch(projection: EventStore, batch: list[Envelope]) -> None:
    """What Subscription._apply_batch does with the projection's Batched handler."""
    uow = UnitOfWork(projection, Meta(actor="system:projection", role="system",
                                      correlation_id=batch[-1].correlation_id),
                     tracking=tuple(sorted(("projection", str(e.event_id)) for e in batch)))
    await on_events(batch, uow)
    await uow.commit()


Dump = dict[str, list[tuple[Any, ...]]]


async def live_and_rebuilt(projection: EventStore, batches: list[list[Envelope]],
                           rebuilds: tuple[tuple[str, int], ...]) -> list[tuple[str, Dump, Dump]]:
    """The batches applied live, then each (order, workers) rebuild compared under the
    archive lock, as the invariant checker does (nothing switches): (how, live, rebuilt)."""
    try:
        await projection.create_schema(metadata)
        for batch in batches:
            await apply_batch(projection, batch)
        out: list[tuple[str, Dump, Dump]] = []
        for order, workers in rebuilds:
            async def compare(conn: AsyncConnection, built: Generation, how: str = f"{order}/{workers}",
                              ) -> None:
                live = await queries.current(conn)
                assert live is not None
                out.append((how, await queries.dump(conn, live), await queries.dump(conn, built)))

            await rebuild(projection, order=order, page=17, workers=workers, compare=compare)
        return out
    finally:
        await projection.close()


async def on_backend(backend: str, batches: list[list[Envelope]],
                     rebuilds: tuple[tuple[str, int], ...]) -> list[tuple[str, Dump, Dump]]:
    if backend == "sqlite":
        with tempfile.TemporaryDirectory() as where:
            store = EventStore.from_url("projection", f"sqlite+aiosqlite:///{where}/projection.db")
            return await live_and_rebuilt(store, batches, rebuilds)
    async with fresh_pg_schema() as schema:
        return await live_and_rebuilt(pg_store("projection", schema), batches, rebuilds)


def differences(live: Dump, built: Dump) -> list[str]:
    """What differs, table by table; a finding by its scope, rule and check."""
    out = []
    for name in sorted(live):
        a, b = set(live[name]), set(built.get(name, []))
        for side, rows in (("live only", a - b), ("rebuilt only", b - a)):
            out += [f"{name} {side}: {row[1:4] if name == 'findings' else row}"
                    for row in sorted(rows, key=str)]
    return out


def timeline(events: list[Ev]) -> str:
    return "\n".join(f"{e.store}#{e.position} {e.stream_id} v{e.stream_version} {e.type} "
                     f"{ {k: v for k, v in e.payload.items() if k.endswith('_id') and v} }" for e in events)


def check(backend: str, data: st.DataObject, rebuilds: tuple[tuple[str, int], ...]) -> None:
    """A drawn history and delivery, live then rebuilt: every table the same."""
    h = story(data)
    batches = deliveries(data, h.events)
    note(timeline(h.events))
    note("batches: " + " | ".join(f"{b[0].store}:{','.join(str(e.position) for e in b)}" for b in batches))
    for how, live, built in asyncio.run(on_backend(backend, batches, rebuilds)):
        assert live == built, (how, differences(live, built))


# Not shrunk: an example is a database, its batches and two rebuilds (about a second), and
# shrinking one ran into Hypothesis's five minutes. A failure prints its history and batches
# (the notes) and the rows that differ; the test below pins the minimal case found so far.
QUICK = settings(deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate],
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@settings(QUICK, max_examples=40)
@given(data=st.data())
def test_findings_kept_live_equal_a_rebuild_whatever_the_batches(data: st.DataObject) -> None:
    # One rebuild, in either fold order: a live application costs as much as a rebuild,
    # and more examples find more than a second order of the same one.
    check("sqlite", data, ((data.draw(st.sampled_from(["seq", "store"]), "fold order"), 1),))


@pytest.mark.postgres
@settings(QUICK, max_examples=6)
@given(data=st.data())
def test_findings_kept_live_equal_a_rebuild_whatever_the_batches_on_postgresql(data: st.DataObject) -> None:
    """The live path loads a batch's scopes with its own SQL there; a rebuild evaluates
    the findings over the rows it wrote, and with worker processes over its fold in memory
    (both here: 2 s an example)."""
    check("postgres", data, (("seq", 1), ("store", 2)))


@pytest.mark.parametrize("split", [False, True])
def test_r4_judges_an_assignment_before_its_vehicle_registered_whatever_the_batches(split: bool) -> None:
    """What the property found, pinned. Dispatch's store: q0-0 (priority 1) queued, then
    v1 given to q0-1 (priority 3), then v1 registered (a history dispatch never writes, but
    a forged or imported one; R3 and R5 judge it, touched() re-evaluates those transfers
    on the registration). Live, R4's fold read the vehicles registered by the end of the
    batch it folded the assignment in, a rebuild's every vehicle: with the registration in
    a later batch, only the rebuild found the priority inversion."""
    h = Story()
    for name in [*FACILITIES, "v2", "car", "amb"]:
        h.register(name)
    for phase in Queue(priorities=(1, 3), queued=(True, False), winner=1, vehicle="v1", cancel=None,
                       raised=None, worsened=None, withdraw=False).phases(0):
        phase(h)
    h.register("v1")
    envelopes = [envelope_of(e) for e in h.events]  # all dispatch's, in position order
    batches = [envelopes[:-1], envelopes[-1:]] if split else [envelopes]
    for how, live, built in asyncio.run(on_backend("sqlite", batches, (("seq", 1), ("store", 1)))):
        assert live == built, (how, differences(live, built))
