"""The trip state machine (issue 4): every refusal by its code, the return leg and the
admission (R11), crew aborts, the takeover, and a crew phone on a lossy link."""

from __future__ import annotations

import random
from datetime import datetime, timedelta
from typing import Any

import pytest

from libs.events.aggregate import StateConflict
from libs.events.catalog.common import Location
from services.transfer.domain import STEPS, Trip, return_transfer_id_for

T0 = datetime.fromisoformat("2022-11-20T09:00:00+08:00")


def trip(**kw: Any) -> Trip:
    return Trip.open("t-1", "v-1", "yc-second", {"name": "隔离点", "location": {"lat": 38.2, "lon": 106.2}},
                     True, **kw)


def drive(t: Trip, upto: str, prefix: str = "c") -> None:
    for n, step in enumerate(STEPS[:STEPS.index(upto) + 1]):
        t.report_step(step, f"{prefix}-{n}", T0 + timedelta(minutes=n))


def types(t: Trip) -> list[str]:
    return [p.event.event_type for p in t.pending()]


def refused(code: str, fn: Any, *args: Any) -> None:
    with pytest.raises(StateConflict) as err:
        fn(*args)
    assert err.value.code == code, err.value.code


def test_late_steps_are_kept_in_sequence_and_do_not_move_the_trip_back() -> None:
    t = trip()
    t.report_step("at_pickup", "c-3", T0 + timedelta(minutes=3), received_at=T0 + timedelta(minutes=1))
    t.report_step("acknowledged", "c-1", T0 + timedelta(minutes=1))
    assert t.last_step == "at_pickup"
    assert [s["step"] for s in t.steps] == ["acknowledged", "at_pickup"]
    assert [s["late"] for s in t.steps] == [True, False]
    assert t.steps[1]["clock_skew_s"] == 120.0  # the phone runs two minutes fast: shown


def test_refusals() -> None:
    t = trip()
    refused("patient_not_aboard", t.report_step, "at_destination", "x-1", T0)
    refused("patient_not_aboard", t.report_step, "handed_over", "x-2", T0)
    refused("patient_not_aboard", t.hand_over, "yc-second", "李医生", "hospital", T0)
    refused("not_handed_over", t.request_return, "yc-second", T0)
    refused("not_handed_over", t.admit, "yc-second", T0)
    t.report_step("acknowledged", "c-1", T0)
    refused("step_out_of_order", t.report_step, "acknowledged", "c-other", T0)
    for n, step in enumerate(["en_route", "at_pickup", "patient_aboard"]):
        t.report_step(step, f"d-{n}", T0 + timedelta(minutes=n))
    refused("patient_aboard", t.abort_by_crew, "patient_refused", "拒绝", "cancel", T0)
    refused("handover_facility_mismatch", t.hand_over, "yc-first", "王医生", "hospital", T0)
    t.report_step("at_destination", "e-1", T0 + timedelta(minutes=20))
    t.report_step("handed_over", "e-2", T0 + timedelta(minutes=21))
    assert t.status == "completed"
    refused("handover_facility_mismatch", t.hand_over, "yc-first", "王医生", "hospital", T0)
    refused("handover_facility_mismatch", t.request_return, "yc-first", T0)
    refused("trip_closed", t.abort_by_crew, "patient_absent", "不在", "requeue", T0)


def test_aborted_trip_refuses_every_step() -> None:
    t = trip()
    drive(t, "at_pickup")
    t.abort_by_crew("patient_absent", "联系不上", "requeue", T0)
    aborted = t.pending()[-1].event
    assert aborted.event_type == "TripAborted"
    assert aborted.model_dump()["dispatch_action"] == "requeue"
    for step in STEPS:
        refused("trip_closed", t.report_step, step, f"late-{step}", T0)
    refused("trip_closed", t.hand_over, "yc-second", "李医生", "hospital", T0)


def test_return_request_is_made_once_and_closes_the_loop_when_the_leg_is_home() -> None:
    t = trip()
    drive(t, "handed_over")
    assert t.request_return("yc-second", T0 + timedelta(hours=2))
    assert not t.request_return("yc-second", T0 + timedelta(hours=2, minutes=1))  # resent
    assert t.loop == "return_requested" and t.return_transfer_id == return_transfer_id_for("t-1")
    refused("return_already_requested", t.admit, "yc-second", T0)

    leg = Trip.open(t.return_transfer_id, "v-1", "origin", {"name": "yc-second"}, False, return_of="t-1")
    refused("return_leg", leg.request_return, "origin", T0)
    drive(leg, "handed_over", "b")
    t.return_leg_home(leg.id, T0 + timedelta(hours=3))
    assert (t.loop, t.loop_how) == ("closed", "returned")
    assert types(t)[-1] == "LoopClosed"


def test_admission_closes_the_loop_without_a_return() -> None:
    t = trip()
    drive(t, "handed_over")
    assert t.admit("yc-second", T0 + timedelta(hours=1))
    assert not t.admit("yc-second", T0 + timedelta(hours=1))
    assert (t.loop, t.loop_how) == ("closed", "admitted")
    assert types(t)[-2:] == ["PatientAdmitted", "LoopClosed"]
    refused("loop_closed", t.request_return, "yc-second", T0)


def test_a_vehicle_withdrawn_with_the_patient_aboard_completes_for_disinfection() -> None:
    before = trip()
    drive(before, "at_pickup")
    before.abort("vehicle withdrawn: breakdown")
    assert before.status == "aborted" and "TripCompleted" not in types(before)
    after = trip()
    for n, step in enumerate(["acknowledged", "at_pickup", "patient_aboard"]):
        after.report_step(step, f"a-{n}", T0 + timedelta(minutes=n))
    after.abort("vehicle withdrawn: breakdown")
    assert after.status == "completed" and after.handed_over_to is None
    assert types(after)[-1] == "TripCompleted"
    refused("trip_closed", after.report_step, "at_destination", "x-9", T0)  # the next car goes on
    after.report_step("en_route", "late-en-route", T0)  # a late step is history, still kept
    refused("not_handed_over", after.request_return, "yc-second", T0)


def view(t: Trip) -> dict[str, Any]:
    return {"status": t.status, "last_step": t.last_step, "handed_over_to": t.handed_over_to,
            "steps": [(s["step"], s["device_at"], s["client_event_id"]) for s in t.steps],
            "events": sorted(e for e in types(t) if e != "TripStepReported")}


def lossy(seed: int) -> Trip:
    """A phone's outbox over a lossy link: each round it sends what is unacknowledged in a
    shuffled order (delays reorder), a request may be lost on the way (not applied) or its
    answer lost (applied, resent later); a 409 for a step that waits on an earlier one stays
    in the outbox. It ends when everything is acknowledged."""
    rng = random.Random(seed)
    t = trip()
    outbox = [(step, f"c-{n}", T0 + timedelta(minutes=n)) for n, step in enumerate(STEPS)]
    rounds = 0
    while outbox:
        rounds += 1
        assert rounds < 1000
        rng.shuffle(outbox)
        for item in list(outbox):
            if rng.random() < 0.3:
                continue  # lost on the way
            try:
                t.report_step(*item)
            except StateConflict as e:
                assert e.code == "patient_not_aboard", e.code
                continue
            if rng.random() < 0.3:
                continue  # applied, but the answer was lost: it will be resent
            outbox.remove(item)
    return t


def test_crew_link_simulation_ends_in_the_same_state_as_a_perfect_link() -> None:
    perfect = trip()
    drive(perfect, "handed_over")
    for seed in range(200):
        assert view(lossy(seed)) == view(perfect), seed


def test_notice_is_issued_once_per_hospital_then_resent_then_escalated() -> None:
    t = trip(risk_category="isolation_site", condition={"fever": True})
    drive(t, "patient_aboard")
    assert t.issue_notice(20.0, T0)
    assert not t.issue_notice(19.0, T0)  # once per hospital
    assert t.notice_overdue(T0 + timedelta(seconds=299), 300, 1) is None
    assert t.notice_overdue(T0 + timedelta(seconds=300), 300, 1) == "resent"
    assert t.notice_overdue(T0 + timedelta(seconds=500), 300, 1) is None  # timed from the resend
    assert t.notice_overdue(T0 + timedelta(seconds=600), 300, 1) == "escalated"
    assert t.notice_overdue(T0 + timedelta(seconds=9000), 300, 1) is None
    assert t.notice is not None and t.notice["status"] == "escalated"
    refused("notice_unknown", t.acknowledge_notice, "other", "护士", T0)
    assert t.acknowledge_notice(None, "护士", T0)  # late, but still on record


def test_acknowledged_notice_is_not_resent_and_a_redirect_notifies_the_new_hospital() -> None:
    t = trip(condition={"fever": True})
    drive(t, "patient_aboard")
    t.issue_notice(20.0, T0)
    assert t.acknowledge_notice(None, "护士", T0)
    assert not t.acknowledge_notice(None, "护士", T0)
    assert t.notice_overdue(T0 + timedelta(hours=1), 300, 1) is None
    t.redirect("nx-cardio", "worsened: stroke", {"critical": True, "kind": "stroke"})
    assert t.issue_notice(12.0, T0)
    assert t.notice is not None and t.notice["facility_id"] == "nx-cardio"
    assert t.notice["status"] == "issued" and t.condition["kind"] == "stroke"


def test_return_leg_sends_no_notice() -> None:
    leg = Trip.open("r-1", "v-1", "origin", {}, False, return_of="t-1")
    drive(leg, "patient_aboard")
    assert not leg.issue_notice(10.0, T0)


def test_positions_are_thinned_and_late_ones_ignored() -> None:
    t = trip()
    here = Location(lat=38.3, lon=106.245)
    near = Location(lat=38.3005, lon=106.245)  # ~55 m
    far = Location(lat=38.31, lon=106.245)  # ~1.1 km
    assert t.report_position(here, T0, 30.0, 200, 60)
    assert not t.report_position(near, T0 + timedelta(seconds=10), 29.9, 200, 60)
    assert t.report_position(far, T0 + timedelta(seconds=20), 28.0, 200, 60)
    assert t.report_position(far, T0 + timedelta(seconds=80), 28.0, 200, 60)  # a minute on
    assert not t.report_position(here, T0 + timedelta(seconds=5), 30.0, 200, 60)  # late
    assert len(t.track) == 3 and t.position is not None and t.position["eta_minutes"] == 28.0
    t.abort("vehicle withdrawn")
    refused("trip_closed", t.report_position, far, T0 + timedelta(hours=1), 1.0, 200, 60)
