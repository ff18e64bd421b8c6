"""The disinfection service's REST routes (/api/v1/disinfection): the staff's work list and
stages, swabs, the lab's results, a supervisor's early release, and the exposure alerts."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query
from fastapi.responses import JSONResponse

from libs.auth.privacy import DisclosingRoute
from libs.events.aggregate import UnitOfWork
from libs.events.envelope import utcnow
from libs.events.store import EventStore
from libs.web.deps import ActorDep, IdempotencyKey, command_response, store_dep
from services.disinfection import handlers
from services.disinfection.config import rules
from services.disinfection.domain import Cycle, Sample
from services.disinfection.exposure import Exposure
from services.disinfection.schemas import AcknowledgeIn, EarlyReleaseIn, ResultIn, StageIn, SwabIn

router = APIRouter(prefix="/disinfection", tags=["disinfection"], route_class=DisclosingRoute)
Store = Annotated[EventStore, Depends(store_dep("disinfection"))]
Limit = Annotated[int, Query(ge=1, le=500)]
Offset = Annotated[int, Query(ge=0)]
CycleStatus = Literal["open", "awaiting_result", "resample_required", "released", "closed",
                      "quarantined", "superseded"]  # Cycle._settle's; another is a 422, not []
Statuses = Annotated[list[CycleStatus] | None, Query(description="repeatable")]


@router.get("/cycles")
async def list_cycles(store: Store, vehicle_id: str | None = None, status: Statuses = None,
                      limit: Limit = 100, offset: Offset = 0) -> list[dict[str, Any]]:
    """The staff's work list: `status=open` (stages or a swab to do) and
    `status=resample_required` (the lab found the sample invalid) need someone."""
    found = await UnitOfWork.reading(store).find(
        Cycle, ref=vehicle_id, status=list(status) if status else None, limit=limit, offset=offset)
    return [handlers.cycle_view(c, rules()) for c in found]


@router.get("/cycles/{cycle_id}")
async def get_cycle(cycle_id: str, store: Store) -> dict[str, Any]:
    return handlers.cycle_view(await UnitOfWork.reading(store).require(Cycle, cycle_id, "cycle"), rules())


async def _transfer_of_cycle(store: EventStore, cycle_id: str) -> str:
    return (await UnitOfWork.reading(store).require(Cycle, cycle_id, "cycle")).transfer_id


@router.post("/cycles/{cycle_id}/stages", status_code=201)
async def post_stage(cycle_id: str, body: StageIn, store: Store, actor: ActorDep,
                     key: IdempotencyKey = None) -> JSONResponse:
    """首次 / 终末消毒 (R8): `initial` first, then `terminal`, each with its video evidence."""
    async def work(uow: UnitOfWork) -> dict[str, Any]:
        return handlers.cycle_view(await handlers.log_stage(uow, cycle_id, body, rules(), utcnow()), rules())

    return await command_response(
        store, actor, key=key, scope=f"POST /disinfection/cycles/{cycle_id}/stages", body=body,
        correlation_id=await _transfer_of_cycle(store, cycle_id), status=201, work=work)


@router.post("/cycles/{cycle_id}/swabs", status_code=201)
async def post_swab(cycle_id: str, body: SwabIn, store: Store, actor: ActorDep,
                    key: IdempotencyKey = None) -> JSONResponse:
    """物体表面核酸采样 (R9), after the terminal stage; again after an invalid result."""
    async def work(uow: UnitOfWork) -> dict[str, Any]:
        return handlers.cycle_view(await handlers.collect_swab(uow, cycle_id, body, rules(), utcnow()),
                                   rules())

    return await command_response(
        store, actor, key=key, scope=f"POST /disinfection/cycles/{cycle_id}/swabs", body=body,
        correlation_id=await _transfer_of_cycle(store, cycle_id), status=201, work=work)


@router.post("/swabs/{sample_id}/result")
async def post_result(sample_id: str, body: ResultIn, store: Store, actor: ActorDep,
                      key: IdempotencyKey = None) -> JSONResponse:
    """The lab's result. Positive: quarantine, re-disinfection and the exposure list (R9)."""
    sample = await UnitOfWork.reading(store).require(Sample, sample_id, "sample")

    async def work(uow: UnitOfWork) -> dict[str, Any]:
        return handlers.cycle_view(await handlers.record_result(uow, sample_id, body, rules(), utcnow()),
                                   rules())

    return await command_response(
        store, actor, key=key, scope=f"POST /disinfection/swabs/{sample_id}/result", body=body,
        correlation_id=await _transfer_of_cycle(store, sample.cycle_id), status=200, work=work)


@router.post("/cycles/{cycle_id}/release")
async def post_release(cycle_id: str, body: EarlyReleaseIn, store: Store, actor: ActorDep,
                       key: IdempotencyKey = None) -> JSONResponse:
    """A supervisor (X-Role: supervisor) releases the vehicle before the cycle would, with a
    reason (R2 override, audited). Never after a positive swab (R9)."""
    async def work(uow: UnitOfWork) -> dict[str, Any]:
        cycle = await handlers.release_early(uow, cycle_id, body, actor.role, rules())
        return handlers.cycle_view(cycle, rules())

    return await command_response(
        store, actor, key=key, scope=f"POST /disinfection/cycles/{cycle_id}/release", body=body,
        correlation_id=await _transfer_of_cycle(store, cycle_id), status=200, work=work)


@router.get("/exposures")
async def list_exposures(store: Store, vehicle_id: str | None = None, status: str | None = None,
                         limit: Limit = 100, offset: Offset = 0) -> list[dict[str, Any]]:
    """The dispatcher's alerts: `status=unacknowledged` are the ones nobody has taken yet."""
    found = await UnitOfWork.reading(store).find(
        Exposure, ref=vehicle_id, status=[status] if status else None, limit=limit, offset=offset)
    return [handlers.exposure_view(x) for x in found]


@router.get("/exposures/{sample_id}")
async def get_exposure(sample_id: str, store: Store) -> dict[str, Any]:
    return handlers.exposure_view(await UnitOfWork.reading(store).require(Exposure, sample_id, "exposure"))


@router.post("/exposures/{sample_id}/acknowledge")
async def post_acknowledge(sample_id: str, body: AcknowledgeIn, store: Store, actor: ActorDep,
                           key: IdempotencyKey = None) -> JSONResponse:
    exposure = await UnitOfWork.reading(store).require(Exposure, sample_id, "exposure")

    async def work(uow: UnitOfWork) -> dict[str, Any]:
        return handlers.exposure_view(
            await handlers.acknowledge_exposure(uow, sample_id, actor.subject, body.note))

    return await command_response(
        store, actor, key=key, scope=f"POST /disinfection/exposures/{sample_id}/acknowledge",
        body=body, correlation_id=exposure.transfer_id, status=200, work=work)


@router.get("/protocols")
async def get_protocols() -> dict[str, Any]:
    """What a stage must reach, per target and disinfectant, and the policies in force."""
    r = rules()
    return {
        "surface": {k: p.as_dict() for k, p in r.surface.items()},
        "air": {k: p.as_dict() for k, p in r.air.items()},
        "release_policy": r.release_policy, "quarantine_release_policy": r.quarantine_release_policy,
        "min_swab_sites": r.min_swab_sites, "result_sla_hours": r.result_sla.total_seconds() / 3600,
    }
