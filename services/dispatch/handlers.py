"""Dispatch's command handlers: thin. They load aggregates, call the domain, and leave the
commit to the caller's unit of work, so each command is one atomic append."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any
from uuid import uuid4

from libs.events.aggregate import DomainError, InvalidField, StateConflict, UnitOfWork
from libs.events.catalog import dispatch as ev
from libs.events.envelope import iso, utcnow
from libs.events.store import EventStore, Meta
from libs.web.fields import not_ahead
from services.dispatch.config import region
from services.dispatch.domain import (
    LIVE,
    CareSeries,
    Facility,
    FreeFleet,
    Routing,
    StraightLineEta,
    Transfer,
    Vehicle,
    WaitingQueue,
    choose_destination,
    distance_km,
    occurrence_transfer_id,
    patient_class,
    patient_key,
    rank_vehicles,
    vehicle_needs,
)
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


def eta() -> StraightLineEta:
    return StraightLineEta(region().eta.road_factor, region().eta.speed_kmh)


# -- reference data ---------------------------------------------------------------------


async def register_facility(uow: UnitOfWork, cmd: FacilityIn) -> Facility:
    if await uow.get(Facility, cmd.id) is not None:
        raise StateConflict("facility_exists", f"facility {cmd.id} is already registered",
                            f"医疗机构{cmd.id}已登记")
    facility = Facility.register(ev.FacilityRegistered(
        facility_id=cmd.id, name=cmd.name, roles=[r.value for r in cmd.roles],
        location=cmd.location, fever_clinic_capacity=cmd.fever_clinic_capacity,
        backup_ids=cmd.backup_ids,
        overflow_threshold=cmd.overflow_threshold or region().overflow_threshold,
    ))
    uow.add(facility)
    return facility


async def report_load(uow: UnitOfWork, facility_id: str, cmd: LoadIn) -> Facility:
    facility = await uow.require(Facility, facility_id, "facility")
    facility.report_load(cmd.fever_clinic_occupied, iso(cmd.reported_at))
    return facility


async def register_vehicle(uow: UnitOfWork, cmd: VehicleIn) -> Vehicle:
    if await uow.get(Vehicle, cmd.id) is not None:
        raise StateConflict("vehicle_exists", f"vehicle {cmd.id} is already registered",
                            f"车辆{cmd.id}已登记")
    vehicle = Vehicle.register(ev.VehicleRegistered(
        vehicle_id=cmd.id, plate=cmd.plate, kind=cmd.kind.value, dedicated_pool=cmd.dedicated_pool,
        life_support=cmd.life_support, station=cmd.station, location=cmd.location,
    ))
    uow.add(vehicle)
    await serve_queue(uow, vehicle)  # a new vehicle takes waiting work at once
    return vehicle


# -- transfers ----------------------------------------------------------------------------


async def live_transfer_of(uow: UnitOfWork, patient: dict[str, Any]) -> Transfer | None:
    key = patient_key(patient)
    if key is None:
        return None
    live = await uow.find(Transfer, ref=key, status=list(LIVE), limit=1)
    return live[0] if live else None


async def request_transfer(uow: UnitOfWork, transfer_id: str, cmd: TransferIn,
                           series_id: str | None = None) -> tuple[Transfer, bool]:
    """A new transfer, routed, reported and (when a fitting vehicle is free) assigned; or,
    when this person already has a live transfer, that one (False: nothing created)."""
    return_required = cmd.return_required
    if cmd.purpose == "outpatient_visit":
        if return_required is False:
            raise InvalidField("return_required", "outpatient_visit_returns",
                               "an outpatient visit brings the patient back to the origin (R11): "
                               "return_required cannot be false",
                               "门诊就诊须闭环返回原出发地（R11），返程不可取消", rule="R11")
        return_required = True
    body = cmd.model_dump(mode="json", exclude_none=True)
    existing = await live_transfer_of(uow, body["patient"])
    if existing is not None:
        return existing, False
    transfer = Transfer.request(
        ev.TransferRequested(
            transfer_id=transfer_id, patient=body["patient"], risk_category=body["risk_category"],
            condition=body.get("condition", {}), origin=body["origin"], purpose=body["purpose"],
            return_required=bool(return_required), requested_by=body["requested_by"],
            destination_wish=cmd.destination_wish, series_id=series_id,
        ),
        requested_at=iso(utcnow()),
    )
    uow.add(transfer)
    transfer.route(await route(uow, transfer, wish=transfer.destination_wish))
    transfer.report()
    await auto_assign(uow, transfer)
    return transfer, True


async def request_return(uow: UnitOfWork, outbound_id: str, return_id: str, facility_id: str) -> Transfer:
    """R11: the hospital asked for the way back. A new transfer, linked by `return_of`, from
    the hospital to the outbound leg's origin, dispatched under the same rules (R1-R5, R10).
    Not deduplicated by person: the outbound leg is this person's, and a return leg is
    made once by its deterministic id."""
    existing = await uow.get(Transfer, return_id)
    if existing is not None:
        return existing
    outbound = await uow.require(Transfer, outbound_id, "transfer")
    facility = await uow.get(Facility, facility_id)
    # A hospital dispatch does not know (a handover where no destination was resolved) still
    # gets its return leg: picked up at the outbound destination's place, else the origin's.
    known = facility or (await uow.get(Facility, outbound.destination_id)
                         if outbound.destination_id else None)
    location = known.location.model_dump(mode="json") if known else outbound.origin["location"]
    name = facility.name if facility else facility_id
    transfer = Transfer.request(
        ev.TransferRequested(
            transfer_id=return_id, patient=outbound.patient, risk_category=outbound.risk_category,
            condition=outbound.condition,
            origin={"kind": "facility", "facility_id": facility_id, "name": name, "location": location},
            purpose="return_leg", return_required=False,
            requested_by={"channel": "his", "org": name},
            series_id=outbound.series_id, return_of=outbound.id,
        ),
        requested_at=iso(utcnow()),
    )
    uow.add(transfer)
    transfer.route_to_origin(str(outbound.origin.get("facility_id") or "origin"), outbound.id)
    transfer.report()
    await auto_assign(uow, transfer)
    return transfer


async def crew_aborted(uow: UnitOfWork, transfer_id: str, vehicle_id: str, action: str,
                       reason: str) -> None:
    """The crew found the patient absent or refusing: the vehicle stands down and the
    transfer is cancelled, or put back in the queue (R4 order) for a later attempt."""
    transfer = await uow.require(Transfer, transfer_id, "transfer")
    if transfer.vehicle_id != vehicle_id or transfer.status != "assigned":
        return  # already moved on (a redelivery, or dispatch acted first)
    vehicle = await uow.require(Vehicle, vehicle_id, "vehicle")
    if action == "requeue":
        transfer.withdraw_vehicle(f"crew aborted: {reason}")
        vehicle.stand_down(transfer.id, f"crew aborted: {reason}")
        if await serve_queue(uow, vehicle, also=transfer) is not transfer:
            transfer.queue(f"requeued after the crew aborted: {reason}")
        return
    transfer.cancel(f"crew aborted: {reason}")
    vehicle.stand_down(transfer.id, f"crew aborted: {reason}")
    await serve_queue(uow, vehicle)


async def route(uow: UnitOfWork, transfer: Transfer, condition: dict[str, Any] | None = None, *,
                wish: str | None = None, excluding: str | None = None) -> Routing:
    """The destination by the rules (R6, R7), for the transfer's condition or a new one.
    `excluding`: a redirect's current destination, no candidate, though its overflow still
    activates its backups. The routing holds only while what it read holds: the facility
    chosen and every overflowing one (skipped, or activating its backups) are guarded, so a
    load report of one of them committed meanwhile fails this command's commit and it
    routes again on the new load; the decision's place in the store then comes after the
    loads it went by (what the audit's R7 checks read)."""
    cond = condition if condition is not None else transfer.condition
    pclass = patient_class(transfer.risk_category, cond, transfer.origin.get("kind"))
    roles = region().roles.get(pclass, region().roles["other"])
    facilities = await uow.find(Facility)
    routing = choose_destination(transfer.origin_location, pclass, roles, facilities, eta(),
                                 critical=bool(cond.get("critical")), wish=wish, excluding=excluding)
    chosen = routing.facility.id if routing.facility is not None else None
    for facility in facilities:
        if facility.overflowing or facility.id == chosen:
            uow.guard(facility)
    return routing


async def auto_assign(uow: UnitOfWork, transfer: Transfer) -> Vehicle | None:
    """The fitting free vehicle (least over-equipped, then nearest the pickup), else the queue."""
    free = await uow.view(Vehicle, FreeFleet)
    needs = vehicle_needs(transfer.risk_category, transfer.condition)
    fitting, considered = free.rank(needs, transfer.origin_location, eta())
    for candidate in fitting:
        vehicle = await uow.require(Vehicle, candidate.id, "vehicle")
        try:
            transfer.assign(vehicle, [], f"nearest fitting free vehicle ({candidate.id})", considered)
        except DomainError:
            continue  # the list was a moment old: this one was just taken
        return vehicle
    transfer.queue("no fitting vehicle is free; waits in priority order (R4)")
    return None


async def assign_manually(uow: UnitOfWork, transfer_id: str, cmd: AssignIn, role: str) -> Transfer:
    transfer = await uow.require(Transfer, transfer_id, "transfer")
    vehicle = await uow.require(Vehicle, cmd.vehicle_id, "vehicle")
    unmet = vehicle.unmet(vehicle_needs(transfer.risk_category, transfer.condition))
    transfer.assign(vehicle, unmet, "assigned by the dispatcher", [], manual=True,
                    override_reason=cmd.override_reason, role=role)
    return transfer


async def reprioritize(uow: UnitOfWork, transfer_id: str, cmd: ReprioritizeIn) -> Transfer:
    transfer = await uow.require(Transfer, transfer_id, "transfer")
    transfer.reprioritize(cmd.priority, cmd.reason)
    return transfer


async def redirect(uow: UnitOfWork, transfer_id: str, cmd: RedirectIn) -> Transfer:
    """A full hospital or a patient who worsens: a new destination, by the rules unless the
    dispatcher names one."""
    transfer = await uow.require(Transfer, transfer_id, "transfer")
    condition = cmd.condition.model_dump(mode="json", exclude_none=True) if cmd.condition else None
    if cmd.facility_id is not None:
        facility = await uow.require(Facility, cmd.facility_id, "facility")
        transfer.redirect(facility, f"named by the dispatcher: {cmd.reason}", [], condition)
        return transfer
    routing = await route(uow, transfer, condition, excluding=transfer.destination_id)
    if routing.facility is None:
        raise InvalidField("facility_id", "no_other_facility", routing.reason,
                           "没有其他可接收的医疗机构，请指定", candidates=routing.candidates)
    transfer.redirect(routing.facility, f"{cmd.reason}; {routing.reason}", routing.candidates, condition)
    return transfer


async def cancel(uow: UnitOfWork, transfer_id: str, cmd: CancelIn) -> Transfer:
    transfer = await uow.require(Transfer, transfer_id, "transfer")
    vehicle_id = transfer.cancel(cmd.reason)
    if vehicle_id is not None:
        vehicle = await uow.require(Vehicle, vehicle_id, "vehicle")
        vehicle.stand_down(transfer.id, f"transfer cancelled: {cmd.reason}")
        await serve_queue(uow, vehicle)
    return transfer


async def serve_queue(uow: UnitOfWork, vehicle: Vehicle, also: Transfer | None = None) -> Transfer | None:
    """A vehicle just became free: it takes the first queued transfer it may carry (R4).
    `also`: a transfer back in line in this same commit (the list holds committed states)."""
    if vehicle.status != "available":
        return None
    waiting = await uow.view(Transfer, WaitingQueue)
    for listed in waiting.in_order(also):
        needs = vehicle_needs(listed.risk_category, listed.condition)
        if not vehicle.fits(needs):
            continue
        transfer = await uow.require(Transfer, listed.id, "transfer")
        _, considered = rank_vehicles(needs, transfer.origin_location, [vehicle], eta())
        transfer.assign(vehicle, [], "first queued transfer this freed vehicle may carry (R4)",
                        considered)
        return transfer
    return None


# -- fleet --------------------------------------------------------------------------------


async def set_duty(uow: UnitOfWork, vehicle_id: str, cmd: DutyIn) -> Vehicle:
    vehicle = await uow.require(Vehicle, vehicle_id, "vehicle")
    vehicle.set_duty(cmd.on_duty, cmd.reason)
    await serve_queue(uow, vehicle)
    return vehicle


async def take_out_of_service(uow: UnitOfWork, vehicle_id: str, cmd: OutOfServiceIn) -> Vehicle:
    """A breakdown. Before pickup its transfer is reassigned at once; after pickup the crew's
    trip decides (a second vehicle takes over, issue 4)."""
    vehicle = await uow.require(Vehicle, vehicle_id, "vehicle")
    transfer = None
    if vehicle.status == "assigned" and vehicle.transfer_id is not None:
        transfer = await uow.require(Transfer, vehicle.transfer_id, "transfer")
        # (a breakdown reported twice must not withdraw the vehicle that took over)
        if transfer.vehicle_id != vehicle_id or not transfer.withdraw_vehicle(
                f"vehicle {vehicle_id} out of service: {cmd.reason}"):
            transfer = None
    vehicle.take_out_of_service(cmd.reason, withdrawn_from=transfer.id if transfer else None)
    if transfer is not None:
        await auto_assign(uow, transfer)
    return vehicle


async def report_position(uow: UnitOfWork, vehicle_id: str, cmd: PositionIn) -> tuple[Vehicle, bool]:
    """Positions arrive often; one is recorded when the vehicle moved 200 m or a minute
    passed, so the store keeps a track without a flood."""
    vehicle = await uow.require(Vehicle, vehicle_id, "vehicle")
    not_ahead("at", cmd.at, utcnow())  # else one wrong clock would hide every later position
    last = datetime.fromisoformat(vehicle.position_at) if vehicle.position_at else None
    moved = distance_km(vehicle.location, cmd.location) >= 0.2
    if last is not None and not moved and cmd.at - last < timedelta(minutes=1):
        return vehicle, False
    if last is not None and cmd.at <= last:
        return vehicle, False  # an older position arriving late changes nothing
    vehicle.report_position(cmd.location, iso(cmd.at))
    return vehicle, True


# -- recurring care ---------------------------------------------------------------------


async def schedule_care(uow: UnitOfWork, cmd: CareSeriesIn) -> CareSeries:
    series = CareSeries.schedule(ev.CareSeriesScheduled(
        series_id=str(uuid4()), template=cmd.transfer.model_dump(mode="json", exclude_none=True),
        weekdays=cmd.weekdays, time=cmd.time, timezone=cmd.timezone,
        starts_on=cmd.starts_on.isoformat(), until=cmd.until.isoformat() if cmd.until else None,
        lead_minutes=cmd.lead_minutes))
    uow.add(series)
    return series


async def cancel_care(uow: UnitOfWork, series_id: str, cmd: CancelIn) -> CareSeries:
    series = await uow.require(CareSeries, series_id, "care series")
    series.cancel(cmd.reason)
    return series


async def request_due_care(store: EventStore, now: datetime, lookback: timedelta = timedelta(days=1)) -> int:
    """Requests each due occurrence of every active series once (ids are deterministic)."""
    created = 0
    reader = UnitOfWork.reading(store)
    for listed in await reader.find(CareSeries, status=["active"], limit=10_000):
        for appointment in listed.due(now, now - lookback):
            transfer_id = occurrence_transfer_id(listed.id, appointment.isoformat())
            uow = UnitOfWork(store, Meta(actor="system:care-scheduler", role="system",
                                         correlation_id=transfer_id))
            series = await uow.require(CareSeries, listed.id, "care series")
            if appointment.isoformat() in series.requested:
                continue
            template = TransferIn.model_validate({**series.template, "purpose": "scheduled_care"})
            await request_transfer(uow, transfer_id, template, series_id=series.id)
            series.mark_requested(appointment, transfer_id)
            await uow.commit()
            created += 1
    return created


# -- views ------------------------------------------------------------------------------


def transfer_view(t: Transfer) -> dict[str, Any]:
    return {
        "id": t.id, "status": t.status, "status_reason": t.status_reason, "priority": t.priority,
        "priority_reason": t.priority_reason, "destination": t.destination_id,
        "vehicle_id": t.vehicle_id, "trip_id": t.trip_id, "risk_category": t.risk_category,
        "purpose": t.purpose, "return_required": t.return_required, "return_of": t.return_of,
        "requested_at": t.requested_at,
        "patient": t.patient, "origin": t.origin, "condition": t.condition,
        "destination_wish": t.destination_wish, "series_id": t.series_id, "reported": t.reported,
        "report_delivery": t.report_delivery,
        "overrides": t.overrides, "version": t.version,
    }


def vehicle_view(v: Vehicle) -> dict[str, Any]:
    return {
        "id": v.id, "plate": v.plate, "kind": v.kind, "dedicated_pool": v.dedicated_pool,
        "life_support": v.life_support, "station": v.station, "location": v.location.model_dump(),
        "position_at": v.position_at, "status": v.status, "transfer_id": v.transfer_id,
        "awaiting_disinfection_for": v.awaiting_trips, "out_reason": v.out_reason,
        "trip_end_awaited_for": v.trip_end_awaited,
    }


def facility_view(f: Facility) -> dict[str, Any]:
    return {
        "id": f.id, "name": f.name, "roles": f.roles, "location": f.location.model_dump(),
        "fever_clinic_capacity": f.fever_clinic_capacity,
        "fever_clinic_occupied": f.fever_clinic_occupied, "load_ratio": f.load_ratio,
        "backup_ids": f.backup_ids, "overflow_threshold": f.overflow_threshold, "status": f.status,
    }


def care_view(s: CareSeries) -> dict[str, Any]:
    return {
        "id": s.id, "status": s.status, "weekdays": s.weekdays, "time": s.time,
        "timezone": s.timezone, "starts_on": s.starts_on, "until": s.until,
        "lead_minutes": s.lead_minutes, "requested": s.requested, "patient": s.template.get("patient"),
    }
