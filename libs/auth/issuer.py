"""The local issuer the embedded default ships, so `make run` works out of the box.

One Ed25519 key, made on first use and kept (mode 0600) under the data dir, so every process
of one deployment (`make up`) verifies the same tokens and a restart keeps them valid. A
city points `CLOSEDLOOP_AUTH_JWKS_URL` at its own identity provider instead.

    python -m libs.auth.issuer --role crew --vehicle nx-120-07
"""

from __future__ import annotations

import argparse
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from libs.auth.tokens import ROLES, SCOPE_CLAIMS

DEFAULT_TTL_S = 12 * 3600  # one shift


class LocalIssuer:
    def __init__(self, key_file: Path, issuer: str, audience: str) -> None:
        self.issuer, self.audience = issuer, audience
        self.key = self._load_or_make(key_file)
        raw = self.key.public_key().public_bytes(serialization.Encoding.Raw,
                                                 serialization.PublicFormat.Raw)
        self.kid = uuid.uuid5(uuid.NAMESPACE_OID, raw.hex()).hex[:16]

    @staticmethod
    def _load_or_make(key_file: Path) -> Ed25519PrivateKey:
        if key_file.exists():
            key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
            assert isinstance(key, Ed25519PrivateKey)
            return key
        key_file.parent.mkdir(parents=True, exist_ok=True)
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        # Two processes starting at once: the first to link its file wins, the other reads it.
        tmp = key_file.with_suffix(f".{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        try:
            os.link(tmp, key_file)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
        return LocalIssuer._load_or_make(key_file)

    def jwks(self) -> dict[str, Any]:
        jwk: dict[str, Any] = json.loads(jwt.algorithms.OKPAlgorithm.to_jwk(self.key.public_key()))
        return {"keys": [{**jwk, "kid": self.kid, "alg": "EdDSA", "use": "sig"}]}

    def issue(self, subject: str, role: str, *, ttl_s: int = DEFAULT_TTL_S, now: int | None = None,
              vehicle_id: str | None = None, facility_id: str | None = None,
              site_id: str | None = None) -> str:
        scope = {"vehicle_id": vehicle_id, "facility_id": facility_id, "site_id": site_id}
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; one of {sorted(ROLES)}")
        claim = SCOPE_CLAIMS.get(role)
        if claim and not scope.get(claim):
            raise ValueError(f"a {role} token needs {claim}")
        t = int(time.time()) if now is None else now
        claims: dict[str, Any] = {"iss": self.issuer, "aud": self.audience, "sub": subject,
                                  "role": role, "iat": t, "nbf": t, "exp": t + ttl_s,
                                  "jti": uuid.uuid4().hex}
        if claim:
            claims[claim] = scope[claim]
        return jwt.encode(claims, self.key, algorithm="EdDSA", headers={"kid": self.kid})


def main() -> None:
    from services.settings import Settings

    parser = argparse.ArgumentParser(description="Issue a token from the local issuer")
    parser.add_argument("--role", required=True, choices=sorted(ROLES))
    parser.add_argument("--subject", help="who (default: <role>-local)")
    parser.add_argument("--vehicle", help="crew: the vehicle id")
    parser.add_argument("--facility", help="hospital: the facility id")
    parser.add_argument("--site", help="isolation site or community: the site id")
    parser.add_argument("--ttl", type=int, default=DEFAULT_TTL_S, help="seconds")
    args = parser.parse_args()
    issuer = Settings().local_issuer()
    try:
        print(issuer.issue(args.subject or f"{args.role}-local", args.role, ttl_s=args.ttl,
                           vehicle_id=args.vehicle, facility_id=args.facility, site_id=args.site))
    except ValueError as exc:
        parser.error(str(exc))


if __name__ == "__main__":
    main()
