"""One contract, every store backend: SQLite (embedded) and PostgreSQL (distributed)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from libs.events.aggregate import Aggregate, UnitOfWork, with_retry
from libs.events.contracts import Event, registry
from libs.events.store import (
    AlreadyApplied,
    Commit,
    ConcurrencyError,
    EventStore,
    IdempotencyKeyTaken,
    IdempotencyRecord,
    Meta,
    NewEvent,
    PassedOver,
    StateChange,
    StateRow,
    StreamAppend,
)
from libs.web.health import chain_report

MakeStore = Callable[..., Awaitable[EventStore]]
META = Meta(actor="tester", role="dispatcher", correlation_id="corr-1")


@registry.register
class ThingHappened(Event):
    n: int
    note: str = ""


def things(*ns: int) -> list[ThingHappened]:
    return [ThingHappened(n=n, note="中文 ✓") for n in ns]


async def test_append_and_read_back(make_store: MakeStore) -> None:
    store = await make_store()
    written = await store.append("thing-1", 0, things(1, 2), META)
    assert [e.stream_version for e in written] == [1, 2]
    assert [e.position for e in written] == [1, 2]
    back = await store.read_stream("thing-1")
    assert back == written
    first = back[0]
    assert first.type == "ThingHappened" and first.schema_version == 1
    assert first.payload == {"n": 1, "note": "中文 ✓"}
    assert (first.actor, first.role, first.correlation_id) == ("tester", "dispatcher", "corr-1")
    assert first.store == "test" and first.recorded_at.endswith("+00:00")
    assert back[1].prev_hash == first.hash
    assert await store.read_stream("thing-1", after_version=1) == [back[1]]
    assert await store.read_stream("nothing") == []


async def test_expected_version_conflict_is_refused(make_store: MakeStore) -> None:
    store = await make_store()
    await store.append("thing-1", 0, things(1), META)
    with pytest.raises(ConcurrencyError) as err:
        await store.append("thing-1", 0, things(2), META)
    assert (err.value.expected, err.value.actual) == (0, 1)
    assert len(await store.read_stream("thing-1")) == 1


async def test_a_commit_is_all_or_nothing(make_store: MakeStore) -> None:
    store = await make_store()
    await store.append("thing-b", 0, things(1), META)
    commit = Commit(meta=META, appends=[
        StreamAppend("thing-a", 0, [NewEvent(e) for e in things(1)]),
        StreamAppend("thing-b", 0, [NewEvent(e) for e in things(2)]),  # stale: b is at 1
    ])
    with pytest.raises(ConcurrencyError):
        await store.commit(commit)
    assert await store.read_stream("thing-a") == []
    assert await store.head() == 1


async def test_read_all_pages_in_store_order(make_store: MakeStore) -> None:
    store = await make_store()
    for i in range(1, 8):
        await store.append(f"thing-{i % 3}", len(await store.read_stream(f"thing-{i % 3}")),
                           things(i), META)
    page1 = await store.read_all(0, 3)
    page2 = await store.read_all(page1[-1].position, 3)
    page3 = await store.read_all(page2[-1].position, 3)
    assert [e.position for e in page1 + page2 + page3] == list(range(1, 8))
    assert [e.payload["n"] for e in page1 + page2 + page3] == list(range(1, 8))


async def test_concurrent_writers_one_stream_exactly_one_wins_each_version(make_store: MakeStore) -> None:
    replicas = [await make_store() for _ in range(4)]  # four replicas, one database

    async def writer(i: int) -> int:
        store = replicas[i % len(replicas)]
        while True:
            version = len(await store.read_stream("contended"))
            try:
                await store.append("contended", version, things(i), META)
                return version + 1
            except ConcurrencyError:
                await asyncio.sleep(0)

    versions = await asyncio.gather(*[writer(i) for i in range(16)])
    assert sorted(versions) == list(range(1, 17))
    events = await replicas[0].read_stream("contended")
    assert sorted(e.payload["n"] for e in events) == list(range(16))
    assert await replicas[0].verify() is None


async def test_hash_chain_verifies_and_catches_an_edit(make_store: MakeStore) -> None:
    store = await make_store()
    for i in range(5):
        await store.append(f"thing-{i}", 0, things(i), META)
    assert await store.verify(page=2) is None
    async with store.engine.begin() as conn:
        await conn.execute(text("UPDATE events SET payload = :p WHERE position = 3"),
                           {"p": json.dumps({"n": 99, "note": ""})})
    broken = await store.verify(page=2)
    assert broken is not None and broken.position == 3 and "edited" in broken.reason


async def test_hash_chain_catches_a_deleted_event(make_store: MakeStore) -> None:
    store = await make_store()
    for i in range(4):
        await store.append(f"thing-{i}", 0, things(i), META)
    async with store.engine.begin() as conn:
        await conn.execute(text("DELETE FROM events WHERE position = 2"))
    broken = await store.verify()
    assert broken is not None and broken.position in (2, 3)


async def test_tracking_makes_a_redelivery_change_nothing(make_store: MakeStore) -> None:
    store = await make_store()

    def effect() -> Commit:
        return Commit(meta=META, tracking=(("consumer-x", "event-1"),),
                      appends=[StreamAppend("effect-1", 0, [NewEvent(e) for e in things(1)])])

    await store.commit(effect())
    assert await store.is_applied("consumer-x", "event-1")
    with pytest.raises((AlreadyApplied, ConcurrencyError)):
        await store.commit(effect())
    dup = Commit(meta=META, tracking=(("consumer-x", "event-1"),))
    with pytest.raises(AlreadyApplied):
        await store.commit(dup)
    assert len(await store.read_stream("effect-1")) == 1


async def test_a_message_passed_over_is_kept_once_as_received(make_store: MakeStore) -> None:
    """Nothing that reached a consumer is lost without a trace: a message that is no event
    is kept with where it was on the bus; a redelivery of it (a crash before the offsets
    were committed) is not kept twice. The owning service's chain report shows them."""
    store = await make_store()
    junk = PassedOver("closedloop.dispatch", 2, 41, b"k", b"\xff not json \xe4\xb8\xad", "Invalid JSON")
    other = PassedOver("closedloop.dispatch", 2, 42, None, b'{"type": "X"}', "1 validation error")
    assert await store.keep_passed_over("projection", [junk, other]) == 2
    assert await store.keep_passed_over("projection", [junk]) == 0  # redelivered
    assert await store.keep_passed_over("dispatch-consumer", [junk]) == 1  # another consumer's
    count, latest = await store.passed_over()
    assert count == 3
    kept = {(r["consumer"], r["offset"]): r for r in latest}
    assert kept[("projection", 41)]["value"] == junk.value and kept[("projection", 41)]["key"] == b"k"
    assert kept[("projection", 42)]["key"] is None and kept[("projection", 42)]["reason"] == other.reason
    report = (await chain_report(store))["passed_over"]
    assert report["messages"] == 3 and len(report["latest"]) == 3
    shown = {(r["consumer"], r["offset"]): r for r in report["latest"]}[("projection", 41)]
    assert shown["bytes"] == len(junk.value or b"") and shown["value"] == "\ufffd not json 中"
    assert shown["topic"] == "closedloop.dispatch" and shown["partition"] == 2


async def test_writes_run_in_the_same_transaction(make_store: MakeStore) -> None:
    store = await make_store()

    async def fail(conn: AsyncConnection) -> None:
        raise RuntimeError("the effect failed")

    with pytest.raises(RuntimeError):
        await store.commit(Commit(meta=META, tracking=(("c", "e"),), writes=[fail],
                                  appends=[StreamAppend("s", 0, [NewEvent(things(1)[0])])]))
    assert await store.head() == 0
    assert not await store.is_applied("c", "e")


async def test_idempotency_record_is_kept_once(make_store: MakeStore) -> None:
    store = await make_store()
    rec = IdempotencyRecord("k1", "hash", 201, '{"id": "t1"}')
    await store.commit(Commit(meta=META, idempotency=rec,
                              appends=[StreamAppend("s-1", 0, [NewEvent(things(1)[0])])]))
    assert await store.idempotent_response("k1") == rec
    with pytest.raises(IdempotencyKeyTaken):
        await store.commit(Commit(meta=META, idempotency=rec,
                                  appends=[StreamAppend("s-2", 0, [NewEvent(things(2)[0])])]))
    assert await store.read_stream("s-2") == []


async def test_lease_has_one_holder_and_expires(make_store: MakeStore) -> None:
    a, b = await make_store(), await make_store()
    assert await a.acquire_lease("relay:x", "a", ttl_ms=1000, now_ms=10_000)
    assert not await b.acquire_lease("relay:x", "b", ttl_ms=1000, now_ms=10_500)
    assert await a.acquire_lease("relay:x", "a", ttl_ms=1000, now_ms=10_900)  # renew
    assert await a.advance_checkpoint_if_holder("relay:x", "a", 5, now_ms=11_000)
    assert await b.acquire_lease("relay:x", "b", ttl_ms=1000, now_ms=12_000)  # a expired
    assert not await a.advance_checkpoint_if_holder("relay:x", "a", 9, now_ms=12_001)  # fenced
    assert await a.checkpoint("relay:x") == 5


async def test_concurrent_commits_to_one_store_each_get_their_own_outcome(make_store: MakeStore) -> None:
    """Commits that arrive together (on PostgreSQL, one group commit) succeed or are refused
    one by one, all or nothing each; a failure other than a refusal fails only its own."""
    store = await make_store()
    await store.append("taken", 0, things(0), META)
    await store.commit(Commit(meta=META, tracking=(("consumer-x", "event-1"),)))
    await store.commit(Commit(meta=META, idempotency=IdempotencyRecord("k1", "h", 201, "{}")))

    def append(stream: str, tracking: tuple[tuple[str, str], ...] = (),
               idempotency: IdempotencyRecord | None = None, fails: bool = False) -> Commit:
        return Commit(meta=META, appends=[StreamAppend(stream, 0, [NewEvent(e) for e in things(1, 2)])],
                      states=[StateRow(stream, "Thing", 2, "open", None, "{}")], tracking=tracking,
                      idempotency=idempotency, writes=[fail] if fails else [])

    async def fail(conn: AsyncConnection) -> None:
        raise RuntimeError("the effect failed")

    async def outcomes(commits: list[Commit]) -> list[str]:
        results = await asyncio.gather(*[store.commit(c) for c in commits], return_exceptions=True)
        return [type(r).__name__ if isinstance(r, BaseException) else "ok" for r in results]

    refused = [append(f"new-{i}") for i in range(6)] + [
        append("taken"),  # stale: it is at version 1
        append("other", tracking=(("consumer-x", "event-1"),)),
        append("keyed", idempotency=IdempotencyRecord("k1", "h", 201, "{}")),
        # A batch's tracking rows, one of them there: refused whole, its fresh row too.
        append("partly", tracking=(("consumer-x", "event-2"), ("consumer-x", "event-1"))),
        append("twice"), append("twice"),
    ]
    got = await outcomes(refused)
    assert got[:6] == ["ok"] * 6
    assert got[6:10] == ["ConcurrencyError", "AlreadyApplied", "IdempotencyKeyTaken", "AlreadyApplied"]
    assert sorted(got[10:]) == ["ConcurrencyError", "ok"]
    assert not await store.is_applied("consumer-x", "event-2")
    got = await outcomes([append("after-1"), append("after-2", fails=True), append("after-3")])
    assert got == ["ok", "RuntimeError", "ok"]

    for stream in ("other", "keyed", "partly", "after-2"):
        assert await store.read_stream(stream) == []
        assert await store.load_state(stream) is None
    assert len(await store.read_stream("taken")) == 1 and len(await store.read_stream("twice")) == 2
    assert await store.load_state("new-0") == (2, "{}")
    events = await store.read_all(0, 100)
    assert [e.position for e in events] == list(range(1, 1 + 1 + 2 * 9))  # no gaps
    assert await store.verify() is None


class Counter(Aggregate):
    """A listed aggregate for the in-memory lists: its status is the last note, its ref the owner."""

    stream_prefix = "counter"
    status: str = "open"
    owner: str = ""
    n: int = 0

    def ref_value(self) -> str | None:
        return self.owner or None

    def bump(self, status: str | None = None) -> None:
        self.record(ThingHappened(n=self.n + 1, note=status or self.status))

    def _on_ThingHappened(self, e: ThingHappened) -> None:
        self.n, self.status = e.n, e.note


async def open_counter(store: EventStore, ident: str, owner: str) -> None:
    uow = UnitOfWork(store, META)
    counter = Counter(id=ident, owner=owner)
    counter.bump("open")
    uow.add(counter)
    await uow.commit()


async def test_lists_follow_every_replica_in_update_order(make_store: MakeStore) -> None:
    a, b = await make_store(), await make_store()
    for ident, owner in (("c1", "ann"), ("c2", "bob"), ("c3", "ann")):
        await open_counter(a, ident, owner)
    assert [c.id for c in await UnitOfWork.reading(b).find(Counter)] == ["c1", "c2", "c3"]
    uow = UnitOfWork(a, META)
    first = await uow.require(Counter, "c1", "counter")
    first.bump("closed")
    await uow.commit()
    # b's list is in memory; one read brings it the other replica's change, in update order.
    reader = UnitOfWork.reading(b)
    assert [c.id for c in await reader.find(Counter)] == ["c2", "c3", "c1"]
    assert [c.id for c in await reader.find(Counter, status=["open"])] == ["c2", "c3"]
    assert [c.id for c in await reader.find(Counter, status=["closed", "open"])] == ["c2", "c3", "c1"]
    assert [c.id for c in await reader.find(Counter, ref="ann")] == ["c3", "c1"]
    assert [c.id for c in await reader.find(Counter, ref="ann", status=["open"])] == ["c3"]
    assert [c.id for c in await reader.find(Counter, limit=1, offset=1)] == ["c3"]
    got = await UnitOfWork.reading(b).get(Counter, "c1")
    assert got is not None and (got.status, got.version) == ("closed", 2)
    assert await UnitOfWork.reading(b).get(Counter, "nobody") is None


async def test_a_decision_on_a_listed_state_another_replica_changed_is_refused_then_retried(
        make_store: MakeStore) -> None:
    a, b = await make_store(), await make_store()
    await open_counter(a, "c1", "ann")
    await UnitOfWork.reading(b).find(Counter)  # b lists the kind: it holds it in memory
    stale = UnitOfWork(b, META)
    mine = await stale.require(Counter, "c1", "counter")
    uow = UnitOfWork(a, META)
    (await uow.require(Counter, "c1", "counter")).bump()
    await uow.commit()
    mine.bump()
    with pytest.raises(ConcurrencyError):
        await stale.commit()

    async def bump(retry: UnitOfWork) -> int:
        counter = await retry.require(Counter, "c1", "counter")
        counter.bump()
        return counter.n

    n, _ = await with_retry(lambda: UnitOfWork(b, META), bump)
    assert n == 3
    assert len(await a.read_stream("counter-c1")) == 3


async def test_a_decision_on_what_it_only_read_is_refused_when_that_moved_then_retried(
        make_store: MakeStore) -> None:
    """A guard: c2 is decided on c1 as it was listed (dispatch routes by the hospitals'
    loads); another replica changes c1 before the commit, which is then refused though it
    appends nothing to c1, and the retry decides on the new c1."""
    a, b = await make_store(), await make_store()
    await open_counter(a, "c1", "ann")
    await open_counter(a, "c2", "bob")

    async def copy_c1(uow: UnitOfWork) -> int:
        [read] = [c for c in await uow.find(Counter) if c.id == "c1"]
        uow.guard(read)
        (await uow.require(Counter, "c2", "counter")).record(ThingHappened(n=read.n * 10))
        return read.n

    stale = UnitOfWork(b, META)
    await copy_c1(stale)
    other = UnitOfWork(a, META)
    (await other.require(Counter, "c1", "counter")).bump()
    await other.commit()
    with pytest.raises(ConcurrencyError):
        await stale.commit()
    assert len(await b.read_stream("counter-c2")) == 1  # nothing of the refused decision
    seen, _ = await with_retry(lambda: UnitOfWork(b, META), copy_c1)
    assert seen == 2 and [e.payload["n"] for e in await b.read_stream("counter-c2")] == [1, 20]
    assert len(await b.read_stream("counter-c1")) == 2  # the guard appended nothing
    # A guard on what did not move costs nothing; a command that appends nothing commits nothing.
    unchanged = UnitOfWork(b, META)
    await copy_c1(unchanged)
    await unchanged.commit()
    idle = UnitOfWork(b, META)
    idle.guard((await idle.find(Counter))[0])
    assert await idle.commit() == []


class OpenCounters:
    """A view: the open counters' numbers, parsed only for those it keeps."""

    def __init__(self) -> None:
        self.n: dict[str, int] = {}
        self.parsed = 0

    def put(self, change: StateChange, state: Callable[[], Any]) -> None:
        self.n.pop(change.stream_id, None)
        if change.status == "open":
            self.parsed += 1
            self.n[change.stream_id] = state().n


async def test_a_view_follows_every_replica(make_store: MakeStore) -> None:
    a, b = await make_store(), await make_store()
    for ident in ("c1", "c2", "c3"):
        await open_counter(a, ident, "ann")
    uow = UnitOfWork(a, META)
    (await uow.require(Counter, "c3", "counter")).bump("closed")
    await uow.commit()
    view = await UnitOfWork.reading(b).view(Counter, OpenCounters)
    assert view.n == {"counter-c1": 1, "counter-c2": 1} and view.parsed == 2
    uow = UnitOfWork(a, META)
    (await uow.require(Counter, "c1", "counter")).bump("closed")
    (await uow.require(Counter, "c2", "counter")).bump()
    await uow.commit()
    assert await UnitOfWork.reading(b).view(Counter, OpenCounters) is view
    assert view.n == {"counter-c2": 2}


async def test_a_crowd_after_one_prize_each_gets_one_after_losing_once(make_store: MakeStore) -> None:
    """Twenty commands each take the first open counter. All decide at once and all but one
    lose; a retry decides holding the process's write turn, so it cannot lose again."""
    store = await make_store()
    for i in range(20):
        await open_counter(store, f"c{i:02d}", "ann")

    async def take_first(uow: UnitOfWork) -> str:
        first = (await uow.find(Counter, status=["open"], limit=1))[0]
        (await uow.require(Counter, first.id, "counter")).bump("closed")
        return first.id

    taken = await asyncio.gather(*[with_retry(lambda: UnitOfWork(store, META), take_first, attempts=2)
                                   for _ in range(20)])
    assert sorted(t for t, _ in taken) == [f"c{i:02d}" for i in range(20)]


async def test_the_write_turn_keeps_other_writers_out_until_released(make_store: MakeStore) -> None:
    store = await make_store()
    order: list[str] = []

    async def other() -> None:
        await store.append("thing-o", 0, things(1), META)
        order.append("other committed")

    async with store.exclusive():
        waiting = asyncio.create_task(other())  # started inside the turn: not its holder
        await asyncio.sleep(0.05)
        await store.append("thing-t", 0, things(1), META)  # the holder commits within its turn
        order.append("holder committed")
    await waiting
    assert order == ["holder committed", "other committed"]


async def test_a_wait_cancelled_as_it_times_out_leaves_appends_free(make_store: MakeStore) -> None:
    """Shutdown cancels the tails while they wait for appends. A cancel landing just as a
    wait timed out, while a notify held the lock, used to leave the lock taken by nobody:
    the wait failed with "Lock is not acquired" instead of stopping, and every later
    append hung on its notify (and shutdown on the tails, 10 s each)."""
    store = await make_store()
    waiter = asyncio.create_task(store.wait_for_append(0.05))
    await asyncio.sleep(0.01)  # waiting, the lock given back
    async with store._appended:  # an append notifying, past the wait's timeout
        await asyncio.sleep(0.1)
        waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    await asyncio.wait_for(store.append("thing-1", 0, things(1), META), 5)


async def test_a_commit_whose_caller_is_cancelled_goes_ahead(make_store: MakeStore) -> None:
    """A request past its deadline, a consumer stopped at shutdown: once called, a commit
    is not abandoned halfway (on SQLite that left the file write-locked for good, see
    test_sqlite_checkpoint); it lands, and the caller is told it was cancelled."""
    store = await make_store()
    turn_taken, turn_over = asyncio.Event(), asyncio.Event()

    async def hold_the_turn() -> None:
        async with store.exclusive():
            turn_taken.set()
            await turn_over.wait()

    holder = asyncio.create_task(hold_the_turn())
    await turn_taken.wait()
    caller = asyncio.create_task(store.append("thing-c", 0, things(1), META))
    await asyncio.sleep(0.05)  # the commit waits for the turn
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    turn_over.set()
    await holder
    for _ in range(100):
        if await store.read_stream("thing-c"):
            break
        await asyncio.sleep(0.05)
    assert [e.payload["n"] for e in await store.read_stream("thing-c")] == [1]


async def test_a_turn_cancelled_mid_commit_is_held_until_that_commit_ends(make_store: MakeStore) -> None:
    """The turn keeps other writers out until its holder's commits are over, also when the
    holder is cancelled mid-commit: given up at the cancel, the next writer raced the commit
    still under way (on SQLite, on the file's lock rather than the turn)."""
    store = await make_store()

    async def holder() -> None:
        async with store.exclusive():
            await store.append("thing-h", 0, things(1), META)

    task = asyncio.create_task(holder())
    await asyncio.sleep(0)  # in the turn, its commit started
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert [e.payload["n"] for e in await store.read_stream("thing-h")] == [1]
