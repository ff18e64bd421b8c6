"""The disinfection domain, pure: every refusal by rule and field, the protocol arithmetic,
both release policies, quarantine and the exposure window."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

import pytest

from libs.events.aggregate import InvalidField, RuleRefused, StateConflict
from libs.events.catalog import dispatch as dsp
from libs.events.catalog.common import Location
from services.disinfection.config import DisinfectionSettings
from services.disinfection.domain import Cycle, Forbidden, StageRecord, redisinfection_id_for
from services.disinfection.exposure import Exposure, VehicleHistory, exposure_window
from services.disinfection.protocols import (
    AFTER_NEGATIVE_RESULT,
    AIR,
    DEFAULT_RULES,
    NATIONAL_AIR,
    Protocol,
    Rules,
    Treatment,
    percent,
)
from services.dispatch.domain import Vehicle

T0 = datetime.fromisoformat("2022-11-20T09:50:00+08:00")
STRICT = Rules(release_policy=AFTER_NEGATIVE_RESULT)
SITES = ["stretcher", "handrail", "door_handle", "seat"]


def stage(kind: str = "initial", start: datetime = T0, minutes: float = 35, **changes: object) -> StageRecord:
    end = start + timedelta(minutes=minutes)
    record = StageRecord(
        stage=kind, disinfectant="chlorine", concentration_mg_per_l=1000, method="wipe_and_spray",
        started_at=start, ended_at=end, operator="王五", location="洗消点", camera_id="cam-03",
        clip_ref="nvr://yc2/wash/cam-03", video_from=start - timedelta(minutes=1),
        video_to=end + timedelta(minutes=1))
    return replace(record, **changes)  # type: ignore[arg-type]


def air(start: datetime, minutes: float = 60, **changes: object) -> Treatment:
    t = Treatment(AIR, "hydrogen_peroxide", percent(3), "aerosol_spray", start,
                  start + timedelta(minutes=minutes), 20)
    return replace(t, **changes)  # type: ignore[arg-type]


def opened(trip: str = "trip-1", transfer: str = "t-1") -> Cycle:
    return Cycle.open("v-1", trip, transfer, "test", opened_at=T0 - timedelta(minutes=20),
                      trip_ended_at=T0 - timedelta(minutes=20))


def disinfected(rules: Rules = DEFAULT_RULES, trip: str = "trip-1", transfer: str = "t-1") -> Cycle:
    c = opened(trip, transfer)
    c.log_stage(stage("initial", T0), rules)
    c.log_stage(stage("terminal", T0 + timedelta(minutes=50)), rules)
    return c


SWAB_AT = T0 + timedelta(minutes=90)


def swabbed(sample: str = "S-1", rules: Rules = DEFAULT_RULES, **kw: str) -> Cycle:
    c = disinfected(rules, **kw)
    c.collect_swab(sample, SITES, "赵六", SWAB_AT, rules)
    return c


def types(c: Cycle | Exposure | VehicleHistory | Vehicle) -> list[str]:
    return [p.event.event_type for p in c.pending()]


def refused(exc: pytest.ExceptionInfo[Any]) -> tuple[int, str, str | None]:
    e = exc.value
    return e.status, e.code, getattr(e, "field", None) or getattr(e, "rule", None)


# -- protocol arithmetic ------------------------------------------------------------------


def test_the_national_defaults() -> None:
    assert DEFAULT_RULES.surface["chlorine"] == Protocol(1000, 30)
    assert DEFAULT_RULES.surface["chlorine_dioxide"] == Protocol(500, 30)
    assert NATIONAL_AIR["peracetic_acid"] == Protocol(5000, 60, 20)  # 0.5%
    assert NATIONAL_AIR["hydrogen_peroxide"] == Protocol(30000, 60, 20)  # 3%
    assert NATIONAL_AIR["chlorine_dioxide"] == Protocol(500, 60, 20)
    assert DEFAULT_RULES.result_sla == timedelta(hours=6) and DEFAULT_RULES.min_swab_sites == 3


def test_a_stage_records_its_earliest_end_by_the_protocol() -> None:
    c = opened()
    c.log_stage(stage("initial", T0, 35))
    assert c.initial is not None
    assert c.initial["earliest_end_at"] == "2022-11-20T10:20:00+08:00"  # 30 min of chlorine
    assert c.initial["contact_minutes"] == 35 and c.initial["protocol"]["min_contact_minutes"] == 30


def test_air_spraying_keeps_the_cabin_closed_for_60_minutes_and_sets_the_earliest_end() -> None:
    c = disinfected()
    c2 = opened("trip-2")
    c2.log_stage(stage("initial", T0, 35, air=air(T0, 60), video_to=T0 + timedelta(minutes=61)))
    assert c2.initial is not None
    assert c2.initial["air"]["dose_ml_per_m3"] == 20
    assert c2.initial["earliest_end_at"] == "2022-11-20T10:50:00+08:00"  # the 60 closed minutes
    assert c.initial is not None and "air" not in c.initial


def test_the_earliest_ready_time_follows_the_protocols() -> None:
    c = opened()
    assert c.earliest_ready_at() == T0 - timedelta(minutes=20) + timedelta(minutes=60)  # two stages
    c.log_stage(stage("initial", T0, 35))
    assert c.earliest_ready_at() == T0 + timedelta(minutes=35 + 30)
    c.log_stage(stage("terminal", T0 + timedelta(minutes=50), 40))
    assert c.earliest_ready_at() == T0 + timedelta(minutes=90)
    c.collect_swab("S-1", SITES, "赵六", SWAB_AT)
    assert c.earliest_ready_at() is None  # released


def test_configured_protocols_lay_over_the_national_ones() -> None:
    cfg = DisinfectionSettings(surface_protocols={"chlorine": {"min_contact_minutes": 45}},
                               air_protocols={"ozone": {"min_concentration_mg_per_l": 20,
                                                        "min_contact_minutes": 30}})
    rules = cfg.rules()
    assert rules.surface["chlorine"] == Protocol(1000, 45)
    assert rules.surface["chlorine_dioxide"] == Protocol(500, 30)
    assert set(rules.air) == {"peracetic_acid", "hydrogen_peroxide", "chlorine_dioxide", "ozone"}
    with pytest.raises(InvalidField) as short:
        opened().log_stage(stage("initial", T0, 40), rules)
    assert short.value.field == "ended_at" and short.value.extra["required_minutes"] == 45


# -- R8: each refusal of a stage ------------------------------------------------------------


@pytest.mark.parametrize(("record", "code", "field"), [
    (stage(minutes=10), "contact_time_below_protocol", "ended_at"),
    (stage(concentration_mg_per_l=500), "concentration_below_protocol", "concentration_mg_per_l"),
    (stage(disinfectant="alcohol"), "unknown_disinfectant", "disinfectant"),
    (stage(minutes=0), "stage_ends_before_start", "ended_at"),
    (stage(video_from=T0 + timedelta(minutes=5)), "video_does_not_cover_stage", "video"),
    (stage(video_to=T0 + timedelta(minutes=20)), "video_does_not_cover_stage", "video"),
    (stage(video_to=T0 - timedelta(minutes=2)), "video_window_empty", "video.to"),
    (stage(air=air(T0, 30)), "contact_time_below_protocol", "air.ended_at"),
    (stage(air=air(T0, dose_ml_per_m3=10)), "dose_below_protocol", "air.dose_ml_per_m3"),
    (stage(air=air(T0, concentration_mg_per_l=percent(1))), "concentration_below_protocol",
     "air.concentration_mg_per_l"),
    (stage(air=air(T0, disinfectant="chlorine")), "unknown_disinfectant", "air.disinfectant"),
    (stage(air=air(T0, 60)), "video_does_not_cover_stage", "video"),  # 60 min of air, 37 of video
], ids=lambda v: v if isinstance(v, str) else "")
def test_r8_a_stage_below_its_protocol_or_outside_its_footage_is_422(
        record: StageRecord, code: str, field: str) -> None:
    c = opened()
    with pytest.raises(InvalidField) as exc:
        c.log_stage(record)
    assert refused(exc) == (422, code, field)
    assert c.pending()[-1].event.event_type == "CycleOpened"  # nothing recorded


def test_r8_terminal_before_initial_is_409_and_the_terminal_cannot_overlap_it() -> None:
    c = opened()
    with pytest.raises(RuleRefused) as early:
        c.log_stage(stage("terminal"))
    assert refused(early) == (409, "terminal_before_initial", "R8")
    c.log_stage(stage("initial", T0, 35))
    with pytest.raises(InvalidField) as overlap:
        c.log_stage(stage("terminal", T0 + timedelta(minutes=30)))
    assert refused(overlap) == (422, "terminal_overlaps_initial", "started_at")


def test_r8_the_first_stage_cannot_begin_before_the_trip_ended() -> None:
    """The trip was handed over at T0 - 20 min: a first stage begun more than the clocks'
    tolerance (10 min) before is refused, naming the time; within it, it is taken. A trip
    dispatch ended (a takeover, dated by the server when it heard) bounds nothing."""
    c = opened()
    with pytest.raises(InvalidField) as early:
        c.log_stage(stage("initial", T0 - timedelta(minutes=31)))
    assert refused(early) == (422, "stage_before_trip_ended", "started_at")
    assert early.value.extra["bound_at"] == "2022-11-20T09:30:00+08:00"
    assert c.pending()[-1].event.event_type == "CycleOpened"  # nothing recorded
    with pytest.raises(InvalidField) as aired:  # the air treatment began it, long before
        opened().log_stage(stage("initial", T0, air=air(T0 - timedelta(minutes=40), 60),
                                 video_from=T0 - timedelta(minutes=41)))
    assert refused(aired) == (422, "stage_before_trip_ended", "started_at")
    c.log_stage(stage("initial", T0 - timedelta(minutes=29)))
    assert c.initial is not None
    taken_over = Cycle.open("v-1", "trip-2", "t-2", "test", opened_at=T0 + timedelta(hours=1))
    taken_over.log_stage(stage("initial", T0))
    assert taken_over.initial is not None


def test_r8_a_redisinfection_begins_after_the_positive_result() -> None:
    positive = disinfected()
    redo = Cycle.open_redisinfection(positive, "s-1", T0 + timedelta(hours=3))
    with pytest.raises(InvalidField) as early:
        redo.log_stage(stage("initial", T0 + timedelta(hours=2)))
    assert refused(early) == (422, "stage_before_positive_result", "started_at")
    redo.log_stage(stage("initial", T0 + timedelta(hours=3)))
    assert redo.initial is not None


def test_a_stage_is_logged_once_and_not_after_the_swab() -> None:
    c = opened()
    c.log_stage(stage("initial"))
    with pytest.raises(StateConflict) as again:
        c.log_stage(stage("initial"))
    assert again.value.code == "stage_already_logged"
    c.log_stage(stage("terminal", T0 + timedelta(minutes=50)))
    with pytest.raises(StateConflict) as twice:
        c.log_stage(stage("terminal", T0 + timedelta(minutes=50)))
    assert twice.value.code == "stage_already_logged"
    c.collect_swab("S-1", SITES, "赵六", SWAB_AT)
    with pytest.raises(StateConflict) as closed:
        c.log_stage(stage("terminal", T0 + timedelta(minutes=50)))
    assert closed.value.code == "cycle_closed" and closed.value.extra["cycle_status"] == "released"


def test_times_ahead_of_the_server_clock_are_refused() -> None:
    now = T0
    DEFAULT_RULES.check_not_future("collected_at", now + timedelta(minutes=4), now)  # phone drift
    with pytest.raises(InvalidField) as ahead:
        DEFAULT_RULES.check_not_future("collected_at", now + timedelta(minutes=6), now)
    assert refused(ahead) == (422, "time_in_the_future", "collected_at")


# -- R9: the swab ---------------------------------------------------------------------------


def test_r9_each_refusal_of_a_swab() -> None:
    c = opened()
    c.log_stage(stage("initial"))
    with pytest.raises(RuleRefused) as before_terminal:
        c.collect_swab("S-1", SITES, "赵六", SWAB_AT)
    assert refused(before_terminal) == (409, "swab_before_terminal", "R8")
    c.log_stage(stage("terminal", T0 + timedelta(minutes=50)))
    with pytest.raises(InvalidField) as few:
        c.collect_swab("S-1", ["seat", "seat", "handrail"], "赵六", SWAB_AT)  # two distinct sites
    assert refused(few) == (422, "too_few_sites", "sites")
    with pytest.raises(InvalidField) as too_soon:
        c.collect_swab("S-1", SITES, "赵六", T0 + timedelta(minutes=60))  # terminal ends at 85'
    assert refused(too_soon) == (422, "swab_before_terminal_ended", "collected_at")
    c.collect_swab("S-1", SITES, "赵六", SWAB_AT)
    with pytest.raises(StateConflict) as second:
        c.collect_swab("S-2", SITES, "赵六", SWAB_AT)
    assert second.value.code == "swab_not_needed"


def test_the_number_of_sites_is_configured() -> None:
    c = disinfected()
    with pytest.raises(InvalidField):
        c.collect_swab("S-1", SITES, "赵六", SWAB_AT, Rules(min_swab_sites=5))
    c.collect_swab("S-1", SITES, "赵六", SWAB_AT, Rules(min_swab_sites=4))


def test_each_refusal_of_a_result() -> None:
    c = swabbed()
    with pytest.raises(StateConflict) as unknown:
        c.record_result("S-9", "negative", "lab", SWAB_AT)
    assert unknown.value.code == "sample_not_in_cycle"
    with pytest.raises(InvalidField) as early:
        c.record_result("S-1", "negative", "lab", SWAB_AT - timedelta(minutes=1))
    assert refused(early) == (422, "result_before_collection", "reported_at")
    assert c.record_result("S-1", "negative", "lab", SWAB_AT + timedelta(hours=4))
    assert not c.record_result("S-1", "negative", "lab", SWAB_AT + timedelta(hours=4))  # resent
    with pytest.raises(StateConflict) as changed:
        c.record_result("S-1", "positive", "lab", SWAB_AT + timedelta(hours=5))
    assert changed.value.code == "result_already_recorded"


# -- release under both policies --------------------------------------------------------------


def test_default_policy_releases_at_the_swab_and_a_negative_result_closes_the_cycle() -> None:
    c = disinfected()
    assert (c.status, c.next_action()) == ("open", "swab")
    c.collect_swab("S-1", SITES, "赵六", SWAB_AT)
    released = [p.event for p in c.pending() if p.event.event_type == "VehicleReleased"]
    assert len(released) == 1 and released[0].policy == "after_swab_collected"  # type: ignore[attr-defined]
    assert (c.status, c.next_action()) == ("released", "lab_result")
    c.record_result("S-1", "negative", "lab", SWAB_AT + timedelta(hours=3))
    assert c.status == "closed" and types(c).count("VehicleReleased") == 1
    assert c.swabs[0]["result"] == "negative"


def test_strict_policy_holds_the_vehicle_until_a_negative_result() -> None:
    c = swabbed(rules=STRICT)
    assert c.status == "awaiting_result" and "VehicleReleased" not in types(c)
    c.record_result("S-1", "negative", "lab", SWAB_AT + timedelta(hours=3), STRICT)
    assert c.status == "closed" and types(c)[-1] == "VehicleReleased"
    assert c.release is not None and c.release["policy"] == "after_negative_result"


def test_an_invalid_result_asks_for_a_new_sample_under_either_policy() -> None:
    strict = swabbed(rules=STRICT)
    strict.record_result("S-1", "invalid", "lab", SWAB_AT + timedelta(hours=2), STRICT)
    assert (strict.status, strict.next_action()) == ("resample_required", "swab")
    strict.collect_swab("S-2", SITES, "赵六", SWAB_AT + timedelta(hours=3), STRICT)
    assert strict.status == "awaiting_result"
    strict.record_result("S-2", "negative", "lab", SWAB_AT + timedelta(hours=5), STRICT)
    assert strict.status == "closed" and types(strict).count("VehicleReleased") == 1

    default = swabbed()
    default.record_result("S-1", "invalid", "lab", SWAB_AT + timedelta(hours=2))
    assert default.status == "resample_required" and default.released
    default.collect_swab("S-2", SITES, "赵六", SWAB_AT + timedelta(hours=3))
    assert default.status == "released" and types(default).count("VehicleReleased") == 1


# -- R14: overdue ------------------------------------------------------------------------------


def test_r14_a_result_past_the_sla_is_flagged_once_and_the_late_result_says_so() -> None:
    c = swabbed()
    assert c.swabs[0]["due_at"] == "2022-11-20T17:20:00+08:00"  # collected 11:20, 6 h
    assert not c.flag_overdue(SWAB_AT + timedelta(hours=6))  # on the dot: not yet late
    assert c.flag_overdue(SWAB_AT + timedelta(hours=6, minutes=1))
    assert not c.flag_overdue(SWAB_AT + timedelta(hours=7))  # once
    flag = c.pending()[-1].event
    assert flag.event_type == "SwabResultOverdue" and flag.rule == "R14"  # type: ignore[attr-defined]
    c.record_result("S-1", "negative", "lab", SWAB_AT + timedelta(hours=8))
    result = c.pending()[-1].event
    assert result.overdue and result.turnaround_minutes == 480  # type: ignore[attr-defined]


def test_r14_the_sla_is_configured() -> None:
    c = swabbed(rules=Rules(result_sla=timedelta(hours=4)))
    assert c.flag_overdue(SWAB_AT + timedelta(hours=4, minutes=1))


# -- supervisor early release (R2 override) ------------------------------------------------------


def test_r2_only_a_supervisor_releases_early_and_the_event_names_what_was_skipped() -> None:
    c = opened()
    c.log_stage(stage("initial"))
    with pytest.raises(Forbidden) as not_allowed:
        c.release_early("急救车不足，重大事故", "dispatcher")
    assert refused(not_allowed) == (403, "supervisor_required", None)
    c.release_early("急救车不足，重大事故", "supervisor")
    e = c.pending()[-1].event
    assert e.event_type == "VehicleReleased" and e.override  # type: ignore[attr-defined]
    assert e.overridden_rules == ["R2", "R8"] and e.missing == ["terminal", "swab"]  # type: ignore[attr-defined]
    assert e.policy == "supervisor_override"  # type: ignore[attr-defined]
    assert c.status == "released"
    with pytest.raises(StateConflict) as twice:
        c.release_early("again", "supervisor")
    assert twice.value.code == "cycle_closed"


def test_r2_an_early_release_under_the_strict_policy_skips_the_result() -> None:
    c = swabbed(rules=STRICT)
    c.release_early("抢救任务急需", "supervisor", STRICT)
    e = c.pending()[-1].event
    assert e.missing == ["negative_result"] and e.overridden_rules == ["R2"]  # type: ignore[attr-defined]


def test_r9_a_quarantine_has_no_override() -> None:
    c = swabbed()
    c.record_result("S-1", "positive", "lab", SWAB_AT + timedelta(hours=3),
                    redisinfection_cycle_id=redisinfection_id_for("S-1"))
    redo = Cycle.open_redisinfection(c, "S-1", SWAB_AT + timedelta(hours=3))
    for cycle in (c, redo):
        with pytest.raises(RuleRefused) as exc:
            cycle.release_early("急需", "supervisor")
        assert refused(exc) == (409, "quarantine_not_overridable", "R9")


# -- R9: positive, re-disinfection --------------------------------------------------------------


def test_r9_positive_quarantines_and_the_redisinfection_waits_for_a_negative_result() -> None:
    c = swabbed()
    redo_id = redisinfection_id_for("S-1")
    c.record_result("S-1", "positive", "lab", SWAB_AT + timedelta(hours=3), redisinfection_cycle_id=redo_id)
    assert c.status == "quarantined"
    q = c.pending()[-1].event
    assert q.event_type == "VehicleQuarantined" and q.redisinfection_cycle_id == redo_id  # type: ignore[attr-defined]
    redo = Cycle.open_redisinfection(c, "S-1", SWAB_AT + timedelta(hours=3))
    assert (redo.id, redo.kind, redo.trip_id) == (redo_id, "redisinfection", "trip-1")
    assert redo.after_sample_id == "S-1"
    assert redo.holds_quarantine
    later = SWAB_AT + timedelta(hours=4)
    redo.log_stage(stage("initial", later))
    redo.log_stage(stage("terminal", later + timedelta(minutes=50)))
    redo.collect_swab("S-R", SITES, "赵六", later + timedelta(minutes=90))
    assert redo.status == "awaiting_result" and redo.holds_quarantine  # not on a sample unread
    redo.record_result("S-R", "negative", "lab", later + timedelta(hours=5))
    released = redo.pending()[-1].event
    assert released.event_type == "VehicleReleased" and released.quarantine_lifted  # type: ignore[attr-defined]
    assert redo.status == "closed" and not redo.holds_quarantine


def test_a_superseded_redisinfection_no_longer_holds_nor_releases_the_vehicle() -> None:
    redo = Cycle.open_redisinfection(swabbed(), "S-1", SWAB_AT)
    redo.log_stage(stage("initial", SWAB_AT))
    redo.log_stage(stage("terminal", SWAB_AT + timedelta(minutes=50)))
    redo.collect_swab("S-R", SITES, "赵六", SWAB_AT + timedelta(minutes=90))
    redo.supersede(redisinfection_id_for("S-2"), "S-2")
    assert redo.status == "superseded" and not redo.holds_quarantine
    redo.record_result("S-R", "negative", "lab", SWAB_AT + timedelta(hours=3))  # kept on record
    assert "VehicleReleased" not in types(redo) and redo.status == "superseded"
    with pytest.raises(StateConflict):
        redo.collect_swab("S-R2", SITES, "赵六", SWAB_AT)


# -- R9: the exposure window -------------------------------------------------------------------


def trip(n: int, result: str | None) -> Cycle:
    c = swabbed(f"S-{n}", trip=f"trip-{n}", transfer=f"t-{n}")
    if result is not None:
        c.record_result(f"S-{n}", result, "lab", SWAB_AT + timedelta(hours=2))
    return c


def relations(ordered: list[Cycle], positive: str) -> list[tuple[str, str]]:
    window = exposure_window(ordered, positive, {"t-3": {"name": "张三", "id_number": None, "phone": None}})
    return [(t.transfer_id, t.relation) for t in window.transfers]


def test_r9_the_window_runs_from_the_last_negative_swab() -> None:
    a, b, c, d, e = trip(1, "negative"), trip(2, None), trip(3, "positive"), trip(4, None), trip(5, None)
    assert relations([a, b, c, d, e], c.id) == [
        ("t-2", "before_swab"), ("t-3", "swabbed_trip"), ("t-4", "after_swab"), ("t-5", "after_swab")]
    window = exposure_window([a, b, c, d, e], c.id, {"t-3": {"name": "张三"}})
    assert window.last_negative_sample_id == "S-1" and window.bounded_by_sample_id is None
    assert window.transfers[1].patient is not None and window.transfers[1].patient.name == "张三"
    assert window.transfers[0].patient is None  # not known here: listed all the same


def test_r9_a_later_negative_swab_closes_the_window_its_own_trip_included() -> None:
    a, b, c, d = trip(1, "positive"), trip(2, "negative"), trip(3, None), trip(4, None)
    assert relations([a, b, c, d], a.id) == [("t-1", "swabbed_trip"), ("t-2", "after_swab")]
    assert exposure_window([a, b, c, d], a.id, {}).bounded_by_sample_id == "S-2"


def test_r9_with_no_negative_swab_ever_every_trip_is_exposed_and_redisinfections_carry_none() -> None:
    a, b = trip(1, None), trip(2, "positive")
    redo = Cycle.open_redisinfection(b, "S-2", SWAB_AT)
    assert relations([a, b, redo], b.id) == [("t-1", "before_swab"), ("t-2", "swabbed_trip")]


def test_the_history_keeps_the_order_and_the_latest_redisinfection() -> None:
    h = VehicleHistory(id="v-1")
    a, b = trip(1, None), trip(2, "positive")
    for c in (a, b, a):
        h.log_cycle(c)
    redo = Cycle.open_redisinfection(b, "S-2", SWAB_AT)
    h.log_cycle(redo)
    assert h.cycle_ids == [a.id, b.id, redo.id] and h.redisinfection_cycle_id == redo.id
    assert types(h) == ["VehicleCycleLogged"] * 3


def test_an_exposure_list_is_amended_and_acknowledged() -> None:
    a = trip(1, "positive")
    x = Exposure.produce(a, "S-1", exposure_window([a], a.id, {}))
    assert x.status == "unacknowledged" and [t["transfer_id"] for t in x.transfers] == ["t-1"]
    assert x.acknowledge("调度员甲", "已通知疾控")
    assert not x.acknowledge("调度员乙", None)  # nothing new to acknowledge
    late = trip(2, None)
    x.amend(late, {})
    x.amend(late, {})
    assert x.status == "unacknowledged" and x.transfers[-1]["relation"] == "during_quarantine"
    assert types(x) == ["ExposureListProduced", "ExposureListAcknowledged", "ExposureListAmended"]


# -- dispatch's side of a quarantine -----------------------------------------------------------


def vehicle() -> Vehicle:
    return Vehicle.register(dsp.VehicleRegistered(
        vehicle_id="v-1", plate="宁A", kind="negative_pressure_ambulance", dedicated_pool=True,
        life_support=True, station="s", location=Location(lat=38.28, lon=106.25)))


def test_dispatch_keeps_a_quarantined_vehicle_out_until_the_redisinfection_lifts_it() -> None:
    v = vehicle()
    v.reserve("t-3")
    v.take_out_of_service("positive surface swab S-1", rule="R9")  # mid-trip
    v.trip_completed("trip-3")
    assert v.status == "quarantined" and v.awaiting_trips == ["trip-3"]
    with pytest.raises(RuleRefused) as refused_r9:
        v.reserve("t-4")
    assert refused_r9.value.rule == "R9"
    v.released("trip-3", "cycle-3")  # a trip's own cycle does not end the quarantine
    assert v.status == "quarantined"
    v.released("trip-1", "redo-1", quarantine_lifted=True)
    assert v.status == "available" and v.awaiting_trips == []
    v.released("trip-1", "redo-1", quarantine_lifted=True)  # redelivered: nothing more
    assert types(v).count("VehicleReturnedToService") == 2  # trip-3's, then the lift
