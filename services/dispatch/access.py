"""Who may call which dispatch route, and what a bound role may touch. The only place."""

from __future__ import annotations

from fastapi import Request

from libs.auth.policy import Policy, Rules, Within, body_json, bound, roles
from libs.auth.tokens import Principal
from libs.events.aggregate import UnitOfWork
from services.dispatch.domain import Transfer

DISPATCH = ("dispatcher", "supervisor")
ANYONE = ("dispatcher", "supervisor", "crew", "disinfection", "lab", "hospital", "site",
          "health_bureau", "auditor", "admin")


def sees(principal: Principal, transfer: Transfer) -> bool:
    """A bound role sees a transfer it is part of: the crew its vehicle's, a hospital those
    from or to it, a site those of its own people."""
    origin = transfer.origin.get("facility_id")
    if principal.role == "crew":
        return transfer.vehicle_id == principal.vehicle_id
    if principal.role == "hospital":
        return principal.facility_id in (origin, transfer.destination_id)
    if principal.role == "site":
        return origin == principal.site_id
    return True


async def _transfer_in_scope(principal: Principal, request: Request) -> bool:
    store = request.app.state.stores["dispatch"]
    transfer = await UnitOfWork.reading(store).get(Transfer, request.path_params["transfer_id"])
    return transfer is None or sees(principal, transfer)  # none: the route answers 404


def _origin_is(claim: str) -> Within:
    async def check(principal: Principal, request: Request) -> bool:
        origin = (await body_json(request)).get("origin")
        return isinstance(origin, dict) and origin.get("facility_id") == getattr(principal, claim)
    return check


async def _own_vehicle(principal: Principal, request: Request) -> bool:
    return str(request.path_params["vehicle_id"]) == principal.vehicle_id


async def _own_facility(principal: Principal, request: Request) -> bool:
    return str(request.path_params["facility_id"]) == principal.facility_id


TRANSFER_READERS = (*roles(*DISPATCH, "health_bureau"),
                    bound("crew", _transfer_in_scope, "transfers its vehicle carries"),
                    bound("hospital", _transfer_in_scope, "transfers from or to its facility"),
                    bound("site", _transfer_in_scope, "transfers of its own people"))

RULES: Rules = {
    # Intake from every channel: the console, a site's grid worker, a hospital's HIS (R13).
    "POST /transfers": (*roles(*DISPATCH),
                        bound("hospital", _origin_is("facility_id"), "patients leaving its facility"),
                        bound("site", _origin_is("site_id"), "people at its own site")),
    # Bound roles get only the transfers they are part of: the route filters with `sees`.
    "GET /transfers": roles(*DISPATCH, "health_bureau", "crew", "hospital", "site"),
    "GET /transfers/{transfer_id}": TRANSFER_READERS,
    "POST /transfers/{transfer_id}/assign": roles(*DISPATCH),
    "POST /transfers/{transfer_id}/priority": roles(*DISPATCH),
    "POST /transfers/{transfer_id}/redirect": roles(*DISPATCH),
    "POST /transfers/{transfer_id}/cancel": (
        *roles(*DISPATCH), bound("site", _transfer_in_scope, "requests of its own people")),
    "GET /queue": roles(*DISPATCH, "health_bureau"),
    "POST /vehicles": roles("admin"),
    "GET /vehicles": roles(*DISPATCH, "admin", "health_bureau", "disinfection"),
    "GET /vehicles/{vehicle_id}": (*roles(*DISPATCH, "admin", "health_bureau", "disinfection"),
                                   bound("crew", _own_vehicle, "its own vehicle")),
    "POST /vehicles/{vehicle_id}/duty": (*roles(*DISPATCH),
                                         bound("crew", _own_vehicle, "its own vehicle")),
    "POST /vehicles/{vehicle_id}/out-of-service": (
        *roles(*DISPATCH), bound("crew", _own_vehicle, "its own vehicle")),
    "POST /vehicles/{vehicle_id}/position": (bound("crew", _own_vehicle, "its own vehicle"),),
    "POST /facilities": roles("admin"),
    "GET /facilities": roles(*ANYONE),  # reference data, nothing personal
    "POST /facilities/{facility_id}/load": (
        *roles(*DISPATCH), bound("hospital", _own_facility, "its own facility")),
    "POST /care-series": roles(*DISPATCH),
    "GET /care-series": roles(*DISPATCH),
    "POST /care-series/{series_id}/cancel": roles(*DISPATCH),
}

POLICY = Policy("dispatch", RULES)
