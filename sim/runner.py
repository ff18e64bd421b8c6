"""run_day: a simulated day against running services, through their public API only.

    summary = await run_day("http://127.0.0.1:8000", transfers=2000, seed=7)   # `make run`
    summary = await run_day({"dispatch": "http://127.0.0.1:8001", ...}, ...)    # `make up`
    async with embedded(data_dir) as target:                                     # its own app
        summary = await run_day(target.base_urls, data_dir=data_dir, pids=target.pids)

Tokens come from the local issuer under the target's data dir (services.settings), one per
actor. The invariant checker (services/invariants) reads the stores afterwards: the
summary's `target` names them (mode, data dir).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import socket
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from datetime import time as dtime
from pathlib import Path
from typing import Any

import httpx

from services.settings import Settings
from sim.api import Actor, Api, Refused
from sim.clock import Clock
from sim.plan import Plan, build_plan, within
from sim.region import Point, Region, build_region, distance_km
from sim.summary import Summary
from sim.world import TZ, VehicleAgent, World

AUDITOR = Actor("auditor-sim", "auditor")
ADMINS = tuple(Actor(f"admin-sim-{i}", "admin") for i in range(8))
DRAIN = timedelta(hours=12)  # after the day: return legs, lab results, the last releases
SETUP_CONCURRENCY = 16


@dataclass
class Progress:
    sim_now: datetime
    day_fraction: float
    requested: int
    completed: int
    open: int
    requests: int
    refused: int
    server_errors: int
    wall_s: float


@dataclass
class Target:
    base_urls: str | dict[str, str]
    data_dir: Path
    mode: str = "embedded"
    pids: dict[str, int] = field(default_factory=dict)


def default_day() -> datetime:
    """The day before yesterday, Beijing time: every device time of the day and its drain
    lies in the past of the server's clock (services refuse times ahead of it)."""
    today = datetime.now(TZ).date()
    return datetime.combine(today - timedelta(days=2), dtime(0, 0), TZ)


async def run_day(base_urls: str | Mapping[str, str], *, transfers: int = 50_000,
                  speed: float | None = None, seed: int = 1, data_dir: Path = Path(".run/data"),
                  transport: httpx.AsyncBaseTransport | None = None, day: date | None = None,
                  tick_s: float = 20.0, max_inflight: int = 48, mode: str = "embedded",
                  pids: Mapping[str, int] | None = None,
                  progress: Callable[[Progress], None] | None = None,
                  hours: tuple[float, float] = (0.0, 24.0),
                  until: asyncio.Event | None = None) -> Summary:
    """Simulate one day of `transfers` requests; the plan is a function of `seed`. Only
    the requests of `hours` (from, to: hours of the day) are filed, and none once `until`
    is set: what was filed then goes on to its end, at full speed (a load that stops)."""
    started = time.monotonic()
    issuer = Settings(data_dir=data_dir).local_issuer()
    api = Api(base_urls, issuer, transport=transport, max_inflight=max_inflight)
    start = datetime.combine(day, dtime(0, 0), TZ) if day else default_day()
    region = build_region(transfers, seed)
    first, closes = start + timedelta(hours=hours[0]), start + timedelta(hours=hours[1])
    plan = within(build_plan(transfers, seed, region, start), first, closes)
    run_tag = uuid.uuid4().hex[:8]
    clock = Clock(first, tick_s=tick_s, speed=speed)
    world = World(api, clock, plan, region, run_tag, until)
    hurry = asyncio.create_task(_full_speed_once(until, clock)) if until is not None else None
    try:
        before = await event_counts(api)
        await register(api, world, region, plan)
        setup_s = time.monotonic() - started
        clock.spawn(world.intake(), name="intake")
        clock.spawn(world.board(), essential=False, name="board")
        for f in region.with_role("fever_clinic"):
            clock.spawn(world.report_loads(f.id), essential=False, name=f"load {f.id}")
        for agent in world.vehicles.values():
            clock.spawn(agent.run(), essential=False, name=f"vehicle {agent.id}")
        last = [0.0]

        def tick() -> None:
            if progress is None or time.monotonic() - last[0] < 0.5:
                return
            last[0] = time.monotonic()
            progress(progress_of(world, started))

        finished = await clock.run(world.finished, closes + DRAIN, tick)
        if progress is not None:
            progress(progress_of(world, started))
        await world.end_care()
        day_over = time.monotonic()
        after, chains_ok, breaks = await settled_event_counts(api, before)
        caught_up = time.monotonic() - day_over
        wall_s = time.monotonic() - started
    finally:
        if hurry is not None:
            hurry.cancel()
        await api.aclose()
    flows = Counter(world.flows)
    unfinished = {"transfers": sorted(world.open_transfers), "loops": sorted(world.loops_pending),
                  "care_series": sorted(world.care_pending), "agents": clock.left_over,
                  "busy_vehicles": sorted(v.id for v in world.vehicles.values() if v.busy or v.inbox)}
    for what, ids in unfinished.items():
        if ids:
            flows[f"unfinished_{what}"] = len(ids)
    http = Summary.http(api.stats)
    fleet = Counter(f"{v.kind}{'+life_support' if v.life_support else ''}" for v in plan.fleet)
    return Summary(
        seed=seed, transfers=transfers, speed=speed,
        target={"mode": mode, "base_urls": base_urls if isinstance(base_urls, str) else dict(base_urls),
                "data_dir": str(data_dir)},
        day=start.date().isoformat(), finished=finished, wall_s=round(wall_s, 1),
        setup_s=round(setup_s, 1), sim_hours=round((clock.now - first).total_seconds() / 3600, 1),
        fleet=dict(sorted(fleet.items())), facilities=len(region.facilities), mix=dict(plan.mix),
        flows=dict(flows), requests=http["requests"], endpoints=http["endpoints"],
        refused=http["refused"], refused_by_endpoint=http["refused_by_endpoint"],
        retries=http["retries"], not_yet=http["not_yet"], server_errors=http["server_errors"],
        events={s: {"before": before.get(s, 0), "after": n, "written": n - before.get(s, 0)}
                for s, n in sorted(after.items())},
        chains_ok=chains_ok, chain_breaks=breaks, projection_caught_up_s=round(caught_up, 1),
        peak_rss_mb=peak_rss_mb(pids or {}), unfinished={k: v[:20] for k, v in unfinished.items() if v},
        errors=[*world.errors, *clock.errors][:50])


async def _full_speed_once(until: asyncio.Event, clock: Clock) -> None:
    await until.wait()
    clock.speed = None


def progress_of(world: World, started: float) -> Progress:
    day = world.plan.day
    stats = world.api.stats
    return Progress(world.clock.now, min(1.0, (world.clock.now - day).total_seconds() / 86400),
                    world.flows["transfers_requested"], world.flows["transfers_completed"],
                    len(world.open_transfers), stats.total, sum(stats.refused.values()),
                    stats.server_errors, time.monotonic() - started)


# -- setup: the region's facilities and fleet, registered by the admin ---------------------


async def register(api: Api, world: World, region: Region, plan: Plan) -> None:
    """Registers what the day needs (409 when it is there already), then adopts every
    vehicle and facility the target knows, the sample region's included: a crew for each."""
    gate = asyncio.Semaphore(SETUP_CONCURRENCY)
    count = [0]

    async def post(path: str, body: dict[str, Any]) -> None:
        async with gate:
            count[0] += 1
            admin = ADMINS[count[0] % len(ADMINS)]
            await api.call(admin, "POST", path, json=body, key=world.key("setup", body["id"]), ok=(409,))

    # Backups first: a facility names its backups.
    ordered = sorted(region.facilities, key=lambda f: "backup" not in f.roles)
    await asyncio.gather(*[post("/facilities", f.body()) for f in ordered])
    await asyncio.gather(*[post("/vehicles", v.body(region.districts[v.district].name + "急救站"))
                           for v in plan.fleet])
    for f in await world.listing(ADMINS[0], "/facilities"):
        at = Point(float(f["location"]["lat"]), float(f["location"]["lon"]))
        world.places[str(f["id"])] = at
        world.roles[str(f["id"])] = list(f["roles"])
    homes = {v.id: v.district for v in plan.fleet}
    for v in await world.listing(ADMINS[0], "/vehicles"):
        at = Point(float(v["location"]["lat"]), float(v["location"]["lon"]))
        nearest = min(region.districts, key=lambda d: distance_km(d.centre, at))
        district = homes.get(str(v["id"]), nearest.index)
        agent = VehicleAgent(world, str(v["id"]), district, at)
        world.vehicles[agent.id] = agent
        # A vehicle left busy by an earlier run is picked up where it stands.
        if v["status"] == "assigned" and v.get("transfer_id"):
            agent.tell("trip", str(v["transfer_id"]))
        elif v["status"] in ("awaiting_disinfection", "quarantined"):
            agent.tell("cycles", None)


# -- events per store, from the audit's hash-chain verification ----------------------------


async def event_counts(api: Api) -> dict[str, int]:
    """Events per store as GET /audit/verify counts them: the store itself where the
    projection's process hosts it (embedded), else the projection's copy (distributed)."""
    chains: dict[str, Any] = (await api.get(AUDITOR, "/audit/verify")).get("chains", {})
    stores = {name.split(":", 1)[1] for name in chains}
    return {s: int((chains.get(f"store:{s}") or chains[f"copy:{s}"])["events"]) for s in sorted(stores)}


async def settled_event_counts(api: Api, before: Mapping[str, int], timeout_s: float = 120.0
                               ) -> tuple[dict[str, int], bool | None, dict[str, Any]]:
    """Waits for the projection to have received what the stores hold (embedded: the
    copies match the stores; distributed: every copy's chain whole and no longer growing),
    then counts. Also answers whether every chain verifies, and the first break of each
    that does not (a copy still missing an event at the timeout is one)."""
    deadline = time.monotonic() + timeout_s
    previous: dict[str, int] | None = None
    wait = 0.5
    while True:
        try:
            body = await api.get(AUDITOR, "/audit/verify")
        except Refused:
            return dict(before), None, {}
        chains: dict[str, Any] = body.get("chains", {})
        stores = {k.split(":", 1)[1] for k in chains}
        copies = {s: int(chains[f"copy:{s}"]["events"]) for s in stores if f"copy:{s}" in chains}
        hosted = {s: int(chains[f"store:{s}"]["events"]) for s in stores if f"store:{s}" in chains}
        counts = {s: hosted.get(s, copies.get(s, 0)) for s in sorted(stores)}
        ok = bool(body.get("ok"))
        caught_up = (all(copies.get(s) == n for s, n in hosted.items()) if hosted
                     else ok and copies == previous)
        if caught_up or time.monotonic() > deadline:
            breaks = {k: c.get("first_break") for k, c in chains.items() if not c.get("ok")}
            return counts, ok, breaks
        previous = copies
        await asyncio.sleep(wait)
        wait = min(wait * 2, 5.0)


# -- memory -------------------------------------------------------------------------------


def peak_rss_mb(pids: Mapping[str, int]) -> dict[str, float]:
    """Peak resident memory (VmHWM) of each service process, and of this one."""
    out: dict[str, float] = {}
    for name, pid in pids.items():
        with contextlib.suppress(OSError, ValueError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    out[name] = round(int(line.split()[1]) / 1024, 1)
    out["simulator"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return out


# -- the embedded default, started for the run --------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def embedded(data_dir: Path, env: Mapping[str, str] | None = None,
                   log: Path | None = None, port: int | None = None) -> AsyncIterator[Target]:
    """The embedded default (`python -m services.runtime`, all four services, SQLite) in a
    process of its own, on `port` (else a free one), with its stores under `data_dir`."""
    data_dir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 (once, before the day)
    port = port or free_port()
    out = open(log or data_dir / "embedded.log", "ab")  # noqa: SIM115, ASYNC230 (the process owns it)
    settings = {"CLOSEDLOOP_MODE": "embedded", "CLOSEDLOOP_DATA_DIR": str(data_dir)}
    # Recurring care is requested by dispatch's scheduler on the real clock (every 30 s by
    # default) while the day runs compressed: a series filed late in the day could get its
    # first occurrence with the drain all but spent (a 300-transfer day once ended NOT
    # FINISHED so). Every 2 s, as the simulator test has it, unless the caller says.
    often = {"CLOSEDLOOP_DISPATCH_SCHEDULE_INTERVAL_S": "2"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.runtime", "--port", str(port),
        env={**often, **os.environ, **settings, **(env or {})}, stdout=out, stderr=out)
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient() as c:
            for _ in range(600):
                if proc.returncode is not None:
                    raise RuntimeError(f"the embedded app exited ({proc.returncode}); see {out.name}")
                with contextlib.suppress(httpx.TransportError):
                    if (await c.get(f"{url}/readyz")).status_code == 200:
                        break
                await asyncio.sleep(0.1)
            else:
                raise RuntimeError(f"the embedded app did not get ready; see {out.name}")
        yield Target(url, data_dir, "embedded", {"embedded": proc.pid})
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        out.close()
