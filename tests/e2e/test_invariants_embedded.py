"""The invariant checker against corrupted copies of a real history (the R2 scenario, on the
embedded default): an event that breaks R1 forged straight into a store, a consumer's
tracking row deleted, a stored payload edited, a read-model row dropped. Each time the
checker names that breach, and nothing else."""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
import sys
from pathlib import Path

import httpx
import pytest

from libs.events.catalog import dispatch as dsp
from libs.events.store import EventStore, Meta
from services.invariants import Report, check
from services.runtime import create_app
from services.settings import Settings
from tests import scenarios
from tests.e2e.invariants import embedded_invariants_hold

VEHICLE = "nx-120-07"  # assigned to the second transfer when the scenario ends


async def _scenario(data_dir: Path) -> None:
    app = create_app(settings=Settings(mode="embedded", data_dir=data_dir))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://embedded") as c:
            await scenarios.r2_not_assignable_before_release(c)
        await embedded_invariants_hold(data_dir)  # the history as the system wrote it passes


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data_dir = tmp_path_factory.mktemp("pristine")
    asyncio.run(_scenario(data_dir))
    return data_dir


@pytest.fixture
def copy(pristine: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "copy"))


def sql(db: Path, statement: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    with sqlite3.connect(db) as conn:
        return list(conn.execute(statement, params))


async def check_copy(data_dir: Path) -> Report:
    # Nothing runs on the copy: no consumer will catch up, so do not wait for one.
    return await check(Settings(mode="embedded", data_dir=data_dir), settle_s=1)


def failed(report: Report) -> set[str]:
    return {c.name for c in report.failed()}


async def test_a_forged_event_that_breaks_r1_is_named(copy: Path) -> None:
    dispatch = EventStore.from_url("dispatch", f"sqlite+aiosqlite:///{copy}/dispatch.db")
    try:
        stream = await dispatch.read_stream(f"vehicle-{VEHICLE}")
        [forged] = await dispatch.append(
            f"vehicle-{VEHICLE}", stream[-1].stream_version,
            [dsp.VehicleReserved(vehicle_id=VEHICLE, transfer_id="forged-transfer")],
            Meta(actor="forger", role="dispatcher", correlation_id="forged"))
    finally:
        await dispatch.close()
    # The system runs on the copy again, so the forged event is delivered like any other:
    # what remains is the breach itself.
    app = create_app(settings=Settings(mode="embedded", data_dir=copy))
    async with app.router.lifespan_context(app):
        report = await check(Settings(mode="embedded", data_dir=copy), settle_s=30)
    assert failed(report) == {"rules.vehicle_reserved_twice"}, report.summary()
    [item] = report.check("rules.vehicle_reserved_twice").items
    assert item.rule == "R1" and item.context["vehicle_id"] == VEHICLE
    held, breach = item.events
    assert breach.event_id == str(forged.event_id) and breach.stream_version == forged.stream_version
    assert held.type == "VehicleReserved" and held.event_id != breach.event_id


async def test_a_deleted_tracking_row_is_named(copy: Path) -> None:
    [(event_id, stream_id, version)] = sql(copy / "transfer.db", "SELECT event_id, stream_id, stream_version "
                                           "FROM events WHERE type = 'TripCompleted'")
    sql(copy / "disinfection.db", "DELETE FROM tracking WHERE consumer = 'disinfection' AND event_id = ?",
        (event_id,))
    report = await check_copy(copy)
    assert failed(report) == {"delivery.disinfection"}, report.summary()
    delivery = report.check("delivery.disinfection")
    assert delivery.counts["expected:transfer"] == delivery.counts["delivered:transfer"] + 1
    [item] = delivery.items
    assert item.code == "not_delivered"
    assert [(e.event_id, e.stream_id, e.stream_version) for e in item.events] == \
        [(event_id, stream_id, version)]


async def test_an_edited_payload_is_named(copy: Path) -> None:
    [(position, payload)] = sql(copy / "transfer.db", "SELECT position, payload FROM events WHERE type = "
                                "'TripStepReported' AND payload LIKE '%\"en_route\"%'")
    edited = json.loads(str(payload)) | {"device_at": "2022-11-20T08:00:00+08:00"}
    sql(copy / "transfer.db", "UPDATE events SET payload = ? WHERE position = ?",
        (json.dumps(edited, sort_keys=True, ensure_ascii=False), position))
    report = await check_copy(copy)
    assert failed(report) == {"chains.store:transfer"}, report.summary()
    [item] = report.check("chains.store:transfer").items
    assert item.context["position"] == position and "edited" in item.detail


async def test_a_dropped_read_model_row_is_named(copy: Path) -> None:
    active = "SELECT value FROM audit_meta WHERE name = 'active_generation'"
    [(generation,)] = sql(copy / "projection.db", active)
    trip_id = sql(copy / "projection.db", f"SELECT trip_id FROM g{generation}_trips ORDER BY trip_id")[0][0]
    sql(copy / "projection.db", f"DELETE FROM g{generation}_trips WHERE trip_id = ?", (trip_id,))
    report = await check_copy(copy)
    assert failed(report) == {"read_models.rebuild"}, report.summary()
    [item] = report.check("read_models.rebuild").items
    assert item.context == {"table": "trips", "key": [trip_id]} and "only in the rebuild" in item.detail
    # The comparison changed nothing: the live generation still lacks the row, none was added.
    assert sql(copy / "projection.db", active) == [(generation,)]
    assert not sql(copy / "projection.db", f"SELECT 1 FROM g{generation}_trips WHERE trip_id = ?", (trip_id,))


async def test_the_command_line_exits_0_without_a_breach_and_1_with_one(copy: Path) -> None:
    async def cli(data_dir: Path) -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.invariants", "--mode", "embedded", "--data-dir", str(data_dir),
            "--settle", "1", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        out, _ = await proc.communicate()
        return proc.returncode or 0, out.decode()

    code, out = await cli(copy)
    assert code == 0 and "ALL OK" in out, out
    sql(copy / "projection.db", "DELETE FROM tracking WHERE consumer = 'projection'")
    code, out = await cli(copy)
    assert code == 1 and "FAIL projection" in out, out
