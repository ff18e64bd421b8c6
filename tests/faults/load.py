"""The load of the fault tests: the simulator (sim/), a day of the sample region driven
through the balancers by every party with its own token (intake, crews, hospitals,
disinfection staff, the lab, dispatchers), on a compressed clock.

Every request goes through the target's `RetryingTransport` (tests/faults/ledger.py),
which retries what failed on the way with the same Idempotency-Key and records every
attempt in the ledger; the simulator's own client then only sees what the transport gave
up on (a 5xx there is a failure of the day) and the refusals the services meant (a 429,
a redirect with no other hospital), which it counts and handles as in `make simulate`.

`simulated_days(...)` is a `LoadGenerator` (tests/faults/harness.py): the requests of the
day's busy hours at `speed` simulated seconds per wall second, until told to stop; then no
more requests are filed and what was filed goes on to its end (return legs, disinfection,
lab results), so the history ends with closed loops. Should a test outlast the hours, the
next day follows. Each day is a calendar day of its own, after the one before, all in the
past of the servers' clock (device times may not be ahead of it), so that a vehicle's
stories never overlap from one day to the next.
"""

from __future__ import annotations

import asyncio
import itertools
from datetime import timedelta

from sim import Summary, run_day
from sim.runner import default_day
from tests.faults.harness import LoadGenerator, Target

DAYS_BACK = 120  # the first day of a session, before the day before yesterday
_days = itertools.count()  # the session's days, one after another


def next_day() -> timedelta:
    return timedelta(days=next(_days) - DAYS_BACK)


def simulated_days(transfers: int, speed: float, hours: tuple[float, float], seed: int) -> LoadGenerator:
    """Days of `transfers` requests (the plan's, of which those of `hours` are filed), each
    with the same plan and fleet (the seed's), until stopped."""

    async def run(target: Target, stop: asyncio.Event) -> None:
        while not stop.is_set():
            offset = next_day()
            if offset > timedelta(0):
                raise RuntimeError(f"more than {DAYS_BACK} simulated days in one session")
            summary = await run_day("http://city", transport=target.transport(), mode="distributed",
                                    data_dir=target.city.data_dir, transfers=transfers, speed=speed,
                                    seed=seed, day=(default_day() + offset).date(), hours=hours,
                                    until=stop)
            report(target, summary)
            if not summary.ok:
                raise AssertionError(f"the simulated day failed:\n{summary.text()}")

    return run


def report(target: Target, s: Summary) -> None:
    """What the day did, in the figures of the fault report and a note."""
    f = s.flows
    for name in ("transfers_requested", "transfers_completed", "transfers_cancelled", "loops_closed",
                 "cycles_released", "trips_driven"):
        target.load[name] = target.load.get(name, 0) + f.get(name, 0)
    refused = ", ".join(f"{k} {n}" for k, n in s.refused.items()) or "none"
    target.note(f"simulated {s.day} {s.sim_hours:.1f} h in {s.wall_s:.0f} s: "
                f"{f.get('transfers_requested', 0)} transfers requested, "
                f"{f.get('transfers_completed', 0)} completed, {f.get('transfers_cancelled', 0)} cancelled, "
                f"{f.get('loops_closed', 0)} loops closed, {f.get('cycles_released', 0)} cycles released; "
                f"{s.requests} requests, refusals the simulator saw: {refused}; "
                f"{f.get('journeys_not_filed', 0)} journeys not filed after the stop")
