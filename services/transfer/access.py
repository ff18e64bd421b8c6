"""Who may call which trip route, and what a bound role may touch. The only place."""

from __future__ import annotations

from fastapi import Request

from libs.auth.policy import Policy, Rules, bound, roles
from libs.auth.tokens import Principal
from libs.events.aggregate import UnitOfWork
from services.transfer.domain import Trip

DISPATCH = ("dispatcher", "supervisor")


def sees(principal: Principal, trip: Trip) -> bool:
    if principal.role == "crew":
        return trip.vehicle_id == principal.vehicle_id
    if principal.role == "hospital":
        return trip.destination_id == principal.facility_id
    return True


async def _trip_in_scope(principal: Principal, request: Request) -> bool:
    store = request.app.state.stores["transfer"]
    trip = await UnitOfWork.reading(store).get(Trip, request.path_params["trip_id"])
    return trip is None or sees(principal, trip)  # none: the route answers 404


async def _own_vehicle_listed(principal: Principal, request: Request) -> bool:
    return request.query_params.get("vehicle_id") == principal.vehicle_id


CREW = bound("crew", _trip_in_scope, "the trips of its own vehicle")
RECEIVING = bound("hospital", _trip_in_scope, "trips bound for its facility")

RULES: Rules = {
    "GET /trips": (*roles(*DISPATCH, "health_bureau"),
                   bound("crew", _own_vehicle_listed, "its own vehicle (?vehicle_id=)")),
    "GET /trips/{trip_id}": (*roles(*DISPATCH, "health_bureau"), CREW, RECEIVING),
    "POST /trips/{trip_id}/steps": (CREW,),
    "POST /trips/{trip_id}/positions": (CREW,),
    "POST /trips/{trip_id}/abort": (CREW,),
    # Either side of the handover may record it (R8); the hospital's own system often does.
    "POST /trips/{trip_id}/handover": (CREW, RECEIVING),
    "POST /trips/{trip_id}/return-request": (RECEIVING,),
    "POST /trips/{trip_id}/admission": (RECEIVING,),
    "POST /trips/{trip_id}/pre-arrival-notice/ack": (RECEIVING,),
}

POLICY = Policy("transfer", RULES)
