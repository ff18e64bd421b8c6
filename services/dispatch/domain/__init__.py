"""Dispatch's domain, pure (no I/O): a rule lives in one module.

- triage.py: R4, who goes first, and the patient's routing class
- routing.py: R6 and R7, facilities, eligibility, nearest first, overflow to backups
- fleet.py: vehicles, R1, R2, R3, R5, what may carry whom, and overrides
- transfer.py: the transfer aggregate, 报备 (R10)
- care.py: recurring care series
"""

from services.dispatch.domain.care import CareSeries, occurrence_transfer_id
from services.dispatch.domain.fleet import (
    FreeFleet,
    Unmet,
    Vehicle,
    VehicleNeeds,
    rank_vehicles,
    vehicle_needs,
)
from services.dispatch.domain.routing import (
    Facility,
    Routing,
    StraightLineEta,
    choose_destination,
    distance_km,
    eligible_facilities,
)
from services.dispatch.domain.transfer import LIVE, Transfer, patient_key
from services.dispatch.domain.triage import WaitingQueue, patient_class, triage

__all__ = [
    "LIVE", "CareSeries", "Facility", "FreeFleet", "Routing", "StraightLineEta", "Transfer", "Unmet",
    "Vehicle", "VehicleNeeds", "WaitingQueue", "choose_destination", "distance_km", "eligible_facilities",
    "occurrence_transfer_id", "patient_class", "patient_key", "rank_vehicles", "triage",
    "vehicle_needs",
]
