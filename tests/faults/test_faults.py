"""Faults that real deployments see, each dealt to the city topology (three brokers, two
replicas of each service behind the balancer) under the simulator's load (a day of the
sample region through the balancers, tests/faults/load.py), and each ending with the
invariant checker over the city's stores (tests/faults/checks.py): any finding fails the
test. The report of each (requests refused and retried, how long until the API and the
pipeline were back, lost, doubled) is printed at the end of the run and written beside the
topology's logs.

CLOSEDLOOP_FAULTS_SCALE=ci (default, `make test`) or soak (`make soak`): see conftest.SCALES."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from functools import partial

import pytest

from tests.faults.conftest import Scale
from tests.faults.harness import FaultReport, FaultRun, details
from tests.faults.topology import PUBLISHING, City

pytestmark = [pytest.mark.postgres, pytest.mark.kafka, pytest.mark.timeout(3600)]


Run = Callable[[str], FaultRun]


def judge(report: FaultReport, record: list[FaultReport]) -> None:
    record.append(report)
    assert report.ok, details(report)


async def test_sigkill_a_random_service_replica_repeatedly(
        city: City, scale: Scale, fault_run: Run, record: list[FaultReport]) -> None:
    """SIGKILL one of the eight replicas, chosen at random; the balancer sends its clients to
    the other, its consumer groups hand its partitions over; a supervisor (services.sh start,
    a second later) brings it back, and the groups rebalance again. Then the next one."""
    rng = random.Random(scale.seed)
    async with fault_run("SIGKILL a random service replica") as fault:
        for _ in range(scale.replica_kills):
            victim = rng.choice(sorted(city.pids()))
            await fault.inject(f"SIGKILL {victim}", partial(city.kill, victim),
                               supervisor=(f"{victim} restarted", city.restart_missing))
            await fault.hold(2)
        report = await fault.finish()
    judge(report, record)


async def test_a_broker_stops_and_comes_back(
        city: City, scale: Scale, fault_run: Run, record: list[FaultReport]) -> None:
    """SIGKILL one of the three brokers (it is a KRaft voter too); with replication 3 and
    min.insync.replicas 2 every acknowledged write is on two live brokers and writes go on.
    It stays down broker_down_s under load (counted from the kill), then starts again and
    catches up."""
    nodes = random.Random(scale.seed).sample(range(1, city.brokers + 1), city.brokers)
    async with fault_run("a broker stopped and back") as fault:
        for node in (nodes * scale.broker_outages)[:scale.broker_outages]:
            down = await fault.inject(f"SIGKILL broker {node}", partial(city.stop_broker, node, kill=True))
            await fault.hold(scale.broker_down_s - (time.monotonic() - down.at))
            await fault.inject(f"broker {node} started", partial(city.start_broker, node), kind="restore")
            await fault.hold(2)
        report = await fault.finish()
    judge(report, record)


async def test_postgresql_restarts(
        city: City, scale: Scale, fault_run: Run, record: list[FaultReport]) -> None:
    """Restart the one PostgreSQL every service's store lives in (fast shutdown, then start):
    requests in that window fail and are retried; relays and consumers back off and resume
    from their checkpoints and tracking."""

    async def restart() -> None:
        await city.stop_postgres()
        await city.start_postgres()

    async with fault_run("PostgreSQL restarted") as fault:
        for _ in range(scale.postgres_restarts):
            await fault.inject("PostgreSQL stopped (fast) and started", restart)
            await fault.hold(5)
        report = await fault.finish()
    judge(report, record)


async def test_the_relay_holding_the_lease_is_killed(
        city: City, scale: Scale, fault_run: Run, record: list[FaultReport]) -> None:
    """SIGKILL the replica whose relay holds its store's lease (the stores in turn): the
    other replica's relay takes the lease when it expires and publishes from the checkpoint,
    resending what the dead one had sent but not checkpointed (consumers drop the repeats)."""
    async with fault_run("the relay holding the lease killed") as fault:
        for n in range(scale.relay_kills):
            store = PUBLISHING[n % len(PUBLISHING)]
            holder = None
            while holder is None:
                holder = await city.relay_holder(store)
                await asyncio.sleep(0.2)
            await fault.inject(f"SIGKILL {holder} (holds relay:{store})", partial(city.kill, holder),
                               supervisor=(f"{holder} restarted", city.restart_missing))
            await fault.hold(2)
        report = await fault.finish()
    judge(report, record)
