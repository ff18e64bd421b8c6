"""Findings on the events the services really emit (tests/scenarios_findings.py), on the
embedded default."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from libs.events.contracts import Event
from libs.events.store import Commit, EventStore, Meta, NewEvent, StreamAppend
from services.runtime import create_app
from services.settings import Settings
from tests import scenarios_findings as scenarios
from tests.actors import Acting


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings=Settings(mode="embedded", data_dir=tmp_path))
    transport, acting = httpx.ASGITransport(app=app), Acting.for_settings(app.state.settings)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=transport, base_url="http://embedded", auth=acting) as c:
        yield c


@pytest.fixture
def forge(tmp_path: Path) -> scenarios.Forge:
    """Appends to the running app's store through a store of its own on the same file, as a
    forger with database access would (the app's subscriptions poll for such appends)."""
    settings = Settings(mode="embedded", data_dir=tmp_path)

    async def append(store: str, stream: str, *events: Event, occurred_at: datetime | None = None) -> None:
        target = EventStore.from_url(store, settings.store_url(store))
        try:
            version = len(await target.read_stream(stream))
            await target.commit(Commit(
                meta=Meta(actor="forger", role="system", correlation_id=stream),
                appends=[StreamAppend(stream, version, [NewEvent(e, occurred_at) for e in events])]))
        finally:
            await target.close()

    return append


async def test_stood_down_vehicles_are_not_reserved_twice(client: httpx.AsyncClient,
                                                          forge: scenarios.Forge) -> None:
    await scenarios.stood_down_vehicles_are_not_reserved_twice(client, forge)


async def test_a_breakdown_ends_the_reservation(client: httpx.AsyncClient, forge: scenarios.Forge) -> None:
    await scenarios.a_breakdown_ends_the_reservation(client, forge)


@pytest.mark.parametrize("how", ["returned", "admitted"])
async def test_loops_closed_by_return_or_admission(client: httpx.AsyncClient, forge: scenarios.Forge,
                                                   how: str) -> None:
    await scenarios.loops_closed_by_return_or_admission(client, forge, how)


async def test_supervisor_releases_early(client: httpx.AsyncClient) -> None:
    await scenarios.supervisor_releases_early(client)


async def test_supervisor_assigns_before_release(client: httpx.AsyncClient) -> None:
    await scenarios.supervisor_assigns_before_release(client)


async def test_reprioritisations_are_logged(client: httpx.AsyncClient, forge: scenarios.Forge) -> None:
    await scenarios.reprioritisations_are_logged(client, forge)
