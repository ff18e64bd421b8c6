"""Who may call which disinfection route. The only place."""

from __future__ import annotations

from fastapi import Request

from libs.auth.policy import Policy, Rules, bound, roles
from libs.auth.tokens import Principal

WASH = ("disinfection", "supervisor")
ALERTED = ("dispatcher", "supervisor")


async def _own_vehicle_listed(principal: Principal, request: Request) -> bool:
    return request.query_params.get("vehicle_id") == principal.vehicle_id


RULES: Rules = {
    "GET /disinfection/cycles": (
        *roles(*WASH, "dispatcher", "health_bureau"),
        bound("crew", _own_vehicle_listed, "its own vehicle (?vehicle_id=)")),
    "GET /disinfection/cycles/{cycle_id}": roles(*WASH, "dispatcher", "health_bureau", "lab"),
    "POST /disinfection/cycles/{cycle_id}/stages": roles("disinfection"),
    "POST /disinfection/cycles/{cycle_id}/swabs": roles("disinfection"),
    "POST /disinfection/swabs/{sample_id}/result": roles("lab"),
    # R2's early release: the domain also insists on the supervisor and on the reason.
    "POST /disinfection/cycles/{cycle_id}/release": roles("supervisor"),
    "GET /disinfection/exposures": roles(*ALERTED, "disinfection", "health_bureau"),
    "GET /disinfection/exposures/{sample_id}": roles(*ALERTED, "disinfection", "health_bureau"),
    "POST /disinfection/exposures/{sample_id}/acknowledge": roles(*ALERTED),
    "GET /disinfection/protocols": roles("dispatcher", "supervisor", "disinfection", "lab",
                                         "crew", "health_bureau", "auditor", "admin"),
}

POLICY = Policy("disinfection", RULES)
