"""Composes services into a process, the same way in both modes; only the adapters differ.

embedded:    every service in one process; SQLite stores; each subscription tails the
             producing store (the in-process bus).
distributed: one service per process (or more); PostgreSQL stores; a relay per store
             publishes to Kafka; subscriptions are Kafka consumer groups.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import traceback
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic  # type: ignore[import-untyped]
from aiokafka.errors import TopicAlreadyExistsError  # type: ignore[import-untyped]
from fastapi import APIRouter, Depends, FastAPI
from sqlalchemy import MetaData

from libs.auth.policy import API_PREFIX, Policy
from libs.auth.tokens import ROLES
from libs.events.bus import (
    ALL_TYPES,
    Handler,
    KafkaPublisher,
    KafkaSource,
    Relay,
    StoreTailSource,
    Subscription,
    topic_for,
)
from libs.events.store import EventStore
from libs.web import health, problems
from libs.web.limits import BodyLimits, RateLimiter
from services.disinfection import access as disinfection_access
from services.disinfection import api as disinfection_api
from services.disinfection import contacts as disinfection_contacts
from services.disinfection import handlers as disinfection_handlers
from services.disinfection import sla as disinfection_sla
from services.dispatch import access as dispatch_access
from services.dispatch import api as dispatch_api
from services.dispatch import consumers as dispatch_consumers
from services.dispatch import scheduler as dispatch_scheduler
from services.projection import access as projection_access
from services.projection import api as projection_api
from services.projection import consumers as projection_consumers
from services.projection import read_models
from services.projection import rebuild as projection_rebuild
from services.settings import PORTS, Settings
from services.transfer import access as transfer_access
from services.transfer import api as transfer_api
from services.transfer import handlers as transfer_handlers
from services.transfer import notices as transfer_notices

log = logging.getLogger("closedloop")


Consumes = dict[str, dict[str, Handler]]  # source store -> event type -> handler
Background = Callable[[EventStore, asyncio.Event], Coroutine[Any, Any, None]]


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    router: APIRouter
    consumers: dict[str, Consumes]  # consumer name (its tracking and Kafka group) -> what it reads
    publishes: bool = True
    tables: MetaData | None = None
    background: tuple[Background, ...] = ()
    policy: Policy | None = None  # who may call which route (services/<name>/access.py)


SERVICES: dict[str, ServiceSpec] = {
    "dispatch": ServiceSpec("dispatch", dispatch_api.router, dispatch_consumers.CONSUMERS,
                            background=(dispatch_scheduler.run,), policy=dispatch_access.POLICY),
    "transfer": ServiceSpec("transfer", transfer_api.router,
                            {"transfer": transfer_handlers.CONSUMES,
                             "transfer-notices": transfer_notices.CONSUMES},
                            background=(transfer_notices.run,), policy=transfer_access.POLICY),
    "disinfection": ServiceSpec("disinfection", disinfection_api.router,
                                {"disinfection": disinfection_handlers.CONSUMES},
                                tables=disinfection_contacts.metadata,
                                background=(disinfection_sla.run,),
                                policy=disinfection_access.POLICY),
    "projection": ServiceSpec("projection", projection_api.router,
                              {"projection": projection_consumers.CONSUMES},
                              publishes=False, tables=read_models.metadata,
                              background=(projection_rebuild.upgrade,),
                              policy=projection_access.POLICY),
}
STOP_GRACE_S = 10.0


@dataclass
class Runtime:
    settings: Settings
    services: Sequence[str]
    stores: dict[str, EventStore] = field(default_factory=dict)
    subscriptions: list[Subscription] = field(default_factory=list)
    relays: list[Relay] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _closers: list[Any] = field(default_factory=list)

    async def start(self) -> None:
        embedded = self.settings.mode == "embedded"
        for name in self.services:
            store = EventStore.from_url(name, self.settings.store_url(name))
            await store.create_schema(SERVICES[name].tables)
            self.stores[name] = store
        if embedded:
            for name in self.services:
                for consumer, consumes in SERVICES[name].consumers.items():
                    for source, handlers in consumes.items():
                        if source not in self.stores:
                            continue  # not hosted here: nothing to tail
                        tail = StoreTailSource(self.stores[source], self.stores[name], consumer)
                        self.subscriptions.append(
                            Subscription(consumer, self.stores[name], handlers, tail))
        else:
            await ensure_topics(self.settings, [topic_for(s, self.settings.topic_prefix)
                                                for s in SERVICES if SERVICES[s].publishes])
            for name in self.services:
                spec = SERVICES[name]
                if spec.publishes:
                    publisher = KafkaPublisher(self.settings.kafka_bootstrap,
                                               self.settings.topic_prefix)
                    await publisher.start()
                    self._closers.append(publisher.stop)
                    self.relays.append(Relay(self.stores[name], publisher,
                                             ttl_ms=self.settings.relay_lease_ms))
                for consumer, consumes in spec.consumers.items():
                    merged = {t: h for handlers in consumes.values() for t, h in handlers.items()}
                    kafka = KafkaSource(self.settings.kafka_bootstrap, list(consumes),
                                        group=f"{self.settings.topic_prefix}.{consumer}",
                                        topic_prefix=self.settings.topic_prefix,
                                        types=None if ALL_TYPES in merged else merged)
                    await kafka.start()
                    self._closers.append(kafka.stop)
                    self.subscriptions.append(Subscription(consumer, self.stores[name], merged, kafka))
        self._tasks += [asyncio.create_task(task(self.stores[name], self._stop))
                        for name in self.services for task in SERVICES[name].background]
        self._tasks += [asyncio.create_task(r.run(self._stop)) for r in self.relays]
        self._tasks += [asyncio.create_task(s.run(self._stop)) for s in self.subscriptions]

    async def stop(self) -> None:
        self._stop.set()
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            # A task that ignores its cancellation must not hang shutdown: name it and go on.
            stopped, stuck = await asyncio.wait(self._tasks, timeout=STOP_GRACE_S)
            for task in stopped:
                if not task.cancelled() and task.exception() is not None:
                    log.error("task %s ended with %r", task.get_name(), task.exception())
            for task in stuck:
                log.error("task %s did not stop within %s s:\n%s", task.get_name(), STOP_GRACE_S,
                          "".join(traceback.format_stack(task.get_stack()[-1])) if task.get_stack() else "")
        for close in reversed(self._closers):
            with contextlib.suppress(Exception):
                await close()
        for store in self.stores.values():
            await store.close()


async def ensure_topics(settings: Settings, topics: list[str]) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [NewTopic(t, settings.kafka_partitions, settings.kafka_replication,
                            topic_configs=settings.kafka_topic_config)
                   for t in topics if t not in existing]
        if missing:
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(missing)
    finally:
        await admin.close()


def create_app(services: Sequence[str] | None = None, settings: Settings | None = None,
               seed_sample_region: bool = False) -> FastAPI:
    settings = settings or Settings()
    names = list(services or SERVICES)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime = Runtime(settings, names)
        await runtime.start()
        app.state.runtime = runtime
        app.state.stores = runtime.stores
        if seed_sample_region and "dispatch" in runtime.stores:
            from services.sample_region import seed

            await seed(runtime.stores["dispatch"])
        try:
            yield
        finally:
            await runtime.stop()

    title = "closedloop: 点对点闭环转运" if len(names) > 1 else f"closedloop {names[0]}"
    app = FastAPI(title=title, version="0.1.0", lifespan=lifespan)
    problems.install(app)
    app.add_middleware(BodyLimits, max_bytes=settings.max_body_bytes)
    app.state.settings = settings
    app.state.verifier = settings.token_verifier()
    app.state.rate_limiter = RateLimiter(settings.write_rate_per_s, settings.write_burst)
    app.include_router(health.router)
    if not settings.auth_jwks_url:
        jwks = settings.local_issuer().jwks()

        @app.get("/.well-known/jwks.json", tags=["ops"])
        async def local_jwks() -> dict[str, Any]:
            """The local issuer's public keys, for other services and for clients."""
            return jwks
    for name in names:
        spec = SERVICES[name]
        if spec.policy is None:
            raise ValueError(f"service {name} has no access policy")
        app.include_router(spec.router, prefix=API_PREFIX, dependencies=[Depends(spec.policy.guard)])
    problems.document(app, API_PREFIX)
    return app


# Bindings from the sample region, so each printed token can act on something real.
SAMPLE_BINDINGS: dict[str, dict[str, str]] = {
    "crew": {"vehicle_id": "nx-120-07"}, "hospital": {"facility_id": "yc-second"},
    "site": {"site_id": "yn-isolation-01"}}


def print_tokens(settings: Settings) -> None:
    issuer = settings.local_issuer()
    print("Tokens from the local issuer (12 h), for `Authorization: Bearer <token>`:")
    for role in sorted(ROLES):
        bound = SAMPLE_BINDINGS.get(role, {})
        where = " ".join(f"{k}={v}" for k, v in bound.items())
        token = issuer.issue(f"{role}-local", role, vehicle_id=bound.get("vehicle_id"),
                             facility_id=bound.get("facility_id"), site_id=bound.get("site_id"))
        print(f"  {role}{' (' + where + ')' if where else ''}:\n    {token}")


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description="Run closedloop services")
    parser.add_argument("--service", action="append", choices=sorted(SERVICES),
                        help="a service to host (repeatable); default: all of them")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int)
    parser.add_argument("--seed-sample-region", action="store_true",
                        help="load the facilities and vehicles of API-EXAMPLES.md")
    parser.add_argument("--print-tokens", action="store_true",
                        help="print a token per role from the local issuer, to try the API")
    args = parser.parse_args()
    services = args.service or list(SERVICES)
    port = args.port or (PORTS[services[0]] if len(services) == 1 else 8000)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    app = create_app(services, seed_sample_region=args.seed_sample_region)
    if args.print_tokens and not app.state.settings.auth_jwks_url:
        print_tokens(app.state.settings)
    uvicorn.run(app, host=args.host, port=port, log_level="info")


if __name__ == "__main__":
    main()
