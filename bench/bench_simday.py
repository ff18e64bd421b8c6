"""Issue 8: the simulator's day of 50,000 transfers (sim/, as `make simulate` runs it, as
fast as the services answer), distributed (the four services as processes of their own
on PostgreSQL and Kafka, fresh databases and topics) and embedded (one process, SQLite):
wall time, events written per store, peak resident memory (VmHWM) of each service
process; the target is the day in under 10 minutes. Long: it has a BENCH name of its own.

    BENCH_SIMDAY_TRANSFERS=2000 BENCH_SIMDAY_MODES=distributed make bench BENCH=bench_simday

The summary of each day is kept beside the services' logs (.run/bench/simday-*/).
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path

from bench.machine import RUN_DIR, cores, cpu_reading, service_ports
from bench.report import Row, table
from sim import Summary, run_day
from sim.__main__ import Bar
from sim.runner import embedded
from tests.e2e.cluster import running_cluster

TRANSFERS = int(os.environ.get("BENCH_SIMDAY_TRANSFERS", "50000"))
MODES = tuple(os.environ.get("BENCH_SIMDAY_MODES", "distributed,embedded").split(","))
TARGET_S = 600.0
TARGET = "target: the day in"


async def distributed(log_dir: Path) -> tuple[Summary, dict[str, float]]:
    async with running_cluster(log_dir, check_invariants=False, ports=service_ports(10)) as cluster:
        pids = {s: p.pid for s, p in cluster.procs.items()}
        before = cpu_reading(pids, "simulator")
        summary = await run_day({s: f"http://127.0.0.1:{p}" for s, p in cluster.ports.items()},
                                data_dir=log_dir / "data", transfers=TRANSFERS, mode="distributed",
                                pids=pids, progress=Bar())
        return summary, cores(before, cpu_reading(pids, "simulator"))


async def embedded_day(log_dir: Path) -> tuple[Summary, dict[str, float]]:
    ports = service_ports(20)
    async with embedded(log_dir / "data", log=log_dir / "embedded.log",
                        port=ports.get("dispatch")) as target:
        before = cpu_reading(target.pids, "simulator", infra=False)
        summary = await run_day(target.base_urls, data_dir=target.data_dir, transfers=TRANSFERS,
                                mode="embedded", pids=target.pids, progress=Bar())
        return summary, cores(before, cpu_reading(target.pids, "simulator", infra=False))


def rows(mode: str, s: Summary, cpu: dict[str, float]) -> list[Row]:
    done = "finished" if s.finished else "NOT FINISHED"
    out = [Row(f"{mode}: wall time ({done}; setup {s.setup_s:,.0f} s; {s.requests:,} requests, "
               f"{s.server_errors} 5xx; {s.flows.get('transfers_completed', 0):,} transfers completed)",
               s.wall_s, "s", peer=TARGET),
           Row(f"{mode}: requests/s", s.requests / s.wall_s if s.wall_s else 0.0, "req/s"),
           Row(f"{mode}: events written (hash chains {'ok' if s.chains_ok else 'NOT ok'})",
               s.events_written, "events")]
    out += [Row(f"{mode}: events written, {store}", e["written"], "events") for store, e in s.events.items()]
    out += [Row(f"{mode}: peak RSS, {name}", mb, "MiB") for name, mb in s.peak_rss_mb.items()]
    out += [Row(f"{mode}: CPU over the day, {who}", used * 100, "% of a core") for who, used in cpu.items()]
    return out


async def main() -> str:
    found = [Row(TARGET, TARGET_S, "s")]
    for mode in MODES:
        log_dir = RUN_DIR / "bench" / f"simday-{mode}-{datetime.now():%Y%m%d-%H%M%S}"
        (log_dir / "data").mkdir(parents=True)
        summary, cpu = await (distributed(log_dir) if mode == "distributed" else embedded_day(log_dir))
        (log_dir / "summary.txt").write_text(summary.text() + "\n")
        (log_dir / "summary.json").write_text(json.dumps(summary.view(), ensure_ascii=False, indent=1))
        found += rows(mode, summary, cpu)
    n = os.cpu_count()
    return table(f"The simulated day: {TRANSFERS:,} transfers, seed 1, as fast as the services answer "
                 f"({n} cores = {n}00%; `make bench BENCH=bench_simday`)", found, higher_is_better=False)
