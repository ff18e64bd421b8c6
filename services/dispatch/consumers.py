"""What dispatch learns from events: the trip's progress and the vehicle's disinfection
(consumer "dispatch"), and 报备 delivery to the health bureau (consumer "dispatch-reports",
apart so that a slow bureau endpoint never holds up dispatch)."""

from __future__ import annotations

import logging

from libs.events.aggregate import UnitOfWork, decode
from libs.events.bus import Handler
from libs.events.catalog import disinfection as dis
from libs.events.catalog import dispatch as dsp
from libs.events.catalog import transfer as tr
from libs.events.envelope import Envelope, canonical_json
from libs.web.webhooks import post_signed
from services.dispatch.config import settings
from services.dispatch.domain import Transfer, Vehicle
from services.dispatch.handlers import crew_aborted, request_return, serve_queue, transfer_view

log = logging.getLogger(__name__)


async def on_step(env: Envelope, uow: UnitOfWork) -> None:
    e = decode(env)
    assert isinstance(e, tr.TripStepReported)
    if e.step == "patient_aboard" and e.transfer_id:
        transfer = await uow.require(Transfer, e.transfer_id, "transfer")
        trip_vehicle = env.payload.get("vehicle_id") or transfer.vehicle_id or ""
        transfer.picked_up(e.trip_id, trip_vehicle)


async def on_trip_completed(env: Envelope, uow: UnitOfWork) -> None:
    e = decode(env)
    assert isinstance(e, tr.TripCompleted)
    vehicle = await uow.require(Vehicle, e.vehicle_id, "vehicle")
    vehicle.trip_completed(e.trip_id, e.transfer_id)  # R2: held until disinfection releases it
    # Unless the release overtook the trip's end on its way here: then the vehicle is free
    # now, and takes the first queued transfer it may carry (R4), as a release does.
    await serve_queue(uow, vehicle)


async def on_patient_handed_over(env: Envelope, uow: UnitOfWork) -> None:
    e = decode(env)
    assert isinstance(e, tr.PatientHandedOver)
    transfer = await uow.require(Transfer, e.transfer_id, "transfer")
    transfer.handed_over(e.trip_id, e.facility_id)


async def on_return_requested(env: Envelope, uow: UnitOfWork) -> None:
    e = decode(env)
    assert isinstance(e, tr.ReturnRequested)
    await request_return(uow, e.transfer_id, e.return_transfer_id, e.facility_id)


async def on_trip_aborted(env: Envelope, uow: UnitOfWork) -> None:
    e = decode(env)
    assert isinstance(e, tr.TripAborted)
    if e.dispatch_action is not None:  # a crew abort
        await crew_aborted(uow, e.transfer_id, e.vehicle_id, e.dispatch_action, e.reason)
    # A vehicle taken off this transfer (dispatch's abort, or the crew's that crossed the
    # breakdown's report) is free: the patient never boarded.
    vehicle = await uow.get(Vehicle, e.vehicle_id)
    if vehicle is not None and vehicle.trip_end_awaited == e.transfer_id:
        vehicle.trip_aborted(e.transfer_id)
        await serve_queue(uow, vehicle)


async def on_vehicle_released(env: Envelope, uow: UnitOfWork) -> None:
    e = decode(env)
    assert isinstance(e, dis.VehicleReleased)
    vehicle = await uow.require(Vehicle, e.vehicle_id, "vehicle")
    vehicle.released(e.trip_id, e.cycle_id, e.quarantine_lifted)
    await serve_queue(uow, vehicle)


async def on_vehicle_quarantined(env: Envelope, uow: UnitOfWork) -> None:
    e = decode(env)
    assert isinstance(e, dis.VehicleQuarantined)
    vehicle = await uow.require(Vehicle, e.vehicle_id, "vehicle")
    vehicle.take_out_of_service(f"positive surface swab {e.sample_id}", rule="R9")


async def deliver_report(env: Envelope, uow: UnitOfWork) -> None:
    """报备 (R10): POST the report, signed, retried with backoff; the outcome is an event."""
    cfg = settings()
    if not cfg.report_webhook_url:
        log.info("no 报备 endpoint (CLOSEDLOOP_DISPATCH_REPORT_WEBHOOK_URL): kept as an event only")
        return
    e = decode(env)
    assert isinstance(e, dsp.TransferReported)
    transfer = await uow.require(Transfer, e.transfer_id, "transfer")
    body = canonical_json({
        "event_id": str(env.event_id), "reported_at": env.recorded_at, "reported_by": e.reported_by,
        "reported_to": e.reported_to, "transfer": transfer_view(transfer),
    }).encode()
    sent = await post_signed(cfg.report_webhook_url, cfg.report_webhook_secret, str(env.event_id), body,
                             max_attempts=cfg.report_max_attempts, retry_base_s=cfg.report_retry_base_s)
    if sent.ok and sent.status_code is not None:
        transfer.report_delivered(cfg.report_webhook_url, sent.attempts, sent.status_code)
    else:
        transfer.report_failed(cfg.report_webhook_url, sent.attempts, sent.error)


CONSUMERS: dict[str, dict[str, dict[str, Handler]]] = {
    "dispatch": {
        "transfer": {"TripStepReported": on_step, "TripCompleted": on_trip_completed,
                     "PatientHandedOver": on_patient_handed_over,
                     "ReturnRequested": on_return_requested, "TripAborted": on_trip_aborted},
        "disinfection": {"VehicleReleased": on_vehicle_released,
                         "VehicleQuarantined": on_vehicle_quarantined},
    },
    "dispatch-reports": {"dispatch": {"TransferReported": deliver_report}},
}
