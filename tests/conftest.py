"""Fixtures shared by every tier. PostgreSQL and Kafka are the project's own (started by
deploy/local/*.sh, which `make test` runs). If they are not there, tests that need them
fail: missing infrastructure is an error, never a skip."""

from __future__ import annotations

import os
import sqlite3
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]
import pytest

from libs.events.store import EventStore

# The same ports as deploy/local/*.sh, so that a second checkout can run its own instances.
PG_DSN = os.environ.get(
    "CLOSEDLOOP_TEST_PG_DSN",
    f"postgresql://closedloop@127.0.0.1:{os.environ.get('CLOSEDLOOP_PG_PORT', '55432')}/test")
KAFKA = os.environ.get(
    "CLOSEDLOOP_KAFKA_BOOTSTRAP", f"127.0.0.1:{os.environ.get('CLOSEDLOOP_KAFKA_PORT', '59092')}")


def sqlalchemy_url(dsn: str) -> str:
    return dsn.replace("postgresql://", "postgresql+asyncpg://", 1)


@asynccontextmanager
async def fresh_pg_schema() -> AsyncIterator[str]:
    """A fresh schema in the test database, dropped afterwards."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(PG_DSN)
    try:
        await conn.execute(f"CREATE SCHEMA {schema}")
        yield schema
        await conn.execute(f"DROP SCHEMA {schema} CASCADE")
    finally:
        await conn.close()


@pytest.fixture
async def pg_schema() -> AsyncIterator[str]:
    async with fresh_pg_schema() as schema:
        yield schema


def take_write_lock(database: Path, timeout: float) -> None:
    """Takes an SQLite file's write lock and gives it back: "database is locked" when a
    writer still holds it after `timeout` seconds."""
    probe = sqlite3.connect(database, timeout=timeout, isolation_level=None)
    try:
        probe.execute("BEGIN IMMEDIATE")
        probe.execute("ROLLBACK")
    finally:
        probe.close()


def pg_store(name: str, schema: str) -> EventStore:
    return EventStore.from_url(
        name, sqlalchemy_url(PG_DSN),
        connect_args={"server_settings": {"search_path": schema}}, pool_size=20,
    )


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """Which adapter a contract test runs on; yields a key the `make_store` fixture reads."""
    if request.param == "sqlite":
        yield f"sqlite:{tmp_path}"
    else:
        async with fresh_pg_schema() as schema:
            yield f"postgres:{schema}"


@pytest.fixture
async def make_store(backend: str) -> AsyncIterator[object]:
    """Opens stores on the chosen backend; several stores of one name share the database,
    as replicas of a service do."""
    opened: list[EventStore] = []
    kind, where = backend.split(":", 1)

    async def make(name: str = "test") -> EventStore:
        if kind == "sqlite":
            store = EventStore.from_url(name, f"sqlite+aiosqlite:///{where}/{name}.db")
        else:
            store = pg_store(name, where)
        await store.create_schema()
        opened.append(store)
        return store

    yield make
    for store in opened:
        await store.close()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        path = str(item.fspath)
        if "/integration/" in path and "kafka" in path:
            item.add_marker(pytest.mark.kafka)


_counts: dict[str, dict[str, int]] = {}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        for marker in ("postgres", "kafka"):
            if item.get_closest_marker(marker):
                bucket = _counts.setdefault(marker, {})
                bucket[report.outcome] = bucket.get(report.outcome, 0) + 1


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    terminalreporter.section("real infrastructure")
    for marker in ("postgres", "kafka"):
        c = _counts.get(marker, {})
        terminalreporter.write_line(
            f"{marker}: {c.get('passed', 0)} passed, {c.get('failed', 0)} failed, "
            f"{c.get('skipped', 0)} skipped")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if any(c.get("skipped") for c in _counts.values()) and os.environ.get("CI"):
        session.exitstatus = 1  # a skipped infrastructure test hides a missing install step
