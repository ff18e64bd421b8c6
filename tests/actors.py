"""Tokens for tests: each request of a scenario is sent by whoever would really send it.

`Acting` is an httpx auth: a request that carries no Authorization header gets the token of
the party that does this job (the admin registers vehicles, the crew of the trip's vehicle
reports its steps, the receiving hospital asks for the return leg, the lab posts results,
the auditor reads the audit views). A test that wants a particular caller sets the header
itself with `acting.headers(role, ...)`. The role x endpoint rules are tested on their own
(tests/e2e/test_access.py); this keeps the flows honest without restating them everywhere.
"""

from __future__ import annotations

import re
from collections.abc import AsyncGenerator
from functools import lru_cache
from typing import Any

import httpx

from libs.auth.issuer import LocalIssuer
from libs.auth.policy import Grant
from services.runtime import SERVICES
from services.settings import Settings

TRIP = re.compile(r"^/trips/([^/]+)/(steps|positions|abort|handover|return-request|admission"
                  r"|pre-arrival-notice/ack)$")
CREW_STEPS = ("steps", "positions", "abort", "handover")
BY_PATH: list[tuple[str, re.Pattern[str], str]] = [
    ("POST", re.compile(r"^/(vehicles|facilities)$"), "admin"),
    ("POST", re.compile(r"^/disinfection/swabs/[^/]+/result$"), "lab"),
    ("POST", re.compile(r"^/disinfection/cycles/[^/]+/release$"), "supervisor"),
    ("POST", re.compile(r"^/disinfection/cycles/[^/]+/(stages|swabs)$"), "disinfection"),
    ("POST", re.compile(r"^/audit/rebuild$"), "admin"),
    ("GET", re.compile(r"^/audit/rebuild$"), "admin"),
    ("GET", re.compile(r"^/audit/"), "auditor"),
]


class Acting(httpx.Auth):
    requires_response_body = True

    def __init__(self, issuer: LocalIssuer) -> None:
        self.issuer = issuer

    @classmethod
    def for_settings(cls, settings: Settings) -> Acting:
        return cls(settings.local_issuer())

    def token(self, role: str, subject: str | None = None, **scope: str) -> str:
        return _token(self.issuer, role, subject, tuple(sorted(scope.items())))

    def headers(self, role: str, subject: str | None = None, **scope: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(role, subject, **scope)}"}

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        if "Authorization" not in request.headers:
            path = request.url.path.removeprefix("/api/v1")
            role, scope = "dispatcher", {}
            trip = TRIP.match(path) if request.method == "POST" else None
            load = re.match(r"^/facilities/([^/]+)/load$", path)
            vehicle = re.match(r"^/vehicles/([^/]+)/position$", path)
            if trip:
                lookup = yield httpx.Request(
                    "GET", request.url.copy_with(path=f"/api/v1/trips/{trip[1]}", query=None),
                    headers=self.headers("dispatcher"))
                await lookup.aread()
                found: dict[str, Any] = lookup.json() if lookup.status_code == 200 else {}
                if trip[2] in CREW_STEPS:
                    role, scope = "crew", {"vehicle_id": found.get("vehicle_id") or "unknown"}
                else:
                    role, scope = "hospital", {"facility_id": found.get("destination_id") or "unknown"}
            elif load and request.method == "POST":
                role, scope = "hospital", {"facility_id": load[1]}
            elif vehicle and request.method == "POST":
                role, scope = "crew", {"vehicle_id": vehicle[1]}
            else:
                role = next((r for m, p, r in BY_PATH if m == request.method and p.match(path)), role)
            request.headers["Authorization"] = f"Bearer {self.token(role, None, **scope)}"
        yield request


def access_rules() -> dict[str, tuple[Grant, ...]]:
    """Every service's rules table, merged: "METHOD /path" -> the roles it grants."""
    merged: dict[str, tuple[Grant, ...]] = {}
    for spec in SERVICES.values():
        assert spec.policy is not None
        merged.update(spec.policy.rules)
    return merged


def as_(client: httpx.AsyncClient, role: str, subject: str | None = None,
        **scope: str) -> dict[str, str]:
    """Headers to send one request as a particular caller."""
    acting = client.auth
    assert isinstance(acting, Acting), "the client was not made with tests.actors.Acting"
    return acting.headers(role, subject, **scope)


@lru_cache(maxsize=4096)
def _token(issuer: LocalIssuer, role: str, subject: str | None,
           scope: tuple[tuple[str, str], ...]) -> str:
    bound = dict(scope)
    return issuer.issue(subject or "-".join(["test", role, *bound.values()]), role, **bound)
