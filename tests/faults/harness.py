"""The fault harness: a load runs against the city topology while faults are injected; the
time each takes to heal is measured; at the end the load stops, the pipeline drains, and an
end-of-test check says whether anything was lost or doubled.

Two plug-ins, so that other drivers and checkers can be wired in without touching the
faults themselves:
- `LoadGenerator`: `async (target, stop) -> None`, sends its requests through
  `target.transport()` (which retries what failed on the way and records every attempt in
  `target.ledger`) until `stop` is set, then returns once its work in flight is done.
  Default: the simulator, `tests.faults.load.simulated_days`.
- `EndCheck`: `async (target) -> Verdict`, run once the pipeline has drained. Default:
  the invariant checker and the acknowledged transfers, `tests.faults.checks.invariants_hold`.

What is measured, per injection (a fault from the moment it was dealt; a restore, a
replica or broker back, from the moment it was back, for its rejoining rebalances the
consumer groups too):
- end to end back after: every SAMPLE_S the head of each producing store is noted; a note
  has arrived when the projection's archive holds every event up to those heads (read from
  the databases: positions are dense, so a count says it). A store is back when a note of
  an event it wrote after the injection arrives as fast as notes did with no fault
  (within `threshold`, from the warm-up); the time reported is when that note arrived, the
  latest over the stores. A stalled partition, consumer group or relay shows here, not
  only a failing API;
- last refusal at: when the last request that failed in the injection's window ended
  (0 when none did).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]

from services.settings import Settings
from tests.faults.ledger import Ledger, RetryingTransport
from tests.faults.topology import PUBLISHING, City

POLL_S = 0.2
SAMPLE_S = 0.5
BASELINE_S = 5.0  # of notes with no fault, after the warm-up
SUPERVISOR_DELAY_S = 1.0  # before a killed replica is started again (systemd's RestartSec)


@dataclass
class Verdict:
    """What an end check found: counts of what went missing and what happened twice, and
    every other problem it saw, each a line."""

    lost: int = 0
    doubled: int = 0
    problems: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)  # what was checked

    @property
    def ok(self) -> bool:
        return not self.problems and self.lost == 0 and self.doubled == 0


@dataclass
class Target:
    """The system under test as a load generator and an end check see it."""

    city: City
    ledger: Ledger = field(default_factory=Ledger)
    notes: list[str] = field(default_factory=list)
    load: dict[str, int] = field(default_factory=dict)  # what the load did (transfers requested, ...)

    def note(self, text: str) -> None:
        self.notes.append(text)

    def transport(self, retry_for_s: float = 180.0) -> RetryingTransport:
        """To the balancers by path, retrying with the same Idempotency-Key, recorded in the ledger."""
        return RetryingTransport(self.city.front_ports, self.ledger, retry_for_s)

    @property
    def settings(self) -> Settings:
        """The services' own settings (for a checker that opens their stores)."""
        return Settings(mode="distributed", pg_url=self.city.pg_url(), kafka_bootstrap=self.city.bootstrap,
                        topic_prefix=self.city.topic_prefix, data_dir=self.city.data_dir)


LoadGenerator = Callable[[Target, asyncio.Event], Coroutine[Any, Any, None]]
EndCheck = Callable[[Target], Awaitable[Verdict]]


class Flow:
    """How far the projection's archive has got with each producing store, from the databases."""

    def __init__(self, city: City) -> None:
        self.city = city
        self._conns: dict[str, asyncpg.Connection] = {}

    async def _query(self, db: str, sql: str, *args: Any) -> Any:
        conn = self._conns.get(db)
        if conn is None or conn.is_closed():
            conn = self._conns[db] = await asyncpg.connect(self.city.dsn(db), timeout=5)
        try:
            return await conn.fetchval(sql, *args, timeout=10)
        except Exception:
            self._conns.pop(db, None)
            with contextlib.suppress(Exception):
                conn.terminate()
            raise

    async def heads(self) -> dict[str, int]:
        return {s: int(await self._query(s, "SELECT coalesce(max(position), 0) FROM events") or 0)
                for s in PUBLISHING}

    async def archived(self, store: str, upto: int | None = None) -> int:
        if upto is None:
            return int(await self._query("projection", "SELECT count(*) FROM audit_archive WHERE store = $1",
                                         store))
        return int(await self._query("projection", "SELECT count(*) FROM audit_archive WHERE store = $1 "
                                     "AND position <= $2", store, upto))

    async def _notes(self, last: dict[str, int], pending: dict[str, list[tuple[float, int]]],
                     taking: bool) -> list[tuple[str, float, float]]:
        """One round: take a note of each store whose head moved (when `taking`), then see
        which notes arrived. Returns (store, noted at, arrived at) for those that did."""
        if taking:
            for store, head in (await self.heads()).items():
                if head > last[store]:
                    pending[store].append((time.monotonic(), head))
                    last[store] = head
        arrived = []
        for store, notes in pending.items():
            while notes and await self.archived(store, notes[0][1]) == notes[0][1]:
                noted, _ = notes.pop(0)
                arrived.append((store, noted, time.monotonic()))
        return arrived

    async def baseline(self, seconds: float, timeout: float) -> list[float]:
        """How long new events take to reach the archive with no fault: notes for `seconds`."""
        since = time.monotonic()
        last = await self.heads()
        pending: dict[str, list[tuple[float, int]]] = {s: [] for s in last}
        took: list[float] = []
        next_note = since
        while time.monotonic() - since < seconds or any(pending.values()):
            now = time.monotonic()
            if now - since > timeout:
                raise TimeoutError(f"events noted with no fault did not arrive within {timeout:.0f} s")
            taking = now >= next_note and now - since < seconds
            arrived = await self._notes(last, pending, taking)
            next_note = now + SAMPLE_S if now >= next_note else next_note
            took += [a - n for _, n, a in arrived]
            await asyncio.sleep(POLL_S)
        return took

    async def back_after(self, since: float, heads: dict[str, int], threshold: float,
                         timeout: float) -> dict[str, float] | None:
        """Per store, seconds from `since` until an event it wrote after `heads` (noted every
        SAMPLE_S), and every event before it, reached the archive within `threshold` of
        being noted. None if some store did not within `timeout`. Database errors (it may be
        what is down) only delay."""
        last = dict(heads)
        pending: dict[str, list[tuple[float, int]]] = {s: [] for s in heads}
        back: dict[str, float] = {}
        next_note = since
        while len(back) < len(heads):
            now = time.monotonic()
            if now - since > timeout:
                return None
            with contextlib.suppress(Exception):
                arrived = await self._notes(last, pending, taking=now >= next_note)
                next_note = now + SAMPLE_S if now >= next_note else next_note
                for store, noted, at in arrived:
                    if store not in back and at - noted <= threshold:
                        back[store] = at - since
                        pending[store] = []
                        last[store] = 1 << 62  # done: no more notes of it
            await asyncio.sleep(POLL_S)
        return back

    async def settle(self, timeout: float) -> float | None:
        """Seconds until the archive holds as many events of each store as the store, and
        still does a moment later (nothing more is coming). None if not within `timeout`."""
        t0, agreed = time.monotonic(), 0
        while time.monotonic() - t0 < timeout:
            with contextlib.suppress(Exception):
                heads = await self.heads()
                same = all([await self.archived(s) == h for s, h in heads.items()])
                agreed = agreed + 1 if same else 0
                if agreed >= 3:
                    return time.monotonic() - t0
            await asyncio.sleep(POLL_S * 2)
        return None

    async def close(self) -> None:
        for conn in self._conns.values():
            with contextlib.suppress(Exception):
                await conn.close()


@dataclass
class Injection:
    what: str
    kind: str  # "fault", or "restore" (a replica or broker back, which rebalances too)
    at: float
    flow_s: float | None = None
    api_s: float = 0.0
    stores: dict[str, float] = field(default_factory=dict)  # end to end back after, per store
    note: str = ""


@dataclass
class FaultReport:
    fault: str
    scale: str
    seconds: float
    injections: list[Injection]
    requests: int
    refused: int  # attempts answered with an error or cut off on the way
    retried: int  # of those, sent again
    gave_up: int  # requests that never succeeded within the client's retry budget
    failovers: int  # connections the balancer moved to another replica
    baseline_s: float | None  # end to end with no fault (median note), for comparison
    threshold_s: float  # a note arriving within this says the pipeline is back
    drain_s: float | None  # from the load's stop until the archive matched every store
    verdict: Verdict
    errors: dict[str, int] = field(default_factory=dict)  # failed attempts by outcome
    notes: list[str] = field(default_factory=list)
    load: dict[str, int] = field(default_factory=dict)  # what the load did
    load_error: str | None = None

    def worst(self, kind: str) -> float | None:
        values = [i.flow_s for i in self.injections if i.kind == kind]
        if any(v is None for v in values) or not values:
            return None
        return max(v for v in values if v is not None)

    @property
    def ok(self) -> bool:
        return (self.verdict.ok and self.load_error is None and self.gave_up == 0
                and all(i.flow_s is not None for i in self.injections))

    def row(self) -> list[str]:
        faults = [i for i in self.injections if i.kind == "fault"]
        flows = [i.flow_s for i in faults if i.flow_s is not None]

        def s(v: float | None) -> str:
            return "never" if v is None else f"{v:.1f}"

        flow = s(self.worst("fault"))
        if len(flows) > 1:
            flow += f" (median {statistics.median(flows):.1f})"
        restores = [i for i in self.injections if i.kind == "restore"]
        ended = self.load.get("transfers_completed", 0) + self.load.get("transfers_cancelled", 0)
        return [self.fault, str(len(faults)), f"{self.load.get('transfers_requested', 0)} / {ended}",
                str(self.requests), str(self.refused), str(self.retried),
                str(self.gave_up), str(self.failovers), s(max((i.api_s for i in faults), default=0.0)),
                flow, s(self.worst("restore")) if restores else "-",
                f"{s(self.baseline_s)} / {self.threshold_s:.1f}", str(self.verdict.lost),
                str(self.verdict.doubled)]


HEADER = ["fault", "injections", "transfers requested / ended", "requests", "refused", "retried",
          "gave up", "LB failovers", "last refusal at s (max)", "end to end back after s (max)",
          "after restore s (max)", "no-fault end to end s / threshold", "lost", "doubled"]


def table(reports: list[FaultReport]) -> str:
    rows = [HEADER, ["---"] * len(HEADER), *[r.row() for r in reports]]
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def details(report: FaultReport) -> str:
    lines = [f"{report.fault} ({report.scale}, {report.seconds:.0f} s):"]
    for i in report.injections:
        flow = "never" if i.flow_s is None else f"{i.flow_s:.1f} s"
        per_store = ", ".join(f"{k} {v:.1f}" for k, v in i.stores.items())
        lines.append(f"  {i.kind:7} {i.what}: end to end back after {flow} ({per_store}), "
                     f"last refusal at {i.api_s:.1f} s" + (f"; {i.note}" if i.note else ""))
    if report.errors:
        lines.append("  failed attempts: " + ", ".join(f"{k} {v}" for k, v in sorted(report.errors.items())))
    drain = "never" if report.drain_s is None else f"{report.drain_s:.1f} s"
    lines.append(f"  drained in {drain}; check: {report.verdict.counts}")
    lines += [f"  note: {n}" for n in report.notes]
    lines += [f"  PROBLEM: {p}" for p in report.verdict.problems[:20]]
    if report.load_error:
        lines.append(f"  LOAD FAILED: {report.load_error}")
    return "\n".join(lines)


def write(reports: list[FaultReport], path: Path, heading: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    body = [heading, "", table(reports), "", "```", *[details(r) for r in reports], "```", ""]
    path.with_suffix(".md").write_text("\n".join(body))
    path.with_suffix(".json").write_text(json.dumps([asdict(r) for r in reports], indent=1, default=str))


async def _after(delay: float, action: Callable[[], Awaitable[Any]]) -> float:
    """Runs `action` after `delay`; returns when it was done (time.monotonic())."""
    await asyncio.sleep(delay)
    await action()
    return time.monotonic()


async def _nothing() -> None:
    return None


class FaultRun:
    """One fault test: the load starts, runs `warmup_s` once it writes to every producing
    store, the no-fault end to end time is taken; then the test injects (and restores);
    `finish` stops the load, drains, checks."""

    def __init__(self, name: str, scale: str, target: Target, load: LoadGenerator, check: EndCheck,
                 warmup_s: float, recovery_timeout_s: float = 180.0) -> None:
        self.name, self.scale, self.target, self.load, self.check = name, scale, target, load, check
        self.warmup_s, self.timeout = warmup_s, recovery_timeout_s
        self.flow = Flow(target.city)
        self.stop = asyncio.Event()
        self.injections: list[Injection] = []
        self.baseline: float | None = None
        self.threshold = 1.0
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> FaultRun:
        self.started = time.monotonic()
        self.lb_before = await self.target.city.balancer()
        heads = await self.flow.heads()
        self._task = asyncio.create_task(self.load(self.target, self.stop))
        # a load may set up first (the simulator registers its region): warm up from the
        # moment every producing store writes
        while any(h <= heads[s] for s, h in (await self.flow.heads()).items()):
            if time.monotonic() - self.started > self.timeout:
                raise AssertionError(f"the load wrote nothing to some store within {self.timeout:.0f} s")
            await self.hold(POLL_S * 5)
        self.target.note(f"the load wrote to every store {time.monotonic() - self.started:.1f} s "
                         "after it began")
        await self.hold(self.warmup_s)
        took = await self.flow.baseline(BASELINE_S, self.timeout)
        self.baseline = statistics.median(took) if took else None
        # a note as fast as the slowest with no fault, with room for a busy machine
        self.threshold = max(1.0, 2 * max(took, default=0.5))
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop.set()
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        await self.flow.close()

    async def hold(self, seconds: float) -> None:
        """Let the load run; a load that failed ends the test at once."""
        assert self._task is not None
        done, _ = await asyncio.wait({self._task}, timeout=max(seconds, 0.0))
        if done and self._task.exception() is not None:
            raise AssertionError(f"the load failed: {self._task.exception()!r}")

    async def inject(self, what: str, action: Callable[[], Awaitable[Any]], kind: str = "fault",
                     supervisor: tuple[str, Callable[[], Awaitable[Any]]] | None = None) -> Injection:
        """Deal a fault (or restore), then wait until the pipeline flows end to end again.
        A `supervisor` (what it does, and how) starts SUPERVISOR_DELAY_S after the fault,
        as systemd or Kubernetes would restart what died, while the recovery is measured;
        once it is done, what its return changed (a rebalance) is measured as a restore."""
        heads = await self.flow.heads()
        injection = Injection(what, kind, time.monotonic())
        self.injections.append(injection)
        await action()
        if kind == "restore":
            heads, injection.at = await self.flow.heads(), time.monotonic()
        restart = asyncio.create_task(_after(SUPERVISOR_DELAY_S, supervisor[1])) if supervisor else None
        back = await self.flow.back_after(injection.at, heads, self.threshold, self.timeout)
        if back is not None:
            injection.stores = {s: round(v, 1) for s, v in back.items()}
            injection.flow_s = max(back.values())
        if supervisor is not None and restart is not None:
            injection.note = f"{supervisor[0]} after {await restart - injection.at:.1f} s"
            await self.inject(supervisor[0], _nothing, kind="restore")
        return injection

    async def finish(self) -> FaultReport:
        assert self._task is not None
        self.stop.set()
        load_error = None
        try:
            await asyncio.wait_for(asyncio.shield(self._task), 2 * self.timeout)
        except Exception as exc:
            load_error = f"{type(exc).__name__}: {exc}"
        ended = time.monotonic()
        drain = await self.flow.settle(self.timeout)
        verdict = await self.check(self.target)
        ledger = self.target.ledger
        marks = [i.at for i in self.injections[1:]] + [ended]
        for injection, until in zip(self.injections, marks, strict=True):
            failed = ledger.failed_between(injection.at, until)
            injection.api_s = max((a.ended - injection.at for a in failed), default=0.0)
        attempts = ledger.between(self.started, ended)
        failed = [a for a in attempts if a.failed]
        lb_after = await self.target.city.balancer()
        errors: dict[str, int] = {}
        for a in failed:
            errors[a.outcome] = errors.get(a.outcome, 0) + 1
        return FaultReport(
            fault=self.name, scale=self.scale, seconds=ended - self.started, injections=self.injections,
            requests=len(attempts), refused=len(failed), retried=sum(a.retried for a in failed),
            gave_up=len(ledger.gave_up), failovers=sum(
                lb_after[p]["failovers"] - self.lb_before.get(p, {}).get("failovers", 0) for p in lb_after),
            baseline_s=self.baseline, threshold_s=self.threshold, drain_s=drain, verdict=verdict,
            errors=errors, notes=self.target.notes, load=self.target.load, load_error=load_error)
