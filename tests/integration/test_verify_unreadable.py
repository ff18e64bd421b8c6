"""/audit/verify when a tampered row cannot even be read back as an envelope (its payload
edited into what is not a JSON object, an event id that is no UUID, a field longer than
the envelope allows, a negative stream version): the store or the copy is broken at that
row, named; never an error. On SQLite and PostgreSQL. Through the route (every other store
still reported, a store name in the copy that no service owns a failed entry):
tests/e2e/test_projection_embedded.py."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from sqlalchemy import insert, text

from libs.events.catalog import dispatch as dsp
from libs.events.store import EventStore, Meta
from services.projection import queries
from services.projection.tables import archive, archive_row, metadata

MakeStore = Callable[..., Awaitable[EventStore]]

# (SQL that makes the row at :n unreadable, words its reason names).
UNREADABLE = {
    "payload_not_json": ("payload = '{not json'", "payload is not JSON"),
    "payload_an_array": ("payload = '[1]'", "payload: Input should be a valid dictionary"),
    "event_id_no_uuid": ("event_id = 'not-a-uuid'", "event_id"),
    "stream_version_negative": ("stream_version = -1", "stream_version"),
}
# The columns' own limits hold on PostgreSQL (an actor of 300 characters does not fit).
TOO_LONG = ("actor = :long", "actor: String should have at most 200 characters")
LONG = "a" * 300


async def cancelled(store: EventStore, n: int) -> None:
    for i in range(n):
        await store.append(f"transfer-t{i}", 0, [dsp.TransferCancelled(transfer_id=f"t{i}", reason="r")],
                           Meta(actor="dispatcher", role="dispatcher", correlation_id=f"t{i}"))


async def tamper(store: EventStore, table: str, where: str, change: str, n: int) -> None:
    async with store.engine.begin() as conn:
        await conn.execute(text(f"UPDATE {table} SET {change} WHERE {where} position = :n"),
                           {"n": n, "long": LONG})


# -- the store's own chain (EventStore.verify) -------------------------------------------


async def store_breaks_at(store: EventStore, change: str, names: str, position: int) -> None:
    await cancelled(store, 6)
    assert await store.verify(page=2) is None
    await tamper(store, "events", "", change, position)
    for page in (2, 1000):
        broken = await store.verify(page=page)
        assert broken is not None
        assert (broken.position, broken.store) == (position, store.name), broken
        assert broken.reason.startswith("unreadable: ") and names in broken.reason, broken


@pytest.mark.parametrize("case", sorted(UNREADABLE))
@pytest.mark.parametrize("position", [3, 4])  # the first of a page of 2, and inside one
async def test_a_store_row_that_cannot_be_read_is_a_break_at_its_position(
        make_store: MakeStore, case: str, position: int) -> None:
    await store_breaks_at(await make_store("dispatch"), *UNREADABLE[case], position)


async def test_a_store_row_too_long_for_the_envelope_is_a_break_at_its_position(tmp_path: Path) -> None:
    """SQLite keeps what its column's length refuses elsewhere."""
    store = EventStore.from_url("dispatch", f"sqlite+aiosqlite:///{tmp_path}/dispatch.db")
    await store.create_schema()
    try:
        await store_breaks_at(store, *TOO_LONG, 4)
    finally:
        await store.close()


async def test_the_first_break_is_named_when_an_unreadable_row_comes_after_it(
        make_store: MakeStore) -> None:
    store = await make_store("earlier")
    await cancelled(store, 6)
    await tamper(store, "events", "", "actor = 'someone else'", 2)
    await tamper(store, "events", "", "payload = '{not json'", 4)
    broken = await store.verify()
    assert broken is not None and broken.position == 2 and "edited" in broken.reason, broken


async def test_a_missing_position_just_before_an_unreadable_row_is_the_break(make_store: MakeStore) -> None:
    gap = await make_store("gap")
    await cancelled(gap, 6)
    async with gap.engine.begin() as conn:
        await conn.execute(text("DELETE FROM events WHERE position = 3"))
    await tamper(gap, "events", "", "payload = '{not json'", 4)
    broken = await gap.verify()
    assert broken is not None and broken.position == 4 and "position 3 is missing" in broken.reason, broken


# -- the projection's copy (queries.verify_copy) ---------------------------------------


async def copy_breaks_at(source: EventStore, projection: EventStore, change: str, names: str,
                         position: int) -> None:
    """The source's events archived in the projection's copy (as the subscription archives
    them), one of them made unreadable there."""
    await cancelled(source, 6)
    envs = await source.read_all(0, 1000)
    async with projection.engine.begin() as conn:
        await conn.execute(insert(archive), [archive_row(env, 1 + i) for i, env in enumerate(envs)])
    async with projection.engine.connect() as conn:
        assert (await queries.verify_copy(conn, source.name, page=2))[2] is None
    await tamper(projection, "audit_archive", f"store = '{source.name}' AND", change, position)
    for page in (2, 2000):
        async with projection.engine.connect() as conn:
            good, last_hash, broken = await queries.verify_copy(conn, source.name, page=page)
        assert broken is not None
        assert (good, broken.position, broken.store) == (position - 1, position, source.name), broken
        assert broken.reason.startswith("unreadable: ") and names in broken.reason, broken
        assert last_hash == envs[position - 2].hash  # the links before the break hold


@pytest.mark.parametrize("case", sorted(UNREADABLE))
@pytest.mark.parametrize("position", [3, 4])
async def test_a_copied_row_that_cannot_be_read_is_a_break_at_its_position(
        make_store: MakeStore, case: str, position: int) -> None:
    source, projection = await make_store("dispatch"), await make_store("projection")
    await projection.create_schema(metadata)
    await copy_breaks_at(source, projection, *UNREADABLE[case], position)


async def test_a_copied_row_too_long_for_the_envelope_is_a_break_at_its_position(tmp_path: Path) -> None:
    source = EventStore.from_url("dispatch", f"sqlite+aiosqlite:///{tmp_path}/dispatch.db")
    projection = EventStore.from_url("projection", f"sqlite+aiosqlite:///{tmp_path}/projection.db")
    try:
        await source.create_schema()
        await projection.create_schema(metadata)
        await copy_breaks_at(source, projection, *TOO_LONG, 4)
    finally:
        await source.close()
        await projection.close()
