"""The transfer service's commands and what it learns from dispatch."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from libs.events.aggregate import UnitOfWork, decode
from libs.events.bus import Handler
from libs.events.catalog import dispatch as dsp
from libs.events.catalog import transfer as ev
from libs.events.catalog.common import Location
from libs.events.envelope import Envelope, utcnow
from libs.web.fields import not_ahead
from services.transfer.config import settings
from services.transfer.domain import Destination, Trip, eta_minutes, reassigned_trip_id_for, trip_id_for
from services.transfer.schemas import (
    AbortCode,
    AbortIn,
    AdmissionIn,
    DispatchAction,
    HandoverIn,
    NoticeAckIn,
    PositionIn,
    ReturnRequestIn,
    StepIn,
)


async def report_step(uow: UnitOfWork, trip_id: str, cmd: StepIn) -> tuple[Trip, bool]:
    trip = await uow.require(Trip, trip_id, "trip")
    was = trip.status
    now = utcnow()
    applied = trip.report_step(cmd.step.value, cmd.client_event_id, cmd.at, cmd.position,
                               cmd.received_by, received_at=now)
    if applied and cmd.step.value == "patient_aboard":
        here = cmd.position or _origin_location(trip)
        trip.issue_notice(await eta_from(uow, trip, here), now)
    await _close_loop_if_home(uow, trip, was, cmd.at)
    return trip, applied


def _origin_location(trip: Trip) -> Location | None:
    raw = trip.origin.get("location")
    return Location.model_validate(raw) if raw else None


async def eta_from(uow: UnitOfWork, trip: Trip, here: Location | None) -> float | None:
    """Minutes to the destination, when both ends are known (a return leg's origin is not
    a registered facility: no ETA, and no notice either)."""
    if here is None or not trip.destination_id:
        return None
    place = await uow.get(Destination, trip.destination_id)
    if place is None or place.location is None:
        return None
    cfg = settings()
    return eta_minutes(here, place.location, cfg.eta_road_factor, cfg.eta_speed_kmh)


async def acknowledge_notice(uow: UnitOfWork, trip_id: str, cmd: NoticeAckIn) -> tuple[Trip, bool]:
    trip = await uow.require(Trip, trip_id, "trip")
    return trip, trip.acknowledge_notice(cmd.notice_id, cmd.acknowledged_by, cmd.at)


async def report_position(uow: UnitOfWork, trip_id: str, cmd: PositionIn) -> tuple[Trip, bool]:
    trip = await uow.require(Trip, trip_id, "trip")
    not_ahead("at", cmd.at, utcnow())  # else one wrong clock would hide every later point
    cfg = settings()
    recorded = trip.report_position(cmd.location, cmd.at, await eta_from(uow, trip, cmd.location),
                                    cfg.track_min_distance_m, cfg.track_min_interval_s)
    return trip, recorded


async def on_facility_registered(env: Envelope, uow: UnitOfWork) -> None:
    e = decode(env)
    assert isinstance(e, dsp.FacilityRegistered)
    if await uow.get(Destination, e.facility_id) is not None:
        return
    place = Destination(id=e.facility_id)
    place.record(ev.DestinationKnown(facility_id=e.facility_id, name=e.name, location=e.location))
    uow.add(place)


async def hand_over(uow: UnitOfWork, trip_id: str, cmd: HandoverIn, role: str) -> Trip:
    trip = await uow.require(Trip, trip_id, "trip")
    was = trip.status
    trip.hand_over(cmd.facility_id, cmd.received_by,
                   "hospital" if role == "hospital" else "crew", cmd.at)
    await _close_loop_if_home(uow, trip, was, cmd.at)
    return trip


async def _close_loop_if_home(uow: UnitOfWork, trip: Trip, was: str, at: datetime) -> None:
    """A return leg that just handed over closes its outbound loop (R11), in the same commit."""
    if trip.return_of is None or was == "completed" or trip.handed_over_to is None:
        return
    for listed in await uow.find(Trip, status=["completed"], limit=10_000):
        if listed.transfer_id == trip.return_of and listed.loop == "return_requested":
            outbound = await uow.require(Trip, listed.id, "trip")
            outbound.return_leg_home(trip.id, at)


async def request_return(uow: UnitOfWork, trip_id: str, cmd: ReturnRequestIn) -> tuple[Trip, bool]:
    trip = await uow.require(Trip, trip_id, "trip")
    return trip, trip.request_return(cmd.facility_id, cmd.at)


async def admit(uow: UnitOfWork, trip_id: str, cmd: AdmissionIn) -> tuple[Trip, bool]:
    trip = await uow.require(Trip, trip_id, "trip")
    return trip, trip.admit(cmd.facility_id, cmd.at)


async def abort(uow: UnitOfWork, trip_id: str, cmd: AbortIn) -> Trip:
    trip = await uow.require(Trip, trip_id, "trip")
    action = cmd.dispatch_action or (
        DispatchAction.requeue if cmd.code == AbortCode.patient_absent else DispatchAction.cancel)
    trip.abort_by_crew(cmd.code.value, cmd.reason, action.value, cmd.at)
    return trip


async def on_vehicle_assigned(env: Envelope, uow: UnitOfWork) -> None:
    e = decode(env)
    assert isinstance(e, dsp.VehicleAssigned)
    assignment = str(env.event_id)
    trip_id = trip_id_for(e.transfer_id, e.vehicle_id)
    first = await uow.get(Trip, trip_id)
    if first is not None:
        if first.status == "open" or first.assignment_event_id in (None, assignment):
            return  # a redelivery of the assignment that opened it
        # the same vehicle sent to the same transfer again after its trip was aborted
        trip_id = reassigned_trip_id_for(e.transfer_id, e.vehicle_id, assignment)
        if await uow.get(Trip, trip_id) is not None:
            return
    uow.add(Trip.open(e.transfer_id, e.vehicle_id, e.destination_id, e.origin, e.return_required,
                      return_of=e.return_of, takeover_of=e.takeover_of,
                      assignment_event_id=assignment, trip_id=trip_id,
                      risk_category=e.risk_category, condition=e.condition))


async def on_vehicle_withdrawn(env: Envelope, uow: UnitOfWork) -> None:
    e = decode(env)
    assert isinstance(e, dsp.VehicleWithdrawn)
    for listed in await uow.find(Trip, ref=e.vehicle_id, status=["open"], limit=100):
        if listed.transfer_id == e.transfer_id:
            trip = await uow.require(Trip, listed.id, "trip")
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
            loaded.redirect(e.to_facility_id, e.reason, e.condition)
            if loaded.notice is not None:  # the patient is aboard: the new hospital is told
                here = Location.model_validate(loaded.position["location"]) if loaded.position \
                    else _origin_location(loaded)
                loaded.issue_notice(await eta_from(uow, loaded, here), utcnow())


CONSUMES: dict[str, dict[str, Handler]] = {"dispatch": {
    "VehicleAssigned": on_vehicle_assigned, "VehicleWithdrawn": on_vehicle_withdrawn,
    "TransferCancelled": on_transfer_cancelled, "TransferRedirected": on_transfer_redirected,
    "FacilityRegistered": on_facility_registered,
}}


def trip_view(t: Trip) -> dict[str, Any]:
    return {
        "id": t.id, "transfer_id": t.transfer_id, "vehicle_id": t.vehicle_id,
        "destination_id": t.destination_id, "origin": t.origin, "status": t.status,
        "last_step": t.last_step, "steps": t.steps, "handed_over_to": t.handed_over_to,
        "return_required": t.return_required, "return_of": t.return_of,
        "takeover_of": t.takeover_of, "loop": t.loop, "loop_how": t.loop_how,
        "return_transfer_id": t.return_transfer_id, "abort_reason": t.abort_reason,
        "risk_category": t.risk_category, "condition": t.condition, "notice": t.notice,
        "position": t.position, "track": t.track[-settings().track_max_points:],
        "version": t.version,
    }
