"""The default end-of-test check of the fault tests (an `EndCheck`), run once the pipeline
has drained. It reads the services' databases directly (the truth, not an API's view):

- every transfer a client got a 201 for is in dispatch's store exactly once, and in the
  projection's archive exactly once; no patient of the load got two transfers (a retry
  that created instead of replaying);
- every event of every producing store is in the projection's archive exactly once, at
  the same position (lost: in the store, not archived; doubled: archived twice, or under
  another position; and nothing archived that no store holds);
- each effect that one service takes from another's event happened once: a trip per
  vehicle assignment, a disinfection cycle per completed trip (none missing, none twice);
- `GET /api/v1/audit/verify` finds every hash chain whole.

The invariant checker (services/invariants) covers all of this and more; this one stays
small so the fault tests stand on their own.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import asyncpg  # type: ignore[import-untyped]

from tests.faults.harness import Target, Verdict
from tests.faults.topology import PUBLISHING

SHOWN = 5  # ids named per problem


async def rows(target: Target, db: str, sql: str, *args: Any) -> list[Any]:
    conn = await asyncpg.connect(target.city.dsn(db))
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


def tally(verdict: Verdict, what: str, lost: set[str] | list[str], doubled: set[str] | list[str]) -> None:
    verdict.lost += len(lost)
    verdict.doubled += len(doubled)
    if lost:
        verdict.problems.append(f"{what}: {len(lost)} missing, e.g. {sorted(lost)[:SHOWN]}")
    if doubled:
        verdict.problems.append(f"{what}: {len(doubled)} twice, e.g. {sorted(doubled)[:SHOWN]}")


async def acknowledged_transfers(target: Target, verdict: Verdict) -> None:
    acked = set(target.ledger.transfers)
    requested = await rows(target, "dispatch", "SELECT payload::jsonb->>'transfer_id' AS id, "
                           "payload::jsonb->'patient'->>'name' AS name FROM events "
                           "WHERE type = 'TransferRequested'")
    in_store = Counter(r["id"] for r in requested)
    archived = Counter(r["id"] for r in await rows(
        target, "projection", "SELECT payload::jsonb->>'transfer_id' AS id FROM audit_archive "
        "WHERE store = 'dispatch' AND type = 'TransferRequested'"))
    tally(verdict, "acknowledged transfers in dispatch", acked - set(in_store),
          {t for t in acked if in_store[t] > 1})
    tally(verdict, "acknowledged transfers in the projection's archive", acked - set(archived),
          {t for t in acked if archived[t] > 1})
    patients = Counter(r["name"] for r in requested)
    tally(verdict, "transfers per patient", set(), {n for n, k in patients.items() if k > 1})
    verdict.counts["acknowledged transfers"] = len(acked)


async def archive_complete(target: Target, verdict: Verdict) -> None:
    for store in PUBLISHING:
        source = {r["event_id"]: r["position"] for r in await rows(
            target, store, "SELECT event_id, position FROM events")}
        copies = await rows(target, "projection",
                            "SELECT event_id, position FROM audit_archive WHERE store = $1", store)
        seen = Counter(r["event_id"] for r in copies)
        moved = {r["event_id"] for r in copies if source.get(r["event_id"], r["position"]) != r["position"]}
        tally(verdict, f"{store} events in the archive", set(source) - set(seen),
              {e for e, k in seen.items() if k > 1} | moved)
        phantoms = set(seen) - set(source)
        if phantoms:
            verdict.problems.append(f"{store}: {len(phantoms)} archived events no store holds, "
                                    f"e.g. {sorted(phantoms)[:SHOWN]}")
        verdict.counts[f"{store} events"] = len(source)


async def effects_once(target: Target, verdict: Verdict) -> None:
    assigned = {r["event_id"] for r in await rows(
        target, "dispatch", "SELECT event_id FROM events WHERE type = 'VehicleAssigned'")}
    trips = Counter(r["a"] for r in await rows(
        target, "transfer", "SELECT payload::jsonb->>'assignment_event_id' AS a FROM events "
        "WHERE type = 'TripOpened'"))
    tally(verdict, "trips per vehicle assignment", assigned - set(trips),
          {a for a, k in trips.items() if a is not None and k > 1})
    completed = {r["t"] for r in await rows(target, "transfer", "SELECT payload::jsonb->>'trip_id' AS t "
                                            "FROM events WHERE type = 'TripCompleted'")}
    cycles = Counter(r["t"] for r in await rows(
        target, "disinfection", "SELECT payload::jsonb->>'trip_id' AS t FROM events "
        "WHERE type = 'CycleOpened' AND coalesce(payload::jsonb->>'kind', 'trip') = 'trip'"))
    tally(verdict, "disinfection cycles per completed trip", completed - set(cycles),
          {t for t, k in cycles.items() if k > 1})
    verdict.counts["trips"] = sum(trips.values())
    verdict.counts["cycles"] = sum(cycles.values())


async def chains_verify(target: Target, verdict: Verdict) -> None:
    async with target.client() as c:
        resp = await c.get("/api/v1/audit/verify")
    body = resp.json()
    if resp.status_code != 200 or not body.get("ok"):
        verdict.problems.append(f"GET /api/v1/audit/verify: {resp.status_code} {str(body)[:500]}")


async def nothing_lost_or_doubled(target: Target) -> Verdict:
    verdict = Verdict()
    for part in (acknowledged_transfers, archive_complete, effects_once, chains_verify):
        await part(target, verdict)
    return verdict
