"""The same scenarios as test_embedded, against the services as separate processes on
PostgreSQL and Kafka."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from libs.auth.issuer import LocalIssuer
from libs.auth.tokens import JwksUrl, TokenVerifier
from tests import scenarios, scenarios_dispatch
from tests.actors import Acting
from tests.e2e.cluster import Cluster, running_cluster
from tests.e2e.receiver import Receiver, dispatch_env

pytestmark = [pytest.mark.postgres, pytest.mark.kafka]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver(fail_first=1)
    await r.start()
    yield r
    await r.stop()


@pytest.fixture
async def cluster(tmp_path: Path, receiver: Receiver) -> AsyncIterator[Cluster]:
    async with running_cluster(tmp_path, dispatch_env(receiver)) as c:
        yield c


@pytest.fixture
async def client(cluster: Cluster) -> AsyncIterator[httpx.AsyncClient]:
    async with cluster.client() as c:
        yield c


async def test_walking_skeleton(client: httpx.AsyncClient, cluster: Cluster) -> None:
    await scenarios.walking_skeleton(client)
    verify = (await client.get("/api/v1/audit/verify")).json()
    assert verify["ok"], verify
    assert {"copy:dispatch", "copy:transfer", "copy:disinfection"} <= set(verify["chains"])


async def test_r1_exactly_one_concurrent_assignment_wins(client: httpx.AsyncClient) -> None:
    await scenarios.r1_concurrent_assignments(client)


async def test_r2_vehicle_not_assignable_before_release(client: httpx.AsyncClient) -> None:
    await scenarios.r2_not_assignable_before_release(client)


async def test_a_killed_service_resumes_and_misses_nothing(
    client: httpx.AsyncClient, cluster: Cluster
) -> None:
    """SIGKILL the disinfection service while a trip completes; restarted, it opens the
    cycle from the events it had not yet applied."""
    await scenarios.load_reference_data(client)
    transfer = scenarios.ok(await client.post("/api/v1/transfers", json=scenarios.patient(1)), 201)
    trip = await scenarios.trip_of(client, "nx-120-07", transfer["id"])
    await cluster.kill("disinfection")
    await scenarios.drive_to_handover(client, trip["id"], "kill")
    await cluster.start("disinfection")
    cycle = await scenarios.open_cycle(client, "nx-120-07")
    cycles = scenarios.ok(await client.get("/api/v1/disinfection/cycles",
                                           params={"vehicle_id": "nx-120-07"}))
    assert [c["id"] for c in cycles] == [cycle["id"]]  # one cycle, not two


async def test_intake_validation_and_one_live_transfer_per_person(client: httpx.AsyncClient) -> None:
    await scenarios_dispatch.intake_validation(client)


async def test_queue_overflow_and_fleet(client: httpx.AsyncClient) -> None:
    await scenarios_dispatch.queue_overflow_and_fleet(client)


async def test_report_delivery(client: httpx.AsyncClient, receiver: Receiver) -> None:
    await scenarios_dispatch.report_delivery(client, receiver)


async def test_recurring_care(client: httpx.AsyncClient) -> None:
    await scenarios_dispatch.recurring_care(client)


async def test_tokens_verify_through_the_issuers_jwks_url(client: httpx.AsyncClient,
                                                         cluster: Cluster) -> None:
    """A city's identity provider is reached by URL (CLOSEDLOOP_AUTH_JWKS_URL); here the
    local issuer's keys served by a running service stand in for it. Each process checks
    tokens itself: one forged with another key is refused by every service."""
    url = f"http://127.0.0.1:{cluster.ports['dispatch']}/.well-known/jwks.json"
    verifier = TokenVerifier("closedloop-local", "closedloop", JwksUrl(url))
    who = await verifier.verify(cluster.acting.token("hospital", "his-yc2", facility_id="yc-second"))
    assert (who.subject, who.role, who.facility_id) == ("his-yc2", "hospital", "yc-second")
    forged = Acting(LocalIssuer(cluster.log_dir / "forger.pem", "closedloop-local", "closedloop"))
    for path in ("/api/v1/transfers", "/api/v1/trips", "/api/v1/disinfection/cycles",
                 "/api/v1/audit/kpis"):
        resp = await client.get(path, headers=forged.headers("dispatcher"))
        assert resp.status_code == 401 and resp.json()["code"] == "token_key_unknown", path
