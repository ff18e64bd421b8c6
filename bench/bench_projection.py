"""Projection: rebuild throughput beside the raw paged read rate of the same archive (the
ceiling), projection lag under a steady append load, and /audit/violations pages over the
findings read model of the whole archive.

    make bench BENCH=bench_projection                   # 1,000,000 events
    BENCH_PROJECTION_EVENTS=200000 make bench BENCH=bench_projection

The archive is filled with synthetic but complete transfer histories (every event type
of today's flows, ~25 per transfer) written with COPY; their hash fields are filler,
since a rebuild does not verify chains (/audit/verify does). Runs on the project's
PostgreSQL, in a schema of its own that it drops afterwards.
"""

from __future__ import annotations

import asyncio
import io
import os
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg  # type: ignore[import-untyped]
from sqlalchemy import and_, func, select

from bench.report import Row, table
from libs.auth.privacy import mask
from libs.events.bus import StoreTailSource, Subscription
from libs.events.catalog import dispatch as dsp
from libs.events.envelope import Envelope
from libs.events.store import EventStore, Meta
from services.projection import findings, kpis, ledger, queries, violations
from services.projection.consumers import CONSUMES
from services.projection.facts import ARCHIVE_COLUMNS, dump
from services.projection.kpis import percentile
from services.projection.rebuild import rebuild
from services.projection.tables import apply_live, archive, metadata

PG = os.environ.get(
    "CLOSEDLOOP_TEST_PG_DSN",
    f"postgresql://closedloop@127.0.0.1:{os.environ.get('CLOSEDLOOP_PG_PORT', '55432')}/test")
EVENTS = int(os.environ.get("BENCH_PROJECTION_EVENTS", "1000000"))
LAG_RATE = int(os.environ.get("BENCH_PROJECTION_LAG_RATE", "100"))  # events/s appended
LAG_SECONDS = float(os.environ.get("BENCH_PROJECTION_LAG_SECONDS", "10"))
T0 = datetime(2022, 11, 20, tzinfo=UTC)
FILL = "0" * 64


def _stage(kind: str, at: datetime) -> dict[str, Any]:
    end = at + timedelta(minutes=35)
    return {"stage": kind, "disinfectant": "chlorine", "concentration_mg_per_l": 1000, "method": "wipe",
            "started_at": at.isoformat(), "ended_at": end.isoformat(), "contact_minutes": 35.0,
            "operator": "王五", "location": "洗消间",
            "video": {"camera_id": "cam", "clip_ref": f"nvr://wash/{at:%Y%m%dT%H%M}",
                      "from": at.isoformat(), "to": end.isoformat()}}


def history(n: int) -> list[tuple[str, str, str, dict[str, Any]]]:
    """(store, stream, type, payload) of transfer n, in the order the services write them."""
    tid, trip, cyc, vid = f"t{n}", f"trip{n}", f"c{n}", f"v{n % 300}"
    at = T0 + timedelta(minutes=n)
    out: list[tuple[str, str, str, dict[str, Any]]] = [
        ("dispatch", f"transfer-{tid}", "TransferRequested", {
            "transfer_id": tid, "patient": {"name": f"病人{n}", "id_number": "640121198001011231",
                                            "phone": "13800138000"},
            "risk_category": "isolation_site", "condition": {"fever": True, "critical": False},
            "origin": {"kind": "isolation_site", "name": "永宁县集中隔离医学观察点",
                       "location": {"lat": 38.27, "lon": 106.24}},
            "purpose": "outpatient_visit", "return_required": True,
            "requested_by": {"channel": "console", "org": "银川市紧急救援中心"}}),
        ("dispatch", f"transfer-{tid}", "TransferPrioritized", {"transfer_id": tid, "priority": 2,
                                                                 "reason": "fever"}),
        ("dispatch", f"transfer-{tid}", "DestinationAssigned", {
            "transfer_id": tid, "facility_id": "yc-second", "reason": "nearest",
            "candidates": [{"facility_id": "yc-second", "eta_min": 25.1, "why": "backup"}]}),
        ("dispatch", f"vehicle-{vid}", "VehicleReserved", {"vehicle_id": vid, "transfer_id": tid}),
        ("dispatch", f"transfer-{tid}", "VehicleAssigned", {
            "transfer_id": tid, "vehicle_id": vid, "destination_id": "yc-second", "origin": {},
            "return_required": True, "manual": False, "override_reason": None, "reason": "nearest",
            "candidates": []}),
        ("dispatch", f"transfer-{tid}", "TransferReported", {
            "transfer_id": tid, "reported_to": "county_health_bureau", "reported_by": "120"}),
        ("transfer", f"trip-{trip}", "TripOpened", {
            "trip_id": trip, "transfer_id": tid, "vehicle_id": vid, "destination_id": "yc-second",
            "origin": {}, "return_required": True}),
    ]
    for k, step in enumerate(("acknowledged", "en_route", "at_pickup", "patient_aboard", "at_destination",
                              "handed_over")):
        out.append(("transfer", f"trip-{trip}", "TripStepReported", {
            "trip_id": trip, "step": step, "client_event_id": f"{trip}-{k}",
            "device_at": (at + timedelta(minutes=k)).isoformat(), "position": None}))
    out += [
        ("transfer", f"trip-{trip}", "PatientHandedOver", {
            "trip_id": trip, "transfer_id": tid, "facility_id": "yc-second", "received_by": "李医生",
            "confirmed_by": "crew"}),
        ("transfer", f"trip-{trip}", "TripCompleted",
         {"trip_id": trip, "transfer_id": tid, "vehicle_id": vid}),
        ("dispatch", f"transfer-{tid}", "TransferHandedOver", {"transfer_id": tid, "trip_id": trip,
                                                                "facility_id": "yc-second"}),
        ("dispatch", f"vehicle-{vid}", "VehicleAwaitingDisinfection", {"vehicle_id": vid, "trip_id": trip}),
        ("disinfection", f"cycle-{cyc}", "CycleOpened", {
            "cycle_id": cyc, "vehicle_id": vid, "trip_id": trip, "transfer_id": tid, "reason": "r"}),
        ("disinfection", f"cycle-{cyc}", "InitialDisinfectionLogged", {
            "cycle_id": cyc, "vehicle_id": vid, "stage": _stage("initial", at)}),
        ("disinfection", f"cycle-{cyc}", "TerminalDisinfectionLogged", {
            "cycle_id": cyc, "vehicle_id": vid, "stage": _stage("terminal", at + timedelta(hours=1))}),
        ("disinfection", f"sample-s{n}", "SampleRegistered", {"sample_id": f"s{n}", "cycle_id": cyc}),
        ("disinfection", f"cycle-{cyc}", "SurfaceSwabCollected", {
            "cycle_id": cyc, "vehicle_id": vid, "sample_id": f"s{n}", "sites": ["stretcher", "seat", "door"],
            "collected_by": "赵六", "collected_at": (at + timedelta(hours=2)).isoformat()}),
        ("disinfection", f"cycle-{cyc}", "VehicleReleased", {
            "cycle_id": cyc, "vehicle_id": vid, "trip_id": trip, "policy": "after_swab_collected"}),
        ("disinfection", f"cycle-{cyc}", "SwabResultRecorded", {
            "cycle_id": cyc, "vehicle_id": vid, "sample_id": f"s{n}", "result": "negative", "lab": "检验科",
            "reported_at": (at + timedelta(hours=5)).isoformat()}),
        ("dispatch", f"vehicle-{vid}", "VehicleReturnedToService", {
            "vehicle_id": vid, "trip_id": trip, "cycle_id": cyc}),
    ]
    return out


def archive_records(total: int) -> Iterator[tuple[Any, ...]]:
    positions: dict[str, int] = {}
    versions: dict[str, int] = {}
    seq, n = 0, 0
    now = datetime.now(UTC).isoformat()
    while seq < total:
        for store, stream, type_, payload in history(n):
            if seq >= total:
                return
            seq += 1
            positions[store] = positions.get(store, 0) + 1
            versions[stream] = versions.get(stream, 0) + 1
            at = (T0 + timedelta(minutes=n, seconds=seq % 60)).isoformat()
            tid = payload.get("transfer_id") or f"t{n}"
            yield (seq, str(uuid.uuid4()), store, positions[store], stream, versions[stream], type_, 1,
                   at, at, now, "bench", "system", tid, None, dump(payload),
                   FILL, FILL, tid, payload.get("trip_id"), payload.get("cycle_id"),
                   payload.get("vehicle_id"))
        n += 1


COPY_COLUMNS = ["seq", "event_id", "store", "position", "stream_id", "stream_version", "type",
                "schema_version", "occurred_at", "recorded_at", "archived_at", "actor", "role",
                "correlation_id", "causation_id", "payload", "prev_hash", "hash", "transfer_key", "trip_id",
                "cycle_id", "vehicle_id"]


async def fill(schema: str, total: int) -> float:
    started = time.perf_counter()
    conn = await asyncpg.connect(PG, server_settings={"search_path": schema})
    try:
        batch: list[tuple[Any, ...]] = []
        for rec in archive_records(total):
            batch.append(rec)
            if len(batch) == 50_000:
                await conn.copy_records_to_table("audit_archive", records=batch, columns=COPY_COLUMNS)
                batch = []
        if batch:
            await conn.copy_records_to_table("audit_archive", records=batch, columns=COPY_COLUMNS)
        await conn.execute("ANALYZE audit_archive")
    finally:
        await conn.close()
    return time.perf_counter() - started


async def raw_read_sqlalchemy(store: EventStore, page: int) -> float:
    """The rebuild's own read path with nothing done to the rows: its ceiling."""
    started, after, n = time.perf_counter(), 0, 0
    cols = [archive.c[c] for c in ARCHIVE_COLUMNS]
    async with store.engine.connect() as conn:
        while rows := list(await conn.execute(
                select(*cols).where(and_(archive.c.seq > after)).order_by(archive.c.seq).limit(page))):
            n += len(rows)
            after = rows[-1].seq
    return n / (time.perf_counter() - started)


async def raw_read_asyncpg(schema: str, page: int) -> float:
    """The driver alone, no SQLAlchemy: the floor of any Python reader."""
    conn = await asyncpg.connect(PG, server_settings={"search_path": schema})
    started, after, n = time.perf_counter(), 0, 0
    try:
        query = (f"SELECT {', '.join(ARCHIVE_COLUMNS)} FROM audit_archive WHERE seq > $1 "
                 f"ORDER BY seq LIMIT {page}")
        while rows := await conn.fetch(query, after):
            n += len(rows)
            after = rows[-1]["seq"]
    finally:
        await conn.close()
    return n / (time.perf_counter() - started)


async def write_floor(schema: str, number: int) -> float:
    """Seconds PostgreSQL alone takes to write what the rebuild wrote and index it (the
    rows of generation `number`, fed back as COPY binary, two tables at a time, then their
    keys, indexes and statistics, as the rebuild does): with the raw read, the floor of any
    rebuild that writes these tables, whatever its fold costs."""
    conn = await asyncpg.connect(PG, server_settings={"search_path": schema})
    lanes = [await asyncpg.connect(PG, server_settings={"search_path": schema, "synchronous_commit": "off"})
             for _ in range(2)]
    try:
        tables = [r[0] for r in await conn.fetch(
            "SELECT relname FROM pg_stat_user_tables WHERE schemaname = $1 AND relname LIKE $2 "
            "ORDER BY pg_total_relation_size(relid) DESC", schema, f"g{number}\\_%")]
        dumps: dict[str, bytes] = {}
        keys: dict[str, list[str]] = {}
        for name in tables:
            sink = io.BytesIO()
            await conn.copy_from_table(name, output=sink, format="binary")
            dumps[name] = sink.getvalue()
            keys[name] = [
                *(f"ALTER TABLE floor_{name} ADD {r[0]}" for r in await conn.fetch(
                    "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = $1::regclass "
                    "AND contype = 'p'", name)),
                *(r[0].replace(f" ON {schema}.{name} ", f" ON {schema}.floor_{name} ").replace(
                    "INDEX ", "INDEX floor_", 1) for r in await conn.fetch(
                    "SELECT indexdef FROM pg_indexes WHERE schemaname = $1 AND tablename = $2 "
                    "AND indexname NOT LIKE '%pkey'", schema, name)),
                f"ANALYZE floor_{name}"]
            await conn.execute(f"CREATE TABLE floor_{name} (LIKE {name} INCLUDING DEFAULTS INCLUDING STORAGE "
                               "INCLUDING COMPRESSION)")
        started = time.perf_counter()
        for step in ("write", "index"):
            queue = list(tables)

            async def lane(lconn: Any, step: str = step, queue: list[str] = queue) -> None:
                while queue:
                    name = queue.pop(0)
                    if step == "write":
                        await lconn.copy_to_table(f"floor_{name}", source=io.BytesIO(dumps[name]),
                                                  format="binary")
                    else:
                        for statement in keys[name]:
                            await lconn.execute(statement)

            await asyncio.gather(*(lane(lconn) for lconn in lanes))
        return time.perf_counter() - started
    finally:
        for lconn in lanes:
            await lconn.close()
        await conn.close()


async def lag(schema_src: str, schema_proj: str) -> tuple[list[float], int, float]:
    """Appends at LAG_RATE events/s for LAG_SECONDS into a PostgreSQL store while the
    projection's subscription tails it; lag = archived_at - recorded_at per event."""
    source = EventStore.from_url("dispatch", PG.replace("postgresql://", "postgresql+asyncpg://"),
                                 connect_args={"server_settings": {"search_path": schema_src}})
    proj = EventStore.from_url("projection", PG.replace("postgresql://", "postgresql+asyncpg://"),
                               connect_args={"server_settings": {"search_path": schema_proj}})
    await source.create_schema()
    await proj.create_schema(metadata)
    stop = asyncio.Event()
    sub = Subscription("projection", proj, CONSUMES["dispatch"],
                       StoreTailSource(source, proj, "projection", idle_wait=0.05))
    task = asyncio.create_task(sub.run(stop))
    sent = 0
    try:
        interval = 1.0 / LAG_RATE
        started = time.perf_counter()
        appended_in = 0.0
        while time.perf_counter() - started < LAG_SECONDS:
            await source.append(f"vehicle-lag{sent}", 0, [dsp.VehicleReserved(vehicle_id=f"lag{sent}",
                                                                              transfer_id="t")],
                                Meta(actor="bench", role="system", correlation_id="lag"))
            sent += 1
            delay = started + sent * interval - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
        appended_in = time.perf_counter() - started
        deadline = time.perf_counter() + 60
        while time.perf_counter() < deadline:
            async with proj.engine.connect() as conn:
                rows = list(await conn.execute(select(archive.c.recorded_at, archive.c.archived_at)))
            if len(rows) >= sent:
                break
            await asyncio.sleep(0.1)
        lags = [(datetime.fromisoformat(r.archived_at)
                 - datetime.fromisoformat(r.recorded_at)).total_seconds() for r in rows]
        return lags, sent, sent / appended_in
    finally:
        stop.set()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await source.close()
        await proj.close()


async def views(store: EventStore) -> list[Row]:
    """How long the views computed when asked take over the whole rebuilt history, as
    their routes compute them: the fact rows of the tables each reads, then a pure
    function over them."""
    now = datetime.now(UTC)
    out: list[Row] = []
    for what, reads, compute in (
            ("/audit/kpis", kpis.READS, lambda data: kpis.indicators(data, now)),
            ("/audit/ledger?format=csv", ledger.READS, lambda data: ledger.to_csv(ledger.rows(data)))):
        started = time.perf_counter()
        async with store.engine.connect() as conn:
            data = await queries.load(conn, tables=reads)
        loaded = time.perf_counter()
        compute(data)
        done = time.perf_counter()
        out += [Row(f"{what}: load {', '.join(reads)}", (loaded - started) * 1000, "ms"),
                Row(f"{what}: compute", (done - loaded) * 1000, "ms")]
    return out


async def live_on_a_long_history(store: EventStore, events: int = 30) -> list[Row]:
    """The live path on the full archive: an event of a busy vehicle archived, folded and
    its vehicle's findings re-evaluated over the vehicle's whole history (v7 carried one
    transfer in 300), one transaction each, as the subscription applies them."""
    async with store.engine.connect() as conn:
        top = int(await conn.scalar(select(func.max(archive.c.position)).where(archive.c.store == "dispatch"))
                  or 0)
    known = findings.registry_types()
    times: list[float] = []
    for n in range(events):
        type_, payload = ("VehicleReserved", {"vehicle_id": "v7", "transfer_id": f"live{n}"}) if n % 2 == 0 \
            else ("VehicleStoodDown", {"vehicle_id": "v7", "transfer_id": f"live{n - 1}", "reason": "bench"})
        at = datetime.now(UTC).isoformat()
        env = Envelope(event_id=uuid.uuid4(), type=type_, schema_version=1, store="dispatch",
                       stream_id="vehicle-v7", stream_version=100_000 + n, position=top + n + 1,
                       occurred_at=at, recorded_at=at, actor="bench", role="system", correlation_id="live",
                       payload=payload, prev_hash=FILL, hash=FILL)
        started = time.perf_counter()
        async with store.engine.begin() as conn:
            gen = await apply_live(conn, [env])
            await violations.apply(conn, gen, [env], known)
        times.append(time.perf_counter() - started)
    return [Row("one live event of a busy vehicle, p50", (percentile(times, 50) or 0) * 1000, "ms"),
            Row("one live event of a busy vehicle, p99", (percentile(times, 99) or 0) * 1000, "ms")]


async def violations_pages(store: EventStore, repeat: int = 9) -> tuple[list[Row], int]:
    """/audit/violations as the route answers it (a page of the findings read model, then
    masked), median of `repeat` asks: the first page, filtered pages, and a page far in."""
    now = datetime.now(UTC)
    rows: list[Row] = []
    async with store.engine.connect() as conn:
        gen = await queries.current(conn)

        async def median_ms(what: str, **scope: Any) -> tuple[str | None, int]:
            times: list[float] = []
            for _ in range(repeat):
                started = time.perf_counter()
                found, cursor, total = await violations.page(conn, gen, now=now, limit=100, **scope)
                mask({"findings": found, "total": total, "next_cursor": cursor})
                times.append(time.perf_counter() - started)
            rows.append(Row(what, (percentile(times, 50) or 0) * 1000, "ms"))
            return cursor, total

        cursor, total = await median_ms("first page of 100, no filter (and the total)")
        await median_ms("a page of one rule (R11)", rule="R11")
        await median_ms("a page of one vehicle", vehicle_id="v7")
        await median_ms("a page of one day", lo=T0 + timedelta(days=3), hi=T0 + timedelta(days=4))
        depth = 1
        while cursor is not None and depth < total // 200:  # halfway through the findings
            last = cursor
            _, cursor, _ = await violations.page(conn, gen, now=now, limit=100,
                                                 after=violations.FINDINGS.parse(cursor))
            depth += 1
        if depth > 1:
            await median_ms(f"page {depth} of {-(-total // 100)}, by cursor",
                            after=violations.FINDINGS.parse(last))
    return rows, total


async def main() -> str:
    schemas = [f"bench_{uuid.uuid4().hex[:8]}" for _ in range(3)]
    admin = await asyncpg.connect(PG)
    for s in schemas:
        await admin.execute(f"CREATE SCHEMA {s}")
    try:
        store = EventStore.from_url("projection", PG.replace("postgresql://", "postgresql+asyncpg://"),
                                    connect_args={"server_settings": {"search_path": schemas[0]}})
        await store.create_schema(metadata)
        fill_s = await fill(schemas[0], EVENTS)
        page = 10_000
        sa_rate = await raw_read_sqlalchemy(store, page)
        pg_rate = await raw_read_asyncpg(schemas[0], page)
        report = await rebuild(store, order="seq", page=page)
        written_s = await write_floor(schemas[0], report.generation)
        floor = EVENTS / (EVENTS / pg_rate + written_s)
        page_rows, total = await violations_pages(store)
        live_rows = await live_on_a_long_history(store)
        view_rows = await views(store)
        await store.close()
        lags, sent, achieved = await lag(schemas[1], schemas[2])
        ceiling = "raw paged read, asyncpg (the rebuild's reader): ceiling"
        bound = "floor: the raw read, then PostgreSQL alone writing and indexing the rebuild's rows"
        rows = [
            Row(ceiling, pg_rate, "events/s"),
            Row("raw paged read through SQLAlchemy rows", sa_rate, "events/s", peer=ceiling),
            Row(bound, floor, "events/s", peer=ceiling),
            Row("rebuild: read, fold, write beside, findings, switch", report.events_per_second, "events/s",
                peer=(ceiling, bound)),
            Row("rebuild target", 100_000, "events/s", peer=(ceiling, bound)),
        ]
        lag_rows = [
            Row(f"projection lag p50 at {LAG_RATE} events/s", (percentile(lags, 50) or 0) * 1000, "ms"),
            Row(f"projection lag p99 at {LAG_RATE} events/s", (percentile(lags, 99) or 0) * 1000, "ms"),
            Row("projection lag max", (max(lags) if lags else 0) * 1000, "ms"),
        ]
        steps = ", ".join(f"{k} {v:.1f} s" for k, v in report.phases.items())
        head = (f"{EVENTS:,} archived events ({EVENTS // 25:,} transfers), PostgreSQL, page {page:,}; "
                f"archive filled by COPY in {fill_s:.1f} s; rebuild took {report.seconds:.1f} s with "
                f"{report.workers} worker process(es) ({steps}), {report.findings:,} findings. "
                f"PostgreSQL alone wrote and indexed the same rows in {written_s:.1f} s "
                f"(COPY binary of the built tables, two at a time). "
                f"Target: rebuild >= 100,000 events/s.\n\n")
        lag_head = (f"\n{sent:,} events appended one per transaction at {achieved:,.0f}/s (asked "
                    f"{LAG_RATE}/s) for {LAG_SECONDS:.0f} s "
                    f"into a PostgreSQL store, tailed by the projection's subscription (the embedded "
                    f"bus on PostgreSQL), each archived, folded and its findings re-evaluated; "
                    f"{len(lags):,} archived.\n\n")
        return (head + table("Projection rebuild", rows) + lag_head
                + table("Projection lag under load", lag_rows, higher_is_better=False)
                + f"\n/audit/violations over the findings read model of all {EVENTS:,} events "
                  f"({total:,} findings), median of 9:\n\n"
                + table("Violations pages", page_rows, higher_is_better=False)
                + f"\nThe live path on that archive: an event of a vehicle with {EVENTS // 25 // 300:,} "
                  "trips, its findings re-evaluated over its whole history:\n\n"
                + table("Live findings upkeep", live_rows, higher_is_better=False)
                + f"\nThe views computed when asked, over all {EVENTS:,} events at once (no date filter):\n\n"
                + table("Audit views over the whole history", view_rows, higher_is_better=False))
    finally:
        for s in schemas:
            await admin.execute(f"DROP SCHEMA {s} CASCADE")
        await admin.close()
