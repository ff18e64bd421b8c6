"""Issue 8: end to end, distributed: from `POST /transfers` being due to the assignment
being visible in the projection, p50 and p99, at 50, 200 and 500 requests/s (after 5/s,
a reference); the target is p99 under 100 ms at 200 requests/s.

The four services run as processes of their own on PostgreSQL and Kafka (fresh databases
and topics, tests/e2e/cluster.py). Dispatch's store is seeded before they start with
100 facilities and a free fleet big enough that every transfer of every rate gets a
vehicle at once (rate x seconds, summed, and 5% more: no vehicle comes back within a
run); the fleet is filed by grid cell (FreeFleet), so its size does not slow a decision.

Requests come from bench/loadgen.py, open loop, in a process of its own. "Visible" is the
moment the projection's transaction that archives the transfer's VehicleAssigned
commits: the audit archive, the read models and the transfer's timeline
(GET /audit/transfers/{id}/timeline) change in that one transaction. This process reads
the archive by its `seq` (assigned under a lock held to commit, so a tail by seq misses
nothing) every POLL_S and stamps each row with when the answer came back: the reading
adds at most POLL_S and a query's round trip. (The live feed /audit/stream would have
served, but it looks for new rows every 250 ms.) A transfer that was queued instead
(TransferQueued: no fitting vehicle free) is counted apart and left out of the
percentiles: its decision is visible, its assignment waits for a vehicle, which is the
fleet's matter, not the pipeline's. A transfer accepted but not seen at all within
VISIBLE_TIMEOUT_S counts as infinitely late.

    BENCH_E2E_RATES=50 BENCH_E2E_SECONDS=5 make bench BENCH=bench_e2e   # a smoke run
"""

from __future__ import annotations

import asyncio
import math
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import orjson

from bench.bench_dispatch import seed
from bench.loadgen import CONNECTIONS
from bench.machine import RUN_DIR, cores, cpu_reading, database, service_ports
from bench.report import Row, table
from libs.events.store import EventStore
from sim.summary import percentile as nearest_rank
from tests.conftest import PG_DSN
from tests.e2e.cluster import Cluster, running_cluster

# The three rates, after 5/s: what the pipeline does when it keeps up.
RATES = tuple(float(r) for r in os.environ.get("BENCH_E2E_RATES", "5,50,200,500").split(","))
SECONDS = float(os.environ.get("BENCH_E2E_SECONDS", "20"))
TARGET, TARGET_P99_MS = "target: p99 at 200/s", 100.0
VISIBLE_TIMEOUT_S = 60.0  # after a rate's last request: not visible by then is infinitely late
DRAIN_TIMEOUT_S = 180.0  # after a rate's last request, for the projection to catch up
SETUP_TIMEOUT_S = 1200.0  # for the projection to take in the seeded fleet (about 60 events/s here)
POLL_S = 0.002
SOURCES = ("dispatch", "transfer", "disinfection")


def percentile(values: list[float], p: float) -> float:
    """Nearest rank; nan when there is nothing to rank (shown as such, never as 0)."""
    return nearest_rank(values, p) if values else math.nan


# -- what the projection shows --------------------------------------------------------------


@dataclass
class Watcher:
    """Tails the projection's audit archive: when each transfer's assignment (or queueing)
    was first seen, on the monotonic clock; how long the assignment took from dispatch's
    commit to the projection's (their own clocks, the same machine's); rows per poll."""

    conn: Any
    cursor: int = 0
    assigned: dict[str, float] = field(default_factory=dict)
    queued: dict[str, float] = field(default_factory=dict)
    pipeline_ms: dict[str, float] = field(default_factory=dict)
    archived: list[tuple[float, int]] = field(default_factory=list)
    task: asyncio.Task[None] | None = None

    async def tail(self) -> None:
        while True:
            rows = await self.conn.fetch(
                "SELECT seq, type, transfer_key, recorded_at, archived_at FROM audit_archive "
                "WHERE seq > $1 ORDER BY seq LIMIT 20000", self.cursor)
            now = time.monotonic()
            if rows:
                self.archived.append((now, len(rows)))
            for seq, kind, key, recorded, archived in rows:
                if kind == "VehicleAssigned" and key not in self.assigned:
                    self.assigned[key] = now
                    self.pipeline_ms[key] = (datetime.fromisoformat(archived)
                                             - datetime.fromisoformat(recorded)).total_seconds() * 1000
                elif kind == "TransferQueued":
                    self.queued.setdefault(key, now)
                self.cursor = seq
            await asyncio.sleep(POLL_S)

    def archived_between(self, start: float, end: float) -> int:
        return sum(n for t, n in self.archived if start <= t < end)

    def start(self) -> None:
        self.task = asyncio.create_task(self.tail())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        await self.conn.close()


async def behind(cluster: Cluster, timeout_s: float) -> dict[str, int]:
    """Waits until the projection has archived every event the three producing stores hold
    (at most `timeout_s`); what it still lacks then, per store (nothing: caught up)."""
    deadline = time.monotonic() + timeout_s
    projection = await asyncpg.connect(database(cluster, "projection"))
    try:
        while True:
            lacking = {}
            for store in SOURCES:
                conn = await asyncpg.connect(database(cluster, store))
                try:
                    head = await conn.fetchval("SELECT coalesce(max(position), 0) FROM events")
                finally:
                    await conn.close()
                have = await projection.fetchval(
                    "SELECT coalesce(max(position), 0) FROM audit_archive WHERE store = $1", store)
                if have < head:
                    lacking[store] = head - have
            if not lacking or time.monotonic() > deadline:
                return lacking
            await asyncio.sleep(1)
    finally:
        await projection.close()


async def sessions(cluster: Cluster, seconds: float, every_s: float = 0.05) -> dict[str, float]:
    """What each service's database sessions were doing over `seconds`, sampled from
    pg_stat_activity: the mean number of sessions per state (idle ones left out), e.g.
    "projection: in a transaction, waiting for the service" or "dispatch: WALSync"."""
    names = {f"{s}_{cluster.run_id}": s for s in cluster.procs}
    conn = await asyncpg.connect(PG_DSN)
    seen: Counter[str] = Counter()
    samples = 0
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for db, state, kind, event in await conn.fetch(
                    "SELECT datname, state, wait_event_type, wait_event FROM pg_stat_activity "
                    "WHERE datname = ANY($1::text[])", list(names)):
                if state == "idle in transaction":
                    seen[f"{names[db]}: in a transaction, waiting for the service"] += 1
                elif state == "active":
                    seen[f"{names[db]}: " + (f"waiting on {kind} {event}" if kind else "running")] += 1
            samples += 1
            await asyncio.sleep(every_s)
    finally:
        await conn.close()
    return {k: n / max(samples, 1) for k, n in sorted(seen.items())}


# -- one rate ------------------------------------------------------------------------------


@dataclass
class Outcome:
    rate: float
    t0: float
    requests: list[dict[str, Any]]
    visible: dict[str, float]  # accepted transfer id -> ms from due to seen assigned (inf: never)
    pipeline_ms: list[float]  # dispatch's commit to the projection's, per transfer seen assigned
    archived_per_s: float  # rows the projection archived per second during the load
    queued: int
    cpu: dict[str, float]
    sessions: dict[str, float]  # database sessions per state, on average over the load
    drained_s: float | None  # from the last request until the projection had caught up (None: not)

    def sent_rate(self) -> float:
        last: float = max(r["queued"] for r in self.requests)
        return len(self.requests) / max(last - self.t0, 1 / self.rate)

    def visible_rate(self) -> float:
        """Assignments made visible per second, from the first request to the last seen."""
        seen = [v for v in self.visible.values() if not math.isinf(v)]
        if not seen:
            return 0.0
        accepted = {r["id"]: r["due"] for r in self.requests if r["status"] in (200, 201)}
        last: float = max(accepted[i] + v / 1000 for i, v in self.visible.items() if not math.isinf(v))
        return len(seen) / max(last - self.t0, 1 / self.rate)

    def errors(self) -> Counter[str]:
        return Counter(f"{r['status']} {r.get('error', '')}".strip() for r in self.requests
                       if r["status"] not in (200, 201))

    def rows(self) -> list[Row]:
        r = f"{self.rate:g}/s"
        answered = [(x["answered"] - x["due"]) * 1000 for x in self.requests if x["status"] in (200, 201)]
        late = [(x["queued"] - x["due"]) * 1000 for x in self.requests]
        waited = [(x["sent"] - x["due"]) * 1000 for x in self.requests]
        visible = list(self.visible.values())
        errors = self.errors()
        drained = (f"caught up {self.drained_s:,.0f} s after the last request" if self.drained_s is not None
                   else f"not caught up {DRAIN_TIMEOUT_S:g} s after the last request")
        return [
            Row(f"{r}: assignment visible p50", percentile(visible, 50), "ms", peer=TARGET),
            Row(f"{r}: assignment visible p99", percentile(visible, 99), "ms", peer=TARGET),
            Row(f"{r}: of which POST answered p50", percentile(answered, 50), "ms"),
            Row(f"{r}: of which POST answered p99", percentile(answered, 99), "ms"),
            Row(f"{r}: of which dispatch's commit to the projection's p50",
                percentile(self.pipeline_ms, 50), "ms"),
            Row(f"{r}: of which dispatch's commit to the projection's p99",
                percentile(self.pipeline_ms, 99), "ms"),
            Row(f"{r}: offered, open loop (the generator late by p99 {percentile(late, 99):.1f} ms; "
                f"waiting for one of {CONNECTIONS} connections p99 {percentile(waited, 99):,.0f} ms)",
                self.sent_rate(), "req/s"),
            Row(f"{r}: assignments made visible", self.visible_rate(), "/s"),
            Row(f"{r}: projection archived, during the load ({drained})", self.archived_per_s, "events/s"),
            Row(f"{r}: errors of {len(self.requests):,} requests {dict(errors) or ''}".rstrip(),
                sum(errors.values()), ""),
            Row(f"{r}: queued, no vehicle free (not in the percentiles)", self.queued, ""),
            Row(f"{r}: assignment not visible {VISIBLE_TIMEOUT_S:g} s after the last request "
                "(infinitely late)", sum(1 for v in visible if math.isinf(v)), ""),
        ]


async def load(cluster: Cluster, watcher: Watcher, rate: float, seconds: float, tag: str) -> Outcome:
    """One rate: the generator's requests, each one's assignment looked for until
    VISIBLE_TIMEOUT_S after the last; then the pipeline left to drain (DRAIN_TIMEOUT_S at
    most) so that the next rate starts on an idle system."""
    gen = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.loadgen", f"http://127.0.0.1:{cluster.ports['dispatch']}",
        str(cluster.log_dir / "data"), "--rate", str(rate), "--seconds", str(seconds), "--tag", tag,
        stdout=asyncio.subprocess.PIPE)
    assert gen.stdout is not None
    first = (await gen.stdout.readline()).decode()
    if not first.startswith("start "):
        raise RuntimeError(f"the load generator did not start: {first!r}")
    t0 = float(first.split()[1])
    await asyncio.sleep(max(0.0, t0 - time.monotonic()))
    pids = {**{s: p.pid for s, p in cluster.procs.items()}, "load generator": gen.pid}
    before = cpu_reading(pids, "bench (watcher)")
    busy = await sessions(cluster, t0 + seconds - time.monotonic())
    after = cpu_reading(pids, "bench (watcher)")  # the steady load: the answers still coming are not in it
    out, _ = await gen.communicate()
    if gen.returncode != 0:
        raise RuntimeError(f"the load generator failed ({gen.returncode})")
    requests = [orjson.loads(line) for line in out.splitlines() if line.strip()]
    due = {r["id"]: r["due"] for r in requests if r["status"] in (200, 201)}
    deadline = t0 + seconds + VISIBLE_TIMEOUT_S
    while time.monotonic() < deadline and not due.keys() <= watcher.assigned.keys() | watcher.queued.keys():  # noqa: ASYNC110
        await asyncio.sleep(0.1)
    drained_s: float | None = None
    if not await behind(cluster, DRAIN_TIMEOUT_S - (time.monotonic() - t0 - seconds)):
        drained_s = time.monotonic() - t0 - seconds
    queued = {i for i in due if i in watcher.queued and i not in watcher.assigned}
    with (cluster.log_dir / f"{tag}.jsonl").open("wb") as f:
        for r in requests:  # each request with when its assignment was seen, for a closer look
            i = r.get("id", "")
            seen = {"assigned": watcher.assigned.get(i), "queued": watcher.queued.get(i),
                    "pipeline_ms": watcher.pipeline_ms.get(i)}
            f.write(orjson.dumps({**r, **seen}) + b"\n")
    visible = {i: (watcher.assigned[i] - t) * 1000 if i in watcher.assigned else math.inf
               for i, t in due.items() if i not in queued}
    pipeline = [watcher.pipeline_ms[i] for i in due if i in watcher.pipeline_ms]
    archived = watcher.archived_between(t0, t0 + seconds) / seconds
    return Outcome(rate, t0, requests, visible, pipeline, archived, len(queued), cores(before, after),
                   busy, drained_s)


async def main() -> str:
    log_dir = RUN_DIR / "bench" / f"e2e-{datetime.now():%Y%m%d-%H%M%S}"
    (log_dir / "data").mkdir(parents=True)
    fleet = math.ceil(sum(RATES) * SECONDS * 1.05) + 100  # (+100: the warm-up's)

    async def seed_fleet(cluster: Cluster) -> None:
        store = EventStore.from_url("dispatch", cluster.env["CLOSEDLOOP_PG_URL"].format(service="dispatch"))
        try:
            await seed(store, vehicles=fleet, queued=0)
        finally:
            await store.close()

    outcomes = []
    async with running_cluster(log_dir, check_invariants=False, ports=service_ports(),
                               before_start=seed_fleet) as cluster:
        if lacking := await behind(cluster, SETUP_TIMEOUT_S):
            raise RuntimeError(f"the projection did not catch up with the seeded stores: {lacking}")
        watcher = Watcher(await asyncpg.connect(database(cluster, "projection")))
        watcher.cursor = await watcher.conn.fetchval("SELECT coalesce(max(seq), 0) FROM audit_archive")
        watcher.start()
        try:
            await load(cluster, watcher, 20, 3, "warmup")  # connections, caches, the fleet's index
            for i, rate in enumerate(RATES):
                outcomes.append(await load(cluster, watcher, rate, SECONDS, f"r{i}"))
        finally:
            await watcher.stop()
    title = (f"End to end, distributed: POST /transfers to the assignment visible in the projection, "
             f"open loop, {SECONDS:g} s per rate, fleet {fleet:,}, read every {POLL_S * 1000:g} ms "
             f"(`make bench BENCH=bench_e2e`)")
    latency = [Row(TARGET, TARGET_P99_MS, "ms"), *(x for o in outcomes for x in o.rows())]
    cpu = [Row(f"{o.rate:g}/s: {who}", used * 100, "% of a core")
           for o in outcomes for who, used in o.cpu.items()]
    busy = [Row(f"{o.rate:g}/s: {what}", mean, "sessions")
            for o in outcomes for what, mean in o.sessions.items() if mean >= 0.05]
    n = os.cpu_count()
    return (table(title, latency, higher_is_better=False) + "\n"
            + table(f"CPU during each rate's {SECONDS:g} s ({n} cores = {n}00%)", cpu) + "\n"
            + table("The services' database sessions during each rate, by state (mean of samples "
                    "every 50 ms; idle ones left out)", busy))
