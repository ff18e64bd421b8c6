"""The pure domain: rules named by id, no I/O."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from libs.events.aggregate import InvalidField, RuleRefused, StateConflict
from libs.events.catalog import dispatch as ev
from libs.events.catalog.common import Location
from services.disinfection.domain import Cycle, StageRecord
from services.dispatch.domain import (
    Facility,
    StraightLineEta,
    Transfer,
    Vehicle,
    choose_destination,
    patient_class,
    rank_vehicles,
    triage,
    vehicle_needs,
)
from services.dispatch.schemas import resident_id_ok
from services.transfer.domain import Trip

T0 = datetime.fromisoformat("2022-11-20T09:00:00+08:00")


def vehicle(kind: str = "negative_pressure_ambulance", life_support: bool = True) -> Vehicle:
    return Vehicle.register(ev.VehicleRegistered(
        vehicle_id="v1", plate="宁A", kind=kind, dedicated_pool=True, life_support=life_support,
        station="s", location=Location(lat=38.28, lon=106.25)))


def facility(fid: str, roles: list[str], lat: float, capacity: int | None = 100,
             backups: list[str] | None = None) -> Facility:
    return Facility.register(ev.FacilityRegistered(
        facility_id=fid, name=fid, roles=roles, location=Location(lat=lat, lon=106.23),
        fever_clinic_capacity=capacity, backup_ids=backups or []))


def test_gb11643_check_digit() -> None:
    assert resident_id_ok("640121198001011231")
    assert not resident_id_ok("640121198001011230")  # the example's bad id
    assert not resident_id_ok("640121198013011231")  # no 13th month
    assert not resident_id_ok("64012119800101123")


def test_r1_a_vehicle_carries_one_patient() -> None:
    v = vehicle()
    v.reserve("t-1")
    with pytest.raises(RuleRefused) as refused:
        v.reserve("t-2")
    assert refused.value.rule == "R1"


def test_r2_not_assignable_until_released() -> None:
    v = vehicle()
    v.reserve("t-1")
    v.trip_completed("trip-1")
    with pytest.raises(RuleRefused) as refused:
        v.reserve("t-2")
    assert refused.value.rule == "R2"
    v.released("trip-1", "cycle-1")
    v.reserve("t-2")
    assert v.status == "assigned"


def test_r2_a_release_that_overtakes_the_trip_end_is_kept() -> None:
    v = vehicle()
    v.reserve("t-1")
    v.released("trip-1", "cycle-1")  # arrived first
    assert v.status == "assigned"
    v.trip_completed("trip-1")
    assert v.status == "available"


def test_r4_critical_first_then_fever_then_others_then_scheduled() -> None:
    assert triage("home_monitoring", {"critical": True, "kind": "stroke"}, "emergency")[0] == 1
    assert triage("isolation_site", {"fever": True}, "outpatient_visit")[0] == 2
    assert triage("home_monitoring", {}, "outpatient_visit")[0] == 3
    assert triage("home_monitoring", {}, "scheduled_care")[0] == 4


def test_r5_negative_pressure_for_fever_from_isolation_and_for_cases() -> None:
    assert vehicle_needs("isolation_site", {"fever": True}).negative_pressure
    assert vehicle_needs("confirmed", {}).negative_pressure
    assert not vehicle_needs("home_monitoring", {}).negative_pressure
    assert not vehicle("dedicated_vehicle", False).fits(vehicle_needs("isolation_site", {"fever": True}))
    assert vehicle().fits(vehicle_needs("isolation_site", {"fever": True}))


def test_r5_home_monitoring_rides_the_dedicated_vehicle_not_the_nearer_npa() -> None:
    npa = vehicle()
    bus = Vehicle.register(ev.VehicleRegistered(
        vehicle_id="bus", plate="宁A", kind="dedicated_vehicle", dedicated_pool=True,
        life_support=False, station="s", location=Location(lat=38.20, lon=106.25)))  # farther
    t = Transfer.request(ev.TransferRequested(
        transfer_id="t-1", patient={"name": "x"}, risk_category="home_monitoring", condition={},
        origin={"kind": "home", "name": "h", "location": {"lat": 38.28, "lon": 106.25}},
        purpose="outpatient_visit", return_required=True, requested_by={"channel": "community"}),
        requested_at="2022-11-20T01:00:00+00:00")
    fitting, _ = rank_vehicles(t, [npa, bus], StraightLineEta())
    assert [v.id for v in fitting] == ["bus", "v1"]


def test_r6_cardio_cerebro_emergencies_go_to_the_specialty_hospital() -> None:
    places = [facility("fever", ["fever_clinic"], 38.30),
              facility("cardio", ["specialty_cardio_cerebro"], 38.49)]
    best, _, _ = choose_destination(Location(lat=38.28, lon=106.24),
                                    patient_class("home_monitoring", {"critical": True, "kind": "stroke"}),
                                    places, StraightLineEta())
    assert best is not None and best.id == "cardio"


def test_r7_overflow_past_80_percent_activates_backups() -> None:
    first = facility("first", ["fever_clinic", "designated"], 38.40, backups=["second"])
    second = facility("second", ["fever_clinic", "backup"], 38.49, capacity=80)
    origin = Location(lat=38.28, lon=106.24)
    best, _, _ = choose_destination(origin, "fever", [first, second], StraightLineEta())
    assert best is not None and best.id == "first"  # a standing-down backup takes no one
    first.report_load(80, "2022-11-20T09:00:00+08:00")  # exactly 80%: not past
    best, _, _ = choose_destination(origin, "fever", [first, second], StraightLineEta())
    assert best is not None and best.id == "first"
    first.report_load(85, "2022-11-20T09:10:00+08:00")
    best, _, candidates = choose_destination(origin, "fever", [first, second], StraightLineEta())
    assert best is not None and best.id == "second"
    assert any(c.get("skipped") == "overflowing (R7)" for c in candidates)
    first.report_load(50, "2022-11-20T10:00:00+08:00")  # load falls back: backups stand down
    best, _, _ = choose_destination(origin, "fever", [first, second], StraightLineEta())
    assert best is not None and best.id == "first"


def test_r10_a_direct_call_is_reported_by_120() -> None:
    t = Transfer.request(ev.TransferRequested(
        transfer_id="t-1", patient={"name": "x"}, risk_category="sealed_area",
        condition={"critical": True, "kind": "childbirth"},
        origin={"kind": "home", "name": "h", "location": {"lat": 38.2, "lon": 106.2}},
        purpose="emergency", return_required=False,
        requested_by={"channel": "direct_call", "org": "家属"}), requested_at="2022-11-20T01:00:00+00:00")
    t.report()
    t.report()
    reports = [p.event for p in t.pending() if isinstance(p.event, ev.TransferReported)]
    assert len(reports) == 1 and reports[0].reported_by == "120"


def trip() -> Trip:
    return Trip.open("t-1", "v-1", "yc-second", {"name": "origin"}, True)


def test_trip_steps_in_order_and_resends_applied_once() -> None:
    t = trip()
    assert t.report_step("acknowledged", "c-1", T0)
    assert not t.report_step("acknowledged", "c-1", T0)  # resent by a flaky phone
    assert t.report_step("at_pickup", "c-2", T0 + timedelta(minutes=5))  # en_route lost: fine
    with pytest.raises(StateConflict) as out_of_order:
        t.report_step("en_route", "c-3", T0 + timedelta(minutes=6))
    assert out_of_order.value.code == "step_out_of_order"


def test_handover_needs_the_patient_aboard() -> None:
    t = trip()
    t.report_step("acknowledged", "c-1", T0)
    with pytest.raises(StateConflict) as refused:
        t.report_step("handed_over", "c-2", T0)
    assert refused.value.code == "patient_not_aboard"
    with pytest.raises(StateConflict):
        t.hand_over("yc-second", "李医生", "hospital", T0)


def test_handover_completes_the_trip_once_and_the_hospital_confirms() -> None:
    t = trip()
    for n, step in enumerate(["acknowledged", "patient_aboard", "handed_over"]):
        t.report_step(step, f"c-{n}", T0 + timedelta(minutes=n))
    t.hand_over("yc-second", "李医生", "hospital", T0 + timedelta(minutes=9))
    types = [p.event.event_type for p in t.pending()]
    assert types.count("TripCompleted") == 1 and types[-1] == "HandoverConfirmed"
    with pytest.raises(StateConflict):
        t.hand_over("yc-first", "王医生", "hospital", T0 + timedelta(minutes=10))


def stage(kind: str, start: datetime, minutes: float, concentration: float = 1000,
          video_from: datetime | None = None) -> StageRecord:
    end = start + timedelta(minutes=minutes)
    return StageRecord(
        stage=kind, disinfectant="chlorine", concentration_mg_per_l=concentration,
        method="wipe_and_spray", started_at=start, ended_at=end, operator="王五", location="洗消点",
        camera_id="cam", clip_ref="nvr://x", video_from=video_from or start - timedelta(minutes=1),
        video_to=end + timedelta(minutes=1))


def cycle() -> Cycle:
    return Cycle.open("v-1", "trip-1", "t-1", "test")


def test_r8_contact_time_and_concentration_and_video_are_checked() -> None:
    with pytest.raises(InvalidField) as short:
        cycle().log_stage(stage("initial", T0, 10))
    assert short.value.code == "contact_time_below_protocol"
    with pytest.raises(InvalidField) as weak:
        cycle().log_stage(stage("initial", T0, 35, concentration=500))
    assert weak.value.field == "concentration_mg_per_l"
    with pytest.raises(InvalidField) as uncovered:
        cycle().log_stage(stage("initial", T0, 35, video_from=T0 + timedelta(minutes=5)))
    assert uncovered.value.field == "video"


def test_r8_terminal_before_initial_is_refused() -> None:
    with pytest.raises(RuleRefused) as refused:
        cycle().log_stage(stage("terminal", T0, 35))
    assert refused.value.rule == "R8"


def test_r8_r9_release_after_both_stages_and_a_swab_and_quarantine_on_positive() -> None:
    c = cycle()
    c.log_stage(stage("initial", T0, 35))
    c.log_stage(stage("terminal", T0 + timedelta(minutes=40), 35))
    assert c.status == "open"
    c.collect_swab("S-1", ["stretcher", "seat", "handrail"], "赵六", T0 + timedelta(hours=2))
    assert c.status == "released"
    c.record_result("S-1", "positive", "lab", T0 + timedelta(hours=6))
    assert c.status == "quarantined"
    assert "VehicleQuarantined" in [p.event.event_type for p in c.pending()]
