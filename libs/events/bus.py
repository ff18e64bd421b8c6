"""Moving events between services: the relay (store → Kafka), the two kinds of source a
subscription reads from (Kafka, or the store itself in the embedded mode), and the
subscription runner that applies each event exactly once in effect.

Both sources give the same guarantees to the code above them: every committed event is
delivered at least once, in store order per stream; the runner records what it applied
in the same transaction as the effect, so a redelivery changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Protocol

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer  # type: ignore[import-untyped]
from aiokafka.errors import CommitFailedError, IllegalStateError  # type: ignore[import-untyped]
from aiokafka.structs import TopicPartition  # type: ignore[import-untyped]
from prometheus_client import Counter

from libs.events.aggregate import DomainError, UnitOfWork
from libs.events.envelope import Envelope
from libs.events.store import AlreadyApplied, Commit, ConcurrencyError, EventStore, Meta, PassedOver

log = logging.getLogger(__name__)


def topic_for(store_name: str, prefix: str = "closedloop") -> str:
    return f"{prefix}.{store_name}"


def now_ms() -> int:
    return int(time.time() * 1000)


class Backoff:
    """Exponential wait between retries of something that failed, reset by a success."""

    def __init__(self, first: float = 0.05, most: float = 5.0) -> None:
        self.first, self.most, self.delay = first, most, first

    def reset(self) -> None:
        self.delay = self.first

    async def wait(self) -> None:
        await asyncio.sleep(self.delay)
        self.delay = min(self.delay * 2, self.most)


def holder_id() -> str:
    """Unique per relay, even for several relays in one process."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


# -- publishing ----------------------------------------------------------------------


class Publisher(Protocol):
    async def publish(self, batch: Sequence[Envelope]) -> None:
        """Returns once the broker acknowledged every event of the batch."""


# aiokafka's idempotent producer: acks from all in-sync replicas, no duplicates from its own
# retries, order kept per partition (the key is the stream id).
PRODUCER_SETTINGS = {"enable_idempotence": True, "acks": "all", "linger_ms": 5, "request_timeout_ms": 15000}


class KafkaPublisher:
    """Publishes envelopes with PRODUCER_SETTINGS, keyed by stream id."""

    def __init__(self, bootstrap: str, topic_prefix: str = "closedloop") -> None:
        self.topic_prefix = topic_prefix
        self._producer = AIOKafkaProducer(bootstrap_servers=bootstrap, **PRODUCER_SETTINGS)

    async def start(self) -> None:
        await self._producer.start()

    async def stop(self) -> None:
        await self._producer.stop()

    async def publish(self, batch: Sequence[Envelope]) -> None:
        futures = [
            await self._producer.send(
                topic_for(env.store, self.topic_prefix), value=env.to_json(), key=env.stream_id.encode(),
                headers=[("type", env.type.encode())],
            )
            for env in batch
        ]
        await asyncio.gather(*futures)


class Relay:
    """Publishes one store's events in store order. Only the holder of the store's lease
    publishes; the checkpoint moves only after the broker acknowledged, and only while the
    lease is still held (so a paused, expired relay cannot move it backwards or forwards)."""

    def __init__(
        self, store: EventStore, publisher: Publisher, *, holder: str | None = None,
        ttl_ms: int = 5000, batch: int = 500, idle_wait: float = 0.05,
    ) -> None:
        self.store = store
        self.publisher = publisher
        self.name = f"relay:{store.name}"
        self.holder = holder or holder_id()
        self.ttl_ms = ttl_ms
        self.batch = batch
        self.idle_wait = idle_wait
        self.published = 0

    async def run_once(self) -> int:
        if not await self.store.acquire_lease(self.name, self.holder, self.ttl_ms, now_ms()):
            return 0
        after = await self.store.checkpoint(self.name)
        events = await self.store.read_all(after, self.batch)
        if not events:
            return 0
        await self.publisher.publish(events)
        if not await self.store.advance_checkpoint_if_holder(
            self.name, self.holder, events[-1].position, now_ms()
        ):
            log.warning("%s lost its lease before checkpointing; the next holder resends", self.name)
            return 0
        self.published += len(events)
        return len(events)

    async def run(self, stop: asyncio.Event) -> None:
        """Publish until stopped. A broker or database outage is waited out, never fatal:
        the checkpoint did not move, so the next round resends from it."""
        backoff = Backoff()
        while not stop.is_set():
            try:
                sent = await self.run_once()
                backoff.reset()
                if sent == 0:
                    await self.store.wait_for_append(self.idle_wait)
            except Exception as exc:
                log.warning("%s: round failed (%s: %s); retrying", self.name, type(exc).__name__, exc)
                await backoff.wait()
        with contextlib.suppress(Exception):
            await self.store.release_lease(self.name, self.holder)


# -- consuming -----------------------------------------------------------------------


class Source(Protocol):
    def batches(self, stop: asyncio.Event) -> AsyncIterator[list[Envelope]]:
        """Batches of events, each in order per stream."""

    async def done(self, batch: list[Envelope]) -> None:
        """The batch's effects are committed: the source may forget it."""

    def checkpoint_name(self, env: Envelope) -> str | None:
        """Where the consumer records its position with the effect, if the source resumes
        from the consumer's own store rather than from broker offsets."""

    def passed_over(self) -> list[PassedOver]:
        """The messages of the last batch that are no event (the consumer keeps them before
        `done`)."""

    async def rewind(self) -> None:
        """The last batch failed part-way: deliver it again from its start."""


class StoreTailSource:
    """The embedded bus: read the producing store in position order, resuming from the
    checkpoint that the consumer commits with each effect. Durable with no broker."""

    def __init__(self, source: EventStore, target: EventStore, consumer: str,
                 page: int = 200, idle_wait: float = 0.2) -> None:
        self.source = source
        self.target = target
        self.name = f"{consumer}<-{source.name}"
        self.page = page
        self.idle_wait = idle_wait

    async def batches(self, stop: asyncio.Event) -> AsyncIterator[list[Envelope]]:
        after = await self.target.checkpoint(self.name)
        while not stop.is_set():
            batch = await self.source.read_all(after, self.page)
            if batch:
                after = batch[-1].position
                yield batch
            else:
                await self.source.wait_for_append(self.idle_wait)

    async def done(self, batch: list[Envelope]) -> None:
        return None

    def checkpoint_name(self, env: Envelope) -> str | None:
        return self.name

    def passed_over(self) -> list[PassedOver]:
        return []  # it reads envelopes its own store wrote

    async def rewind(self) -> None:
        return None  # a new batches() starts again from the committed checkpoint


def _type_header(headers: Sequence[tuple[str, bytes]]) -> str | None:
    """The event type the relay put beside the envelope (None: a message without it)."""
    for key, value in headers:
        if key == "type":
            return value.decode()
    return None


class KafkaSource:
    """A consumer group member. Offsets are committed only after the batch's database
    commits; a rebalance in between means a redelivery, which tracking makes harmless."""

    def __init__(self, bootstrap: str, stores: Sequence[str], group: str,
                 topic_prefix: str = "closedloop", types: Collection[str] | None = None) -> None:
        # The types its subscription handles (None: all): the others are passed over by
        # their `type` header, unparsed (a crew's six steps per trip are no business of
        # dispatch's, and parsing every envelope was 4% of its CPU).
        self._types = None if types is None else frozenset(types)
        self._prefix = topic_prefix
        self.unreadable = 0  # messages passed over: not envelopes
        self._passed_over: list[PassedOver] = []
        self._consumer = AIOKafkaConsumer(
            *[topic_for(s, topic_prefix) for s in stores], bootstrap_servers=bootstrap, group_id=group,
            enable_auto_commit=False, auto_offset_reset="earliest",
            isolation_level="read_committed", max_poll_records=500,
        )
        self._offsets: dict[TopicPartition, int] = {}
        self._starts: dict[TopicPartition, int] = {}

    async def start(self) -> None:
        await self._consumer.start()

    async def stop(self) -> None:
        await self._consumer.stop()

    async def batches(self, stop: asyncio.Event) -> AsyncIterator[list[Envelope]]:
        while not stop.is_set():
            records = await self._consumer.getmany(timeout_ms=200)
            batch: list[Envelope] = []
            types = self._types
            self._offsets, self._starts, self._passed_over = {}, {}, []
            for tp, msgs in records.items():
                for msg in msgs:
                    self._starts.setdefault(tp, msg.offset)
                    self._offsets[tp] = msg.offset + 1
                    if types is None or (kind := _type_header(msg.headers)) is None or kind in types:
                        try:
                            env = Envelope.from_json(msg.value)
                            if topic_for(env.store, self._prefix) != tp.topic:
                                # The relay publishes a store's events on its own topic only.
                                raise ValueError(f"an envelope of store {env.store[:100]!r} on {tp.topic}, "
                                                 "where no store of that name publishes")
                            batch.append(env)
                        except (ValueError, TypeError) as exc:  # pydantic's ValidationError too
                            # Not an envelope this topic's store could have written (garbage, or
                            # forged at the broker): no event of a store is lost by passing over it,
                            # and raising would redeliver it, and stall the group, forever.
                            # The consumer keeps it as received (passed_over).
                            self.unreadable += 1
                            reason = str(exc)[:2000]
                            self._passed_over.append(PassedOver(
                                tp.topic, tp.partition, msg.offset, msg.key, msg.value, reason))
                            log.error("%s[%d] offset %d is not an envelope; passed over: %s",
                                      tp.topic, tp.partition, msg.offset, reason[:500])
            if batch or self._passed_over:
                yield batch
            elif self._offsets:  # nothing it handles: only move past them
                await self.done(batch)

    async def done(self, batch: list[Envelope]) -> None:
        # A rebalance while the batch was applied may have moved some of its partitions to
        # another member: their offsets are not ours to commit any more (the new owner
        # redelivers from the last commit; tracking drops the repeats).
        assigned = self._consumer.assignment()
        offsets = {tp: o for tp, o in self._offsets.items() if tp in assigned}
        if not offsets:
            return
        try:
            await self._consumer.commit(offsets)
        except (CommitFailedError, IllegalStateError):
            log.info("offset commit lost to a rebalance; the new owner redelivers, tracking dedups")

    def checkpoint_name(self, env: Envelope) -> str | None:
        return None

    def passed_over(self) -> list[PassedOver]:
        return list(self._passed_over)

    async def rewind(self) -> None:
        assigned = self._consumer.assignment()
        for tp, offset in self._starts.items():
            if tp in assigned:  # a partition lost to a rebalance is the new owner's now
                self._consumer.seek(tp, offset)
        self._starts, self._offsets, self._passed_over = {}, {}, []


Handler = Callable[[Envelope, UnitOfWork], Awaitable[None]]
ALL_TYPES = "*"


@dataclass(frozen=True)
class Batched:
    """A handler that can also apply a delivered batch in one transaction: one tracking
    row per event, written with the batch's effects. For a consumer whose cost is per
    transaction rather than per event (the projection re-evaluates each scope a batch
    touches once). Alone (a redelivery, a batch that failed) it applies `each`."""

    each: Handler
    many: Callable[[list[Envelope], UnitOfWork], Awaitable[None]]

    async def __call__(self, env: Envelope, uow: UnitOfWork) -> None:
        await self.each(env, uow)


# What each consumer did with what it was given, for /metrics: an operator alerts on
# `passed_over` (a message that was no event: garbage or a forgery at the broker, kept in
# the consumer's passed_over table) and watches `duplicate` (redeliveries) beside `applied`.
CONSUMED = Counter("closedloop_consumer_messages_total", "Messages a subscription was given, by outcome",
                   ["consumer", "outcome"])
OUTCOMES = ("applied", "duplicate", "passed_over")


class Subscription:
    """Applies events of chosen types to a consumer's store, each exactly once in effect."""

    def __init__(
        self, name: str, store: EventStore, handlers: dict[str, Handler], source: Source
    ) -> None:
        self.name = name
        self.store = store
        self.handlers = handlers
        self.source = source
        # This run's counts (the tests read them); /metrics has them too (CONSUMED).
        self.applied = 0
        self.duplicates = 0
        self.passed_over = 0  # messages kept as no event (PassedOver)
        self._exported = {o: CONSUMED.labels(name, o) for o in OUTCOMES}

    def _count(self, applied: int = 0, duplicates: int = 0, passed_over: int = 0) -> None:
        self.applied += applied
        self.duplicates += duplicates
        self.passed_over += passed_over
        for outcome, n in zip(OUTCOMES, (applied, duplicates, passed_over), strict=True):
            if n:
                self._exported[outcome].inc(n)

    async def run(self, stop: asyncio.Event) -> None:
        """Apply until stopped. A failure (database down, broker gone) rewinds the source
        to the failed batch and tries again: tracking makes the replay harmless."""
        backoff = Backoff()
        while not stop.is_set():
            try:
                async for batch in self.source.batches(stop):
                    if batch:
                        await self.process(batch)
                    if passed_over := self.source.passed_over():
                        # Before the offsets move: a crash in between redelivers them, and
                        # they are kept once.
                        self._count(passed_over=await self.store.keep_passed_over(self.name, passed_over))
                    await self.source.done(batch)
                    backoff.reset()
            except Exception as exc:
                log.warning("%s: batch failed (%s: %s); rewinding", self.name, type(exc).__name__, exc)
                with contextlib.suppress(Exception):
                    await self.source.rewind()
                await backoff.wait()

    async def process(self, batch: list[Envelope]) -> None:
        tail = batch[-1]
        handled = [(env, handler) for env in batch
                   if (handler := self.handlers.get(env.type) or self.handlers.get(ALL_TYPES))]
        batched = {id(h) for _, h in handled}
        if len(handled) > 1 and len(batched) == 1 and isinstance(handled[0][1], Batched) \
                and await self._apply_batch([env for env, _ in handled], handled[0][1], tail):
            return
        checkpointed = False
        for i, (env, handler) in enumerate(handled):
            # The batch's last effect also moves the checkpoint past the uninteresting events
            # after it, in the same commit.
            upto = tail.position if i == len(handled) - 1 else env.position
            checkpointed = await self._apply(env, handler, upto)
        cp = self.source.checkpoint_name(tail)
        if cp is not None and not checkpointed:
            # Only uninteresting events after the last effect: move past them.
            await self.store.commit(Commit(meta=self._meta(tail), checkpoint=(cp, tail.position)))

    async def _apply_batch(self, envs: list[Envelope], handler: Batched, tail: Envelope) -> bool:
        """The batch's events not applied before, in one transaction with their tracking
        rows and the checkpoint at the batch's end. False when that did not commit (a
        replica applied one of them meanwhile, the store failed, the handler failed): the
        caller then applies them one by one, with their own retries."""
        seen = await self.store.applied_among(self.name, [str(e.event_id) for e in envs])
        fresh = list({str(e.event_id): e for e in envs if str(e.event_id) not in seen}.values())
        if not fresh:
            return False
        cp = self.source.checkpoint_name(tail)
        # Tracking rows in one order whatever the delivery's: two replicas given one
        # batch in different partition orders must not deadlock on them.
        uow = UnitOfWork(self.store, self._meta(fresh[-1]),
                         tracking=tuple(sorted((self.name, str(e.event_id)) for e in fresh)),
                         checkpoint=(cp, tail.position) if cp else None)
        try:
            await handler.many(fresh, uow)
            await uow.commit()
        except Exception as exc:
            log.info("%s: batch of %d not applied at once (%s: %s); one by one", self.name,
                     len(fresh), type(exc).__name__, exc)
            return False
        self._count(applied=len(fresh), duplicates=len(envs) - len(fresh))
        return True

    def _meta(self, env: Envelope) -> Meta:
        return Meta(actor=f"system:{self.name}", role="system",
                    correlation_id=env.correlation_id, causation_id=str(env.event_id))

    async def _apply(self, env: Envelope, handler: Handler, upto: int) -> bool:
        """Applies one event, moving the checkpoint (if the source keeps one) to `upto` with
        it. True when that commit happened (False: applied before)."""
        if await self.store.is_applied(self.name, str(env.event_id)):
            self._count(duplicates=1)
            return False
        cp = self.source.checkpoint_name(env)
        backoff = Backoff()
        while True:
            uow = UnitOfWork(
                self.store, self._meta(env), tracking=((self.name, str(env.event_id)),),
                checkpoint=(cp, upto) if cp else None,
            )
            try:
                await handler(env, uow)
                await uow.commit()
                self._count(applied=1)
                return True
            except AlreadyApplied:
                self._count(duplicates=1)
                return False
            except ConcurrencyError:
                continue
            except DomainError as refusal:
                # The event stands; the consumer's domain declines to act on it. Record
                # that it was seen so the stream moves on; the refusal is logged.
                log.warning("%s declined %s %s: %s", self.name, env.type, env.event_id, refusal)
                uow = UnitOfWork(self.store, self._meta(env), tracking=((self.name, str(env.event_id)),),
                                 checkpoint=(cp, upto) if cp else None)
                try:
                    await uow.commit()
                except AlreadyApplied:
                    return False
                return True
            except Exception:
                log.exception("%s failed on %s %s; retrying", self.name, env.type, env.event_id)
                await backoff.wait()
