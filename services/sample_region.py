"""The sample region of seed 003 (Yinchuan, Yongning county): the facilities and vehicles
of API-EXAMPLES.md, loaded once."""

from __future__ import annotations

from typing import Any

from libs.events.aggregate import UnitOfWork
from libs.events.store import EventStore, Meta
from services.dispatch import handlers
from services.dispatch.domain import Facility, Vehicle
from services.dispatch.schemas import FacilityIn, VehicleIn

FACILITIES: list[dict[str, Any]] = [
    {"id": "yc-first", "name": "银川市第一人民医院", "roles": ["fever_clinic", "designated"],
     "location": {"lat": 38.4870, "lon": 106.2300}, "fever_clinic_capacity": 100,
     "backup_ids": ["yc-second", "yc-maternity"]},
    {"id": "yc-second", "name": "银川市第二人民医院", "roles": ["fever_clinic", "backup"],
     "location": {"lat": 38.4800, "lon": 106.2700}, "fever_clinic_capacity": 80},
    {"id": "nx-cardio", "name": "宁夏医科大学总医院心脑血管病医院", "roles": ["specialty_cardio_cerebro"],
     "location": {"lat": 38.4950, "lon": 106.2000}},
]
VEHICLES: list[dict[str, Any]] = [
    {"id": "nx-120-07", "plate": "宁A·120Q7", "kind": "negative_pressure_ambulance",
     "dedicated_pool": True, "life_support": True, "station": "永宁县急救站",
     "location": {"lat": 38.2800, "lon": 106.2500}},
    {"id": "yn-bus-02", "plate": "宁A·Z5022", "kind": "dedicated_vehicle",
     "dedicated_pool": True, "life_support": False, "station": "永宁县卫健局",
     "location": {"lat": 38.2780, "lon": 106.2530}},
]


async def seed(store: EventStore) -> None:
    meta = Meta(actor="seed:sample-region", role="admin", correlation_id="sample-region")
    uow = UnitOfWork(store, meta)
    for raw in FACILITIES:
        if await uow.get(Facility, str(raw["id"])) is None:
            await handlers.register_facility(uow, FacilityIn.model_validate(raw))
    for raw in VEHICLES:
        if await uow.get(Vehicle, str(raw["id"])) is None:
            await handlers.register_vehicle(uow, VehicleIn.model_validate(raw))
    await uow.commit()
