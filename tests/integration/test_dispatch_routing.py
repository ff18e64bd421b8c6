"""Routing decides on the hospitals' loads as it read them (R7). A load report that commits
between that read and the decision's commit refuses the decision, which routes again on the
new load: a decision's place in dispatch's store always comes after the loads it went by,
which is what the audit's R7 checks read (the last load report before the decision)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import pytest

from libs.events.aggregate import UnitOfWork, with_retry
from libs.events.store import ConcurrencyError, EventStore, Meta
from services.dispatch import handlers
from services.dispatch.domain import Transfer
from services.dispatch.schemas import FacilityIn, LoadIn, TransferIn
from tests.conftest import fresh_pg_schema, pg_store
from tests.scenarios import TRANSFER


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[EventStore]:
    async with AsyncExitStack() as stack:
        if request.param == "sqlite":
            one = EventStore.from_url("dispatch", f"sqlite+aiosqlite:///{tmp_path}/dispatch.db")
        else:
            one = pg_store("dispatch", await stack.enter_async_context(fresh_pg_schema()))
        stack.push_async_callback(one.close)
        await one.create_schema()
        yield one


def unit(store: EventStore) -> UnitOfWork:
    return UnitOfWork(store, Meta(actor="dispatcher-1", role="dispatcher", correlation_id="race"))


async def load(store: EventStore, occupied: int, at: str) -> None:
    uow = unit(store)
    await handlers.report_load(uow, "first", LoadIn.model_validate(
        {"fever_clinic_occupied": occupied, "reported_at": at}))
    await uow.commit()


async def test_a_routing_on_a_load_that_changed_before_its_commit_routes_again(store: EventStore) -> None:
    uow = unit(store)
    for body in ({"id": "first", "name": "一院", "roles": ["fever_clinic"], "fever_clinic_capacity": 10,
                  "location": {"lat": 38.28, "lon": 106.24}, "backup_ids": ["second"]},
                 {"id": "second", "name": "二院", "roles": ["fever_clinic", "backup"],
                  "fever_clinic_capacity": 10, "location": {"lat": 38.48, "lon": 106.27}}):
        await handlers.register_facility(uow, FacilityIn.model_validate(body))
    await uow.commit()
    await load(store, 9, "2022-11-20T09:00:00+08:00")  # past 80%: the backup takes new patients

    async def request(uow: UnitOfWork) -> Transfer:
        transfer, _ = await handlers.request_transfer(uow, "t1", TransferIn.model_validate(TRANSFER))
        return transfer

    stale = unit(store)
    assert (await request(stale)).destination_id == "second"
    await load(store, 2, "2022-11-20T09:05:00+08:00")  # back under, before the decision commits
    with pytest.raises(ConcurrencyError):
        await stale.commit()
    assert await store.read_stream("transfer-t1") == []
    transfer, _ = await with_retry(lambda: unit(store), request)
    assert transfer.destination_id == "first"  # the backup stood down: the primary again
