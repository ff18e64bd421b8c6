"""一车一消, made provable: a cycle per risk trip (and one more after a positive swab), two
stages each with its footage (R8), a surface swab and its result (R9, R14), and release or
quarantine. Pure: no I/O, time and rules passed in."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from libs.events.aggregate import Aggregate, Forbidden, InvalidField, RuleRefused, StateConflict
from libs.events.catalog import disinfection as ev
from libs.events.contracts import Event
from libs.events.envelope import iso
from services.disinfection.protocols import (
    AFTER_SWAB_COLLECTED,
    DEFAULT_RULES,
    SURFACE,
    Rules,
    Treatment,
)

TRIP = "trip"
REDISINFECTION = "redisinfection"
SUPERVISOR = "supervisor"
SUPERVISOR_OVERRIDE = "supervisor_override"


def cycle_id_for(trip_id: str) -> str:
    """Deterministic, so a redelivered TripCompleted finds its cycle instead of a second."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"cycle:{trip_id}"))


def redisinfection_id_for(sample_id: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"redisinfection:{sample_id}"))


@dataclass(frozen=True)
class StageRecord:
    """One stage as the staff report it: the surface treatment, optionally the air, and the
    footage."""

    stage: str
    disinfectant: str
    concentration_mg_per_l: float
    method: str
    started_at: datetime
    ended_at: datetime
    operator: str
    location: str
    camera_id: str
    clip_ref: str
    video_from: datetime
    video_to: datetime
    air: Treatment | None = None

    @property
    def surface(self) -> Treatment:
        return Treatment(SURFACE, self.disinfectant, self.concentration_mg_per_l, self.method,
                         self.started_at, self.ended_at)

    @property
    def contact_minutes(self) -> float:
        return self.surface.contact_minutes

    @property
    def begins(self) -> datetime:
        """The stage began with whichever treatment came first."""
        return min(self.started_at, self.air.started_at) if self.air else self.started_at

    def check(self, rules: Rules = DEFAULT_RULES) -> dict[str, Any]:
        """R8: refuse a stage below its protocols or that the footage does not cover. Returns
        the evidence to record, with the protocol arithmetic."""
        surface_protocol = self.surface.check(rules)
        air_protocol = self.air.check(rules, "air.") if self.air is not None else None
        if self.video_to <= self.video_from:
            raise InvalidField("video.to", "video_window_empty", "the video window must end after it starts",
                               "视频时段的结束时间必须晚于开始时间")
        start = self.begins
        end = max(self.ended_at, self.air.ended_at) if self.air else self.ended_at
        if self.video_from > start or self.video_to < end:
            raise InvalidField(
                "video", "video_does_not_cover_stage",
                f"the video window {iso(self.video_from)}..{iso(self.video_to)} must cover the "
                f"whole stage, {iso(start)}..{iso(end)}",
                "视频监控时段未覆盖整个消毒过程", rule="R8")
        earliest = self.surface.earliest_end(surface_protocol)
        payload: dict[str, Any] = {
            "stage": self.stage, "disinfectant": self.disinfectant,
            "concentration_mg_per_l": self.concentration_mg_per_l, "method": self.method,
            "started_at": iso(self.started_at), "ended_at": iso(self.ended_at),
            "contact_minutes": round(self.contact_minutes, 1), "operator": self.operator,
            "location": self.location, "protocol": surface_protocol.as_dict(),
            "video": {"camera_id": self.camera_id, "clip_ref": self.clip_ref,
                      "from": iso(self.video_from), "to": iso(self.video_to)},
        }
        if self.air is not None and air_protocol is not None:
            payload["air"] = self.air.to_payload(air_protocol)
            earliest = max(earliest, self.air.earliest_end(air_protocol))
        payload["earliest_end_at"] = iso(earliest)
        return payload


class Cycle(Aggregate):
    stream_prefix = "cycle"

    vehicle_id: str = ""
    trip_id: str = ""
    transfer_id: str = ""
    kind: str = TRIP
    opened_at: str | None = None
    trip_ended_at: str | None = None
    after_sample_id: str | None = None
    status: str = "open"
    initial: dict[str, Any] | None = None
    terminal: dict[str, Any] | None = None
    swabs: list[dict[str, Any]] = []
    release: dict[str, Any] | None = None
    positive_sample_id: str | None = None
    superseded_by: str | None = None

    def ref_value(self) -> str | None:
        return self.vehicle_id

    # -- opening ------------------------------------------------------------------

    @classmethod
    def open(cls, vehicle_id: str, trip_id: str, transfer_id: str, reason: str,
             opened_at: datetime | None = None, trip_ended_at: datetime | None = None) -> Cycle:
        """`trip_ended_at`: when the trip ended at a handover (R8: the first stage follows)."""
        cycle = cls(id=cycle_id_for(trip_id))
        cycle.record(ev.CycleOpened(
            cycle_id=cycle.id, vehicle_id=vehicle_id, trip_id=trip_id, transfer_id=transfer_id,
            reason=reason, opened_at=iso(opened_at) if opened_at else None,
            trip_ended_at=iso(trip_ended_at) if trip_ended_at else None), occurred_at=opened_at)
        return cycle

    @classmethod
    def open_redisinfection(cls, positive: Cycle, sample_id: str, at: datetime) -> Cycle:
        """R9: the re-disinfection a positive swab orders. It answers for the positive cycle's
        trip, so that trip's timeline shows it."""
        cycle = cls(id=redisinfection_id_for(sample_id))
        cycle.record(ev.CycleOpened(
            cycle_id=cycle.id, vehicle_id=positive.vehicle_id, trip_id=positive.trip_id,
            transfer_id=positive.transfer_id, kind=REDISINFECTION, opened_at=iso(at),
            after_sample_id=sample_id,
            reason=f"positive surface swab {sample_id}: re-disinfection (R9)"), occurred_at=at)
        return cycle

    def _on_CycleOpened(self, e: ev.CycleOpened) -> None:
        self.vehicle_id, self.trip_id, self.transfer_id = e.vehicle_id, e.trip_id, e.transfer_id
        self.kind, self.opened_at, self.after_sample_id = e.kind, e.opened_at, e.after_sample_id
        self.trip_ended_at = e.trip_ended_at

    # -- what the cycle is waiting for ----------------------------------------------

    @property
    def last_swab(self) -> dict[str, Any] | None:
        return self.swabs[-1] if self.swabs else None

    @property
    def negative_sample_id(self) -> str | None:
        return next((s["sample_id"] for s in self.swabs if s["result"] == "negative"), None)

    @property
    def released(self) -> bool:
        return self.release is not None

    @property
    def holds_quarantine(self) -> bool:
        """A re-disinfection cycle that has not yet let the vehicle go, nor given way."""
        return self.kind == REDISINFECTION and self.status in ("open", "awaiting_result",
                                                               "resample_required")

    def _settle(self) -> None:
        last = self.last_swab
        if self.superseded_by is not None:
            self.status = "superseded"
        elif self.positive_sample_id is not None:
            self.status = "quarantined"
        elif self.released and last is not None and last["result"] == "negative":
            self.status = "closed"
        elif last is not None and last["result"] == "invalid":
            self.status = "resample_required"
        elif self.released:
            self.status = "released"
        elif last is not None and last["result"] is None:
            self.status = "awaiting_result"
        else:
            self.status = "open"

    def next_action(self) -> str | None:
        if self.status == "open":
            if self.initial is None:
                return "initial_stage"
            return "terminal_stage" if self.terminal is None else "swab"
        if self.status == "resample_required":
            return "swab"
        if self.status in ("awaiting_result", "released") and self.pending_swab() is not None:
            return "lab_result"
        return None

    def pending_swab(self) -> dict[str, Any] | None:
        last = self.last_swab
        return last if last is not None and last["result"] is None else None

    def earliest_ready_at(self, rules: Rules = DEFAULT_RULES) -> datetime | None:
        """The earliest the vehicle can be back in service by the protocols: the terminal
        stage's end once logged, else what the quickest protocol still needs. A wait for the
        lab (the stricter policies) comes on top and is not known in advance."""
        if self.released:
            return None
        if self.terminal is not None:
            return datetime.fromisoformat(self.terminal["ended_at"])
        if self.initial is not None:
            return datetime.fromisoformat(self.initial["ended_at"]) + rules.quickest_stage()
        if self.opened_at is not None:
            return datetime.fromisoformat(self.opened_at) + 2 * rules.quickest_stage()
        return None

    def _refuse_unless(self, *statuses: str) -> None:
        if self.status not in statuses:
            raise StateConflict("cycle_closed", f"cycle {self.id} is {self.status}",
                                f"洗消周期{self.id}当前状态为{self.status}，不能办理",
                                cycle_id=self.id, cycle_status=self.status)

    # -- the two stages (R8) ----------------------------------------------------------

    def log_stage(self, stage: StageRecord, rules: Rules = DEFAULT_RULES) -> None:
        self._refuse_unless("open")
        if stage.stage == "initial":
            if self.initial is not None:
                raise StateConflict("stage_already_logged", "the initial stage is already logged",
                                    "首次消毒已登记", cycle_id=self.id)
            evidence = stage.check(rules)
            self._after_trip_ended(stage, rules)
            self.record(ev.InitialDisinfectionLogged(cycle_id=self.id, vehicle_id=self.vehicle_id,
                                                     stage=evidence), occurred_at=stage.ended_at)
            return
        if self.initial is None:
            raise RuleRefused("R8", "terminal_before_initial",
                              "the terminal stage needs the initial stage first",
                              "须先完成首次消毒，再进行终末消毒", cycle_id=self.id)
        if self.terminal is not None:
            raise StateConflict("stage_already_logged", "the terminal stage is already logged",
                                "终末消毒已登记", cycle_id=self.id)
        evidence = stage.check(rules)
        initial_end = datetime.fromisoformat(self.initial["ended_at"])
        if stage.started_at < initial_end:
            raise InvalidField(
                "started_at", "terminal_overlaps_initial",
                f"the terminal stage starts before the initial stage ended ({iso(initial_end)})",
                "终末消毒开始时间早于首次消毒结束时间", rule="R8", initial_ended_at=iso(initial_end))
        self.record(ev.TerminalDisinfectionLogged(cycle_id=self.id, vehicle_id=self.vehicle_id,
                                                  stage=evidence), occurred_at=stage.ended_at)

    def _after_trip_ended(self, stage: StageRecord, rules: Rules) -> None:
        """R8 in time: the first stage follows the handover that ended the trip, or the
        positive result that ordered a re-disinfection, beyond the clocks' tolerance. A trip
        dispatch ended (a breakdown's takeover) has no time the stage can be held to: it is
        dated when the transfer service heard of it, which a lagging consumer puts late."""
        if self.kind == TRIP:
            bound, code, what, what_zh = (self.trip_ended_at, "stage_before_trip_ended",
                                          "the patient was handed over", "患者交接")
        else:
            bound, code, what, what_zh = (self.opened_at, "stage_before_positive_result",
                                          "the positive result was reported", "阳性结果报告")
        if bound is None:
            return
        ended = datetime.fromisoformat(bound)
        if stage.begins < ended - rules.stage_clock_tolerance:
            raise InvalidField("started_at", code, f"the initial stage starts before {what} ({iso(ended)})",
                               f"首次消毒开始时间早于{what_zh}时间", rule="R8", bound_at=iso(ended))

    def _on_InitialDisinfectionLogged(self, e: ev.InitialDisinfectionLogged) -> None:
        self.initial = e.stage

    def _on_TerminalDisinfectionLogged(self, e: ev.TerminalDisinfectionLogged) -> None:
        self.terminal = e.stage

    # -- the surface swab (R9) and its result (R14) --------------------------------------

    def collect_swab(self, sample_id: str, sites: list[str], collected_by: str,
                     collected_at: datetime, rules: Rules = DEFAULT_RULES) -> None:
        self._refuse_unless("open", "awaiting_result", "released", "resample_required")
        if self.terminal is None:
            raise RuleRefused("R8", "swab_before_terminal",
                              "swab the surfaces after the terminal stage",
                              "须在终末消毒后采样", cycle_id=self.id)
        if self.swabs and self.swabs[-1]["result"] != "invalid":
            raise StateConflict("swab_not_needed",
                                f"sample {self.swabs[-1]['sample_id']} already stands for this cycle",
                                "本周期已采样，只有检测无效时才需重新采样",
                                cycle_id=self.id, sample_id=self.swabs[-1]["sample_id"])
        terminal_end = datetime.fromisoformat(self.terminal["ended_at"])
        if collected_at < terminal_end:
            raise InvalidField("collected_at", "swab_before_terminal_ended",
                               f"the swab must be taken after the terminal stage ended ({iso(terminal_end)})",
                               "采样时间早于终末消毒结束时间", rule="R9")
        if len(set(sites)) < rules.min_swab_sites:
            raise InvalidField("sites", "too_few_sites",
                               f"swab at least {rules.min_swab_sites} different high-touch sites",
                               f"采样点位不少于{rules.min_swab_sites}处", rule="R9",
                               required=rules.min_swab_sites)
        self.record(ev.SurfaceSwabCollected(
            cycle_id=self.id, vehicle_id=self.vehicle_id, sample_id=sample_id,
            sites=list(dict.fromkeys(sites)), collected_by=collected_by,
            collected_at=iso(collected_at), due_at=iso(collected_at + rules.result_sla)),
            occurred_at=collected_at)
        if self._policy(rules) == AFTER_SWAB_COLLECTED and not self.released:
            self._release(rules)

    def _on_SurfaceSwabCollected(self, e: ev.SurfaceSwabCollected) -> None:
        self.swabs = [*self.swabs, {
            "sample_id": e.sample_id, "sites": e.sites, "collected_by": e.collected_by,
            "collected_at": e.collected_at, "due_at": e.due_at, "result": None, "lab": None,
            "reported_at": None, "turnaround_minutes": None, "overdue": False}]

    def result_of(self, sample_id: str) -> str | None:
        result: str | None = self._swab(sample_id)["result"]
        return result

    def _swab(self, sample_id: str) -> dict[str, Any]:
        swab = next((s for s in self.swabs if s["sample_id"] == sample_id), None)
        if swab is None:
            raise StateConflict("sample_not_in_cycle", f"sample {sample_id} is not in cycle {self.id}",
                                f"样本{sample_id}不属于该洗消周期")
        return swab

    def record_result(self, sample_id: str, result: str, lab: str, reported_at: datetime,
                      rules: Rules = DEFAULT_RULES, redisinfection_cycle_id: str | None = None) -> bool:
        """The lab's result. False when this very result was recorded before (a lab system
        resending); a different result for the same sample is refused."""
        swab = self._swab(sample_id)
        if swab["result"] is not None:
            if swab["result"] == result:
                return False
            raise StateConflict("result_already_recorded",
                                f"sample {sample_id} is already {swab['result']}",
                                f"样本{sample_id}已有结果：{swab['result']}", result=swab["result"])
        collected_at = datetime.fromisoformat(swab["collected_at"])
        if reported_at < collected_at:
            raise InvalidField("reported_at", "result_before_collection",
                               f"the result cannot precede the sample's collection ({swab['collected_at']})",
                               "报告时间早于采样时间")
        due_at = datetime.fromisoformat(swab["due_at"]) if swab["due_at"] else None
        self.record(ev.SwabResultRecorded(
            cycle_id=self.id, vehicle_id=self.vehicle_id, sample_id=sample_id, result=result,
            lab=lab, reported_at=iso(reported_at),
            turnaround_minutes=round((reported_at - collected_at).total_seconds() / 60, 1),
            overdue=due_at is not None and reported_at > due_at), occurred_at=reported_at)
        if result == "positive":
            self.record(ev.VehicleQuarantined(
                cycle_id=self.id, vehicle_id=self.vehicle_id, sample_id=sample_id,
                reason=f"positive surface swab {sample_id} (R9)",
                redisinfection_cycle_id=redisinfection_cycle_id), occurred_at=reported_at)
        elif result == "negative" and not self.released and self.superseded_by is None:
            self._release(rules)  # a negative result satisfies every policy
        return True

    def _on_SwabResultRecorded(self, e: ev.SwabResultRecorded) -> None:
        self.swabs = [{**s, "result": e.result, "lab": e.lab, "reported_at": e.reported_at,
                       "turnaround_minutes": e.turnaround_minutes}
                      if s["sample_id"] == e.sample_id else s for s in self.swabs]

    def _on_VehicleQuarantined(self, e: ev.VehicleQuarantined) -> None:
        self.positive_sample_id = e.sample_id

    def flag_overdue(self, now: datetime) -> bool:
        """R14: flag the pending result once it is past due."""
        swab = self.pending_swab()
        if swab is None or swab["overdue"] or swab["due_at"] is None:
            return False
        due_at = datetime.fromisoformat(swab["due_at"])
        if now <= due_at:
            return False
        sla_hours = (due_at - datetime.fromisoformat(swab["collected_at"])).total_seconds() / 3600
        self.record(ev.SwabResultOverdue(
            cycle_id=self.id, vehicle_id=self.vehicle_id, sample_id=swab["sample_id"],
            collected_at=swab["collected_at"], due_at=swab["due_at"], flagged_at=iso(now),
            sla_hours=round(sla_hours, 2)), occurred_at=now)
        return True

    def _on_SwabResultOverdue(self, e: ev.SwabResultOverdue) -> None:
        self.swabs = [{**s, "overdue": True} if s["sample_id"] == e.sample_id else s
                      for s in self.swabs]

    # -- release --------------------------------------------------------------------

    def _policy(self, rules: Rules) -> str:
        return rules.quarantine_release_policy if self.kind == REDISINFECTION else rules.release_policy

    def _release(self, rules: Rules) -> None:
        self.record(ev.VehicleReleased(
            cycle_id=self.id, vehicle_id=self.vehicle_id, trip_id=self.trip_id,
            policy=self._policy(rules), quarantine_lifted=self.kind == REDISINFECTION))

    def release_early(self, reason: str, role: str, rules: Rules = DEFAULT_RULES) -> None:
        """R2's override: a supervisor lets the vehicle go before the cycle would, with a
        reason. The event names what was skipped. A quarantine (R9) has no override."""
        if role != SUPERVISOR:
            raise Forbidden("supervisor_required", "only a supervisor may release a vehicle early",
                            "只有督查（supervisor）可以提前放行车辆", role=role)
        if self.kind == REDISINFECTION or self.positive_sample_id is not None:
            raise RuleRefused("R9", "quarantine_not_overridable",
                              "a vehicle quarantined after a positive swab is released only by its "
                              "re-disinfection",
                              "物表核酸阳性停用的车辆只能经再次洗消放行，不能提前放行", cycle_id=self.id)
        self._refuse_unless("open", "awaiting_result", "resample_required")
        missing = [s for s in ("initial", "terminal") if getattr(self, s) is None]
        if self.pending_swab() is None:
            missing.append("swab")
        elif self._policy(rules) != AFTER_SWAB_COLLECTED:
            missing.append("negative_result")
        overridden = ["R2"] + (["R8"] if self.terminal is None else [])
        self.record(ev.VehicleReleased(
            cycle_id=self.id, vehicle_id=self.vehicle_id, trip_id=self.trip_id,
            policy=SUPERVISOR_OVERRIDE, override=True, override_reason=reason,
            overridden_rules=overridden, missing=missing))

    def _on_VehicleReleased(self, e: ev.VehicleReleased) -> None:
        self.release = {"policy": e.policy, "override": e.override,
                        "override_reason": e.override_reason, "overridden_rules": e.overridden_rules,
                        "missing": e.missing, "quarantine_lifted": e.quarantine_lifted}

    def supersede(self, by_cycle_id: str, sample_id: str) -> None:
        self.record(ev.CycleSuperseded(cycle_id=self.id, vehicle_id=self.vehicle_id,
                                       by_cycle_id=by_cycle_id, sample_id=sample_id))

    def _on_CycleSuperseded(self, e: ev.CycleSuperseded) -> None:
        self.superseded_by = e.by_cycle_id

    def apply(self, event: Event) -> None:
        super().apply(event)
        self._settle()


class Sample(Aggregate):
    """A swab sample id, claimed once: the stream's first version makes ids unique."""

    stream_prefix = "sample"

    cycle_id: str = ""

    @classmethod
    def claim(cls, sample_id: str, cycle_id: str) -> Sample:
        sample = cls(id=sample_id)
        sample.record(ev.SampleRegistered(sample_id=sample_id, cycle_id=cycle_id))
        return sample

    def _on_SampleRegistered(self, e: ev.SampleRegistered) -> None:
        self.cycle_id = e.cycle_id
