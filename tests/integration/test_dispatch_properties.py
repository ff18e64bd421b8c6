"""Property-based tests of the queue and assignment (issue 3), through the real handlers and
consumers over a real store, for random sequences of requests, vehicles, trip ends,
releases, cancellations and breakdowns:

- never two patients in one vehicle (R1);
- never a vehicle assigned before disinfection released it (R2);
- a transfer never waits while a vehicle that may carry it sits free, and a freed vehicle
  takes the first waiting transfer it may carry (R4);
- in the end every transfer is assigned, done or cancelled, or waits for a kind of vehicle
  the fleet does not have (and the queue says so).
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import uuid
from typing import Any

from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from libs.events.aggregate import DomainError, UnitOfWork
from libs.events.envelope import GENESIS_HASH, Envelope
from libs.events.store import EventStore, Meta
from services.dispatch import consumers, handlers
from services.dispatch.domain import Transfer, Vehicle, vehicle_needs
from services.dispatch.schemas import AssignIn, CancelIn, DutyIn, OutOfServiceIn, TransferIn, VehicleIn
from tests.scenarios import TRANSFER

KINDS = {
    "fever": {"risk_category": "isolation_site", "condition": {"fever": True}},
    "stroke": {"risk_category": "home_monitoring", "condition": {"critical": True, "kind": "stroke"}},
    "home": {"risk_category": "home_monitoring", "condition": {}},
    "confirmed": {"risk_category": "confirmed", "condition": {"severity": "mild"}},
}
FLEET = {
    "npa": {"kind": "negative_pressure_ambulance", "life_support": True},
    "npa_basic": {"kind": "negative_pressure_ambulance", "life_support": False},
    "car": {"kind": "dedicated_vehicle", "life_support": False},
}


def envelope(event_type: str, payload: dict[str, Any], store: str) -> Envelope:
    """What a consumer receives from another service (the hash is irrelevant here)."""
    return Envelope(event_id=uuid.uuid4(), type=event_type, schema_version=1, store=store,
                    stream_id="x", stream_version=1, position=1, occurred_at="2022-11-20T01:00:00+00:00",
                    recorded_at="2022-11-20T01:00:00+00:00", actor="test", role="system",
                    correlation_id="prop", payload=payload, prev_hash=GENESIS_HASH, hash=GENESIS_HASH)


class Dispatching(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.dir = tempfile.mkdtemp()
        self.store = EventStore.from_url("dispatch", f"sqlite+aiosqlite:///{self.dir}/d.db")
        self.run(self.store.create_schema())
        self.n = 0
        self.served: list[tuple[str, str]] = []  # (vehicle, transfer) taken from the queue
        self.withdrawn: list[tuple[str, str]] = []  # (vehicle, transfer) whose trip has not ended

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        self.run(self.store.close())
        self.loop.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def uow(self) -> UnitOfWork:
        return UnitOfWork(self.store, Meta(actor="prop", role="dispatcher", correlation_id="prop"))

    async def all(self, cls: Any) -> list[Any]:
        return await UnitOfWork.reading(self.store).find(cls, limit=100_000)

    def pick(self, data: Any, *statuses: str) -> Vehicle | None:
        """A vehicle in one of these statuses, drawn; None when there is none."""
        fleet = [v for v in self.run(self.all(Vehicle)) if v.status in statuses]
        return data.draw(st.sampled_from(fleet)) if fleet else None

    @rule(kind=st.sampled_from(sorted(KINDS)))
    def request(self, kind: str) -> None:
        self.n += 1
        body = TransferIn.model_validate({**TRANSFER, **KINDS[kind], "patient": {"name": f"p{self.n}"}})

        async def go() -> None:
            uow = self.uow()
            await handlers.request_transfer(uow, f"t{self.n:03d}", body)
            await uow.commit()

        self.run(go())

    @rule(kind=st.sampled_from(sorted(FLEET)))
    def add_vehicle(self, kind: str) -> None:
        self.n += 1
        body = VehicleIn.model_validate({
            "id": f"v{self.n:03d}", "plate": "宁A", "dedicated_pool": True, "station": "s",
            "location": {"lat": 38.28 + self.n / 1000, "lon": 106.25}, **FLEET[kind]})

        async def go() -> None:
            uow = self.uow()
            vehicle = await handlers.register_vehicle(uow, body)
            served = await UnitOfWork.reading(self.store).find(Transfer, status=["queued"])
            await uow.commit()
            if vehicle.transfer_id:
                self.served.append((vehicle.id, vehicle.transfer_id))
                await self.check_served(vehicle.id, vehicle.transfer_id, served)

        self.run(go())

    async def check_served(self, vehicle_id: str, transfer_id: str, queued_before: list[Transfer]) -> None:
        """R4: the freed vehicle took the first waiting transfer it may carry."""
        vehicle = await UnitOfWork.reading(self.store).require(Vehicle, vehicle_id, "vehicle")
        fits = [t for t in queued_before if vehicle.fits(vehicle_needs(t.risk_category, t.condition))]
        if fits:
            first = min(fits, key=lambda t: (t.priority, t.requested_at))
            assert first.id == transfer_id, (first.id, transfer_id)

    @precondition(lambda self: self.n > 0)
    @rule(data=st.data())
    def trip_ends(self, data: st.DataObject) -> None:
        v = self.pick(data, "assigned")
        if v is None:
            return
        trip = {"trip_id": f"trip-{v.transfer_id}", "transfer_id": v.transfer_id}
        handover = {**trip, "facility_id": "yc-second", "received_by": "李医生", "confirmed_by": "crew"}

        async def go() -> None:  # what the transfer service commits together at a handover
            uow = self.uow()
            await consumers.on_patient_handed_over(envelope("PatientHandedOver", handover, "transfer"), uow)
            await uow.commit()
            uow = self.uow()
            await consumers.on_trip_completed(
                envelope("TripCompleted", {**trip, "vehicle_id": v.id}, "transfer"), uow)
            await uow.commit()

        self.run(go())

    @precondition(lambda self: self.n > 0)
    @rule(data=st.data())
    def disinfection_releases(self, data: st.DataObject) -> None:
        waiting = [v for v in self.run(self.all(Vehicle)) if v.awaiting_trips]
        if not waiting:
            return
        v = data.draw(st.sampled_from(waiting))
        payload = {"cycle_id": f"c-{v.awaiting_trips[0]}", "vehicle_id": v.id,
                   "trip_id": v.awaiting_trips[0], "policy": "after_swab_collected"}
        self.run(self.frees(v.id, consumers.on_vehicle_released,
                            envelope("VehicleReleased", payload, "disinfection")))

    async def frees(self, vehicle_id: str, consumer: Any, env: Envelope) -> None:
        """An event that may free the vehicle: whatever it then takes is the first queued
        transfer it may carry (R4)."""
        queued = await UnitOfWork.reading(self.store).find(Transfer, status=["queued"])
        before = await UnitOfWork.reading(self.store).require(Vehicle, vehicle_id, "vehicle")
        uow = self.uow()
        await consumer(env, uow)
        await uow.commit()
        after = await UnitOfWork.reading(self.store).require(Vehicle, vehicle_id, "vehicle")
        if after.transfer_id and after.transfer_id != before.transfer_id:
            self.served.append((vehicle_id, after.transfer_id))
            await self.check_served(vehicle_id, after.transfer_id, queued)

    @precondition(lambda self: self.n > 0)
    @rule(data=st.data())
    def release_overtakes_the_trips_end(self, data: st.DataObject) -> None:
        """The disinfection release reaches dispatch before the trip's end does (the two
        come from two services): the vehicle comes back when the end arrives, and serves
        the queue then (a simulated day left critical patients waiting hours for it)."""
        v = self.pick(data, "assigned")
        if v is None:
            return
        trip = {"trip_id": f"trip-{v.transfer_id}", "transfer_id": v.transfer_id}
        released = {"cycle_id": f"c-{trip['trip_id']}", "vehicle_id": v.id, "trip_id": trip["trip_id"],
                    "policy": "after_swab_collected"}

        handover = {**trip, "facility_id": "yc-second", "received_by": "李医生", "confirmed_by": "crew"}

        async def go() -> None:
            uow = self.uow()
            await consumers.on_vehicle_released(envelope("VehicleReleased", released, "disinfection"), uow)
            await uow.commit()
            uow = self.uow()
            await consumers.on_patient_handed_over(envelope("PatientHandedOver", handover, "transfer"), uow)
            await uow.commit()
            await self.frees(v.id, consumers.on_trip_completed,
                             envelope("TripCompleted", {**trip, "vehicle_id": v.id}, "transfer"))

        self.run(go())

    @precondition(lambda self: self.n > 0)
    @rule(data=st.data())
    def dispatcher_assigns_by_hand(self, data: st.DataObject) -> None:
        """Any waiting transfer, any vehicle, no override: the rules decide."""
        waiting = [t for t in self.run(self.all(Transfer)) if t.status == "queued"]
        fleet = self.run(self.all(Vehicle))
        if not waiting or not fleet:
            return
        self.try_by_hand(data.draw(st.sampled_from(waiting)), data.draw(st.sampled_from(fleet)))

    @precondition(lambda self: self.n > 0)
    @rule(data=st.data())
    def dispatcher_reaches_for_an_undisinfected_vehicle(self, data: st.DataObject) -> None:
        """The tempting mistake R2 forbids: the vehicle back from a trip, not yet released."""
        v = self.pick(data, "awaiting_disinfection")
        if v is None:
            return
        waiting = [t for t in self.run(self.all(Transfer)) if t.status == "queued"
                   and v.fits(vehicle_needs(t.risk_category, t.condition))]
        if waiting:
            self.try_by_hand(data.draw(st.sampled_from(waiting)), v)

    def try_by_hand(self, t: Transfer, v: Vehicle) -> None:
        async def go() -> None:
            uow = self.uow()
            try:
                await handlers.assign_manually(uow, t.id, AssignIn(vehicle_id=v.id), "dispatcher")
                await uow.commit()
            except DomainError:
                pass

        self.run(go())

    @precondition(lambda self: self.n > 0)
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        live = [t for t in self.run(self.all(Transfer)) if t.status in ("queued", "assigned")]
        if not live:
            return
        t = data.draw(st.sampled_from(live))

        async def go() -> None:
            uow = self.uow()
            await handlers.cancel(uow, t.id, CancelIn(reason="patient refused"))
            await uow.commit()

        self.run(go())

    @precondition(lambda self: self.n > 0)
    @rule(data=st.data())
    def breakdown(self, data: st.DataObject) -> None:
        v = self.pick(data, "available", "assigned", "out_of_service")  # reported twice too
        if v is None:
            return

        async def go() -> None:
            uow = self.uow()
            try:
                await handlers.take_out_of_service(uow, v.id, OutOfServiceIn(reason="breakdown"))
                await uow.commit()
            except DomainError:
                return
            if v.status == "assigned" and v.transfer_id:
                self.withdrawn.append((v.id, v.transfer_id))

        self.run(go())

    @precondition(lambda self: self.n > 0)
    @rule(data=st.data())
    def repaired(self, data: st.DataObject) -> None:
        v = self.pick(data, "out_of_service")
        if v is None:
            return

        async def go() -> None:
            queued = await UnitOfWork.reading(self.store).find(Transfer, status=["queued"])
            uow = self.uow()
            vehicle = await handlers.set_duty(uow, v.id, DutyIn(on_duty=True, reason="repaired"))
            await uow.commit()
            if vehicle.transfer_id and vehicle.status == "assigned":
                self.served.append((v.id, vehicle.transfer_id))
                await self.check_served(v.id, vehicle.transfer_id, queued)

        self.run(go())

    @precondition(lambda self: self.n > 0)
    @rule(data=st.data(), end=st.sampled_from(["carried", "withdrawn", "crew_requeue", "crew_cancel"]))
    def withdrawn_trip_ends(self, data: st.DataObject, end: str) -> None:
        """The transfer service ends the trip of a vehicle dispatch took off its transfer:
        completed when the crew had reported the patient aboard (a step dispatch may not
        have read at the breakdown), aborted when not, or aborted by the crew's own report
        that crossed the breakdown's; before or after the repair."""
        if not self.withdrawn:
            return
        vehicle_id, transfer_id = self.withdrawn.pop(data.draw(st.integers(0, len(self.withdrawn) - 1)))
        trip = {"trip_id": f"trip-{transfer_id}-{vehicle_id}", "transfer_id": transfer_id,
                "vehicle_id": vehicle_id, "reason": f"vehicle {vehicle_id} withdrawn"}
        if end == "carried":
            self.run(self.frees(vehicle_id, consumers.on_trip_completed,
                                envelope("TripCompleted", trip, "transfer")))
            return
        crew = {"code": "patient_absent", "aborted_by": "crew",
                "dispatch_action": end.removeprefix("crew_")} if end.startswith("crew_") else {}
        self.run(self.frees(vehicle_id, consumers.on_trip_aborted,
                            envelope("TripAborted", {**trip, **crew}, "transfer")))

    @invariant()
    def r2_a_held_vehicle_has_its_trips_end_on_the_way(self) -> None:
        """Held for a trip's end that never comes, a vehicle would wait for good."""
        held = {(v.id, v.trip_end_awaited) for v in self.run(self.all(Vehicle)) if v.trip_end_awaited}
        assert held <= set(self.withdrawn), (held, self.withdrawn)

    @invariant()
    def r1_one_patient_per_vehicle(self) -> None:
        transfers = self.run(self.all(Transfer))
        carrying = [t.vehicle_id for t in transfers if t.status in ("assigned", "picked_up")]
        assert len(carrying) == len(set(carrying)), carrying
        fleet = {v.id: v for v in self.run(self.all(Vehicle))}
        for v in fleet.values():
            if v.status == "assigned":
                assert [t.id for t in transfers if t.vehicle_id == v.id and t.live] == [v.transfer_id]
        for t in transfers:  # and the vehicle of each transfer under way carries it
            if t.status == "assigned" and t.vehicle_id:
                v = fleet[t.vehicle_id]
                assert (v.status, v.transfer_id) == ("assigned", t.id), (t.id, v.id, v.status, v.transfer_id)

    @invariant()
    def r2_no_assignment_before_release(self) -> None:
        for v in self.run(self.all(Vehicle)):
            if v.status == "assigned":
                assert not v.awaiting_trips, (v.id, v.awaiting_trips)

    @invariant()
    def r4_nobody_waits_while_a_fitting_vehicle_is_free(self) -> None:
        free = [v for v in self.run(self.all(Vehicle)) if v.status == "available"]
        for t in self.run(self.all(Transfer)):
            if t.status == "queued":
                needs = vehicle_needs(t.risk_category, t.condition)
                assert not [v.id for v in free if v.fits(needs)], (t.id, t.condition)

    @invariant()
    def every_transfer_is_assigned_done_cancelled_or_waits_for_a_kind_the_fleet_lacks(self) -> None:
        # Play the day out: every trip ends and is released until nothing more moves.
        fleet = self.run(self.all(Vehicle))
        for t in self.run(self.all(Transfer)):
            assert t.status in ("requested", "queued", "assigned", "picked_up", "handed_over", "cancelled")
            if t.status == "requested":
                raise AssertionError(f"{t.id} was left neither assigned nor queued")
            if t.status == "queued":
                assert t.status_reason, "the queue says why it waits"
                in_service = [v for v in fleet if v.status not in ("out_of_service", "quarantined")]
                needs = vehicle_needs(t.risk_category, t.condition)
                if not any(v.fits(needs) for v in in_service):
                    continue  # waits for a kind of vehicle the fleet does not have now
                busy = [v for v in in_service if v.fits(needs)]
                assert all(v.status != "available" for v in busy)


TestDispatching = Dispatching.TestCase
# No shrinking: replaying 25-step histories against a store to shrink a failure ran past the
# test timeout when this suite was mutation-checked (a reversed queue order, R2 let through:
# both caught in seconds without it). A failing example is printed as generated.
TestDispatching.settings = settings(
    max_examples=40, stateful_step_count=25, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    phases=[Phase.explicit, Phase.reuse, Phase.generate])


def test_r4_a_vehicle_whose_release_overtook_its_trips_end_takes_the_queue_when_the_end_comes() -> None:
    """Found on a simulated day: the release reached dispatch first, the trip's end put the
    vehicle back in service, and nobody served the queue: a critical patient waited hours
    while the vehicle went to a newer, less urgent request."""
    machine = Dispatching()
    try:
        machine.add_vehicle("npa")
        machine.request("fever")  # takes the vehicle
        machine.request("fever")  # waits
        [first, waiting] = sorted(machine.run(machine.all(Transfer)), key=lambda t: t.id)
        assert (first.status, waiting.status) == ("assigned", "queued")
        vehicle = machine.run(machine.all(Vehicle))[0]
        trip = {"trip_id": f"trip-{first.id}", "transfer_id": first.id}
        released = {"cycle_id": "c-1", "vehicle_id": vehicle.id, "trip_id": trip["trip_id"],
                    "policy": "after_swab_collected"}
        handover = {**trip, "facility_id": "yc-second", "received_by": "李医生", "confirmed_by": "crew"}
        machine.run(machine.frees(vehicle.id, consumers.on_vehicle_released,
                                  envelope("VehicleReleased", released, "disinfection")))
        machine.run(machine.frees(vehicle.id, consumers.on_patient_handed_over,
                                  envelope("PatientHandedOver", handover, "transfer")))
        machine.run(machine.frees(vehicle.id, consumers.on_trip_completed,
                                  envelope("TripCompleted", {**trip, "vehicle_id": vehicle.id}, "transfer")))
        assert machine.served == [(vehicle.id, waiting.id)]
    finally:
        machine.teardown()


def test_r2_a_vehicle_repaired_before_its_trips_end_is_not_assigned_again() -> None:
    """Found on a simulated day: a breakdown reported before dispatch read the crew's
    patient_aboard step; repaired, the vehicle took a queued transfer, then its trip's
    end said it had carried the patient (three R2 violations the audit found), and that
    late end took the vehicle off the transfer it had been given."""
    machine = Dispatching()
    try:
        machine.add_vehicle("npa")
        machine.request("fever")  # takes the vehicle
        vehicle = machine.run(machine.all(Vehicle))[0]
        machine.breakdown(_Pick(vehicle))  # type: ignore[arg-type]
        machine.request("fever")  # waits, with the first: no other vehicle
        machine.repaired(_Pick(vehicle))  # type: ignore[arg-type]
        held = machine.run(machine.all(Vehicle))[0]
        assert held.status == "awaiting_disinfection" and not machine.served
        machine.withdrawn_trip_ends(_Pick(0), end="carried")  # type: ignore[arg-type]
        machine.r1_one_patient_per_vehicle()
        after = machine.run(machine.all(Vehicle))[0]
        assert (after.status, after.transfer_id) == ("awaiting_disinfection", None)
    finally:
        machine.teardown()


class _Pick:
    """Stands for hypothesis' data object in a rule called by hand: every draw is this."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def draw(self, _strategy: Any) -> Any:
        return self.value


def test_r2_a_crew_abort_that_crossed_the_breakdown_frees_the_held_vehicle() -> None:
    """The crew aborts (patient absent) while the dispatcher reports the breakdown: the
    transfer service's only word on that trip is the crew's abort, which dispatch's
    crew_aborted passes over (the transfer is no longer that vehicle's). The hold ends
    with it all the same; before, the repaired vehicle waited for good."""
    machine = Dispatching()
    try:
        machine.add_vehicle("npa")
        machine.request("fever")
        vehicle = machine.run(machine.all(Vehicle))[0]
        machine.breakdown(_Pick(vehicle))  # type: ignore[arg-type]
        machine.repaired(_Pick(vehicle))  # type: ignore[arg-type]
        machine.withdrawn_trip_ends(_Pick(0), end="crew_requeue")  # type: ignore[arg-type]
        machine.r2_a_held_vehicle_has_its_trips_end_on_the_way()
        freed = machine.run(machine.all(Vehicle))[0]
        # free, it took the transfer back (the only one waiting), now as a fresh trip
        assert (freed.status, freed.trip_end_awaited) == ("assigned", None)
        assert [t.status for t in machine.run(machine.all(Transfer))] == ["assigned"]
    finally:
        machine.teardown()
