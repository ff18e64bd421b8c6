"""Proof that history was not edited (/audit/verify), store by store.

- `copy:<store>`: the projection's own copy of that store's events (the archive), its
  hash chain recomputed here, with the first broken link or missing position.
- `store:<store>`: the store itself, checked by the service that owns it: in-process when
  this process hosts it (embedded), else asked over HTTP (GET /chain/{store} on that
  service, settings.service_url). The projection never reads another service's tables;
  each service recomputes its own chain and says its head and the hash at the position
  the copy ends at. If that hash differs from the copy's, the store was rewritten after
  the projection received it, even if it was re-hashed into a consistent chain.

Beside the chains (whose keys stay pairs of a copy and its store, which consoles and the
simulator count events by), `own`:
- `applied`: every event the projection applied (its subscriptions' tracking rows) is
  still in the copy. A chain shows an edit and a gap, but not the last events of a store
  deleted from the copy: to the chain that looks like events not yet received.
- `archived`: the copy's seq runs 1..newest without a hole (seq is the newest + 1, under
  the archive lock): a deleted row shows here, its tracking row deleted too, unless it was
  the newest of all.
- `read` (embedded): each store's copy holds as many events as the subscription's
  checkpoint says it read; this catches the newest of all deleted too, tracking row and all.
  Distributed, the broker keeps the offsets: only an anchor outside this database would
  show the newest events deleted with their tracking rows.
- `store`: the projection's own store (the record of who read patients' data in clear,
  PatientDataDisclosed), its chain recomputed here.

Each store's entry also says what the consumers of the service that owns it passed over
on the bus as no event of any store (`passed_over`: how many, the latest as received):
not a break in any chain (no store wrote them), but what an auditor should see.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import httpx
from sqlalchemy.ext.asyncio import AsyncConnection

from libs.events.store import EventStore
from libs.web.health import chain_report, link_at
from services.projection import queries
from services.settings import Settings

SOURCES = ("dispatch", "transfer", "disinfection")


async def verify_all(conn: AsyncConnection, own: EventStore, hosted: dict[str, EventStore],
                     settings: Settings, timeout: float = 30.0) -> dict[str, Any]:
    """`own`: the projection's store, which `conn` reads."""
    names = sorted(set(SOURCES) | set(await queries.stores_seen(conn)))
    results: dict[str, Any] = {}
    copies: dict[str, tuple[int, str | None]] = {}
    for name in names:
        count, last_hash, broken = await queries.verify_copy(conn, name)
        copies[name] = (count, last_hash)
        results[f"copy:{name}"] = {"events": count, "ok": broken is None,
                                   "first_break": broken.model_dump() if broken else None}
    applied, gone = await queries.missing_applied(conn)
    archived, hole = await queries.seq_gap(conn)
    read = await queries.read_up_to(conn, own.name)
    # A copy already broken is named by its chain; a whole one shorter than what the
    # subscription read lost its newest events.
    short = next(((name, upto, results[f"copy:{name}"]["events"]) for name, upto in sorted(read.items())
                  if f"copy:{name}" in results and results[f"copy:{name}"]["ok"]
                  and upto > results[f"copy:{name}"]["events"]), None)
    checks: dict[str, Any] = {
        "applied": {"events": applied, "ok": gone is None, "first_break": None if gone is None else {
            "store": "", "position": None, "event_id": gone,
            "reason": "applied by the projection (its tracking row says so) but missing from its copy"}},
        "archived": {"events": archived, "ok": hole is None, "first_break": None if hole is None else {
            "store": "", "position": hole, "event_id": "",
            "reason": f"the copy's seq {hole} is missing, with later ones present: an archived event "
                      "was deleted"}},
        # Embedded: the subscription's checkpoint says how far it read each store.
        "read": {"events": sum(read.values()), "ok": short is None,
                 "first_break": None if short is None else {
            "store": short[0], "position": short[2] + 1, "event_id": "",
            "reason": f"the projection read {short[0]} up to {short[1]} (its checkpoint) but its copy "
                      f"ends at {short[2]}: its newest events were deleted"}},
    }
    async with httpx.AsyncClient(timeout=timeout) as client:
        for name in names:
            count, last_hash = copies[name]
            results[f"store:{name}"] = await _store(conn, name, count, last_hash, hosted, settings, client)
        checks["store"] = {"store": own.name,
                           **await _store(conn, own.name, 0, None, {own.name: own}, settings, client)}
    return {"ok": all(r["ok"] for r in (*results.values(), *checks.values())), "chains": results,
            "own": checks}


async def _store(conn: AsyncConnection, name: str, count: int, last_hash: str | None,
                 hosted: dict[str, EventStore], settings: Settings,
                 client: httpx.AsyncClient) -> dict[str, Any]:
    at = count or None
    if name in hosted:
        report, checked_by = await chain_report(hosted[name], at), "this process"
    else:
        try:
            base = settings.service_url(name)
        except KeyError:
            # A store name in the copy that no service owns (the archive's store column
            # edited, or a service retired): nobody to ask, so not verified, and said so.
            return {"events": None, "ok": False, "checked_by": None, "first_break": None,
                    "error": f"no service owns store {name}"}
        checked_by = f"{base}/chain/{name}"
        try:
            resp = await client.get(checked_by, params={"at": at} if at else None)
            resp.raise_for_status()
            report = resp.json()
        except (httpx.HTTPError, ValueError) as exc:
            # Not verified is not verified: said so, and the whole answer is not ok.
            return {"events": None, "ok": False, "checked_by": checked_by, "first_break": None,
                    "error": f"could not ask the service: {exc!r}"}
    entry = {"events": report["events"], "head_hash": report["head_hash"], "ok": report["ok"],
             "first_break": report["first_break"], "checked_by": checked_by,
             "passed_over": report.get("passed_over")}
    if report["ok"] and count and (report.get("at") or {}).get("hash") != last_hash:
        async def link(position: int) -> dict[str, Any] | None:
            if name in hosted:
                return await link_at(hosted[name], position)
            resp = await client.get(f"{settings.service_url(name)}/chain/{name}/links/{position}")
            if resp.status_code == 404:
                return None
            resp.raise_for_status()
            found: dict[str, Any] = resp.json()
            return found

        entry["ok"] = False
        try:
            entry["first_break"] = await _first_departure(conn, name, count, link)
        except (httpx.HTTPError, ValueError) as exc:
            entry["first_break"] = {
                "store": name, "position": count, "event_id": "",
                "reason": "the store's chain no longer matches the history the projection received "
                          f"(rewritten and re-hashed?); where it first departs is unknown: {exc!r}"}
    return entry


async def _first_departure(conn: AsyncConnection, name: str, count: int,
                           link: Callable[[int], Awaitable[dict[str, Any] | None]]) -> dict[str, Any]:
    """The first position where the store's hash differs from the copy's, when it differs at
    `count`. A hash covers the one before it, so from the first rewritten event on every
    hash differs: a binary search finds it in about log2(count) links asked for."""
    lo, hi = 1, count
    while lo < hi:
        mid = (lo + hi) // 2
        mine = (await queries.copy_links(conn, name, [mid])).get(mid)
        theirs = await link(mid)
        if mine is None or theirs is None or theirs["hash"] != mine[0]:
            hi = mid
        else:
            lo = mid + 1
    copied = (await queries.copy_links(conn, name, [lo])).get(lo)
    stored = await link(lo)
    return {"store": name, "position": lo, "event_id": copied[1] if copied else "",
            "reason": f"the store's event at {lo} is not the one the projection received (rewritten "
                      f"and re-hashed after it): the store has {stored['hash'] if stored else 'none'}, "
                      f"the copy {copied[0] if copied else 'none'}"}
