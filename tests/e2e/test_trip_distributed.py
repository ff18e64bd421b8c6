"""Issue 4's scenarios against the services as separate processes on PostgreSQL and Kafka:
the full closed loop with its return leg, and the takeover after a breakdown."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from tests import scenarios_trip as scenarios
from tests.e2e.cluster import running_cluster
from tests.e2e.receiver import Receiver
from tests.scenarios import eventually

pytestmark = [pytest.mark.postgres, pytest.mark.kafka]


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with running_cluster(tmp_path) as cluster, cluster.client() as c:
        yield c


async def test_closed_loop_with_return_leg(client: httpx.AsyncClient) -> None:
    await scenarios.closed_loop_with_return(client)

    async def verified() -> bool:  # the projection receives the last events a moment later
        return bool((await client.get("/api/v1/audit/verify")).json()["ok"])

    await eventually(verified, "every hash chain to verify")


async def test_breakdown_after_pickup_both_vehicles_disinfected(client: httpx.AsyncClient) -> None:
    await scenarios.breakdown_after_pickup(client)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver(fail_first=1)
    await r.start()
    yield r
    await r.stop()


async def test_pre_arrival_notice_and_positions(tmp_path: Path, receiver: Receiver) -> None:
    async with running_cluster(tmp_path, scenarios.notice_env(receiver)) as cluster, \
            cluster.client() as c:
        await scenarios.pre_arrival_notice_and_positions(c, receiver)
