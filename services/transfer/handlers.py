"""The transfer service's commands and what it learns from dispatch."""

from __future__ import annotations

from typing import Any

from libs.events.aggregate import UnitOfWork, decode
from libs.events.bus import Handler
from libs.events.catalog import dispatch as dsp
from libs.events.envelope import Envelope
from services.transfer.domain import Trip, trip_id_for
from services.transfer.schemas import HandoverIn, StepIn


async def report_step(uow: UnitOfWork, trip_id: str, cmd: StepIn) -> tuple[Trip, bool]:
    trip = await uow.require(Trip, trip_id, "trip")
    applied = trip.report_step(cmd.step.value, cmd.client_event_id, cmd.at, cmd.position,
                               cmd.received_by)
    return trip, applied


async def hand_over(uow: UnitOfWork, trip_id: str, cmd: HandoverIn, role: str) -> Trip:
    trip = await uow.require(Trip, trip_id, "trip")
    trip.hand_over(cmd.facility_id, cmd.received_by,
                   "hospital" if role == "hospital" else "crew", cmd.at)
    return trip


async def on_vehicle_assigned(env: Envelope, uow: UnitOfWork) -> None:
    e = decode(env)
    assert isinstance(e, dsp.VehicleAssigned)
    if await uow.get(Trip, trip_id_for(e.transfer_id, e.vehicle_id)) is not None:
        return
    uow.add(Trip.open(e.transfer_id, e.vehicle_id, e.destination_id, e.origin, e.return_required))


async def on_vehicle_withdrawn(env: Envelope, uow: UnitOfWork) -> None:
    e = decode(env)
    assert isinstance(e, dsp.VehicleWithdrawn)
    trip = await uow.get(Trip, trip_id_for(e.transfer_id, e.vehicle_id))
    if trip is not None:
        trip.abort(f"vehicle withdrawn: {e.reason}")


async def on_transfer_cancelled(env: Envelope, uow: UnitOfWork) -> None:
    e = decode(env)
    assert isinstance(e, dsp.TransferCancelled)
    for trip in await uow.find(Trip, status=["open"], limit=10_000):
        if trip.transfer_id == e.transfer_id:
            loaded = await uow.require(Trip, trip.id, "trip")
            loaded.abort(f"transfer cancelled: {e.reason}")


async def on_transfer_redirected(env: Envelope, uow: UnitOfWork) -> None:
    e = decode(env)
    assert isinstance(e, dsp.TransferRedirected)
    for trip in await uow.find(Trip, status=["open"], limit=10_000):
        if trip.transfer_id == e.transfer_id:
            loaded = await uow.require(Trip, trip.id, "trip")
            loaded.redirect(e.to_facility_id, e.reason)


CONSUMES: dict[str, dict[str, Handler]] = {"dispatch": {
    "VehicleAssigned": on_vehicle_assigned, "VehicleWithdrawn": on_vehicle_withdrawn,
    "TransferCancelled": on_transfer_cancelled, "TransferRedirected": on_transfer_redirected,
}}


def trip_view(t: Trip) -> dict[str, Any]:
    return {
        "id": t.id, "transfer_id": t.transfer_id, "vehicle_id": t.vehicle_id,
        "destination_id": t.destination_id, "origin": t.origin, "status": t.status,
        "last_step": t.last_step, "steps": t.steps, "handed_over_to": t.handed_over_to,
        "return_required": t.return_required, "version": t.version,
    }
