"""The scenarios against the embedded default: one process, SQLite, the in-process bus."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from services.dispatch import config
from services.runtime import create_app
from services.settings import Settings
from tests import scenarios, scenarios_dispatch
from tests.actors import Acting
from tests.e2e.invariants import embedded_invariants_hold
from tests.e2e.receiver import Receiver, dispatch_env


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver(fail_first=1)
    await r.start()
    yield r
    await r.stop()


@pytest.fixture
async def client(tmp_path: Path, receiver: Receiver,
                 monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[httpx.AsyncClient]:
    for name, value in dispatch_env(receiver).items():
        monkeypatch.setenv(name, value)
    config.settings.cache_clear()
    app = create_app(settings=(settings := Settings(mode="embedded", data_dir=tmp_path)))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://embedded",
                                 auth=Acting.for_settings(settings)) as c:
            yield c
        await embedded_invariants_hold(tmp_path)
    config.settings.cache_clear()


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


async def test_intake_validation_and_one_live_transfer_per_person(client: httpx.AsyncClient) -> None:
    await scenarios_dispatch.intake_validation(client)


async def test_queue_overflow_and_fleet(client: httpx.AsyncClient) -> None:
    await scenarios_dispatch.queue_overflow_and_fleet(client)


async def test_report_delivery(client: httpx.AsyncClient, receiver: Receiver) -> None:
    await scenarios_dispatch.report_delivery(client, receiver)


async def test_recurring_care(client: httpx.AsyncClient) -> None:
    await scenarios_dispatch.recurring_care(client)
