"""Where the distributed benchmarks' processes listen and keep their data, and the CPU
each one used, read from /proc: the services, this checkout's PostgreSQL and Kafka, this
process, and the rest of the machine (on a shared machine, the others' share says how far
to trust a figure)."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path

from tests.conftest import PG_DSN
from tests.e2e.cluster import SERVICES, Cluster

RUN_DIR = Path(os.environ.get("CLOSEDLOOP_RUN_DIR", ".run")).resolve()
TICK = os.sysconf("SC_CLK_TCK")


def service_ports(offset: int = 0) -> dict[str, int]:
    """CLOSEDLOOP_SERVICE_PORT (+ offset) and the next three, as deploy/local/services.sh
    places them; without it, free ports."""
    base = os.environ.get("CLOSEDLOOP_SERVICE_PORT")
    return {s: int(base) + offset + i for i, s in enumerate(SERVICES)} if base else {}


def database(cluster: Cluster, service: str) -> str:
    """The DSN of a service's database in this cluster."""
    return PG_DSN.rsplit("/", 1)[0] + f"/{service}_{cluster.run_id}"


def cpu_s(pid: int, children: bool = False) -> float:
    """CPU seconds a process used (and, with `children`, those of its children it reaped)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    used = int(fields[11]) + int(fields[12]) + ((int(fields[13]) + int(fields[14])) if children else 0)
    return used / TICK


def processes() -> list[tuple[int, int, str]]:
    """(pid, parent pid, command line) of every process."""
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            found.append((int(d.name), ppid, cmd))
    return found


def infrastructure() -> dict[str, list[int]]:
    """The pids of this checkout's PostgreSQL (the postmaster first, then its backends) and
    Kafka broker(s), found by the data dirs deploy/local/*.sh give them."""
    procs = processes()
    pg_data = str(RUN_DIR / "postgres" / "data")
    postmaster = [p for p, _, cmd in procs if pg_data in cmd and "postgres" in cmd.split(" ", 1)[0]]
    backends = [p for p, ppid, _ in procs if ppid in postmaster]
    kafka = [p for p, _, cmd in procs if str(RUN_DIR / "kafka") in cmd and "java" in cmd.split(" ", 1)[0]]
    return {"postgresql": postmaster + backends, "kafka": kafka}


def machine_busy_s() -> float:
    """CPU seconds the whole machine spent busy (every core; /proc/stat)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle, iowait
    return (sum(values[:8]) - idle) / TICK


def cpu_reading(pids: Mapping[str, int], this_process: str, infra: bool = True) -> dict[str, float]:
    """CPU seconds so far of each named process, the infrastructure (unless not used), this
    process (named `this_process`) and the whole machine; with the wall clock."""
    reading = {name: cpu_s(pid) for name, pid in pids.items()}
    if infra:
        found = infrastructure()
        reading["postgresql"] = sum(cpu_s(p, children=i == 0) for i, p in enumerate(found["postgresql"]))
        reading["kafka"] = sum(cpu_s(p) for p in found["kafka"])
    reading[this_process] = time.process_time()
    reading["machine"] = machine_busy_s()
    reading["wall"] = time.monotonic()
    return reading


def cores(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Cores each one used between two readings; `others on the machine` is the rest."""
    wall = after["wall"] - before["wall"]
    used = {k: (after[k] - before[k]) / wall for k in before if k != "wall"}
    used["others on the machine"] = used.pop("machine") - sum(used.values())
    return used
