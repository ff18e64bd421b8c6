"""Events of the transfer service: the trip (streams trip-*)."""

from __future__ import annotations

from typing import Any

from libs.events.catalog.common import Location
from libs.events.contracts import Event, registry


@registry.register
class TripOpened(Event):
    trip_id: str
    transfer_id: str
    vehicle_id: str
    destination_id: str | None
    origin: dict[str, Any]
    return_required: bool


@registry.register
class TripStepReported(Event):
    """A crew step; the envelope's occurred_at is the phone's clock, recorded_at the server's."""

    trip_id: str
    step: str
    client_event_id: str
    device_at: str
    position: Location | None = None
    transfer_id: str = ""


@registry.register
class PatientHandedOver(Event):
    trip_id: str
    transfer_id: str
    facility_id: str
    received_by: str
    confirmed_by: str


@registry.register
class HandoverConfirmed(Event):
    """The other side of the handover confirmed it too (the HIS after the crew, or back)."""

    trip_id: str
    transfer_id: str
    facility_id: str
    received_by: str
    confirmed_by: str


@registry.register
class TripRedirected(Event):
    trip_id: str
    transfer_id: str
    destination_id: str
    reason: str


@registry.register
class TripAborted(Event):
    """The trip ends without a handover (the vehicle was withdrawn, the transfer cancelled)."""

    trip_id: str
    transfer_id: str
    vehicle_id: str
    reason: str


@registry.register
class TripCompleted(Event):
    """The vehicle's part is over: disinfection opens a cycle, dispatch holds the vehicle (R2)."""

    trip_id: str
    transfer_id: str
    vehicle_id: str
