"""Issue 8: the simulator's day of 50,000 transfers (sim/, as `make simulate` runs it, as
fast as the services answer), distributed (the four services as processes of their own
on PostgreSQL and Kafka, fresh databases and topics) and embedded (one process, SQLite):
wall time, events written per store, peak resident memory (VmHWM) of each service
process; the target is the day in under 10 minutes. Long: it has a BENCH name of its own.

A day still running after BENCH_SIMDAY_LIMIT_S (default 1,800 s, three times the target;
0: no limit) is stopped there and reported as a miss with how far it got: the share of
the plan's transfers requested, the events the stores hold, the peak memory so far.

    BENCH_SIMDAY_TRANSFERS=2000 BENCH_SIMDAY_MODES=distributed make bench BENCH=bench_simday

Each day's summary is kept beside the services' logs (.run/bench/simday-*/).
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]

from bench.machine import RUN_DIR, cores, cpu_reading, database, service_ports
from bench.report import Row, table
from sim import Progress, Summary, run_day
from sim.__main__ import Bar
from sim.runner import embedded, peak_rss_mb
from tests.e2e.cluster import running_cluster

TRANSFERS = int(os.environ.get("BENCH_SIMDAY_TRANSFERS", "50000"))
MODES = tuple(os.environ.get("BENCH_SIMDAY_MODES", "distributed,embedded").split(","))
LIMIT_S = float(os.environ.get("BENCH_SIMDAY_LIMIT_S", "1800")) or None
TARGET_S = 600.0
TARGET = "target: the day in"
STORES = ("dispatch", "transfer", "disinfection")  # those the summary counts


@dataclass
class Day:
    """A finished day's summary, or how far a day stopped at the limit got."""

    wall_s: float
    summary: Summary | None
    last: Progress | None  # the last progress report (a stopped day's)
    setup_s: float  # a stopped day's: until the first report (the region and fleet registered)
    events: dict[str, int]
    peak_rss_mb: dict[str, float]
    cpu: dict[str, float]


async def watched(day: Callable[[Callable[[Progress], None]], Awaitable[Summary]], pids: Mapping[str, int],
                  this: str, infra: bool, events: Callable[[], Awaitable[dict[str, int]]]) -> Day:
    """Runs the day (given its progress callback) with its progress shown and remembered,
    stopped at the limit."""
    bar, first, last = Bar(), list[Progress](), list[Progress]()

    def progress(p: Progress) -> None:
        bar(p)
        last[:] = [p]
        first[:] = first or [p]

    started = time.monotonic()
    before = cpu_reading(pids, this, infra)
    try:
        summary = await asyncio.wait_for(day(progress), LIMIT_S)
    except TimeoutError:
        summary = None
    finally:
        bar.close()
    cpu = cores(before, cpu_reading(pids, this, infra))
    if summary is not None:
        return Day(summary.wall_s, summary, None, summary.setup_s,
                   {s: e["written"] for s, e in summary.events.items()}, summary.peak_rss_mb, cpu)
    return Day(time.monotonic() - started, None, last[0] if last else None, first[0].wall_s if first else 0.0,
               await events(), peak_rss_mb(pids), cpu)


async def distributed(log_dir: Path) -> Day:
    async with running_cluster(log_dir, check_invariants=False, ports=service_ports(10)) as cluster:
        pids = {s: p.pid for s, p in cluster.procs.items()}

        async def events() -> dict[str, int]:  # (fresh databases: all they hold is the day's)
            counts = {}
            for store in STORES:
                conn = await asyncpg.connect(database(cluster, store))
                try:
                    counts[store] = await conn.fetchval("SELECT count(*) FROM events")
                finally:
                    await conn.close()
            return counts

        urls = {s: f"http://127.0.0.1:{p}" for s, p in cluster.ports.items()}
        return await watched(lambda progress: run_day(
            urls, data_dir=log_dir / "data", transfers=TRANSFERS, mode="distributed", pids=pids,
            progress=progress), pids, "simulator", True, events)


async def embedded_day(log_dir: Path) -> Day:
    data = log_dir / "data"

    async def events() -> dict[str, int]:
        counts = {}
        for store in STORES:
            with sqlite3.connect(f"file:{data / store}.db?mode=ro", uri=True) as conn:
                counts[store] = conn.execute("SELECT count(*) FROM events").fetchone()[0]
        return counts

    async with embedded(data, log=log_dir / "embedded.log", port=service_ports(20).get("dispatch")) as target:
        return await watched(lambda progress: run_day(
            target.base_urls, data_dir=target.data_dir, transfers=TRANSFERS, mode="embedded",
            pids=target.pids, progress=progress), target.pids, "simulator", False, events)


def rows(mode: str, day: Day) -> list[Row]:
    s, p = day.summary, day.last
    if s is not None:
        end = "finished" if s.finished else "NOT FINISHED by the simulated deadline"
        out = [Row(f"{mode}: wall time ({end}; setup {s.setup_s:,.0f} s; {s.requests:,} requests, "
                   f"{s.server_errors} 5xx; {s.flows.get('transfers_completed', 0):,} transfers completed)",
                   day.wall_s, "s", peer=TARGET)]
        requests = s.requests
    else:
        share = p.requested / TRANSFERS if p else 0.0
        done = (f"{share:.0%} of the plan's transfers requested, {p.completed:,} completed, "
                f"{p.day_fraction:.0%} of the simulated day" if p else "no progress reported")
        out = [Row(f"{mode}: NOT FINISHED, stopped at the {LIMIT_S:,.0f} s limit ({done}; "
                   f"setup {day.setup_s:,.0f} s)", day.wall_s, "s")]
        if share:
            out.append(Row(f"{mode}: the whole day at that pace (estimate: the setup, then the day's "
                           "time so far / the share requested)",
                           day.setup_s + (day.wall_s - day.setup_s) / share, "s", peer=TARGET))
        requests = p.requests if p else 0
    chains = f" (hash chains {'ok' if s.chains_ok else 'NOT ok'})" if s else ""
    out += [Row(f"{mode}: requests/s", requests / day.wall_s if day.wall_s else 0.0, "req/s"),
            Row(f"{mode}: events written{chains}", sum(day.events.values()), "events")]
    out += [Row(f"{mode}: events written, {store}", n, "events") for store, n in day.events.items()]
    out += [Row(f"{mode}: peak RSS, {name}", mb, "MiB") for name, mb in day.peak_rss_mb.items()]
    out += [Row(f"{mode}: CPU over the day, {who}", used * 100, "% of a core")
            for who, used in day.cpu.items()]
    return out


async def main() -> str:
    found = [Row(TARGET, TARGET_S, "s")]
    for mode in MODES:
        log_dir = RUN_DIR / "bench" / f"simday-{mode}-{datetime.now():%Y%m%d-%H%M%S}"
        (log_dir / "data").mkdir(parents=True)
        day = await (distributed(log_dir) if mode == "distributed" else embedded_day(log_dir))
        if day.summary is not None:
            (log_dir / "summary.txt").write_text(day.summary.text() + "\n")
            view = json.dumps(day.summary.view(), ensure_ascii=False, indent=1)
            (log_dir / "summary.json").write_text(view)
        found += rows(mode, day)
    n = os.cpu_count()
    return table(f"The simulated day: {TRANSFERS:,} transfers, seed 1, as fast as the services answer "
                 f"({n} cores = {n}00%; `make bench BENCH=bench_simday`)", found, higher_is_better=False)
