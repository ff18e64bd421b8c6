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
    return_of: str | None = None  # the outbound transfer, when this trip is its return leg (R11)
    takeover_of: str | None = None  # the broken-down vehicle whose patient this trip takes over
    assignment_event_id: str | None = None  # the VehicleAssigned it opened from
    risk_category: str = ""
    condition: dict[str, Any] = {}


@registry.register
class TripStepReported(Event):
    """A crew step; the envelope's occurred_at is the phone's clock, recorded_at the server's."""

    trip_id: str
    step: str
    client_event_id: str
    device_at: str
    position: Location | None = None
    transfer_id: str = ""
    vehicle_id: str = ""
    late: bool = False  # arrived after a later step: history, the trip does not move back
    received_at: str | None = None  # the server's clock when it arrived
    clock_skew_s: float | None = None  # device_at - received_at, shown, never used for order


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
    condition: dict[str, Any] | None = None  # when the patient worsened


@registry.register
class TripAborted(Event):
    """The trip ends without a handover (the vehicle was withdrawn, the transfer cancelled,
    or the crew found the patient absent or refusing). A crew abort carries what dispatch is
    asked to do with the transfer: "cancel" or "requeue"; None when dispatch caused it."""

    trip_id: str
    transfer_id: str
    vehicle_id: str
    reason: str
    code: str | None = None  # patient_absent, patient_refused, other
    dispatch_action: str | None = None
    aborted_by: str = "dispatch"


HANDED_OVER = "handed over"  # TripCompleted's reason when the crew handed the patient over


@registry.register
class TripCompleted(Event):
    """The vehicle's part is over: disinfection opens a cycle, dispatch holds the vehicle (R2).
    One for every vehicle that carried the patient, also one that broke down on the way.
    After a handover it is dated at the handover (the crew's clock); when dispatch took the
    vehicle off (another reason), when the transfer service heard of it (the server's)."""

    trip_id: str
    transfer_id: str
    vehicle_id: str
    reason: str = HANDED_OVER


@registry.register
class ReturnRequested(Event):
    """The hospital asks for the return leg after an outpatient visit (R11); dispatch opens
    the return transfer with this id, back to the outbound transfer's origin."""

    trip_id: str
    transfer_id: str
    facility_id: str
    return_transfer_id: str
    origin: dict[str, Any]
    requested_at: str


@registry.register
class PatientAdmitted(Event):
    """The hospital admits the patient instead of sending them back: the loop closes (R11)."""

    trip_id: str
    transfer_id: str
    facility_id: str
    admitted_at: str


@registry.register
class LoopClosed(Event):
    """R11: the closed loop of an outbound transfer is complete, by "returned" (the return
    leg handed over at the origin), "admitted", or "one_way" (no return was required)."""

    transfer_id: str
    how: str
    trip_id: str
    return_transfer_id: str | None = None


@registry.register
class DestinationKnown(Event):
    """The transfer service's copy of a facility dispatch registered: where it is, for the ETA."""

    facility_id: str
    name: str
    location: Location


@registry.register
class PreArrivalNoticeIssued(Event):
    """The patient is aboard: the receiving hospital is told what is coming and when. A
    redirect issues a new notice to the new hospital."""

    trip_id: str
    transfer_id: str
    notice_id: str
    facility_id: str
    vehicle_id: str
    risk_category: str
    condition: dict[str, Any]
    eta_minutes: float | None
    eta_at: str | None
    issued_at: str


@registry.register
class PreArrivalNoticeDelivered(Event):
    trip_id: str
    notice_id: str
    url: str
    attempt: int
    attempts: int
    status_code: int


@registry.register
class PreArrivalNoticeDeliveryFailed(Event):
    trip_id: str
    notice_id: str
    url: str
    attempt: int
    attempts: int
    error: str


@registry.register
class PreArrivalNoticeAcknowledged(Event):
    trip_id: str
    notice_id: str
    facility_id: str
    acknowledged_by: str
    acknowledged_at: str


@registry.register
class PreArrivalNoticeResent(Event):
    """Not acknowledged within the configured time: sent again (attempt 2, 3, ...)."""

    trip_id: str
    notice_id: str
    attempt: int
    resent_at: str


@registry.register
class PreArrivalNoticeEscalated(Event):
    """Still not acknowledged after the resends: the dispatcher must call the hospital."""

    trip_id: str
    transfer_id: str
    notice_id: str
    facility_id: str
    escalated_to: str
    reason: str
    escalated_at: str


@registry.register
class TripPositionRecorded(Event):
    """A thinned point of the track (moved 200 m or a minute passed), with the ETA from it."""

    trip_id: str
    location: Location
    at: str
    eta_minutes: float | None = None
    eta_at: str | None = None
