"""The public REST API as the simulated actors call it: each with its own bearer token,
routed by path to the service that owns it (one URL for the embedded default, one per
service when distributed), with every request, refusal, retry and latency counted."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

from libs.auth.issuer import LocalIssuer

API = "/api/v1"
# Path prefix -> the service that owns it, first match wins (as a gateway routes).
ROUTES = (("/api/v1/trips", "transfer"), ("/api/v1/disinfection", "disinfection"),
          ("/api/v1/audit", "projection"), ("/", "dispatch"))
SERVICES = ("dispatch", "transfer", "disinfection", "projection")
TOKEN_REFRESH_S = 6 * 3600  # the local issuer's tokens last a 12 h shift
RETRYABLE = (502, 503, 504)
MAX_ATTEMPTS = 6


@dataclass(frozen=True)
class Actor:
    """Who sends a request: the token's subject, role and binding."""

    subject: str
    role: str
    vehicle_id: str | None = None
    facility_id: str | None = None
    site_id: str | None = None


class Refused(Exception):
    """A refusal the caller did not expect: status, problem code, body."""

    def __init__(self, endpoint: str, status: int, code: str, body: Any) -> None:
        super().__init__(f"{endpoint} -> {status} {code}: {str(body)[:300]}")
        self.endpoint, self.status, self.code, self.body = endpoint, status, code, body


@dataclass
class Stats:
    requests: Counter[str] = field(default_factory=Counter)  # endpoint -> attempts sent
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    refused: Counter[tuple[int, str]] = field(default_factory=Counter)  # (status, code)
    refused_by_endpoint: Counter[tuple[str, int, str]] = field(default_factory=Counter)
    retries: Counter[str] = field(default_factory=Counter)  # why: 429, 503, transport
    not_yet: Counter[str] = field(default_factory=Counter)  # probes answered 404 (not there yet)

    @property
    def total(self) -> int:
        return sum(self.requests.values())

    @property
    def server_errors(self) -> int:
        return sum(n for (status, _), n in self.refused.items() if status >= 500)


def base_urls_by_service(base_urls: str | Mapping[str, str]) -> dict[str, str]:
    if isinstance(base_urls, str):
        return dict.fromkeys(SERVICES, base_urls.rstrip("/"))
    missing = [s for s in SERVICES if s not in base_urls]
    if missing:
        raise ValueError(f"no base URL for {', '.join(missing)}")
    return {s: base_urls[s].rstrip("/") for s in SERVICES}


def idempotency_key(*parts: object) -> str:
    """Deterministic per action: a retried request is the same request."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "closedloop-sim:" + ":".join(map(str, parts))))


class Api:
    def __init__(self, base_urls: str | Mapping[str, str], issuer: LocalIssuer, *,
                 transport: httpx.AsyncBaseTransport | None = None, max_inflight: int = 48,
                 timeout_s: float = 120.0) -> None:
        self.urls = base_urls_by_service(base_urls)
        self.issuer = issuer
        self.stats = Stats()
        self._tokens: dict[Actor, tuple[str, float]] = {}
        self._gate = asyncio.Semaphore(max_inflight)
        limits = httpx.Limits(max_connections=max_inflight, max_keepalive_connections=max_inflight)
        self.client = httpx.AsyncClient(transport=transport, limits=limits, timeout=timeout_s)

    async def aclose(self) -> None:
        await self.client.aclose()

    def token(self, actor: Actor) -> str:
        held = self._tokens.get(actor)
        if held is None or time.monotonic() - held[1] > TOKEN_REFRESH_S:
            token = self.issuer.issue(actor.subject, actor.role, vehicle_id=actor.vehicle_id,
                                      facility_id=actor.facility_id, site_id=actor.site_id)
            held = (token, time.monotonic())
            self._tokens[actor] = held
        return held[0]

    def url(self, path: str) -> str:
        service = next(s for prefix, s in ROUTES if path.startswith(prefix))
        return self.urls[service] + path

    async def call(self, actor: Actor, method: str, template: str, *ids: str,
                   json: Any = None, params: Mapping[str, Any] | None = None,
                   key: str | None = None, not_yet: tuple[int, ...] = (),
                   ok: tuple[int, ...] = ()) -> tuple[int, Any]:
        """One request of `template` (e.g. "/trips/{}/steps") with `ids` filled in. Answers
        2xx, or a status in `ok` (expected refusals, counted), or `not_yet` (a probe of
        something that will exist, not counted as a refusal); raises Refused otherwise.
        429 waits Retry-After and 502/503/504 or a dropped connection back off; both retry
        (POSTs carry an Idempotency-Key, so a retry is the same request)."""
        path = API + template.format(*ids)
        endpoint = f"{method} {template.replace('{}', '{id}')}"
        headers = {"Authorization": f"Bearer {self.token(actor)}"}
        if key is not None:
            headers["Idempotency-Key"] = key
        for attempt in range(1, MAX_ATTEMPTS + 1):
            self.stats.requests[endpoint] += 1
            started = time.perf_counter()
            try:
                async with self._gate:
                    resp = await self.client.request(method, self.url(path), json=json,
                                                     params=params, headers=headers)
            except httpx.TransportError as exc:
                if attempt == MAX_ATTEMPTS:
                    raise
                self.stats.retries[f"transport {type(exc).__name__}"] += 1
                await asyncio.sleep(min(0.2 * 2 ** attempt, 5.0))
                continue
            self.stats.latencies[endpoint].append(time.perf_counter() - started)
            status = resp.status_code
            body: Any = resp.json() if resp.content and _is_json(resp) else resp.text
            if status < 300:
                return status, body
            if status in not_yet:
                self.stats.not_yet[endpoint] += 1
                return status, body
            code = str(body.get("code", "")) if isinstance(body, dict) else ""
            self.stats.refused[(status, code)] += 1
            self.stats.refused_by_endpoint[(endpoint, status, code)] += 1
            if status == 429 and attempt < MAX_ATTEMPTS:
                self.stats.retries["429 rate_limited"] += 1
                await asyncio.sleep(float(resp.headers.get("Retry-After", "1")))
                continue
            if status in RETRYABLE and attempt < MAX_ATTEMPTS:
                self.stats.retries[f"{status} {code}".strip()] += 1
                await asyncio.sleep(min(0.2 * 2 ** attempt, 5.0))
                continue
            if status in ok:
                return status, body
            raise Refused(endpoint, status, code, body)
        raise AssertionError("unreachable")

    async def get(self, actor: Actor, template: str, *ids: str, **kw: Any) -> Any:
        return (await self.call(actor, "GET", template, *ids, **kw))[1]

    async def post(self, actor: Actor, template: str, *ids: str, json: Any, key: str,
                   **kw: Any) -> Any:
        return (await self.call(actor, "POST", template, *ids, json=json, key=key, **kw))[1]


def _is_json(resp: httpx.Response) -> bool:
    media: str = resp.headers.get("content-type", "")
    return media.split(";")[0].strip().endswith("json")
