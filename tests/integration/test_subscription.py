"""The subscription runner on the embedded bus (SQLite, store tail): a handler that fails
is retried, a restart resumes from the checkpoint, and nothing is applied twice."""

from __future__ import annotations

import asyncio
from pathlib import Path

from prometheus_client import REGISTRY

from libs.events.aggregate import Aggregate, UnitOfWork
from libs.events.bus import Batched, StoreTailSource, Subscription
from libs.events.contracts import Event, registry
from libs.events.envelope import Envelope
from libs.events.store import EventStore, Meta

META = Meta(actor="test", role="system", correlation_id="sub-test")


def exported(consumer: str) -> dict[str, float]:
    """What /metrics says this consumer did so far (the counters live as long as the process)."""
    return {o: REGISTRY.get_sample_value("closedloop_consumer_messages_total",
                                         {"consumer": consumer, "outcome": o}) or 0.0
            for o in ("applied", "duplicate", "passed_over")}


def grew(before: dict[str, float], consumer: str) -> dict[str, float]:
    now = exported(consumer)
    return {o: now[o] - before[o] for o in now}


@registry.register
class BellRung(Event):
    n: int


class Echoed(Aggregate):
    """The consumer's own aggregate: one per bell it answered."""

    stream_prefix = "echo"

    @classmethod
    def answer(cls, ident: str, n: int) -> Echoed:
        agg = cls(id=ident)
        agg.record(BellRung(n=n))
        return agg


class Echo:
    """Answers each BellRung with an event in the consumer's store; fails on demand."""

    def __init__(self, fail_first: int = 0) -> None:
        self.calls = 0
        self.fail_first = fail_first

    async def __call__(self, env: Envelope, uow: UnitOfWork) -> None:
        self.calls += 1
        if self.calls <= self.fail_first:
            raise RuntimeError("the database blinked")
        uow.add(Echoed.answer(str(env.event_id), env.payload["n"]))


async def stores(tmp_path: Path) -> tuple[EventStore, EventStore]:
    source = EventStore.from_url("bells", f"sqlite+aiosqlite:///{tmp_path}/bells.db")
    target = EventStore.from_url("echoes", f"sqlite+aiosqlite:///{tmp_path}/echoes.db")
    for s in (source, target):
        await s.create_schema()
    return source, target


async def run_until(sub: Subscription, target: EventStore, want: int) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(sub.run(stop))
    try:
        for _ in range(400):
            if await target.head() >= want:
                break
            await asyncio.sleep(0.02)
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)


async def test_a_failing_handler_is_retried_and_applied_once(tmp_path: Path) -> None:
    source, target = await stores(tmp_path)
    for i in range(5):
        await source.append(f"bell-{i}", 0, [BellRung(n=i)], META)
    echo = Echo(fail_first=3)
    sub = Subscription("echo", target, {"BellRung": echo},
                       StoreTailSource(source, target, "echo", idle_wait=0.01))
    await run_until(sub, target, 5)
    echoed = await target.read_all(0)
    assert sorted(e.payload["n"] for e in echoed) == [0, 1, 2, 3, 4]
    assert echo.calls == 8 and sub.applied == 5
    for s in (source, target):
        await s.close()


async def test_a_restart_resumes_from_the_checkpoint(tmp_path: Path) -> None:
    source, target = await stores(tmp_path)
    for i in range(3):
        await source.append(f"bell-{i}", 0, [BellRung(n=i)], META)
    first = Subscription("echo", target, {"BellRung": Echo()},
                         StoreTailSource(source, target, "echo", idle_wait=0.01))
    await run_until(first, target, 3)
    for i in range(3, 6):
        await source.append(f"bell-{i}", 0, [BellRung(n=i)], META)
    second_echo = Echo()
    second = Subscription("echo", target, {"BellRung": second_echo},
                          StoreTailSource(source, target, "echo", idle_wait=0.01))
    await run_until(second, target, 6)
    assert second_echo.calls == 3  # only the new ones: it resumed, it did not replay
    assert sorted(e.payload["n"] for e in await target.read_all(0)) == list(range(6))
    assert await target.checkpoint("echo<-bells") == 6
    for s in (source, target):
        await s.close()


async def test_a_redelivered_event_changes_nothing(tmp_path: Path) -> None:
    source, target = await stores(tmp_path)
    await source.append("bell-0", 0, [BellRung(n=0)], META)
    echo = Echo()
    sub = Subscription("echo", target, {"BellRung": echo},
                       StoreTailSource(source, target, "echo"))
    batch = await source.read_all(0)
    await sub.process(batch)
    await sub.process(batch)  # the bus delivered it twice
    assert echo.calls == 1 and sub.duplicates == 1
    assert len(await target.read_all(0)) == 1
    for s in (source, target):
        await s.close()


class EchoMany:
    """A Batched consumer: counts the transactions it was given; fails a batch on demand."""

    def __init__(self, fail_batches: int = 0) -> None:
        self.batches: list[int] = []
        self.alone = 0
        self.fail_batches = fail_batches

    async def each(self, env: Envelope, uow: UnitOfWork) -> None:
        self.alone += 1
        uow.add(Echoed.answer(str(env.event_id), env.payload["n"]))

    async def many(self, envs: list[Envelope], uow: UnitOfWork) -> None:
        self.batches.append(len(envs))
        if len(self.batches) <= self.fail_batches:
            raise RuntimeError("the batch tripped")
        for env in envs:
            uow.add(Echoed.answer(str(env.event_id), env.payload["n"]))


async def test_a_batched_consumer_applies_a_batch_in_one_commit_and_a_redelivery_changes_nothing(
        tmp_path: Path) -> None:
    source, target = await stores(tmp_path)
    for i in range(5):
        await source.append(f"bell-{i}", 0, [BellRung(n=i)], META)
    echo = EchoMany()
    sub = Subscription("echo", target, {"BellRung": Batched(echo.each, echo.many)},
                       StoreTailSource(source, target, "echo"))
    before = exported("echo")
    batch = await source.read_all(0)
    await sub.process(batch)
    assert echo.batches == [5] and echo.alone == 0 and sub.applied == 5
    assert grew(before, "echo") == {"applied": 5, "duplicate": 0, "passed_over": 0}  # /metrics
    assert await target.applied_among("echo", [str(e.event_id) for e in batch]) == {
        str(e.event_id) for e in batch}
    assert await target.checkpoint("echo<-bells") == 5
    # Redelivered, and one event more behind it: only the new one is applied.
    await source.append("bell-5", 0, [BellRung(n=5)], META)
    await sub.process(await source.read_all(0))
    assert echo.batches == [5, 1] and echo.alone == 0 and sub.duplicates == 5
    assert grew(before, "echo") == {"applied": 6, "duplicate": 5, "passed_over": 0}
    assert sorted(e.payload["n"] for e in await target.read_all(0)) == list(range(6))
    for s in (source, target):
        await s.close()


async def test_a_batch_that_fails_is_applied_one_by_one_and_nothing_of_it_stays(tmp_path: Path) -> None:
    source, target = await stores(tmp_path)
    for i in range(4):
        await source.append(f"bell-{i}", 0, [BellRung(n=i)], META)
    echo = EchoMany(fail_batches=1)
    sub = Subscription("echo", target, {"BellRung": Batched(echo.each, echo.many)},
                       StoreTailSource(source, target, "echo"))
    await sub.process(await source.read_all(0))
    assert echo.batches == [4] and echo.alone == 4 and sub.applied == 4
    assert sorted(e.payload["n"] for e in await target.read_all(0)) == list(range(4))
    assert await target.checkpoint("echo<-bells") == 4
    for s in (source, target):
        await s.close()
