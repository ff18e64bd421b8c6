"""Dispatch's REST routes (/api/v1): transfers, queue, vehicles, facilities, care series."""

from __future__ import annotations

from typing import Annotated, Any
from uuid import uuid4

from fastapi import APIRouter, Depends, Query
from fastapi.responses import JSONResponse

from libs.auth.privacy import DisclosingRoute
from libs.events.aggregate import UnitOfWork
from libs.events.store import EventStore
from libs.web.deps import ActorDep, IdempotencyKey, command_response, store_dep
from services.dispatch import access, handlers
from services.dispatch.domain import CareSeries, Facility, Transfer, Vehicle, WaitingQueue
from services.dispatch.schemas import (
    AssignIn,
    CancelIn,
    CareSeriesIn,
    DutyIn,
    FacilityIn,
    LoadIn,
    OutOfServiceIn,
    PositionIn,
    RedirectIn,
    ReprioritizeIn,
    TransferIn,
    VehicleIn,
)

router = APIRouter(tags=["dispatch"], route_class=DisclosingRoute)
Store = Annotated[EventStore, Depends(store_dep("dispatch"))]
Limit = Annotated[int, Query(ge=1, le=500)]
Offset = Annotated[int, Query(ge=0)]


@router.post("/transfers", status_code=201)
async def post_transfer(body: TransferIn, store: Store, actor: ActorDep,
                        key: IdempotencyKey = None) -> JSONResponse:
    """201 with the new transfer; 200 with the live one when this person already has one."""
    transfer_id = str(uuid4())

    async def work(uow: UnitOfWork) -> dict[str, Any]:
        transfer, created = await handlers.request_transfer(uow, transfer_id, body)
        view = handlers.transfer_view(transfer)
        return view if created else {**view, "existing": True}

    return await command_response(store, actor, key=key, scope="POST /transfers", body=body,
                                  correlation_id=transfer_id, status=201, work=work,
                                  status_of=lambda v: 200 if v.get("existing") else 201)


@router.get("/transfers")
async def list_transfers(store: Store, actor: ActorDep, status: str | None = None,
                         limit: Limit = 100, offset: Offset = 0) -> list[dict[str, Any]]:
    """A hospital or a site sees only the transfers it is part of (access.sees)."""
    found = await UnitOfWork.reading(store).find(
        Transfer, status=[status] if status else None, limit=limit, offset=offset,
        where=lambda t: access.sees(actor, t))
    return [handlers.transfer_view(t) for t in found]


@router.get("/transfers/{transfer_id}")
async def get_transfer(transfer_id: str, store: Store) -> dict[str, Any]:
    transfer = await UnitOfWork.reading(store).require(Transfer, transfer_id, "transfer")
    return handlers.transfer_view(transfer)


@router.post("/transfers/{transfer_id}/assign")
async def assign(transfer_id: str, body: AssignIn, store: Store, actor: ActorDep,
                 key: IdempotencyKey = None) -> JSONResponse:
    """Manual assignment; a soft rule the vehicle breaks needs `override_reason` (R1 never)."""
    async def work(uow: UnitOfWork) -> dict[str, Any]:
        return handlers.transfer_view(
            await handlers.assign_manually(uow, transfer_id, body, actor.role))

    return await command_response(store, actor, key=key, scope=f"POST /transfers/{transfer_id}/assign",
                                  body=body, correlation_id=transfer_id, status=200, work=work)


@router.post("/transfers/{transfer_id}/priority")
async def post_priority(transfer_id: str, body: ReprioritizeIn, store: Store, actor: ActorDep,
                        key: IdempotencyKey = None) -> JSONResponse:
    async def work(uow: UnitOfWork) -> dict[str, Any]:
        return handlers.transfer_view(await handlers.reprioritize(uow, transfer_id, body))

    return await command_response(store, actor, key=key, scope=f"POST /transfers/{transfer_id}/priority",
                                  body=body, correlation_id=transfer_id, status=200, work=work)


@router.post("/transfers/{transfer_id}/redirect")
async def post_redirect(transfer_id: str, body: RedirectIn, store: Store, actor: ActorDep,
                        key: IdempotencyKey = None) -> JSONResponse:
    async def work(uow: UnitOfWork) -> dict[str, Any]:
        return handlers.transfer_view(await handlers.redirect(uow, transfer_id, body))

    return await command_response(store, actor, key=key, scope=f"POST /transfers/{transfer_id}/redirect",
                                  body=body, correlation_id=transfer_id, status=200, work=work)


@router.post("/transfers/{transfer_id}/cancel")
async def post_cancel(transfer_id: str, body: CancelIn, store: Store, actor: ActorDep,
                      key: IdempotencyKey = None) -> JSONResponse:
    async def work(uow: UnitOfWork) -> dict[str, Any]:
        return handlers.transfer_view(await handlers.cancel(uow, transfer_id, body))

    return await command_response(store, actor, key=key, scope=f"POST /transfers/{transfer_id}/cancel",
                                  body=body, correlation_id=transfer_id, status=200, work=work)


@router.get("/queue")
async def queue(store: Store) -> list[dict[str, Any]]:
    """Waiting transfers in dispatch order: priority (R4), then request time."""
    waiting = (await UnitOfWork.reading(store).view(Transfer, WaitingQueue)).in_order()
    return [
        {"position": i, "why": f"priority {t.priority} ({t.priority_reason}), then request time "
                               f"{t.requested_at}; waiting because {t.status_reason}",
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


@router.post("/vehicles/{vehicle_id}/duty")
async def post_duty(vehicle_id: str, body: DutyIn, store: Store, actor: ActorDep,
                    key: IdempotencyKey = None) -> JSONResponse:
    async def work(uow: UnitOfWork) -> dict[str, Any]:
        return handlers.vehicle_view(await handlers.set_duty(uow, vehicle_id, body))

    return await command_response(store, actor, key=key, scope=f"POST /vehicles/{vehicle_id}/duty",
                                  body=body, correlation_id=vehicle_id, status=200, work=work)


@router.post("/vehicles/{vehicle_id}/out-of-service")
async def post_out_of_service(vehicle_id: str, body: OutOfServiceIn, store: Store, actor: ActorDep,
                              key: IdempotencyKey = None) -> JSONResponse:
    async def work(uow: UnitOfWork) -> dict[str, Any]:
        return handlers.vehicle_view(await handlers.take_out_of_service(uow, vehicle_id, body))

    return await command_response(store, actor, key=key,
                                  scope=f"POST /vehicles/{vehicle_id}/out-of-service", body=body,
                                  correlation_id=vehicle_id, status=200, work=work)


@router.post("/vehicles/{vehicle_id}/position", status_code=202)
async def post_position(vehicle_id: str, body: PositionIn, store: Store, actor: ActorDep,
                        key: IdempotencyKey = None) -> JSONResponse:
    """202: taken; `recorded` says whether it moved the track (see handlers.report_position)."""
    async def work(uow: UnitOfWork) -> dict[str, Any]:
        vehicle, recorded = await handlers.report_position(uow, vehicle_id, body)
        return {**handlers.vehicle_view(vehicle), "recorded": recorded}

    return await command_response(store, actor, key=key, scope=f"POST /vehicles/{vehicle_id}/position",
                                  body=body, correlation_id=vehicle_id, status=202, work=work)


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


@router.post("/care-series", status_code=201)
async def post_care_series(body: CareSeriesIn, store: Store, actor: ActorDep,
                           key: IdempotencyKey = None) -> JSONResponse:
    """Recurring care (dialysis, chemotherapy, pregnancy checks): each occurrence becomes a
    transfer `lead_minutes` before the appointment."""
    async def work(uow: UnitOfWork) -> dict[str, Any]:
        return handlers.care_view(await handlers.schedule_care(uow, body))

    return await command_response(store, actor, key=key, scope="POST /care-series", body=body,
                                  correlation_id=str(uuid4()), status=201, work=work)


@router.get("/care-series")
async def list_care_series(store: Store, status: str | None = None) -> list[dict[str, Any]]:
    found = await UnitOfWork.reading(store).find(CareSeries, status=[status] if status else None)
    return [handlers.care_view(s) for s in found]


@router.post("/care-series/{series_id}/cancel")
async def post_cancel_care(series_id: str, body: CancelIn, store: Store, actor: ActorDep,
                           key: IdempotencyKey = None) -> JSONResponse:
    async def work(uow: UnitOfWork) -> dict[str, Any]:
        return handlers.care_view(await handlers.cancel_care(uow, series_id, body))

    return await command_response(store, actor, key=key, scope=f"POST /care-series/{series_id}/cancel",
                                  body=body, correlation_id=series_id, status=200, work=work)
