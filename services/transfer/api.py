"""The transfer service's REST routes (/api/v1): trips, crew steps, handover."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from fastapi.responses import JSONResponse

from libs.auth.privacy import DisclosingRoute
from libs.events.aggregate import UnitOfWork
from libs.events.store import EventStore
from libs.web.deps import ActorDep, IdempotencyKey, command_response, store_dep
from services.transfer import handlers
from services.transfer.domain import Trip
from services.transfer.schemas import (
    AbortIn,
    AdmissionIn,
    HandoverIn,
    NoticeAckIn,
    PositionIn,
    ReturnRequestIn,
    StepIn,
)

router = APIRouter(tags=["transfer"], route_class=DisclosingRoute)
Store = Annotated[EventStore, Depends(store_dep("transfer"))]


@router.get("/trips")
async def list_trips(store: Store, vehicle_id: str | None = None, status: str | None = None,
                     limit: Annotated[int, Query(ge=1, le=500)] = 100,
                     offset: Annotated[int, Query(ge=0)] = 0) -> list[dict[str, Any]]:
    found = await UnitOfWork.reading(store).find(
        Trip, ref=vehicle_id, status=[status] if status else None, limit=limit, offset=offset)
    return [handlers.trip_view(t) for t in found]


@router.get("/trips/{trip_id}")
async def get_trip(trip_id: str, store: Store) -> dict[str, Any]:
    return handlers.trip_view(await UnitOfWork.reading(store).require(Trip, trip_id, "trip"))


@router.post("/trips/{trip_id}/steps")
async def post_step(trip_id: str, body: StepIn, store: Store, actor: ActorDep,
                    key: IdempotencyKey = None) -> JSONResponse:
    async def work(uow: UnitOfWork) -> dict[str, Any]:
        trip, applied = await handlers.report_step(uow, trip_id, body)
        return {**handlers.trip_view(trip), "applied": applied}

    trip = await UnitOfWork.reading(store).require(Trip, trip_id, "trip")
    return await command_response(store, actor, key=key, scope=f"POST /trips/{trip_id}/steps",
                                  body=body, correlation_id=trip.transfer_id, status=200, work=work)


@router.post("/trips/{trip_id}/handover")
async def post_handover(trip_id: str, body: HandoverIn, store: Store, actor: ActorDep,
                        key: IdempotencyKey = None) -> JSONResponse:
    async def work(uow: UnitOfWork) -> dict[str, Any]:
        return handlers.trip_view(await handlers.hand_over(uow, trip_id, body, actor.role))

    trip = await UnitOfWork.reading(store).require(Trip, trip_id, "trip")
    return await command_response(store, actor, key=key, scope=f"POST /trips/{trip_id}/handover",
                                  body=body, correlation_id=trip.transfer_id, status=200, work=work)


@router.post("/trips/{trip_id}/return-request")
async def post_return_request(trip_id: str, body: ReturnRequestIn, store: Store, actor: ActorDep,
                              key: IdempotencyKey = None) -> JSONResponse:
    """R11: the hospital asks for the return leg; dispatch opens it (`return_transfer_id`)."""
    async def work(uow: UnitOfWork) -> dict[str, Any]:
        trip, applied = await handlers.request_return(uow, trip_id, body)
        return {**handlers.trip_view(trip), "applied": applied}

    trip = await UnitOfWork.reading(store).require(Trip, trip_id, "trip")
    return await command_response(store, actor, key=key, scope=f"POST /trips/{trip_id}/return-request",
                                  body=body, correlation_id=trip.transfer_id, status=200, work=work)


@router.post("/trips/{trip_id}/admission")
async def post_admission(trip_id: str, body: AdmissionIn, store: Store, actor: ActorDep,
                         key: IdempotencyKey = None) -> JSONResponse:
    """R11: admitted instead of going back; the loop closes."""
    async def work(uow: UnitOfWork) -> dict[str, Any]:
        trip, applied = await handlers.admit(uow, trip_id, body)
        return {**handlers.trip_view(trip), "applied": applied}

    trip = await UnitOfWork.reading(store).require(Trip, trip_id, "trip")
    return await command_response(store, actor, key=key, scope=f"POST /trips/{trip_id}/admission",
                                  body=body, correlation_id=trip.transfer_id, status=200, work=work)


@router.post("/trips/{trip_id}/abort")
async def post_abort(trip_id: str, body: AbortIn, store: Store, actor: ActorDep,
                     key: IdempotencyKey = None) -> JSONResponse:
    """The crew ends the trip before pickup (patient absent or refusing), with a reason."""
    async def work(uow: UnitOfWork) -> dict[str, Any]:
        return handlers.trip_view(await handlers.abort(uow, trip_id, body))

    trip = await UnitOfWork.reading(store).require(Trip, trip_id, "trip")
    return await command_response(store, actor, key=key, scope=f"POST /trips/{trip_id}/abort",
                                  body=body, correlation_id=trip.transfer_id, status=200, work=work)


@router.post("/trips/{trip_id}/pre-arrival-notice/ack")
async def post_notice_ack(trip_id: str, body: NoticeAckIn, store: Store, actor: ActorDep,
                          key: IdempotencyKey = None) -> JSONResponse:
    """The receiving hospital acknowledges the pre-arrival notice; no resend, no escalation."""
    async def work(uow: UnitOfWork) -> dict[str, Any]:
        trip, applied = await handlers.acknowledge_notice(uow, trip_id, body)
        return {**handlers.trip_view(trip), "applied": applied}

    trip = await UnitOfWork.reading(store).require(Trip, trip_id, "trip")
    return await command_response(store, actor, key=key,
                                  scope=f"POST /trips/{trip_id}/pre-arrival-notice/ack", body=body,
                                  correlation_id=trip.transfer_id, status=200, work=work)


@router.post("/trips/{trip_id}/positions", status_code=202)
async def post_position(trip_id: str, body: PositionIn, store: Store, actor: ActorDep,
                        key: IdempotencyKey = None) -> JSONResponse:
    """202: taken; `recorded` says whether it became a track point (see Trip.report_position)."""
    async def work(uow: UnitOfWork) -> dict[str, Any]:
        trip, recorded = await handlers.report_position(uow, trip_id, body)
        return {"trip_id": trip.id, "recorded": recorded, "position": trip.position}

    trip = await UnitOfWork.reading(store).require(Trip, trip_id, "trip")
    return await command_response(store, actor, key=key, scope=f"POST /trips/{trip_id}/positions",
                                  body=body, correlation_id=trip.transfer_id, status=202, work=work)
