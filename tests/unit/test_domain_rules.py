"""The trip and disinfection domains: rules named by id, no I/O."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from libs.events.aggregate import InvalidField, RuleRefused, StateConflict
from services.disinfection.domain import Cycle, StageRecord
from services.transfer.domain import Trip

T0 = datetime.fromisoformat("2022-11-20T09:00:00+08:00")


def trip() -> Trip:
    return Trip.open("t-1", "v-1", "yc-second", {"name": "origin"}, True)


def test_trip_steps_in_order_and_resends_applied_once() -> None:
    t = trip()
    assert t.report_step("acknowledged", "c-1", T0)
    assert not t.report_step("acknowledged", "c-1", T0)  # resent by a flaky phone
    assert t.report_step("at_pickup", "c-2", T0 + timedelta(minutes=5))  # en_route lost: fine
    assert t.report_step("en_route", "c-3", T0 + timedelta(minutes=6))  # late, in sequence
    assert t.last_step == "at_pickup" and [s["step"] for s in t.steps] == [
        "acknowledged", "en_route", "at_pickup"]
    with pytest.raises(StateConflict) as out_of_order:
        t.report_step("en_route", "c-4", T0 + timedelta(minutes=7))  # twice, another id
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
