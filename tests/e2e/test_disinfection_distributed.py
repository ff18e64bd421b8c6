"""Issue 5's scenarios against the services as separate processes on PostgreSQL and Kafka.
A cluster per release policy (the processes read CLOSEDLOOP_DISINFECTION_* at start); the
default-policy scenarios share one cluster, one after another, as a day's work would."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from tests import scenarios_disinfection as scenarios
from tests.e2e.cluster import running_cluster

pytestmark = [pytest.mark.postgres, pytest.mark.kafka]

STRICT = {"release_policy": "after_negative_result", "sla_check_interval_s": "0.2"}


@pytest.fixture
def disinfection_env(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """CLOSEDLOOP_DISINFECTION_* for the cluster's processes (parametrized indirectly)."""
    for name, value in getattr(request, "param", {}).items():
        monkeypatch.setenv(f"CLOSEDLOOP_DISINFECTION_{name.upper()}", value)


@pytest.fixture
async def client(tmp_path: Path, disinfection_env: None) -> AsyncIterator[httpx.AsyncClient]:
    async with running_cluster(tmp_path) as cluster, cluster.client() as c:
        yield c


async def test_default_policy_full_cycle_then_a_positive_swab_then_an_early_release(
        client: httpx.AsyncClient) -> None:
    await scenarios.full_cycle_default_policy(client)
    await scenarios.positive_swab_after_two_more_trips(client)
    await scenarios.supervisor_early_release(client)
    verify = (await client.get("/api/v1/audit/verify")).json()
    assert verify["ok"], verify
    assert verify["chains"]["copy:disinfection"]["events"] > 0


@pytest.mark.parametrize("disinfection_env", [STRICT], indirect=True, ids=["after_negative_result"])
async def test_full_cycle_to_release_only_after_a_negative_result(client: httpx.AsyncClient) -> None:
    await scenarios.full_cycle_negative_result_policy(client)
