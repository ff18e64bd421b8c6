"""Issue 4's scenarios against the embedded default: one process, SQLite, the in-process bus."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from services.runtime import create_app
from services.settings import Settings
from services.transfer import config
from tests import scenarios_trip as scenarios
from tests.actors import Acting
from tests.e2e.invariants import embedded_invariants_hold
from tests.e2e.receiver import Receiver
from tests.scenarios import eventually


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings=(settings := Settings(mode="embedded", data_dir=tmp_path)))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://embedded",
                                 auth=Acting.for_settings(settings)) as c:
            yield c
        await embedded_invariants_hold(tmp_path)


async def test_closed_loop_with_return_leg(client: httpx.AsyncClient) -> None:
    await scenarios.closed_loop_with_return(client)

    async def verified() -> bool:  # the projection receives the last events a moment later
        return bool((await client.get("/api/v1/audit/verify")).json()["ok"])

    await eventually(verified, "every hash chain to verify")


async def test_admitted_instead_of_returning(client: httpx.AsyncClient) -> None:
    await scenarios.admitted_instead(client)


async def test_crew_aborts_cancel_or_requeue(client: httpx.AsyncClient) -> None:
    await scenarios.crew_aborts(client)


async def test_breakdown_after_pickup_both_vehicles_disinfected(client: httpx.AsyncClient) -> None:
    await scenarios.breakdown_after_pickup(client)


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_crew_link_lossy_ends_like_perfect(client: httpx.AsyncClient, seed: int) -> None:
    await scenarios.crew_link(client, seed)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver(fail_first=1)
    await r.start()
    yield r
    await r.stop()


@pytest.fixture
async def notice_client(tmp_path: Path, receiver: Receiver,
                        monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[httpx.AsyncClient]:
    for name, value in scenarios.notice_env(receiver).items():
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


async def test_pre_arrival_notice_acknowledged_or_resent_then_escalated_and_positions(
        notice_client: httpx.AsyncClient, receiver: Receiver) -> None:
    await scenarios.pre_arrival_notice_and_positions(notice_client, receiver)
