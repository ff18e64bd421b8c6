"""The city topology the fault tests break: a PostgreSQL, three Kafka brokers and two replicas
of each service behind the balancer, as `make up SCALE=city` runs them and started by the
same scripts (deploy/local), but in a run dir and on ports of their own (.run/faults), so
that restarting this PostgreSQL or stopping these brokers never touches the suite's."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import httpx

ROOT = Path(__file__).resolve().parents[2]
LOCAL = ROOT / "deploy" / "local"
SERVICES = ("dispatch", "transfer", "disinfection", "projection")
PUBLISHING = ("dispatch", "transfer", "disinfection")  # each has a relay; the projection reads them all


def _port(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def free_block(size: int, start: int = 21000, end: int = 29000) -> int:
    """A base port with `size` free ports after it, and its +100 and +200 neighbours (the
    replicas'), picked per process so that parallel runs on one machine do not collide."""
    base = start + (os.getpid() * 7) % (end - start) // 10 * 10
    for _ in range(200):
        wanted = [base + off + i for off in (0, 99, 100, 200) for i in range(size)]
        if all(_free(p) for p in wanted):
            return base
        base = start + (base - start + 310) % (end - start)
    raise RuntimeError("no free block of ports for the fault topology")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@dataclass
class City:
    run_dir: Path
    pg_port: int
    kafka_port: int
    kafka_controller_port: int
    service_port: int
    replicas: int = 2
    brokers: int = 3
    kafka_heap: str = "384m"
    topic_prefix: str = "faults"

    @classmethod
    def from_environment(cls) -> City:
        """Ports next to the suite's own (CLOSEDLOOP_PG_PORT + 1, the three brokers after
        CLOSEDLOOP_KAFKA_PORT's), each overridable with CLOSEDLOOP_FAULTS_*."""
        pg = _port("CLOSEDLOOP_PG_PORT", 55432)
        kafka = _port("CLOSEDLOOP_KAFKA_PORT", 59092)
        controller = _port("CLOSEDLOOP_KAFKA_CONTROLLER_PORT", kafka + 100)
        return cls(
            run_dir=Path(os.environ.get("CLOSEDLOOP_FAULTS_RUN_DIR", ROOT / ".run" / "faults")),
            pg_port=_port("CLOSEDLOOP_FAULTS_PG_PORT", pg + 1),
            kafka_port=_port("CLOSEDLOOP_FAULTS_KAFKA_PORT", kafka + 3),
            kafka_controller_port=_port("CLOSEDLOOP_FAULTS_KAFKA_CONTROLLER_PORT", controller + 3),
            service_port=_port("CLOSEDLOOP_FAULTS_SERVICE_PORT", 0) or free_block(len(SERVICES)),
            kafka_heap=os.environ.get("CLOSEDLOOP_FAULTS_KAFKA_HEAP", "384m"))

    # -- configuration -------------------------------------------------------------------

    @property
    def bootstrap(self) -> str:
        return ",".join(f"127.0.0.1:{self.kafka_port + n}" for n in range(self.brokers))

    @property
    def data_dir(self) -> Path:
        return self.run_dir / "data"

    def pg_url(self, driver: str = "postgresql+asyncpg") -> str:
        return f"{driver}://closedloop@127.0.0.1:{self.pg_port}/{{service}}"

    def dsn(self, database: str) -> str:
        return self.pg_url("postgresql").format(service=database)

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "CLOSEDLOOP_RUN_DIR": str(self.run_dir),
                "CLOSEDLOOP_PG_PORT": str(self.pg_port), "CLOSEDLOOP_KAFKA_PORT": str(self.kafka_port),
                "CLOSEDLOOP_KAFKA_CONTROLLER_PORT": str(self.kafka_controller_port),
                "CLOSEDLOOP_KAFKA_HEAP": self.kafka_heap, "CLOSEDLOOP_SERVICE_PORT": str(self.service_port),
                "CLOSEDLOOP_PG_URL": self.pg_url(), "CLOSEDLOOP_KAFKA_BOOTSTRAP": self.bootstrap,
                "CLOSEDLOOP_KAFKA_REPLICATION": str(self.brokers),
                "CLOSEDLOOP_TOPIC_PREFIX": self.topic_prefix,
                "CLOSEDLOOP_DATA_DIR": str(self.data_dir), "CLOSEDLOOP_REPLICAS": str(self.replicas),
                # the simulator's care series start minutes ahead on the servers' clock: the
                # scheduler looks every 2 s (30 by default) so the day does not wait for it
                "CLOSEDLOOP_DISPATCH_SCHEDULE_INTERVAL_S": "2"}

    @property
    def front_ports(self) -> dict[str, int]:
        """Where clients go: the balancer's port per service."""
        return {s: self.service_port + i for i, s in enumerate(SERVICES)}

    @property
    def status_port(self) -> int:
        return self.service_port + 99

    # -- lifecycle (the project's scripts) -----------------------------------------------

    def sh(self, script: str, *args: str, timeout: float = 300) -> str:
        done = subprocess.run(["bash", str(LOCAL / script), *args], env=self.env, capture_output=True,
                              text=True, timeout=timeout, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{script} {' '.join(args)} failed ({done.returncode}):\n"
                               f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        return done.stdout

    async def ash(self, script: str, *args: str, timeout: float = 300) -> str:
        """The same, without blocking the load running beside it."""
        return await asyncio.to_thread(self.sh, script, *args, timeout=timeout)

    def start(self) -> dict[str, float]:
        """A fresh PostgreSQL cluster, Kafka cluster and services; returns what took how long."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.stop()
        took: dict[str, float] = {}
        for what, script, args in (("postgres", "postgres.sh", ("destroy",)),
                                   ("postgres", "postgres.sh", ("start",)),
                                   ("kafka", "kafka.sh", ("start", "--nodes", str(self.brokers))),
                                   ("services", "services.sh", ("start", "--replicas", str(self.replicas)))):
            t0 = time.monotonic()
            self.sh(script, *args)
            took[what] = took.get(what, 0.0) + time.monotonic() - t0
        return took

    def stop(self) -> None:
        for script in ("services.sh", "kafka.sh", "postgres.sh"):
            subprocess.run(["bash", str(LOCAL / script), "stop"], env=self.env, capture_output=True,
                           timeout=180, check=False)

    # -- faults --------------------------------------------------------------------------

    def pids(self) -> dict[str, int]:
        """Running replicas by name (`dispatch-1`), from the pid files services.sh keeps."""
        found = {}
        for f in (self.run_dir / "pids").glob("*-*.pid"):
            pid = int(f.read_text().strip())
            if _alive(pid):
                found[f.stem] = pid
        return found

    async def kill(self, replica: str) -> int:
        """SIGKILL a replica (`transfer-2`); returns once it is gone."""
        pid = self.pids()[replica]
        os.kill(pid, signal.SIGKILL)
        while _alive(pid):
            await asyncio.sleep(0.02)
        return pid

    async def restart_missing(self) -> None:
        """What a supervisor does: start every replica that is not running, wait until ready."""
        await self.ash("services.sh", "start")

    async def stop_broker(self, node: int, kill: bool = True) -> None:
        await self.ash("kafka.sh", "stop-node", str(node), *(["--kill"] if kill else []))

    async def start_broker(self, node: int) -> None:
        await self.ash("kafka.sh", "start-node", str(node))

    async def stop_postgres(self) -> None:
        await self.ash("postgres.sh", "stop")

    async def start_postgres(self) -> None:
        await self.ash("postgres.sh", "start")

    async def relay_holder(self, store: str) -> str | None:
        """The replica whose relay holds the store's lease (its holder id names its pid)."""
        conn = await asyncpg.connect(self.dsn(store))
        try:
            row = await conn.fetchrow("SELECT holder, expires_at FROM leases WHERE name = $1",
                                      f"relay:{store}")
        finally:
            await conn.close()
        if row is None or row["expires_at"] < time.time() * 1000:
            return None
        pid = int(row["holder"].split(":")[1])
        return next((name for name, p in self.pids().items() if p == pid), None)

    async def balancer(self) -> dict[str, Any]:
        """The balancer's counters per front port."""
        async with httpx.AsyncClient() as c:
            counters: dict[str, Any] = (await c.get(f"http://127.0.0.1:{self.status_port}/")).json()
            return counters

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.run_dir / "logs" / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a killed child of nobody's waits as a zombie until init reaps it: gone all the same
    try:
        return not Path(f"/proc/{pid}/stat").read_text().split(") ")[-1].startswith("Z")
    except FileNotFoundError:
        return False
