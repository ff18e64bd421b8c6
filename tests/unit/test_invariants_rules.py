"""The invariant checker's rule and loop checks on histories written by hand: a clean one
passes; each forbidden shape (what the services refuse) is named with its rule, and what
the rules allow (an override with a reason, a supervisor's early release) is not."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any

from services.invariants.history import Ev
from services.invariants.loops import loops
from services.invariants.report import Check
from services.invariants.rules import Fold

T0 = datetime(2022, 11, 20, 9, tzinfo=UTC)
STORES = ("dispatch", "transfer", "disinfection")
NPA = {"kind": "negative_pressure_ambulance", "dedicated_pool": True, "life_support": True}
CAR = {"kind": "dedicated_vehicle", "dedicated_pool": True, "life_support": False}
PROTOCOL = {"min_concentration_mg_per_l": 1000, "min_contact_minutes": 30, "min_dose_ml_per_m3": None}


def stage(kind: str, start: datetime, concentration: float = 1000) -> dict[str, Any]:
    end = start + timedelta(minutes=35)
    return {"stage": kind, "disinfectant": "chlorine", "concentration_mg_per_l": concentration,
            "method": "wipe", "started_at": start.isoformat(), "ended_at": end.isoformat(),
            "operator": "王五", "location": "洗消间", "protocol": PROTOCOL,
            "video": {"camera_id": "cam-1", "clip_ref": "nvr://1", "from": start.isoformat(),
                      "to": (end + timedelta(minutes=1)).isoformat()}}


class History:
    """Events as the stores would hold them: positions per store, versions per stream, and
    one recorded_at per commit."""

    def __init__(self) -> None:
        self.events: list[Ev] = []
        self.positions: dict[str, int] = defaultdict(int)
        self.versions: dict[str, int] = defaultdict(int)
        self.clock = T0

    def commit(self, store: str, *events: tuple[str, str, dict[str, Any]], role: str = "dispatcher",
               actor: str = "li") -> list[Ev]:
        self.clock += timedelta(seconds=1)
        out = []
        for stream, type_, payload in events:
            self.positions[store] += 1
            self.versions[stream] += 1
            out.append(Ev(store, self.positions[store], f"{store}-{self.positions[store]}", stream,
                          self.versions[stream], type_, self.clock.isoformat(), self.clock.isoformat(),
                          actor, role, None, payload))
        self.events += out
        return out

    def vehicle(self, vid: str, fit: dict[str, Any] = NPA) -> None:
        self.commit("dispatch", (f"vehicle-{vid}", "VehicleRegistered", {"vehicle_id": vid, **fit}))

    def request(self, tid: str, person: str = "640121198001011231", return_required: bool = False,
                risk_category: str = "isolation_site") -> None:
        self.commit("dispatch", (f"transfer-{tid}", "TransferRequested", {
            "transfer_id": tid, "patient": {"name": "张三", "id_number": person},
            "risk_category": risk_category, "condition": {"fever": True},
            "return_required": return_required, "requested_by": {"channel": "console"}}),
                    (f"transfer-{tid}", "TransferReported", {"transfer_id": tid, "reported_by": "120"}))

    def assign(self, tid: str, vid: str, *overrides: str, role: str = "dispatcher") -> None:
        self.commit("dispatch",
                    *[(f"transfer-{tid}", "RuleOverridden", {"rule": r, "transfer_id": tid, "vehicle_id": vid,
                                                             "reason": "负压车均在途"}) for r in overrides],
                    (f"transfer-{tid}", "VehicleAssigned", {"transfer_id": tid, "vehicle_id": vid}),
                    (f"vehicle-{vid}", "VehicleReserved", {"vehicle_id": vid, "transfer_id": tid}), role=role)

    def trip(self, tid: str, vid: str, *, hand_over: bool = True) -> str:
        trip = f"trip-of-{tid}-{vid}"
        self.commit("transfer", (f"trip-{trip}", "TripOpened",
                                 {"trip_id": trip, "transfer_id": tid, "vehicle_id": vid}))
        self.step(trip, "patient_aboard")
        if hand_over:
            ids = {"trip_id": trip, "transfer_id": tid}
            self.commit("transfer", (f"trip-{trip}", "PatientHandedOver", ids),
                        (f"trip-{trip}", "TripCompleted", {**ids, "vehicle_id": vid}))
            self.commit("dispatch", (f"transfer-{tid}", "TransferHandedOver", {"transfer_id": tid}),
                        (f"vehicle-{vid}", "VehicleAwaitingDisinfection", {**ids, "vehicle_id": vid}))
        return trip

    def step(self, trip: str, step: str) -> None:
        self.commit("transfer", (f"trip-{trip}", "TripStepReported", {"trip_id": trip, "step": step}))

    def disinfect(self, trip: str, vid: str, *, stages: bool = True, swab: bool = True,
                  release: dict[str, Any] | None = None, role: str = "staff") -> str:
        cid = f"cycle-of-{trip}"
        s = f"cycle-{cid}"
        self.commit("disinfection", (s, "CycleOpened", {"cycle_id": cid, "vehicle_id": vid, "trip_id": trip}))
        if stages:
            self.commit("disinfection", (s, "InitialDisinfectionLogged", {"cycle_id": cid, "stage": stage(
                "initial", T0)}))
            self.commit("disinfection", (s, "TerminalDisinfectionLogged", {"cycle_id": cid, "stage": stage(
                "terminal", T0 + timedelta(hours=1))}))
        if swab:
            self.commit("disinfection", (s, "SurfaceSwabCollected", {"cycle_id": cid, "sample_id": "S1"}))
        released = {"cycle_id": cid, "vehicle_id": vid, "trip_id": trip, "policy": "after_swab_collected"}
        self.commit("disinfection", (s, "VehicleReleased", {**released, **(release or {})}), role=role)
        self.commit("dispatch", (f"vehicle-{vid}", "VehicleReturnedToService",
                                 {"vehicle_id": vid, "trip_id": trip, "cycle_id": cid}))
        return cid

    def fold(self) -> Fold:
        fold = Fold()
        for store in STORES:  # as the checker reads them: store after store, in position order
            for ev in self.events:
                if ev.store == store:
                    fold.feed(ev)
        return fold


def findings(h: History) -> dict[str, list[Check]]:
    by_rule: dict[str, list[Check]] = defaultdict(list)
    for check in h.fold().finish():
        if not check.ok:
            by_rule[check.rule or "-"].append(check)
    return by_rule


def failed(h: History) -> set[str]:
    return {c.code for checks in findings(h).values() for c in checks}


def clean_day() -> History:
    h = History()
    h.vehicle("v1")
    h.request("t1")
    h.assign("t1", "v1")
    h.disinfect(h.trip("t1", "v1"), "v1")
    h.request("t2", person="64012119900307007X")
    h.assign("t2", "v1")
    return h


def test_a_clean_day_passes_and_its_loops_are_closed_or_open_with_their_age() -> None:
    h = clean_day()
    fold = h.fold()
    assert [c.name for c in fold.finish() if not c.ok] == []
    by_code = {c.code: c for c in loops(fold, h.clock + timedelta(minutes=5))}
    assert all(c.ok for c in by_code.values())
    assert by_code["transfers"].counts == {"transfers": 2, "closed": 1}
    [still] = by_code["transfers"].open
    assert still.context["transfer_id"] == "t2" and still.context["state"] == "assigned"
    assert still.context["age_s"] == 301.0  # requested a second before the last commit
    assert by_code["cycles"].counts == {"cycles": 1, "released": 1}
    strict = {c.code: c for c in loops(fold, h.clock + timedelta(minutes=5), max_open_age=60)}
    assert not strict["transfers"].ok and strict["transfers"].found == 1


def test_r1_a_second_reservation_and_a_second_patient_aboard_are_named() -> None:
    h = clean_day()
    h.request("t3", person="640121199001010011")
    h.assign("t3", "v1")  # v1 still carries t2
    h.trip("t2", "v1", hand_over=False)
    h.trip("t3", "v1", hand_over=False)  # t2's patient is still aboard
    assert failed(h) == {"vehicle_reserved_twice", "two_patients_aboard"}
    assert {c.rule for c in findings(h)["R1"]} == {"R1"}


def test_r2_only_a_supervisor_overrides_the_wait_for_disinfection() -> None:
    for role, expected in (("dispatcher", {"reserved_before_release"}), ("supervisor", set())):
        h = History()
        h.vehicle("v1")
        h.request("t1")
        h.assign("t1", "v1")
        h.trip("t1", "v1")  # v1 now awaits disinfection
        h.request("t2", person="64012119900307007X")
        h.assign("t2", "v1", "R2", role=role)
        assert failed(h) == expected, role


def test_r3_r5_an_unfit_vehicle_needs_an_override_with_a_reason() -> None:
    h = History()
    h.vehicle("car", CAR)  # a fever patient from an isolation site needs negative pressure (R5)
    h.request("t1")
    h.assign("t1", "car")
    assert failed(h) == {"negative_pressure_required"}
    h = History()
    h.vehicle("car", CAR)
    h.request("t1")
    h.assign("t1", "car", "R5")
    assert failed(h) == set()


def test_r8_r9_release_by_policy_needs_both_stages_and_a_swab_an_early_one_a_supervisor() -> None:
    h = History()
    h.vehicle("v1")
    h.request("t1")
    h.assign("t1", "v1")
    h.disinfect(h.trip("t1", "v1"), "v1", stages=False, swab=False)
    assert failed(h) == {"released_without_both_stages", "released_without_swab"}
    h = History()
    h.vehicle("v1")
    h.request("t1")
    h.assign("t1", "v1")
    early = {"policy": "supervisor_override", "override": True}
    h.disinfect(h.trip("t1", "v1"), "v1", stages=False, swab=False, release=early, role="staff")
    assert failed(h) == {"early_release_not_supervisor"}


def test_r8_a_stage_below_the_protocol_it_was_held_to_is_named() -> None:
    h = History()
    c1 = {"cycle_id": "c1"}
    h.commit("disinfection", ("cycle-c1", "CycleOpened", {**c1, "vehicle_id": "v1", "trip_id": "x"}),
             ("cycle-c1", "InitialDisinfectionLogged", {**c1, "stage": stage("initial", T0, 500)}),
             ("cycle-c1", "TerminalDisinfectionLogged", {**c1, "stage": stage("terminal", T0)}))
    assert failed(h) == {"stage_below_protocol"}
    low, overlap = {c.code: c for c in h.fold().finish()}["stage_below_protocol"].items
    assert "500" in low.detail and low.rule == "R8"
    assert "before the initial stage ended" in overlap.detail


def test_r8_a_first_stage_before_the_handover_or_the_positive_result_is_named() -> None:
    h = History()
    handed = (T0 + timedelta(hours=1)).isoformat()
    for cid, opened, stage_at in (("c1", {"trip_ended_at": handed}, T0),  # an hour before: flagged
                                  ("c2", {"trip_ended_at": handed}, T0 + timedelta(minutes=55)),  # clocks
                                  ("c3", {}, T0),  # a trip dispatch ended: no bound
                                  ("c4", {"kind": "redisinfection", "opened_at": handed}, T0)):  # flagged
        h.commit("disinfection", (f"cycle-{cid}", "CycleOpened", {"cycle_id": cid, "vehicle_id": "v1",
                                                                  "trip_id": "x", **opened}),
                 (f"cycle-{cid}", "InitialDisinfectionLogged",
                  {"cycle_id": cid, "stage": stage("initial", stage_at)}))
    [check] = findings(h)["R8"]
    assert check.code == "stage_before_trip_ended"
    assert [i.context["cycle_id"] for i in check.items] == ["c1", "c4"]


def test_r9_a_quarantine_is_not_escaped_by_going_off_duty_and_back() -> None:
    """Dispatch's own fold would let this through (off duty replaces 'quarantined'); the
    checker keeps the quarantine apart until a re-disinfection lifts it."""
    h = History()
    h.vehicle("v1")
    q = {"vehicle_id": "v1"}
    h.commit("dispatch", ("vehicle-v1", "VehicleTakenOutOfService", {**q, "reason": "swab", "rule": "R9"}))
    h.commit("dispatch", ("vehicle-v1", "VehicleDutyChanged", {**q, "on_duty": False}))
    h.commit("dispatch", ("vehicle-v1", "VehicleDutyChanged", {**q, "on_duty": True}))
    h.request("t1")
    h.assign("t1", "v1")
    [check] = findings(h)["R9"]
    assert check.code == "used_while_quarantined" and check.found == 2


def test_a_vehicle_back_in_service_with_no_release_and_a_second_live_transfer_are_named() -> None:
    h = clean_day()
    h.commit("dispatch", ("vehicle-v1", "VehicleReturnedToService",
                          {"vehicle_id": "v1", "trip_id": "forged", "cycle_id": "none"}))
    h.request("t9")  # the person of t1, which was handed over: allowed
    h.request("t10")  # the same person again while t9 is live
    assert failed(h) == {"returned_without_release", "second_live_transfer"}


def test_a_queued_transfer_beside_a_free_vehicle_that_fits_it_is_a_loop_nothing_will_close() -> None:
    h = History()
    h.vehicle("car", CAR)  # free, but a fever patient from an isolation site needs negative pressure
    h.request("t1")
    h.commit("dispatch", ("transfer-t1", "TransferQueued", {"transfer_id": "t1", "reason": "none fits"}))
    [transfers] = [c for c in loops(h.fold(), h.clock) if c.code == "transfers"]
    assert transfers.ok and transfers.still_open == 1
    h.vehicle("v1")  # a fitting vehicle, free: the system serves the queue with it, or nothing ever will
    [transfers] = [c for c in loops(h.fold(), h.clock) if c.code == "transfers"]
    [item] = transfers.items
    assert item.code == "waits_beside_free_vehicle" and item.rule == "R4"
    assert item.context == {"transfer_id": "t1", "vehicle_id": "v1"}
