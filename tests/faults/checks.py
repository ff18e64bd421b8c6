"""The end check of the fault tests (an `EndCheck`), run once the load stopped and the
pipeline drained:

- the invariant checker (services/invariants) over the city topology's four stores, as
  `make check` runs it: no rule broken that the services should have refused; every loop
  closed or explicitly ended (what is still open is counted, not failed: the simulator
  says when its day did not end); every event of every store delivered to every consumer
  exactly once in effect (tracking rows, one commit per delivery, each cross-service
  handoff's effect once); the live read models identical to a rebuild from the archive;
  every hash chain whole, and the projection's copy of each store holding its events;
- what only the clients know: every transfer a client got a 201 for is in dispatch's
  store (the checker sees the stores, not what was acknowledged).

Any finding fails the test. Lost and doubled are the findings of those kinds, counted for
the report.
"""

from __future__ import annotations

import asyncpg  # type: ignore[import-untyped]

from services.invariants import Report, check
from tests.faults.harness import Target, Verdict

SETTLE_S = 120.0  # for the consumers to catch up (they have drained already: a margin)
SHOWN = 5  # findings named per failed check
LOST = {"not_delivered", "effect_missing", "trip_without_cycle", "copy_differs"}
DOUBLED = {"applied_twice", "effect_twice"}


async def acknowledged_transfers(target: Target, verdict: Verdict) -> None:
    conn = await asyncpg.connect(target.city.dsn("dispatch"))
    try:
        rows = await conn.fetch("SELECT DISTINCT payload::jsonb->>'transfer_id' AS id FROM events "
                                "WHERE type = 'TransferRequested'")
    finally:
        await conn.close()
    missing = set(target.ledger.transfers) - {r["id"] for r in rows}
    verdict.lost += len(missing)
    if missing:
        verdict.problems.append(f"acknowledged transfers not in dispatch's store: {len(missing)}, "
                                f"e.g. {sorted(missing)[:SHOWN]}")
    verdict.counts["acknowledged transfers"] = len(target.ledger.transfers)


def tally(report: Report, verdict: Verdict) -> None:
    """The checker's findings into the verdict: each failed check a problem (with its first
    findings), those of something missing or applied twice counted as lost or doubled."""
    if not report.settled:
        verdict.problems.append(f"the consumers had not caught up after {SETTLE_S:.0f} s")
    for c in report.failed():
        verdict.lost += sum(item.code in LOST for item in c.items)
        verdict.doubled += sum(item.code in DOUBLED for item in c.items)
        verdict.problems.append(f"{c.name}: {c.found} found" + (f" ({c.error})" if c.error else ""))
        verdict.problems += [f"  {item.detail}" for item in c.items[:SHOWN]]
    verdict.counts.update({f"{store} events": n for store, n in report.events.items()})
    verdict.counts["checks"] = len(report.checks)
    verdict.counts["still open"] = sum(c.still_open for c in report.checks)
    verdict.counts["checker s"] = round(report.seconds)


async def invariants_hold(target: Target) -> Verdict:
    verdict = Verdict()
    await acknowledged_transfers(target, verdict)
    tally(await check(target.settings, settle_s=SETTLE_S), verdict)
    return verdict
