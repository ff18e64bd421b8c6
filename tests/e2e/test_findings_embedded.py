"""Findings on the events the services really emit (tests/scenarios_findings.py), on the
embedded default."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

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


async def test_stood_down_vehicles_are_not_reserved_twice(client: httpx.AsyncClient) -> None:
    await scenarios.stood_down_vehicles_are_not_reserved_twice(client)


async def test_a_breakdown_ends_the_reservation(client: httpx.AsyncClient) -> None:
    await scenarios.a_breakdown_ends_the_reservation(client)


@pytest.mark.parametrize("how", ["returned", "admitted"])
async def test_loops_closed_by_return_or_admission(client: httpx.AsyncClient, how: str) -> None:
    await scenarios.loops_closed_by_return_or_admission(client, how)


async def test_supervisor_releases_early(client: httpx.AsyncClient) -> None:
    await scenarios.supervisor_releases_early(client)


async def test_supervisor_assigns_before_release(client: httpx.AsyncClient) -> None:
    await scenarios.supervisor_assigns_before_release(client)


async def test_reprioritisations_are_logged(client: httpx.AsyncClient) -> None:
    await scenarios.reprioritisations_are_logged(client)
