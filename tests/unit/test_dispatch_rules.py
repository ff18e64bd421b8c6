"""Dispatch's pure domain, rule by rule (R1-R7, R10), no I/O."""

from __future__ import annotations

from datetime import datetime

import pytest

from libs.events.aggregate import RuleRefused, StateConflict
from libs.events.catalog import dispatch as ev
from libs.events.catalog.common import Location
from libs.events.store import StateChange
from services.dispatch.config import region
from services.dispatch.domain import (
    CareSeries,
    Facility,
    StraightLineEta,
    Transfer,
    Vehicle,
    WaitingQueue,
    choose_destination,
    patient_class,
    patient_key,
    rank_vehicles,
    triage,
    vehicle_needs,
)
from services.dispatch.schemas import resident_id_ok

ETA = StraightLineEta()
HOME = Location(lat=38.28, lon=106.24)


def vehicle(vid: str = "v1", kind: str = "negative_pressure_ambulance", life_support: bool = True,
            pool: bool = True, lat: float = 38.28) -> Vehicle:
    return Vehicle.register(ev.VehicleRegistered(
        vehicle_id=vid, plate="宁A", kind=kind, dedicated_pool=pool, life_support=life_support,
        station="s", location=Location(lat=lat, lon=106.25)))


def facility(fid: str, roles: list[str], lat: float, capacity: int | None = 100,
             backups: list[str] | None = None) -> Facility:
    return Facility.register(ev.FacilityRegistered(
        facility_id=fid, name=fid, roles=roles, location=Location(lat=lat, lon=106.23),
        fever_clinic_capacity=capacity, backup_ids=backups or []))


def transfer(category: str = "isolation_site", condition: dict[str, object] | None = None,
             channel: str = "console", purpose: str = "outpatient_visit") -> Transfer:
    return Transfer.request(ev.TransferRequested(
        transfer_id="t-1", patient={"name": "张三", "id_number": "640121198001011231"},
        risk_category=category, condition=condition or {"fever": True},
        origin={"kind": "isolation_site", "name": "o", "location": {"lat": 38.275, "lon": 106.24}},
        purpose=purpose, return_required=True, requested_by={"channel": channel, "org": "社区"}),
        requested_at="2022-11-20T01:00:00+00:00")


def route(pclass: str, facilities: list[Facility], critical: bool = False,
          wish: str | None = None) -> str | None:
    r = choose_destination(HOME, pclass, region().roles[pclass], facilities, ETA,
                           critical=critical, wish=wish)
    return r.facility.id if r.facility else None


def test_gb11643_check_digit() -> None:
    assert resident_id_ok("640121198001011231")
    assert not resident_id_ok("640121198001011230")  # the example's bad id
    assert not resident_id_ok("640121198013011231")  # no 13th month
    assert not resident_id_ok("64012119800101123")


def test_one_live_transfer_per_person_is_keyed_by_id_number_else_phone() -> None:
    assert patient_key({"name": "a", "id_number": "X"}) == "id:X"
    assert patient_key({"name": "a", "phone": "138"}) == "phone:a:138"
    assert patient_key({"name": "a"}) is None


def test_r1_a_vehicle_carries_one_patient_even_with_an_override() -> None:
    v = vehicle()
    v.reserve("t-1")
    with pytest.raises(RuleRefused) as refused:
        v.reserve("t-2", frozenset({"R2", "R3", "R5"}))
    assert refused.value.rule == "R1"


def test_r2_not_assignable_until_released_unless_a_supervisor_overrides() -> None:
    v = vehicle()
    v.reserve("t-0")
    v.trip_completed("trip-0")
    t = transfer()
    with pytest.raises(RuleRefused) as refused:
        t.assign(v, [], "x", [])
    assert refused.value.rule == "R2"
    with pytest.raises(RuleRefused):  # a dispatcher's reason is not enough for R2
        t.assign(v, [], "x", [], override_reason="urgent", role="dispatcher")
    t.assign(v, [], "x", [], override_reason="no other vehicle, stroke", role="supervisor")
    overridden = [p.event for p in t.pending() if isinstance(p.event, ev.RuleOverridden)]
    assert [o.rule for o in overridden] == ["R2"] and v.status == "assigned"


def test_r2_a_release_that_overtakes_the_trip_end_is_kept_as_an_event() -> None:
    v = vehicle()
    v.reserve("t-1")
    v.mark_loaded()
    v.released("trip-1", "cycle-1")  # from disinfection, before transfer's TripCompleted
    assert v.status == "assigned"
    assert [p.event.event_type for p in v.pending()] == ["VehicleReleaseReceivedEarly"]
    reloaded = Vehicle.model_validate_json(v.model_dump_json())  # what the store keeps
    reloaded.trip_completed("trip-1")
    assert reloaded.status == "available"


def test_r3_r5_an_unfit_vehicle_needs_a_reason_and_the_override_is_an_event() -> None:
    bus = vehicle("bus", kind="dedicated_vehicle", life_support=False, pool=False)
    t = transfer("isolation_site", {"fever": True})
    unmet = bus.unmet(vehicle_needs(t.risk_category, t.condition))
    assert [u.rule for u in unmet] == ["R5", "R3"]
    with pytest.raises(RuleRefused) as refused:
        t.assign(bus, unmet, "manual", [])
    assert refused.value.rule == "R5"
    t.assign(bus, unmet, "manual", [], manual=True, override_reason="负压车全部在途")
    rules = [p.event.rule for p in t.pending() if isinstance(p.event, ev.RuleOverridden)]
    assert rules == ["R3", "R5"] and t.overrides[0]["reason"] == "负压车全部在途"


def test_r4_critical_first_then_fever_then_others_then_scheduled() -> None:
    assert triage("home_monitoring", {"critical": True, "kind": "stroke"}, "emergency")[0] == 1
    assert triage("isolation_site", {"fever": True}, "outpatient_visit")[0] == 2
    assert triage("confirmed", {}, "admission")[0] == 2
    assert triage("home_monitoring", {}, "outpatient_visit")[0] == 3
    assert triage("home_monitoring", {}, "scheduled_care")[0] == 4


def test_r4_a_dispatcher_can_reprioritise_with_a_reason() -> None:
    t = transfer("home_monitoring", {})
    t.reprioritize(1, "family reports chest pain")
    assert t.priority == 1 and "chest pain" in t.priority_reason


def test_r4_the_waiting_queue_keeps_dispatch_order_as_transfers_change() -> None:
    def waiting(tid: str, condition: dict[str, object], at: str) -> Transfer:
        t = Transfer.request(ev.TransferRequested(
            transfer_id=tid, patient={"name": tid}, risk_category="home_monitoring", condition=condition,
            origin={"kind": "home", "name": "家", "location": {"lat": 38.28, "lon": 106.24}},
            purpose="outpatient_visit", return_required=False, requested_by={"channel": "community"}),
            requested_at=f"2022-11-20T01:00:{at}+00:00")
        t.queue("no fitting vehicle")
        return t

    queue = WaitingQueue()
    late_fever = waiting("fever", {"fever": True}, "09")
    tie_a, tie_b = waiting("a", {}, "05"), waiting("b", {}, "05")
    def put(t: Transfer, position: int) -> None:
        queue.put(StateChange("Transfer", t.stream_id, t.version, t.status, None, "", position), lambda: t)

    for position, t in enumerate([tie_b, late_fever, tie_a], start=1):
        put(t, position)
    # Priority first, then request time; a tie goes in update order.
    assert [t.id for t in queue.in_order()] == ["fever", "b", "a"]
    critical = waiting("critical", {"critical": True}, "30")
    put(critical, 4)
    served = tie_b.model_copy()
    served.status = "assigned"
    put(served, 5)
    assert [t.id for t in queue.in_order()] == ["critical", "fever", "a"] and len(queue) == 3
    # A transfer back in line in the commit being built goes after those it ties with.
    again = waiting("a2", {}, "05")
    assert [t.id for t in queue.in_order(also=again)] == ["critical", "fever", "a", "a2"]
    assert [t.id for t in queue.in_order(also=tie_a)] == ["critical", "fever", "a"]


def test_r5_negative_pressure_for_fever_from_isolation_and_for_cases() -> None:
    assert vehicle_needs("isolation_site", {"fever": True}).negative_pressure
    assert vehicle_needs("sealed_area", {"covid_symptoms": True}).negative_pressure
    assert vehicle_needs("confirmed", {}).negative_pressure
    assert not vehicle_needs("home_monitoring", {}).negative_pressure
    assert vehicle_needs("home_monitoring", {"critical": True}).life_support


def test_r5_home_monitoring_rides_the_dedicated_vehicle_not_the_nearer_npa() -> None:
    npa, bus = vehicle("npa"), vehicle("bus", kind="dedicated_vehicle", life_support=False, lat=38.20)
    fitting, _ = rank_vehicles(vehicle_needs("home_monitoring", {}), HOME, [npa, bus], ETA)
    assert [v.id for v in fitting] == ["bus", "npa"]


def test_vehicles_beyond_the_first_shown_come_nearest_first_and_are_counted() -> None:
    near_to_far = [vehicle(f"v{i}", kind="dedicated_vehicle", life_support=False, lat=38.28 + i / 100)
                   for i in range(14)]
    busy = vehicle("busy", kind="dedicated_vehicle", life_support=False, lat=38.28)
    busy.status = "assigned"
    fitting, considered = rank_vehicles(vehicle_needs("home_monitoring", {}), HOME,
                                        [*reversed(near_to_far), busy], ETA, shown=3)
    assert [v.id for v in fitting] == [v.id for v in near_to_far]
    assert [c.get("vehicle_id") for c in considered[:3]] == ["v0", "v1", "v2"]
    assert considered[3] == {"others": {"fitting_free": 11, "not_fitting_or_busy": 1}}


def test_r6_roles_by_patient_class() -> None:
    places = [facility("fever", ["fever_clinic"], 38.30),
              facility("cardio", ["specialty_cardio_cerebro"], 38.49),
              facility("cabin", ["fangcang"], 38.35), facility("designated", ["designated"], 38.45)]
    stroke = patient_class("home_monitoring", {"critical": True, "kind": "stroke"})
    assert route(stroke, places, critical=True) == "cardio"
    assert route(patient_class("isolation_site", {"fever": True}), places) == "fever"
    assert route(patient_class("confirmed", {"severity": "mild"}), places) == "cabin"
    assert route(patient_class("confirmed", {"severity": "severe"}), places) == "designated"
    # R13: a case found in a fever clinic goes to a designated hospital, even a suspected
    # one (a fever patient elsewhere) or a mild confirmed one (a fangcang's elsewhere).
    for risk, condition in (("suspected", {"fever": True}), ("confirmed", {"severity": "mild"})):
        assert route(patient_class(risk, condition, "fever_clinic"), places) == "designated"
        assert route(patient_class(risk, condition, "home"), places) != "designated"
    assert route(patient_class("fever_clinic", {"fever": True}, "fever_clinic"), places) == "fever"
    emergency = patient_class("suspected", {"critical": True, "kind": "stroke"}, "fever_clinic")
    assert route(emergency, places, critical=True) == "cardio"


def test_r6_the_wish_is_honoured_when_eligible_but_not_before_urgency() -> None:
    near, far = facility("near", ["fever_clinic"], 38.30), facility("far", ["fever_clinic"], 38.49)
    assert route("fever", [near, far], wish="far") == "far"
    assert route("fever", [near, far], wish="nx-cardio") == "near"  # not eligible
    assert route("critical", [facility("d1", ["designated"], 38.30), facility("d2", ["designated"], 38.49)],
                 critical=True, wish="d2") == "d1"


def test_r7_overflow_past_the_threshold_activates_backups_and_they_stand_down() -> None:
    first = facility("first", ["fever_clinic", "designated"], 38.40, backups=["second"])
    second = facility("second", ["fever_clinic", "backup"], 38.49, capacity=80)
    assert route("fever", [first, second]) == "first"  # a standing-down backup takes no one
    first.report_load(80, "2022-11-20T09:00:00+08:00")  # exactly 80%: not past
    assert route("fever", [first, second]) == "first"
    first.report_load(85, "2022-11-20T09:10:00+08:00")
    assert route("fever", [first, second]) == "second"
    first.report_load(50, "2022-11-20T10:00:00+08:00")
    assert route("fever", [first, second]) == "first"
    kinds = [p.event.event_type for p in first.pending()]
    assert kinds.count("BackupsActivated") == 1 and kinds.count("BackupsStoodDown") == 1


def test_r7_a_backup_takes_only_the_patients_its_primary_would_have_taken() -> None:
    first = facility("first", ["fever_clinic"], 38.40, backups=["second"])
    second = facility("second", ["fever_clinic", "backup"], 38.49)
    cardio = facility("cardio", ["specialty_cardio_cerebro"], 38.60)
    first.report_load(90, "2022-11-20T09:00:00+08:00")
    assert route("fever", [first, second, cardio]) == "second"
    assert route("cardio_cerebro", [first, second, cardio], critical=True) == "cardio"


def test_r7_a_full_fever_clinic_does_not_close_the_designated_ward() -> None:
    first = facility("first", ["fever_clinic", "designated"], 38.40, backups=["second"])
    second = facility("second", ["fever_clinic", "backup"], 38.49)
    first.report_load(90, "2022-11-20T09:00:00+08:00")
    assert route("fever", [first, second]) == "second"
    assert route("confirmed_severe", [first, second]) == "first"


def test_r7_a_redirect_away_from_a_full_hospital_goes_to_the_backups_it_activates() -> None:
    """The redirect's current destination is no candidate, but its overflow still counts:
    leaving it out of the facilities altogether left its backups standing down."""
    first = facility("first", ["fever_clinic"], 38.40, backups=["second"])
    second = facility("second", ["fever_clinic", "backup"], 38.49)
    far = facility("far", ["fever_clinic"], 39.50)
    first.report_load(90, "2022-11-20T09:00:00+08:00")
    r = choose_destination(HOME, "fever", region().roles["fever"], [first, second, far], ETA, critical=False,
                           excluding="first")
    assert r.facility is not None and r.facility.id == "second", r
    assert "first" not in {c["facility_id"] for c in r.candidates}, r.candidates
    first.report_load(50, "2022-11-20T10:00:00+08:00")  # back under: the backup stands down
    r = choose_destination(HOME, "fever", region().roles["fever"], [first, second, far], ETA, critical=False,
                           excluding="first")
    assert r.facility is not None and r.facility.id == "far", r


def test_r10_every_transfer_is_reported_once_and_120_files_direct_calls() -> None:
    t = transfer(channel="direct_call")
    t.report()
    t.report()
    reports = [p.event for p in t.pending() if isinstance(p.event, ev.TransferReported)]
    assert len(reports) == 1 and reports[0].reported_by == "120"
    t2 = transfer(channel="community")
    t2.report()
    report = next(p.event for p in t2.pending() if isinstance(p.event, ev.TransferReported))
    assert report.reported_by == "社区"


def test_cancel_frees_the_vehicle_before_pickup_and_is_refused_after() -> None:
    v, t = vehicle(), transfer()
    t.assign(v, [], "auto", [])
    assert t.cancel("patient refused") == "v1"
    v.stand_down("t-1", "cancelled")
    assert v.status == "available" and t.status == "cancelled"
    v2, t2 = vehicle("v2"), transfer()
    t2.assign(v2, [], "auto", [])
    t2.picked_up("trip-9", "v2")
    with pytest.raises(StateConflict):
        t2.cancel("too late")


def test_breakdown_before_pickup_puts_the_transfer_back_for_another_vehicle() -> None:
    v, t = vehicle(), transfer()
    t.assign(v, [], "auto", [])
    v.take_out_of_service("engine failure")
    assert t.withdraw_vehicle("engine failure") == "v1"
    assert t.status == "requested" and t.vehicle_id is None
    t.assign(vehicle("v2"), [], "auto", [])
    assert t.vehicle_id == "v2"


def test_r2_a_vehicle_taken_off_a_trip_is_held_until_the_transfer_service_ends_that_trip() -> None:
    """A breakdown reported before the crew's patient_aboard step reached dispatch: the
    patient may be aboard. Repaired before the trip's end arrives, the vehicle used to be
    assigned again, then the TripCompleted (it carried the patient) came: an R2 violation
    the system let through (three on a simulated day). Now it waits for that trip's end."""
    v = vehicle()
    v.reserve("t-1")
    v.take_out_of_service("engine failure", withdrawn_from="t-1")
    v.set_duty(True, "repaired")
    assert v.status == "awaiting_disinfection" and v.trip_end_awaited == "t-1"
    with pytest.raises(RuleRefused) as refused:
        transfer().assign(v, [], "auto", [])
    assert refused.value.rule == "R2"
    carried = Vehicle.model_validate_json(v.model_dump_json())
    carried.trip_completed("trip-1", "t-1")  # the patient was aboard: disinfection first
    assert (carried.status, carried.trip_end_awaited, carried.awaiting_trips) == (
        "awaiting_disinfection", None, ["trip-1"])
    v.trip_aborted("t-1")  # the patient never boarded: free at once
    assert (v.status, v.trip_end_awaited, v.transfer_id) == ("available", None, None)
    v.trip_aborted("t-1")  # a redelivery changes nothing
    assert [p.event.event_type for p in v.pending()][-2:] == ["VehicleDutyChanged", "VehicleHoldLifted"]


@pytest.mark.parametrize("carried", [True, False])
def test_r1_the_withdrawn_trips_end_leaves_an_overriding_assignment_to_the_same_transfer(
        carried: bool) -> None:
    """Held, the vehicle is sent to the same transfer again by a supervisor's R2 override;
    then the end of the trip it was taken off arrives: that end is the old trip's, and the
    vehicle stays on the transfer (it was set free, and given to the next request)."""
    v = vehicle()
    v.reserve("t-1")
    v.take_out_of_service("engine failure", withdrawn_from="t-1")
    v.set_duty(True, "repaired")
    v.reserve("t-1", overrides=frozenset({"R2"}))
    if carried:
        v.trip_completed("trip-1", "t-1")
    else:
        v.trip_aborted("t-1")
    assert (v.status, v.transfer_id, v.trip_end_awaited) == ("assigned", "t-1", None)
    assert v.awaiting_trips == (["trip-1"] if carried else [])


def test_r2_an_earlier_trips_late_end_leaves_the_current_assignment() -> None:
    """A trip's end that arrives once the vehicle carries another transfer (reached by an
    R2 override, or a history from before the hold above) used to clear the current
    assignment: its transfer kept a vehicle that dispatch counted free."""
    v = vehicle()
    v.reserve("t-2")
    v.trip_completed("trip-1", "t-1")
    assert (v.status, v.transfer_id, v.awaiting_trips) == ("assigned", "t-2", ["trip-1"])
    v.trip_completed("trip-2", "t-2")
    assert (v.status, v.transfer_id) == ("awaiting_disinfection", None)
    v.released("trip-1", "c-1")
    assert v.status == "awaiting_disinfection"  # trip-2's disinfection is still owed
    v.released("trip-2", "c-2")
    assert v.status == "available"


def test_duty_and_quarantine() -> None:
    v = vehicle()
    v.set_duty(False, "shift over")
    assert v.status == "off_duty"
    v.set_duty(True, "shift start")
    assert v.status == "available"
    v.take_out_of_service("positive swab", rule="R9")
    with pytest.raises(RuleRefused) as refused:
        v.set_duty(True, "try")
    assert refused.value.rule == "R9"


def test_redirect_a_worsening_patient_raises_priority() -> None:
    t = transfer("home_monitoring", {})
    t.redirect(facility("cardio", ["specialty_cardio_cerebro"], 38.49), "worsened en route", [],
               {"critical": True, "kind": "stroke"})
    assert t.destination_id == "cardio" and t.priority == 1 and t.condition["kind"] == "stroke"


def test_care_series_requests_each_appointment_once_ahead_of_time() -> None:
    series = CareSeries.schedule(ev.CareSeriesScheduled(
        series_id="s1", template={}, weekdays=[1, 3, 5], time="08:00", timezone="Asia/Shanghai",
        starts_on="2022-11-21", until="2022-11-27", lead_minutes=60))
    monday_0659 = datetime.fromisoformat("2022-11-21T06:59:00+08:00")
    monday_0700 = datetime.fromisoformat("2022-11-21T07:00:00+08:00")
    since = datetime.fromisoformat("2022-11-20T00:00:00+08:00")
    assert series.due(monday_0659, since) == []
    due = series.due(monday_0700.replace(second=1), since)
    assert [d.isoformat() for d in due] == ["2022-11-21T08:00:00+08:00"]
    series.mark_requested(due[0], "t-x")
    assert series.due(monday_0700.replace(second=1), since) == []
    week = series.appointments(since, datetime.fromisoformat("2022-12-01T00:00:00+08:00"))
    assert [a.day for a in week] == [21, 23, 25]  # Mon, Wed, Fri; until the 27th
    series.cancel("treatment finished")
    assert series.due(datetime.fromisoformat("2022-11-23T07:30:00+08:00"), since) == []
