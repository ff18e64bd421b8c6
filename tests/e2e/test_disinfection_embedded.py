"""Issue 5's scenarios against the embedded default: one process, SQLite, the in-process bus."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from services.disinfection import config
from services.runtime import create_app
from services.settings import Settings
from tests import scenarios_disinfection as scenarios
from tests.actors import Acting
from tests.e2e.invariants import embedded_invariants_hold

STRICT = {"release_policy": "after_negative_result", "sla_check_interval_s": "0.1"}


@pytest.fixture
def disinfection_env(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """CLOSEDLOOP_DISINFECTION_* for one test (parametrized indirectly; none by default)."""
    for name, value in getattr(request, "param", {}).items():
        monkeypatch.setenv(f"CLOSEDLOOP_DISINFECTION_{name.upper()}", value)
    config.settings.cache_clear()
    config.rules.cache_clear()
    yield
    config.settings.cache_clear()
    config.rules.cache_clear()


@pytest.fixture
async def client(tmp_path: Path, disinfection_env: None) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings=(settings := Settings(mode="embedded", data_dir=tmp_path)))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://embedded",
                                 auth=Acting.for_settings(settings)) as c:
            yield c
        await embedded_invariants_hold(tmp_path)


async def test_full_cycle_to_release_under_the_default_policy(client: httpx.AsyncClient) -> None:
    await scenarios.full_cycle_default_policy(client)


@pytest.mark.parametrize("disinfection_env", [STRICT], indirect=True, ids=["after_negative_result"])
async def test_full_cycle_to_release_only_after_a_negative_result(client: httpx.AsyncClient) -> None:
    await scenarios.full_cycle_negative_result_policy(client)


async def test_positive_swab_after_two_more_trips(client: httpx.AsyncClient) -> None:
    await scenarios.positive_swab_after_two_more_trips(client)
    verify = (await client.get("/api/v1/audit/verify")).json()
    assert verify["ok"], verify


async def test_supervisor_early_release(client: httpx.AsyncClient) -> None:
    await scenarios.supervisor_early_release(client)
