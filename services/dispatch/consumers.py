"""What dispatch learns from the other services' events."""

from __future__ import annotations

from libs.events.aggregate import UnitOfWork, decode
from libs.events.bus import Handler
from libs.events.catalog import disinfection as dis
from libs.events.catalog import transfer as tr
from libs.events.envelope import Envelope
from services.dispatch.domain import Transfer, Vehicle
from services.dispatch.handlers import serve_queue


async def on_trip_completed(env: Envelope, uow: UnitOfWork) -> None:
    e = decode(env)
    assert isinstance(e, tr.TripCompleted)
    vehicle = await uow.require(Vehicle, e.vehicle_id, "vehicle")
    vehicle.trip_completed(e.trip_id)  # R2: held until disinfection releases it


async def on_patient_handed_over(env: Envelope, uow: UnitOfWork) -> None:
    e = decode(env)
    assert isinstance(e, tr.PatientHandedOver)
    transfer = await uow.require(Transfer, e.transfer_id, "transfer")
    transfer.handed_over(e.trip_id, e.facility_id)


async def on_vehicle_released(env: Envelope, uow: UnitOfWork) -> None:
    e = decode(env)
    assert isinstance(e, dis.VehicleReleased)
    vehicle = await uow.require(Vehicle, e.vehicle_id, "vehicle")
    vehicle.released(e.trip_id, e.cycle_id, e.quarantine_lifted)
    if vehicle.status == "available":
        await serve_queue(uow, vehicle)


async def on_vehicle_quarantined(env: Envelope, uow: UnitOfWork) -> None:
    e = decode(env)
    assert isinstance(e, dis.VehicleQuarantined)
    vehicle = await uow.require(Vehicle, e.vehicle_id, "vehicle")
    vehicle.take_out_of_service(f"positive surface swab {e.sample_id}", rule="R9")


CONSUMES: dict[str, dict[str, Handler]] = {
    "transfer": {"TripCompleted": on_trip_completed, "PatientHandedOver": on_patient_handed_over},
    "disinfection": {"VehicleReleased": on_vehicle_released,
                     "VehicleQuarantined": on_vehicle_quarantined},
}
