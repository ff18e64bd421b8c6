"""R9's exposure list: which transfers rode in a vehicle whose surface swab came back
positive. Pure: no I/O.

The vehicle's history orders its cycles as they opened; each trip cycle's swab tests the
vehicle after that trip's disinfection. A positive swab in cycle i exposes the trips of
every cycle after the last negative one before i (those carried since the last negative
swab, and the swabbed trip itself), and of every cycle after i up to and including the first
one whose swab was negative again: that trip rode before the vehicle was shown clean."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from libs.events.aggregate import Aggregate
from libs.events.catalog import disinfection as ev
from services.disinfection.domain import REDISINFECTION, TRIP, Cycle

BEFORE_SWAB = "before_swab"
SWABBED_TRIP = "swabbed_trip"
AFTER_SWAB = "after_swab"
DURING_QUARANTINE = "during_quarantine"


class VehicleHistory(Aggregate):
    """The vehicle's cycles in the order they opened (stream history-<vehicle>)."""

    stream_prefix = "history"

    cycle_ids: list[str] = []
    redisinfection_cycle_id: str | None = None

    def log_cycle(self, cycle: Cycle) -> None:
        if cycle.id in self.cycle_ids:
            return
        self.record(ev.VehicleCycleLogged(vehicle_id=self.id, cycle_id=cycle.id, kind=cycle.kind,
                                          trip_id=cycle.trip_id, transfer_id=cycle.transfer_id))

    def _on_VehicleCycleLogged(self, e: ev.VehicleCycleLogged) -> None:
        self.cycle_ids = [*self.cycle_ids, e.cycle_id]
        if e.kind == REDISINFECTION:
            self.redisinfection_cycle_id = e.cycle_id


@dataclass(frozen=True)
class Window:
    transfers: list[ev.ExposedTransfer]
    last_negative_sample_id: str | None
    bounded_by_sample_id: str | None


def exposed_transfer(cycle: Cycle, relation: str,
                     patients: Mapping[str, dict[str, Any]]) -> ev.ExposedTransfer:
    patient = patients.get(cycle.transfer_id)
    return ev.ExposedTransfer(
        transfer_id=cycle.transfer_id, trip_id=cycle.trip_id, cycle_id=cycle.id, relation=relation,
        completed_at=cycle.opened_at,
        patient=ev.ExposedPatient.model_validate(patient) if patient else None)


def exposure_window(ordered: Sequence[Cycle], positive_cycle_id: str,
                    patients: Mapping[str, dict[str, Any]]) -> Window:
    """The trips exposed by the positive swab of `positive_cycle_id`, from the vehicle's
    cycles in order (the ones outside the window may be left out)."""
    at = next(i for i, c in enumerate(ordered) if c.id == positive_cycle_id)
    first = 0
    last_negative: str | None = None
    for i in range(at - 1, -1, -1):
        last_negative = ordered[i].negative_sample_id
        if last_negative is not None:
            first = i + 1
            break
    last = len(ordered) - 1
    bounded_by: str | None = None
    for i in range(at + 1, len(ordered)):
        bounded_by = ordered[i].negative_sample_id
        if bounded_by is not None:
            last = i
            break
    transfers = [
        exposed_transfer(c, BEFORE_SWAB if i < at else SWABBED_TRIP if i == at else AFTER_SWAB, patients)
        for i, c in enumerate(ordered[first:last + 1], start=first) if c.kind == TRIP
    ]
    return Window(transfers, last_negative, bounded_by)


class Exposure(Aggregate):
    """One positive swab's exposure list (stream exposure-<sample id>): the dispatcher's
    alert, open until acknowledged."""

    stream_prefix = "exposure"

    vehicle_id: str = ""
    sample_id: str = ""
    cycle_id: str = ""
    transfer_id: str = ""
    last_negative_sample_id: str | None = None
    bounded_by_sample_id: str | None = None
    transfers: list[dict[str, Any]] = []
    status: str = "unacknowledged"
    acknowledgements: list[dict[str, Any]] = []

    def ref_value(self) -> str | None:
        return self.vehicle_id

    @classmethod
    def produce(cls, positive: Cycle, sample_id: str, window: Window) -> Exposure:
        exposure = cls(id=sample_id)
        exposure.record(ev.ExposureListProduced(
            vehicle_id=positive.vehicle_id, sample_id=sample_id, cycle_id=positive.id,
            transfer_id=positive.transfer_id, last_negative_sample_id=window.last_negative_sample_id,
            bounded_by_sample_id=window.bounded_by_sample_id, transfers=window.transfers))
        return exposure

    def _on_ExposureListProduced(self, e: ev.ExposureListProduced) -> None:
        self.vehicle_id, self.sample_id, self.cycle_id = e.vehicle_id, e.sample_id, e.cycle_id
        self.transfer_id = e.transfer_id
        self.last_negative_sample_id = e.last_negative_sample_id
        self.bounded_by_sample_id = e.bounded_by_sample_id
        self.transfers = [t.model_dump() for t in e.transfers]

    def amend(self, trip: Cycle, patients: Mapping[str, dict[str, Any]]) -> None:
        if any(t["trip_id"] == trip.trip_id for t in self.transfers):
            return
        self.record(ev.ExposureListAmended(
            vehicle_id=self.vehicle_id, sample_id=self.sample_id,
            transfer=exposed_transfer(trip, DURING_QUARANTINE, patients)))

    def _on_ExposureListAmended(self, e: ev.ExposureListAmended) -> None:
        self.transfers = [*self.transfers, e.transfer.model_dump()]
        self.status = "unacknowledged"

    def acknowledge(self, by: str, note: str | None) -> bool:
        """False when nothing is waiting to be acknowledged (a repeated click)."""
        if self.status == "acknowledged":
            return False
        self.record(ev.ExposureListAcknowledged(vehicle_id=self.vehicle_id, sample_id=self.sample_id,
                                                acknowledged_by=by, note=note))
        return True

    def _on_ExposureListAcknowledged(self, e: ev.ExposureListAcknowledged) -> None:
        self.status = "acknowledged"
        self.acknowledgements = [*self.acknowledgements,
                                 {"acknowledged_by": e.acknowledged_by, "note": e.note}]
