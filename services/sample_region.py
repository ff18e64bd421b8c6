"""Loads the region file's reference data (the sample region of seed 003 by default: the
facilities and vehicles of API-EXAMPLES.md), once."""

from __future__ import annotations

from libs.events.aggregate import UnitOfWork
from libs.events.store import EventStore, Meta
from services.dispatch import handlers
from services.dispatch.config import region
from services.dispatch.domain import Facility, Vehicle
from services.dispatch.schemas import FacilityIn, VehicleIn


async def seed(store: EventStore) -> None:
    meta = Meta(actor="seed:sample-region", role="admin", correlation_id="sample-region")
    uow = UnitOfWork(store, meta)
    for raw in region().facilities:
        if await uow.get(Facility, str(raw["id"])) is None:
            await handlers.register_facility(uow, FacilityIn.model_validate(raw))
    for raw in region().vehicles:
        if await uow.get(Vehicle, str(raw["id"])) is None:
            await handlers.register_vehicle(uow, VehicleIn.model_validate(raw))
    await uow.commit()
