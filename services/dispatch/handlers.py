"""Dispatch's command handlers: thin, they load aggregates, call the domain, and leave the
commit to the caller's unit of work."""

from __future__ import annotations

from typing import Any

from libs.events.aggregate import DomainError, StateConflict, UnitOfWork
from libs.events.catalog import dispatch as ev
from libs.events.envelope import iso, utcnow
from services.dispatch.domain import (
    Facility,
    StraightLineEta,
    Transfer,
    Vehicle,
    choose_destination,
    patient_class,
    rank_vehicles,
)
from services.dispatch.schemas import AssignIn, FacilityIn, LoadIn, TransferIn, VehicleIn

ETA = StraightLineEta()


async def register_facility(uow: UnitOfWork, cmd: FacilityIn) -> Facility:
    if await uow.get(Facility, cmd.id) is not None:
        raise StateConflict("facility_exists", f"facility {cmd.id} is already registered",
                            f"医疗机构{cmd.id}已登记")
    facility = Facility.register(ev.FacilityRegistered(
        facility_id=cmd.id, name=cmd.name, roles=[r.value for r in cmd.roles],
        location=cmd.location, fever_clinic_capacity=cmd.fever_clinic_capacity,
        backup_ids=cmd.backup_ids, overflow_threshold=cmd.overflow_threshold,
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
    return vehicle


async def request_transfer(uow: UnitOfWork, transfer_id: str, cmd: TransferIn) -> Transfer:
    body = cmd.model_dump(mode="json", exclude_none=True)
    transfer = Transfer.request(
        ev.TransferRequested(
            transfer_id=transfer_id, patient=body["patient"], risk_category=body["risk_category"],
            condition=body.get("condition", {}), origin=body["origin"], purpose=body["purpose"],
            return_required=cmd.return_required, requested_by=body["requested_by"],
        ),
        requested_at=iso(utcnow()),
    )
    uow.add(transfer)
    facilities = await uow.find(Facility)
    destination, why, candidates = choose_destination(
        transfer.origin_location, patient_class(transfer.risk_category, transfer.condition),
        facilities, ETA,
    )
    transfer.route(destination, why, candidates)
    transfer.report()
    await auto_assign(uow, transfer)
    return transfer


async def auto_assign(uow: UnitOfWork, transfer: Transfer) -> Vehicle | None:
    """The fitting free vehicle nearest the pickup, else the queue (R3, R5)."""
    free = await uow.find(Vehicle, status=["available"])
    fitting, considered = rank_vehicles(transfer, free, ETA)
    for candidate in fitting:
        vehicle = await uow.require(Vehicle, candidate.id, "vehicle")
        try:
            transfer.assign(vehicle, f"nearest fitting free vehicle ({candidate.id})", considered)
        except DomainError:
            continue  # the list was a moment old; this one is taken
        return vehicle
    if transfer.status != "queued":
        transfer.queue("no fitting vehicle free; waits in priority order (R4)")
    return None


async def assign_manually(uow: UnitOfWork, transfer_id: str, cmd: AssignIn) -> Transfer:
    transfer = await uow.require(Transfer, transfer_id, "transfer")
    vehicle = await uow.require(Vehicle, cmd.vehicle_id, "vehicle")
    transfer.assign(vehicle, "assigned by the dispatcher", [], manual=True,
                    override_reason=cmd.override_reason)
    return transfer


async def serve_queue(uow: UnitOfWork, vehicle: Vehicle) -> Transfer | None:
    """A vehicle just became free: it takes the first queued transfer it can carry (R4)."""
    queued = await uow.find(Transfer, status=["queued"])
    queued.sort(key=lambda t: (t.priority, t.requested_at))
    for listed in queued:
        transfer = await uow.require(Transfer, listed.id, "transfer")
        fitting, considered = rank_vehicles(transfer, [vehicle], ETA)
        if fitting:
            transfer.assign(vehicle, "first queued transfer this freed vehicle can carry (R4)",
                            considered)
            return transfer
    return None


def transfer_view(t: Transfer) -> dict[str, Any]:
    return {
        "id": t.id, "status": t.status, "priority": t.priority,
        "priority_reason": t.priority_reason, "destination": t.destination_id,
        "vehicle_id": t.vehicle_id, "risk_category": t.risk_category, "purpose": t.purpose,
        "return_required": t.return_required, "requested_at": t.requested_at,
        "patient": t.patient, "origin": t.origin, "condition": t.condition,
        "reported": t.reported, "version": t.version,
    }


def vehicle_view(v: Vehicle) -> dict[str, Any]:
    return {
        "id": v.id, "plate": v.plate, "kind": v.kind, "dedicated_pool": v.dedicated_pool,
        "life_support": v.life_support, "station": v.station,
        "location": v.location.model_dump(), "status": v.status, "transfer_id": v.transfer_id,
    }


def facility_view(f: Facility) -> dict[str, Any]:
    return {
        "id": f.id, "name": f.name, "roles": f.roles, "location": f.location.model_dump(),
        "fever_clinic_capacity": f.fever_clinic_capacity,
        "fever_clinic_occupied": f.fever_clinic_occupied, "backup_ids": f.backup_ids,
        "overflow_threshold": f.overflow_threshold, "status": f.status,
    }
