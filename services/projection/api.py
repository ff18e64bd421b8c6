"""Audit views (/api/v1/audit): thin routes over the pure view functions. Every JSON answer
goes through libs.auth.privacy (masked unless the reader's role needs the numbers, and
recorded when it sees them); the ledger's files and the live feed call it themselves."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, time, timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.dependencies.models import Dependant
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from pydantic import TypeAdapter, ValidationError

import libs.events.catalog  # noqa: F401  (registers the event types the checks look for)
from libs.auth.privacy import DisclosingRoute, disclose, mask
from libs.events.aggregate import InvalidField, NotFound, StateConflict, UnitOfWork
from libs.events.catalog.common import PatientDataDisclosed
from libs.events.contracts import registry
from libs.events.envelope import iso, utcnow
from libs.events.store import EventStore
from libs.web.deps import ActorDep, IdempotencyKey, Remember, idempotent, meta_for, store_dep
from libs.web.fields import FIRST_YEAR, LAST_YEAR, POSITION_MAX, Day, Instant
from services.projection import custody as custody_view
from services.projection import findings as findings_view
from services.projection import kpis as kpis_view
from services.projection import ledger as ledger_view
from services.projection import queries, verification
from services.projection import violations as violations_model
from services.projection.access import DISCLOSURE_READERS
from services.projection.facts import REGION_TZ
from services.projection.keyset import Keyset
from services.projection.rebuild import BUILDING, RebuildRunning, being_built, rebuild, write_tx
from services.projection.tables import envelope_of_row, lock_archive, meta_table, next_seq, set_meta
from services.projection.timeline import timeline_view

# What a browser's request library appends to a GET so that no cache answers it (jQuery's
# `cache: false`): a console's, never a filter; taken on every view and ignored.
CACHE_BUSTER = "_"


def _known_query(request: Request) -> None:
    """Each query parameter is one the route reads, given once: an auditor's `?date=` on the
    KPIs (they read from/to) got every day's figures as if they were that day's, and a
    second `rule=` silently replaced the first."""
    route = request.scope.get("route")
    if not isinstance(route, APIRoute):
        return
    known = _query_names(route.dependant)
    seen: set[str] = set()
    for key, _ in request.query_params.multi_items():
        if key == CACHE_BUSTER:
            continue
        if key not in known:
            reads = ", ".join(sorted(known)) or "none"
            raise InvalidField(key, "unknown_parameter",
                               f"{key} is not a parameter of this view; it reads: {reads}",
                               f"该查询不支持参数{key}")
        if key in seen:
            raise InvalidField(key, "repeated_parameter", f"{key} is given more than once",
                               f"参数{key}重复")
        seen.add(key)


def _query_names(dependant: Dependant) -> set[str]:
    return {p.alias for p in dependant.query_params}.union(*(_query_names(d) for d in dependant.dependencies))


router = APIRouter(prefix="/audit", tags=["audit"], route_class=DisclosingRoute,
                   dependencies=[Depends(_known_query)])
Store = Annotated[EventStore, Depends(store_dep("projection"))]
Limit = Annotated[int, Query(ge=1, le=5000)]
Offset = Annotated[int, Query(ge=0, le=POSITION_MAX)]


class EventStream(StreamingResponse):
    media_type = "text/event-stream"  # for the OpenAPI document: the route streams its own frames


INSTANT, DAY = TypeAdapter(Instant), TypeAdapter(Day)


def _known_types() -> set[str]:
    return set(registry.types())


def _bound(value: str | None, field: str) -> datetime | None:
    """A date (a local day: its midnight in the region) or an RFC 3339 time, read as the
    commands read them (libs.web.fields); empty is no bound (a cleared date picker)."""
    if not value:
        return None
    try:
        if len(value) == 10:
            return datetime.combine(DAY.validate_python(value), time(), REGION_TZ)
        return INSTANT.validate_python(value)
    except ValidationError as exc:
        raise InvalidField(field, "invalid_time",
                           f"{field} must be a date or an RFC 3339 time with its offset, "
                           f"between {FIRST_YEAR} and {LAST_YEAR}",
                           f"{field}须为{FIRST_YEAR}年至{LAST_YEAR}年间的日期或带时区的时间") from exc


def _day(value: str | None, field: str) -> str | None:
    bound = _bound(value, field)
    return bound.astimezone(REGION_TZ).date().isoformat() if bound else None


def _ordered(lo: Any, hi: Any) -> None:
    if lo is not None and hi is not None and lo >= hi:
        raise InvalidField("to", "empty_range", "to must come after from (from is included, to is not)",
                           "to须晚于from（含from，不含to）")


def _days(from_: str | None, to: str | None) -> tuple[str | None, str | None]:
    """Local days [from, to): by whole days, as the KPIs and the ledger count them. A time
    stands for its local day; a `to` after its day's midnight takes that day in (a range
    within one day is that day, not an empty range, and none of the last day is lost)."""
    start, end = _bound(from_, "from"), _bound(to, "to")
    _ordered(start, end)  # as given: 18:00 to 09:00 of one day is no range, not that day
    day_from = start.astimezone(REGION_TZ).date().isoformat() if start else None
    day_to = None
    if end is not None:
        local = end.astimezone(REGION_TZ)
        day_to = (local.date() + timedelta(days=1 if local.timetz() != time(tzinfo=local.tzinfo) else 0)
                  ).isoformat()
    _ordered(day_from, day_to)
    return day_from, day_to


async def _data(store: EventStore, **scope: Any) -> Any:
    async with store.engine.connect() as conn:
        return await queries.load(conn, **scope)


@router.get("/transfers/{transfer_id}/timeline")
async def transfer_timeline(transfer_id: str, store: Store) -> Any:
    """Every step from request to loop closed: device and server time, actor, role, place,
    decision reasons, and the notifications sent and acknowledged."""
    async with store.engine.connect() as conn:
        gen = await queries.current(conn)
        rows, return_legs = await queries.timeline_events(conn, transfer_id, gen)
    # A transfer is what some event names as one: the archive keys an event that names no
    # transfer by its correlation id, which for a registration is the vehicle's or the
    # facility's id; that is no transfer's timeline.
    if not any(json.loads(r.payload).get("transfer_id") == transfer_id for r in rows):
        raise NotFound("transfer", transfer_id)
    return timeline_view(transfer_id, [envelope_of_row(r) for r in rows], return_legs)


@router.get("/vehicles/{vehicle_id}/custody")
async def vehicle_custody(vehicle_id: str, store: Store) -> Any:
    async with store.engine.connect() as conn:
        data = await queries.load(conn, vehicle_id=vehicle_id, tables=custody_view.READS)
        found = await violations_model.of_vehicle(conn, await queries.current(conn), vehicle_id, utcnow())
    view = custody_view.custody(data, vehicle_id, found)
    if view is None:
        raise NotFound("vehicle", vehicle_id)
    return view


def _after(keyset: Keyset, cursor: str | None) -> tuple[str, str] | None:
    """Where the page asked for starts: after the entry `cursor` (a `next_cursor`) names."""
    try:
        return keyset.parse(cursor) if cursor else None
    except ValueError as exc:
        raise InvalidField("cursor", "invalid_cursor", "cursor is not one this view gave",
                           "cursor无效，请使用上一页返回的next_cursor") from exc


@router.get("/violations")
async def violations(
    store: Store, rule: str | None = None,
    kind: Literal["violation", "override", "sla"] | None = None,
    from_: Annotated[str | None, Query(alias="from")] = None,
    to: str | None = None, vehicle_id: str | None = None, facility_id: str | None = None,
    transfer_id: str | None = None,
    limit: Annotated[int, Query(ge=1, le=violations_model.MAX_PAGE)] = 100, cursor: str | None = None,
) -> Any:
    """Every rule of R1-R14 that events can show broken, and every override: rule id,
    time, actors, and the events that prove it; in time order, a page at a time
    (`next_cursor` asks for the next). `rules` says which checks run."""
    lo, hi = _bound(from_, "from"), _bound(to, "to")
    _ordered(lo, hi)
    if rule is not None and rule not in findings_view.RULE_IDS:
        raise InvalidField("rule", "unknown_rule", f"rule is one of {', '.join(findings_view.RULE_IDS)}",
                           "rule须为R1至R14之一或override")
    after = _after(violations_model.FINDINGS, cursor)
    now = utcnow()
    async with store.engine.connect() as conn:
        gen = await queries.current(conn)
        found, next_cursor, total = await violations_model.page(
            conn, gen, now=now, limit=limit, after=after, rule=rule, kind=kind, lo=lo, hi=hi,
            vehicle_id=vehicle_id, facility_id=facility_id, transfer_id=transfer_id)
        failed = await violations_model.failures(conn, gen)
    return {
        "as_of": now.isoformat(), "total": total, "findings": found, "next_cursor": next_cursor,
        "rules": findings_view.rules_status(_known_types()), "failed_checks": failed,
    }


@router.get("/exposures")
async def exposures(store: Store, vehicle_id: str | None = None) -> Any:
    """The transfers and patients exposed to each positive vehicle."""
    data = await _data(store, vehicle_id=vehicle_id, tables=custody_view.EXPOSURE_READS)
    return {"exposures": custody_view.exposures(data, vehicle_id)}


@router.get("/kpis")
async def kpis(store: Store, from_: Annotated[str | None, Query(alias="from")] = None,
               to: str | None = None, clock: Literal["device", "server"] = "device") -> Any:
    day_from, day_to = _days(from_, to)
    data = await _data(store, day_from=day_from, day_to=day_to, tables=kpis_view.READS)
    return kpis_view.indicators(data, utcnow(), clock, day_from, day_to)


XLSX = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"


LedgerFormat = Literal["json", "csv", "xlsx"]
_OFFERED: dict[str, LedgerFormat] = {XLSX: "xlsx", "text/csv": "csv", "application/json": "json"}


def negotiated(accept: str | None) -> LedgerFormat:
    """The ledger's format `Accept` prefers, by its q-values (the first of equals; q=0
    refuses one); JSON when it names none of them."""
    best: LedgerFormat = "json"
    best_q = 0.0
    for part in (accept or "").lower().split(","):
        media, *params = (p.strip() for p in part.split(";"))
        q = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if media in _OFFERED and q > best_q:
            best, best_q = _OFFERED[media], q
    return best


@router.get("/ledger", response_model=None, responses={200: {"content": {
    "text/csv": {"schema": {"type": "string"}}, XLSX: {"schema": {"type": "string", "format": "binary"}}}}})
async def ledger(request: Request, store: Store, date: str | None = None,
                 from_: Annotated[str | None, Query(alias="from")] = None, to: str | None = None,
                 format: LedgerFormat | None = None,
                 accept: Annotated[str | None, Header()] = None) -> Response | dict[str, Any]:
    """The 台账: every outgoing trip by person and day (the trip's local day). `date` is
    one local day; or `from` (included) to `to` (excluded). As JSON, CSV or XLSX: `format`,
    else what `Accept` asks for."""
    if format is None:
        format = negotiated(accept)
    if date and (from_ or to):
        raise InvalidField("date", "date_with_range", "give either date or from/to, not both",
                           "date与from/to只能二选一")
    day_from, day_to = _days(from_, to)
    if date:
        day_from = _day(date, "date")
        day_to = (datetime.fromisoformat(day_from or "") + timedelta(days=1)).date().isoformat()
    # A trip's day may come after its request's (a care-series visit booked days before, a
    # transfer that waited, a takeover): the transfers with a trip opened in the range are
    # loaded too, and rows() keeps the trips' days.
    data = await _data(store, day_from=day_from, day_to=day_to, trips_too=True, tables=ledger_view.READS)
    # Rows and files are seconds of CPU for a large range (20,000 trips: about 7 s for an
    # XLSX): in a thread, so the loop goes on serving (embedded: dispatch and the crews too).
    rows: list[dict[str, Any]] = await asyncio.to_thread(ledger_view.rows, data, day_from, day_to)
    name = "ledger-" + ("all" if not (day_from or day_to) else
                        f"{day_from or 'start'}" + (f"_{day_to}" if day_to and not date else ""))
    if format != "json":
        rows = await disclose(request, rows, large=len(rows) > 1000)
    if format == "csv":
        return Response(await asyncio.to_thread(ledger_view.to_csv, rows),
                        media_type="text/csv; charset=utf-8",
                        headers={"Content-Disposition": f'attachment; filename="{name}.csv"'})
    if format == "xlsx":
        return Response(
            await asyncio.to_thread(ledger_view.to_xlsx, rows), media_type=XLSX,
            headers={"Content-Disposition": f'attachment; filename="{name}.xlsx"'})
    return {"from": day_from, "to": day_to, "rows": rows}


@router.get("/disclosures")
async def disclosures(store: Store, actor: str | None = None, limit: Limit = 500,
                      offset: Offset = 0, cursor: str | None = None) -> dict[str, Any]:
    """Every read of patients' id numbers or phones in clear: who, in which role, which
    patients, when, through which route; newest first. The next page is `cursor` =
    `next_cursor`: reads recorded meanwhile (newest first) do not shift it, as they shift
    an `offset`."""
    after = _after(queries.DISCLOSURES, cursor)
    async with store.engine.connect() as conn:
        found = await queries.disclosures(conn, actor, limit, offset, after)
    return {"disclosures": found,
            "next_cursor": queries.DISCLOSURES.cursor(found[-1]["at"], found[-1]["event_id"])
            if len(found) == limit else None}


def _frame(row: Any) -> str:
    payload = json.loads(row.payload)
    # The archive keys an event with no transfer in it by its correlation id (a transfer's
    # flow correlates by the transfer's id, a registration by anything): named a transfer
    # here only for an event of a transfer's flow.
    of_transfer = payload.get("transfer_id") or row.trip_id or row.cycle_id
    data = {"seq": row.seq, "type": row.type, "store": row.store, "stream_id": row.stream_id,
            "transfer_id": row.transfer_key if of_transfer else None, "trip_id": row.trip_id,
            "cycle_id": row.cycle_id, "vehicle_id": row.vehicle_id, "occurred_at": row.occurred_at,
            "recorded_at": row.recorded_at, "actor": row.actor, "role": row.role, "payload": payload}
    body = json.dumps(mask(data), ensure_ascii=False, separators=(",", ":"))
    return f"id: {row.seq}\nevent: {row.type}\ndata: {body}\n\n"


# One event of the stream; `schema` is the whole stream read as an array of them (OpenAPI
# 3.2, what schemathesis checks a stream against), in place of FastAPI's `type: string`,
# which no stream satisfies and which an empty one (only `retry`) was refused by.
_SSE_EVENT = {"type": "object", "properties": {
    "id": {"type": "string"}, "event": {"type": "string"},
    "data": {"type": "string", "contentMediaType": "application/json"},
    "retry": {"type": "integer", "minimum": 0}}}


@router.get("/stream", response_class=EventStream, responses={200: {"content": {
    "text/event-stream": {"itemSchema": _SSE_EVENT, "schema": {"type": "array", "items": _SSE_EVENT}}}}})
async def stream(request: Request, store: Store,
                 last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
                 last_event_id_query: Annotated[str | None, Query(alias="lastEventId")] = None,
                 after: Annotated[int | None, Query(ge=0, le=POSITION_MAX)] = None, follow: bool = True,
                 from_now: bool = False,
                 heartbeat: Annotated[float, Query(gt=0, le=60)] = 15.0) -> StreamingResponse:
    """Server-sent events: every event the projection takes in, in the order it took them
    (`id` is that order). Where it starts: after `Last-Event-ID` (what a console's
    EventSource sends when it reconnects: it wins over the URL's `after`, which the
    reconnect repeats), else after `after`, else (`from_now`) after the newest event, else
    from the first; a position past the newest event resumes after the newest.
    `follow=false` ends the stream once caught up. The record of reads in clear
    (PatientDataDisclosed) is left out for those who may not read /audit/disclosures.

    The first frame, and every keep-alive, carries an `id` and no data: the position read
    up to. An EventSource keeps it as its last event id, so a console that reconnects before
    any event came (or after events it may not see) resumes there, not from_now again.
    An EventSource polyfill that can send a bearer token sends its last event id as the
    query's `lastEventId` instead: read the same way, the header winning."""
    given, last_event_id = (("Last-Event-ID", last_event_id) if last_event_id
                            else ("lastEventId", last_event_id_query))
    if last_event_id:
        # Digits only: int() would also take "1_0", "+5" or " 7 ".
        after = int(last_event_id) if last_event_id.isascii() and last_event_id.isdigit() else -1
        if not 0 <= after <= POSITION_MAX:
            raise InvalidField(given, "invalid_last_event_id",
                               f"{given} is an event's id (a number from 0)",
                               f"{given}须为事件编号（非负整数）")
    async with store.engine.connect() as conn:
        newest = await next_seq(conn) - 1
    if after is None and from_now:
        after = newest
    # An id past the newest event (the console saw a projection database since restored
    # or recreated, whose order starts lower again) resumes at the newest: from there
    # every event that comes is sent, where the id the console gave would skip them.
    start = min(after or 0, newest)
    principal = getattr(request.state, "principal", None)
    hidden = set() if principal is not None and principal.role in DISCLOSURE_READERS else {
        PatientDataDisclosed.__name__}

    async def frames() -> Any:
        cursor = start
        idle = 0.0
        yield f"retry: 2000\nid: {cursor}\n\n"
        while True:
            async with store.engine.connect() as conn:
                rows = await queries.feed(conn, cursor, 500)
            for row in rows:
                if row.type not in hidden:
                    yield _frame(row)
                cursor = row.seq
            if len(rows) == 500:
                continue
            if not follow or await request.is_disconnected():
                return
            await asyncio.sleep(0.25)
            idle += 0.25
            if idle >= heartbeat:
                idle = 0.0
                yield f": keep-alive\nid: {cursor}\n\n"

    return StreamingResponse(frames(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.get("/verify")
async def verify(store: Store, request: Request) -> dict[str, Any]:
    """Every store's hash chain, store by store: the projection's copy (recomputed here)
    and the store itself (recomputed by the service that owns it, which also says whether
    it still holds the history the projection received); each with its first broken link."""
    async with store.engine.connect() as conn:
        return await verification.verify_all(conn, store, request.app.state.stores,
                                             request.app.state.runtime.settings)


@router.post("/rebuild", status_code=202)
async def start_rebuild(request: Request, store: Store, actor: ActorDep, key: IdempotencyKey = None,
                        order: Literal["seq", "store"] = "seq", force: bool = False) -> JSONResponse:
    """Rebuild every read model beside the live one, then switch (no downtime). Refused
    while another rebuild (here, in another process, or the command's) is building;
    `force` takes over the marker of one that died without clearing it (it goes stale by
    itself two minutes after its last renewal). An Idempotency-Key sent again gets the
    first answer back and starts nothing."""
    state = request.app.state
    # One request at a time decides: two that both found none running started two (found
    # by review), the second failing as the first's report was lost.
    if getattr(state, "projection_rebuild_lock", None) is None:
        state.projection_rebuild_lock = asyncio.Lock()

    async def run(remember: Remember) -> tuple[int, dict[str, Any]]:
        async with state.projection_rebuild_lock:
            return await start(remember)

    async def start(remember: Remember) -> tuple[int, dict[str, Any]]:
        task: asyncio.Task[Any] | None = getattr(state, "projection_rebuild", None)
        if task is not None and not task.done():
            raise StateConflict("rebuild_running", "a rebuild is running", "重建正在进行中")
        # Claimed in the database, under the archive lock, before answering: another replica
        # asked at the same moment finds the claim (the rebuild sets its own marker only
        # once it runs, after the 202).
        claim = f"claimed@{iso(utcnow())}"
        async with write_tx(store) as conn:
            await lock_archive(conn)
            elsewhere = await being_built(conn)
            if elsewhere and not force:
                raise StateConflict("rebuild_running", f"a rebuild is running: {elsewhere}",
                                    "另一重建正在进行中（若其已中断，可加force=true接管）")
            await set_meta(conn, BUILDING, claim)
        answer = {"status": "running", "order": order}
        uow = UnitOfWork(store, meta_for(actor, "audit-rebuild"))
        remember(uow, 202, answer)
        await uow.commit()  # the key's answer, before the rebuild starts
        state.projection_rebuild = asyncio.create_task(claimed_rebuild(claim))
        return 202, answer

    async def claimed_rebuild(claim: str) -> Any:
        try:
            # Its own claim is no other rebuild's marker; `force` also drops what a rebuild
            # that died left half built.
            return await rebuild(store, order=order, claim=claim, force=force)
        except BaseException:
            # A failure before the rebuild put its own marker in place leaves the claim.
            async with write_tx(store) as conn:
                await conn.execute(meta_table.delete().where(
                    (meta_table.c.name == BUILDING) & (meta_table.c.value == claim)))
            raise

    return await idempotent(store, key, f"{actor.subject} audit-rebuild",
                            {"order": order, "force": force}, run)


@router.get("/rebuild")
async def rebuild_status(request: Request, store: Store) -> dict[str, Any]:
    task: asyncio.Task[Any] | None = getattr(request.app.state, "projection_rebuild", None)
    # Whether it ended, taken before the generation is read: a rebuild that ends while the
    # read waits must not be reported done beside the generation it replaced.
    ended = task is not None and task.done()
    async with store.engine.connect() as conn:
        gen = await queries.current(conn)
    out: dict[str, Any] = {"active_generation": gen.number if gen else None}
    if task is None:
        return {**out, "status": "idle"}
    if not ended:
        return {**out, "status": "running"}
    if task.exception() is not None:
        exc = task.exception()
        code = "rebuild_running" if isinstance(exc, RebuildRunning) else "rebuild_failed"
        return {**out, "status": "failed", "code": code, "detail": str(exc)}
    return {**out, "status": "done", "report": task.result().view()}
