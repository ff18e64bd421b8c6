"""Relay and subscriptions on the real Kafka broker and PostgreSQL: kill the relay mid-batch,
run two relays at once, rebalance a consumer group mid-stream. Every event arrives; none
is applied twice."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer  # type: ignore[import-untyped]
from prometheus_client import REGISTRY
from sqlalchemy import Column, MetaData, String, Table, func, insert, select
from sqlalchemy.ext.asyncio import AsyncConnection

from libs.events.aggregate import UnitOfWork
from libs.events.bus import KafkaPublisher, KafkaSource, Relay, Subscription, topic_for
from libs.events.contracts import Event, registry
from libs.events.envelope import Envelope
from libs.events.store import EventStore, Meta
from tests.conftest import KAFKA, PG_DSN, fresh_pg_schema, pg_store

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]
META = Meta(actor="test", role="system", correlation_id="relay-test")

effects_md = MetaData()
# Deliberately no unique key: a double application would show as a second row.
effects = Table("effects", effects_md, Column("event_id", String(36)), Column("consumer", String(50)))


@registry.register
class ParcelSent(Event):
    n: int


async def fill(store: EventStore, n: int, streams: int = 10) -> None:
    versions = dict.fromkeys(range(streams), 0)
    for i in range(n):
        s = i % streams
        await store.append(f"parcel-{s}", versions[s], [ParcelSent(n=i)], META)
        versions[s] += 1


async def publish_all(store: EventStore, batch: int = 500) -> Relay:
    """Relays every event of the store to Kafka, and stops."""
    publisher = KafkaPublisher(KAFKA)
    await publisher.start()
    try:
        relay = Relay(store, publisher, batch=batch)
        while await relay.run_once():
            pass
    finally:
        await publisher.stop()
    return relay


@pytest.fixture
async def source() -> AsyncIterator[EventStore]:
    async with fresh_pg_schema() as schema:
        store = pg_store(f"src{uuid.uuid4().hex[:8]}", schema)
        await store.create_schema()
        store.schema = schema  # type: ignore[attr-defined]
        yield store
        await store.close()


@pytest.fixture
async def sink() -> AsyncIterator[EventStore]:
    async with fresh_pg_schema() as schema:
        store = pg_store("sink", schema)
        await store.create_schema(effects_md)
        yield store
        await store.close()


def record_effect(name: str):  # type: ignore[no-untyped-def]
    async def handle(env: Envelope, uow: UnitOfWork) -> None:
        async def write(conn: AsyncConnection) -> None:
            await conn.execute(insert(effects).values(event_id=str(env.event_id), consumer=name))

        uow.writes.append(write)

    return handle


async def applied(sink: EventStore) -> Counter[str]:
    async with sink.engine.connect() as conn:
        rows = await conn.execute(select(effects.c.event_id))
        return Counter(r.event_id for r in rows)


Until = Callable[[Subscription, KafkaSource], Awaitable[bool]]


def applied_at_least(want: int, passed_over: int = 0) -> Until:
    """`want` distinct events applied (and `passed_over` messages that are no events kept)."""
    async def enough(sub: Subscription, kafka: KafkaSource) -> bool:
        return len(await applied(sub.store)) >= want and (await sub.store.passed_over(0))[0] >= passed_over
    return enough


async def consume_until(sink: EventStore, topic_store: str, group: str, until: Until,
                        timeout: float = 90) -> tuple[Subscription, KafkaSource]:
    """Run one subscription until `until` holds."""
    kafka = KafkaSource(KAFKA, [topic_store], group=group)
    await kafka.start()
    sub = Subscription("sink", sink, {"ParcelSent": record_effect("sink")}, kafka)
    stop = asyncio.Event()
    task = asyncio.create_task(sub.run(stop))
    try:
        async with asyncio.timeout(timeout):
            while not await until(sub, kafka):
                assert not task.done(), task
                await asyncio.sleep(0.1)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await kafka.stop()
    return sub, kafka


async def raw_messages(topic: str, expect: int, timeout: float = 60) -> list[Envelope]:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=KAFKA, auto_offset_reset="earliest",
                                enable_auto_commit=False, group_id=None)
    await consumer.start()
    out: list[Envelope] = []
    try:
        deadline = asyncio.get_running_loop().time() + timeout
        while len(out) < expect and asyncio.get_running_loop().time() < deadline:
            for msgs in (await consumer.getmany(timeout_ms=500)).values():
                out += [Envelope.from_json(m.value) for m in msgs]
        extra = await consumer.getmany(timeout_ms=1000)  # anything beyond what we expected
        for msgs in extra.values():
            out += [Envelope.from_json(m.value) for m in msgs]
    finally:
        await consumer.stop()
    return out


async def test_relay_publishes_in_store_order_keyed_by_stream(source: EventStore) -> None:
    await fill(source, 200)
    relay = await publish_all(source, batch=64)
    assert await source.checkpoint(relay.name) == 200
    got = await raw_messages(topic_for(source.name), 200)
    assert Counter(str(e.event_id) for e in got) == Counter(
        str(e.event_id) for e in await source.read_all(0, 1000))
    by_stream: dict[str, list[int]] = {}
    for env in got:
        by_stream.setdefault(env.stream_id, []).append(env.stream_version)
    assert all(v == sorted(v) for v in by_stream.values())  # per-stream order kept


async def test_relay_killed_mid_batch_resumes_and_consumers_apply_once(
    source: EventStore, sink: EventStore
) -> None:
    total = 1200
    await fill(source, total)
    env = {**os.environ, "CLOSEDLOOP_TEST_PG_DSN": PG_DSN}
    args = [sys.executable, "-m", "tests.integration.relay_proc", source.name,
            source.schema, KAFKA]  # type: ignore[attr-defined]
    kills = 0
    while await source.checkpoint(f"relay:{source.name}") < total:
        proc = await asyncio.create_subprocess_exec(*args, env=env, stdout=asyncio.subprocess.PIPE)
        assert proc.stdout is not None
        await proc.stdout.readline()
        if kills < 3:
            before = await source.checkpoint(f"relay:{source.name}")
            while await source.checkpoint(f"relay:{source.name}") == before:
                await asyncio.sleep(0.01)
            proc.send_signal(signal.SIGKILL)  # mid-stream: later batches in flight or not
            kills += 1
            await proc.wait()
            await asyncio.sleep(1.6)  # the dead holder's lease lapses
        else:
            while await source.checkpoint(f"relay:{source.name}") < total:
                await asyncio.sleep(0.1)
            proc.terminate()
            await proc.wait()
    assert kills == 3
    await consume_until(sink, source.name, f"g-{uuid.uuid4().hex[:6]}", applied_at_least(total))
    counts = await applied(sink)
    assert len(counts) == total and set(counts.values()) == {1}
    assert set(counts) == {str(e.event_id) for e in await source.read_all(0, 5000)}


async def test_two_relays_share_one_lease_and_publish_each_event_once(source: EventStore) -> None:
    await fill(source, 300)
    pubs = [KafkaPublisher(KAFKA), KafkaPublisher(KAFKA)]
    for p in pubs:
        await p.start()
    replica = pg_store(source.name, source.schema)  # type: ignore[attr-defined]
    relays = [Relay(source, pubs[0], batch=25), Relay(replica, pubs[1], batch=25)]
    stop = asyncio.Event()
    tasks = [asyncio.create_task(r.run(stop)) for r in relays]
    try:
        while await source.checkpoint(relays[0].name) < 300:
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
        for p in pubs:
            await p.stop()
        await replica.close()
    assert sum(r.published for r in relays) == 300
    assert min(r.published for r in relays) == 0  # the lease kept the second one out
    got = await raw_messages(topic_for(source.name), 300)
    assert len(got) == 300 and len({e.event_id for e in got}) == 300


async def test_a_rebalance_mid_stream_is_harmless(source: EventStore, sink: EventStore) -> None:
    total = 900
    await fill(source, total, streams=30)
    await publish_all(source, batch=100)
    group = f"g-{uuid.uuid4().hex[:6]}"

    def member(name: str) -> tuple[KafkaSource, Subscription]:
        src = KafkaSource(KAFKA, [source.name], group=group)
        return src, Subscription("sink", sink, {"ParcelSent": record_effect(name)}, src)

    (src_a, sub_a), (src_b, sub_b) = member("a"), member("b")
    stop_a, stop_b = asyncio.Event(), asyncio.Event()
    await src_a.start()
    task_a = asyncio.create_task(sub_a.run(stop_a))
    while len(await applied(sink)) < total // 4:
        await asyncio.sleep(0.02)
    await src_b.start()  # joins: the group rebalances while a is mid-batch
    task_b = asyncio.create_task(sub_b.run(stop_b))
    while len(await applied(sink)) < total // 2:
        await asyncio.sleep(0.02)
    stop_a.set()  # leaves: another rebalance
    await asyncio.wait_for(task_a, 15)
    await src_a.stop()
    deadline = asyncio.get_running_loop().time() + 90
    while len(await applied(sink)) < total:
        assert asyncio.get_running_loop().time() < deadline, len(await applied(sink))
        await asyncio.sleep(0.1)
    stop_b.set()
    await asyncio.wait_for(task_b, 15)
    await src_b.stop()
    counts = await applied(sink)
    assert len(counts) == total and set(counts.values()) == {1}
    async with sink.engine.connect() as conn:
        assert await conn.scalar(select(func.count()).select_from(effects)) == total


async def test_a_failed_batch_is_delivered_again_after_rewind(source: EventStore) -> None:
    await fill(source, 60)
    await publish_all(source)
    kafka = KafkaSource(KAFKA, [source.name], group=f"g-{uuid.uuid4().hex[:6]}")
    await kafka.start()
    stop = asyncio.Event()
    batches = kafka.batches(stop)
    try:
        failed = {e.event_id for e in await anext(batches)}  # pretend it failed part-way
        await kafka.rewind()
        seen: set[uuid.UUID] = set()
        async with asyncio.timeout(30):
            while not failed <= seen:
                seen |= {e.event_id for e in await anext(batches)}
        assert failed <= seen
    finally:
        stop.set()
        await batches.aclose()
        await kafka.stop()


@registry.register
class ParcelWeighed(Event):
    n: int


async def committed(kafka: KafkaSource) -> int:
    """The group's offsets as the broker holds them, summed over the member's partitions."""
    consumer = kafka._consumer  # the member's own view of what the broker holds
    return sum([await consumer.committed(tp) or 0 for tp in consumer.assignment()])


async def test_a_source_passes_over_the_types_its_subscription_does_not_handle(source: EventStore) -> None:
    """Given the types it handles, a source hands over only those, by the relay's `type`
    header, and still commits past the rest: the group's next member starts after them."""
    for i in range(30):
        await source.append(f"parcel-{i}", 0, [ParcelSent(n=i), ParcelWeighed(n=i)], META)
    await source.append("parcel-last", 0, [ParcelWeighed(n=99)], META)  # the tail: passed over
    await publish_all(source)
    group = f"g-{uuid.uuid4().hex[:6]}"
    kafka = KafkaSource(KAFKA, [source.name], group=group, types={"ParcelSent"})
    await kafka.start()
    stop = asyncio.Event()
    got: list[Envelope] = []

    async def subscription() -> None:
        async for batch in kafka.batches(stop):
            got.extend(batch)
            await kafka.done(batch)

    running = asyncio.create_task(subscription())
    try:
        async with asyncio.timeout(60):  # the passed-over tail's offset is committed too
            while len(got) < 30 or await committed(kafka) < 61:
                await asyncio.sleep(0.2)
    finally:
        stop.set()
        await running
        await kafka.stop()
    assert {e.type for e in got} == {"ParcelSent"} and sorted(e.payload["n"] for e in got) == list(range(30))


def kept_on_metrics() -> float:
    return REGISTRY.get_sample_value("closedloop_consumer_messages_total",
                                     {"consumer": "sink", "outcome": "passed_over"}) or 0.0


async def test_a_message_that_is_no_envelope_is_passed_over_kept_once_not_redelivered_forever(
        source: EventStore, sink: EventStore) -> None:
    """Garbage on a topic, an envelope no store could hold, or one of a store that does not
    publish on that topic (forged at the broker, which the projection would have archived as
    a store no service owns): the source passes over it and delivers the store's events after
    it (it used to raise on it, and the group redelivered it, stalling every consumer,
    forever), and the consumer
    keeps it as received, where it was on the bus. Consumed again from the start (a new
    group: every message redelivered), nothing is applied or kept twice."""
    await source.append("parcel-first", 0, [ParcelSent(n=0)], META)
    forged = (await source.read_all(0, 1))[0].model_dump(mode="json")
    elsewhere = {**forged, "event_id": str(uuid.uuid4()), "store": "zzz"}  # whole, but not this topic's
    forged.update(event_id=str(uuid.uuid4()), stream_id="x" * 300)
    junks = (b"not json", b'{"type": "ParcelSent"}', json.dumps(forged).encode(),
             json.dumps(elsewhere).encode())
    producer = AIOKafkaProducer(bootstrap_servers=KAFKA)
    await producer.start()
    try:
        offsets = [(await producer.send_and_wait(topic_for(source.name), junk, partition=0)).offset
                   for junk in junks]
    finally:
        await producer.stop()
    await fill(source, 5, streams=5)  # after the junk, on every partition
    published = 0
    async with asyncio.timeout(30):
        while published < 6:  # the relay may hold the newest back a moment (gap safety)
            published += (await publish_all(source)).published
            await asyncio.sleep(0.1)
    before = kept_on_metrics()
    first, _ = await consume_until(sink, source.name, f"g-{uuid.uuid4().hex[:6]}", applied_at_least(6, 4))
    assert first.passed_over == 4
    assert kept_on_metrics() - before == 4  # what an operator's alert watches

    async def all_seen_again(sub: Subscription, kafka: KafkaSource) -> bool:
        return sub.duplicates >= 6 and kafka.unreadable >= 4

    # Again from the start: every message comes back; none is applied or kept again.
    again, kafka = await consume_until(sink, source.name, f"g-{uuid.uuid4().hex[:6]}", all_seen_again, 60)
    assert again.applied == 0 and again.passed_over == 0 and kafka.unreadable == 4
    assert kept_on_metrics() - before == 4
    assert set((await applied(sink)).values()) == {1} and len(await applied(sink)) == 6
    count, kept = await sink.passed_over()
    assert count == 4
    assert sorted((r["topic"], r["partition"], r["offset"], r["value"]) for r in kept) == sorted(
        (topic_for(source.name), 0, o, junk) for o, junk in zip(offsets, junks, strict=True))
    assert all(r["consumer"] == "sink" and r["reason"] for r in kept)
