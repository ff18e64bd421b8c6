"""The invariant checker (services/invariants) at the end of an end-to-end test, while the
services still run: it waits for every consumer to catch up, then every check must pass."""

from __future__ import annotations

from pathlib import Path

from services.invariants import Report, check
from services.settings import Settings


async def invariants_hold(settings: Settings, settle_s: float = 60.0) -> Report:
    report = await check(settings, settle_s=settle_s)
    assert report.settled, report.summary()
    assert report.ok, report.summary()
    return report


async def embedded_invariants_hold(data_dir: Path) -> Report:
    return await invariants_hold(Settings(mode="embedded", data_dir=data_dir))
