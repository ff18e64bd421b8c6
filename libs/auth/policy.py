"""Who may do what: one table per service, enforced by one guard on every route.

A rule names, for one route ("POST /trips/{trip_id}/steps"), the roles that may call it and,
for roles bound to a vehicle, facility or site, the check that the request stays inside that
binding. A route without a rule is refused to everyone (and the role x endpoint test fails),
so a new endpoint cannot ship open by accident.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from libs.auth.tokens import Principal, TokenVerifier, Unauthenticated
from libs.events.aggregate import Forbidden
from libs.web.limits import WRITES

API_PREFIX = "/api/v1"
Within = Callable[[Principal, Request], Awaitable[bool]]

bearer = HTTPBearer(auto_error=False, description="a token from the configured issuer (JWT)")


@dataclass(frozen=True)
class Grant:
    role: str
    within: Within | None = None  # None: the role may do this anywhere
    scope: str = ""  # what `within` checks, for the 403's detail ("the trip's vehicle")


def roles(*names: str) -> tuple[Grant, ...]:
    return tuple(Grant(n) for n in names)


def bound(role: str, within: Within, scope: str) -> Grant:
    return Grant(role, within, scope)


Rules = dict[str, tuple[Grant, ...]]


async def body_json(request: Request) -> dict[str, Any]:
    """The request body as a dict for a scope check; anything else is left to validation
    (422), which runs after the guard and writes nothing."""
    try:
        data = json.loads(await request.body() or b"null")
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


async def authenticate(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Principal:
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise Unauthenticated("token_missing", "an Authorization: Bearer token is required",
                              "需要登录令牌（Authorization: Bearer）")
    verifier: TokenVerifier = request.app.state.verifier
    principal = await verifier.verify(credentials.credentials)
    request.state.principal = principal
    return principal


class Policy:
    def __init__(self, service: str, rules: Rules) -> None:
        self.service, self.rules = service, rules

    def routes(self) -> Iterable[str]:
        return self.rules.keys()

    def rule_for(self, request: Request) -> tuple[str, tuple[Grant, ...]]:
        path: str = getattr(request.scope.get("route"), "path", request.url.path)
        key = f"{request.method} {path.removeprefix(API_PREFIX)}"
        return key, self.rules.get(key, ())

    async def guard(self, request: Request,
                    principal: Annotated[Principal, Depends(authenticate)]) -> None:
        request.state.service = self.service
        if request.method in WRITES:
            request.app.state.rate_limiter.take(principal.subject)
        key, grants = self.rule_for(request)
        grant = next((g for g in grants if g.role == principal.role), None)
        if grant is None:
            allowed = sorted({g.role for g in grants})
            raise Forbidden("role_not_permitted",
                            f"role {principal.role} may not call {key}",
                            f"角色 {principal.role} 无权执行此操作", role=principal.role,
                            route=key, allowed_roles=allowed)
        if grant.within is not None and not await grant.within(principal, request):
            raise Forbidden("out_of_scope",
                            f"{principal.role} bound to {principal.scope} may not act on "
                            f"this resource: only on {grant.scope}",
                            f"超出授权范围：{principal.role}（{principal.scope}）只能操作{grant.scope}",
                            role=principal.role, scope=principal.scope, route=key)


async def current_principal(request: Request) -> Principal:
    """The caller the guard verified (the guard runs first, as the router's dependency)."""
    principal: Principal = request.state.principal
    return principal


PrincipalDep = Annotated[Principal, Depends(current_principal)]
