"""Configuration from the environment (CLOSEDLOOP_*), for both ways to run."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic_settings import BaseSettings, SettingsConfigDict

from libs.auth.issuer import LocalIssuer
from libs.auth.tokens import JwksUrl, KeySet, TokenVerifier

# Each service's default port when they run as separate processes (make up).
PORTS = {"dispatch": 8001, "transfer": 8002, "disinfection": 8003, "projection": 8004}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CLOSEDLOOP_")

    mode: Literal["embedded", "distributed"] = "embedded"
    data_dir: Path = Path(".run/data")
    # {service} is replaced by the service's name: a database per service.
    pg_url: str = "postgresql+asyncpg://closedloop@127.0.0.1:55432/{service}"
    kafka_bootstrap: str = "127.0.0.1:59092"
    topic_prefix: str = "closedloop"
    kafka_partitions: int = 3
    kafka_replication: int = 1
    # Replicas that must have an event before the broker acknowledges it (acks=all). None:
    # 2 when there are at least 3 replicas (one broker may be down and no acknowledged event
    # rests on a single disk), else 1.
    kafka_min_insync: int | None = None
    relay_lease_ms: int = 5000
    # Who may call: tokens from this issuer for this audience. With no JWKS URL, the local
    # issuer's key under the data dir (made on first use) signs and verifies.
    auth_issuer: str = "closedloop-local"
    auth_audience: str = "closedloop"
    auth_jwks_url: str | None = None
    # Abuse limits: a write body's size, and writes per client (a token's subject).
    max_body_bytes: int = 256 * 1024
    write_rate_per_s: float = 50.0
    write_burst: int = 200
    # Where each service answers (distributed mode): the projection asks each one for its
    # own hash chain (/chain/{store}). JSON, e.g. {"dispatch": "http://10.0.0.5:8001"};
    # a service not named is on this host at its default port.
    service_urls: dict[str, str] = {}

    @property
    def kafka_topic_config(self) -> dict[str, str]:
        isr = self.kafka_min_insync or (2 if self.kafka_replication >= 3 else 1)
        return {"min.insync.replicas": str(isr)}

    def local_issuer(self) -> LocalIssuer:
        return LocalIssuer(self.data_dir / "auth" / "issuer-ed25519.pem", self.auth_issuer,
                           self.auth_audience)

    def token_verifier(self) -> TokenVerifier:
        keys = (JwksUrl(self.auth_jwks_url) if self.auth_jwks_url
                else KeySet(self.local_issuer().jwks()))
        return TokenVerifier(self.auth_issuer, self.auth_audience, keys)

    def service_url(self, service: str) -> str:
        return self.service_urls.get(service) or f"http://127.0.0.1:{PORTS[service]}"

    def store_url(self, service: str) -> str:
        if self.mode == "embedded":
            self.data_dir.mkdir(parents=True, exist_ok=True)
            return f"sqlite+aiosqlite:///{self.data_dir / service}.db"
        return self.pg_url.format(service=service)
