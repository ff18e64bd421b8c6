"""The default load of the fault tests: crews running whole transfers through the public API
with their own tokens, one loop after another, until told to stop (then each finishes the
loop it is in, so the history ends with closed loops).

A loop: the dispatcher posts a transfer (a fever patient from the isolation site, who needs
a negative-pressure ambulance); the crew of the vehicle dispatch chose reports the six steps
and the handover; the disinfection staff log both stages and the swab; the lab posts a
negative result; the loop ends when dispatch has the vehicle back. Every step waits on what
another service learns from events (the trip, the cycle, the release), so a loop completes
only if the whole pipeline moves.

Times in the requests follow each vehicle's own story clock (the crews' phones and the
stage logs), which starts days back and moves 80 minutes a loop: a disinfection needs 30
minutes a stage by the national protocol, and a vehicle's stories must not overlap.

`crews(n)` is a `LoadGenerator` (tests/faults/harness.py); the simulator's `run_day` will
stand in for it through the same signature.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any, cast

import httpx

from libs.events.envelope import utcnow
from tests.faults.harness import LoadGenerator, Target
from tests.scenarios import FACILITIES, STEPS, TRANSFER, eventually, ok

API = "/api/v1"
LOOP = timedelta(minutes=80)
WAIT_S = 240.0  # for what other services learn: long enough to ride out any one fault
POLL_S = 0.25


class StoryClocks:
    """Per vehicle, when its next story may begin (none overlaps the one before)."""

    def __init__(self, start: datetime) -> None:
        self.start = start
        self.next: dict[str, datetime] = {}

    def exhausted(self) -> bool:
        """A story begun now might reach today (the server refuses times in the future)."""
        latest = max(self.next.values(), default=self.start)
        return latest + LOOP > utcnow() - timedelta(minutes=10)

    def take(self, vehicle_id: str) -> datetime:
        at = self.next.get(vehicle_id, self.start)
        self.next[vehicle_id] = at + LOOP
        return at


def fleet(n: int) -> list[dict[str, Any]]:
    return [{"id": f"flt-{i:02d}", "plate": f"宁A·F{i:04d}", "kind": "negative_pressure_ambulance",
             "dedicated_pool": True, "life_support": True, "station": "永宁县急救站",
             "location": {"lat": 38.28 + i / 1000, "lon": 106.25}} for i in range(1, n + 1)]


async def ensure_reference_data(c: httpx.AsyncClient, vehicles: int) -> None:
    have = {f["id"] for f in ok(await c.get(f"{API}/facilities"))}
    for facility in cast(list[dict[str, Any]], FACILITIES):
        if facility["id"] not in have:
            ok(await c.post(f"{API}/facilities", json=facility), 201)
    have = {v["id"] for v in ok(await c.get(f"{API}/vehicles", params={"limit": 500}))}
    for vehicle in fleet(vehicles):
        if vehicle["id"] not in have:
            ok(await c.post(f"{API}/vehicles", json=vehicle), 201)


async def until(probe: Callable[[], Awaitable[Any]], what: str) -> Any:
    return await eventually(probe, what, timeout=WAIT_S, every=POLL_S)


def at(t0: datetime, minutes: float) -> str:
    return (t0 + timedelta(minutes=minutes)).isoformat()


def stage(kind: str, t0: datetime, start: float) -> dict[str, Any]:
    """A stage of 32 minutes from `start` (minutes after t0), its footage a minute either side."""
    return {"stage": kind, "disinfectant": "chlorine", "concentration_mg_per_l": 1000,
            "method": "wipe_and_spray", "started_at": at(t0, start), "ended_at": at(t0, start + 32),
            "operator": "王五", "location": "永宁县急救站洗消间",
            "video": {"camera_id": "yn-wash-cam-01", "clip_ref": f"nvr://yn/wash/cam-01/{uuid.uuid4().hex[:12]}",
                      "from": at(t0, start - 1), "to": at(t0, start + 33)}}


class Crew:
    def __init__(self, c: httpx.AsyncClient, target: Target, n: int, clocks: StoryClocks, run: str) -> None:
        self.c, self.acting, self.n, self.clocks, self.run = c, target.acting, n, clocks, run
        self.loops = 0

    async def loop(self) -> bool:
        """One transfer from request to the vehicle back in dispatch's hands. False when the
        story clock has caught up with today."""
        c, acting = self.c, self.acting
        if self.clocks.exhausted():
            return False
        body = {**TRANSFER, "patient": {"name": f"压测{self.run}-{self.n}-{self.loops}"},
                "return_required": False}
        transfer = ok(await c.post(f"{API}/transfers", json=body,
                                   headers=acting.headers("dispatcher", f"dispatcher-{self.n}")), 201)
        tid = transfer["id"]

        async def assigned() -> Any:
            return ok(await c.get(f"{API}/transfers/{tid}"))["vehicle_id"]

        vehicle = transfer["vehicle_id"] or await until(assigned, f"a vehicle for {tid}")
        crew = acting.headers("crew", f"crew-{vehicle}", vehicle_id=vehicle)

        async def trip_opened() -> Any:
            # the open ones: a vehicle's history runs past a page
            trips = ok(await c.get(f"{API}/trips", params={"vehicle_id": vehicle, "status": "open"}))
            return next((t for t in trips if t["transfer_id"] == tid), None)

        trip = await until(trip_opened, f"the trip of {tid}")
        t0 = self.clocks.take(vehicle)
        for i, step in enumerate(STEPS, start=1):
            ok(await c.post(f"{API}/trips/{trip['id']}/steps", headers=crew,
                            json={"step": step, "at": at(t0, i), "client_event_id": f"{tid}-{i}"}))
        ok(await c.post(f"{API}/trips/{trip['id']}/handover", headers=crew,
                        json={"facility_id": trip["destination_id"], "received_by": "接诊医生",
                              "at": at(t0, 7)}))

        async def cycle_opened() -> Any:
            cycles = ok(await c.get(f"{API}/disinfection/cycles",
                                    params={"vehicle_id": vehicle, "status": "open"}))
            return next((x for x in cycles if x["trip_id"] == trip["id"] and x["kind"] == "trip"), None)

        cycle = await until(cycle_opened, f"the cycle of trip {trip['id']}")
        staff = acting.headers("disinfection", f"wash-{self.n}")
        for kind, start in (("initial", 8.0), ("terminal", 42.0)):
            ok(await c.post(f"{API}/disinfection/cycles/{cycle['id']}/stages", headers=staff,
                            json=stage(kind, t0, start)), 201)
        sample = f"FT-{uuid.uuid4().hex[:16].upper()}"
        ok(await c.post(f"{API}/disinfection/cycles/{cycle['id']}/swabs", headers=staff,
                        json={"sample_id": sample, "sites": ["stretcher", "handrail", "door_handle"],
                              "collected_by": "赵六", "collected_at": at(t0, 76)}), 201)
        result = {"result": "negative", "lab": "永宁县人民医院检验科", "reported_at": at(t0, 78)}
        ok(await c.post(f"{API}/disinfection/swabs/{sample}/result", headers=acting.headers("lab"),
                        json=result))

        async def back() -> bool:
            v = ok(await c.get(f"{API}/vehicles/{vehicle}"))
            return bool(v["transfer_id"] != tid and trip["id"] not in v["awaiting_disinfection_for"])

        await until(back, f"dispatch to have {vehicle} back after trip {trip['id']}")
        self.loops += 1
        return True


def crews(n: int, story_days: float = 5.0, pause_s: float = 1.0, seed: int = 8) -> LoadGenerator:
    """n crews (and n vehicles), each running loops until stopped, `pause_s` between two."""

    async def run(target: Target, stop: asyncio.Event) -> None:
        clocks = StoryClocks(utcnow() - timedelta(days=story_days))
        run_id = uuid.uuid4().hex[:6]
        rng = random.Random(seed)
        async with target.client() as c:
            await ensure_reference_data(c, n)
            team = [Crew(c, target, i, clocks, run_id) for i in range(1, n + 1)]

            async def work(crew: Crew) -> None:
                await asyncio.sleep(rng.uniform(0, 1.0))  # not all at once
                while not stop.is_set() and await crew.loop():
                    await asyncio.sleep(rng.uniform(0.5, 1.5) * pause_s)

            tasks = [asyncio.create_task(work(crew)) for crew in team]
            try:
                await asyncio.gather(*tasks)
            finally:
                for task in tasks:
                    task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.gather(*tasks, return_exceptions=True)
            target.note(f"crews: {sum(c.loops for c in team)} loops by {n} crews")

    return run
