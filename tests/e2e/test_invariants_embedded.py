"""The invariant checker against corrupted copies of a real history (the R2 scenario, on the
embedded default): an event that breaks R1 forged straight into a store, a consumer's
tracking row deleted, a stored payload edited, a read-model row dropped. Each time the
checker names that breach, and nothing else."""

from __future__ import annotations

import asyncio
import shutil
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import pytest

from libs.events.catalog import dispatch as dsp
from libs.events.store import EventStore, Meta
from services.invariants import check
from services.runtime import create_app
from services.settings import Settings
from tests import scenarios
from tests.actors import Acting
from tests.e2e.invariants import OFFLINE_CORRUPTIONS, embedded_invariants_hold, failed, sql

VEHICLE = "nx-120-07"  # assigned to the second transfer when the scenario ends


async def _scenario(data_dir: Path) -> None:
    app = create_app(settings=(settings := Settings(mode="embedded", data_dir=data_dir)))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://embedded",
                                     auth=Acting.for_settings(settings)) as c:
            await scenarios.r2_not_assignable_before_release(c)
        await embedded_invariants_hold(data_dir)  # the history as the system wrote it passes


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data_dir = tmp_path_factory.mktemp("pristine")
    asyncio.run(_scenario(data_dir))
    return data_dir


@pytest.fixture
def copy(pristine: Path, tmp_path: Path) -> Settings:
    return Settings(mode="embedded", data_dir=Path(shutil.copytree(pristine, tmp_path / "copy")))


async def test_a_forged_event_that_breaks_r1_is_named(copy: Settings) -> None:
    dispatch = EventStore.from_url("dispatch", copy.store_url("dispatch"))
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
    app = create_app(settings=copy)
    async with app.router.lifespan_context(app):
        report = await check(copy, settle_s=30)
    assert failed(report) == {"rules.vehicle_reserved_twice"}, report.summary()
    [item] = report.check("rules.vehicle_reserved_twice").items
    assert item.rule == "R1" and item.context["vehicle_id"] == VEHICLE
    held, breach = item.events
    assert breach.event_id == str(forged.event_id) and breach.stream_version == forged.stream_version
    assert held.type == "VehicleReserved" and held.event_id != breach.event_id


@pytest.mark.parametrize("corrupted", OFFLINE_CORRUPTIONS, ids=lambda f: f.__name__)
async def test_a_corruption_is_named(copy: Settings,
                                     corrupted: Callable[[Settings], Awaitable[None]]) -> None:
    await corrupted(copy)


async def test_the_command_line_exits_0_without_a_breach_and_1_with_one(copy: Settings) -> None:
    async def cli() -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.invariants", "--mode", "embedded",
            "--data-dir", str(copy.data_dir), "--settle", "1",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        out, _ = await proc.communicate()
        return proc.returncode or 0, out.decode()

    code, out = await cli()
    assert code == 0 and "ALL OK" in out, out
    await sql(copy, "projection", "DELETE FROM tracking WHERE consumer = 'projection'")
    code, out = await cli()
    assert code == 1 and "FAIL projection" in out, out
