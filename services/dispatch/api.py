"""Dispatch's REST routes (/api/v1): transfers, queue, vehicles, facilities."""

from __future__ import annotations

from typing import Annotated, Any
from uuid import uuid4

from fastapi import APIRouter, Depends, Query
from fastapi.responses import JSONResponse

from libs.events.aggregate import UnitOfWork
from libs.events.store import EventStore
from libs.web.deps import ActorDep, IdempotencyKey, command_response, store_dep
from services.dispatch import handlers
from services.dispatch.domain import Facility, Transfer, Vehicle
from services.dispatch.schemas import AssignIn, FacilityIn, LoadIn, TransferIn, VehicleIn

router = APIRouter(tags=["dispatch"])
Store = Annotated[EventStore, Depends(store_dep("dispatch"))]
Limit = Annotated[int, Query(ge=1, le=500)]
Offset = Annotated[int, Query(ge=0)]


@router.post("/transfers", status_code=201)
async def post_transfer(body: TransferIn, store: Store, actor: ActorDep,
                        key: IdempotencyKey = None) -> JSONResponse:
    transfer_id = str(uuid4())

    async def work(uow: UnitOfWork) -> dict[str, Any]:
        return handlers.transfer_view(await handlers.request_transfer(uow, transfer_id, body))

    return await command_response(store, actor, key=key, scope="POST /transfers", body=body,
                                  correlation_id=transfer_id, status=201, work=work)


@router.get("/transfers")
async def list_transfers(store: Store, status: str | None = None, limit: Limit = 100,
                         offset: Offset = 0) -> list[dict[str, Any]]:
    found = await UnitOfWork.reading(store).find(
        Transfer, status=[status] if status else None, limit=limit, offset=offset)
    return [handlers.transfer_view(t) for t in found]


@router.get("/transfers/{transfer_id}")
async def get_transfer(transfer_id: str, store: Store) -> dict[str, Any]:
    transfer = await UnitOfWork.reading(store).require(Transfer, transfer_id, "transfer")
    return handlers.transfer_view(transfer)


@router.post("/transfers/{transfer_id}/assign")
async def assign(transfer_id: str, body: AssignIn, store: Store, actor: ActorDep,
                 key: IdempotencyKey = None) -> JSONResponse:
    async def work(uow: UnitOfWork) -> dict[str, Any]:
        return handlers.transfer_view(await handlers.assign_manually(uow, transfer_id, body))

    return await command_response(store, actor, key=key, scope=f"POST /transfers/{transfer_id}/assign",
                                  body=body, correlation_id=transfer_id, status=200, work=work)


@router.get("/queue")
async def queue(store: Store) -> list[dict[str, Any]]:
    waiting = await UnitOfWork.reading(store).find(Transfer, status=["queued"])
    waiting.sort(key=lambda t: (t.priority, t.requested_at))
    return [
        {"position": i, "why": f"priority {t.priority}: {t.priority_reason}; then request time",
         **handlers.transfer_view(t)}
        for i, t in enumerate(waiting, start=1)
    ]


@router.post("/vehicles", status_code=201)
async def post_vehicle(body: VehicleIn, store: Store, actor: ActorDep,
                       key: IdempotencyKey = None) -> JSONResponse:
    async def work(uow: UnitOfWork) -> dict[str, Any]:
        return handlers.vehicle_view(await handlers.register_vehicle(uow, body))

    return await command_response(store, actor, key=key, scope="POST /vehicles", body=body,
                                  correlation_id=body.id, status=201, work=work)


@router.get("/vehicles")
async def list_vehicles(store: Store, status: str | None = None, limit: Limit = 500,
                        offset: Offset = 0) -> list[dict[str, Any]]:
    found = await UnitOfWork.reading(store).find(
        Vehicle, status=[status] if status else None, limit=limit, offset=offset)
    return [handlers.vehicle_view(v) for v in found]


@router.get("/vehicles/{vehicle_id}")
async def get_vehicle(vehicle_id: str, store: Store) -> dict[str, Any]:
    return handlers.vehicle_view(
        await UnitOfWork.reading(store).require(Vehicle, vehicle_id, "vehicle"))


@router.post("/facilities", status_code=201)
async def post_facility(body: FacilityIn, store: Store, actor: ActorDep,
                        key: IdempotencyKey = None) -> JSONResponse:
    async def work(uow: UnitOfWork) -> dict[str, Any]:
        return handlers.facility_view(await handlers.register_facility(uow, body))

    return await command_response(store, actor, key=key, scope="POST /facilities", body=body,
                                  correlation_id=body.id, status=201, work=work)


@router.get("/facilities")
async def list_facilities(store: Store, limit: Limit = 500, offset: Offset = 0) -> list[dict[str, Any]]:
    found = await UnitOfWork.reading(store).find(Facility, limit=limit, offset=offset)
    return [handlers.facility_view(f) for f in found]


@router.post("/facilities/{facility_id}/load")
async def post_load(facility_id: str, body: LoadIn, store: Store, actor: ActorDep,
                    key: IdempotencyKey = None) -> JSONResponse:
    async def work(uow: UnitOfWork) -> dict[str, Any]:
        return handlers.facility_view(await handlers.report_load(uow, facility_id, body))

    return await command_response(store, actor, key=key, scope=f"POST /facilities/{facility_id}/load",
                                  body=body, correlation_id=facility_id, status=200, work=work)
