"""The trip: from the vehicle's assignment to the handover, told by crew phones that
resend and arrive late, and by hospital systems. Pure: no I/O."""

from __future__ import annotations

import math
import uuid
from datetime import datetime, timedelta
from typing import Any

from libs.events.aggregate import Aggregate, StateConflict
from libs.events.catalog import transfer as ev
from libs.events.catalog.common import Location
from libs.events.envelope import iso

STEPS = ("acknowledged", "en_route", "at_pickup", "patient_aboard", "at_destination", "handed_over")
NEEDS_PATIENT_ABOARD = ("at_destination", "handed_over")


ABORT_CODES = ("patient_absent", "patient_refused", "other")
DISPATCH_ACTIONS = ("cancel", "requeue")
RETURN_DESTINATION = "origin"  # a return leg's destination: the outbound transfer's origin


def distance_km(a: Location, b: Location) -> float:
    """Great-circle distance."""
    p1, p2 = math.radians(a.lat), math.radians(b.lat)
    dp, dl = p2 - p1, math.radians(b.lon - a.lon)
    h = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * 6371.0 * math.asin(math.sqrt(h))


def eta_minutes(here: Location, there: Location, road_factor: float, speed_kmh: float) -> float:
    """Straight line times a road factor, at an average speed: what the crews' maps are not."""
    return round(distance_km(here, there) * road_factor / speed_kmh * 60, 1)


def notice_id_for(trip_id: str, facility_id: str) -> str:
    """One notice per trip and receiving hospital: a redirect makes a second."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"notice:{trip_id}:{facility_id}"))


class Destination(Aggregate):
    """What the transfer service knows of a facility (from dispatch's FacilityRegistered)."""

    stream_prefix = "destination"

    name: str = ""
    location: Location | None = None

    def _on_DestinationKnown(self, e: ev.DestinationKnown) -> None:
        self.name, self.location = e.name, e.location


def trip_id_for(transfer_id: str, vehicle_id: str) -> str:
    """Deterministic, so a redelivered VehicleAssigned opens the same trip, not a second."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"trip:{transfer_id}:{vehicle_id}"))


def reassigned_trip_id_for(transfer_id: str, vehicle_id: str, assignment_event_id: str) -> str:
    """The same vehicle assigned to the same transfer again (after an abort): a new trip,
    still deterministic per assignment."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"trip:{transfer_id}:{vehicle_id}:{assignment_event_id}"))


def return_transfer_id_for(transfer_id: str) -> str:
    """Deterministic, so a resent return request (or a redelivered event) makes one leg."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"return:{transfer_id}"))


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
    return_of: str | None = None
    takeover_of: str | None = None
    loop: str | None = None  # R11 on an outbound leg: return_requested, closed
    loop_how: str | None = None
    return_transfer_id: str | None = None
    abort_reason: str | None = None
    assignment_event_id: str | None = None
    risk_category: str = ""
    condition: dict[str, Any] = {}
    notice: dict[str, Any] | None = None  # the current pre-arrival notice and its state
    position: dict[str, Any] | None = None  # the last recorded point, with its ETA
    track: list[dict[str, Any]] = []

    def ref_value(self) -> str | None:
        return self.vehicle_id

    @classmethod
    def open(cls, transfer_id: str, vehicle_id: str, destination_id: str | None,
             origin: dict[str, Any], return_required: bool, return_of: str | None = None,
             takeover_of: str | None = None, assignment_event_id: str | None = None,
             trip_id: str | None = None, risk_category: str = "",
             condition: dict[str, Any] | None = None) -> Trip:
        trip = cls(id=trip_id or trip_id_for(transfer_id, vehicle_id))
        trip.record(ev.TripOpened(
            trip_id=trip.id, transfer_id=transfer_id, vehicle_id=vehicle_id,
            destination_id=destination_id, origin=origin, return_required=return_required,
            return_of=return_of, takeover_of=takeover_of, assignment_event_id=assignment_event_id,
            risk_category=risk_category, condition=condition or {},
        ))
        return trip

    def _on_TripOpened(self, e: ev.TripOpened) -> None:
        self.transfer_id, self.vehicle_id, self.destination_id = e.transfer_id, e.vehicle_id, e.destination_id
        self.origin, self.return_required = e.origin, e.return_required
        self.return_of, self.takeover_of = e.return_of, e.takeover_of
        self.assignment_event_id = e.assignment_event_id
        self.risk_category, self.condition = e.risk_category, e.condition

    def _reached(self, step: str) -> bool:
        return self.last_step is not None and STEPS.index(self.last_step) >= STEPS.index(step)

    def report_step(self, step: str, client_event_id: str, device_at: datetime,
                    position: Location | None = None, received_by: str | None = None,
                    received_at: datetime | None = None) -> bool:
        """Apply a crew step once. False when this client event id was applied before.

        Phones resend and the network reorders, so a step that arrives after a later one
        (en_route after at_pickup) is accepted as late history: it is recorded in its place
        in the sequence and does not move the trip back. Order comes from the sequence of
        steps, never from the device clock, whose skew against the server is kept and shown.
        Refused (409): a step reported twice under different ids, a step that needs the
        patient aboard before they are, progress on a closed trip."""
        if client_event_id in self.client_event_ids:
            return False
        if self.status == "aborted":
            raise StateConflict("trip_closed", f"trip {self.id} is closed", f"行程{self.id}已结束",
                                trip_id=self.id)
        if any(s["step"] == step for s in self.steps):
            raise StateConflict(
                "step_out_of_order", f"step {step} was already reported",
                f"步骤“{step}”已上报过", trip_id=self.id, last_step=self.last_step)
        late = self.last_step is not None and STEPS.index(step) < STEPS.index(self.last_step)
        home = self.status == "completed" and self.handed_over_to is not None
        if self.status != "open" and not late and not (home and step == "handed_over"):
            raise StateConflict("trip_closed", f"trip {self.id} is closed", f"行程{self.id}已结束",
                                trip_id=self.id)
        if step in NEEDS_PATIENT_ABOARD and not self._reached("patient_aboard"):
            raise StateConflict(
                "patient_not_aboard", f"step {step} needs the patient aboard first",
                f"患者尚未上车，不能上报“{step}”", trip_id=self.id, last_step=self.last_step,
            )
        skew = (device_at - received_at).total_seconds() if received_at is not None else None
        self.record(
            ev.TripStepReported(trip_id=self.id, step=step, client_event_id=client_event_id,
                                device_at=iso(device_at), position=position,
                                transfer_id=self.transfer_id, vehicle_id=self.vehicle_id, late=late,
                                received_at=iso(received_at) if received_at else None,
                                clock_skew_s=skew),
            occurred_at=device_at,
        )
        if step == "handed_over" and self.status != "completed":
            self._hand_over(self.destination_id or "", received_by or "", "crew", device_at)
        return True

    def _on_TripStepReported(self, e: ev.TripStepReported) -> None:
        if not e.late:
            self.last_step = e.step
        self.client_event_ids = [*self.client_event_ids, e.client_event_id]
        entry = {"step": e.step, "device_at": e.device_at, "client_event_id": e.client_event_id,
                 "received_at": e.received_at, "clock_skew_s": e.clock_skew_s, "late": e.late}
        # kept in the order of the sequence, whatever order they arrived in
        self.steps = sorted([*self.steps, entry], key=lambda s: STEPS.index(s["step"]))

    def hand_over(self, facility_id: str, received_by: str, confirmed_by: str, at: datetime) -> None:
        if self.status == "aborted":
            raise StateConflict("trip_closed", f"trip {self.id} is closed", f"行程{self.id}已结束",
                                trip_id=self.id)
        if not self._reached("patient_aboard"):
            raise StateConflict("patient_not_aboard", "the patient is not aboard yet",
                                "患者尚未上车，不能交接", trip_id=self.id)
        if self.status == "open" and self.destination_id and facility_id != self.destination_id:
            raise StateConflict(
                "handover_facility_mismatch",
                f"trip {self.id} goes to {self.destination_id}, not {facility_id}: redirect it first",
                f"行程目的地为{self.destination_id}，不是{facility_id}，请先改派", trip_id=self.id,
                destination_id=self.destination_id)
        if self.status == "completed":
            if self.handed_over_to is None:
                raise StateConflict("trip_closed", f"trip {self.id} ended without a handover",
                                    f"行程{self.id}已结束，未交接", trip_id=self.id)
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

    def redirect(self, destination_id: str, reason: str,
                 condition: dict[str, Any] | None = None) -> None:
        if self.status == "open" and destination_id != self.destination_id:
            self.record(ev.TripRedirected(trip_id=self.id, transfer_id=self.transfer_id,
                                          destination_id=destination_id, reason=reason,
                                          condition=condition))

    def _on_TripRedirected(self, e: ev.TripRedirected) -> None:
        self.destination_id = e.destination_id
        if e.condition is not None:  # the patient worsened: the next notice says so
            self.condition = e.condition

    def abort(self, reason: str) -> None:
        """Dispatch took the vehicle off this trip (withdrawn, broken down, transfer cancelled).
        A vehicle that had the patient aboard carried them, so it needs disinfection: its trip
        completes (a second vehicle takes the patient over) rather than aborts."""
        if self.status != "open":
            return
        if self._reached("patient_aboard"):
            self.record(ev.TripCompleted(trip_id=self.id, transfer_id=self.transfer_id,
                                         vehicle_id=self.vehicle_id, reason=reason))
            return
        self.record(ev.TripAborted(trip_id=self.id, transfer_id=self.transfer_id,
                                   vehicle_id=self.vehicle_id, reason=reason))

    def abort_by_crew(self, code: str, reason: str, dispatch_action: str, at: datetime) -> None:
        """The crew ends the trip before pickup: the patient is not there or refuses. Dispatch
        is asked to cancel the transfer or to put it back in the queue."""
        if self.status != "open":
            raise StateConflict("trip_closed", f"trip {self.id} is closed", f"行程{self.id}已结束",
                                trip_id=self.id)
        if self._reached("patient_aboard"):
            raise StateConflict(
                "patient_aboard", "the patient is aboard: hand over, or report a breakdown for a takeover",
                "患者已上车，不能中止，请交接或报告车辆故障由他车接转", trip_id=self.id)
        self.record(ev.TripAborted(trip_id=self.id, transfer_id=self.transfer_id,
                                   vehicle_id=self.vehicle_id, reason=reason, code=code,
                                   dispatch_action=dispatch_action, aborted_by="crew"),
                    occurred_at=at)

    def _on_TripAborted(self, e: ev.TripAborted) -> None:
        self.status, self.abort_reason = "aborted", e.reason

    # -- R11: the return leg, or the admission that closes the loop instead ------------------

    def _must_be_handed_over_at(self, facility_id: str) -> None:
        if self.return_of is not None:
            raise StateConflict("return_leg", f"trip {self.id} is itself a return leg",
                                f"行程{self.id}本身是返程", trip_id=self.id)
        if self.status != "completed" or self.handed_over_to is None:
            raise StateConflict("not_handed_over", f"trip {self.id} has not handed the patient over",
                                f"行程{self.id}尚未完成交接", trip_id=self.id, status=self.status)
        if facility_id != self.handed_over_to:
            raise StateConflict(
                "handover_facility_mismatch", f"handed over to {self.handed_over_to}, not {facility_id}",
                f"患者已交接至{self.handed_over_to}，不是{facility_id}", trip_id=self.id)

    def request_return(self, facility_id: str, at: datetime) -> bool:
        """R11: the hospital asks for the way back. False when it was asked before (a resend)."""
        self._must_be_handed_over_at(facility_id)
        if self.return_transfer_id is not None:
            return False  # asked before (the leg may even be home by now): a resend
        if self.loop == "closed":
            raise StateConflict("loop_closed", f"the loop of transfer {self.transfer_id} is closed "
                                f"({self.loop_how})", f"闭环已结束（{self.loop_how}）", trip_id=self.id)
        self.record(ev.ReturnRequested(
            trip_id=self.id, transfer_id=self.transfer_id, facility_id=facility_id,
            return_transfer_id=return_transfer_id_for(self.transfer_id), origin=self.origin,
            requested_at=iso(at)), occurred_at=at)
        return True

    def _on_ReturnRequested(self, e: ev.ReturnRequested) -> None:
        self.loop, self.return_transfer_id = "return_requested", e.return_transfer_id

    def admit(self, facility_id: str, at: datetime) -> bool:
        """R11: admitted instead of going back, the loop closes here. False when resent."""
        self._must_be_handed_over_at(facility_id)
        if self.loop == "closed" and self.loop_how == "admitted":
            return False
        if self.loop is not None:
            raise StateConflict(
                "return_already_requested", "the return leg was requested: cancel it first",
                "已申请返程，不能改为收治，请先撤销返程转运单", trip_id=self.id,
                return_transfer_id=self.return_transfer_id)
        self.record(ev.PatientAdmitted(trip_id=self.id, transfer_id=self.transfer_id,
                                       facility_id=facility_id, admitted_at=iso(at)), occurred_at=at)
        self.record(ev.LoopClosed(transfer_id=self.transfer_id, how="admitted", trip_id=self.id),
                    occurred_at=at)
        return True

    def _on_PatientAdmitted(self, e: ev.PatientAdmitted) -> None:
        pass  # the state follows from the LoopClosed that comes with it

    def _on_LoopClosed(self, e: ev.LoopClosed) -> None:
        self.loop, self.loop_how = "closed", e.how

    def return_leg_home(self, return_trip_id: str, at: datetime) -> None:
        """The return leg handed over at the origin (in the same commit): the loop closes on
        this, the outbound trip's stream, so one stream answers "is the loop closed?"."""
        if self.loop == "return_requested":
            self.record(ev.LoopClosed(transfer_id=self.transfer_id, how="returned",
                                      trip_id=return_trip_id,
                                      return_transfer_id=self.return_transfer_id), occurred_at=at)

    # -- the receiving hospital's pre-arrival notice ----------------------------------------

    def issue_notice(self, eta: float | None, now: datetime) -> bool:
        """When the patient is aboard (or the trip is redirected after), the hospital it goes
        to is told: ETA, category, condition. Once per hospital; not for a return leg, whose
        destination is the origin, not a hospital."""
        if self.return_of is not None or not self.destination_id or self.status != "open":
            return False
        notice_id = notice_id_for(self.id, self.destination_id)
        if self.notice is not None and self.notice["notice_id"] == notice_id:
            return False
        self.record(ev.PreArrivalNoticeIssued(
            trip_id=self.id, transfer_id=self.transfer_id, notice_id=notice_id,
            facility_id=self.destination_id, vehicle_id=self.vehicle_id,
            risk_category=self.risk_category, condition=self.condition, eta_minutes=eta,
            eta_at=iso(now + timedelta(minutes=eta)) if eta is not None else None,
            issued_at=iso(now)))
        return True

    def _on_PreArrivalNoticeIssued(self, e: ev.PreArrivalNoticeIssued) -> None:
        self.notice = {"notice_id": e.notice_id, "facility_id": e.facility_id, "status": "issued",
                       "eta_minutes": e.eta_minutes, "eta_at": e.eta_at, "issued_at": e.issued_at,
                       "last_sent_at": e.issued_at, "sendings": 1, "delivery": None,
                       "acknowledged_by": None, "acknowledged_at": None}

    def _notice(self, notice_id: str) -> dict[str, Any] | None:
        return self.notice if self.notice and self.notice["notice_id"] == notice_id else None

    def notice_delivered(self, notice_id: str, url: str, attempt: int, attempts: int,
                         status_code: int) -> None:
        self.record(ev.PreArrivalNoticeDelivered(trip_id=self.id, notice_id=notice_id, url=url,
                                                 attempt=attempt, attempts=attempts,
                                                 status_code=status_code))

    def _on_PreArrivalNoticeDelivered(self, e: ev.PreArrivalNoticeDelivered) -> None:
        if (n := self._notice(e.notice_id)) is not None:
            self.notice = {**n, "delivery": "delivered"}

    def notice_failed(self, notice_id: str, url: str, attempt: int, attempts: int, error: str) -> None:
        self.record(ev.PreArrivalNoticeDeliveryFailed(trip_id=self.id, notice_id=notice_id, url=url,
                                                      attempt=attempt, attempts=attempts, error=error))

    def _on_PreArrivalNoticeDeliveryFailed(self, e: ev.PreArrivalNoticeDeliveryFailed) -> None:
        if (n := self._notice(e.notice_id)) is not None:
            self.notice = {**n, "delivery": "failed"}

    def acknowledge_notice(self, notice_id: str | None, by: str, at: datetime) -> bool:
        """The hospital acknowledges (its HIS, or a person). False when acknowledged before."""
        if self.notice is None or (notice_id is not None and notice_id != self.notice["notice_id"]):
            raise StateConflict("notice_unknown", f"trip {self.id} has no such pre-arrival notice",
                                "该行程没有这条到院前通知", trip_id=self.id,
                                notice_id=self.notice["notice_id"] if self.notice else None)
        if self.notice["status"] == "acknowledged":
            return False
        self.record(ev.PreArrivalNoticeAcknowledged(
            trip_id=self.id, notice_id=self.notice["notice_id"],
            facility_id=self.notice["facility_id"], acknowledged_by=by, acknowledged_at=iso(at)),
            occurred_at=at)
        return True

    def _on_PreArrivalNoticeAcknowledged(self, e: ev.PreArrivalNoticeAcknowledged) -> None:
        if (n := self._notice(e.notice_id)) is not None:
            self.notice = {**n, "status": "acknowledged", "acknowledged_by": e.acknowledged_by,
                           "acknowledged_at": e.acknowledged_at}

    def notice_overdue(self, now: datetime, ack_timeout_s: float, max_resends: int) -> str | None:
        """Not acknowledged in time: resend, or after the resends escalate to the dispatcher.
        Nothing once acknowledged, escalated, or the patient handed over."""
        n = self.notice
        if n is None or n["status"] not in ("issued", "resent") or self.handed_over_to is not None:
            return None
        if now < datetime.fromisoformat(n["last_sent_at"]) + timedelta(seconds=ack_timeout_s):
            return None
        if n["sendings"] <= max_resends:
            self.record(ev.PreArrivalNoticeResent(trip_id=self.id, notice_id=n["notice_id"],
                                                  attempt=n["sendings"] + 1, resent_at=iso(now)))
            return "resent"
        self.record(ev.PreArrivalNoticeEscalated(
            trip_id=self.id, transfer_id=self.transfer_id, notice_id=n["notice_id"],
            facility_id=n["facility_id"], escalated_to="dispatcher",
            reason=f"not acknowledged after {n['sendings']} sendings, {ack_timeout_s:g} s each",
            escalated_at=iso(now)))
        return "escalated"

    def _on_PreArrivalNoticeResent(self, e: ev.PreArrivalNoticeResent) -> None:
        if (n := self._notice(e.notice_id)) is not None:
            self.notice = {**n, "status": "resent", "sendings": e.attempt, "last_sent_at": e.resent_at}

    def _on_PreArrivalNoticeEscalated(self, e: ev.PreArrivalNoticeEscalated) -> None:
        if (n := self._notice(e.notice_id)) is not None:
            self.notice = {**n, "status": "escalated", "escalated_at": e.escalated_at}

    # -- positions: the last one, a thinned track, and the ETA ------------------------------

    def report_position(self, location: Location, at: datetime, eta: float | None,
                        min_distance_m: float, min_interval_s: float) -> bool:
        """Recorded (an event) only when the vehicle moved far enough or long enough passed
        since the last point; an older position arriving late changes nothing."""
        if self.status != "open":
            raise StateConflict("trip_closed", f"trip {self.id} is closed", f"行程{self.id}已结束",
                                trip_id=self.id)
        last = self.position
        if last is not None:
            last_at = datetime.fromisoformat(last["at"])
            if at <= last_at:
                return False
            moved_m = distance_km(Location.model_validate(last["location"]), location) * 1000
            if moved_m < min_distance_m and (at - last_at).total_seconds() < min_interval_s:
                return False
        self.record(ev.TripPositionRecorded(
            trip_id=self.id, location=location, at=iso(at), eta_minutes=eta,
            eta_at=iso(at + timedelta(minutes=eta)) if eta is not None else None), occurred_at=at)
        return True

    def _on_TripPositionRecorded(self, e: ev.TripPositionRecorded) -> None:
        point = {"location": e.location.model_dump(), "at": e.at}
        self.position = {**point, "eta_minutes": e.eta_minutes, "eta_at": e.eta_at}
        self.track = [*self.track, point]
