"""The disinfection service's commands and what it learns from the trip."""

from __future__ import annotations

from typing import Any

from libs.events.aggregate import StateConflict, UnitOfWork, decode
from libs.events.bus import Handler
from libs.events.catalog import transfer as tr
from libs.events.envelope import Envelope
from services.disinfection.domain import Cycle, Sample, StageRecord, cycle_id_for
from services.disinfection.schemas import ResultIn, StageIn, SwabIn


async def log_stage(uow: UnitOfWork, cycle_id: str, cmd: StageIn) -> Cycle:
    cycle = await uow.require(Cycle, cycle_id, "cycle")
    cycle.log_stage(StageRecord(
        stage=cmd.stage.value, disinfectant=cmd.disinfectant,
        concentration_mg_per_l=cmd.concentration_mg_per_l, method=cmd.method,
        started_at=cmd.started_at, ended_at=cmd.ended_at, operator=cmd.operator,
        location=cmd.location, camera_id=cmd.video.camera_id, clip_ref=cmd.video.clip_ref,
        video_from=cmd.video.from_, video_to=cmd.video.to,
    ))
    return cycle


async def collect_swab(uow: UnitOfWork, cycle_id: str, cmd: SwabIn) -> Cycle:
    cycle = await uow.require(Cycle, cycle_id, "cycle")
    if await uow.get(Sample, cmd.sample_id) is not None:
        raise StateConflict("sample_id_taken", f"sample id {cmd.sample_id} is already used",
                            f"样本编号{cmd.sample_id}已被使用")
    uow.add(Sample.claim(cmd.sample_id, cycle.id))
    cycle.collect_swab(cmd.sample_id, [s.value for s in cmd.sites], cmd.collected_by,
                       cmd.collected_at)
    return cycle


async def record_result(uow: UnitOfWork, sample_id: str, cmd: ResultIn) -> Cycle:
    sample = await uow.require(Sample, sample_id, "sample")
    cycle = await uow.require(Cycle, sample.cycle_id, "cycle")
    cycle.record_result(sample_id, cmd.result.value, cmd.lab, cmd.reported_at)
    return cycle


async def on_trip_completed(env: Envelope, uow: UnitOfWork) -> None:
    e = decode(env)
    assert isinstance(e, tr.TripCompleted)
    if await uow.get(Cycle, cycle_id_for(e.trip_id)) is not None:
        return
    uow.add(Cycle.open(e.vehicle_id, e.trip_id, e.transfer_id, "risk trip completed (一车一消)"))


CONSUMES: dict[str, dict[str, Handler]] = {"transfer": {"TripCompleted": on_trip_completed}}


def cycle_view(c: Cycle) -> dict[str, Any]:
    return {
        "id": c.id, "vehicle_id": c.vehicle_id, "trip_id": c.trip_id,
        "transfer_id": c.transfer_id, "status": c.status, "initial": c.initial,
        "terminal": c.terminal, "swabs": c.swabs, "version": c.version,
    }
