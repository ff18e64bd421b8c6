"""Fixtures of the fault tests: the city topology (once per session), the scale, and the two
plug-ins: the simulator's load and the invariant checker at the end. To drive the faults
with another load or end them with another check, change `load` or `end_check` below;
nothing else needs to know."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.faults.checks import invariants_hold
from tests.faults.harness import (
    EndCheck,
    FaultReport,
    FaultRun,
    LoadGenerator,
    Target,
    details,
    table,
    write,
)
from tests.faults.load import simulated_days
from tests.faults.topology import City


@dataclass(frozen=True)
class Scale:
    name: str
    transfers: int  # the simulated day's requests (of which those of `hours` are filed)
    speed: float  # simulated seconds per wall second (held back further by the system)
    hours: tuple[float, float]  # the hours of the day simulated (its busy ones: an even load)
    warmup_s: float  # load once it writes everywhere, before the no-fault end to end time
    replica_kills: int
    broker_outages: int  # each a different broker, down for broker_down_s
    broker_down_s: float
    postgres_restarts: int
    relay_kills: int  # taking the stores in turn
    seed: int = 8


SCALES = {
    # `make test` on CI: each fault dealt at least once, under a light load (about 0.3
    # transfers a second, each with its return leg, disinfection and lab result)
    "ci": Scale("ci", transfers=60, speed=300, hours=(8, 18), warmup_s=2, replica_kills=2,
                broker_outages=1, broker_down_s=15, postgres_restarts=1, relay_kills=2),
    # `make soak`: more and repeated faults over a longer day, twice the transfers. (Before the
    # projection applied a delivered batch in one transaction, 120 transfers over
    # 07:00-21:00 left its live upkeep 30-60 s behind with no fault.)
    "soak": Scale("soak", transfers=120, speed=300, hours=(7, 21), warmup_s=15, replica_kills=10,
                  broker_outages=3, broker_down_s=30, postgres_restarts=3, relay_kills=6),
}


@pytest.fixture(scope="session")
def scale() -> Scale:
    name = os.environ.get("CLOSEDLOOP_FAULTS_SCALE", "ci")
    if name not in SCALES:
        raise pytest.UsageError(f"CLOSEDLOOP_FAULTS_SCALE must be one of {sorted(SCALES)}, not {name!r}")
    return SCALES[name]


@pytest.fixture(scope="session")
def city() -> Iterator[City]:
    topology = City.from_environment()
    t0 = time.monotonic()
    took = topology.start()
    parts = ", ".join(f"{k} {v:.0f} s" for k, v in took.items())
    REPORTS.notes.append(f"topology up in {time.monotonic() - t0:.0f} s ({parts}); "
                         f"logs in {topology.run_dir}/logs")
    try:
        yield topology
    finally:
        topology.stop()


@pytest.fixture
def load(scale: Scale) -> LoadGenerator:
    """The load every fault runs under (a plug-in: see tests/faults/harness.py)."""
    return simulated_days(scale.transfers, scale.speed, scale.hours, scale.seed)


@pytest.fixture
def end_check() -> EndCheck:
    """What must hold once the load stopped and the pipeline drained (a plug-in)."""
    return invariants_hold


@pytest.fixture
def target(city: City) -> Target:
    return Target(city)


@pytest.fixture
def fault_run(scale: Scale, target: Target, load: LoadGenerator,
              end_check: EndCheck) -> Callable[[str], FaultRun]:
    """A fault test's run, by the fault's name: the load, the measurements, the end check."""
    return lambda name: FaultRun(name, scale.name, target, load, end_check, warmup_s=scale.warmup_s)


class Reports:
    def __init__(self) -> None:
        self.items: list[FaultReport] = []
        self.notes: list[str] = []
        self.path: Path | None = None


REPORTS = Reports()


@pytest.fixture
def record(city: City, scale: Scale) -> Iterator[list[FaultReport]]:
    """Where a test puts its report: printed at the end of the run and written to
    $CLOSEDLOOP_FAULTS_REPORT.md (and .json), by default <run dir>/report-<scale>."""
    REPORTS.path = Path(os.environ.get("CLOSEDLOOP_FAULTS_REPORT") or city.run_dir / f"report-{scale.name}")
    yield REPORTS.items
    h0, h1 = scale.hours
    setup = (f"load: the simulator (sim/) through the balancers, a day of {scale.transfers} transfers "
             f"(seed {scale.seed}) of which those requested {h0:02.0f}:00-{h1:02.0f}:00, at up to "
             f"{scale.speed:g} simulated s per s; end check: the invariant checker (services/invariants) "
             "over the four stores, and every acknowledged transfer in dispatch's store")
    heading = (f"# Fault tests ({scale.name})\n\n" + "\n".join(f"- {n}" for n in [setup, *REPORTS.notes]))
    write(REPORTS.items, REPORTS.path, heading)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not REPORTS.items:
        return
    terminalreporter.section("fault tests")
    for note in REPORTS.notes:
        terminalreporter.write_line(note)
    terminalreporter.write_line(table(REPORTS.items))
    for report in REPORTS.items:
        terminalreporter.write_line(details(report))
    if REPORTS.path is not None:
        terminalreporter.write_line(f"written to {REPORTS.path.with_suffix('.md')}")
