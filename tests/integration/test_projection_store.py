"""Forbidden histories appended straight into the producing stores (no command side in
the way), carried by the real subscription runner into the projection, on SQLite and on
PostgreSQL: each must come out as the finding that names its rule. The projection's
rebuild (both fold orders) must equal what the subscription built live."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncConnection

from libs.events.bus import StoreTailSource, Subscription
from libs.events.catalog import disinfection as dis
from libs.events.catalog import dispatch as dsp
from libs.events.catalog import transfer as trn
from libs.events.catalog.common import PatientDataDisclosed
from libs.events.contracts import Event
from libs.events.store import Commit, EventStore, Meta, NewEvent, StreamAppend
from services.projection import findings, ledger, queries, violations
from services.projection import rebuild as rebuild_module
from services.projection.consumers import CONSUMES
from services.projection.data import AuditData
from services.projection.facts import REGION_TZ, Buffer, local_day
from services.projection.rebuild import BUILDING, rebuild, upgrade
from services.projection.tables import (
    MODEL,
    Generation,
    active_generation,
    active_model,
    archive,
    ensure_active,
    envelope_of_row,
    generation,
    generations_present,
    meta_table,
    metadata,
    model_digest,
)
from services.projection.timeline import timeline_view
from tests.conftest import fresh_pg_schema, pg_store, take_write_lock

LOC = {"lat": 38.0, "lon": 106.0}
T0 = datetime(2022, 11, 20, 1, 0, tzinfo=UTC)


class BrandNew(Event):
    """A type no catalogue has yet: archived and shown, never a crash."""

    event_type = "BrandNewThing"
    trip_id: str
    note: str


class ForgedLoad(Event):
    """A load report as a forger (or a newer producer without its upcaster) writes it: the
    contract's types not kept."""

    event_type = "FacilityLoadReported"
    facility_id: str
    fever_clinic_occupied: Any
    reported_at: Any
    load_ratio: Any
    overflowing: Any


class ForgedReservation(Event):
    event_type = "VehicleReserved"
    vehicle_id: Any
    transfer_id: Any


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def stores(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[dict[str, EventStore]]:
    async with AsyncExitStack() as stack:
        out: dict[str, EventStore] = {}
        for name in ("dispatch", "transfer", "disinfection", "projection"):
            if request.param == "sqlite":
                store = EventStore.from_url(name, f"sqlite+aiosqlite:///{tmp_path}/{name}.db")
            else:
                schema = await stack.enter_async_context(fresh_pg_schema())
                store = pg_store(name, schema)
            stack.push_async_callback(store.close)
            await store.create_schema(metadata if name == "projection" else None)
            out[name] = store
        yield out


async def put(store: EventStore, stream: str, *events: Event, actor: str = "forger") -> None:
    version = len(await store.read_stream(stream))
    await store.append(stream, version, list(events), Meta(actor=actor, role="system", correlation_id=stream))


def stage(kind: str, minutes: int = 35) -> dict[str, object]:
    end = T0 + timedelta(minutes=minutes)
    return {"stage": kind, "disinfectant": "chlorine", "concentration_mg_per_l": 1000, "method": "wipe",
            "started_at": T0.isoformat(), "ended_at": end.isoformat(), "operator": "王五",
            "location": "洗消间", "video": {"camera_id": "c", "clip_ref": "nvr://x", "from": T0.isoformat(),
                                            "to": end.isoformat()}}


async def forbidden_histories(s: dict[str, EventStore]) -> None:
    d, t, x = s["dispatch"], s["transfer"], s["disinfection"]
    for vid in ("v1", "v2", "v3"):
        await put(d, f"vehicle-{vid}", dsp.VehicleRegistered(
            vehicle_id=vid, plate="宁A", kind="negative_pressure_ambulance", dedicated_pool=True,
            life_support=True, station="s", location=LOC))  # type: ignore[arg-type]
    # R1: two reservations of v1 with no release in between.
    await put(d, "vehicle-v1", dsp.VehicleReserved(vehicle_id="v1", transfer_id="t1"))
    await put(d, "vehicle-v1", dsp.VehicleReserved(vehicle_id="v1", transfer_id="t2"))
    # R2: v2 reserved while awaiting disinfection.
    await put(d, "vehicle-v2", dsp.VehicleReserved(vehicle_id="v2", transfer_id="t3"),
              dsp.VehicleAwaitingDisinfection(vehicle_id="v2", trip_id="trip-a"),
              dsp.VehicleReserved(vehicle_id="v2", transfer_id="t4"))
    # R8: v3 returned to service after a cycle with only the initial stage.
    await put(x, "cycle-c1", dis.CycleOpened(cycle_id="c1", vehicle_id="v3", trip_id="trip-b",
                                             transfer_id="t5", reason="r"),
              dis.InitialDisinfectionLogged(cycle_id="c1", vehicle_id="v3", stage=stage("initial")))
    await put(d, "vehicle-v3", dsp.VehicleAwaitingDisinfection(vehicle_id="v3", trip_id="trip-b"),
              dsp.VehicleReturnedToService(vehicle_id="v3", trip_id="trip-b", cycle_id="c1"))
    # R8 + R9: a cycle released with no stage and no swab; a positive never quarantined.
    await put(x, "cycle-c2", dis.CycleOpened(cycle_id="c2", vehicle_id="v2", trip_id="trip-c",
                                             transfer_id="t6", reason="r"),
              dis.VehicleReleased(cycle_id="c2", vehicle_id="v2", trip_id="trip-c", policy="p"))
    await put(x, "cycle-c3", dis.CycleOpened(cycle_id="c3", vehicle_id="v1", trip_id="trip-d",
                                             transfer_id="t7", reason="r"),
              dis.InitialDisinfectionLogged(cycle_id="c3", vehicle_id="v1", stage=stage("initial", 10)),
              dis.TerminalDisinfectionLogged(cycle_id="c3", vehicle_id="v1", stage=stage("terminal")),
              dis.SurfaceSwabCollected(cycle_id="c3", vehicle_id="v1", sample_id="s3", sites=["a", "b", "c"],
                                       collected_by="x", collected_at=T0.isoformat()),
              dis.SwabResultRecorded(cycle_id="c3", vehicle_id="v1", sample_id="s3", result="positive",
                                     lab="l", reported_at=(T0 + timedelta(hours=9)).isoformat()))
    # R9: v1's exposure list for s3 names t7, not t8, whose trip broke down with its patient
    # aboard (the vehicle carried them part of the way).
    await put(x, "exposure-s3", dis.ExposureListProduced(
        vehicle_id="v1", sample_id="s3", cycle_id="c3", transfer_id="t7", last_negative_sample_id=None,
        bounded_by_sample_id=None, transfers=[dis.ExposedTransfer(
            transfer_id="t7", trip_id="trip-d", cycle_id="c3", relation="swabbed_trip")]))
    await put(t, "trip-f", trn.TripOpened(trip_id="trip-f", transfer_id="t8", vehicle_id="v1",
                                          destination_id=None, origin={}, return_required=False),
              trn.TripStepReported(trip_id="trip-f", step="patient_aboard", client_event_id="f1",
                                   device_at=T0.isoformat(), transfer_id="t8", vehicle_id="v1"),
              trn.TripAborted(trip_id="trip-f", transfer_id="t8", vehicle_id="v1", reason="breakdown"))
    # R4: an urgent transfer waits in the queue while v1 goes to a less urgent one.
    for tid, priority in (("urgent", 1), ("later", 3)):
        await put(d, f"transfer-{tid}", dsp.TransferRequested(
            transfer_id=tid, patient={"name": tid}, risk_category="isolation_site",
            condition={"fever": True}, origin={"kind": "isolation_site"}, purpose="outpatient_visit",
            return_required=False, requested_by={"channel": "console"}),
            dsp.TransferPrioritized(transfer_id=tid, priority=priority, reason="r"))
    await put(d, "transfer-urgent", dsp.TransferQueued(transfer_id="urgent", reason="no vehicle"))
    await put(d, "transfer-later", dsp.VehicleAssigned(
        transfer_id="later", vehicle_id="v1", destination_id=None, origin={}, return_required=False,
        reason="r"))
    # R10: reported at once, but the bureau's system never took it.
    await put(d, "transfer-unheard", dsp.TransferRequested(
        transfer_id="unheard", patient={"name": "unheard"}, risk_category="isolation_site",
        condition={"fever": True}, origin={"kind": "isolation_site"}, purpose="outpatient_visit",
        return_required=True, requested_by={"channel": "console"}),
        dsp.TransferReported(transfer_id="unheard", reported_to="bureau", reported_by="120"))
    await put(d, "report-unheard", dsp.ReportDeliveryFailed(transfer_id="unheard", url="http://bureau",
                                                            attempts=8, error="HTTP 503"))
    # R4 within a priority: a newer transfer given v3 straight away (never queued) while an
    # older one of its priority waits (a second apart: request order has a tolerance).
    for tid in ("older", "newer"):
        await put(d, f"transfer-{tid}", dsp.TransferRequested(
            transfer_id=tid, patient={"name": tid}, risk_category="isolation_site",
            condition={"fever": True}, origin={"kind": "isolation_site"}, purpose="outpatient_visit",
            return_required=False, requested_by={"channel": "console"}),
            dsp.TransferPrioritized(transfer_id=tid, priority=2, reason="r"))
        if tid == "older":
            await put(d, "transfer-older", dsp.TransferQueued(transfer_id="older", reason="no vehicle"))
            await asyncio.sleep(1.2)
    await put(d, "transfer-newer", dsp.VehicleAssigned(
        transfer_id="newer", vehicle_id="v3", destination_id=None, origin={}, return_required=False,
        reason="r"))
    # R7: a backup hospital sent a patient while no hospital it backs up overflowed; the
    # hospital that names it registers after the decision, which the finding must then say.
    await put(d, "facility-b7", dsp.FacilityRegistered(
        facility_id="b7", name="备用医院", roles=["fever_clinic", "backup"], location=LOC,  # type: ignore[arg-type]
        fever_clinic_capacity=10))
    await put(d, "transfer-t7b", dsp.TransferRequested(
        transfer_id="t7b", patient={"name": "t7b"}, risk_category="isolation_site", condition={"fever": True},
        origin={"kind": "isolation_site"}, purpose="outpatient_visit", return_required=False,
        requested_by={"channel": "console"}),
        dsp.DestinationAssigned(transfer_id="t7b", facility_id="b7", reason="r"))
    await put(d, "facility-p7", dsp.FacilityRegistered(
        facility_id="p7", name="一院", roles=["fever_clinic"], location=LOC,  # type: ignore[arg-type]
        fever_clinic_capacity=10, backup_ids=["b7"]), dsp.FacilityLoadReported(
        facility_id="p7", fever_clinic_occupied=5, reported_at=T0.isoformat(), load_ratio=0.5,
        overflowing=False))
    # R12: a trip nobody requested; an unknown event type on it.
    await put(t, "trip-e", trn.TripOpened(trip_id="e", transfer_id="ghost", vehicle_id="v9",
                                          destination_id=None, origin={}, return_required=False),
              BrandNew(trip_id="e", note="from a newer crew app"))


async def run_projection(s: dict[str, EventStore]) -> int:
    """The projection's subscriptions, as the embedded runtime wires them, until caught up."""
    stop = asyncio.Event()
    subs = [Subscription("projection", s["projection"], handlers,
                         StoreTailSource(s[source], s["projection"], "projection", idle_wait=0.05))
            for source, handlers in CONSUMES.items()]
    tasks = [asyncio.create_task(sub.run(stop)) for sub in subs]
    total = sum([await s[n].head() for n in ("dispatch", "transfer", "disinfection")])
    try:
        for _ in range(400):
            async with s["projection"].engine.connect() as conn:
                if await conn.scalar(select(func.count()).select_from(archive)) == total:
                    return total
            await asyncio.sleep(0.05)
        raise AssertionError("the projection did not catch up")
    finally:
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_forbidden_histories_appended_into_stores_are_found(stores: dict[str, EventStore]) -> None:
    await forbidden_histories(stores)
    total = await run_projection(stores)
    async with stores["projection"].engine.connect() as conn:
        # What the live model holds: the findings read model the subscription kept.
        found, _, total_found = await violations.page(conn, generation(1), now=datetime.now(UTC), limit=1000)
        due, _, _ = await violations.page(conn, generation(1), now=datetime.now(UTC) + timedelta(minutes=20),
                                          limit=1000, rule="R10")
        live = await queries.dump(conn, generation(1))
        unknown, _ = await queries.timeline_events(conn, "trip-e", None)
    got = {(f["rule"], f["check"], f["vehicle_id"] or f["transfer_id"]) for f in found}
    assert got >= {
        ("R1", "vehicle_reserved_twice", "v1"), ("R2", "reserved_before_release", "v2"),
        ("R8", "returned_without_terminal", "v3"), ("R8", "released_without_both_stages", "v2"),
        ("R9", "released_without_swab", "v2"), ("R9", "positive_not_quarantined", "v1"),
        ("R8", "stage_below_protocol", "v1"), ("R12", "trip_without_request", "v9"),
        ("R14", "swab_result_overdue", "v1"), ("R4", "priority_inversion", "v1"),
        ("R7", "backup_not_activated", "t7b"), ("R9", "exposure_list_incomplete", "v1"),
    }, got
    # Due at R10's deadline, 15 min after the request (a retry may still get through).
    assert ("report_not_delivered", "unheard") in {(f["check"], f["transfer_id"]) for f in due}, due
    [listed] = [f for f in found if f["check"] == "exposure_list_incomplete"]
    assert listed["transfer_id"] == "t8", listed
    r7 = next(f for f in found if f["check"] == "backup_not_activated")
    assert "p7 (load not reported)" in r7["detail"], r7  # re-evaluated when p7 named it
    assert total_found == len(found)
    assert any(r.type == "BrandNewThing" for r in unknown)
    r1 = next(f for f in found if f["rule"] == "R1")
    assert {e["actor"] for e in r1["evidence"]} == {"forger"}
    r4 = next(f for f in found if f["rule"] == "R4" and f["vehicle_id"] == "v1")
    assert r4["transfer_id"] == "urgent" and "priority 3" in r4["detail"]
    jumped = {(f["check"], f["transfer_id"]) for f in found if f["rule"] == "R4" and f["vehicle_id"] == "v3"}
    assert ("queue_order", "older") in jumped, jumped
    # Custody lists every finding of a vehicle, past the first page of them.
    async with stores["projection"].engine.connect() as conn:
        of_v1 = await violations.of_vehicle(conn, generation(1), "v1", datetime.now(UTC), limit=2)
    assert len(of_v1) > 2 and of_v1 == [f for f in found if f["vehicle_id"] == "v1"], of_v1

    # On PostgreSQL both ways a rebuild evaluates the findings: over the fact rows it wrote
    # (one process), and over its fold in memory (worker processes).
    for workers in ((1,) if stores["projection"].is_sqlite else (1, 2)):
        for order in ("seq", "store"):
            report = await rebuild(stores["projection"], order=order, page=7, workers=workers)
            assert report.events + report.caught_up == total
            async with stores["projection"].engine.connect() as conn:
                assert await queries.dump(conn, generation(report.generation)) == live, (order, workers)


async def test_a_transfer_named_on_an_exposure_list_has_it_in_its_timeline(
        stores: dict[str, EventStore]) -> None:
    """The list is filed under the swabbed trip's transfer; a patient it names who rode
    earlier sees it (and the dispatcher's acknowledgement) among their own notifications,
    whoever else the list named. Ids are matched exactly (SQLite's LIKE ignores case)."""
    d, x = stores["dispatch"], stores["disinfection"]
    for tid in ("rode-before", "rode_before", "Rode-Before"):
        await put(d, f"transfer-{tid}", dsp.TransferRequested(
            transfer_id=tid, patient={"name": tid}, risk_category="isolation_site", condition={"fever": True},
            origin={"kind": "isolation_site", "name": "隔离点"}, purpose="outpatient_visit",
            return_required=True, requested_by={"channel": "console"}))
    await put(x, "exposure-sx", dis.ExposureListProduced(
        vehicle_id="v1", sample_id="sx", cycle_id="cx", transfer_id="swabbed", last_negative_sample_id=None,
        bounded_by_sample_id=None, transfers=[dis.ExposedTransfer(
            transfer_id=t, trip_id=f"trip-{t}", cycle_id="cx", relation="before_swab")
            for t in ("rode-before", "swabbed")]),
        dis.ExposureListAcknowledged(vehicle_id="v1", sample_id="sx", acknowledged_by="dispatcher-1"))
    # Another vehicle's list, whose sample id differs in case only, naming someone else.
    await put(x, "exposure-SX", dis.ExposureListProduced(
        vehicle_id="v2", sample_id="SX", cycle_id="cy", transfer_id="other", last_negative_sample_id=None,
        bounded_by_sample_id=None, transfers=[dis.ExposedTransfer(
            transfer_id="other", trip_id="trip-other", cycle_id="cy", relation="swabbed_trip")]))
    await run_projection(stores)
    async with stores["projection"].engine.connect() as conn:
        gen = await queries.current(conn)
        told, legs = await queries.timeline_events(conn, "rode-before", gen)
        untold, _ = await queries.timeline_events(conn, "rode_before", gen)
        cased, _ = await queries.timeline_events(conn, "Rode-Before", gen)
    view = timeline_view("rode-before", [envelope_of_row(r) for r in told], legs)
    assert [(n["what"], n["state"]) for n in view["notifications"]] == [
        ("exposure list (R9)", "issued"), ("exposure list (R9)", "acknowledged")], view["notifications"]
    # Not named: "_" is no wildcard here (it would match the "-" of the one named).
    assert {r.type for r in untold} == {r.type for r in cased} == {"TransferRequested"}


async def test_the_days_ledger_lists_a_trip_whose_transfer_was_requested_days_before(
        stores: dict[str, EventStore]) -> None:
    """R12: every outgoing trip is in the ledger of its day. A transfer requested on the
    20th whose trip went out on the 23rd (it waited; a takeover): the ledger of the 23rd
    lists it (it loaded only transfers requested up to two days before)."""
    d, t = stores["dispatch"], stores["transfer"]
    meta = Meta(actor="dispatcher-1", role="dispatcher", correlation_id="late")
    requested = dsp.TransferRequested(
        transfer_id="late", patient={"name": "迟"}, risk_category="isolation_site", condition={"fever": True},
        origin={"kind": "isolation_site", "name": "隔离点"}, purpose="outpatient_visit", return_required=True,
        requested_by={"channel": "console"})
    await d.commit(Commit(meta=meta, appends=[StreamAppend("transfer-late", 0, [NewEvent(requested, T0)])]))
    went = T0 + timedelta(days=3)
    await t.commit(Commit(meta=meta, appends=[StreamAppend("trip-late", 0, [NewEvent(trn.TripOpened(
        trip_id="trip-late", transfer_id="late", vehicle_id="v1", destination_id="f", origin={},
        return_required=True), went)])]))
    await run_projection(stores)
    day = local_day(went.isoformat())
    after = (went + timedelta(days=1)).astimezone(REGION_TZ).date().isoformat()
    async with stores["projection"].engine.connect() as conn:
        scoped = await queries.load(conn, day_from=day, day_to=after, trips_too=True, tables=ledger.READS)
        requested_only = await queries.load(conn, day_from=day, day_to=after, tables=ledger.READS)
    assert [(r["trip_id"], r["day"]) for r in ledger.rows(scoped, day, after)] == [("trip-late", day)]
    assert ledger.rows(requested_only, day, after) == []


async def test_payloads_whose_values_their_columns_cannot_hold_stall_nothing(
        stores: dict[str, EventStore]) -> None:
    """Values of the wrong kind (a ratio in words, a time as a number, an object for an id)
    and ids longer than any column of the producers': on PostgreSQL each would fail the
    projection's write, and the subscription would retry it forever. Each is archived; the
    fact tables skip what they cannot hold and keep what they can; a rebuild agrees."""
    d = stores["dispatch"]
    long_id = "v" * 300
    await put(d, "facility-f", ForgedLoad(facility_id="f", fever_clinic_occupied="many", reported_at=12345,
                                          load_ratio="high", overflowing="yes"))
    await put(d, "vehicle-long", ForgedReservation(vehicle_id=long_id, transfer_id="t1"),
              ForgedReservation(vehicle_id={"id": "v1"}, transfer_id=["t2"]))
    await put(d, "transfer-t1", dsp.TransferPrioritized(transfer_id="t1", priority=1, reason="r"))
    total = await run_projection(stores)  # fails unless every event is archived
    async with stores["projection"].engine.connect() as conn:
        live = await queries.dump(conn, generation(1))
        linked = (await conn.execute(select(archive.c.vehicle_id).where(archive.c.stream_id == "vehicle-long")
                                     .order_by(archive.c.seq))).scalars().all()
    assert [r[0] for r in live["vehicle_log"]] and {r[1] for r in live["vehicle_log"]} == {long_id}
    assert live["facility_loads"] == [] and [r[0] for r in live["transfers"]] == ["t1"]
    assert linked == [None, None]  # no timeline link from an id no column of ours holds
    for workers in ((1,) if stores["projection"].is_sqlite else (1, 2)):
        report = await rebuild(stores["projection"], workers=workers)
        assert report.events == total
        async with stores["projection"].engine.connect() as conn:
            assert await queries.dump(conn, generation(report.generation)) == live


@pytest.mark.postgres
async def test_a_check_that_trips_over_one_vehicle_costs_only_its_findings_in_a_rebuild(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Live, a check that fails on one vehicle's rows is reported for that vehicle alone.
    A rebuild evaluating its fold in memory sees it fail over every vehicle at once: it
    evaluates that scope again from the tables, key by key, and comes out as live did."""
    def odd(data: AuditData) -> list[findings.Finding]:
        if "v2" in data.vehicles:
            raise ValueError("odd data for v2")
        return []

    spec = findings.CheckSpec("R1", "odd_for_v2", "fails on v2", frozenset({"VehicleRegistered"}), odd,
                              findings.VEHICLE)
    monkeypatch.setattr(findings, "ALL_CHECKS", (*findings.ALL_CHECKS, spec))
    async with AsyncExitStack() as stack:
        stores: dict[str, EventStore] = {}
        for name in ("dispatch", "transfer", "disinfection", "projection"):
            store = pg_store(name, await stack.enter_async_context(fresh_pg_schema()))
            stack.push_async_callback(store.close)
            await store.create_schema(metadata if name == "projection" else None)
            stores[name] = store
        await forbidden_histories(stores)
        await run_projection(stores)
        async with stores["projection"].engine.connect() as conn:
            live = await queries.dump(conn, generation(1))
        assert [(r[0], r[1]) for r in live["check_failures"]] == [("vehicle:v2", "odd_for_v2")]
        report = await rebuild(stores["projection"], workers=2)
        async with stores["projection"].engine.connect() as conn:
            assert await queries.dump(conn, generation(report.generation)) == live


async def test_rebuild_while_events_keep_arriving_misses_nothing(stores: dict[str, EventStore]) -> None:
    """Build beside while the live subscription keeps archiving: after the switch the new
    generation (which then takes the live events) equals a rebuild made at rest."""
    proj = stores["projection"]
    stop = asyncio.Event()
    subs = [Subscription("projection", proj, handlers,
                         StoreTailSource(stores[source], proj, "projection", idle_wait=0.02))
            for source, handlers in CONSUMES.items()]
    tasks = [asyncio.create_task(sub.run(stop)) for sub in subs]

    async def traffic(first: int, n: int) -> None:
        for i in range(first, first + n):
            await put(stores["dispatch"], f"vehicle-w{i}", dsp.VehicleRegistered(
                vehicle_id=f"w{i}", plate="宁A", kind="dedicated_vehicle", dedicated_pool=True,
                life_support=False, station="s", location=LOC),  # type: ignore[arg-type]
                dsp.VehicleReserved(vehicle_id=f"w{i}", transfer_id=f"x{i}"))
            await put(stores["transfer"], f"trip-w{i}", trn.TripOpened(
                trip_id=f"w{i}", transfer_id=f"x{i}", vehicle_id=f"w{i}", destination_id=None, origin={},
                return_required=False))

    try:
        await traffic(0, 40)
        writer = asyncio.create_task(traffic(40, 60))
        reports = []
        while not writer.done():
            reports.append(await rebuild(proj, order="seq", page=13))
        await writer
        total = sum([await stores[n].head() for n in ("dispatch", "transfer", "disinfection")])
        for _ in range(400):
            async with proj.engine.connect() as conn:
                if await conn.scalar(select(func.count()).select_from(archive)) == total:
                    break
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    assert reports  # at least one rebuild switched while traffic ran
    async with proj.engine.connect() as conn:
        live_gen = await queries.current(conn)
        assert live_gen is not None and live_gen.number == reports[-1].generation
        live = await queries.dump(conn, live_gen)
    assert len(live["trips"]) == 100
    report = await rebuild(proj, order="store")
    async with proj.engine.connect() as conn:
        assert await queries.dump(conn, generation(report.generation)) == live


async def test_read_models_built_by_older_code_are_rebuilt_at_start(stores: dict[str, EventStore]) -> None:
    """A projection database whose active generation predates this code's tables (no
    schema digest, or another one) is rebuilt at start; a current one is left alone."""
    await forbidden_histories(stores)
    await run_projection(stores)
    proj = stores["projection"]
    async with proj.engine.begin() as conn:
        before = await queries.dump(conn, generation(1))
        await conn.execute(meta_table.delete().where(meta_table.c.name == MODEL))
    await upgrade(proj, asyncio.Event())
    async with proj.engine.connect() as conn:
        assert await active_generation(conn) == 2
        assert await active_model(conn) == model_digest()
        assert await queries.dump(conn, generation(2)) == before
    await upgrade(proj, asyncio.Event())
    async with proj.engine.connect() as conn:
        assert await active_generation(conn) == 2
    # Built by code with fewer checks: the same tables, but R7's backup check had never run
    # on the history. The upgrade evaluates it on every event, not only on later ones.
    findings_table = generation(2)["findings"]
    async with proj.engine.begin() as conn:
        await conn.execute(findings_table.delete().where(findings_table.c.check == "backup_not_activated"))
        await conn.execute(meta_table.update().where(meta_table.c.name == MODEL).values(value="older code"))
    await upgrade(proj, asyncio.Event())
    async with proj.engine.connect() as conn:
        assert await active_generation(conn) == 3 and await active_model(conn) == model_digest()
        assert await queries.dump(conn, generation(3)) == before


async def test_a_rebuild_cancelled_inside_a_write_ends_it_then_cleans_up(
        stores: dict[str, EventStore], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A shutdown (or a cancelled request) while the rebuild writes: the write ends, then the
    half-built generation and the marker are dropped, and the caller is told it was
    cancelled. Cancelled inside the transaction, the SQLite file stayed write-locked (the
    live path and the cleanup waited 30 s on it and failed) and the marker blocked every
    rebuild for an hour."""
    await forbidden_histories(stores)
    await run_projection(stores)
    proj = stores["projection"]
    async with proj.engine.connect() as conn:
        before = await queries.dump(conn, generation(1))
    real, inside = rebuild_module.bulk_insert, asyncio.Event()

    async def slow(conn: AsyncConnection, gen: Generation, buffer: Buffer) -> None:
        await real(conn, gen, buffer)
        if "trips" in buffer.rows:
            inside.set()  # its rows written, its transaction still open, a statement running
            await conn.execute(text("SELECT pg_sleep(0.5)") if conn.dialect.name == "postgresql" else text(
                "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 3000000) "
                "SELECT count(*) FROM c"))

    monkeypatch.setattr(rebuild_module, "bulk_insert", slow)
    task = asyncio.create_task(rebuild(proj))
    await asyncio.wait_for(inside.wait(), 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 30)
    if proj.is_sqlite:
        take_write_lock(tmp_path / "projection.db", timeout=1)  # "database is locked" if one was left
    async with proj.engine.connect() as conn:
        assert await active_generation(conn) == 1 and await generations_present(conn) == [1]
        assert await conn.scalar(select(meta_table.c.value).where(meta_table.c.name == BUILDING)) is None
    monkeypatch.setattr(rebuild_module, "bulk_insert", real)
    report = await asyncio.wait_for(rebuild(proj), 60)  # not refused: no marker left behind
    async with proj.engine.connect() as conn:
        assert await queries.dump(conn, generation(report.generation)) == before


async def test_a_rebuild_of_an_empty_archive_equals_the_live_read_models(
        stores: dict[str, EventStore]) -> None:
    """Nothing archived yet (a fresh install, the invariant checker's first run): the rebuilt
    generation is as empty as the live one. The rebuild kept an R4 queue fold that had folded
    nothing, which the live path never writes, and the checker called the two different."""
    proj = stores["projection"]
    async with proj.engine.begin() as conn:
        live = await queries.dump(conn, await ensure_active(conn))
    report = await rebuild(proj)
    async with proj.engine.connect() as conn:
        assert await queries.dump(conn, generation(report.generation)) == live
        assert not any(live.values())


async def test_two_replicas_upgrading_at_once_both_end_on_one_rebuild(
        stores: dict[str, EventStore], monkeypatch: pytest.MonkeyPatch) -> None:
    """Every replica upgrades at start. Forced, each dropped the generation the other was
    building, again and again (a deploy could stay on the old read models for good); now
    the second waits for the first's marker, sees the switch to this code's model and ends."""
    await forbidden_histories(stores)
    await run_projection(stores)
    proj = stores["projection"]
    async with proj.engine.begin() as conn:
        await conn.execute(meta_table.update().where(meta_table.c.name == MODEL).values(value="older code"))
    real = rebuild_module.largest_first

    async def slow(conn: AsyncConnection, tables: list[Any]) -> list[Any]:
        await asyncio.sleep(1)  # as a large archive's fold would take
        return await real(conn, tables)

    monkeypatch.setattr(rebuild_module, "largest_first", slow)
    stop = asyncio.Event()
    await asyncio.wait_for(asyncio.gather(upgrade(proj, stop), upgrade(proj, stop)), 60)
    async with proj.engine.connect() as conn:
        assert await active_generation(conn) == 2 and await active_model(conn) == model_digest()
        assert await conn.scalar(select(meta_table.c.value).where(meta_table.c.name == BUILDING)) is None


async def test_a_rebuild_that_fails_midway_leaves_the_live_generation_alone(
        stores: dict[str, EventStore], monkeypatch: pytest.MonkeyPatch) -> None:
    """The trips' write fails (a full disk, say) while other tables are written beside it:
    the error comes out as it was, the half-built generation is dropped, the live one
    serves on unchanged, and the next rebuild goes through."""
    await forbidden_histories(stores)
    await run_projection(stores)
    proj = stores["projection"]
    async with proj.engine.connect() as conn:
        before = await queries.dump(conn, generation(1))
    real = rebuild_module.bulk_insert

    async def disk_full(conn: AsyncConnection, gen: Generation, buffer: Buffer) -> None:
        if "trips" in buffer.rows:
            raise OSError(28, "No space left on device")
        await real(conn, gen, buffer)

    monkeypatch.setattr(rebuild_module, "bulk_insert", disk_full)
    with pytest.raises(OSError, match="No space left"):
        await rebuild(proj)
    async with proj.engine.connect() as conn:
        assert await active_generation(conn) == 1
        assert await generations_present(conn) == [1]
        assert await conn.scalar(select(meta_table.c.value).where(meta_table.c.name == BUILDING)) is None
        assert await queries.dump(conn, generation(1)) == before
    monkeypatch.setattr(rebuild_module, "bulk_insert", real)
    report = await rebuild(proj)
    async with proj.engine.connect() as conn:
        assert await queries.dump(conn, generation(report.generation)) == before


@pytest.mark.postgres
async def test_a_failed_write_beside_others_lets_them_finish_and_leaves_the_pool_usable() -> None:
    """A rebuild's writes run side by side; when one fails, the one running beside it is
    let finish, not cancelled: cancelled midway, its connection could go back to the pool
    in a state the next user waited on forever (the test above hung so in CI, at its
    first query after the failed rebuild). Then the first failure comes out as it was."""
    async with fresh_pg_schema() as schema:
        store = pg_store("projection", schema)
        finished: list[str] = []
        try:
            async def slow(conn: AsyncConnection) -> None:
                await conn.execute(text("SELECT pg_sleep(0.5)"))
                finished.append("slow")

            async def disk_full(conn: AsyncConnection) -> None:
                await asyncio.sleep(0.1)  # the other lane is in its statement by now
                raise OSError(28, "No space left on device")

            async def never(conn: AsyncConnection) -> None:
                finished.append("never")

            with pytest.raises(OSError, match="No space left"):
                await rebuild_module.side_by_side(store, 2, [slow, disk_full, never])
            assert finished == ["slow"]  # let finish; the job queued after the failure not begun

            async def usable() -> None:
                async with store.engine.connect() as conn:
                    assert await conn.scalar(text("SELECT 1")) == 1
                    await asyncio.sleep(0.05)  # hold it, so the others check out other connections

            async with asyncio.timeout(20):
                await asyncio.gather(*(usable() for _ in range(4)))
        finally:
            await store.close()


@pytest.mark.postgres
async def test_rebuilt_tables_keep_their_json_proofs_lz4_compressed() -> None:
    """The facts' JSON columns are written with LZ4 (a trip's row passes PostgreSQL's 2 kB
    TOAST threshold; pglz made a third of a rebuild's keyed-row writes), in the
    generation a fresh database starts with and in every rebuilt one."""
    async with fresh_pg_schema() as schema:
        proj = pg_store("projection", schema)
        try:
            await proj.create_schema(metadata)
            report = await rebuild(proj, workers=2)
            async with proj.engine.connect() as conn:
                for number in (1, report.generation):
                    methods = dict((await conn.execute(text(
                        "SELECT a.attname, CAST(a.attcompression AS text) FROM pg_attribute a "
                        "WHERE a.attrelid = to_regclass(:t) AND a.attnum > 0"),
                        {"t": generation(number)["trips"].name})).all())
                    assert methods["opened"] == "l" and methods["completed"] == "l", methods
                    assert methods["trip_id"] == "", methods  # keys stay as they were
        finally:
            await proj.close()


async def test_reads_in_clear_are_merged_from_both_sources_and_paged_in_the_database(
        stores: dict[str, EventStore]) -> None:
    """Dispatch's records of reads in clear (archived here) and the projection's own (its
    store): one list, newest first, filtered by actor, paged by the database however far
    the offset."""
    def read(route: str) -> PatientDataDisclosed:
        return PatientDataDisclosed(route=route, patients=[{"name": "张三", "transfer_id": "t1"}])

    for n in range(3):
        await put(stores["dispatch"], f"disclosure-d{n}", read(f"/transfers/t{n}"), actor="dispatcher-a")
        await put(stores["projection"], f"disclosure-p{n}", read(f"/audit/p{n}"), actor="auditor-b")
    await put(stores["dispatch"], "disclosure-other", read("/transfers/x"), actor="dispatcher-c")
    await run_projection(stores)
    async with stores["projection"].engine.connect() as conn:
        every = await queries.disclosures(conn, None, 100, 0)
        assert [d["at"] for d in every] == sorted((d["at"] for d in every), reverse=True)
        assert len(every) == 7 and {d["store"] for d in every} == {"dispatch", "projection"}
        assert [d["route"] for d in every[:1]] == ["/transfers/x"]  # the last one written
        assert await queries.disclosures(conn, None, 2, 3) == every[3:5]
        mine = await queries.disclosures(conn, "auditor-b", 10, 1)
        assert [d["route"] for d in mine] == ["/audit/p1", "/audit/p0"]
        assert await queries.disclosures(conn, None, 1, 2**62) == []
    # By cursor: a read recorded between two pages (the newest, first) shifts an offset's
    # next page back by one, and it repeated an entry; after the cursor it does not.
    async with stores["projection"].engine.connect() as conn:
        first = await queries.disclosures(conn, None, 3, 0)
    await put(stores["projection"], "disclosure-late", read("/audit/late"), actor="auditor-b")
    await run_projection(stores)
    async with stores["projection"].engine.connect() as conn:
        after = queries.DISCLOSURES.parse(queries.DISCLOSURES.cursor(first[-1]["at"], first[-1]["event_id"]))
        rest = await queries.disclosures(conn, None, 100, 0, after)
        assert first + rest == every, [d["route"] for d in first + rest]
        shifted = await queries.disclosures(conn, None, 3, 3)
        assert shifted[0] == first[-1]  # what an offset does: the reason for the cursor


async def test_verify_names_the_first_broken_link_of_the_copy_whichever_check_finds_it(
        stores: dict[str, EventStore]) -> None:
    """A row's links edited (its transfer key: the event vanishes from its timeline) at
    position 2, and its actor at position 9, whose hash then fails: the first broken link is
    position 2. The hash check's break was reported and the edited links before it passed."""
    for n in range(10):
        await put(stores["dispatch"], f"transfer-t{n}",
                  dsp.TransferCancelled(transfer_id=f"t{n}", reason="r"))
    await run_projection(stores)
    async with stores["projection"].engine.begin() as conn:
        await conn.execute(text("UPDATE audit_archive SET transfer_key = 'nothing' "
                                "WHERE store = 'dispatch' AND position = 2"))
        await conn.execute(text("UPDATE audit_archive SET actor = 'someone else' "
                                "WHERE store = 'dispatch' AND position = 9"))
    async with stores["projection"].engine.connect() as conn:
        good, _, broken = await queries.verify_copy(conn, "dispatch")
    assert broken is not None and (good, broken.position) == (1, 2), (good, broken)
    assert "links" in broken.reason
