"""Who rode on each transfer, learnt from dispatch's TransferRequested, for the exposure
lists (R9) alone: the name, resident id number and phone that contact tracing needs, and
nothing else of the request. Not masked here; masking for display is the projection's job.

A local copy of another service's data, not a decision of this one: it is a table written
in the consumer's transaction, not events republished under the disinfection topic."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import Column, MetaData, String, Table, insert, select
from sqlalchemy.ext.asyncio import AsyncConnection

from libs.events.aggregate import UnitOfWork, decode
from libs.events.catalog import dispatch as dsp
from libs.events.envelope import Envelope
from libs.events.store import EventStore

metadata = MetaData()

transfer_patients = Table(
    "transfer_patients",
    metadata,
    Column("transfer_id", String(64), primary_key=True),
    Column("name", String(100), nullable=False),
    Column("id_number", String(18)),
    Column("phone", String(20)),
)

KEPT = ("name", "id_number", "phone")


async def on_transfer_requested(env: Envelope, uow: UnitOfWork) -> None:
    e = decode(env)
    assert isinstance(e, dsp.TransferRequested)
    row = {k: e.patient.get(k) for k in KEPT}

    async def write(conn: AsyncConnection) -> None:
        # Tracking makes each delivery apply once; the check is for a transfer id reused.
        known = await conn.scalar(select(transfer_patients.c.transfer_id)
                                  .where(transfer_patients.c.transfer_id == e.transfer_id))
        if known is None:
            await conn.execute(insert(transfer_patients).values(transfer_id=e.transfer_id, **row))

    uow.writes.append(write)


async def patients_of(store: EventStore, transfer_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
    wanted = sorted(set(transfer_ids))
    if not wanted:
        return {}
    async with store.engine.connect() as conn:
        rows = await conn.execute(select(transfer_patients)
                                  .where(transfer_patients.c.transfer_id.in_(wanted)))
        return {r.transfer_id: {k: getattr(r, k) for k in KEPT} for r in rows}
