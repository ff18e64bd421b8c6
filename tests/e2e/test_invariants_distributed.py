"""The invariant checker on PostgreSQL: the R2 scenario on the distributed services, then
copies of their databases, each corrupted one way (a consumer's tracking row deleted, a
stored payload edited, a read-model row dropped): each time the checker names that breach,
and nothing else. (The forged R1 event is test_invariants_embedded's: it needs the
services running on the copy to deliver it.)"""

from __future__ import annotations

from pathlib import Path

import asyncpg  # type: ignore[import-untyped]
import pytest

from services.settings import Settings
from tests import scenarios
from tests.conftest import PG_DSN
from tests.e2e.cluster import SERVICES, running_cluster
from tests.e2e.invariants import OFFLINE_CORRUPTIONS, invariants_hold

pytestmark = [pytest.mark.postgres, pytest.mark.kafka]


async def copy_databases(run_id: str, copy_id: str, drop: bool = False) -> None:
    conn = await asyncpg.connect(PG_DSN)
    try:
        for service in SERVICES:
            await conn.execute(f'DROP DATABASE IF EXISTS "{service}_{copy_id}" WITH (FORCE)' if drop else
                               f'CREATE DATABASE "{service}_{copy_id}" TEMPLATE "{service}_{run_id}"')
    finally:
        await conn.close()


async def test_corruptions_of_copied_databases_are_named(tmp_path: Path) -> None:
    async with running_cluster(tmp_path, check_invariants=False) as cluster:
        async with cluster.client() as c:
            await scenarios.r2_not_assignable_before_release(c)
        await invariants_hold(cluster.settings)
        await cluster.stop()  # PostgreSQL copies a database nobody is connected to
        for n, corrupted in enumerate(OFFLINE_CORRUPTIONS):
            copy_id = f"{cluster.run_id}c{n}"
            await copy_databases(cluster.run_id, copy_id)
            try:
                url = cluster.settings.pg_url.replace(f"_{cluster.run_id}", f"_{copy_id}")
                await corrupted(Settings(mode="distributed", pg_url=url))
            finally:
                await copy_databases(cluster.run_id, copy_id, drop=True)
