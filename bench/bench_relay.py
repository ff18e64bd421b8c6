"""Relay throughput to Kafka: the project's Relay publishing N events already in the store
(lease, read a page, publish, wait for every ack, move the fenced checkpoint, next page),
beside aiokafka producing the same messages (value, key, headers) as fast as it can, with
the same producer settings (bus.PRODUCER_SETTINGS: idempotent, acks=all), to a topic with
the same partition count, on the broker deploy/local/with-infra.sh started.

    make bench BENCH=bench_relay
    BENCH_RELAY_EVENTS=20000 make bench BENCH=bench_relay

The store is PostgreSQL, a database of its own, filled through the store (real hash chain)
and analyzed before the clock starts. Relay and raw producer take turns for ROUNDS rounds
(the relay from checkpoint 0 each time); topic end offsets are checked against the counts
and the topics deleted afterwards.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer  # type: ignore[import-untyped]
from aiokafka.admin import AIOKafkaAdminClient  # type: ignore[import-untyped]
from aiokafka.structs import TopicPartition  # type: ignore[import-untyped]

from bench.infra import KAFKA, analyze, database, sqlalchemy_url
from bench.report import Row, table
from bench.sample import META, STREAM_LENGTH, fill
from libs.events.bus import PRODUCER_SETTINGS, KafkaPublisher, Relay, topic_for
from libs.events.envelope import Envelope
from libs.events.store import Commit, EventStore
from services.runtime import ensure_topics
from services.settings import Settings

EVENTS = int(os.environ.get("BENCH_RELAY_EVENTS", "100000"))
ROUNDS = 2
Message = tuple[bytes, bytes, list[tuple[str, bytes]]]


async def read_everything(store: EventStore, page: int) -> list[Envelope]:
    out: list[Envelope] = []
    while batch := await store.read_all(out[-1].position if out else 0, page):
        out += batch
    return out


async def relay_round(store: EventStore, publisher: KafkaPublisher) -> float:
    relay = Relay(store, publisher)  # the services' settings: pages of 500
    await store.commit(Commit(meta=META, checkpoint=(relay.name, 0)))  # from the start again
    began = time.perf_counter()
    while relay.published < EVENTS:  # Relay.run's loop, without its waits when idle
        await relay.run_once()
    took = time.perf_counter() - began
    await store.release_lease(relay.name, relay.holder)
    return took


async def raw_round(producer: AIOKafkaProducer, topic: str, messages: list[Message]) -> float:
    began = time.perf_counter()
    acks = [await producer.send(topic, value=v, key=k, headers=h) for v, k, h in messages]
    await asyncio.gather(*acks)
    return time.perf_counter() - began


async def end_offsets(topics: list[str], partitions: int) -> dict[str, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=KAFKA)
    await consumer.start()
    try:
        parts = [TopicPartition(t, p) for t in topics for p in range(partitions)]
        offsets = await consumer.end_offsets(parts)
        return {t: sum(o for tp, o in offsets.items() if tp.topic == t) for t in topics}
    finally:
        await consumer.stop()


async def main() -> str:
    prefix = f"bench{uuid.uuid4().hex[:8]}"
    relay_topic, raw_topic = topic_for("relay", prefix), topic_for("raw", prefix)
    settings = Settings(mode="distributed", kafka_bootstrap=KAFKA, topic_prefix=prefix)
    await ensure_topics(settings, [relay_topic, raw_topic])  # the services' partition count
    relay_s: list[float] = []
    raw_s: list[float] = []
    try:
        async with database("relay") as dsn:
            store = EventStore.from_url("relay", sqlalchemy_url(dsn))
            try:
                await store.create_schema()
                await fill(store, [f"transfer-{i}" for i in range(EVENTS // STREAM_LENGTH)])
                await analyze(dsn)
                began = time.perf_counter()
                stored = await read_everything(store, 500)
                read_rate = len(stored) / (time.perf_counter() - began)
                messages = [(e.to_json(), e.stream_id.encode(), [("type", e.type.encode())]) for e in stored]
                publisher = KafkaPublisher(KAFKA, prefix)
                producer = AIOKafkaProducer(bootstrap_servers=KAFKA, **PRODUCER_SETTINGS)
                await publisher.start()
                await producer.start()
                try:
                    for _ in range(ROUNDS):
                        relay_s.append(await relay_round(store, publisher))
                        raw_s.append(await raw_round(producer, raw_topic, messages))
                finally:
                    await publisher.stop()
                    await producer.stop()
            finally:
                await store.close()
        counts = await end_offsets([relay_topic, raw_topic], settings.kafka_partitions)
        assert counts == {relay_topic: EVENTS * ROUNDS, raw_topic: EVENTS * ROUNDS}, counts
    finally:
        admin = AIOKafkaAdminClient(bootstrap_servers=KAFKA)
        await admin.start()
        try:
            await admin.delete_topics([relay_topic, raw_topic])
        finally:
            await admin.close()
    relay_name, raw_name = "Relay: store -> Kafka", "aiokafka raw produce, same messages and settings"
    rows = [Row(relay_name, EVENTS * ROUNDS / sum(relay_s), "events/s", peer=raw_name),
            Row(raw_name, EVENTS * ROUNDS / sum(raw_s), "events/s"),
            Row("store read_all alone, pages of 500 (no Kafka)", read_rate, "events/s", peer=raw_name)]
    per_round = (f"relay {', '.join(f'{EVENTS / s:,.0f}' for s in relay_s)}; "
                 f"raw {', '.join(f'{EVENTS / s:,.0f}' for s in raw_s)}")
    return (table(f"Relay to Kafka, {EVENTS:,} events of ~1 kB, {settings.kafka_partitions} partitions, "
                  f"{ROUNDS} rounds each (`make bench BENCH=bench_relay`)", rows)
            + f"\nevents/s per round: {per_round}\n")
