"""The scenarios against the embedded default: one process, SQLite, the in-process bus."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from services.runtime import create_app
from services.settings import Settings
from tests import scenarios


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings=Settings(mode="embedded", data_dir=tmp_path))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://embedded") as c:
            yield c


async def test_walking_skeleton(client: httpx.AsyncClient) -> None:
    result = await scenarios.walking_skeleton(client)
    verify = (await client.get("/api/v1/audit/verify")).json()
    assert verify["ok"], verify
    assert verify["chains"]["store:dispatch"]["events"] > 0
    assert len(result["timeline"]["entries"]) >= 20


async def test_r1_exactly_one_concurrent_assignment_wins(client: httpx.AsyncClient) -> None:
    await scenarios.r1_concurrent_assignments(client)


async def test_r2_vehicle_not_assignable_before_release(client: httpx.AsyncClient) -> None:
    await scenarios.r2_not_assignable_before_release(client)
