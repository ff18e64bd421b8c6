"""Bearer tokens (JWT, asymmetric signatures) verified against the issuer's keys (JWKS).

The actor on every event is the verified token's subject and role, never a request field.
Roles bound to something carry it as a claim: crew a `vehicle_id`, a hospital a
`facility_id`, an isolation site or community a `site_id`.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import jwt
from pydantic import BaseModel, ConfigDict

ROLES = frozenset({
    "dispatcher", "supervisor", "crew", "disinfection", "lab", "hospital", "site",
    "health_bureau", "auditor", "admin",
})
# The claim that binds a role to one thing; the role means nothing without it.
SCOPE_CLAIMS = {"crew": "vehicle_id", "hospital": "facility_id", "site": "site_id"}
# Asymmetric only: a shared-secret (HS*) or unsigned (`none`) token is never accepted.
ALGORITHMS = ["EdDSA", "ES256", "RS256"]
LEEWAY_S = 30
# A verified token is remembered (the signature check was a quarter of a millisecond of
# every request's CPU) for at most this long, and never past its own expiry: a key the
# issuer withdraws stops admitting its tokens within this time (JwksUrl caches the key
# set for 300 s anyway).
REMEMBER_S = 60.0
REMEMBERED = 4096


class Principal(BaseModel):
    """A verified caller: the token's subject, role and (for bound roles) what it is bound to."""

    model_config = ConfigDict(frozen=True)  # one instance serves every request of a token

    subject: str
    role: str
    vehicle_id: str | None = None
    facility_id: str | None = None
    site_id: str | None = None

    @property
    def scope(self) -> str | None:
        claim = SCOPE_CLAIMS.get(self.role)
        return f"{claim}={getattr(self, claim)}" if claim else None


class Unauthenticated(Exception):
    """401: no token, or one that proves nothing (expired, wrong audience, tampered ...)."""

    def __init__(self, code: str, detail: str, message_zh: str) -> None:
        super().__init__(detail)
        self.code, self.detail, self.message_zh = code, detail, message_zh


@dataclass(frozen=True)
class KeySet:
    """Fixed keys (the local issuer's JWKS), picked by the token's `kid`."""

    jwks: dict[str, Any]

    @cached_property
    def _keys(self) -> jwt.PyJWKSet:
        return jwt.PyJWKSet.from_dict(self.jwks)

    async def key_for(self, token: str, kid: str | None) -> Any:
        for key in self._keys.keys:
            if key.key_id == kid:
                return key.key
        raise Unauthenticated("token_key_unknown", f"no key with kid {kid!r} at the issuer",
                              "令牌签名密钥未知")


class JwksUrl:
    """A real issuer's JWKS endpoint, cached; an unknown `kid` refetches once (key rotation)."""

    def __init__(self, url: str) -> None:
        self.client = jwt.PyJWKClient(url, cache_keys=True, lifespan=300)

    async def key_for(self, token: str, kid: str | None) -> Any:
        try:
            # PyJWKClient fetches with urllib: keep the event loop free while it does.
            found = await asyncio.to_thread(self.client.get_signing_key_from_jwt, token)
        except jwt.PyJWKClientError as exc:
            raise Unauthenticated("token_key_unknown", str(exc), "令牌签名密钥未知") from exc
        return found.key


# Most specific first: InvalidTokenError is the base of the others.
DEFECTS: list[tuple[type[Exception], str, str, str]] = [
    (jwt.ExpiredSignatureError, "token_expired", "the token has expired", "令牌已过期"),
    (jwt.ImmatureSignatureError, "token_not_yet_valid", "the token is not valid yet", "令牌尚未生效"),
    (jwt.InvalidAudienceError, "token_wrong_audience", "the token is for another audience",
     "令牌的受众不符"),
    (jwt.InvalidIssuerError, "token_wrong_issuer", "the token is from another issuer", "令牌签发者不符"),
    (jwt.InvalidSignatureError, "token_signature_invalid", "the token's signature does not verify",
     "令牌签名无效"),
]


class TokenVerifier:
    def __init__(self, issuer: str, audience: str, keys: KeySet | JwksUrl,
                 clock: Callable[[], float] = time.time) -> None:
        self.issuer, self.audience, self.keys, self.clock = issuer, audience, keys, clock
        # token -> (its caller, until when it is taken without checking again); the whole
        # token is the key, signature included, so a changed token is never a hit.
        self._verified: OrderedDict[str, tuple[Principal, float]] = OrderedDict()

    async def verify(self, token: str) -> Principal:
        now = self.clock()
        hit = self._verified.get(token)
        if hit is not None and now < hit[1]:
            self._verified.move_to_end(token)
            return hit[0]
        principal, expires = await self._check(token)
        self._verified[token] = (principal, min(expires + LEEWAY_S, now + REMEMBER_S))
        self._verified.move_to_end(token)
        if len(self._verified) > REMEMBERED:
            self._verified.popitem(last=False)
        return principal

    async def _check(self, token: str) -> tuple[Principal, float]:
        """The caller a token proves and its expiry, or Unauthenticated (never remembered)."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.DecodeError as exc:
            raise Unauthenticated("token_malformed", "the bearer token is not a JWT",
                                  "令牌格式错误") from exc
        if header.get("alg") not in ALGORITHMS:
            raise Unauthenticated("token_algorithm_refused",
                                  f"algorithm {header.get('alg')!r} is not accepted",
                                  "令牌签名算法不被接受")
        key = await self.keys.key_for(token, header.get("kid"))
        try:
            claims = jwt.decode(
                token, key, algorithms=ALGORITHMS, audience=self.audience, issuer=self.issuer,
                leeway=LEEWAY_S, options={"require": ["exp", "iat", "iss", "aud", "sub"]})
        except jwt.InvalidTokenError as exc:
            code, detail, zh = next(
                (m for kind, *m in DEFECTS if isinstance(exc, kind)), ("token_invalid", str(exc), "令牌无效"))
            raise Unauthenticated(code, detail, zh) from exc
        return principal_of(claims), float(claims["exp"])


def principal_of(claims: dict[str, Any]) -> Principal:
    role = claims.get("role")
    if role not in ROLES:
        raise Unauthenticated("token_role_unknown", f"role {role!r} is not one of this system's",
                              "令牌中的角色未知")
    claim = SCOPE_CLAIMS.get(role)
    if claim and not isinstance(claims.get(claim), str):
        raise Unauthenticated("token_scope_missing", f"a {role} token must carry {claim}",
                              f"{role} 角色的令牌缺少 {claim}")
    bound = {claim: claims[claim]} if claim else {}
    return Principal(subject=str(claims["sub"]), role=role, **bound)
