"""一车一消, made provable: a cycle per risk trip, two stages each with its footage, a
surface swab, and release or quarantine. Pure: no I/O."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from libs.events.aggregate import Aggregate, InvalidField, RuleRefused, StateConflict
from libs.events.catalog import disinfection as ev
from libs.events.envelope import iso


@dataclass(frozen=True)
class Protocol:
    """The least concentration and contact time a disinfectant needs on surfaces."""

    min_concentration_mg_per_l: float
    min_contact_minutes: float


# National guidance defaults (issue 5 makes these configurable per disinfectant and target).
SURFACE_PROTOCOLS = {
    "chlorine": Protocol(1000, 30),
    "chlorine_dioxide": Protocol(500, 30),
}
MIN_SWAB_SITES = 3
RELEASE_POLICY = "after_swab_collected"  # or "after_negative_result"


def cycle_id_for(trip_id: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"cycle:{trip_id}"))


@dataclass(frozen=True)
class StageRecord:
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

    @property
    def contact_minutes(self) -> float:
        return (self.ended_at - self.started_at).total_seconds() / 60

    def check(self) -> None:
        """R8: refuse a stage that does not meet the protocol or that the footage misses."""
        if self.ended_at <= self.started_at:
            raise InvalidField("ended_at", "stage_ends_before_start", "ended_at must be after started_at",
                               "结束时间必须晚于开始时间")
        protocol = SURFACE_PROTOCOLS.get(self.disinfectant)
        if protocol is None:
            raise InvalidField("disinfectant", "unknown_disinfectant",
                               f"no protocol for {self.disinfectant}; known: {sorted(SURFACE_PROTOCOLS)}",
                               f"无此消毒剂的规程：{self.disinfectant}")
        if self.concentration_mg_per_l < protocol.min_concentration_mg_per_l:
            raise InvalidField(
                "concentration_mg_per_l", "concentration_below_protocol",
                f"{self.disinfectant} needs at least {protocol.min_concentration_mg_per_l:g} mg/L",
                f"{self.disinfectant}浓度不足{protocol.min_concentration_mg_per_l:g} mg/L", rule="R8")
        if self.contact_minutes < protocol.min_contact_minutes:
            raise InvalidField(
                "ended_at", "contact_time_below_protocol",
                f"contact time {self.contact_minutes:.0f} min is below the protocol's "
                f"{protocol.min_contact_minutes:g} min for {self.disinfectant}",
                f"作用时间{self.contact_minutes:.0f}分钟，低于规程要求的{protocol.min_contact_minutes:g}分钟",
                rule="R8")
        if self.video_from > self.started_at or self.video_to < self.ended_at:
            raise InvalidField(
                "video", "video_does_not_cover_stage",
                "the video window must cover the whole stage, from started_at to ended_at",
                "视频监控时段未覆盖整个消毒过程", rule="R8")

    def to_payload(self) -> dict[str, Any]:
        return {
            "stage": self.stage, "disinfectant": self.disinfectant,
            "concentration_mg_per_l": self.concentration_mg_per_l, "method": self.method,
            "started_at": iso(self.started_at), "ended_at": iso(self.ended_at),
            "contact_minutes": round(self.contact_minutes, 1), "operator": self.operator,
            "location": self.location,
            "video": {"camera_id": self.camera_id, "clip_ref": self.clip_ref,
                      "from": iso(self.video_from), "to": iso(self.video_to)},
        }


class Cycle(Aggregate):
    stream_prefix = "cycle"

    vehicle_id: str = ""
    trip_id: str = ""
    transfer_id: str = ""
    status: str = "open"
    initial: dict[str, Any] | None = None
    terminal: dict[str, Any] | None = None
    swabs: list[dict[str, Any]] = []

    def ref_value(self) -> str | None:
        return self.vehicle_id

    @classmethod
    def open(cls, vehicle_id: str, trip_id: str, transfer_id: str, reason: str) -> Cycle:
        cycle = cls(id=cycle_id_for(trip_id))
        cycle.record(ev.CycleOpened(cycle_id=cycle.id, vehicle_id=vehicle_id, trip_id=trip_id,
                                    transfer_id=transfer_id, reason=reason))
        return cycle

    def _on_CycleOpened(self, e: ev.CycleOpened) -> None:
        self.vehicle_id, self.trip_id, self.transfer_id = e.vehicle_id, e.trip_id, e.transfer_id

    def _open_or_refuse(self) -> None:
        if self.status != "open":
            raise StateConflict("cycle_closed", f"cycle {self.id} is {self.status}",
                                f"洗消周期{self.id}已{self.status}", cycle_id=self.id)

    def log_stage(self, stage: StageRecord) -> None:
        self._open_or_refuse()
        stage.check()
        if stage.stage == "initial":
            if self.initial is not None:
                raise StateConflict("stage_already_logged", "the initial stage is already logged",
                                    "首次消毒已登记", cycle_id=self.id)
            self.record(ev.InitialDisinfectionLogged(cycle_id=self.id, vehicle_id=self.vehicle_id,
                                                     stage=stage.to_payload()),
                        occurred_at=stage.ended_at)
            return
        if self.initial is None:
            raise RuleRefused("R8", "terminal_before_initial",
                              "the terminal stage needs the initial stage first",
                              "须先完成首次消毒，再进行终末消毒", cycle_id=self.id)
        if self.terminal is not None:
            raise StateConflict("stage_already_logged", "the terminal stage is already logged",
                                "终末消毒已登记", cycle_id=self.id)
        self.record(ev.TerminalDisinfectionLogged(cycle_id=self.id, vehicle_id=self.vehicle_id,
                                                  stage=stage.to_payload()),
                    occurred_at=stage.ended_at)

    def _on_InitialDisinfectionLogged(self, e: ev.InitialDisinfectionLogged) -> None:
        self.initial = e.stage

    def _on_TerminalDisinfectionLogged(self, e: ev.TerminalDisinfectionLogged) -> None:
        self.terminal = e.stage

    def collect_swab(self, sample_id: str, sites: list[str], collected_by: str,
                     collected_at: datetime) -> None:
        self._open_or_refuse()
        if self.terminal is None:
            raise RuleRefused("R8", "swab_before_terminal",
                              "swab the surfaces after the terminal stage",
                              "须在终末消毒后采样", cycle_id=self.id)
        if len(set(sites)) < MIN_SWAB_SITES:
            raise InvalidField("sites", "too_few_sites",
                               f"swab at least {MIN_SWAB_SITES} different high-touch sites",
                               f"采样点位不少于{MIN_SWAB_SITES}处", rule="R9")
        self.record(ev.SurfaceSwabCollected(
            cycle_id=self.id, vehicle_id=self.vehicle_id, sample_id=sample_id, sites=sites,
            collected_by=collected_by, collected_at=iso(collected_at)), occurred_at=collected_at)
        if RELEASE_POLICY == "after_swab_collected":
            self._release()

    def _on_SurfaceSwabCollected(self, e: ev.SurfaceSwabCollected) -> None:
        self.swabs = [*self.swabs, {"sample_id": e.sample_id, "sites": e.sites,
                                    "collected_at": e.collected_at, "result": None}]

    def record_result(self, sample_id: str, result: str, lab: str, reported_at: datetime) -> None:
        swab = next((s for s in self.swabs if s["sample_id"] == sample_id), None)
        if swab is None:
            raise StateConflict("sample_not_in_cycle", f"sample {sample_id} is not in cycle {self.id}",
                                f"样本{sample_id}不属于该洗消周期")
        if swab["result"] is not None:
            raise StateConflict("result_already_recorded", f"sample {sample_id} already has a result",
                                f"样本{sample_id}已有结果", result=swab["result"])
        self.record(ev.SwabResultRecorded(
            cycle_id=self.id, vehicle_id=self.vehicle_id, sample_id=sample_id, result=result,
            lab=lab, reported_at=iso(reported_at)), occurred_at=reported_at)
        if result == "positive":
            self.record(ev.VehicleQuarantined(
                cycle_id=self.id, vehicle_id=self.vehicle_id, sample_id=sample_id,
                reason="positive surface swab (R9)"), occurred_at=reported_at)
        elif result == "negative" and RELEASE_POLICY == "after_negative_result" and self.status == "open":
            self._release()

    def _on_SwabResultRecorded(self, e: ev.SwabResultRecorded) -> None:
        self.swabs = [{**s, "result": e.result} if s["sample_id"] == e.sample_id else s
                      for s in self.swabs]

    def _release(self) -> None:
        self.record(ev.VehicleReleased(cycle_id=self.id, vehicle_id=self.vehicle_id,
                                       trip_id=self.trip_id, policy=RELEASE_POLICY))

    def _on_VehicleReleased(self, e: ev.VehicleReleased) -> None:
        self.status = "released"

    def _on_VehicleQuarantined(self, e: ev.VehicleQuarantined) -> None:
        self.status = "quarantined"


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
