"""The audit views against the services as separate processes on PostgreSQL and Kafka:
the audit scenario checked view by view, the projection's copy complete against every
store, a rebuild (store after store, unlike the Kafka interleaving it was built live in)
equal to the live read models, and an edited archived event caught."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import pytest
from aiokafka import AIOKafkaProducer  # type: ignore[import-untyped]
from sqlalchemy import text

from libs.events.store import EventStore
from services.projection import queries
from services.projection.tables import generation
from tests import scenarios_audit
from tests.conftest import PG_DSN, sqlalchemy_url
from tests.e2e.cluster import Cluster, running_cluster
from tests.e2e.invariants import invariants_hold
from tests.scenarios import eventually, ok

pytestmark = [pytest.mark.postgres, pytest.mark.kafka]
API = "/api/v1"


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    async with running_cluster(tmp_path, check_invariants=False) as c:  # the test tampers: it checks first
        yield c


def db(cluster: Cluster, service: str) -> str:
    return f"{PG_DSN.rsplit('/', 1)[0]}/{service}_{cluster.run_id}"


async def heads(cluster: Cluster) -> dict[str, tuple[int, str]]:
    """Each producing store's head position and hash, read from its own database."""
    out = {}
    for service in ("dispatch", "transfer", "disinfection"):
        conn = await asyncpg.connect(db(cluster, service))
        try:
            row = await conn.fetchrow("SELECT position, hash FROM events ORDER BY position DESC LIMIT 1")
            out[service] = (row["position"], row["hash"])
        finally:
            await conn.close()
    return out


async def test_audit_views_rebuild_and_tampering_distributed(cluster: Cluster) -> None:
    async with cluster.client() as c:
        ids = await scenarios_audit.run(c)
        await scenarios_audit.check_views(c, ids)

        # The copy is complete: every store's head, with the same hash, is in the archive.
        want = await heads(cluster)

        async def complete() -> Any:
            chains = ok(await c.get(f"{API}/audit/verify"))["chains"]
            return all(chains.get(f"copy:{s}", {}).get("events") == pos for s, (pos, _) in want.items())

        await eventually(complete, "the archive to hold every store's events")
        projection = EventStore.from_url("projection", sqlalchemy_url(db(cluster, "projection")))
        try:
            async with projection.engine.connect() as conn:
                for store, (pos, digest) in want.items():
                    got = await conn.scalar(text(
                        "SELECT hash FROM audit_archive WHERE store = :s AND position = :p"),
                        {"s": store, "p": pos})
                    assert got == digest, store
                live_gen = await queries.current(conn)
                assert live_gen is not None
                live = await queries.dump(conn, live_gen)

            assert (await c.post(f"{API}/audit/rebuild", params={"order": "store"})).status_code == 202

            async def done() -> Any:
                status = ok(await c.get(f"{API}/audit/rebuild"))
                assert status["status"] != "failed", status
                return status if status["status"] == "done" else None

            status = await eventually(done, "the rebuild")
            assert status["active_generation"] == live_gen.number + 1
            async with projection.engine.connect() as conn:
                assert await queries.dump(conn, generation(status["active_generation"])) == live
            await scenarios_audit.check_views(c, ids)  # now served from the rebuilt generation
            await invariants_hold(cluster.settings)

            # Each store is checked by the service that owns it, asked over HTTP.
            chains = ok(await c.get(f"{API}/audit/verify"))["chains"]
            for store in ("dispatch", "transfer", "disinfection"):
                entry = chains[f"store:{store}"]
                assert entry["ok"] and entry["events"] == chains[f"copy:{store}"]["events"], entry
                assert entry["checked_by"].endswith(f":{cluster.ports[store]}/chain/{store}"), entry
            before = ok(await c.get(f"{API}/audit/verify"))
            assert before["ok"] and before["own"]["store"]["passed_over"]["messages"] == 0

            # Garbage on transfer's topic (dispatch, disinfection and the projection read it):
            # each consumer keeps it, as received, and says so; nothing stalls.
            producer = AIOKafkaProducer(bootstrap_servers=cluster.env["CLOSEDLOOP_KAFKA_BOOTSTRAP"])
            await producer.start()
            try:
                sent = await producer.send_and_wait(f"{cluster.env['CLOSEDLOOP_TOPIC_PREFIX']}.transfer",
                                                    b"not an event 13912345678", key=b"junk")
            finally:
                await producer.stop()

            async def kept() -> Any:
                verify = ok(await c.get(f"{API}/audit/verify"))
                entries = [verify["chains"]["store:dispatch"], verify["chains"]["store:disinfection"],
                           verify["own"]["store"]]
                return verify if all(e["passed_over"]["messages"] == 1 for e in entries) else None

            verify = await eventually(kept, "every consumer of transfer's topic to keep the garbage")
            assert verify["ok"]  # no store's chain is broken by what no store wrote
            [shown] = verify["own"]["store"]["passed_over"]["latest"]
            assert (shown["partition"], shown["offset"]) == (sent.partition, sent.offset), shown
            assert shown["value"] == "not an event 139****5678", shown  # masked like every view
            assert shown["consumer"].startswith("projection"), shown
            # And counted where an operator's alert looks: each consumer's /metrics.
            for service in ("dispatch", "disinfection", "projection"):
                exported = (await c.get(f"http://127.0.0.1:{cluster.ports[service]}/metrics")).text
                counted = [line for line in exported.splitlines() if line.startswith(
                    "closedloop_consumer_messages_total{") and 'outcome="passed_over"' in line]
                assert sum(float(line.rsplit(" ", 1)[1]) for line in counted) == 1.0, (service, counted)
            await scenarios_audit.check_views(c, ids)

            async with projection.engine.begin() as conn:
                await conn.execute(text("UPDATE audit_archive SET occurred_at = '2022-01-01T00:00:00+08:00' "
                                        "WHERE store = 'disinfection' AND position = 2"))
            verify = ok(await c.get(f"{API}/audit/verify"))
            assert not verify["ok"]
            assert verify["chains"]["copy:disinfection"]["first_break"]["position"] == 2
            assert verify["chains"]["store:disinfection"]["ok"]  # the service still has the truth

            # An event edited in dispatch's own database: dispatch finds the broken link.
            conn2 = await asyncpg.connect(db(cluster, "dispatch"))
            try:
                await conn2.execute("UPDATE events SET actor = 'someone-else' WHERE position = 3")
            finally:
                await conn2.close()
            verify = ok(await c.get(f"{API}/audit/verify"))
            brk = verify["chains"]["store:dispatch"]["first_break"]
            assert brk["position"] == 3 and "edited" in brk["reason"], verify["chains"]["store:dispatch"]
            assert verify["chains"]["copy:dispatch"]["ok"]

            # Transfer's store rewritten from its 4th event on and re-hashed whole: the
            # projection asks transfer's service for links until it finds the first that departs.
            transfer = EventStore.from_url("transfer", sqlalchemy_url(db(cluster, "transfer")))
            try:
                stored = await scenarios_audit.rewrite_and_rehash(transfer, 4)
            finally:
                await transfer.close()
            verify = ok(await c.get(f"{API}/audit/verify"))
            scenarios_audit.names_the_rewritten_event(verify["chains"]["store:transfer"], stored, 4)
        finally:
            await projection.close()
