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
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic  # type: ignore[import-untyped]
from aiokafka.errors import TopicAlreadyExistsError  # type: ignore[import-untyped]
from fastapi import APIRouter, FastAPI
from sqlalchemy import MetaData

from libs.events.bus import (
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
from services.disinfection import api as disinfection_api
from services.disinfection import contacts as disinfection_contacts
from services.disinfection import handlers as disinfection_handlers
from services.disinfection import sla as disinfection_sla
from services.dispatch import api as dispatch_api
from services.dispatch import consumers as dispatch_consumers
from services.dispatch import scheduler as dispatch_scheduler
from services.projection import api as projection_api
from services.projection import consumers as projection_consumers
from services.projection import read_models
from services.settings import Settings
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


SERVICES: dict[str, ServiceSpec] = {
    "dispatch": ServiceSpec("dispatch", dispatch_api.router, dispatch_consumers.CONSUMERS,
                            background=(dispatch_scheduler.run,)),
    "transfer": ServiceSpec("transfer", transfer_api.router,
                            {"transfer": transfer_handlers.CONSUMES,
                             "transfer-notices": transfer_notices.CONSUMES},
                            background=(transfer_notices.run,)),
    "disinfection": ServiceSpec("disinfection", disinfection_api.router,
                                {"disinfection": disinfection_handlers.CONSUMES},
                                tables=disinfection_contacts.metadata,
                                background=(disinfection_sla.run,)),
    "projection": ServiceSpec("projection", projection_api.router,
                              {"projection": projection_consumers.CONSUMES},
                              publishes=False, tables=read_models.metadata),
}
PORTS = {"dispatch": 8001, "transfer": 8002, "disinfection": 8003, "projection": 8004}


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
                                        topic_prefix=self.settings.topic_prefix)
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
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
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
        missing = [NewTopic(t, settings.kafka_partitions, settings.kafka_replication)
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
    app.include_router(health.router)
    for name in names:
        app.include_router(SERVICES[name].router, prefix="/api/v1")
    return app


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description="Run closedloop services")
    parser.add_argument("--service", action="append", choices=sorted(SERVICES),
                        help="a service to host (repeatable); default: all of them")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int)
    parser.add_argument("--seed-sample-region", action="store_true",
                        help="load the facilities and vehicles of API-EXAMPLES.md")
    args = parser.parse_args()
    services = args.service or list(SERVICES)
    port = args.port or (PORTS[services[0]] if len(services) == 1 else 8000)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    app = create_app(services, seed_sample_region=args.seed_sample_region)
    uvicorn.run(app, host=args.host, port=port, log_level="info")


if __name__ == "__main__":
    main()
