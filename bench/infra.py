"""The project's PostgreSQL and Kafka as the benchmarks reach them (the ports of
deploy/local/*.sh), and a database of its own for each contender."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg  # type: ignore[import-untyped]

PG = os.environ.get(
    "CLOSEDLOOP_TEST_PG_DSN",
    f"postgresql://closedloop@127.0.0.1:{os.environ.get('CLOSEDLOOP_PG_PORT', '55432')}/test")
KAFKA = os.environ.get(
    "CLOSEDLOOP_KAFKA_BOOTSTRAP", f"127.0.0.1:{os.environ.get('CLOSEDLOOP_KAFKA_PORT', '59092')}")


@asynccontextmanager
async def database(name: str) -> AsyncIterator[str]:
    """A database of its own on the project's server, dropped afterwards; yields its DSN."""
    db = f"bench_{name}_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(PG)
    try:
        await admin.execute(f"CREATE DATABASE {db}")
        try:
            yield PG.rsplit("/", 1)[0] + f"/{db}"
        finally:
            await admin.execute(f"DROP DATABASE {db} WITH (FORCE)")
    finally:
        await admin.close()


async def analyze(dsn: str) -> None:
    """What autovacuum does to a table in service: fresh statistics for the planner."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("ANALYZE")
    finally:
        await conn.close()


def sqlalchemy_url(dsn: str) -> str:
    return dsn.replace("postgresql://", "postgresql+asyncpg://", 1)
