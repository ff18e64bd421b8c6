"""The trip: from the vehicle's assignment to the handover, told by crew phones that
resend and arrive late, and by hospital systems. Pure: no I/O."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from libs.events.aggregate import Aggregate, StateConflict
from libs.events.catalog import transfer as ev
from libs.events.catalog.common import Location
from libs.events.envelope import iso

STEPS = ("acknowledged", "en_route", "at_pickup", "patient_aboard", "at_destination", "handed_over")
NEEDS_PATIENT_ABOARD = ("at_destination", "handed_over")


def trip_id_for(transfer_id: str, vehicle_id: str) -> str:
    """Deterministic, so a redelivered VehicleAssigned opens the same trip, not a second."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"trip:{transfer_id}:{vehicle_id}"))


class Trip(Aggregate):
    stream_prefix = "trip"

    transfer_id: str = ""
    vehicle_id: str = ""
    destination_id: str | None = None
    origin: dict[str, Any] = {}
    return_required: bool = False
    status: str = "open"
    last_step: str | None = None
    steps: list[dict[str, Any]] = []
    client_event_ids: list[str] = []
    handed_over_to: str | None = None

    def ref_value(self) -> str | None:
        return self.vehicle_id

    @classmethod
    def open(cls, transfer_id: str, vehicle_id: str, destination_id: str | None,
             origin: dict[str, Any], return_required: bool) -> Trip:
        trip = cls(id=trip_id_for(transfer_id, vehicle_id))
        trip.record(ev.TripOpened(
            trip_id=trip.id, transfer_id=transfer_id, vehicle_id=vehicle_id,
            destination_id=destination_id, origin=origin, return_required=return_required,
        ))
        return trip

    def _on_TripOpened(self, e: ev.TripOpened) -> None:
        self.transfer_id, self.vehicle_id, self.destination_id = e.transfer_id, e.vehicle_id, e.destination_id
        self.origin, self.return_required = e.origin, e.return_required

    def _reached(self, step: str) -> bool:
        return self.last_step is not None and STEPS.index(self.last_step) >= STEPS.index(step)

    def report_step(self, step: str, client_event_id: str, device_at: datetime,
                    position: Location | None = None, received_by: str | None = None) -> bool:
        """Apply a crew step once. False when this client event id was applied before."""
        if client_event_id in self.client_event_ids:
            return False
        if self.status == "aborted":
            raise StateConflict("trip_closed", f"trip {self.id} is closed", f"行程{self.id}已结束",
                                trip_id=self.id)
        if self.last_step is not None and STEPS.index(step) <= STEPS.index(self.last_step):
            raise StateConflict(
                "step_out_of_order", f"step {step} cannot follow {self.last_step}",
                f"步骤“{step}”不能在“{self.last_step}”之后上报", trip_id=self.id,
                last_step=self.last_step,
            )
        if step in NEEDS_PATIENT_ABOARD and not self._reached("patient_aboard"):
            raise StateConflict(
                "patient_not_aboard", f"step {step} needs the patient aboard first",
                f"患者尚未上车，不能上报“{step}”", trip_id=self.id, last_step=self.last_step,
            )
        self.record(
            ev.TripStepReported(trip_id=self.id, step=step, client_event_id=client_event_id,
                                device_at=iso(device_at), position=position,
                                transfer_id=self.transfer_id),
            occurred_at=device_at,
        )
        if step == "handed_over" and self.status != "completed":
            self._hand_over(self.destination_id or "", received_by or "", "crew", device_at)
        return True

    def _on_TripStepReported(self, e: ev.TripStepReported) -> None:
        self.last_step = e.step
        self.client_event_ids = [*self.client_event_ids, e.client_event_id]
        self.steps = [*self.steps, {"step": e.step, "device_at": e.device_at,
                                    "client_event_id": e.client_event_id}]

    def hand_over(self, facility_id: str, received_by: str, confirmed_by: str, at: datetime) -> None:
        if not self._reached("patient_aboard"):
            raise StateConflict("patient_not_aboard", "the patient is not aboard yet",
                                "患者尚未上车，不能交接", trip_id=self.id)
        if self.status == "completed":
            if facility_id != self.handed_over_to:
                raise StateConflict(
                    "handover_facility_mismatch",
                    f"handed over to {self.handed_over_to}, not {facility_id}",
                    f"患者已交接至{self.handed_over_to}，不是{facility_id}", trip_id=self.id)
            self.record(ev.HandoverConfirmed(
                trip_id=self.id, transfer_id=self.transfer_id, facility_id=facility_id,
                received_by=received_by, confirmed_by=confirmed_by), occurred_at=at)
            return
        self._hand_over(facility_id, received_by, confirmed_by, at)

    def _hand_over(self, facility_id: str, received_by: str, confirmed_by: str, at: datetime) -> None:
        self.record(ev.PatientHandedOver(
            trip_id=self.id, transfer_id=self.transfer_id, facility_id=facility_id,
            received_by=received_by, confirmed_by=confirmed_by), occurred_at=at)
        self.record(ev.TripCompleted(trip_id=self.id, transfer_id=self.transfer_id,
                                     vehicle_id=self.vehicle_id), occurred_at=at)

    def _on_PatientHandedOver(self, e: ev.PatientHandedOver) -> None:
        self.handed_over_to = e.facility_id

    def _on_TripCompleted(self, e: ev.TripCompleted) -> None:
        self.status = "completed"

    def redirect(self, destination_id: str, reason: str) -> None:
        if self.status == "open" and destination_id != self.destination_id:
            self.record(ev.TripRedirected(trip_id=self.id, transfer_id=self.transfer_id,
                                          destination_id=destination_id, reason=reason))

    def _on_TripRedirected(self, e: ev.TripRedirected) -> None:
        self.destination_id = e.destination_id

    def abort(self, reason: str) -> None:
        """Ends a trip that will not hand over. A vehicle that had the patient aboard still
        needs disinfection, so its trip completes rather than aborts (issue 4 decides more)."""
        if self.status != "open":
            return
        if self._reached("patient_aboard"):
            self.record(ev.TripCompleted(trip_id=self.id, transfer_id=self.transfer_id,
                                         vehicle_id=self.vehicle_id))
            return
        self.record(ev.TripAborted(trip_id=self.id, transfer_id=self.transfer_id,
                                   vehicle_id=self.vehicle_id, reason=reason))

    def _on_TripAborted(self, e: ev.TripAborted) -> None:
        self.status = "aborted"
