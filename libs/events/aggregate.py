"""Aggregates (plain Python state folded from events), domain refusals, and the unit of
work that turns what the aggregates recorded into one atomic store commit."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, ClassVar, TypeVar, cast

from pydantic import BaseModel, ConfigDict, PrivateAttr

from libs.events.contracts import Event, registry
from libs.events.envelope import Envelope
from libs.events.store import (
    Commit,
    ConcurrencyError,
    EventStore,
    IdempotencyRecord,
    IndexView,
    Meta,
    NewEvent,
    StateIndex,
    StateRow,
    StreamAppend,
    Write,
)


class DomainError(Exception):
    """A command the domain refuses. `code` is stable English, `message_zh` is for the console."""

    status = 400

    def __init__(self, code: str, detail: str, message_zh: str, **extra: Any) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.message_zh = message_zh
        self.extra = extra


class RuleRefused(DomainError):
    """A rule of DOMAIN.md (R1-R14) refused the command: 409 naming the rule."""

    status = 409

    def __init__(self, rule: str, code: str, detail: str, message_zh: str, **extra: Any) -> None:
        super().__init__(code, detail, message_zh, **extra)
        self.rule = rule


class StateConflict(DomainError):
    """The command cannot follow the aggregate's current state (e.g. a step out of order)."""

    status = 409


class InvalidField(DomainError):
    """The command is well-formed JSON but a field's value is not acceptable: 422."""

    status = 422

    def __init__(self, field: str, code: str, detail: str, message_zh: str, **extra: Any) -> None:
        super().__init__(code, detail, message_zh, **extra)
        self.field = field


class Forbidden(DomainError):
    """The command needs a role, or a binding (vehicle, facility, site), the caller lacks: 403."""

    status = 403


class NotFound(DomainError):
    status = 404

    def __init__(self, what: str, ident: str) -> None:
        super().__init__(f"{what}_not_found", f"{what} {ident} does not exist", f"未找到{what} {ident}")


class Aggregate(BaseModel):
    """Base of the domain's aggregates: no I/O, state changes only through recorded events."""

    model_config = ConfigDict(extra="ignore")

    stream_prefix: ClassVar[str]

    id: str
    version: int = 0
    _pending: list[NewEvent] = PrivateAttr(default_factory=list)
    _loaded_version: int = PrivateAttr(default=0)

    @classmethod
    def stream_of(cls, ident: str) -> str:
        return f"{cls.stream_prefix}-{ident}"

    @property
    def stream_id(self) -> str:
        return self.stream_of(self.id)

    def record(self, event: Event, occurred_at: datetime | None = None) -> None:
        self.apply(event)
        self._pending.append(NewEvent(event, occurred_at))

    def apply(self, event: Event) -> None:
        handler = getattr(self, f"_on_{event.event_type}", None)
        if handler is not None:
            handler(event)
        self.version += 1

    # Lists and lookups of the service read these, from the aggregates table.
    def status_value(self) -> str | None:
        status = getattr(self, "status", None)
        return str(status) if status is not None else None

    def ref_value(self) -> str | None:
        return None

    def pending(self) -> list[NewEvent]:
        return list(self._pending)

    def mark_loaded(self) -> None:
        self._pending.clear()
        self._loaded_version = self.version

    @property
    def loaded_version(self) -> int:
        return self._loaded_version


A = TypeVar("A", bound=Aggregate)
V = TypeVar("V", bound=IndexView)


def decode(env: Envelope) -> Event:
    return registry.decode(env.type, env.schema_version, env.payload)


class UnitOfWork:
    """Loads aggregates, then commits what they recorded (with the bookkeeping) at once."""

    def __init__(
        self,
        store: EventStore,
        meta: Meta,
        *,
        tracking: tuple[tuple[str, str], ...] = (),
        checkpoint: tuple[str, int] | None = None,
    ) -> None:
        self.store = store
        self.meta = meta
        self.tracking = tracking
        self.checkpoint = checkpoint
        self.idempotency: IdempotencyRecord | None = None
        self.writes: list[Write] = []
        self._seen: dict[str, Aggregate] = {}
        self._refreshed: set[str] = set()
        self._guards: dict[str, int] = {}

    @classmethod
    def reading(cls, store: EventStore) -> UnitOfWork:
        """For queries: nothing it loads is ever committed."""
        return cls(store, Meta(actor="reader", role="reader", correlation_id="read"))

    async def get(self, cls: type[A], ident: str) -> A | None:
        stream_id = cls.stream_of(ident)
        if stream_id in self._seen:
            seen = self._seen[stream_id]
            assert isinstance(seen, cls)
            return seen
        agg: A | None = None
        index = self.store.indexes.get(cls.__name__)
        if index is not None:
            # A kind the service lists is held in memory: refreshed once per unit of work,
            # it is as current as a read of the stream, and the commit checks the version.
            await self._refresh(cls)
            held = index.changes.get(stream_id)
            if held is not None:
                agg = cls.model_validate_json(held.state)  # a private copy, to change
        else:
            snapshot = await self.store.load_state(stream_id)
            after = 0
            if snapshot is not None:
                after, state = snapshot
                agg = cls.model_validate_json(state)
            for env in await self.store.read_stream(stream_id, after_version=after):
                if agg is None:
                    agg = cls(id=ident)
                agg.apply(decode(env))
        if agg is None:
            return None
        agg.mark_loaded()
        self._seen[stream_id] = agg
        return agg

    async def find(
        self, cls: type[A], *, status: list[str] | None = None, ref: str | None = None,
        limit: int = 1000, offset: int = 0, where: Callable[[A], bool] | None = None,
    ) -> list[A]:
        """Current states from the service's own list, in update order. Read-only snapshots
        shared between callers: get() what you change. The list lives in memory and is
        brought up to date with only what changed since, once per unit of work."""
        index = await self._refresh(cls)
        ids = index.select(status, ref)
        if where is None:
            return [index.state(s) for s in ids[offset:offset + limit]]
        matched = (agg for agg in map(index.state, ids) if where(agg))
        return list(itertools.islice(matched, offset, offset + limit))

    async def view(self, cls: type[Aggregate], make: Callable[[], V]) -> V:
        """A view derived from a kind's current states (see IndexView), refreshed with them.
        Read-only, like find()'s snapshots."""
        return cast(V, (await self._refresh(cls)).view(make))

    async def _refresh(self, cls: type[Aggregate]) -> StateIndex:
        """The first time in this unit of work that a kind is read, every kind held in memory
        is refreshed with it, in one statement."""
        kind = cls.__name__
        if kind not in self._refreshed:
            kinds = {k: i.parse for k, i in self.store.indexes.items() if k not in self._refreshed}
            kinds[kind] = cls.model_validate_json
            await self.store.refresh(kinds)
            self._refreshed.update(kinds)
        return self.store.indexes[kind]

    async def require(self, cls: type[A], ident: str, what: str) -> A:
        agg = await self.get(cls, ident)
        if agg is None:
            raise NotFound(what, ident)
        return agg

    def add(self, agg: Aggregate) -> None:
        self._seen[agg.stream_id] = agg

    def guard(self, agg: Aggregate) -> None:
        """What this command decides relies on `agg` as it was read (a find() snapshot
        too): the commit fails with ConcurrencyError, and with_retry decides again, if its
        stream moved meanwhile, though nothing is appended to it."""
        self._guards.setdefault(agg.stream_id, agg.version)

    def build_commit(self) -> Commit:
        commit = Commit(
            meta=self.meta, tracking=self.tracking, checkpoint=self.checkpoint,
            idempotency=self.idempotency, writes=list(self.writes),
        )
        for agg in self._seen.values():
            pending = agg.pending()
            if not pending:
                continue
            commit.appends.append(StreamAppend(agg.stream_id, agg.loaded_version, pending))
            commit.states.append(
                StateRow(
                    stream_id=agg.stream_id, kind=type(agg).__name__, version=agg.version,
                    status=agg.status_value(), ref=agg.ref_value(), state=agg.model_dump_json(),
                )
            )
        if commit.appends:  # a command that appends nothing decides nothing to guard
            appended = {a.stream_id for a in commit.appends}
            # An append of no events is the store's version check alone.
            commit.appends += [StreamAppend(stream_id, version, []) for stream_id, version
                               in sorted(self._guards.items()) if stream_id not in appended]
        return commit

    async def commit(self) -> list[Envelope]:
        written = await self.store.commit(self.build_commit())
        for agg in self._seen.values():
            agg.mark_loaded()
        return written


T = TypeVar("T")


async def with_retry(
    new_uow: Callable[[], UnitOfWork],
    work: Callable[[UnitOfWork], Awaitable[T]],
    attempts: int = 8,
) -> tuple[T, list[Envelope]]:
    """Run a command; when another writer got to a stream first, reload and decide again.
    The domain then sees the winner's state, so the loser is refused by the rule itself.
    The first try decides alongside other commands; a try after a lost race decides holding
    this process's write turn, so a crowd going for the same vehicle is not lost to again
    and again (only another process can still win a race)."""
    for attempt in range(attempts):
        uow = new_uow()
        try:
            async with uow.store.exclusive() if attempt else contextlib.nullcontext():
                result = await work(uow)
                return result, await uow.commit()
        except ConcurrencyError:
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")
