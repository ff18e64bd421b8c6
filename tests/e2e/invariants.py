"""The invariant checker (services/invariants) in the end-to-end tests: at the end of a
test, while the services still run (it waits for every consumer to catch up, then every
check must pass); and against copies of a history corrupted on purpose, on either backend,
where it must name the breach and nothing else."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sqlalchemy import text

from services.invariants import Report, check, open_stores
from services.settings import Settings


async def invariants_hold(settings: Settings, settle_s: float = 60.0) -> Report:
    report = await check(settings, settle_s=settle_s)
    assert report.settled, report.summary()
    assert report.ok, report.summary()
    return report


async def embedded_invariants_hold(data_dir: Path) -> Report:
    return await invariants_hold(Settings(mode="embedded", data_dir=data_dir))


# -- corrupted copies ---------------------------------------------------------------------


async def sql(settings: Settings, store: str, statement: str, **params: Any) -> list[Any]:
    """One statement in one service's store, committed."""
    [opened] = open_stores(settings, (store,)).values()
    try:
        async with opened.engine.begin() as conn:
            result = await conn.execute(text(statement), params)
            return list(result) if result.returns_rows else []
    finally:
        await opened.close()


async def check_copy(settings: Settings) -> Report:
    # Nothing runs on a copy: no consumer will catch up, so do not wait for one.
    return await check(settings, settle_s=1)


def failed(report: Report) -> set[str]:
    return {c.name for c in report.failed()}


async def a_deleted_tracking_row_is_named(settings: Settings) -> None:
    [(event_id, stream_id, version)] = await sql(settings, "transfer", "SELECT event_id, stream_id, "
                                                 "stream_version FROM events WHERE type = 'TripCompleted'")
    await sql(settings, "disinfection", "DELETE FROM tracking WHERE consumer = 'disinfection' "
              "AND event_id = :e", e=event_id)
    report = await check_copy(settings)
    assert failed(report) == {"delivery.disinfection"}, report.summary()
    delivery = report.check("delivery.disinfection")
    assert delivery.counts["expected:transfer"] == delivery.counts["delivered:transfer"] + 1
    [item] = delivery.items
    assert item.code == "not_delivered"
    assert [(e.event_id, e.stream_id, e.stream_version) for e in item.events] == \
        [(event_id, stream_id, version)]


async def an_edited_payload_is_named(settings: Settings) -> None:
    [(position, payload)] = await sql(settings, "transfer", "SELECT position, payload FROM events WHERE "
                                      "type = 'TripStepReported' AND payload LIKE '%\"en_route\"%'")
    edited = json.loads(payload) | {"device_at": "2022-11-20T08:00:00+08:00"}
    await sql(settings, "transfer", "UPDATE events SET payload = :p WHERE position = :n",
              p=json.dumps(edited, sort_keys=True, ensure_ascii=False), n=position)
    report = await check_copy(settings)
    assert failed(report) == {"chains.store:transfer"}, report.summary()
    [item] = report.check("chains.store:transfer").items
    assert item.context["position"] == position and "edited" in item.detail


async def a_dropped_read_model_row_is_named(settings: Settings) -> None:
    active = "SELECT value FROM audit_meta WHERE name = 'active_generation'"
    [(generation,)] = await sql(settings, "projection", active)
    trips = f"g{int(generation)}_trips"
    trip_id = (await sql(settings, "projection", f"SELECT trip_id FROM {trips} ORDER BY trip_id"))[0][0]
    await sql(settings, "projection", f"DELETE FROM {trips} WHERE trip_id = :t", t=trip_id)
    report = await check_copy(settings)
    assert failed(report) == {"read_models.rebuild"}, report.summary()
    [item] = report.check("read_models.rebuild").items
    assert item.context == {"table": "trips", "key": [trip_id]} and "only in the rebuild" in item.detail
    # The comparison changed nothing: the same generation serves, still without the row.
    assert await sql(settings, "projection", active) == [(generation,)]
    assert not await sql(settings, "projection", f"SELECT 1 FROM {trips} WHERE trip_id = :t", t=trip_id)


async def a_forged_finding_is_named(settings: Settings) -> None:
    """The findings are a read model too: one the history does not support is named."""
    [(generation,)] = await sql(settings, "projection", "SELECT value FROM audit_meta "
                                "WHERE name = 'active_generation'")
    findings = f"g{int(generation)}_findings"
    await sql(settings, "projection", f"INSERT INTO {findings} (id, scope, rule, \"check\", kind, at_key, "
              "vehicle_id, body) VALUES ('f0f0f0f0f0f0f0f0', 'vehicle:forged', 'R2', "
              "'trip_before_release', 'violation', '2022-11-20T00:00:00.000000Z', 'forged', '{}')")
    report = await check_copy(settings)
    assert failed(report) == {"read_models.rebuild"}, report.summary()
    [item] = report.check("read_models.rebuild").items
    assert item.context == {"table": "findings", "key": ["f0f0f0f0f0f0f0f0"]}
    assert "only in the live read model" in item.detail


OFFLINE_CORRUPTIONS = (a_deleted_tracking_row_is_named, an_edited_payload_is_named,
                       a_dropped_read_model_row_is_named, a_forged_finding_is_named)
