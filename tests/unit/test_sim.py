"""The simulator's pure parts: the day's plan is a function of the seed and shows every
flow; the simulated clock never runs further ahead of the work than its window."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from services.dispatch.schemas import TransferIn, resident_id_ok
from sim.clock import Clock, Inbox
from sim.plan import FLOWS, INCIDENTS, LAB, build_plan, within
from sim.region import build_region

DAY = datetime(2022, 11, 20, tzinfo=UTC)


def plan(transfers: int, seed: int) -> list[tuple[object, ...]]:
    p = build_plan(transfers, seed, build_region(transfers, seed), DAY)
    return [(j.flow, j.at, j.body, j.incident, j.lab, j.admit, j.requester) for j in p.journeys]


def test_the_plan_is_a_function_of_the_seed() -> None:
    assert plan(300, 5) == plan(300, 5)
    assert plan(300, 5) != plan(300, 6)


def test_a_small_day_still_shows_every_flow_and_every_required_incident() -> None:
    p = build_plan(80, 8, build_region(80, 8), DAY)
    assert set(p.mix) == set(FLOWS)
    incidents = [j.incident for j in p.journeys if j.incident]
    labs = [j.lab for j in p.journeys if j.lab]
    assert {name for name, (_, required) in INCIDENTS.items() if required} <= set(incidents)
    assert {name for name, (_, required) in LAB.items() if required} <= set(labs)
    # A journey carries one incident at most, and a lab flag only when its patient rides.
    assert not [j for j in p.journeys if j.incident and j.lab]
    assert not [j for j in p.journeys if j.flow == "care" and (j.incident or j.lab)]
    assert all(DAY <= j.at < DAY + timedelta(days=1) for j in p.journeys)


def test_every_request_is_one_the_api_accepts_for_a_distinct_person() -> None:
    p = build_plan(500, 2, build_region(500, 2), DAY)
    ids = [j.body["patient"]["id_number"] for j in p.journeys]
    assert len(set(ids)) == len(ids) and all(resident_id_ok(i) for i in ids)
    for j in p.journeys:
        TransferIn.model_validate(j.body)
        origin = j.body["origin"].get("facility_id")
        if j.requester.role == "site":
            assert origin == j.requester.site_id  # the site files for its own people
        if j.requester.role == "hospital":
            assert origin == j.requester.facility_id


def test_the_fleet_fits_every_kind_of_patient_the_plan_holds() -> None:
    p = build_plan(2000, 3, build_region(2000, 3), DAY)
    kinds = {(v.kind == "negative_pressure_ambulance", v.life_support) for v in p.fleet}
    for needs in {j.needs for j in p.journeys}:
        assert needs in kinds, needs
    assert len(p.fleet) < 2000  # sized for the busiest hour, not one per transfer


def test_a_window_of_the_day_keeps_its_requests_and_the_whole_fleet() -> None:
    day = build_plan(300, 4, build_region(300, 4), DAY)
    busy = within(day, DAY + timedelta(hours=8), DAY + timedelta(hours=18))
    assert busy.journeys == [j for j in day.journeys if 8 <= j.at.hour < 18]
    assert 0 < len(busy.journeys) < len(day.journeys)
    assert sum(busy.mix.values()) == len(busy.journeys) and busy.fleet == day.fleet


async def test_the_clock_waits_for_work_and_never_runs_past_its_window() -> None:
    clock = Clock(DAY, tick_s=60, window_s=600)
    seen: list[tuple[str, int]] = []
    ahead: list[int] = []

    async def slow(name: str) -> None:
        for step in range(5):
            await clock.until(DAY + timedelta(minutes=7 * step))
            started = clock.k
            await asyncio.sleep(0.02)  # a request in flight
            ahead.append(clock.k - started)
            seen.append((name, step))

    async def daemon() -> None:
        while True:
            await clock.sleep(60, essential=False)

    for n in range(3):
        clock.spawn(slow(f"agent{n}"))
    clock.spawn(daemon(), essential=False)
    finished = await clock.run(lambda: clock.essential_agents == 0, DAY + timedelta(days=1))
    assert finished and len(seen) == 15
    assert max(ahead) <= 10  # the window: 600 s of 60 s ticks
    assert clock.now < DAY + timedelta(hours=1)  # ended when the work did, daemons aside


async def test_a_deadline_ends_the_day_and_an_inbox_does_not_hold_the_clock() -> None:
    clock = Clock(DAY, tick_s=60, idle_speed=1e6)
    inbox: Inbox[str] = Inbox(clock)
    got: list[str] = []

    async def reader() -> None:
        got.append(await inbox.get())
        got.append(await inbox.get())  # never comes

    async def writer() -> None:
        await clock.until(DAY + timedelta(hours=2))
        inbox.put("hello")
        await clock.until(DAY + timedelta(hours=5))

    async def board() -> None:
        while True:
            await clock.sleep(3600, essential=False)

    clock.spawn(reader(), essential=False)
    clock.spawn(writer())
    clock.spawn(board(), essential=False)
    assert await clock.run(lambda: False, DAY + timedelta(hours=6)) is False
    assert got == ["hello"]
    assert DAY + timedelta(hours=5) <= clock.now <= DAY + timedelta(hours=6)
