"""The disinfection service's commands, and what it learns from the trip and from dispatch.
Thin: they load aggregates, call the domain, and leave the commit to the unit of work."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from libs.events.aggregate import StateConflict, UnitOfWork, decode
from libs.events.bus import Handler
from libs.events.catalog import transfer as tr
from libs.events.envelope import Envelope, iso
from services.disinfection.contacts import on_transfer_requested, patients_of
from services.disinfection.domain import Cycle, Sample, StageRecord, cycle_id_for
from services.disinfection.exposure import Exposure, VehicleHistory, exposure_window
from services.disinfection.protocols import AIR, Rules, Treatment
from services.disinfection.schemas import EarlyReleaseIn, ResultIn, StageIn, SwabIn


async def log_stage(uow: UnitOfWork, cycle_id: str, cmd: StageIn, rules: Rules, now: datetime) -> Cycle:
    rules.check_not_future("ended_at", cmd.ended_at, now)
    air = cmd.air
    if air is not None:
        rules.check_not_future("air.ended_at", air.ended_at, now)
    cycle = await uow.require(Cycle, cycle_id, "cycle")
    cycle.log_stage(StageRecord(
        stage=cmd.stage.value, disinfectant=cmd.disinfectant,
        concentration_mg_per_l=cmd.concentration_mg_per_l, method=cmd.method,
        started_at=cmd.started_at, ended_at=cmd.ended_at, operator=cmd.operator,
        location=cmd.location, camera_id=cmd.video.camera_id, clip_ref=cmd.video.clip_ref,
        video_from=cmd.video.from_, video_to=cmd.video.to,
        air=Treatment(AIR, air.disinfectant, air.concentration_mg_per_l, air.method, air.started_at,
                      air.ended_at, air.dose_ml_per_m3) if air else None,
    ), rules)
    return cycle


async def collect_swab(uow: UnitOfWork, cycle_id: str, cmd: SwabIn, rules: Rules, now: datetime) -> Cycle:
    rules.check_not_future("collected_at", cmd.collected_at, now)
    cycle = await uow.require(Cycle, cycle_id, "cycle")
    if await uow.get(Sample, cmd.sample_id) is not None:
        raise StateConflict("sample_id_taken", f"sample id {cmd.sample_id} is already used",
                            f"样本编号{cmd.sample_id}已被使用", sample_id=cmd.sample_id)
    cycle.collect_swab(cmd.sample_id, [s.value for s in cmd.sites], cmd.collected_by,
                       cmd.collected_at, rules)
    uow.add(Sample.claim(cmd.sample_id, cycle.id))
    return cycle


async def record_result(uow: UnitOfWork, sample_id: str, cmd: ResultIn, rules: Rules,
                        now: datetime) -> Cycle:
    rules.check_not_future("reported_at", cmd.reported_at, now)
    sample = await uow.require(Sample, sample_id, "sample")
    cycle = await uow.require(Cycle, sample.cycle_id, "cycle")
    if cmd.result.value != "positive" or cycle.result_of(sample_id) is not None:
        cycle.record_result(sample_id, cmd.result.value, cmd.lab, cmd.reported_at, rules)
        return cycle
    await quarantine(uow, cycle, sample_id, cmd, rules)
    return cycle


async def quarantine(uow: UnitOfWork, cycle: Cycle, sample_id: str, cmd: ResultIn, rules: Rules) -> None:
    """R9: out of service at once, a re-disinfection cycle, and the exposure list. A
    re-disinfection still holding the vehicle gives way to the new one, which answers for
    both positives (its stream version guards against it releasing meanwhile)."""
    history = await history_of(uow, cycle.vehicle_id)
    history.log_cycle(cycle)  # a no-op, unless the cycle predates the vehicle's history
    redo = Cycle.open_redisinfection(cycle, sample_id, cmd.reported_at)
    cycle.record_result(sample_id, "positive", cmd.lab, cmd.reported_at, rules,
                        redisinfection_cycle_id=redo.id)
    holding = await holding_cycle(uow, history)
    if holding is not None:
        holding.supersede(redo.id, sample_id)
    uow.add(redo)
    history.log_cycle(redo)
    ordered = await cycles_around(uow, history, cycle)
    patients = await patients_of(uow.store, (c.transfer_id for c in ordered))
    uow.add(Exposure.produce(cycle, sample_id, exposure_window(ordered, cycle.id, patients)))


async def history_of(uow: UnitOfWork, vehicle_id: str) -> VehicleHistory:
    history = await uow.get(VehicleHistory, vehicle_id)
    if history is None:
        history = VehicleHistory(id=vehicle_id)
        uow.add(history)
    return history


async def holding_cycle(uow: UnitOfWork, history: VehicleHistory) -> Cycle | None:
    """The re-disinfection cycle that keeps the vehicle quarantined, if one does."""
    if history.redisinfection_cycle_id is None:
        return None
    cycle = await uow.get(Cycle, history.redisinfection_cycle_id)
    return cycle if cycle is not None and cycle.holds_quarantine else None


async def cycles_around(uow: UnitOfWork, history: VehicleHistory, positive: Cycle) -> list[Cycle]:
    """The vehicle's cycles from the last negative swab before `positive` to the first one
    after it: the exposure window and its bounds, loaded no further than needed."""
    at = history.cycle_ids.index(positive.id)
    before: list[Cycle] = []
    for cid in reversed(history.cycle_ids[:at]):
        before.append(await uow.require(Cycle, cid, "cycle"))
        if before[-1].negative_sample_id is not None:
            break
    after: list[Cycle] = []
    for cid in history.cycle_ids[at + 1:]:
        after.append(await uow.require(Cycle, cid, "cycle"))
        if after[-1].negative_sample_id is not None:
            break
    return [*reversed(before), positive, *after]


async def release_early(uow: UnitOfWork, cycle_id: str, cmd: EarlyReleaseIn, role: str,
                        rules: Rules) -> Cycle:
    cycle = await uow.require(Cycle, cycle_id, "cycle")
    cycle.release_early(cmd.reason, role, rules)
    return cycle


async def acknowledge_exposure(uow: UnitOfWork, sample_id: str, by: str, note: str | None) -> Exposure:
    exposure = await uow.require(Exposure, sample_id, "exposure")
    exposure.acknowledge(by, note)
    return exposure


async def on_trip_completed(env: Envelope, uow: UnitOfWork) -> None:
    """一车一消: a cycle per risk trip. A trip that was under way when a quarantine began
    ended in a vehicle found positive: its transfer joins the exposure list."""
    e = decode(env)
    assert isinstance(e, tr.TripCompleted)
    if await uow.get(Cycle, cycle_id_for(e.trip_id)) is not None:
        return
    # R8's bound is the handover, on the crew's clock, but never later than the transfer
    # service received it: a phone running fast would otherwise refuse a true stage.
    ended = datetime.fromisoformat(env.occurred_at)
    bound = min(ended, datetime.fromisoformat(env.recorded_at)) if e.reason == tr.HANDED_OVER else None
    cycle = Cycle.open(e.vehicle_id, e.trip_id, e.transfer_id, "risk trip completed (一车一消)",
                       opened_at=ended, trip_ended_at=bound)
    uow.add(cycle)
    history = await history_of(uow, e.vehicle_id)
    history.log_cycle(cycle)
    holding = await holding_cycle(uow, history)
    if holding is not None and holding.after_sample_id is not None:
        exposure = await uow.require(Exposure, holding.after_sample_id, "exposure")
        exposure.amend(cycle, await patients_of(uow.store, [cycle.transfer_id]))


CONSUMES: dict[str, dict[str, Handler]] = {
    "transfer": {"TripCompleted": on_trip_completed},
    "dispatch": {"TransferRequested": on_transfer_requested},
}


def cycle_view(c: Cycle, rules: Rules) -> dict[str, Any]:
    ready = c.earliest_ready_at(rules)
    return {
        "id": c.id, "vehicle_id": c.vehicle_id, "trip_id": c.trip_id,
        "transfer_id": c.transfer_id, "kind": c.kind, "status": c.status,
        "next_action": c.next_action(), "opened_at": c.opened_at,
        "after_sample_id": c.after_sample_id, "initial": c.initial, "terminal": c.terminal,
        "swabs": c.swabs, "release": c.release, "positive_sample_id": c.positive_sample_id,
        "superseded_by": c.superseded_by, "earliest_ready_at": iso(ready) if ready else None,
        "version": c.version,
    }


def exposure_view(x: Exposure) -> dict[str, Any]:
    return {
        "sample_id": x.sample_id, "vehicle_id": x.vehicle_id, "cycle_id": x.cycle_id,
        "transfer_id": x.transfer_id, "status": x.status, "rule": "R9",
        "last_negative_sample_id": x.last_negative_sample_id,
        "bounded_by_sample_id": x.bounded_by_sample_id, "transfers": x.transfers,
        "acknowledgements": x.acknowledgements, "version": x.version,
    }
