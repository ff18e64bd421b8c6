"""Issue 8, bad input by hand: oversize bodies, wrong media types, names in every corner of
Unicode, times out of any trip's reach, NUL in the URL. Each scenario takes a client and
runs unchanged on the embedded app and (the ones where PostgreSQL could answer differently
from SQLite) on the distributed processes. Refused input is a problem+json 4xx naming the
field, never a 5xx, and writes nothing; accepted input reads back exactly as sent."""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.runtime import create_app
from services.settings import Settings
from tests.actors import Acting, access_rules, as_
from tests.e2e.cluster import running_cluster
from tests.scenarios import (
    API,
    FACILITIES,
    INITIAL,
    TRANSFER,
    eventually,
    load_reference_data,
    ok,
    open_cycle,
    trip_of,
)
from tests.scenarios_trip import steps

Scenario = Callable[[httpx.AsyncClient], Awaitable[None]]
WRITES = sorted(k.split(" ", 1)[1] for k in access_rules() if k.startswith("POST "))
LIMIT = 256 * 1024  # Settings.max_body_bytes


def problem(resp: httpx.Response, status: int, field: str | None = None) -> dict[str, Any]:
    where = f"{resp.request.method} {resp.request.url.path}: {resp.status_code} {resp.text[:300]}"
    assert resp.status_code == status, where
    assert resp.headers["content-type"] == "application/problem+json", where
    body: dict[str, Any] = resp.json()
    assert body["status"] == status and body["code"] and body["message_zh"], where
    if field is not None:
        assert body["field"] == field, where
    return body


def concrete(path: str) -> str:
    return API + re.sub(r"\{\w+\}", "x", path)


def with_name(name_json: str) -> bytes:
    """A transfer whose patient's name is `name_json`, a raw JSON string literal (so lone
    surrogates can be written as the escapes a client would send)."""
    body = json.dumps({**TRANSFER, "patient": {"name": "@NAME@"}}, ensure_ascii=False)
    return body.replace('"@NAME@"', name_json).encode()


async def reference_data(c: httpx.AsyncClient) -> None:
    """Once per app: the distributed subset shares one cluster."""
    if not ok(await c.get(f"{API}/vehicles")):
        await load_reference_data(c)


async def counts(c: httpx.AsyncClient) -> tuple[int, int]:
    """What a refused write must not have changed: transfers, and facilities."""
    return (len(ok(await c.get(f"{API}/transfers", params={"limit": 500}))),
            len(ok(await c.get(f"{API}/facilities"))))


async def oversize_bodies(c: httpx.AsyncClient) -> None:
    """413 on every write route, declared (Content-Length) or streamed (chunked), before
    anything reads it; a body under the limit with a 10k-character name is a 422 instead."""
    before = await counts(c)
    huge = json.dumps({**TRANSFER, "patient": {"name": "张" * (LIMIT // 3 + 1)}}).encode()
    assert len(huge) > LIMIT
    for path in WRITES:
        problem(await c.post(concrete(path), content=huge,
                             headers={"Content-Type": "application/json"}), 413)

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(huge), 16 * 1024):
            yield huge[i:i + 16 * 1024]

    streamed = await c.post(f"{API}/transfers", content=chunks(),
                            headers={"Content-Type": "application/json"})
    assert "content-length" not in streamed.request.headers
    assert problem(streamed, 413)["code"] == "body_too_large"
    long_name = {**TRANSFER, "patient": {"name": "张" * 10_000}}
    problem(await c.post(f"{API}/transfers", json=long_name), 422, "patient.name")
    assert await counts(c) == before


async def wrong_media_types(c: httpx.AsyncClient) -> None:
    """415 for a body that is not JSON by its media type, on every write route; 422 naming
    the body for one that says JSON and is not (or is not UTF-8)."""
    before = await counts(c)
    form = "patient=%E5%BC%A0%E4%B8%89&risk_category=isolation_site"
    for path in WRITES:
        for media in ("application/x-www-form-urlencoded", "text/plain", "application/xml",
                      "multipart/form-data; boundary=x", None):
            headers = {"Content-Type": media} if media else {}
            resp = await c.post(concrete(path), content=form.encode(), headers=headers)
            assert problem(resp, 415)["code"] == "unsupported_media_type"
    for raw in (b"patient=1", b'{"patient": ', b"\xff\xfe{}", b'{"patient": "\xe5"}'):
        problem(await c.post(f"{API}/transfers", content=raw,
                             headers={"Content-Type": "application/json"}), 422, "body")
    assert await counts(c) == before
    body = {**TRANSFER, "patient": {"name": "媒体类型"}}
    ok(await c.post(f"{API}/transfers", content=json.dumps(body).encode(),
                    headers={"Content-Type": "Application/JSON; charset=utf-8"}), 201)


# Names as people and clerks type them: stored and read back exactly, never normalised.
NAMES = {
    "emoji and a ZWJ family": "😷张三👨‍👩‍👧",
    "combining marks (NFD)": "Zoe\u0308 Nguye\u0302\u0303n",
    "right to left, with an override": "محمد \u202eأحمد\u202c",
    "zero width space, joiner, BOM": "张\u200b三\u200d\ufeff",
    "CJK extension B": "𠀀𪚥",
    "the longest allowed": "龘" * 100,
}
# JSON string literals that are no name: each a 422 naming the field.
NOT_NAMES = {
    "NUL": '"张\\u0000三"',
    "lone high surrogate": '"\\ud800"',
    "lone low surrogate": '"张\\udfff"',
    "reversed pair": '"\\udc00\\ud800"',
    "10k characters": json.dumps("名" * 10_000),
    "blank": '"   "',
    "ideographic spaces": '"\u3000\u3000"',
}


async def unicode_names(c: httpx.AsyncClient) -> None:
    await reference_data(c)
    before = await counts(c)
    for why, raw in NOT_NAMES.items():
        resp = await c.post(f"{API}/transfers", content=with_name(raw),
                            headers={"Content-Type": "application/json"})
        assert problem(resp, 422, "patient.name"), why
    assert await counts(c) == before
    created: dict[str, str] = {}
    for i, (why, name) in enumerate(NAMES.items()):
        sent = {**TRANSFER, "patient": {"name": name, "phone": f"1390000{i:04d}"}}
        resp = await c.post(f"{API}/transfers", json=sent)
        assert resp.status_code == 201, (why, resp.text)
        created[name] = resp.json()["id"]
        assert ok(await c.get(f"{API}/transfers/{created[name]}"))["patient"]["name"] == name, why
    facility = {**FACILITIES[2], "id": "yc-unicode", "name": "🏥 Zoe\u0308 محمد\u200b医院"}
    ok(await c.post(f"{API}/facilities", json=facility), 201)
    listed = {f["id"]: f["name"] for f in ok(await c.get(f"{API}/facilities"))}
    assert listed["yc-unicode"] == facility["name"]
    problem(await c.post(f"{API}/facilities", json={**facility, "id": "yc-nul", "name": "医\x00院"}),
            422, "name")

    async def archived(name: str) -> Any:  # the projection's copy, through the bus
        resp = await c.get(f"{API}/audit/transfers/{created[name]}/timeline")
        entries = resp.json()["entries"] if resp.status_code == 200 else []
        return next((e for e in entries if e["type"] == "TransferRequested"), None)

    for name in NAMES.values():
        entry = await eventually(lambda name=name: archived(name), f"{name!r} in the audit timeline")
        assert entry["payload"]["patient"]["name"] == name


BAD_TIMES: dict[str, Any] = {
    "year 1": "0001-01-01T00:00:00+08:00",
    "year 9999": "9999-12-31T23:59:59-08:00",
    "no offset": "2022-11-20T09:00:00",
    "leap second": "2016-12-31T23:59:60Z",
    "30 February": "2022-02-30T09:00:00+08:00",
    "no seconds": "2022-11-20T09:00+08:00",
    "a space for T": "2022-11-20 09:00:00+08:00",
    "a date": "2022-11-20",
    "epoch as a number": 0,
    "epoch as text": "0",
    "a trailing newline": "2022-11-20T09:00:00+08:00\n",
}
BAD_DAYS: dict[str, Any] = {"year 1": "0001-01-01", "year 9999": "9999-12-31",
                            "30 February": "2022-02-30", "a number": 20221120,
                            "a time": "2022-11-20T00:00:00+08:00"}


async def times_out_of_reach(c: httpx.AsyncClient) -> None:
    """Year 1, year 9999, no offset, leap seconds, 30 February: 422 naming the field, for
    every kind of time the API takes (device times, lab times, filter bounds, days); and
    nothing changed."""
    await reference_data(c)
    transfer = ok(await c.post(f"{API}/transfers", json=TRANSFER), 201)
    trip = await trip_of(c, "nx-120-07", transfer["id"])
    crew = as_(c, "crew", vehicle_id="nx-120-07")
    facility = ok(await c.get(f"{API}/facilities"))
    for why, at in BAD_TIMES.items():
        cases: list[tuple[str, dict[str, Any], str, dict[str, str]]] = [
            ("/facilities/yc-first/load", {"fever_clinic_occupied": 1, "reported_at": at},
             "reported_at", {}),
            ("/vehicles/nx-120-07/position", {"location": {"lat": 38.3, "lon": 106.2}, "at": at},
             "at", crew),
            (f"/trips/{trip['id']}/steps", {"step": "acknowledged", "at": at,
                                            "client_event_id": "bad-time"}, "at", crew),
            (f"/trips/{trip['id']}/positions", {"location": {"lat": 38.3, "lon": 106.2}, "at": at},
             "at", crew),
        ]
        for path, body, field, headers in cases:
            assert problem(await c.post(API + path, json=body, headers=headers), 422, field), why
        if why != "a date":  # a day is a bound of its own
            for bound, view in itertools.product(("from", "to"), ("violations", "kpis", "ledger")):
                resp = await c.get(f"{API}/audit/{view}", params={bound: str(at)})
                assert problem(resp, 422, bound), (why, view)
    for why, day in BAD_DAYS.items():
        body = {"transfer": {**TRANSFER, "purpose": "scheduled_care"}, "weekdays": [1],
                "time": "08:00", "starts_on": day}
        assert problem(await c.post(f"{API}/care-series", json=body), 422, "starts_on"), why
        if why != "a time":  # the ledger's day may be given as a time in it
            problem(await c.get(f"{API}/audit/ledger", params={"date": str(day)}), 422, "date")
    assert ok(await c.get(f"{API}/facilities")) == facility
    assert ok(await c.get(f"{API}/trips/{trip['id']}"))["steps"] == []
    assert ok(await c.get(f"{API}/care-series")) == []
    ok(await c.get(f"{API}/audit/violations", params={"from": "", "to": ""}))  # empty: no bound


async def device_clocks_off(c: httpx.AsyncClient) -> None:
    """What DOMAIN.md allows a crew phone: its steps are kept with their skew against the
    server's clock shown (flow 8, R12), whether it runs a day ahead or reset to 1970; a
    position ahead of the server is refused (422 naming `at`): kept, it made every later,
    true position look older and the vehicle stood still on the map."""
    await reference_data(c)
    transfer = ok(await c.post(f"{API}/transfers", json=TRANSFER), 201)
    trip = await trip_of(c, "nx-120-07", transfer["id"])
    now = datetime.now(UTC)
    ahead, epoch = (now + timedelta(days=1)).isoformat(), "1970-01-01T00:00:05+00:00"
    ok(await c.post(f"{API}/trips/{trip['id']}/steps", json={
        "step": "acknowledged", "at": ahead, "client_event_id": "skew-1"}))
    stepped = ok(await c.post(f"{API}/trips/{trip['id']}/steps", json={
        "step": "en_route", "at": epoch, "client_event_id": "skew-2"}))
    skews = {s["step"]: s["clock_skew_s"] for s in stepped["steps"]}
    assert 86_000 < skews["acknowledged"] < 86_500, skews
    assert skews["en_route"] < -now.timestamp() + 3600, skews
    assert stepped["last_step"] == "en_route"
    crew = as_(c, "crew", vehicle_id="nx-120-07")
    for path in ("/vehicles/nx-120-07/position", f"/trips/{trip['id']}/positions"):
        far = {"location": {"lat": 38.40, "lon": 106.25}, "at": ahead}
        body = problem(await c.post(API + path, json=far, headers=crew), 422, "at")
        assert body["code"] == "time_in_the_future" and body["server_time"]
        true = {"location": {"lat": 38.41, "lon": 106.26}, "at": now.isoformat()}
        assert ok(await c.post(API + path, json=true, headers=crew), 202)["recorded"] is True
    vehicle = ok(await c.get(f"{API}/vehicles/nx-120-07"))
    assert vehicle["location"] == {"lat": 38.41, "lon": 106.26}


async def nul_and_methods_in_the_url(c: httpx.AsyncClient) -> None:
    """No id or filter holds a NUL (PostgreSQL cannot even compare text with one): 422
    naming where. A method a path lacks: 405 listing every method the path has."""
    for url, field in ((f"{API}/transfers/a%00b", "path"), (f"{API}/trips/%00", "path"),
                       (f"{API}/transfers?status=queued%00", "status"),
                       (f"{API}/audit/violations?rule=R1%00", "rule")):
        problem(await c.get(url, headers=as_(c, "supervisor")), 422, field)
    # A parameter the view does not read (the KPIs read from/to, not date), or one given
    # twice: refused, not ignored.
    problem(await c.get(f"{API}/audit/kpis", params={"date": "2020-01-01"}, headers=as_(c, "auditor")),
            422, "date")
    problem(await c.get(f"{API}/audit/violations?rule=R11&rule=R14", headers=as_(c, "auditor")), 422, "rule")
    # A findings cursor decoding to NULs ("\0|\0") or to text of no cursor's shape ("a||").
    for cursor in ("AHwA", "YXx8"):
        problem(await c.get(f"{API}/audit/violations", params={"cursor": cursor},
                            headers=as_(c, "auditor")), 422, "cursor")
    resp = await c.request("DELETE", f"{API}/transfers")
    problem(resp, 405)
    assert set(resp.headers["allow"].split(", ")) >= {"GET", "POST"}


async def numbers_out_of_reach(c: httpx.AsyncClient) -> None:
    """Past a bigint (PostgreSQL's, SQLite's) a position or offset was a 500; NaN and
    infinities (Python's JSON reads them) are no coordinates or counts."""
    auditor = as_(c, "auditor")
    big = str(10**30)
    problem(await c.get(f"{API}/audit/disclosures", params={"offset": big}, headers=auditor),
            422, "offset")
    problem(await c.get(f"{API}/audit/stream", params={"after": big, "follow": "false"},
                        headers=auditor), 422, "after")
    for garbage in (big, "1_0", "+5", "-0"):  # int() takes all but the first
        problem(await c.get(f"{API}/audit/stream", params={"follow": "false"},
                            headers={**auditor, "Last-Event-ID": garbage}), 422, "Last-Event-ID")
        problem(await c.get(f"{API}/audit/stream", params={"follow": "false", "lastEventId": garbage},
                            headers=auditor), 422, "lastEventId")
    await reference_data(c)
    before = await counts(c)
    for raw, field in (('{"lat": NaN, "lon": 106.2}', "origin.location.lat"),
                       ('{"lat": 38.2, "lon": Infinity}', "origin.location.lon"),
                       ('{"lat": 1e400, "lon": 106.2}', "origin.location.lat"),
                       ('{"lat": true, "lon": 106.2}', "origin.location.lat"),
                       ('{"lat": "38.2", "lon": 106.2}', "origin.location.lat")):
        body = json.dumps({**TRANSFER, "origin": {**TRANSFER["origin"], "location": "@L@"}})
        resp = await c.post(f"{API}/transfers", content=body.replace('"@L@"', raw).encode(),
                            headers={"Content-Type": "application/json"})
        problem(resp, 422, field)
    load = {"fever_clinic_occupied": 10**30, "reported_at": "2022-11-20T09:00:00+08:00"}
    problem(await c.post(f"{API}/facilities/yc-first/load", json=load), 422, "fever_clinic_occupied")
    problem(await c.post(f"{API}/facilities/yc-first/load", json={**load, "fever_clinic_occupied": "5"}),
            422, "fever_clinic_occupied")
    assert await counts(c) == before


async def lab_and_staff_times(c: httpx.AsyncClient) -> None:
    """The disinfection service's times: far off is a 422 naming the field (nested too);
    ahead of the server is its existing clock-skew refusal."""
    await reference_data(c)
    transfer = ok(await c.post(f"{API}/transfers", json=TRANSFER), 201)
    trip = await trip_of(c, "nx-120-07", transfer["id"])
    await steps(c, trip["id"], "lab", ["acknowledged", "en_route", "at_pickup", "patient_aboard",
                                       "at_destination", "handed_over"])
    cycle = await open_cycle(c, "nx-120-07")
    url = f"{API}/disinfection/cycles/{cycle['id']}/stages"
    for why, at in BAD_TIMES.items():
        assert problem(await c.post(url, json={**INITIAL, "started_at": at}), 422, "started_at"), why
        video = {**INITIAL["video"], "from": at}
        assert problem(await c.post(url, json={**INITIAL, "video": video}), 422, "video.from"), why
    ahead = (datetime.now(UTC) + timedelta(hours=2)).isoformat()
    body = problem(await c.post(url, json={**INITIAL, "ended_at": ahead}), 422, "ended_at")
    assert body["code"] == "time_in_the_future"
    after = ok(await c.get(f"{API}/disinfection/cycles/{cycle['id']}"))
    assert (after["initial"], after["version"]) == (None, cycle["version"])


async def audit_filters_that_match_nothing(c: httpx.AsyncClient) -> None:
    """A filter no finding or day can meet is a mistake to say, not an empty 200 an auditor
    would read as "nothing found": an unknown rule, a range that ends before it starts,
    the ledger's day beside a range."""
    auditor = as_(c, "auditor")
    for rule in ("R99", "r14", "R0"):
        resp = await c.get(f"{API}/audit/violations", params={"rule": rule}, headers=auditor)
        problem(resp, 422, "rule")
    backwards = {"from": "2026-11-25", "to": "2026-11-20"}
    for view in ("violations", "kpis", "ledger"):
        problem(await c.get(f"{API}/audit/{view}", params=backwards, headers=auditor), 422, "to")
        problem(await c.get(f"{API}/audit/{view}", params={"from": "2026-11-20", "to": "2026-11-20"},
                            headers=auditor), 422, "to")
    problem(await c.get(f"{API}/audit/ledger", params={"date": "2026-11-20", "from": "2026-11-19"},
                        headers=auditor), 422, "date")
    overrides = ok(await c.get(f"{API}/audit/violations", params={"rule": "override"}, headers=auditor))
    assert overrides["total"] == 0
    week = await c.get(f"{API}/audit/ledger", headers=auditor,
                       params={"from": "2026-11-20", "to": "2026-11-27", "format": "csv"})
    assert 'filename="ledger-2026-11-20_2026-11-27.csv"' in week.headers["content-disposition"]


async def an_outpatient_visit_that_would_not_return(c: httpx.AsyncClient) -> None:
    """R11: an outpatient visit brings the patient back. Said not to return: 422 naming
    `return_required`, nothing written; not said: it returns."""
    await reference_data(c)
    before = await counts(c)
    body = problem(await c.post(f"{API}/transfers", json={**TRANSFER, "return_required": False}),
                   422, "return_required")
    assert body["code"] == "outpatient_visit_returns" and body["rule"] == "R11", body
    assert await counts(c) == before
    unsaid = {k: v for k, v in TRANSFER.items() if k != "return_required"}
    created = ok(await c.post(f"{API}/transfers", json=unsaid), 201)
    assert ok(await c.get(f"{API}/transfers/{created['id']}"))["return_required"] is True


EMBEDDED: list[Scenario] = [oversize_bodies, wrong_media_types, unicode_names, times_out_of_reach,
                            device_clocks_off, nul_and_methods_in_the_url, numbers_out_of_reach,
                            lab_and_staff_times, audit_filters_that_match_nothing,
                            an_outpatient_visit_that_would_not_return]
# Where PostgreSQL could answer otherwise than SQLite: text, NUL, times, big numbers; and
# the media types once.
# In this order on one cluster: the first takes the one negative-pressure ambulance.
DISTRIBUTED: list[Scenario] = [times_out_of_reach, unicode_names, nul_and_methods_in_the_url,
                               numbers_out_of_reach, wrong_media_types]


@pytest.mark.parametrize("scenario", EMBEDDED, ids=lambda s: s.__name__)
async def test_embedded(tmp_path: Path, scenario: Scenario) -> None:
    app = create_app(settings=(settings := Settings(mode="embedded", data_dir=tmp_path)))
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://embedded",
            auth=Acting.for_settings(settings)) as c:
        await scenario(c)


@pytest.mark.postgres
@pytest.mark.kafka
async def test_distributed(tmp_path: Path) -> None:
    """One cluster for the subset, each scenario on fresh reference data ids where needed."""
    async with running_cluster(tmp_path) as cluster, cluster.client() as c:
        for scenario in DISTRIBUTED:
            await scenario(c)
