"""The audit's findings and views (KPIs, ledger, custody, exposures) as pure functions:
forbidden histories made of events (no command side involved) must each produce the
finding that names their rule; the fold must not depend on how streams interleave.
Masking is tested with the rest of privacy (test_auth.py)."""

from __future__ import annotations

import csv
import io
import itertools
import random
import uuid
import zipfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from libs.events.aggregate import InvalidField
from libs.events.envelope import Envelope
from services.projection import custody, facts, findings, kpis, ledger, slices, tables
from services.projection.custody import exposures
from services.projection.data import AuditData, from_rows, seconds
from services.projection.facts import Buffer, Ev, Fact
from services.projection.timeline import timeline_view

T0 = datetime(2022, 11, 20, 1, 0, tzinfo=UTC)
KNOWN = findings.registry_types()


class History:
    """Builds events stream by stream, with positions per store and server times that
    advance a minute per event."""

    def __init__(self) -> None:
        self.events: list[Ev] = []
        self.versions: dict[str, int] = {}
        self.positions: dict[str, int] = {}
        self.clock = T0

    def add(self, store: str, stream: str, type_: str, actor: str = "system", role: str = "system",
            at: datetime | None = None, **payload: Any) -> Ev:
        self.clock += timedelta(minutes=1)
        self.versions[stream] = self.versions.get(stream, 0) + 1
        self.positions[store] = self.positions.get(store, 0) + 1
        when = (at or self.clock).isoformat()
        ev = Ev(str(uuid.uuid4()), type_, store, stream, self.versions[stream], self.positions[store],
                when, self.clock.isoformat(), actor, role, payload)
        self.events.append(ev)
        return ev

    def data(self, events: list[Ev] | None = None) -> AuditData:
        buf = Buffer()
        for ev in events if events is not None else self.events:
            buf.add_event(ev)
        return from_rows(buf.rows)

    def found(self, now: datetime | None = None) -> list[findings.Finding]:
        return findings.evaluate(self.data(), now or self.clock, KNOWN)


def vehicle(h: History, vid: str, kind: str = "negative_pressure_ambulance", pool: bool = True) -> None:
    h.add("dispatch", f"vehicle-{vid}", "VehicleRegistered", vehicle_id=vid, plate="宁A", kind=kind,
          dedicated_pool=pool, life_support=True, station="s", location={"lat": 38.0, "lon": 106.0})


def request(h: History, tid: str, risk: str = "isolation_site", fever: bool = True,
            channel: str = "console", origin_kind: str = "isolation_site", purpose: str = "outpatient_visit",
            return_required: bool = True, **extra: Any) -> None:
    h.add("dispatch", f"transfer-{tid}", "TransferRequested", transfer_id=tid,
          patient={"name": "张三", "id_number": "640121198001011231", "phone": "13800138000"},
          risk_category=risk, condition={"fever": fever, **extra}, origin={"kind": origin_kind, "name": "o"},
          purpose=purpose, return_required=return_required, requested_by={"channel": channel, "org": "站"})


def envelope_of(ev: Ev) -> Envelope:
    return Envelope(event_id=uuid.UUID(ev.event_id), type=ev.type, schema_version=1, store=ev.store,
                    stream_id=ev.stream_id, stream_version=ev.stream_version, position=ev.position,
                    occurred_at=ev.occurred_at, recorded_at=ev.recorded_at, actor=ev.actor, role=ev.role,
                    correlation_id="c", payload=ev.payload, prev_hash="0" * 64, hash="0" * 64)


def codes(found: list[findings.Finding]) -> set[tuple[str, str]]:
    return {(f.rule, f.check) for f in found}


# -- forbidden histories, one rule each ---------------------------------------------------


def test_r1_two_reservations_without_release() -> None:
    h = History()
    vehicle(h, "v1")
    h.add("dispatch", "vehicle-v1", "VehicleReserved", vehicle_id="v1", transfer_id="t1")
    h.add("dispatch", "vehicle-v1", "VehicleReserved", vehicle_id="v1", transfer_id="t2")
    found = [f for f in h.found() if f.rule == "R1"]
    assert [(f.check, f.transfer_id) for f in found] == [("vehicle_reserved_twice", "t2")]
    assert len(found[0].evidence) == 2


def test_r1_an_earlier_trips_late_end_does_not_end_the_current_reservation() -> None:
    """Dispatch keeps a vehicle on its transfer when an earlier trip's end arrives late (or
    a breakdown withdrew it from nothing): reserved for another meanwhile, it carried two.
    Entries written before they named their transfer end any reservation, as they did."""
    h = History()
    vehicle(h, "v1")
    h.add("dispatch", "vehicle-v1", "VehicleReserved", vehicle_id="v1", transfer_id="t2")
    h.add("dispatch", "vehicle-v1", "VehicleAwaitingDisinfection", vehicle_id="v1", trip_id="a",
          transfer_id="t1")
    h.add("dispatch", "vehicle-v1", "VehicleTakenOutOfService", vehicle_id="v1", reason="R9",
          rule="R9", withdrawn_from=None)
    h.add("dispatch", "vehicle-v1", "VehicleReserved", vehicle_id="v1", transfer_id="t3")
    h.add("dispatch", "vehicle-v1", "VehicleTakenOutOfService", vehicle_id="v1", reason="broke",
          withdrawn_from="t3")
    h.add("dispatch", "vehicle-v1", "VehicleReserved", vehicle_id="v1", transfer_id="t4")
    h.add("dispatch", "vehicle-v1", "VehicleTakenOutOfService", vehicle_id="v1", reason="broke")  # older
    h.add("dispatch", "vehicle-v1", "VehicleReserved", vehicle_id="v1", transfer_id="t5")
    found = [(f.check, f.transfer_id) for f in h.found() if f.rule == "R1"]
    assert found == [("vehicle_reserved_twice", "t3")]


def test_r1_two_trips_of_one_vehicle_open_at_once() -> None:
    h = History()
    for trip, tid in (("a", "t1"), ("b", "t2")):
        h.add("transfer", f"trip-{trip}", "TripOpened", trip_id=trip, transfer_id=tid, vehicle_id="v1",
              destination_id=None, origin={}, return_required=False)
    assert ("R1", "overlapping_trips") in codes(h.found())


def test_r2_reserved_while_awaiting_disinfection() -> None:
    h = History()
    vehicle(h, "v1")
    h.add("dispatch", "vehicle-v1", "VehicleReserved", vehicle_id="v1", transfer_id="t1")
    h.add("dispatch", "vehicle-v1", "VehicleAwaitingDisinfection", vehicle_id="v1", trip_id="a")
    h.add("dispatch", "vehicle-v1", "VehicleReserved", vehicle_id="v1", transfer_id="t2")
    assert codes(h.found()) >= {("R2", "reserved_before_release")}
    assert not [f for f in h.found() if f.rule == "R1"]


def test_r2_trip_before_release_and_clean_sequence() -> None:
    h = History()
    h.add("transfer", "trip-a", "TripOpened", trip_id="a", transfer_id="t1", vehicle_id="v1",
          destination_id=None, origin={}, return_required=False)
    h.add("transfer", "trip-a", "TripCompleted", trip_id="a", transfer_id="t1", vehicle_id="v1")
    h.add("transfer", "trip-b", "TripOpened", trip_id="b", transfer_id="t2", vehicle_id="v1",
          destination_id=None, origin={}, return_required=False)
    assert ("R2", "trip_before_release") in codes(h.found())


def stage(minutes: int = 35, start: datetime = T0, **override: Any) -> dict[str, Any]:
    end = start + timedelta(minutes=minutes)
    body = {"stage": "initial", "disinfectant": "chlorine", "concentration_mg_per_l": 1000,
            "method": "wipe", "started_at": start.isoformat(), "ended_at": end.isoformat(),
            "operator": "王五", "location": "洗消间",
            "video": {"camera_id": "c", "clip_ref": "nvr://x", "from": start.isoformat(),
                      "to": end.isoformat()}}
    return body | override


def cycle(h: History, cid: str, trip: str, vid: str = "v1") -> None:
    h.add("disinfection", f"cycle-{cid}", "CycleOpened", cycle_id=cid, vehicle_id=vid, trip_id=trip,
          transfer_id="t1", reason="r")


def test_r8_returned_to_service_without_terminal_stage() -> None:
    h = History()
    cycle(h, "c1", "a")
    h.add("disinfection", "cycle-c1", "InitialDisinfectionLogged", cycle_id="c1", vehicle_id="v1",
          stage=stage())
    vehicle(h, "v1")
    h.add("dispatch", "vehicle-v1", "VehicleReturnedToService", vehicle_id="v1", trip_id="a", cycle_id="c1")
    assert ("R8", "returned_without_terminal") in codes(h.found())
    # The terminal stage logged only afterwards does not excuse it.
    h.add("disinfection", "cycle-c1", "TerminalDisinfectionLogged", cycle_id="c1", vehicle_id="v1",
          stage=stage(stage="terminal"))
    assert ("R8", "returned_without_terminal") in codes(h.found())


def test_r8_r9_released_with_no_stage_and_no_swab() -> None:
    h = History()
    cycle(h, "c1", "a")
    h.add("disinfection", "cycle-c1", "VehicleReleased", cycle_id="c1", vehicle_id="v1", trip_id="a",
          policy="p")
    assert codes(h.found()) >= {("R8", "released_without_both_stages"), ("R9", "released_without_swab")}


def test_r8_stage_below_protocol_and_out_of_order() -> None:
    h = History()
    cycle(h, "c1", "a")
    h.add("disinfection", "cycle-c1", "TerminalDisinfectionLogged", cycle_id="c1", vehicle_id="v1",
          stage=stage(10, concentration_mg_per_l=500, video={"camera_id": "c"}))
    found = [f for f in h.found() if f.rule == "R8"]
    assert {f.check for f in found} == {"stage_below_protocol", "terminal_before_initial"}
    detail = next(f.detail for f in found if f.check == "stage_below_protocol")
    assert "contact time 10 min" in detail and "concentration 500" in detail and "video.clip_ref" in detail


def test_r9_positive_not_quarantined_and_used_again() -> None:
    h = History()
    cycle(h, "c1", "a")
    h.add("disinfection", "cycle-c1", "SurfaceSwabCollected", cycle_id="c1", vehicle_id="v1",
          sample_id="s1", sites=["a", "b", "c"], collected_by="x", collected_at=T0.isoformat())
    h.add("disinfection", "cycle-c1", "SwabResultRecorded", cycle_id="c1", vehicle_id="v1",
          sample_id="s1", result="positive", lab="l", reported_at=T0.isoformat())
    h.add("transfer", "trip-b", "TripOpened", trip_id="b", transfer_id="t2", vehicle_id="v1",
          destination_id=None, origin={}, return_required=False)
    assert codes(h.found()) >= {("R9", "positive_not_quarantined"), ("R9", "trip_after_positive")}


def test_r10_unreported_late_and_direct_call_not_by_120() -> None:
    h = History()
    request(h, "t1")
    request(h, "t2", channel="direct_call")
    h.clock += timedelta(minutes=30)
    h.add("dispatch", "transfer-t2", "TransferReported", transfer_id="t2", reported_to="bureau",
          reported_by="站")
    found = h.found()
    assert {(f.check, f.transfer_id) for f in found if f.rule == "R10"} == {
        ("not_reported", "t1"), ("reported_late", "t2"), ("direct_call_not_reported_by_120", "t2")}
    # The ledger (R12) says so too: a late 报备 is not an on-time one.
    request(h, "t3")
    h.add("dispatch", "transfer-t3", "TransferReported", transfer_id="t3", reported_to="bureau",
          reported_by="120")
    status = {r["transfer_id"]: r["reported"] for r in ledger.rows(h.data())}
    assert status == {"t1": "未报备", "t2": "逾期报备", "t3": "已报备"}, status


def test_r3_r5_vehicle_fit_overrides_and_violations() -> None:
    h = History()
    vehicle(h, "amb", kind="ambulance", pool=False)
    request(h, "t1")
    h.add("dispatch", "transfer-t1", "VehicleAssigned", transfer_id="t1", vehicle_id="amb",
          destination_id=None, origin={}, return_required=True, manual=True, override_reason="无车",
          reason="r", actor="d1", role="dispatcher")
    request(h, "t2")
    h.add("dispatch", "transfer-t2", "VehicleAssigned", transfer_id="t2", vehicle_id="amb",
          destination_id=None, origin={}, return_required=True, reason="r")
    kinds = {(f.rule, f.transfer_id, f.kind) for f in h.found() if f.rule in ("R3", "R5", "override")}
    assert kinds == {("R3", "t1", "override"), ("R5", "t1", "override"), ("override", "t1", "override"),
                     ("R3", "t2", "violation"), ("R5", "t2", "violation")}


def test_r4_priority_inversion() -> None:
    h = History()
    vehicle(h, "v1")
    request(h, "urgent")
    h.add("dispatch", "transfer-urgent", "TransferPrioritized", transfer_id="urgent", priority=1, reason="r")
    h.add("dispatch", "transfer-urgent", "TransferQueued", transfer_id="urgent", reason="r")
    request(h, "later", fever=False)
    h.add("dispatch", "transfer-later", "TransferPrioritized", transfer_id="later", priority=3, reason="r")
    h.add("dispatch", "transfer-later", "VehicleAssigned", transfer_id="later", vehicle_id="v1",
          destination_id=None, origin={}, return_required=True, reason="r")
    assert [(f.rule, f.transfer_id) for f in h.found() if f.rule == "R4"] == [("R4", "urgent")]


def test_r4_within_a_priority_the_earlier_request_goes_first() -> None:
    """R4: the queue orders by priority, then by request time. Both waited (the History's
    clock moves a minute per event); the vehicle goes to one of them."""
    def both_waited_then_assigned(to: str, second_waits: bool = True) -> list[tuple[str, str, str | None]]:
        h = History()
        vehicle(h, "v1")
        for tid in ("first", "second"):
            request(h, tid)
            h.add("dispatch", f"transfer-{tid}", "TransferPrioritized", transfer_id=tid, priority=2,
                  reason="r")
            if tid == "first" or second_waits:
                h.add("dispatch", f"transfer-{tid}", "TransferQueued", transfer_id=tid, reason="r")
        h.add("dispatch", f"transfer-{to}", "VehicleAssigned", transfer_id=to, vehicle_id="v1",
              destination_id=None, origin={}, return_required=True, reason="r")
        return [(f.rule, f.check, f.transfer_id) for f in h.found() if f.rule == "R4"]

    assert both_waited_then_assigned("second") == [("R4", "queue_order", "first")]
    assert both_waited_then_assigned("first") == []
    # The newer one given the vehicle straight away, never queued, while the older waits:
    # the same jump (the fold knew request times only of transfers that had waited).
    assert both_waited_then_assigned("second", second_waits=False) == [("R4", "queue_order", "first")]


def test_r1_a_vehicle_that_stood_down_or_broke_down_may_be_reserved_again() -> None:
    h = History()
    vehicle(h, "v1")
    for n, end in enumerate(("VehicleStoodDown", "VehicleTakenOutOfService")):
        h.add("dispatch", "vehicle-v1", "VehicleReserved", vehicle_id="v1", transfer_id=f"t{n}")
        h.add("dispatch", "vehicle-v1", end, vehicle_id="v1", transfer_id=f"t{n}", reason="r")
    h.add("dispatch", "vehicle-v1", "VehicleReserved", vehicle_id="v1", transfer_id="t9")
    assert not [f for f in h.found() if f.rule == "R1"]


def reserved_over_r2(actor: str, role: str) -> History:
    """v1 awaits disinfection after trip a; `role` records an R2 override; t2 reserves it."""
    h = History()
    vehicle(h, "v1")
    h.add("dispatch", "vehicle-v1", "VehicleAwaitingDisinfection", vehicle_id="v1", trip_id="a")
    h.add("dispatch", "transfer-t2", "RuleOverridden", rule="R2", transfer_id="t2", vehicle_id="v1",
          reason="重大事故", detail="d", actor=actor, role=role)
    h.add("dispatch", "vehicle-v1", "VehicleReserved", vehicle_id="v1", transfer_id="t2")
    return h


def test_r2_a_supervisors_recorded_override_is_an_override_and_a_lifted_quarantine_clears() -> None:
    h = reserved_over_r2("sup", "supervisor")
    h.add("dispatch", "vehicle-v1", "VehicleAwaitingDisinfection", vehicle_id="v1", trip_id="b")
    h.add("dispatch", "vehicle-v1", "VehicleReturnedToService", vehicle_id="v1", trip_id="b", cycle_id="c",
          quarantine_lifted=True)
    h.add("dispatch", "vehicle-v1", "VehicleReserved", vehicle_id="v1", transfer_id="t3")
    found = [f for f in h.found() if f.rule == "R2"]
    assert [(f.transfer_id, f.kind) for f in found] == [("t2", "override")]
    assert {e["type"] for e in found[0].evidence} == {"VehicleAwaitingDisinfection", "VehicleReserved",
                                                      "RuleOverridden"}


def test_a_supervisors_early_release_is_an_override_of_what_it_skipped() -> None:
    h = History()
    cycle(h, "c1", "a")
    h.add("disinfection", "cycle-c1", "InitialDisinfectionLogged", cycle_id="c1", vehicle_id="v1",
          stage=stage())
    h.add("disinfection", "cycle-c1", "VehicleReleased", cycle_id="c1", vehicle_id="v1", trip_id="a",
          policy="supervisor_override", override=True, override_reason="急需车辆",
          overridden_rules=["R2", "R8"], missing=["terminal", "swab"], actor="sup", role="supervisor")
    found = {(f.rule, f.check): f for f in h.found()}
    assert {k: f.kind for k, f in found.items()} == {
        ("override", "supervisor_early_release"): "override",
        ("R8", "released_without_both_stages"): "override", ("R9", "released_without_swab"): "override"}
    assert "急需车辆" in found[("override", "supervisor_early_release")].detail


def test_an_r2_override_by_anyone_but_a_supervisor_is_no_override() -> None:
    """R2 is hard: only a supervisor overrides it (DOMAIN.md). A dispatcher's recorded
    override, or an early release by disinfection staff, is a violation that says who."""
    h = reserved_over_r2("d1", "dispatcher")
    cycle(h, "c1", "a")
    h.add("disinfection", "cycle-c1", "VehicleReleased", cycle_id="c1", vehicle_id="v1", trip_id="a",
          policy="supervisor_override", override=True, override_reason="急需车辆",
          overridden_rules=["R2", "R8"], missing=["terminal", "swab"], actor="w1", role="disinfection")
    found = {(f.rule, f.check): f for f in h.found()}
    assert found[("R2", "reserved_before_release")].kind == "violation"
    assert "d1 (dispatcher), who may not override R2" in found[("R2", "reserved_before_release")].detail
    assert found[("R2", "early_release_not_by_supervisor")].kind == "violation"
    assert ("override", "supervisor_early_release") not in found
    assert found[("R9", "released_without_swab")].kind == "violation"


def test_r4_reads_cancellations_and_reprioritisations() -> None:
    h = History()
    vehicle(h, "v1")
    for tid, priority in (("gone", 1), ("raised", 3)):
        request(h, tid)
        h.add("dispatch", f"transfer-{tid}", "TransferPrioritized", transfer_id=tid, priority=priority,
              reason="r")
        h.add("dispatch", f"transfer-{tid}", "TransferQueued", transfer_id=tid, reason="r")
    h.add("dispatch", "transfer-gone", "TransferCancelled", transfer_id="gone", reason="患者拒绝")
    h.add("dispatch", "transfer-raised", "TransferReprioritized", transfer_id="raised", priority=1,
          previous=3, reason="胸痛", actor="d1", role="dispatcher")
    request(h, "later")
    h.add("dispatch", "transfer-later", "TransferPrioritized", transfer_id="later", priority=2, reason="r")
    h.add("dispatch", "transfer-later", "VehicleAssigned", transfer_id="later", vehicle_id="v1",
          destination_id=None, origin={}, return_required=True, reason="r")
    found = h.found()
    assert [f.transfer_id for f in found if f.rule == "R4"] == ["raised"]  # not the cancelled one
    assert [(f.check, f.transfer_id) for f in found if f.rule == "override"] == [("reprioritized", "raised")]


def test_r11_closed_by_admission_or_return_leg_else_a_finding_after_a_day() -> None:
    h = History()
    for tid in ("admitted", "returned", "open"):
        request(h, tid)
        h.add("dispatch", f"transfer-{tid}", "TransferHandedOver", transfer_id=tid, trip_id=f"trip-{tid}",
              facility_id="f")
    h.add("transfer", "trip-admitted", "PatientAdmitted", trip_id="trip-admitted", transfer_id="admitted",
          facility_id="f", admitted_at=h.clock.isoformat())
    h.add("dispatch", "transfer-back", "TransferRequested", transfer_id="back", patient={"name": "x"},
          risk_category="isolation_site", condition={}, origin={}, purpose="return_leg",
          return_required=False, requested_by={"channel": "his"}, return_of="returned")
    h.add("dispatch", "transfer-back", "TransferHandedOver", transfer_id="back", trip_id="trip-back",
          facility_id="origin")
    assert not [f for f in h.found() if f.rule == "R11"]  # the deadline has not come
    later = [f for f in h.found(now=h.clock + timedelta(hours=25)) if f.rule == "R11"]
    assert [f.transfer_id for f in later] == ["open"]


def test_r11_an_outpatient_visit_returns_whatever_its_request_said() -> None:
    """R11 reads the purpose, not only the flag: a visit said not to return (dispatch now
    refuses it; a history may still hold one) is an open loop after a day, and its
    timeline waits for the return leg; a transfer of another purpose without it closes at
    the handover."""
    h = History()
    request(h, "visit", return_required=False)
    request(h, "admission", return_required=False, purpose="admission")
    for tid in ("visit", "admission"):
        h.add("dispatch", f"transfer-{tid}", "TransferHandedOver", transfer_id=tid, trip_id=f"trip-{tid}",
              facility_id="f")
    later = [f for f in h.found(now=h.clock + timedelta(hours=25)) if f.rule == "R11"]
    assert [(f.check, f.transfer_id) for f in later] == [("loop_not_closed", "visit")]
    envelopes = {tid: [envelope_of(ev) for ev in h.events if ev.stream_id == f"transfer-{tid}"]
                 for tid in ("visit", "admission")}
    assert timeline_view("visit", envelopes["visit"])["status"] == "awaiting_return_leg"
    assert timeline_view("admission", envelopes["admission"])["status"] == "loop_closed"


def test_the_timeline_says_where_a_transfer_stands_by_dispatchs_latest_word() -> None:
    """A crew abort puts the transfer back in the queue (it said on_trip: a trip had been
    opened once); the trip a withdrawn vehicle aborts may be recorded after the next vehicle
    was given; a cancel is final."""
    def status_after(*steps: tuple[str, str, dict[str, Any]]) -> str:
        h = History()
        request(h, "t")
        for store, type_, payload in steps:
            stream = "transfer-t" if store == "dispatch" else f"trip-{payload.get('trip_id')}"
            h.add(store, stream, type_, transfer_id="t", **payload)
        return str(timeline_view("t", [envelope_of(ev) for ev in h.events])["status"])

    given = ("dispatch", "VehicleAssigned", {"vehicle_id": "v1", "destination_id": None, "origin": {},
                                             "return_required": True, "reason": "r"})
    opened = ("transfer", "TripOpened", {"trip_id": "a", "vehicle_id": "v1", "destination_id": None,
                                         "origin": {}, "return_required": True})
    aborted = ("transfer", "TripAborted", {"trip_id": "a", "vehicle_id": "v1", "reason": "patient absent"})
    withdrawn = ("dispatch", "VehicleWithdrawn", {"vehicle_id": "v1", "reason": "crew aborted"})
    queued = ("dispatch", "TransferQueued", {"reason": "requeued"})
    second = ("dispatch", "VehicleAssigned", {"vehicle_id": "v2", "destination_id": None, "origin": {},
                                              "return_required": True, "reason": "r"})
    assert status_after(given, opened) == "on_trip"
    assert status_after(given, opened, aborted, withdrawn, queued) == "queued"
    assert status_after(given, opened, withdrawn, second, aborted) == "assigned"
    cancelled = ("dispatch", "TransferCancelled", {"reason": "r"})
    assert status_after(given, opened, cancelled, aborted) == "cancelled"


def test_a_crew_step_sent_without_a_position_happened_where_its_trip_says() -> None:
    h = History()
    request(h, "t")  # origin "o"
    h.add("dispatch", "transfer-t", "VehicleAssigned", transfer_id="t", vehicle_id="v1", destination_id="f",
          origin={"name": "o"}, return_required=True, reason="r")
    h.add("transfer", "trip-a", "TripOpened", trip_id="a", transfer_id="t", vehicle_id="v1",
          destination_id="f", origin={"name": "o"}, return_required=True)
    for step in ("en_route", "at_pickup", "patient_aboard", "at_destination", "handed_over"):
        h.add("transfer", "trip-a", "TripStepReported", trip_id="a", step=step, client_event_id=step,
              device_at=h.clock.isoformat(), transfer_id="t", vehicle_id="v1")
    entries = timeline_view("t", [envelope_of(ev) for ev in h.events])["entries"]
    places = [(e["payload"].get("step") or e["type"], e["place"]) for e in entries]
    assert places == [("TransferRequested", "o"), ("VehicleAssigned", "o"), ("TripOpened", "f"),
                      ("en_route", None), ("at_pickup", "o"), ("patient_aboard", "o"),
                      ("at_destination", "f"), ("handed_over", "f")], places


def test_r11_a_return_leg_goes_back_to_the_origin() -> None:
    def returned_to(facility: str) -> set[tuple[str, str]]:
        h = History()
        request(h, "out")
        h.add("dispatch", "transfer-out", "TransferHandedOver", transfer_id="out", trip_id="a",
              facility_id="f")
        h.add("dispatch", "transfer-back", "TransferRequested", transfer_id="back",
              patient={"name": "张三"}, risk_category="isolation_site", condition={},
              origin={"kind": "hospital", "name": "f"}, purpose="return_leg", return_required=False,
              return_of="out", requested_by={"channel": "console"})
        h.add("dispatch", "transfer-back", "TransferHandedOver", transfer_id="back", trip_id="b",
              facility_id=facility)
        return {(f.check, f.transfer_id or "") for f in h.found(now=h.clock + timedelta(days=2))
                if f.rule == "R11"}

    assert returned_to("origin") == set()
    assert returned_to("elsewhere") == {("return_leg_elsewhere", "out")}


def test_findings_are_a_function_of_the_events_not_of_the_clock() -> None:
    """A deadline that passed is a finding dated at the deadline, with the same text
    whenever it is asked: what lets the live model keep it as a row."""
    h = History()
    request(h, "t1")
    first = [f.view() for f in h.found(now=h.clock + timedelta(hours=1)) if f.rule == "R10"]
    again = [f.view() for f in h.found(now=h.clock + timedelta(days=9)) if f.rule == "R10"]
    assert first == again and first[0]["at"] == (h.clock + findings.REPORT_SLA).isoformat()
    assert not [f for f in h.found(now=h.clock + timedelta(minutes=14)) if f.rule == "R10"]


def test_r6_r7_destination() -> None:
    h = History()
    h.add("dispatch", "facility-f", "FacilityRegistered", facility_id="f", name="f", roles=["fever_clinic"],
          location={"lat": 38.0, "lon": 106.0}, fever_clinic_capacity=10)
    h.add("dispatch", "facility-f", "FacilityLoadReported", facility_id="f", fever_clinic_occupied=9,
          reported_at=T0.isoformat(), load_ratio=0.9, overflowing=True)
    request(h, "stroke", fever=False, critical=True, kind="stroke")
    h.add("dispatch", "transfer-stroke", "DestinationAssigned", transfer_id="stroke", facility_id="f",
          reason="r")
    assert codes(h.found()) >= {("R6", "destination_role_mismatch"), ("R7", "overflowing_destination")}


def test_r7_a_backup_takes_patients_only_while_a_hospital_it_backs_up_overflows() -> None:
    h = History()
    here = {"lat": 38.0, "lon": 106.0}
    h.add("dispatch", "facility-p", "FacilityRegistered", facility_id="p", name="一院",
          roles=["fever_clinic"], location=here, fever_clinic_capacity=10, backup_ids=["b"])
    for fid in ("b", "lone"):
        h.add("dispatch", f"facility-{fid}", "FacilityRegistered", facility_id=fid, name=f"备用{fid}",
              roles=["fever_clinic", "backup"], location=here, fever_clinic_capacity=10)

    def load(occupied: int) -> None:
        h.add("dispatch", "facility-p", "FacilityLoadReported", facility_id="p",
              fever_clinic_occupied=occupied, reported_at=h.clock.isoformat(), load_ratio=occupied / 10,
              overflowing=occupied > 8)

    def sent(tid: str, facility: str, redirect: bool = False) -> None:
        request(h, tid)
        if redirect:
            h.add("dispatch", f"transfer-{tid}", "TransferRedirected", transfer_id=tid, from_facility_id="p",
                  to_facility_id=facility, reason="named by the dispatcher: full", candidates=[])
        else:
            h.add("dispatch", f"transfer-{tid}", "DestinationAssigned", transfer_id=tid, facility_id=facility,
                  reason="r")

    sent("before_any_report", "b")
    load(5)
    sent("under_threshold", "b")
    load(9)
    sent("activated", "b")
    sent("to_its_primary", "p")  # R7's other half: the primary itself while it overflows
    load(6)
    sent("stood_down", "b", redirect=True)
    sent("nobody_names_it", "lone")
    # A return leg goes back where it came from (R11), a backup too: not R7's to judge.
    h.add("dispatch", "transfer-return_leg", "TransferRequested", transfer_id="return_leg",
          patient={"name": "张三"}, risk_category="isolation_site", condition={}, origin={"kind": "hospital"},
          purpose="return", return_required=False, return_of="x", requested_by={"channel": "console"})
    h.add("dispatch", "transfer-return_leg", "DestinationAssigned", transfer_id="return_leg", facility_id="b",
          reason="return leg")
    found = [f for f in h.found() if f.rule == "R7"]
    got = {(f.check, f.transfer_id) for f in found}
    assert got == {("backup_not_activated", tid) for tid in (
        "before_any_report", "under_threshold", "stood_down", "nobody_names_it")} | {
        ("overflowing_destination", "to_its_primary")}, got
    under = next(f for f in found if f.transfer_id == "under_threshold")
    assert under.facility_id == "b" and "p (load 0.5)" in under.detail
    assert under.message_zh.startswith("备用医院备用b未被启用")
    assert [e["type"] for e in under.evidence] == ["FacilityLoadReported", "DestinationAssigned"]
    lone = next(f for f in found if f.transfer_id == "nobody_names_it")
    assert "no hospital names it" in lone.detail and "未被任何医院登记为备用" in lone.message_zh
    # A forged registration's odd backup ids are no backups, and stall nothing.
    assert findings.backup_ids({"backup_ids": [["x"], 5, "", "b"]}) == ["b"]
    assert findings.backup_ids({"backup_ids": "b"}) == [] and findings.backup_ids(None) == []


def test_r6_a_severe_confirmed_case_goes_to_a_designated_hospital_a_mild_one_may_go_to_a_fangcang() -> None:
    h = History()
    h.add("dispatch", "facility-fc", "FacilityRegistered", facility_id="fc", name="方舱", roles=["fangcang"],
          location={"lat": 38.0, "lon": 106.0})
    for tid, severity in (("severe", "severe"), ("mild", "mild"), ("unsaid", None)):
        request(h, tid, risk="confirmed", fever=False, **({"severity": severity} if severity else {}))
        h.add("dispatch", f"transfer-{tid}", "DestinationAssigned", transfer_id=tid, facility_id="fc",
              reason="r")
    sent = {f.transfer_id for f in h.found() if f.check == "destination_role_mismatch"}
    assert sent == {"severe", "unsaid"}  # severity not said: treated as severe, as dispatch does


def test_r13_cases_from_a_fever_clinic_go_to_a_designated_hospital_and_r6_agrees() -> None:
    """A suspected or confirmed case found in a fever clinic: a designated hospital is
    right by R13 and R6 alike (R6 took a suspected case for a fever patient, so no
    destination satisfied both); a fever-clinic patient who is no case is no R13 case; an
    emergency goes to its specialty hospital."""
    h = History()
    for fid, roles in (("dh", ["designated"]), ("fc", ["fever_clinic", "backup"]),
                       ("cardio", ["specialty_cardio_cerebro"])):
        h.add("dispatch", f"facility-{fid}", "FacilityRegistered", facility_id=fid, name=fid, roles=roles,
              location={"lat": 38.0, "lon": 106.0})
    sent = {"susp-dh": ("suspected", {"fever": True}, "dh"),
            "mild-dh": ("confirmed", {"severity": "mild"}, "dh"),
            "susp-fc": ("suspected", {"fever": True}, "fc"),
            "febrile-fc": ("fever_clinic", {"fever": True}, "fc"),
            "stroke-cardio": ("suspected", {"critical": True, "kind": "stroke"}, "cardio")}
    for tid, (risk, condition, facility) in sent.items():
        h.add("dispatch", f"transfer-{tid}", "TransferRequested", transfer_id=tid, patient={"name": tid},
              risk_category=risk, condition=condition, origin={"kind": "fever_clinic"},
              purpose="transfer_to_designated", return_required=False,
              requested_by={"channel": "hospital_his"})
        h.add("dispatch", f"transfer-{tid}", "DestinationAssigned", transfer_id=tid, facility_id=facility,
              reason="r")
    found = {(f.rule, f.check, f.transfer_id) for f in h.found(now=h.clock + timedelta(hours=3))
             if f.rule in ("R6", "R13")}
    assert {(r, c, t) for r, c, t in found if c != "fever_clinic_case_delayed"} == {
        ("R6", "destination_role_mismatch", "susp-fc"),
        ("R13", "fever_clinic_case_not_to_designated", "susp-fc")}, found
    # Not handed over in 2 h: every case is late (the emergency too), the febrile patient is no case.
    assert {t for r, c, t in found if c == "fever_clinic_case_delayed"} == {
        "susp-dh", "mild-dh", "susp-fc", "stroke-cardio"}, found


def test_r6_a_patient_who_worsened_stays_worse_through_a_later_redirect() -> None:
    """A fever patient redirected with a stroke (to the specialty hospital), then redirected
    again with nothing said of the condition: still a stroke, as dispatch routes it (the
    check read the request's condition instead, and found a fever clinic right)."""
    h = History()
    for fid, roles in (("fc", ["fever_clinic"]), ("cardio", ["specialty_cardio_cerebro"]),
                       ("fc2", ["fever_clinic"])):
        h.add("dispatch", f"facility-{fid}", "FacilityRegistered", facility_id=fid, name=fid, roles=roles,
              location={"lat": 38.0, "lon": 106.0})
    request(h, "t")
    h.add("dispatch", "transfer-t", "DestinationAssigned", transfer_id="t", facility_id="fc", reason="r")
    h.add("dispatch", "transfer-t", "TransferRedirected", transfer_id="t", from_facility_id="fc",
          to_facility_id="cardio", reason="worsened", candidates=[],
          condition={"critical": True, "kind": "stroke"})
    h.add("dispatch", "transfer-t", "TransferRedirected", transfer_id="t", from_facility_id="cardio",
          to_facility_id="fc2", reason="named by the dispatcher", candidates=[])
    r6 = [f for f in h.found() if f.rule == "R6"]
    assert [(f.facility_id, f.detail.split(" ", 1)[0]) for f in r6] == [("fc2", "cardio_cerebro")], r6


def test_r14_a_late_result_is_late_by_when_it_came_back_dated_at_its_deadline() -> None:
    """The lab's own report time, written as two hours after collection, does not hide a
    result the system received ten hours after the collection was (server times on both
    ends); the finding is dated at the deadline, as it was while the result was missing,
    so it does not move when the result comes."""
    h = History()
    cycle(h, "c1", "x")
    collected = h.clock
    h.add("disinfection", "cycle-c1", "SurfaceSwabCollected", cycle_id="c1", vehicle_id="v1",
          sample_id="s1", sites=["a", "b", "c"], collected_by="x", collected_at=collected.isoformat())
    missing = [f for f in h.found(now=h.clock + timedelta(hours=7)) if f.rule == "R14"]
    h.clock += timedelta(hours=10)
    h.add("disinfection", "cycle-c1", "SwabResultRecorded", cycle_id="c1", vehicle_id="v1", sample_id="s1",
          result="negative", lab="l", reported_at=(collected + timedelta(hours=2)).isoformat())
    late = [f for f in h.found() if f.rule == "R14"]
    deadline = (collected + timedelta(hours=6)).isoformat()
    assert [f.at for f in missing] == [f.at for f in late] == [deadline], (missing, late)
    assert "10.0 h after collection" in late[0].detail, late[0].detail


def test_r8_the_stages_in_time_after_the_trip_and_one_after_the_other() -> None:
    """Logged in the right order is not enough: a first stage dated before the trip ended
    (85 min before the handover), or a terminal stage begun before the first one ended, is
    no two-stage disinfection after the trip. A few minutes' clock difference is not one."""
    def stages(initial_start: timedelta, terminal_start: timedelta, handover: bool = True,
               air_start: timedelta | None = None) -> set[str]:
        h = History()
        vehicle(h, "v1")
        request(h, "t")
        h.add("transfer", "trip-a", "TripOpened", trip_id="a", transfer_id="t", vehicle_id="v1",
              destination_id="f", origin={}, return_required=True)
        h.add("transfer", "trip-a", "TripStepReported", trip_id="a", step="patient_aboard",
              client_event_id="a1", device_at=h.clock.isoformat())
        handed = h.clock + timedelta(minutes=1)
        if handover:
            h.add("transfer", "trip-a", "PatientHandedOver", trip_id="a", transfer_id="t", facility_id="f",
                  received_by="李", confirmed_by="crew")
        h.add("transfer", "trip-a", "TripCompleted", trip_id="a", transfer_id="t", vehicle_id="v1",
              **({} if handover else {"reason": "vehicle withdrawn"}))
        cycle(h, "c1", "a")
        first = stage(start=handed + initial_start)
        if air_start is not None:
            first["air"] = {"started_at": (handed + air_start).isoformat()}
        h.add("disinfection", "cycle-c1", "InitialDisinfectionLogged", cycle_id="c1", vehicle_id="v1",
              stage=first)
        h.add("disinfection", "cycle-c1", "TerminalDisinfectionLogged", cycle_id="c1", vehicle_id="v1",
              stage=stage(start=handed + terminal_start, stage="terminal"))
        return {f.check for f in h.found() if f.rule == "R8" and f.check != "stage_below_protocol"}

    assert stages(timedelta(minutes=20), timedelta(minutes=60)) == set()
    assert stages(timedelta(minutes=-5), timedelta(minutes=35)) == set()  # a clock a little off
    assert stages(timedelta(minutes=-120), timedelta(minutes=60)) == {"stage_before_trip_ended"}
    assert stages(timedelta(minutes=20), timedelta(minutes=40)) == {"terminal_overlaps_initial"}
    # The air treatment began the stage, two hours before the handover.
    assert stages(timedelta(minutes=20), timedelta(minutes=60), air_start=timedelta(minutes=-120)) == {
        "stage_before_trip_ended"}
    # A trip dispatch ended (a takeover) is dated when the transfer service heard: its last
    # step with the patient aboard bounds it instead.
    early = stages(timedelta(minutes=-120), timedelta(minutes=60), handover=False)
    assert early == {"stage_before_trip_ended"}
    assert stages(timedelta(minutes=20), timedelta(minutes=60), handover=False) == set()


def test_kpis_and_ledger_count_whole_local_days_a_time_stands_for_its_day() -> None:
    """A range within one day is that day (it was refused as empty); a `to` after midnight
    takes its day in (its morning was lost); local midnight, given in UTC, is a day's end."""
    from services.projection.api import _days

    assert _days("2024-05-01T10:00:00+08:00", "2024-05-01T18:00:00+08:00") == ("2024-05-01", "2024-05-02")
    assert _days("2024-05-01", "2024-05-02T12:00:00+08:00") == ("2024-05-01", "2024-05-03")
    assert _days("2024-05-01", "2024-05-02") == ("2024-05-01", "2024-05-02")
    assert _days(None, "2024-05-01T16:00:00Z") == (None, "2024-05-02")  # 00:00 in Yinchuan
    # Reversed within one day: refused as the violations refuse it, not taken for that day.
    with pytest.raises(InvalidField) as reversed_:
        _days("2024-05-01T18:00:00+08:00", "2024-05-01T09:00:00+08:00")
    assert (reversed_.value.field, reversed_.value.code) == ("to", "empty_range")


def test_verify_takes_links_archived_by_the_rule_before_for_what_they_were_not_for_edits() -> None:
    """Rows archived before links kept only ids (a number's text, an empty id, a long one)
    are no tampering; a row relinked to another transfer is."""
    from types import SimpleNamespace

    from services.projection.queries import _unlinked

    env = Envelope(event_id=uuid.uuid4(), type="TripStepReported", schema_version=1, store="transfer",
                   stream_id="trip-a", stream_version=1, position=1, occurred_at=T0.isoformat(),
                   recorded_at=T0.isoformat(), actor="crew", role="crew", correlation_id="corr-1",
                   payload={"transfer_id": 42, "trip_id": "", "vehicle_id": "v" * 250},
                   prev_hash="0" * 64, hash="0" * 64)

    def row(**links: Any) -> Any:
        return SimpleNamespace(seq=1, **{"transfer_key": "corr-1", "trip_id": None, "cycle_id": None,
                                         "vehicle_id": None, **links})

    assert _unlinked("transfer", [row()], [env], {}) is None  # as archived now
    legacy = row(transfer_key="42", trip_id="", vehicle_id="v" * 250)
    assert _unlinked("transfer", [legacy], [env], {}) is None
    edited = _unlinked("transfer", [row(transfer_key="nothing")], [env], {})
    assert edited is not None and "links" in edited.reason


def test_the_ledgers_format_follows_the_accept_headers_preferences() -> None:
    from services.projection.api import XLSX, negotiated

    assert negotiated(None) == negotiated("text/html,*/*;q=0.8") == "json"
    assert negotiated("text/csv") == "csv" and negotiated(XLSX) == "xlsx"
    assert negotiated("text/csv;q=0") == "json"  # refused, not taken
    assert negotiated(f"{XLSX};q=0, application/json") == "json"
    assert negotiated(f"text/csv;q=0.5, {XLSX};q=0.9") == "xlsx"
    assert negotiated("TEXT/CSV; q=1.0, application/json;q=bad") == "csv"


def test_r10_a_report_the_bureaus_system_never_took_is_a_finding_until_one_gets_through() -> None:
    """Dispatch reported at once, but every delivery to the bureau's system failed: the
    bureau was not told (the ledger said 报备失败 while the violations said nothing)."""
    h = History()
    request(h, "t")
    h.add("dispatch", "transfer-t", "TransferReported", transfer_id="t", reported_to="bureau",
          reported_by="120")
    h.add("dispatch", "report-t", "ReportDeliveryFailed", transfer_id="t", attempts=8, error="HTTP 503")
    later = h.clock + timedelta(hours=1)
    [failed] = [f for f in h.found(now=later) if f.rule == "R10"]
    assert (failed.check, failed.kind, failed.transfer_id) == ("report_not_delivered", "violation", "t")
    assert {e["type"] for e in failed.evidence} == {"TransferReported", "ReportDeliveryFailed"}
    h.add("dispatch", "report-t", "ReportDelivered", transfer_id="t", attempts=9)
    assert not [f for f in h.found(now=later) if f.rule == "R10"]


def test_r12_r13_r14() -> None:
    h = History()
    h.add("transfer", "trip-x", "TripOpened", trip_id="x", transfer_id="ghost", vehicle_id="v1",
          destination_id=None, origin={}, return_required=False)
    request(h, "case", risk="confirmed", origin_kind="fever_clinic")
    cycle(h, "c1", "x")
    h.add("disinfection", "cycle-c1", "SurfaceSwabCollected", cycle_id="c1", vehicle_id="v1",
          sample_id="s1", sites=["a", "b", "c"], collected_by="x", collected_at=T0.isoformat())
    found = h.found(now=h.clock + timedelta(hours=7))
    assert codes(found) >= {("R12", "trip_without_request"), ("R13", "fever_clinic_case_delayed"),
                            ("R14", "swab_result_overdue")}


def test_every_check_runs_on_the_catalogue_and_one_waits_without_its_events() -> None:
    """Each check names event types the services really emit: all of them run today. A
    check whose events the catalogue lacked would be reported as waiting, not passing."""
    assert {r["status"] for r in findings.rules_status(KNOWN)} == {"checked"}
    status = {r["check"]: r for r in findings.rules_status(KNOWN - {"PatientAdmitted"})}
    assert status["loop_not_closed"]["status"] == "waiting"
    assert status["loop_not_closed"]["waiting_on"] == "PatientAdmitted"


def test_unknown_event_types_are_tolerated() -> None:
    h = History()
    vehicle(h, "v1")
    h.add("dispatch", "vehicle-v1", "VehiclePositionReported", vehicle_id="v1", lat=1)
    h.add("transfer", "trip-a", "SomethingNobodyKnows", trip_id="a", x=[1, 2])
    assert h.found() == []


# -- order independence ------------------------------------------------------------------


def full_history() -> History:
    h = History()
    vehicle(h, "v1")
    h.add("dispatch", "facility-f", "FacilityRegistered", facility_id="f", name="f", roles=["fever_clinic"],
          location={"lat": 38.0, "lon": 106.0})
    for n in range(3):
        tid, trip, cid = f"t{n}", f"trip{n}", f"c{n}"
        request(h, tid)
        h.add("dispatch", f"transfer-{tid}", "TransferPrioritized", transfer_id=tid, priority=2, reason="r")
        h.add("dispatch", f"transfer-{tid}", "TransferReported", transfer_id=tid, reported_to="bureau",
              reported_by="站")
        h.add("dispatch", f"transfer-{tid}", "DestinationAssigned", transfer_id=tid, facility_id="f",
              reason="r")
        h.add("dispatch", "vehicle-v1", "VehicleReserved", vehicle_id="v1", transfer_id=tid)
        h.add("dispatch", f"transfer-{tid}", "VehicleAssigned", transfer_id=tid, vehicle_id="v1",
              destination_id="f", origin={}, return_required=True, reason="r")
        h.add("transfer", f"trip-{trip}", "TripOpened", trip_id=trip, transfer_id=tid, vehicle_id="v1",
              destination_id="f", origin={}, return_required=True)
        for step in ("acknowledged", "en_route", "at_pickup", "patient_aboard", "at_destination"):
            h.add("transfer", f"trip-{trip}", "TripStepReported", trip_id=trip, step=step,
                  client_event_id=f"{trip}{step}", device_at=h.clock.isoformat())
        h.add("transfer", f"trip-{trip}", "PatientHandedOver", trip_id=trip, transfer_id=tid, facility_id="f",
              received_by="李", confirmed_by="crew")
        h.add("transfer", f"trip-{trip}", "TripCompleted", trip_id=trip, transfer_id=tid, vehicle_id="v1")
        h.add("dispatch", "vehicle-v1", "VehicleAwaitingDisinfection", vehicle_id="v1", trip_id=trip)
        cycle(h, cid, trip)
        back = h.clock  # the vehicle back at the washing bay: one stage after the other
        h.add("disinfection", f"cycle-{cid}", "InitialDisinfectionLogged", cycle_id=cid, vehicle_id="v1",
              stage=stage(start=back))
        h.add("disinfection", f"cycle-{cid}", "TerminalDisinfectionLogged", cycle_id=cid, vehicle_id="v1",
              stage=stage(start=back + timedelta(minutes=40), stage="terminal"))
        h.add("disinfection", f"cycle-{cid}", "SurfaceSwabCollected", cycle_id=cid, vehicle_id="v1",
              sample_id=f"s{n}", sites=["a", "b", "c"], collected_by="x", collected_at=h.clock.isoformat())
        h.add("disinfection", f"cycle-{cid}", "VehicleReleased", cycle_id=cid, vehicle_id="v1", trip_id=trip,
              policy="p")
        h.add("disinfection", f"cycle-{cid}", "SwabResultRecorded", cycle_id=cid, vehicle_id="v1",
              sample_id=f"s{n}", result="negative" if n < 2 else "positive", lab="l",
              reported_at=h.clock.isoformat())
        h.add("dispatch", "vehicle-v1", "VehicleReturnedToService", vehicle_id="v1", trip_id=trip,
              cycle_id=cid)
    return h


def interleave(events: list[Ev], seed: int) -> list[Ev]:
    """Any order that keeps each stream's own order (all that Kafka promises)."""
    rng = random.Random(seed)
    streams: dict[str, list[Ev]] = {}
    for ev in events:
        streams.setdefault(ev.stream_id, []).append(ev)
    queues = [list(q) for q in streams.values()]
    out: list[Ev] = []
    while queues:
        q = rng.choice(queues)
        out.append(q.pop(0))
        if not q:
            queues.remove(q)
    return out


def folded(events: list[Ev]) -> dict[str, Any]:
    buf = Buffer()
    for ev in events:
        buf.add_event(ev)
    return buf.rows


@settings(max_examples=40, deadline=None)
@given(st.integers(min_value=0, max_value=2**32))
def test_fold_is_the_same_whatever_the_interleaving(seed: int) -> None:
    h = full_history()
    assert folded(interleave(h.events, seed)) == folded(h.events)


@settings(max_examples=20, deadline=None)
@given(st.integers(min_value=0, max_value=2**32))
def test_findings_do_not_depend_on_the_order_rows_are_loaded_in(seed: int) -> None:
    """The live model and a rebuild load the same rows in whatever order the database
    returns them: the findings, evidence included, must come out the same."""
    h = full_history()
    h.add("dispatch", "transfer-t0", "RuleOverridden", rule="R3", transfer_id="t0", vehicle_id="v1",
          reason="r", detail="d")
    h.add("dispatch", "transfer-t0", "RuleOverridden", rule="R5", transfer_id="t0", vehicle_id="v1",
          reason="r", detail="d")
    h.add("dispatch", "transfer-t0", "VehicleAssigned", transfer_id="t0", vehicle_id="v1", destination_id="f",
          origin={}, return_required=True, manual=True, override_reason="r", reason="r")
    rng = random.Random(seed)
    data = h.data()
    shuffled = h.data()
    for name in ("decisions", "vehicle_log", "others", "facility_loads"):
        rng.shuffle(getattr(shuffled, name))
    for name in ("transfers", "trips", "cycles", "swabs"):
        items = list(getattr(shuffled, name).items())
        rng.shuffle(items)
        setattr(shuffled, name, dict(items))
    views = [[f.view() for f in findings.evaluate(d, h.clock, KNOWN)] for d in (data, shuffled)]
    assert views[0] == views[1] and views[0]


def test_pages_merge_like_one_fold() -> None:
    """A rebuild merges pages; the live path one event at a time: same rows."""
    h = full_history()
    whole = folded(h.events)
    merged = Buffer()
    for _, chunk in itertools.groupby(enumerate(h.events), key=lambda p: p[0] // 7):
        page = Buffer()
        for _, ev in chunk:
            page.add_event(ev)
        for table, rows in page.rows.items():
            merged.add(Fact(table, key, values) for key, values in rows.items())
    assert merged.rows == whole


def test_a_workers_reply_comes_back_as_it_was_sent() -> None:
    """A rebuild's fold workers send their rows to the parent with marshal (plain values
    only), anything else with pickle: either way the parent reads what was folded."""
    buf = Buffer()
    for ev in full_history().events:
        buf.add_event(ev)
    reply = ("ok", (buf.rows, {"decisions": buf.records("decisions")}, buf.events, buf.unreadable))
    body = slices.pack(reply)
    assert body[:1] == b"m" and slices.unpack(body) == reply
    odd = ("ok", (buf.rows, datetime(2022, 11, 20, tzinfo=UTC)))
    body = slices.pack(odd)
    assert body[:1] == b"p" and slices.unpack(body) == odd


def test_clean_history_has_no_findings_and_views_add_up() -> None:
    h = full_history()
    data = h.data()
    found = findings.evaluate(data, h.clock, KNOWN)
    # Only the positive swab's own consequences: the vehicle was not quarantined, and no
    # exposure list was produced (R9 asks for both).
    assert codes(found) == {("R9", "positive_not_quarantined"), ("R9", "exposure_list_missing")}, codes(found)
    ex = exposures(data, "v1")
    assert [t["transfer_id"] for t in ex[0]["transfers"]] == ["t2"] and ex[0]["since_negative_sample"] == "s1"
    k = kpis.indicators(data, h.clock)
    assert k["transfers"] == 3 and k["overall"]["segments"]["at_pickup_to_at_destination"]["p50"] == 120
    assert k["overall"]["dispatch_within_3_min"]["rate"] == 0.0  # 6 min between request and assignment


def test_each_view_reads_only_the_tables_it_names() -> None:
    """The routes load only a view's READS (the ledger over a year of history need not read
    every decision and vehicle log): over those alone each view comes out as over all."""
    h = full_history()
    everything = h.data()

    def only(names: tuple[str, ...]) -> AuditData:
        return AuditData(**{name: getattr(everything, name) for name in names})

    assert ledger.rows(only(ledger.READS)) == ledger.rows(everything) != []
    assert kpis.indicators(only(kpis.READS), h.clock) == kpis.indicators(everything, h.clock)
    assert exposures(only(custody.EXPOSURE_READS)) == exposures(everything) != []
    listed = full_history()
    listed.add("disinfection", "cycle-c2", "ExposureListProduced", vehicle_id="v1", sample_id="s2",
               cycle_id="c2", transfer_id="t2", last_negative_sample_id="s1", bounded_by_sample_id=None,
               transfers=[{"transfer_id": "t2", "relation": "swabbed_trip"}])
    with_list = listed.data()
    assert exposures(AuditData(**{n: getattr(with_list, n) for n in custody.EXPOSURE_READS})) == exposures(
        with_list)
    assert exposures(with_list)[0]["list"]["transfers"] == ["t2"]
    assert (custody.custody(only(custody.READS), "v1", []) == custody.custody(everything, "v1", [])
            is not None)


# -- KPIs and privacy -----------------------------------------------------------------------


def test_percentiles_are_nearest_rank() -> None:
    values = [float(v) for v in range(1, 21)]
    assert (kpis.percentile(values, 50), kpis.percentile(values, 90), kpis.percentile(values, 95)) == (
        10.0, 18.0, 19.0)
    assert kpis.percentile([], 50) is None
    assert kpis.summarize([5.0, -3.0, None, 7.0]) == {"n": 2, "negative": 1, "p50": 5.0, "p90": 7.0,
                                                      "p95": 7.0}


def test_a_malformed_known_event_is_skipped_not_fatal() -> None:
    h = History()
    h.add("dispatch", "transfer-x", "TransferRequested", note="no transfer_id in this payload")
    request(h, "t1")
    buf = Buffer()
    for ev in h.events:
        buf.add_event(ev)
    assert buf.unreadable == 1 and list(buf.rows["transfers"]) == [("t1",)]


def test_a_failing_check_does_not_hide_the_others() -> None:
    h = History()
    vehicle(h, "v1")
    h.add("dispatch", "vehicle-v1", "VehicleReserved", vehicle_id="v1", transfer_id="t1")
    h.add("dispatch", "vehicle-v1", "VehicleReserved", vehicle_id="v1", transfer_id="t2")
    data = h.data()
    data.trips["broken"] = {"trip_id": "broken", "vehicle_id": "v1", "opened": {"recorded_at": "not a time"}}
    failed: list[dict[str, str]] = []
    found = findings.evaluate(data, h.clock, KNOWN, failed)
    assert ("R1", "vehicle_reserved_twice") in codes(found)
    assert failed and all(f["error"] for f in failed)


# -- cancelled transfers, aborted trips and the 报备's delivery in the views ----------------


def takeover_history(picked_up: bool = False) -> History:
    """A confirmed case from a fever clinic: v1 breaks down on the way (its trip aborts;
    `picked_up`: after it reached the patient and took them aboard, so its trip completes
    and v2 takes the patient over), v2 carries the patient to the designated hospital
    within the hour. As the services write it: each trip names the assignment it opened
    from, and a takeover the vehicle it takes over from."""
    h = History()
    for vid in ("v1", "v2"):
        vehicle(h, vid)
    h.add("dispatch", "facility-f", "FacilityRegistered", facility_id="f", name="定点医院",
          roles=["designated"], location={"lat": 38.0, "lon": 106.0})
    request(h, "t", risk="confirmed", origin_kind="fever_clinic")
    h.add("dispatch", "transfer-t", "DestinationAssigned", transfer_id="t", facility_id="f", reason="r")
    for n, vid in enumerate(("v1", "v2")):
        takeover = "v1" if n == 1 and picked_up else None
        assigned = h.add("dispatch", "transfer-t", "VehicleAssigned", transfer_id="t", vehicle_id=vid,
                         destination_id="f", origin={}, return_required=False, reason="r",
                         takeover_of=takeover)
        h.add("transfer", f"trip-{vid}", "TripOpened", trip_id=vid, transfer_id="t", vehicle_id=vid,
              destination_id="f", origin={}, return_required=False, takeover_of=takeover,
              assignment_event_id=assigned.event_id)
        h.add("transfer", f"trip-{vid}", "TripStepReported", trip_id=vid, step="en_route",
              client_event_id=f"{vid}en", device_at=h.clock.isoformat())
        if picked_up or n == 1:
            for step in ("at_pickup", "patient_aboard"):
                h.add("transfer", f"trip-{vid}", "TripStepReported", trip_id=vid, step=step,
                      client_event_id=f"{vid}{step}", device_at=h.clock.isoformat())
        if n == 0:
            h.add("dispatch", "transfer-t", "VehicleWithdrawn", transfer_id="t", vehicle_id=vid,
                  reason="breakdown", patient_aboard=picked_up)
            h.add("transfer", f"trip-{vid}", "TripCompleted" if picked_up else "TripAborted", trip_id=vid,
                  transfer_id="t", vehicle_id=vid, reason="vehicle withdrawn: breakdown")
    h.add("transfer", "trip-v2", "PatientHandedOver", trip_id="v2", transfer_id="t", facility_id="f",
          received_by="李", confirmed_by="crew")
    h.add("transfer", "trip-v2", "TripCompleted", trip_id="v2", transfer_id="t", vehicle_id="v2")
    return h


def test_the_trip_that_carried_the_patient_counts_not_the_aborted_one() -> None:
    """R13 and the indicators read the trip that handed the patient over: a vehicle that
    broke down before pickup did not leave the case undelivered."""
    h = takeover_history()
    found = h.found(now=h.clock + timedelta(hours=3))
    assert ("R13", "fever_clinic_case_delayed") not in codes(found), codes(found)
    data = h.data().indexed()
    assert data.carrying_trip("t")["trip_id"] == "v2"  # type: ignore[index]
    (row,) = kpis.rows(data)
    assert row.vehicle_id == "v2" and row.segments["request_to_handover"] is not None
    by_trip = {r["trip_id"]: r["status"] for r in ledger.rows(data)}
    assert by_trip == {"v1": "aborted", "v2": "completed"}


def test_after_a_takeover_each_segment_is_timed_within_one_vehicle() -> None:
    """NEMSIS times a responding unit: the takeover vehicle's way to the patient runs from
    its own dispatch, not from the first assignment (another vehicle's); the response ends
    when the first vehicle reached the patient; request to dispatch is the first assignment."""
    data = takeover_history(picked_up=True).data().indexed()
    first, second = data.trips["v1"], data.trips["v2"]
    (row,) = kpis.rows(data)
    m = kpis.milestones(data, "t")
    # v2's dispatch is the assignment its trip opened from (not the trip's opening, the
    # transfer service's clock when it heard of it): two minutes before it went en route.
    reassigned = data.transfers["t"]["reassigned"]
    assert second["opened"]["assignment_event_id"] == reassigned["event_id"]
    assert m["unit_dispatched"] == reassigned["at"] and m["en_route"] == second["s_en_route"]["at"]
    assert row.segments["dispatch_to_en_route"] == 120
    assert m["first_at_pickup"] == first["s_at_pickup"]["at"]
    assert row.segments["response"] == seconds(m["requested"], first["s_at_pickup"]["at"])
    assert m["dispatched"] == data.transfers["t"]["assigned"]["at"]  # v1's: the 3-minute rate's
    assert data.transfers["t"]["assigned"]["vehicle_id"] == "v1"
    # The ledger's row of each trip: its own vehicle's dispatch, not the first one's for both.
    dispatched = {r["trip_id"]: r["dispatched_at"] for r in ledger.rows(data)}
    assert dispatched["v1"] < dispatched["v2"], dispatched  # v2 was given after v1 broke down
    assert {r["trip_id"]: r["destination"] for r in ledger.rows(data)} == {"v1": "定点医院", "v2": "定点医院"}


def _dispatched(h: History, tid: str, vid: str) -> None:
    request(h, tid)
    vehicle(h, vid)
    h.add("dispatch", f"transfer-{tid}", "VehicleAssigned", transfer_id=tid, vehicle_id=vid,
          destination_id="f", origin={}, return_required=False, manual=False, override_reason=None,
          reason="nearest", candidates=[])
    h.add("transfer", f"trip-{vid}", "TripOpened", trip_id=vid, transfer_id=tid, vehicle_id=vid,
          destination_id="f", origin={}, return_required=False)


def test_the_3_minute_departure_rate_counts_each_trip_from_its_dispatch_to_en_route() -> None:
    """The national 3分钟出车率: a vehicle on its way within 3 minutes of its dispatch, a count
    per trip; a crew 14 minutes late is a miss, whatever the wait for a vehicle was (none
    here: the request-to-dispatch rate is met)."""
    h = History()
    _dispatched(h, "slow", "v1")
    h.clock += timedelta(minutes=14)
    h.add("transfer", "trip-v1", "TripStepReported", trip_id="v1", step="en_route", client_event_id="e1",
          device_at=h.clock.isoformat())
    _dispatched(h, "quick", "v2")
    h.add("transfer", "trip-v2", "TripStepReported", trip_id="v2", step="en_route", client_event_id="e2",
          device_at=h.clock.isoformat())
    _dispatched(h, "stuck", "v3")  # not left, 3 minutes on: a miss
    _dispatched(h, "called_off", "v4")  # aborted within its 3 minutes: not counted
    h.add("transfer", "trip-v4", "TripAborted", trip_id="v4", transfer_id="called_off", vehicle_id="v4",
          reason="transfer cancelled")
    _dispatched(h, "young", "v5")  # dispatched a minute ago: not counted yet
    k = kpis.indicators(h.data(), h.clock + timedelta(minutes=1))
    departure = k["overall"]["departure_within_3_min"]
    assert (departure["counted"], departure["met"], departure["meets_target"]) == (3, 1, False), departure
    assert k["overall"]["dispatch_within_3_min"]["rate"] == 1.0  # each given a vehicle at once
    assert k["by_vehicle"]["v1"]["departure_within_3_min"]["met"] == 0
    assert k["by_vehicle"]["v5"]["departure_within_3_min"] == {
        "within_seconds": 180, "target": 0.95, "counted": 0, "met": 0, "negative": 0, "rate": None,
        "meets_target": None}  # nothing counted is no verdict


def test_a_vehicle_that_did_not_finish_a_transfer_has_its_trip_in_its_figures() -> None:
    """After a takeover, v1 carried the patient for a while and is disinfected: its trip
    (its departure, its steps) counts for v1, not only v2's for v2."""
    data = takeover_history(picked_up=True).data()
    k = kpis.indicators(data, datetime(2030, 1, 1, tzinfo=UTC))
    assert set(k["by_vehicle"]) == {"v1", "v2"} and k["trips"] == 2
    v1 = k["by_vehicle"]["v1"]
    assert v1["transfers"] == 0 and v1["trips"] == 1  # it carried no transfer to the end
    assert v1["segments"]["dispatch_to_en_route"]["n"] == v1["segments"]["en_route_to_at_pickup"]["n"] == 1
    assert v1["departure_within_3_min"]["counted"] == 1
    assert k["overall"]["departure_within_3_min"]["counted"] == 2


def test_a_transfer_cancelled_before_the_target_is_not_a_miss_and_the_ledger_says_cancelled() -> None:
    h = History()
    request(h, "early")
    h.add("dispatch", "transfer-early", "TransferCancelled", transfer_id="early", reason="家属取消",
          at=h.clock)  # a minute after the request (the History's clock)
    request(h, "late")
    h.clock += timedelta(minutes=10)
    h.add("dispatch", "transfer-late", "TransferCancelled", transfer_id="late", reason="等待过久")
    request(h, "waiting")
    data = h.data()
    rate = kpis.indicators(data, h.clock + timedelta(minutes=5))["overall"]["dispatch_within_3_min"]
    assert (rate["counted"], rate["met"]) == (2, 0)  # the late cancel and the one still waiting
    assert {r["transfer_id"]: r["status"] for r in ledger.rows(data)} == {
        "early": "cancelled", "late": "cancelled", "waiting": "waiting"}


def test_the_ledger_says_when_the_report_did_not_reach_the_bureau() -> None:
    h = History()
    for tid in ("failed", "delivered", "unsent"):
        request(h, tid)
        h.add("dispatch", f"transfer-{tid}", "TransferReported", transfer_id=tid, reported_to="bureau",
              reported_by="站")
    h.add("dispatch", "transfer-failed", "ReportDeliveryFailed", transfer_id="failed", url="u", attempts=5,
          error="refused")
    h.add("dispatch", "transfer-delivered", "ReportDeliveryFailed", transfer_id="delivered", url="u",
          attempts=5, error="refused")
    h.add("dispatch", "transfer-delivered", "ReportDelivered", transfer_id="delivered", url="u", attempts=1,
          status_code=200)
    request(h, "unreported")
    got = {r["transfer_id"]: (r["reported"], r["report_delivery"]) for r in ledger.rows(h.data())}
    assert got == {"failed": ("报备失败", "送达失败"), "delivered": ("已报备", "已送达"),
                   "unsent": ("已报备", None), "unreported": ("未报备", None)}


def test_the_ledger_csv_does_not_run_what_was_typed_as_a_formula() -> None:
    """OWASP's CSV injection: a name typed as a formula is shown as text by Excel."""
    h = History()
    h.add("dispatch", "transfer-t", "TransferRequested", transfer_id="t",
          patient={"name": '=HYPERLINK("http://x","王五")', "id_number": None, "phone": None},
          risk_category="isolation_site", condition={}, origin={"kind": "isolation_site", "name": "+1 楼"},
          purpose="outpatient_visit", return_required=False, requested_by={"channel": "console"})
    text = ledger.to_csv(ledger.rows(h.data())).decode("utf-8-sig")
    assert "'=HYPERLINK" in text and "'+1 楼" in text
    assert ',=' not in text and ',+' not in text


def test_the_ledger_files_name_categories_purposes_and_statuses_as_the_bureau_does() -> None:
    """The CSV and XLSX are read at the health bureau: 集中隔离点人员, not isolation_site; the
    JSON keeps the codes for systems; a code the labels do not know yet is shown as it is."""
    row = {"patient_name": "李四", "risk_category": "isolation_site", "purpose": "outpatient_visit",
           "status": "taken_over", "origin": "on_trip"}
    [cells] = list(csv.reader(io.StringIO(ledger.to_csv([row]).decode("utf-8-sig"))))[1:]
    shown = dict(zip([k for k, _ in ledger.COLUMNS], cells, strict=True))
    labels = (shown["risk_category"], shown["purpose"], shown["status"])
    assert labels == ("集中隔离点人员", "就医", "换车接续")
    assert shown["origin"] == "on_trip"  # a place's name is never relabelled
    with zipfile.ZipFile(io.BytesIO(ledger.to_xlsx([{**row, "status": "a_newer_status"}]))) as book:
        sheet = book.read("xl/worksheets/sheet1.xml").decode()
    assert "集中隔离点人员" in sheet and "a_newer_status" in sheet and "isolation_site" not in sheet


def test_the_ledger_csv_keeps_every_digit_of_a_number_in_clear() -> None:
    """The health bureau reads the ledger in clear: opened in Excel, an 18-digit id was a
    number (6.40121E+17, its last digits gone) and a landline lost its leading 0."""
    row = {"id_number": "640121198001011231", "phone": "09515012345", "patient_name": "李四",
           "trip_id": "13800138000"}
    [cells] = list(csv.reader(io.StringIO(ledger.to_csv([row]).decode("utf-8-sig"))))[1:]
    shown = dict(zip([k for k, _ in ledger.COLUMNS], cells, strict=True))
    assert (shown["id_number"], shown["phone"]) == ("\t640121198001011231", "\t09515012345")
    assert (shown["patient_name"], shown["trip_id"]) == ("李四", "13800138000")  # 11 digits: exact


def test_the_ledger_xlsx_has_its_times_and_days_as_spreadsheet_dates_in_local_time() -> None:
    """The bureau sorts and filters the 台账 by time: the cells are dates, not text, in
    the region's civil time (a spreadsheet's dates have no zone); what is not a time stays
    as it was recorded."""
    row = {"day": "2026-11-24", "patient_name": "李四", "requested_at": "2026-11-24T00:27:05+08:00",
           "handed_over_at": "2026-11-23T17:40:00+00:00", "reported_at": "not a time"}
    with zipfile.ZipFile(io.BytesIO(ledger.to_xlsx([row]))) as book:
        sheet = ElementTree.fromstring(book.read("xl/worksheets/sheet1.xml"))
        styles = book.read("xl/styles.xml").decode()
    ns = {"x": "http://schemas.openxmlformats.org/spreadsheetml/2006/main"}
    cells = {c.get("r"): c for c in sheet.iterfind(".//x:sheetData/x:row/x:c", ns)}
    letter = {key: chr(ord("A") + i) for i, (key, _) in enumerate(ledger.COLUMNS)}

    def serial(when: datetime) -> float:
        return (when - datetime(1899, 12, 30)).total_seconds() / 86400

    def number(key: str) -> float:
        cell = cells[f"{letter[key]}2"]
        assert cell.get("t") is None and cell.get("s"), key  # a styled number, not a string
        return float(cell.findtext("x:v", namespaces=ns) or "nan")

    assert number("day") == serial(datetime(2026, 11, 24))
    assert abs(number("requested_at") - serial(datetime(2026, 11, 24, 0, 27, 5))) < 1e-6
    assert abs(number("handed_over_at") - serial(datetime(2026, 11, 24, 1, 40))) < 1e-6  # UTC to +08:00
    assert cells[f"{letter['reported_at']}2"].get("t") == "inlineStr"
    assert "not a time" in ElementTree.tostring(cells[f"{letter['reported_at']}2"]).decode()
    assert cells[f"{letter['patient_name']}2"].get("t") == "inlineStr"
    assert 'formatCode="yyyy-mm-dd hh:mm:ss"' in styles and 'formatCode="yyyy-mm-dd"' in styles
    # Times no spreadsheet date reaches stay text; one past the calendar in +08:00 too.
    assert ledger._spreadsheet_time("1899-12-31T23:00:00+08:00", False) is None
    assert ledger._spreadsheet_time("9999-12-31T23:00:00-01:00", False) is None
    assert ledger._local("9999-12-31T23:00:00-01:00") == "9999-12-31T23:00:00-01:00"


def test_a_return_legs_destination_is_where_the_outbound_leg_started() -> None:
    h = History()
    request(h, "out")
    h.add("dispatch", "transfer-back", "TransferRequested", transfer_id="back",
          patient={"name": "张三"}, risk_category="isolation_site", condition={},
          origin={"kind": "hospital", "name": "医院"}, purpose="return", return_required=False,
          return_of="out", requested_by={"channel": "console"})
    h.add("dispatch", "transfer-back", "DestinationAssigned", transfer_id="back", facility_id="origin",
          reason="return leg")
    rows = {r["transfer_id"]: r for r in ledger.rows(h.data())}
    assert rows["back"]["destination"] == "o"  # the outbound request's origin name


def test_who_received_the_patient_is_the_hospitals_confirmation_when_the_crew_named_nobody() -> None:
    """The crew's handed_over step records the handover with no receiver; the hospital
    confirms afterwards and names them: the ledger (R12) and the custody chain show that name."""
    h = History()
    request(h, "t")
    vehicle(h, "v2")
    h.add("dispatch", "transfer-t", "VehicleAssigned", transfer_id="t", vehicle_id="v2", destination_id="f",
          origin={}, return_required=False, manual=False, override_reason=None, reason="nearest",
          candidates=[])
    h.add("transfer", "trip-v2", "TripOpened", trip_id="v2", transfer_id="t", vehicle_id="v2",
          destination_id="f", origin={}, return_required=False)
    h.add("transfer", "trip-v2", "PatientHandedOver", trip_id="v2", transfer_id="t", facility_id="f",
          received_by="", confirmed_by="crew")
    h.add("transfer", "trip-v2", "HandoverConfirmed", trip_id="v2", transfer_id="t", facility_id="f",
          received_by="李医生", confirmed_by="hospital")
    (row,) = ledger.rows(h.data())
    assert row["received_by"] == "李医生"
    chain = custody.custody(h.data(), "v2", [])
    assert chain is not None and chain["links"][0]["handed_over"]["received_by"] == "李医生"


def test_custody_shows_an_aborted_trip_the_swabs_proofs_an_early_release_and_an_open_quarantine() -> None:
    chain = custody.custody(takeover_history().data(), "v1", [])
    assert chain is not None
    (link,) = chain["links"]
    assert link["aborted"]["reason"] == "vehicle withdrawn: breakdown" and link["aborted"]["event_id"]

    h = full_history()
    h.add("disinfection", "cycle-c2", "VehicleQuarantined", cycle_id="c2", vehicle_id="v1", sample_id="s2",
          reason="positive swab", redisinfection_cycle_id="r2")
    h.add("disinfection", "cycle-r2", "CycleOpened", cycle_id="r2", vehicle_id="v1", trip_id=None,
          transfer_id=None, reason="positive swab", kind="redisinfection")
    quarantined = custody.custody(h.data(), "v1", [])
    assert quarantined is not None and not quarantined["complete"]
    swab = quarantined["links"][0]["cycles"][0]["swabs"][0]
    assert swab["collection"]["event_id"] and swab["result_logged"]["actor"] == "system"
    h.add("disinfection", "cycle-r2", "VehicleReleased", cycle_id="r2", vehicle_id="v1", trip_id=None,
          policy="p", override=True, override_reason="supervisor: lab confirmed", missing=["swab"])
    lifted = custody.custody(h.data(), "v1", [])
    assert lifted is not None and lifted["complete"]
    released = lifted["links"][-1]["cycles"][0]["released"]
    assert released["override"] and released["missing"] == ["swab"], released


def test_custody_follows_a_superseded_redisinfection_and_the_vehicles_own_status() -> None:
    """A second positive swab while the first re-disinfection was open: that cycle gives
    way to the newer one, which lifts both quarantines when it releases the vehicle. The
    vehicle's own word (out of service, back in service lifting the quarantine) is shown."""
    h = full_history()  # s2 of c2: positive
    h.add("disinfection", "cycle-c2", "VehicleQuarantined", cycle_id="c2", vehicle_id="v1", sample_id="s2",
          reason="positive swab", redisinfection_cycle_id="r2")
    h.add("disinfection", "cycle-r2", "CycleOpened", cycle_id="r2", vehicle_id="v1", trip_id="trip2",
          transfer_id="t2", reason="positive swab", kind="redisinfection", after_sample_id="s2")
    h.add("dispatch", "vehicle-v1", "VehicleTakenOutOfService", vehicle_id="v1", reason="R9 quarantine")
    h.add("disinfection", "cycle-r2", "CycleSuperseded", cycle_id="r2", vehicle_id="v1", by_cycle_id="r3",
          sample_id="s9")
    h.add("disinfection", "cycle-r3", "CycleOpened", cycle_id="r3", vehicle_id="v1", trip_id="trip2",
          transfer_id="t2", reason="positive swab", kind="redisinfection", after_sample_id="s9")
    held = custody.custody(h.data(), "v1", [])
    assert held is not None and not held["complete"]
    # The re-disinfections are links of their own, in their place in time, after trip2's.
    assert [(link["trip_id"] or link["for_trip_id"], [c["cycle_id"] for c in link["cycles"]])
            for link in held["links"]] == [("trip0", ["c0"]), ("trip1", ["c1"]), ("trip2", ["c2"]),
                                           ("trip2", ["r2"]), ("trip2", ["r3"])]
    r2 = next(c for link in held["links"] for c in link["cycles"] if c["cycle_id"] == "r2")
    assert r2["superseded"]["by_cycle_id"] == "r3" and r2["superseded"]["event_id"], r2
    h.add("disinfection", "cycle-r3", "VehicleReleased", cycle_id="r3", vehicle_id="v1", trip_id="trip2",
          policy="p", quarantine_lifted=True)
    h.add("dispatch", "vehicle-v1", "VehicleReturnedToService", vehicle_id="v1", trip_id="trip2",
          cycle_id="r3", quarantine_lifted=True)
    lifted = custody.custody(h.data(), "v1", [])
    assert lifted is not None and lifted["complete"], lifted["links"][-1]
    status = [(s["type"], s.get("reason"), s.get("quarantine_lifted")) for s in lifted["status_changes"]]
    assert ("VehicleTakenOutOfService", "R9 quarantine", None) in status
    assert status[-1] == ("VehicleReturnedToService", None, True), status
    assert "reason" in lifted["links"][0]["completed"]


def test_a_trip_is_on_the_ledger_of_its_own_day_not_its_requests() -> None:
    """A care-series visit booked the evening before is an outgoing trip of the next day."""
    h = History()
    h.clock = datetime(2022, 11, 20, 15, 0, tzinfo=UTC)  # 23:00 in the region
    request(h, "booked")
    h.clock = datetime(2022, 11, 21, 0, 0, tzinfo=UTC)  # 08:00 the next day
    h.add("transfer", "trip-b", "TripOpened", trip_id="b", transfer_id="booked", vehicle_id="v1",
          destination_id="f", origin={}, return_required=False)
    data = h.data()
    assert [r["trip_id"] for r in ledger.rows(data, "2022-11-21", "2022-11-22")] == ["b"]
    assert ledger.rows(data, "2022-11-20", "2022-11-21") == []


def test_a_trip_after_the_positive_result_is_exposed_until_a_sample_comes_back_negative() -> None:
    """R9 forbids it; if it happened, its patient was exposed all the same."""
    h = full_history()  # trip2's cycle c2 took sample s2: positive
    for trip in ("late", "clean"):
        if trip == "clean":
            cycle(h, "c9", None)
            h.add("disinfection", "cycle-c9", "SurfaceSwabCollected", cycle_id="c9", vehicle_id="v1",
                  sample_id="s9", sites=["a", "b", "c"], collected_by="x", collected_at=h.clock.isoformat())
            h.add("disinfection", "cycle-c9", "SwabResultRecorded", cycle_id="c9", vehicle_id="v1",
                  sample_id="s9", result="negative", lab="l", reported_at=h.clock.isoformat())
        request(h, trip)
        h.add("transfer", f"trip-{trip}", "TripOpened", trip_id=trip, transfer_id=trip, vehicle_id="v1",
              destination_id="f", origin={}, return_required=False)
    (found,) = exposures(h.data())
    exposed = {t["trip_id"]: t["after_positive_result"] for t in found["transfers"]}
    assert exposed == {"trip2": False, "late": True}, exposed
    assert found["cleared_at"] is not None


def test_r9_a_quarantined_vehicle_is_released_only_after_a_negative_sample() -> None:
    def released_after_positive(negative_first: bool) -> set[tuple[str, str]]:
        h = full_history()  # s2 of cycle c2 came back positive
        h.add("disinfection", "cycle-c2", "VehicleQuarantined", cycle_id="c2", vehicle_id="v1",
              sample_id="s2", reason="positive swab", redisinfection_cycle_id="r2")
        h.add("disinfection", "cycle-r2", "CycleOpened", cycle_id="r2", vehicle_id="v1", trip_id=None,
              transfer_id=None, reason="positive swab", kind="redisinfection")
        h.add("disinfection", "cycle-r2", "SurfaceSwabCollected", cycle_id="r2", vehicle_id="v1",
              sample_id="s-r2", sites=["a", "b", "c"], collected_by="x", collected_at=h.clock.isoformat())
        if negative_first:
            h.add("disinfection", "cycle-r2", "SwabResultRecorded", cycle_id="r2", vehicle_id="v1",
                  sample_id="s-r2", result="negative", lab="l", reported_at=h.clock.isoformat())
        h.add("disinfection", "cycle-r2", "VehicleReleased", cycle_id="r2", vehicle_id="v1", trip_id=None,
              policy="p", quarantine_lifted=True)
        return {(f.check, f.kind) for f in h.found() if f.rule == "R9"}

    assert ("released_before_negative", "violation") in released_after_positive(negative_first=False)
    assert not {c for c, _ in released_after_positive(negative_first=True)} & {"released_before_negative"}


def test_r9_an_exposure_list_that_leaves_out_an_exposed_patient_is_found() -> None:
    """The disinfection service's list is read against the events a second time."""
    def listed(transfers: list[str], amended: str | None = None) -> History:
        h = full_history()  # s2 of trip2's cycle c2: positive; t2 exposed
        h.add("disinfection", "cycle-c2", "ExposureListProduced", vehicle_id="v1", sample_id="s2",
              cycle_id="c2", transfer_id="t2", last_negative_sample_id="s1", bounded_by_sample_id=None,
              transfers=[{"transfer_id": t, "relation": "swabbed_trip"} for t in transfers])
        if amended:
            h.add("disinfection", "cycle-c2", "ExposureListAmended", vehicle_id="v1", sample_id="s2",
                  transfer={"transfer_id": amended, "relation": "during_quarantine"})
        h.add("disinfection", "exposure-v1-s2", "ExposureListAcknowledged", vehicle_id="v1", sample_id="s2",
              acknowledged_by="d1", actor="d1", role="dispatcher")
        return h

    short = listed([])
    found = [f for f in short.found() if f.check == "exposure_list_incomplete"]
    assert [(f.transfer_id, f.vehicle_id) for f in found] == [("t2", "v1")]
    (view,) = exposures(short.data())
    assert view["list"]["missing"] == ["t2"] and view["list"]["acknowledged"][0]["by"] == "d1"
    assert not [f for f in listed(["t2"]).found() if f.check == "exposure_list_incomplete"]
    assert not [f for f in listed([], amended="t2").found() if f.check == "exposure_list_incomplete"]
    (view,) = exposures(listed([], amended="t2").data())
    assert view["list"]["status"] == "acknowledged"  # amended, then acknowledged
    late = listed(["t2"])  # acknowledged, then a patient added: not what was acknowledged
    late.add("disinfection", "cycle-c2", "ExposureListAmended", vehicle_id="v1", sample_id="s2",
             transfer={"transfer_id": "t9", "relation": "during_quarantine"})
    (view,) = exposures(late.data())
    assert view["list"]["status"] == "unacknowledged", view["list"]
    assert [a["transfer_id"] for a in view["list"]["amended"]] == ["t9"]


def positive_redisinfection(h: History, cid: str, trip: str, transfer: str, after: str, sample: str) -> None:
    """The re-disinfection a positive `after` ordered (its cycle names the trip), whose own
    swab comes back positive as well."""
    h.add("disinfection", f"cycle-{cid}", "CycleOpened", cycle_id=cid, vehicle_id="v1", trip_id=trip,
          transfer_id=transfer, reason="positive swab", kind="redisinfection", after_sample_id=after)
    h.add("disinfection", f"cycle-{cid}", "SurfaceSwabCollected", cycle_id=cid, vehicle_id="v1",
          sample_id=sample, sites=["a", "b", "c"], collected_by="x", collected_at=h.clock.isoformat())
    h.add("disinfection", f"cycle-{cid}", "SwabResultRecorded", cycle_id=cid, vehicle_id="v1",
          sample_id=sample, result="positive", lab="l", reported_at=h.clock.isoformat())


def test_r9_a_trip_ending_in_quarantine_on_the_newest_list_answers_for_the_older_ones() -> None:
    """s2 positive: its list names t2. A trip under way then ends after a second positive
    (the re-disinfection's): the disinfection service adds it to the newest list only,
    which is where the dispatcher reads it. The older list is not incomplete for that."""
    h = full_history()  # s2 of c2: positive
    list_of = {"vehicle_id": "v1", "last_negative_sample_id": "s1", "bounded_by_sample_id": None}
    h.add("disinfection", "exposure-v1-s2", "ExposureListProduced", sample_id="s2", cycle_id="c2",
          transfer_id="t2", transfers=[{"transfer_id": "t2", "relation": "swabbed_trip"}], **list_of)
    request(h, "t9")
    h.add("transfer", "trip-late", "TripOpened", trip_id="late", transfer_id="t9", vehicle_id="v1",
          destination_id="f", origin={}, return_required=False)
    positive_redisinfection(h, "r2", "trip2", "t2", after="s2", sample="sr2")
    h.add("disinfection", "exposure-v1-sr2", "ExposureListProduced", sample_id="sr2", cycle_id="r2",
          transfer_id="t2", transfers=[], **list_of)
    h.add("transfer", "trip-late", "TripCompleted", trip_id="late", transfer_id="t9", vehicle_id="v1")
    h.add("disinfection", "exposure-v1-sr2", "ExposureListAmended", vehicle_id="v1", sample_id="sr2",
          transfer={"transfer_id": "t9", "relation": "during_quarantine"})
    assert not [f for f in h.found() if f.check == "exposure_list_incomplete"]
    assert all(e["list"]["missing"] == [] for e in exposures(h.data()))
    # Left off every list, it is found, on the older list.
    h.events = [e for e in h.events if e.type != "ExposureListAmended"]
    assert [f.transfer_id for f in h.found() if f.check == "exposure_list_incomplete"] == ["t9", "t9"]


def test_r9_a_positive_redisinfection_swab_exposes_only_trips_after_the_last_negative() -> None:
    """Trip a's swab came back positive after trip b's negative one; the re-disinfection of
    a (its cycle names trip a) is positive too. Nothing rode since b's negative swab: the
    list is empty and right; trip a was exposed to sa, not to the re-disinfection's swab."""
    h = History()
    vehicle(h, "v1")
    for trip in ("a", "b"):
        request(h, f"t-{trip}")
        h.add("transfer", f"trip-{trip}", "TripOpened", trip_id=trip, transfer_id=f"t-{trip}",
              vehicle_id="v1", destination_id="f", origin={}, return_required=False)
        h.add("transfer", f"trip-{trip}", "TripCompleted", trip_id=trip, transfer_id=f"t-{trip}",
              vehicle_id="v1")
        cycle(h, f"c{trip}", trip)
        h.add("disinfection", f"cycle-c{trip}", "SurfaceSwabCollected", cycle_id=f"c{trip}", vehicle_id="v1",
              sample_id=f"s{trip}", sites=["a", "b", "c"], collected_by="x", collected_at=h.clock.isoformat())
    for sample, result in (("sb", "negative"), ("sa", "positive")):
        h.add("disinfection", f"cycle-c{sample[1]}", "SwabResultRecorded", cycle_id=f"c{sample[1]}",
              vehicle_id="v1", sample_id=sample, result=result, lab="l", reported_at=h.clock.isoformat())
    positive_redisinfection(h, "ra", "a", "t-a", after="sa", sample="sra")
    h.add("disinfection", "cycle-ra", "ExposureListProduced", vehicle_id="v1", sample_id="sra",
          cycle_id="ra", transfer_id="t-a", last_negative_sample_id="sb", bounded_by_sample_id=None,
          transfers=[])
    view = {e["sample_id"]: e for e in exposures(h.data())}
    assert [t["transfer_id"] for t in view["sra"]["transfers"]] == [], view["sra"]
    assert [t["transfer_id"] for t in view["sa"]["transfers"]] == ["t-a", "t-b"], view["sa"]
    assert not [f for f in h.found() if f.check == "exposure_list_incomplete"]


def test_r9_a_patient_aboard_a_trip_that_broke_down_was_exposed_one_who_never_boarded_was_not() -> None:
    """A breakdown after pickup ends the trip with its patient aboard (another vehicle takes
    them on): exposed, so the list must name them. A trip aborted at the door (patient
    absent) carried nobody: not exposed, not shown."""
    h = full_history()  # s2 of trip2's cycle c2: positive; t2 exposed
    for trip, steps in (("broke", ("at_pickup", "patient_aboard")), ("absent", ("at_pickup",))):
        request(h, trip)
        h.add("transfer", f"trip-{trip}", "TripOpened", trip_id=trip, transfer_id=trip, vehicle_id="v1",
              destination_id="f", origin={}, return_required=False)
        for step in steps:
            h.add("transfer", f"trip-{trip}", "TripStepReported", trip_id=trip, step=step,
                  client_event_id=f"{trip}{step}", device_at=h.clock.isoformat())
        h.add("transfer", f"trip-{trip}", "TripAborted", trip_id=trip, transfer_id=trip, vehicle_id="v1",
              reason="r")
    h.add("disinfection", "cycle-c2", "ExposureListProduced", vehicle_id="v1", sample_id="s2",
          cycle_id="c2", transfer_id="t2", last_negative_sample_id="s1", bounded_by_sample_id=None,
          transfers=[{"transfer_id": "t2", "relation": "swabbed_trip"}])
    found = [f for f in h.found() if f.check == "exposure_list_incomplete"]
    assert [f.transfer_id for f in found] == ["broke"], found
    (view,) = exposures(h.data())
    assert [t["transfer_id"] for t in view["transfers"]] == ["t2", "broke"], view["transfers"]
    assert view["list"]["missing"] == ["broke"]


def test_the_read_models_digest_changes_with_the_checks_code(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A generation built before a check existed is rebuilt at start (rebuild.upgrade):
    the digest it is stamped with covers the code of the checks, not only the tables."""
    today = tables.model_digest()
    assert tables.model_digest() == today  # stable for the same code
    changed = tmp_path / "findings.py"
    changed.write_bytes(Path(str(findings.__file__)).read_bytes() + b"\n# a new check\n")
    monkeypatch.setattr(findings, "__file__", str(changed))
    assert tables.model_digest() != today


def test_a_forged_time_past_the_calendar_is_skipped_by_the_fold_not_a_stalled_subscription() -> None:
    """9999-12-31T23:00-01:00 is a valid ISO time whose +08:00 day is past year 9999: the
    fold skips the event's facts (it stays archived), as it does any unreadable payload."""
    buffer = Buffer()
    late = "9999-12-31T23:00:00-01:00"
    payload = {"transfer_id": "t", "patient": {"name": "x"}, "origin": {}}
    buffer.add_event(Ev("e1", "TransferRequested", "dispatch", "transfer-t", 1, 1, late, late, "forger",
                        "system", payload))
    assert buffer.unreadable == 1 and buffer.events == 1 and not buffer.rows


def test_a_value_its_column_cannot_hold_makes_the_event_unreadable_not_a_failed_write() -> None:
    """A forged payload (a priority in words, a load ratio as text, an id that is a number)
    would fail the database's write and stall the subscription on it: the fold refuses it
    first, whole (the transfer's priority and the decision row together), and the event
    stays archived."""
    h = History()
    request(h, "t")
    good = h.add("dispatch", "transfer-t", "TransferPrioritized", transfer_id="t", priority=2, reason="r")
    for forged in ({"transfer_id": "t", "priority": "urgent", "reason": "r"},
                   {"transfer_id": "t", "priority": 2**40, "reason": "r"},
                   {"transfer_id": 7, "priority": 1, "reason": "r"}):
        buffer = Buffer()
        buffer.add_event(good._replace(payload=forged, raw=None))
        assert buffer.unreadable == 1 and not buffer.rows, forged
    load = {"facility_id": "f", "fever_clinic_occupied": 5, "reported_at": "x", "load_ratio": "high",
            "overflowing": False}
    buffer = Buffer()
    buffer.add_event(good._replace(type="FacilityLoadReported", payload=load, raw=None))
    assert buffer.unreadable == 1 and not buffer.rows
    buffer.add_event(good._replace(type="FacilityLoadReported", payload={**load, "load_ratio": 1}, raw=None))
    assert buffer.unreadable == 1 and buffer.rows["facility_loads"]  # a whole ratio fits a real column
    assert facts.unfit(("a",), {"priority": True}) == "priority"  # a boolean is no number here


# -- what a review of the checks found (2026-11-24): legitimate histories that were flagged,
# forbidden ones that were not ------------------------------------------------------------


class Fleet:
    """One vehicle's trips and cycles, as the three services write them."""

    def __init__(self) -> None:
        self.h = History()
        vehicle(self.h, "v1")
        self.h.add("dispatch", "facility-f", "FacilityRegistered", facility_id="f", name="f",
                   roles=["fever_clinic"], location={"lat": 38.0, "lon": 106.0})

    def start(self, trip: str, tid: str) -> None:
        h = self.h
        request(h, tid)
        h.add("dispatch", f"transfer-{tid}", "TransferReported", transfer_id=tid, reported_to="b",
              reported_by="o")
        h.add("dispatch", "vehicle-v1", "VehicleReserved", vehicle_id="v1", transfer_id=tid)
        h.add("dispatch", f"transfer-{tid}", "VehicleAssigned", transfer_id=tid, vehicle_id="v1",
              destination_id="f", origin={}, return_required=False, reason="r")
        h.add("transfer", f"trip-{trip}", "TripOpened", trip_id=trip, transfer_id=tid, vehicle_id="v1",
              destination_id="f", origin={}, return_required=False)
        for step in ("acknowledged", "en_route", "at_pickup", "patient_aboard", "at_destination"):
            h.add("transfer", f"trip-{trip}", "TripStepReported", trip_id=trip, step=step,
                  client_event_id=trip + step, device_at=h.clock.isoformat())

    def finish(self, trip: str, tid: str) -> None:
        h = self.h
        h.add("transfer", f"trip-{trip}", "PatientHandedOver", trip_id=trip, transfer_id=tid, facility_id="f",
              received_by="x", confirmed_by="crew")
        h.add("transfer", f"trip-{trip}", "TripCompleted", trip_id=trip, transfer_id=tid, vehicle_id="v1")
        h.add("dispatch", "vehicle-v1", "VehicleAwaitingDisinfection", vehicle_id="v1", trip_id=trip,
              transfer_id=tid)

    def disinfect(self, cid: str, trip: str, tid: str, sample: str, open_cycle: bool = True) -> None:
        """Opened (unless already: a quarantine opened it), both stages, the swab collected."""
        h = self.h
        if open_cycle:
            h.add("disinfection", f"cycle-{cid}", "CycleOpened", cycle_id=cid, vehicle_id="v1", trip_id=trip,
                  transfer_id=tid, reason="r")
        back = h.clock
        h.add("disinfection", f"cycle-{cid}", "InitialDisinfectionLogged", cycle_id=cid, vehicle_id="v1",
              stage=stage(start=back))
        h.add("disinfection", f"cycle-{cid}", "TerminalDisinfectionLogged", cycle_id=cid, vehicle_id="v1",
              stage=stage(start=back + timedelta(minutes=40), stage="terminal"))
        h.clock = back + timedelta(minutes=80)
        h.add("disinfection", f"cycle-{cid}", "SurfaceSwabCollected", cycle_id=cid, vehicle_id="v1",
              sample_id=sample, sites=["a", "b", "c"], collected_by="x", collected_at=h.clock.isoformat())

    def result(self, cid: str, sample: str, result: str) -> None:
        self.h.add("disinfection", f"cycle-{cid}", "SwabResultRecorded", cycle_id=cid, vehicle_id="v1",
                   sample_id=sample, result=result, lab="l", reported_at=self.h.clock.isoformat())

    def release(self, cid: str, trip: str, lifted: bool = False) -> None:
        self.h.add("disinfection", f"cycle-{cid}", "VehicleReleased", cycle_id=cid, vehicle_id="v1",
                   trip_id=trip, policy="after_swab_collected", quarantine_lifted=lifted)
        self.h.add("dispatch", "vehicle-v1", "VehicleReturnedToService", vehicle_id="v1", trip_id=trip,
                   cycle_id=cid, quarantine_lifted=lifted)

    def positive(self, cid: str, trip: str, tid: str, sample: str, redo: str, listed: bool = True,
                 opened: bool = True) -> None:
        """What the disinfection service writes in one commit for a positive result (R9)."""
        h = self.h
        self.result(cid, sample, "positive")
        h.add("disinfection", f"cycle-{cid}", "VehicleQuarantined", cycle_id=cid, vehicle_id="v1",
              sample_id=sample, reason="positive", redisinfection_cycle_id=redo)
        if opened:
            h.add("disinfection", f"cycle-{redo}", "CycleOpened", cycle_id=redo, vehicle_id="v1",
                  trip_id=trip, transfer_id=tid, reason="R9", kind="redisinfection", after_sample_id=sample)
        if listed:
            h.add("disinfection", f"exposure-{sample}", "ExposureListProduced", vehicle_id="v1",
                  sample_id=sample, cycle_id=cid, transfer_id=tid, last_negative_sample_id=None,
                  bounded_by_sample_id=None,
                  transfers=[{"transfer_id": tid, "trip_id": trip, "cycle_id": cid,
                              "relation": "swabbed_trip"}])
        h.add("dispatch", "vehicle-v1", "VehicleTakenOutOfService", vehicle_id="v1", reason="positive",
              rule="R9", withdrawn_from=None)


@pytest.mark.parametrize("trip_cycle_first", [False, True])
def test_r2_r9_a_trip_under_way_when_the_quarantine_began_is_covered_by_its_lift(
        trip_cycle_first: bool) -> None:
    """Trip b was under way when trip a's swab came back positive. Lifting the quarantine
    (the re-disinfection's release after a negative) covers every trip the vehicle had
    completed, as dispatch reads it: trip c after it broke neither R2 nor R9. Whether the
    staff disinfected trip b's own cycle first (released while the vehicle stayed
    quarantined) or not at all. Both were flagged before."""
    f = Fleet()
    f.start("a", "t1")
    f.finish("a", "t1")
    f.disinfect("cA", "a", "t1", "sA")
    f.release("cA", "a")
    f.start("b", "t2")
    f.positive("cA", "a", "t1", "sA", redo="rA")
    f.finish("b", "t2")
    f.h.add("disinfection", "exposure-sA", "ExposureListAmended", vehicle_id="v1", sample_id="sA",
            transfer={"transfer_id": "t2", "trip_id": "b", "cycle_id": "cB", "relation": "during_quarantine"})
    if trip_cycle_first:
        f.disinfect("cB", "b", "t2", "sB")
        f.release("cB", "b")  # the vehicle stays quarantined: dispatch keeps it out of service
    f.disinfect("rA", "a", "t1", "sR", open_cycle=False)
    f.result("rA", "sR", "negative")
    f.release("rA", "a", lifted=True)
    f.start("c", "t3")
    assert not {c for c in codes(f.h.found()) if c[0] in ("R2", "R9")}, codes(f.h.found())

    # Trip c before the lift: still R2's (and R9's) finding.
    early = Fleet()
    early.start("a", "t1")
    early.finish("a", "t1")
    early.disinfect("cA", "a", "t1", "sA")
    early.release("cA", "a")
    early.start("b", "t2")
    early.positive("cA", "a", "t1", "sA", redo="rA")
    early.finish("b", "t2")
    early.start("c", "t3")
    assert {("R2", "trip_before_release"), ("R9", "trip_after_positive")} <= codes(early.h.found())


def test_r9_a_positive_without_its_exposure_list_or_re_disinfection_is_found() -> None:
    """R9 asks for both beside the quarantine; the disinfection service writes all three in
    one commit. A history with the quarantine alone was not flagged."""
    def found(listed: bool, opened: bool) -> set[tuple[str, str]]:
        f = Fleet()
        f.start("a", "t1")
        f.finish("a", "t1")
        f.disinfect("cA", "a", "t1", "sA")
        f.release("cA", "a")
        f.positive("cA", "a", "t1", "sA", redo="rA", listed=listed, opened=opened)
        return {c for c in codes(f.h.found()) if c[0] == "R9"}

    assert found(listed=True, opened=True) == set()
    assert found(listed=False, opened=True) == {("R9", "exposure_list_missing")}
    assert found(listed=True, opened=False) == {("R9", "redisinfection_not_ordered")}


def queued_pair(h: History) -> None:
    """t1 and t2 of priority 2 wait for a vehicle, t1 first."""
    for tid in ("t1", "t2"):
        request(h, tid)
        h.add("dispatch", f"transfer-{tid}", "TransferPrioritized", transfer_id=tid, priority=2, reason="r")
        h.add("dispatch", f"transfer-{tid}", "TransferQueued", transfer_id=tid, reason="no vehicle")


def test_r4_reads_the_condition_a_redirect_recorded() -> None:
    """t1 worsened (a redirect recorded it critical, then a dispatcher raised its priority):
    it now needs life support, which the freed vehicle lacks, so dispatch gives it to t2.
    That passes nobody over; a vehicle with life support given to t2 would."""
    def r4(life_support: bool) -> set[tuple[str, str | None]]:
        h = History()
        queued_pair(h)
        h.add("dispatch", "transfer-t1", "TransferRedirected", transfer_id="t1", from_facility_id="f1",
              to_facility_id="f2", reason="worsened", candidates=[],
              condition={"fever": True, "critical": True, "covid_symptoms": False, "kind": "shock"})
        h.add("dispatch", "transfer-t1", "TransferReprioritized", transfer_id="t1", priority=1, previous=2,
              reason="worsened")
        h.add("dispatch", "vehicle-v9", "VehicleRegistered", vehicle_id="v9", plate="p",
              kind="negative_pressure_ambulance", dedicated_pool=True, life_support=life_support,
              station="s", location={"lat": 38.0, "lon": 106.0})
        h.add("dispatch", "transfer-t2", "VehicleAssigned", transfer_id="t2", vehicle_id="v9",
              destination_id="f1", origin={}, return_required=True,
              reason="first queued transfer this vehicle may carry (R4)")
        return {(f.check, f.transfer_id) for f in h.found() if f.rule == "R4"}

    assert r4(life_support=False) == set()
    assert r4(life_support=True) == {("priority_inversion", "t1")}


def test_r4_a_transfer_left_without_its_vehicle_waits_as_a_queued_one_does() -> None:
    """A withdrawal (a breakdown, a crew abort) puts the transfer back in need of a vehicle;
    dispatch reassigns or queues it in the same commit. A history that did neither, then
    gave a vehicle t1 fits to a less urgent transfer, was not flagged."""
    h = History()
    vehicle(h, "v1")
    vehicle(h, "v2")
    request(h, "t1", critical=True, kind="shock")
    h.add("dispatch", "transfer-t1", "TransferPrioritized", transfer_id="t1", priority=1, reason="critical")
    h.add("dispatch", "transfer-t1", "VehicleAssigned", transfer_id="t1", vehicle_id="v1",
          destination_id=None, origin={}, return_required=False, reason="r")
    h.add("dispatch", "transfer-t1", "VehicleWithdrawn", transfer_id="t1", vehicle_id="v1",
          reason="breakdown", patient_aboard=False)
    request(h, "t2", fever=False)
    h.add("dispatch", "transfer-t2", "TransferPrioritized", transfer_id="t2", priority=3, reason="other")
    h.add("dispatch", "transfer-t2", "VehicleAssigned", transfer_id="t2", vehicle_id="v2",
          destination_id=None, origin={}, return_required=False, reason="r")
    found = [f for f in h.found() if f.rule == "R4"]
    assert [(f.check, f.transfer_id, f.vehicle_id) for f in found] == [("priority_inversion", "t1", "v2")]
    assert [e["type"] for e in found[0].evidence] == ["VehicleWithdrawn", "VehicleAssigned"]
    # Reassigned at once, as dispatch does: nothing.
    h = History()
    vehicle(h, "v1")
    vehicle(h, "v2")
    request(h, "t1", critical=True, kind="shock")
    h.add("dispatch", "transfer-t1", "TransferPrioritized", transfer_id="t1", priority=1, reason="critical")
    h.add("dispatch", "transfer-t1", "VehicleAssigned", transfer_id="t1", vehicle_id="v1",
          destination_id=None, origin={}, return_required=False, reason="r")
    h.add("dispatch", "transfer-t1", "VehicleWithdrawn", transfer_id="t1", vehicle_id="v1",
          reason="breakdown", patient_aboard=True)
    h.add("dispatch", "transfer-t1", "VehicleAssigned", transfer_id="t1", vehicle_id="v2",
          destination_id=None, origin={}, return_required=False, reason="takeover")
    assert not [f for f in h.found() if f.rule == "R4"]


def test_r5_reads_the_condition_a_redirect_recorded() -> None:
    """A patient from an isolation site who developed a fever (recorded by a redirect)
    needs a negative-pressure ambulance from then on (R5)."""
    h = History()
    vehicle(h, "bus", kind="dedicated_vehicle")
    request(h, "t", fever=False)
    h.add("dispatch", "transfer-t", "TransferQueued", transfer_id="t", reason="q")
    h.add("dispatch", "transfer-t", "TransferRedirected", transfer_id="t", from_facility_id="f",
          to_facility_id="g", reason="fever now", candidates=[],
          condition={"fever": True, "critical": False, "covid_symptoms": False})
    h.add("dispatch", "transfer-t", "VehicleAssigned", transfer_id="t", vehicle_id="bus", destination_id="g",
          origin={}, return_required=True, reason="r")
    assert ("R5", "negative_pressure_required") in codes(h.found())
    assert ("R5", "negative_pressure_required") not in codes(History().found())


def test_r6_r7_covid_like_symptoms_route_as_a_fever_and_other_wards_that_take_the_patient_stay_open() -> None:
    """COVID-like symptoms without a fever are dispatch's fever class (R6). An overflowing
    fever clinic closes only that: a fever patient may still go to the same hospital's
    temporary emergency ward (R7, as dispatch routes), not to its designated ward."""
    def found(roles: list[str], overflowing: bool, **condition: Any) -> set[tuple[str, str]]:
        h = History()
        h.add("dispatch", "facility-x", "FacilityRegistered", facility_id="x", name="x", roles=roles,
              location={"lat": 38.0, "lon": 106.0}, fever_clinic_capacity=10)
        h.add("dispatch", "facility-x", "FacilityLoadReported", facility_id="x", fever_clinic_occupied=10,
              reported_at=h.clock.isoformat(), load_ratio=1.0 if overflowing else 0.1,
              overflowing=overflowing)
        request(h, "t", **condition)
        h.add("dispatch", "transfer-t", "DestinationAssigned", transfer_id="t", facility_id="x", reason="r")
        return {c for c in codes(h.found()) if c[0] in ("R6", "R7")}

    covid = {"fever": False, "covid_symptoms": True}
    assert found(["county_hospital"], False, **covid) == {("R6", "destination_role_mismatch")}
    assert found(["fever_clinic", "designated"], True, **covid) == {("R7", "overflowing_destination")}
    assert found(["fever_clinic", "temporary_emergency"], True) == set()
    assert found(["fever_clinic", "designated"], True) == {("R7", "overflowing_destination")}
    assert found(["fever_clinic", "designated"], True, risk="confirmed", severity="severe") == set()
    assert found(["fever_clinic"], True, fever=False) == {("R7", "overflowing_destination")}


# -- what a review of the views found (2026-11-24) ------------------------------------------


def test_a_trip_after_a_crew_abort_is_dispatched_at_its_own_assignment() -> None:
    """The crew found nobody and asked for a requeue; dispatch gave the same vehicle the same
    transfer an hour later. The second trip's dispatch is the assignment it opened from
    (KPIs, the ledger's 派车时间), not the first trip's."""
    h = History()
    vehicle(h, "v1")
    h.add("dispatch", "facility-f", "FacilityRegistered", facility_id="f", name="发热门诊",
          roles=["fever_clinic"], location={"lat": 38.0, "lon": 106.0})
    request(h, "t")

    def trip(trip_id: str, steps: tuple[str, ...]) -> Ev:
        assigned = h.add("dispatch", "transfer-t", "VehicleAssigned", transfer_id="t", vehicle_id="v1",
                         destination_id="f", origin={}, return_required=True, reason="r")
        h.add("transfer", f"trip-{trip_id}", "TripOpened", trip_id=trip_id, transfer_id="t", vehicle_id="v1",
              destination_id="f", origin={}, return_required=True, assignment_event_id=assigned.event_id)
        for step in steps:
            h.add("transfer", f"trip-{trip_id}", "TripStepReported", trip_id=trip_id, step=step,
                  client_event_id=trip_id + step, device_at=h.clock.isoformat())
        return assigned

    first = trip("a", ("acknowledged", "en_route", "at_pickup"))
    h.clock += timedelta(minutes=60)
    h.add("transfer", "trip-a", "TripAborted", trip_id="a", transfer_id="t", vehicle_id="v1",
          reason="patient absent", code="patient_absent")
    h.add("dispatch", "transfer-t", "VehicleWithdrawn", transfer_id="t", vehicle_id="v1",
          reason="crew aborted")
    second = trip("b", ("acknowledged", "en_route", "at_pickup", "patient_aboard", "at_destination"))
    h.add("transfer", "trip-b", "PatientHandedOver", trip_id="b", transfer_id="t", facility_id="f",
          received_by="李", confirmed_by="crew")
    h.add("transfer", "trip-b", "TripCompleted", trip_id="b", transfer_id="t", vehicle_id="v1")
    data = h.data().indexed()
    m = kpis.milestones(data, "t")
    assert m["dispatched"] == first.occurred_at  # the 3-minute rate: the first assignment
    assert m["unit_dispatched"] == second.occurred_at
    (row,) = kpis.rows(data)
    assert row.segments["dispatch_to_en_route"] == 180, row.segments
    dispatched = {r["trip_id"]: r["dispatched_at"] for r in ledger.rows(data)}
    assert dispatched == {"a": _cst(first.occurred_at), "b": _cst(second.occurred_at)}, dispatched


def _cst(at: str) -> str:
    return datetime.fromisoformat(at).astimezone(facts.REGION_TZ).isoformat()


def test_the_timeline_places_steps_where_the_trip_went_then() -> None:
    """After a redirect the crew's arrival and handover (sent without a position) are at the
    new destination, and the redirect names it; a takeover vehicle meets the patient where
    the broken-down one stopped, not at the origin."""
    h = History()
    request(h, "t")
    h.add("transfer", "trip-a", "TripOpened", trip_id="a", transfer_id="t", vehicle_id="v1",
          destination_id="f1", origin={"name": "o"}, return_required=True)
    for step in ("at_pickup", "patient_aboard"):
        h.add("transfer", "trip-a", "TripStepReported", trip_id="a", step=step, client_event_id=step,
              device_at=h.clock.isoformat())
    h.add("dispatch", "transfer-t", "TransferRedirected", transfer_id="t", from_facility_id="f1",
          to_facility_id="f2", reason="f1 full")
    h.add("transfer", "trip-a", "TripRedirected", trip_id="a", transfer_id="t", destination_id="f2",
          reason="f1 full")
    for step in ("at_destination", "handed_over"):
        h.add("transfer", "trip-a", "TripStepReported", trip_id="a", step=step, client_event_id=step,
              device_at=h.clock.isoformat())
    entries = timeline_view("t", [envelope_of(e) for e in h.events])["entries"]
    places = [(e["label_zh"], e["place"]) for e in entries]
    assert places[2:] == [("车组上报：到达接人点", "o"), ("车组上报：患者上车", "o"), ("改派目的地", "f2"),
                          ("行程改派目的地", "f2"), ("车组上报：到达目的地", "f2"),
                          ("车组上报：完成交接", "f2")], places
    taken = takeover_history(picked_up=True)
    view = timeline_view("t", [envelope_of(e) for e in taken.events])
    at_pickup = [e["place"] for e in view["entries"] if e["payload"].get("step") == "at_pickup"]
    assert at_pickup[0] == "o" and "v1" in at_pickup[1], at_pickup


def test_the_ledger_says_who_was_taken_over_and_who_still_waits() -> None:
    """A vehicle taken off with the patient aboard (its trip completes: it needs
    disinfection) did not deliver them; a transfer whose only trip was aborted, queued
    again with no vehicle free, still waits: the ledger says both."""
    data = takeover_history(picked_up=True).data()
    assert {r["trip_id"]: r["status"] for r in ledger.rows(data)} == {"v1": "taken_over", "v2": "completed"}
    h = takeover_history()
    cut = next(i for i, e in enumerate(h.events) if e.type == "TripAborted") + 1
    h.events = h.events[:cut]
    h.add("dispatch", "transfer-t", "TransferQueued", transfer_id="t", reason="no fitting vehicle is free")
    assert {r["trip_id"]: r["status"] for r in ledger.rows(h.data())} == {None: "waiting", "v1": "aborted"}
    assert timeline_view("t", [envelope_of(e) for e in h.events])["status"] == "queued"


def test_turnarounds_are_the_trips_own_cycle_whatever_the_clocks_offsets() -> None:
    """The crew's phone writes +08:00, the lab UTC. A re-disinfection after a positive swab
    names the trip too, and opened hours later its time sorted first as text: the vehicle
    and swab turnarounds were measured on it."""
    cst = facts.REGION_TZ
    f = Fleet()
    f.start("a", "t1")
    hand = f.h.clock + timedelta(minutes=1)
    f.h.add("transfer", "trip-a", "PatientHandedOver", trip_id="a", transfer_id="t1", facility_id="f",
            received_by="x", confirmed_by="crew", at=hand.astimezone(cst))
    f.h.add("transfer", "trip-a", "TripCompleted", trip_id="a", transfer_id="t1", vehicle_id="v1",
            at=hand.astimezone(cst))
    f.h.add("disinfection", "cycle-cA", "CycleOpened", cycle_id="cA", vehicle_id="v1", trip_id="a",
            transfer_id="t1", reason="r", at=hand.astimezone(cst))
    f.disinfect("cA", "a", "t1", "sA", open_cycle=False)
    f.release("cA", "a")
    released = f.h.events[-2].recorded_at
    f.h.clock += timedelta(hours=4)
    f.positive("cA", "a", "t1", "sA", redo="rA")
    f.disinfect("rA", "a", "t1", "sR", open_cycle=False)
    f.result("rA", "sR", "negative")
    f.release("rA", "a", lifted=True)
    data = f.h.data().indexed()
    assert [c["cycle_id"] for c in data.cycles_of_trip("a")] == ["cA", "rA"]
    (row,) = kpis.rows(data)
    handed = kpis.milestones(data, "t1")["handed_over"]
    assert row.segments["vehicle_turnaround"] == seconds(handed, released), row.segments


def test_r8_a_quarantine_lifted_without_the_re_disinfections_terminal_stage_is_found() -> None:
    """The lift returns the vehicle under the positive trip's id, which already had its own
    return (the trip's row keeps that one): a lift with the re-disinfection's terminal stage
    missing passed unseen."""
    def lifted(terminal: bool) -> set[tuple[str, str]]:
        f = Fleet()
        f.start("a", "t1")
        f.finish("a", "t1")
        f.disinfect("cA", "a", "t1", "sA")
        f.release("cA", "a")
        f.positive("cA", "a", "t1", "sA", redo="rA")
        if terminal:
            f.disinfect("rA", "a", "t1", "sR", open_cycle=False)
        else:  # the initial stage only, then the swab
            f.h.add("disinfection", "cycle-rA", "InitialDisinfectionLogged", cycle_id="rA", vehicle_id="v1",
                    stage=stage(start=f.h.clock))
            f.h.add("disinfection", "cycle-rA", "SurfaceSwabCollected", cycle_id="rA", vehicle_id="v1",
                    sample_id="sR", sites=["a", "b", "c"], collected_by="x",
                    collected_at=f.h.clock.isoformat())
        f.result("rA", "sR", "negative")
        f.release("rA", "a", lifted=True)
        return {c for c in codes(f.h.found()) if c[0] == "R8"}

    assert lifted(terminal=True) == set()
    assert ("R8", "returned_without_terminal") in lifted(terminal=False)
