"""The transfer from dispatch's side: requested, prioritised (R4), routed (R6, R7),
assigned (R1-R3, R5, overrides), reported (R10), picked up, handed over, or cancelled."""

from __future__ import annotations

from typing import Any

from libs.events.aggregate import Aggregate, RuleRefused, StateConflict
from libs.events.catalog import dispatch as ev
from libs.events.catalog.common import Location
from services.dispatch.domain.fleet import Unmet, Vehicle
from services.dispatch.domain.routing import Facility, Routing
from services.dispatch.domain.triage import triage

LIVE = ("requested", "queued", "assigned", "picked_up")


def patient_key(patient: dict[str, Any]) -> str | None:
    """Who the patient is, for one live transfer per person: the resident id number, else
    name and phone."""
    if patient.get("id_number"):
        return f"id:{patient['id_number']}"
    if patient.get("phone"):
        return f"phone:{patient.get('name', '')}:{patient['phone']}"
    return None


class Transfer(Aggregate):
    stream_prefix = "transfer"

    status: str = "requested"
    patient: dict[str, Any] = {}
    risk_category: str = ""
    condition: dict[str, Any] = {}
    origin: dict[str, Any] = {}
    purpose: str = ""
    return_required: bool = False
    requested_by: dict[str, Any] = {}
    requested_at: str = ""
    destination_wish: str | None = None
    series_id: str | None = None
    return_of: str | None = None
    takeover_of: str | None = None
    priority: int = 3
    priority_reason: str = ""
    destination_id: str | None = None
    vehicle_id: str | None = None
    trip_id: str | None = None
    reported: bool = False
    report_delivery: str | None = None
    overrides: list[dict[str, str]] = []
    status_reason: str | None = None

    def ref_value(self) -> str | None:
        return patient_key(self.patient)

    @classmethod
    def request(cls, event: ev.TransferRequested, requested_at: str) -> Transfer:
        t = cls(id=event.transfer_id, requested_at=requested_at)
        t.record(event)
        priority, why = triage(event.risk_category, event.condition, event.purpose)
        t.record(ev.TransferPrioritized(transfer_id=t.id, priority=priority, reason=why))
        return t

    def _on_TransferRequested(self, e: ev.TransferRequested) -> None:
        self.patient, self.risk_category, self.condition = e.patient, e.risk_category, e.condition
        self.origin, self.purpose, self.return_required = e.origin, e.purpose, e.return_required
        self.requested_by, self.destination_wish = e.requested_by, e.destination_wish
        self.series_id, self.return_of = e.series_id, e.return_of

    @property
    def origin_location(self) -> Location:
        return Location.model_validate(self.origin["location"])

    @property
    def critical(self) -> bool:
        return bool(self.condition.get("critical"))

    @property
    def live(self) -> bool:
        return self.status in LIVE

    def _on_TransferPrioritized(self, e: ev.TransferPrioritized) -> None:
        self.priority, self.priority_reason = e.priority, e.reason

    def reprioritize(self, priority: int, reason: str) -> None:
        self._must_be_live("reprioritise")
        self.record(ev.TransferReprioritized(transfer_id=self.id, priority=priority,
                                             previous=self.priority, reason=reason))

    def _on_TransferReprioritized(self, e: ev.TransferReprioritized) -> None:
        self.priority, self.priority_reason = e.priority, f"set by the dispatcher: {e.reason}"

    def route(self, routing: Routing) -> None:
        if routing.facility is None:
            self.record(ev.DestinationUnresolved(transfer_id=self.id, reason=routing.reason,
                                                 candidates=routing.candidates))
            return
        self.record(ev.DestinationAssigned(transfer_id=self.id, facility_id=routing.facility.id,
                                           reason=routing.reason, candidates=routing.candidates))

    def _on_DestinationAssigned(self, e: ev.DestinationAssigned) -> None:
        self.destination_id = e.facility_id

    def _on_DestinationUnresolved(self, e: ev.DestinationUnresolved) -> None:
        self.status_reason = f"destination unresolved: {e.reason}"

    def assign(self, vehicle: Vehicle, unmet: list[Unmet], reason: str,
               candidates: list[dict[str, Any]], *, manual: bool = False,
               override_reason: str | None = None, role: str = "dispatcher") -> None:
        """Assign a vehicle. A soft rule the vehicle does not meet (R3, R5, life support), or
        R2 by a supervisor, may be overridden with a reason; the override is an event. R1 never."""
        if self.status not in ("requested", "queued"):
            raise StateConflict("transfer_not_assignable", f"transfer {self.id} is {self.status}",
                                f"转运单{self.id}当前状态为{self.status}，不能派车", status=self.status)
        if unmet and not override_reason:
            first = unmet[0]
            raise RuleRefused(first.rule, first.code, first.detail + "; an override needs a reason",
                              first.message_zh + "；如需强制派车，请填写理由",
                              unmet=[u.rule for u in unmet], vehicle_id=vehicle.id)
        overrides = {u.rule for u in unmet}
        if vehicle.status == "awaiting_disinfection" and override_reason and role == "supervisor":
            overrides.add("R2")
        vehicle.reserve(self.id, frozenset(overrides))
        for rule in sorted(overrides):
            detail = next((u.detail for u in unmet if u.rule == rule),
                          f"vehicle {vehicle.id} assigned before its disinfection released it")
            self.record(ev.RuleOverridden(rule=rule, transfer_id=self.id, vehicle_id=vehicle.id,
                                          reason=override_reason or "", detail=detail))
        self.record(ev.VehicleAssigned(
            transfer_id=self.id, vehicle_id=vehicle.id, destination_id=self.destination_id,
            origin=self.origin, return_required=self.return_required, manual=manual,
            override_reason=override_reason if overrides else None, reason=reason,
            candidates=candidates, return_of=self.return_of, takeover_of=self.takeover_of,
            risk_category=self.risk_category, condition=self.condition))

    def _on_RuleOverridden(self, e: ev.RuleOverridden) -> None:
        self.overrides = [*self.overrides, {"rule": e.rule, "reason": e.reason}]

    def _on_VehicleAssigned(self, e: ev.VehicleAssigned) -> None:
        self.status, self.vehicle_id = "assigned", e.vehicle_id

    def queue(self, reason: str) -> None:
        if self.status != "queued":
            self.record(ev.TransferQueued(transfer_id=self.id, reason=reason))

    def _on_TransferQueued(self, e: ev.TransferQueued) -> None:
        self.status, self.status_reason = "queued", e.reason

    def report(self) -> None:
        """报备 (R10): every risk transfer is reported; 120 files for direct calls."""
        if self.reported:
            return
        by = "120" if self.requested_by.get("channel") == "direct_call" else (
            self.requested_by.get("org") or "120")
        self.record(ev.TransferReported(transfer_id=self.id, reported_to="county_health_bureau",
                                        reported_by=by))

    def _on_TransferReported(self, e: ev.TransferReported) -> None:
        self.reported = True

    def report_delivered(self, url: str, attempts: int, status_code: int) -> None:
        self.record(ev.ReportDelivered(transfer_id=self.id, url=url, attempts=attempts,
                                       status_code=status_code))

    def report_failed(self, url: str, attempts: int, error: str) -> None:
        self.record(ev.ReportDeliveryFailed(transfer_id=self.id, url=url, attempts=attempts, error=error))

    def _on_ReportDelivered(self, e: ev.ReportDelivered) -> None:
        self.report_delivery = "delivered"

    def _on_ReportDeliveryFailed(self, e: ev.ReportDeliveryFailed) -> None:
        self.report_delivery = "failed"

    def withdraw_vehicle(self, reason: str) -> str | None:
        """The vehicle cannot go on: the transfer goes back to be reassigned. Before pickup
        another vehicle starts afresh; after pickup it takes the patient over (both vehicles
        then need disinfection: the transfer service completes the first one's trip)."""
        if self.status not in ("assigned", "picked_up") or self.vehicle_id is None:
            return None
        vehicle_id = self.vehicle_id
        self.record(ev.VehicleWithdrawn(transfer_id=self.id, vehicle_id=vehicle_id, reason=reason,
                                        patient_aboard=self.status == "picked_up"))
        return vehicle_id

    def _on_VehicleWithdrawn(self, e: ev.VehicleWithdrawn) -> None:
        self.status, self.vehicle_id, self.status_reason = "requested", None, e.reason
        if e.patient_aboard:
            self.takeover_of = e.vehicle_id

    def route_to_origin(self, destination_id: str, outbound_id: str) -> None:
        """A return leg (R11) goes back where the outbound leg started: no choosing (R6)."""
        self.record(ev.DestinationAssigned(
            transfer_id=self.id, facility_id=destination_id, candidates=[],
            reason=f"return leg of {outbound_id}: back to its origin 返程回原出发地 (R11)"))

    def picked_up(self, trip_id: str, vehicle_id: str) -> None:
        if self.status == "assigned" and self.vehicle_id == vehicle_id:
            self.record(ev.TransferPickedUp(transfer_id=self.id, trip_id=trip_id, vehicle_id=vehicle_id))

    def _on_TransferPickedUp(self, e: ev.TransferPickedUp) -> None:
        self.status, self.trip_id = "picked_up", e.trip_id

    def redirect(self, facility: Facility, reason: str, candidates: list[dict[str, Any]],
                 condition: dict[str, Any] | None = None) -> None:
        self._must_be_live("redirect")
        if facility.id == self.destination_id:
            raise StateConflict("same_destination", f"transfer {self.id} already goes to {facility.id}",
                                f"转运单已前往{facility.id}")
        self.record(ev.TransferRedirected(transfer_id=self.id, from_facility_id=self.destination_id,
                                          to_facility_id=facility.id, reason=reason,
                                          candidates=candidates, condition=condition))
        if condition is not None:
            priority, why = triage(self.risk_category, condition, self.purpose)
            if priority < self.priority:
                self.record(ev.TransferReprioritized(transfer_id=self.id, priority=priority,
                                                     previous=self.priority, reason=f"worsened: {why}"))

    def _on_TransferRedirected(self, e: ev.TransferRedirected) -> None:
        self.destination_id = e.to_facility_id
        if e.condition is not None:
            self.condition = e.condition

    def cancel(self, reason: str) -> str | None:
        """Cancel before pickup; returns the vehicle to stand down, if any. After pickup the
        crew aborts the trip instead (the patient is aboard)."""
        if self.status == "picked_up":
            raise StateConflict("patient_aboard", "the patient is aboard: the crew aborts or hands over",
                                "患者已上车，不能撤单，请由车组中止或交接")
        self._must_be_live("cancel")
        vehicle_id = self.vehicle_id if self.status == "assigned" else None
        self.record(ev.TransferCancelled(transfer_id=self.id, reason=reason))
        return vehicle_id

    def _on_TransferCancelled(self, e: ev.TransferCancelled) -> None:
        self.status, self.status_reason = "cancelled", e.reason

    def handed_over(self, trip_id: str, facility_id: str) -> None:
        if self.status != "handed_over":
            self.record(ev.TransferHandedOver(transfer_id=self.id, trip_id=trip_id,
                                              facility_id=facility_id))

    def _on_TransferHandedOver(self, e: ev.TransferHandedOver) -> None:
        self.status = "handed_over"

    def _must_be_live(self, what: str) -> None:
        if not self.live:
            raise StateConflict("transfer_closed", f"cannot {what}: transfer {self.id} is {self.status}",
                                f"转运单{self.id}已{self.status}，不能操作", status=self.status)
