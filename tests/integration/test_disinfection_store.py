"""The disinfection handlers on the real stores (SQLite and PostgreSQL): the R14 check on an
injected clock, two replicas flagging at once, the patients kept for exposure lists, a trip
that ends under quarantine, and a second positive racing the re-disinfection's release."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any, TypeVar

from libs.events.aggregate import UnitOfWork, with_retry
from libs.events.catalog import dispatch as dsp
from libs.events.catalog import transfer as tr
from libs.events.envelope import Envelope, iso
from libs.events.store import Commit, EventStore, Meta, NewEvent, StreamAppend
from services.disinfection import contacts, handlers, sla
from services.disinfection.domain import Cycle, cycle_id_for, redisinfection_id_for
from services.disinfection.exposure import Exposure
from services.disinfection.protocols import DEFAULT_RULES
from services.disinfection.schemas import ResultIn, StageIn, SwabIn
from tests.scenarios import INITIAL, RESULT, SWAB, TERMINAL
from tests.scenarios_disinfection import shifted

MakeStore = Callable[[str], Awaitable[EventStore]]
META = Meta(actor="test", role="system", correlation_id="test")
NOW = datetime.fromisoformat("2022-11-21T12:00:00+08:00")  # the day after: every time is past
COLLECTED = datetime.fromisoformat(str(SWAB["collected_at"]))
HANDED_OVER = datetime.fromisoformat(str(INITIAL["started_at"])) - timedelta(minutes=20)
T = TypeVar("T")


async def run(store: EventStore, work: Callable[[UnitOfWork], Awaitable[T]]) -> T:
    result, _ = await with_retry(lambda: UnitOfWork(store, META), work)
    return result


class Vehicle:
    """One vehicle's trips, told as the transfer and dispatch services would tell them."""

    def __init__(self, store: EventStore, transfers: EventStore, dispatch: EventStore, vid: str) -> None:
        self.store, self.transfers, self.dispatch, self.vid = store, transfers, dispatch, vid

    async def consume(self, env: Envelope, handler: Any) -> None:
        async def work(uow: UnitOfWork) -> None:
            await handler(env, uow)
        await run(self.store, work)

    async def trip(self, n: int, patient: dict[str, Any] | None = None) -> str:
        transfer_id, trip_id = f"{self.vid}-t{n}", f"{self.vid}-trip{n}"
        if patient is not None:
            [req] = await self.dispatch.append(f"transfer-{transfer_id}", 0, [dsp.TransferRequested(
                transfer_id=transfer_id, patient=patient, risk_category="isolation_site",
                condition={"fever": True}, origin={"name": "永宁县集中隔离医学观察点"},
                purpose="outpatient_visit", return_required=True,
                requested_by={"channel": "console"})], META)
            await self.consume(req, contacts.on_transfer_requested)
        # Handed over 20 minutes before the first stage begins (R8: the stages follow it).
        completed = tr.TripCompleted(trip_id=trip_id, transfer_id=transfer_id, vehicle_id=self.vid)
        [done] = await self.transfers.commit(Commit(meta=META, appends=[StreamAppend(
            f"trip-{trip_id}", 0, [NewEvent(completed, occurred_at=HANDED_OVER)])]))
        await self.consume(done, handlers.on_trip_completed)
        return cycle_id_for(trip_id)

    async def disinfect(self, cycle_id: str, sample_id: str, hours: float = 0) -> None:
        for body in (INITIAL, TERMINAL):
            stage = StageIn.model_validate(shifted(body, hours))

            async def log(uow: UnitOfWork, stage: StageIn = stage) -> Cycle:
                return await handlers.log_stage(uow, cycle_id, stage, DEFAULT_RULES, NOW)

            await run(self.store, log)
        swab = SwabIn.model_validate({**shifted(SWAB, hours), "sample_id": sample_id})
        await run(self.store, lambda uow: handlers.collect_swab(uow, cycle_id, swab, DEFAULT_RULES, NOW))

    async def result(self, sample_id: str, outcome: str, hours: float = 0) -> Cycle:
        body = ResultIn.model_validate({**shifted(RESULT, hours), "result": outcome})
        return await run(self.store,
                         lambda uow: handlers.record_result(uow, sample_id, body, DEFAULT_RULES, NOW))


async def setup(make_store: MakeStore, vid: str = "v-1") -> Vehicle:
    store = await make_store("disinfection")
    await store.create_schema(contacts.metadata)
    return Vehicle(store, await make_store("transfer"), await make_store("dispatch"), vid)


async def load(store: EventStore, cls: type[Any], ident: str) -> Any:
    return await UnitOfWork.reading(store).require(cls, ident, cls.__name__.lower())


async def test_r8_a_handover_on_a_fast_phone_bounds_the_stages_by_its_receipt(make_store: MakeStore) -> None:
    """The crew's phone runs 40 minutes fast: the handover says 10:30, the transfer service
    received it at 09:50. The first stage, begun at 10:05 by the washing bay's clock, is
    after the handover: taken. Bound by the phone's time it was refused. A trip dispatch
    ended (a takeover) bounds nothing."""
    v = await setup(make_store)
    received = datetime.fromisoformat(str(INITIAL["started_at"]))
    for trip_id, reason in (("fast", tr.HANDED_OVER), ("taken-over", "vehicle withdrawn: breakdown")):
        completed = tr.TripCompleted(trip_id=trip_id, transfer_id=f"t-{trip_id}", vehicle_id=v.vid,
                                     reason=reason)
        [done] = await v.transfers.commit(Commit(meta=META, appends=[StreamAppend(
            f"trip-{trip_id}", 0, [NewEvent(completed, occurred_at=received + timedelta(minutes=40))])]))
        await v.consume(done.model_copy(update={"recorded_at": iso(received)}), handlers.on_trip_completed)
    fast = await load(v.store, Cycle, cycle_id_for("fast"))
    assert fast.trip_ended_at == iso(received) and fast.opened_at == iso(received + timedelta(minutes=40))
    assert (await load(v.store, Cycle, cycle_id_for("taken-over"))).trip_ended_at is None
    await v.disinfect(fast.id, "S-FAST", hours=0.25)  # 10:05: refused if bound by the phone's 10:30


async def test_r14_overdue_results_are_flagged_once_by_the_clock(make_store: MakeStore) -> None:
    v = await setup(make_store)
    cycle_id = await v.trip(1)
    await v.disinfect(cycle_id, "S-1")
    assert await sla.flag_overdue(v.store, COLLECTED + timedelta(hours=5, minutes=59)) == 0
    assert await sla.flag_overdue(v.store, COLLECTED + timedelta(hours=6, minutes=1)) == 1
    assert await sla.flag_overdue(v.store, COLLECTED + timedelta(hours=9)) == 0
    flags = [e for e in await v.store.read_stream(f"cycle-{cycle_id}") if e.type == "SwabResultOverdue"]
    assert len(flags) == 1 and flags[0].actor == sla.ACTOR and flags[0].payload["rule"] == "R14"
    cycle = await v.result("S-1", "negative", hours=2)
    assert cycle.status == "closed" and cycle.swabs[0]["overdue"]


async def test_r14_two_replicas_flag_a_result_once(make_store: MakeStore) -> None:
    v = await setup(make_store)
    cycle_id = await v.trip(1)
    await v.disinfect(cycle_id, "S-1")
    late = COLLECTED + timedelta(hours=7)
    flagged = await asyncio.gather(sla.flag_overdue(v.store, late), sla.flag_overdue(v.store, late))
    assert sorted(flagged) == [0, 1]
    events = await v.store.read_stream(f"cycle-{cycle_id}")
    assert [e.type for e in events].count("SwabResultOverdue") == 1


async def test_r14_the_background_check_runs_on_its_clock(make_store: MakeStore) -> None:
    v = await setup(make_store)
    cycle_id = await v.trip(1)
    await v.disinfect(cycle_id, "S-1")
    stop = asyncio.Event()
    task = asyncio.create_task(sla.run(v.store, stop, clock=lambda: COLLECTED + timedelta(hours=7)))
    try:
        for _ in range(200):
            if (await load(v.store, Cycle, cycle_id)).swabs[0]["overdue"]:
                break
            await asyncio.sleep(0.02)
        assert (await load(v.store, Cycle, cycle_id)).swabs[0]["overdue"]
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)


async def test_r9_the_exposure_list_carries_only_the_patients_contact_data(make_store: MakeStore) -> None:
    v = await setup(make_store)
    patient = {"name": "张三", "id_number": "640121198001011231", "phone": "13800138000"}
    c1 = await v.trip(1, patient)
    await v.disinfect(c1, "S-1")
    await v.result("S-1", "positive", hours=3)
    exposure = await load(v.store, Exposure, "S-1")
    assert [t["patient"] for t in exposure.transfers] == [patient]
    assert await contacts.patients_of(v.store, ["v-1-t1", "unknown"]) == {"v-1-t1": patient}


async def test_r9_a_trip_that_ends_under_quarantine_joins_the_exposure_list(make_store: MakeStore) -> None:
    v = await setup(make_store)
    c1 = await v.trip(1)
    await v.disinfect(c1, "S-1")
    await v.result("S-1", "positive", hours=3)
    acknowledged = await run(v.store, lambda uow: handlers.acknowledge_exposure(uow, "S-1", "d-1", None))
    assert acknowledged.status == "acknowledged"
    c2 = await v.trip(2, {"name": "李四"})  # under way when the result came in
    exposure = await load(v.store, Exposure, "S-1")
    assert exposure.status == "unacknowledged"
    assert [(t["transfer_id"], t["relation"]) for t in exposure.transfers] == [
        ("v-1-t1", "swabbed_trip"), ("v-1-t2", "during_quarantine")]
    assert (await load(v.store, Cycle, c2)).status == "open"  # its own cycle all the same


async def test_r9_a_second_positive_racing_the_redisinfections_release_keeps_the_vehicle_quarantined(
        make_store: MakeStore) -> None:
    """Whichever commits first, the vehicle ends quarantined, held by exactly one
    re-disinfection cycle: the release and the new quarantine never interleave unseen."""
    for round_ in range(3):
        v = await setup(make_store, f"v-{round_}")
        c1, c2 = await v.trip(1), await v.trip(2)
        await v.disinfect(c1, f"{v.vid}-S1")
        await v.disinfect(c2, f"{v.vid}-S2", hours=1)
        await v.result(f"{v.vid}-S1", "positive", hours=3)
        redo_id = redisinfection_id_for(f"{v.vid}-S1")
        await v.disinfect(redo_id, f"{v.vid}-SR", hours=8.5)  # after S1's result (18:05)
        await asyncio.gather(v.result(f"{v.vid}-S2", "positive", hours=5),
                             v.result(f"{v.vid}-SR", "negative", hours=5))

        events = [e for e in await v.store.read_all(0, 10_000) if e.payload.get("vehicle_id") == v.vid]
        gates = [e for e in events if e.type == "VehicleQuarantined"
                 or (e.type == "VehicleReleased" and e.payload["quarantine_lifted"])]
        assert gates[-1].type == "VehicleQuarantined", [g.type for g in gates]
        opened = [e.payload["cycle_id"] for e in events if e.type == "CycleOpened"]
        cycles = [await load(v.store, Cycle, cid) for cid in opened]
        holding = [c for c in cycles if c.holds_quarantine]
        assert len(holding) == 1 and holding[0].after_sample_id == f"{v.vid}-S2"
        old = next(c for c in cycles if c.id == redo_id)
        assert old.status in ("superseded", "closed")


async def test_r9_a_cycle_older_than_the_vehicles_history_still_gets_its_exposure_list(
        make_store: MakeStore) -> None:
    v = await setup(make_store)
    legacy = Cycle.open(v.vid, "old-trip", "old-t", "opened before histories were kept")

    async def add(uow: UnitOfWork) -> None:
        uow.add(legacy)
    await run(v.store, add)
    await v.disinfect(legacy.id, "S-OLD")
    await v.result("S-OLD", "positive", hours=3)
    exposure = await load(v.store, Exposure, "S-OLD")
    assert [t["transfer_id"] for t in exposure.transfers] == ["old-t"]
