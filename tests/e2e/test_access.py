"""Issue 7 end to end on the embedded app: who may do what, tokens, masking, the record of
unmasked reads, and the abuse limits. The policy code is the same in both modes; the
distributed suites run their flows with tokens too."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from libs.auth.policy import API_PREFIX
from libs.auth.privacy import UNMASK_ROLES
from libs.auth.tokens import ROLES, SCOPE_CLAIMS
from libs.events.store import PassedOver
from services.runtime import create_app
from services.settings import Settings
from tests.actors import Acting, access_rules, as_
from tests.scenarios import API, STEPS, TRANSFER, eventually, load_reference_data, ok, trip_of

ID_NUMBER, PHONE = TRANSFER["patient"]["id_number"], TRANSFER["patient"]["phone"]
SITE = "yn-isolation-01"
FROM_SITE = {**TRANSFER, "patient": {"name": "王二", "id_number": "640121199001011236",
                                     "phone": "13900139000"},
             "origin": {**TRANSFER["origin"], "facility_id": SITE},
             "requested_by": {"channel": "isolation_site", "org": "永宁县集中隔离医学观察点"}}
ELSEWHERE = {"vehicle_id": "yn-bus-02", "facility_id": "nx-cardio", "site_id": "another-site"}


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[FastAPI]:
    app = create_app(settings=Settings(mode="embedded", data_dir=tmp_path, write_burst=10_000))
    async with app.router.lifespan_context(app):
        yield app


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t",
                                 auth=Acting.for_settings(app.state.settings)) as c:
        yield c


@pytest.fixture
async def world(client: httpx.AsyncClient) -> dict[str, str]:
    """Reference data, a transfer with its trip on nx-120-07 to yc-second, and a site's."""
    await load_reference_data(client)
    transfer = ok(await client.post(f"{API}/transfers", json=TRANSFER), 201)
    trip = await trip_of(client, "nx-120-07", transfer["id"])
    site = ok(await client.post(f"{API}/transfers", json=FROM_SITE,
                                headers=as_(client, "site", site_id=SITE)), 201)
    return {"transfer_id": transfer["id"], "trip_id": trip["id"], "vehicle_id": "nx-120-07",
            "facility_id": "yc-second", "site_transfer_id": site["id"], "cycle_id": "none",
            "sample_id": "none", "series_id": "none"}


async def heads(app: FastAPI) -> dict[str, int]:
    return {name: await store.head() for name, store in app.state.stores.items()}


def operations(app: FastAPI) -> list[tuple[str, str]]:
    """Every operation of the OpenAPI document under /api/v1."""
    return [(method.upper(), path.removeprefix(API_PREFIX))
            for path, item in app.openapi()["paths"].items() if path.startswith(API_PREFIX)
            for method in item]


def url(path: str, world: dict[str, str]) -> str:
    return API + re.sub(r"\{(\w+)\}", lambda m: world[m[1]], path)


async def test_every_endpoint_has_a_rule_and_nothing_else_is_open(app: FastAPI) -> None:
    ops = {f"{m} {p}" for m, p in operations(app)}
    assert ops == set(access_rules()), {"without a rule": ops - set(access_rules()),
                                        "rule without an endpoint": set(access_rules()) - ops}
    for key, grants in access_rules().items():
        assert grants, f"{key}: a rule that lets nobody in"
        assert {g.role for g in grants} <= ROLES, key


async def test_role_by_endpoint_matrix(app: FastAPI, client: httpx.AsyncClient,
                                       world: dict[str, str]) -> None:
    """Every role against every endpoint. Not granted: 403 naming the role, and nothing
    written. Granted but bound elsewhere (another vehicle, facility, site): 403 naming the
    scope. Granted: neither 401 nor 403 (the empty body may still be a 422)."""
    before = await heads(app)
    granted: list[tuple[str, str, httpx.Response]] = []
    for method, path in operations(app):
        grants = {g.role: g for g in access_rules()[f"{method} {path}"]}
        for role in sorted(ROLES):
            claim = SCOPE_CLAIMS.get(role)
            headers = as_(client, role, **({claim: ELSEWHERE[claim]} if claim else {}))
            resp = await client.request(method, url(path, world), headers=headers,
                                        json={} if method == "POST" else None,
                                        params={"follow": "false"})
            where = f"{role} {method} {path}: {resp.status_code} {resp.text[:200]}"
            assert resp.status_code < 500, where
            if role not in grants:
                body = resp.json()
                assert resp.status_code == 403 and body["code"] == "role_not_permitted", where
                assert body["role"] == role and role not in body["allowed_roles"], where
            elif grants[role].within is not None and claim:
                body = resp.json()
                assert resp.status_code == 403 and body["code"] == "out_of_scope", where
                assert body["scope"] == f"{claim}={ELSEWHERE[claim]}", where
            else:
                assert resp.status_code not in (401, 403), where
                granted.append((role, f"{method} {path}", resp))
    assert len(granted) > 40
    refused_writes = {k: v for k, v in (await heads(app)).items()}
    # Granted calls with an empty body are refused by validation, or are reads; the only
    # writes allowed through are the records of unmasked reads, in the reading service.
    assert all(refused_writes[name] >= before[name] for name in before)


async def test_crew_of_another_vehicle_cannot_step_this_trip(app: FastAPI, client: httpx.AsyncClient,
                                                            world: dict[str, str]) -> None:
    step = {"step": "acknowledged", "at": "2022-11-20T09:01:10+08:00", "client_event_id": "x-1"}
    before = await heads(app)
    refused = await client.post(f"{API}/trips/{world['trip_id']}/steps", json=step,
                                headers=as_(client, "crew", vehicle_id="yn-bus-02"))
    assert refused.status_code == 403 and refused.json()["code"] == "out_of_scope"
    assert refused.json()["message_zh"].startswith("超出授权范围")
    assert await heads(app) == before  # nothing written
    mine = as_(client, "crew", "crew-li", vehicle_id="nx-120-07")
    done = ok(await client.post(f"{API}/trips/{world['trip_id']}/steps", json=step, headers=mine))
    assert done["last_step"] == "acknowledged"

    async def seen() -> Any:
        # The projection may not hold the transfer yet (404) or the step (not listed).
        answer = await client.get(f"{API}/audit/transfers/{world['transfer_id']}/timeline")
        if answer.status_code == 404:
            return None
        entries = ok(answer)["entries"]
        return next((e for e in entries if e["type"] == "TripStepReported"), None)

    entry = await eventually(seen, "the step in the audit timeline")
    assert (entry["actor"], entry["role"]) == ("crew-li", "crew")  # the token's, not the body's


async def test_a_hospital_reads_only_transfers_bound_to_it(client: httpx.AsyncClient,
                                                         world: dict[str, str]) -> None:
    path = f"{API}/transfers/{world['transfer_id']}"
    other = await client.get(path, headers=as_(client, "hospital", facility_id="nx-cardio"))
    assert other.status_code == 403 and other.json()["code"] == "out_of_scope"
    mine = ok(await client.get(path, headers=as_(client, "hospital", facility_id="yc-second")))
    assert mine["patient"]["id_number"] == ID_NUMBER  # the receiving hospital needs it
    listed = ok(await client.get(f"{API}/transfers",
                                 headers=as_(client, "hospital", facility_id="nx-cardio")))
    assert listed == []
    listed = ok(await client.get(f"{API}/transfers",
                                 headers=as_(client, "hospital", facility_id="yc-second")))
    assert {t["id"] for t in listed} >= {world["transfer_id"]}
    assert all("yc-second" in (t["destination"], t["origin"].get("facility_id")) for t in listed)


async def test_a_site_files_and_follows_only_its_own_people(app: FastAPI, client: httpx.AsyncClient,
                                                            world: dict[str, str]) -> None:
    before = await heads(app)
    other = {**FROM_SITE, "patient": {"name": "赵七"},
             "origin": {**FROM_SITE["origin"], "facility_id": "another-site"}}
    refused = await client.post(f"{API}/transfers", json=other,
                                headers=as_(client, "site", site_id=SITE))
    assert refused.status_code == 403 and refused.json()["code"] == "out_of_scope"
    assert await heads(app) == before
    site = as_(client, "site", site_id=SITE)
    listed = ok(await client.get(f"{API}/transfers", headers=site))
    assert [t["id"] for t in listed] == [world["site_transfer_id"]]
    assert listed[0]["patient"]["id_number"] == "6401**********1236"  # a site sees it masked
    assert (await client.get(f"{API}/transfers/{world['transfer_id']}", headers=site)).status_code == 403


@pytest.mark.parametrize("defect", ["missing", "garbage", "expired", "wrong_audience", "none_alg",
                                    "tampered"])
async def test_token_defects_are_401(app: FastAPI, client: httpx.AsyncClient, defect: str) -> None:
    from tests.unit.test_auth import _defects

    issuer = app.state.settings.local_issuer()
    tokens = _defects(issuer)
    header = {"missing": {}, "garbage": {"Authorization": "Bearer garbage"},
              "expired": {"Authorization": f"Bearer {tokens['token_expired']}"},
              "wrong_audience": {"Authorization": f"Bearer {tokens['token_wrong_audience']}"},
              "none_alg": {"Authorization": f"Bearer {tokens['token_algorithm_refused']}"},
              "tampered": {"Authorization": f"Bearer {tokens['token_signature_invalid']}"}}[defect]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as bare:
        before = await heads(app)
        resp = await bare.post(f"{API}/transfers", json=TRANSFER, headers=header)
        assert resp.status_code == 401, resp.text
        assert resp.headers["content-type"] == "application/problem+json"
        assert resp.headers["www-authenticate"].startswith("Bearer")
        assert resp.json()["code"].startswith("token_") and resp.json()["message_zh"]
        assert await heads(app) == before
        assert (await bare.get("/healthz")).status_code == 200  # ops probes stay open


async def test_every_view_masks_for_those_who_do_not_need_the_numbers(
        app: FastAPI, client: httpx.AsyncClient, world: dict[str, str]) -> None:
    await walk_trip(client, world)
    checked = 0
    for method, path in operations(app):
        if method != "GET":
            continue
        grants = access_rules()[f"{method} {path}"]
        for grant in [g for g in grants if g.role not in UNMASK_ROLES]:
            bound = {"site_id": SITE} if grant.role == "site" else {}
            resp = await client.get(url(path, world), headers=as_(client, grant.role, **bound),
                                    params={"vehicle_id": world["vehicle_id"], "follow": "false",
                                            "format": "json"})
            assert resp.status_code < 500, (path, resp.text)
            clear = (ID_NUMBER, PHONE, FROM_SITE["patient"]["id_number"], FROM_SITE["patient"]["phone"])
            assert not any(n in resp.text for n in clear), (grant.role, path)
            checked += 1
    assert checked >= 20


async def test_the_open_chain_report_masks_what_the_bus_brought(app: FastAPI) -> None:
    """/chain answers without a token (the projection's /audit/verify asks every service
    for it): a message a consumer passed over is shown there as it came, and one with a
    patient's numbers in it showed them in clear."""
    message = ('{"type": "TransferRequested", "payload": {"patient": {"name": "张三", '
               f'"id_number": "{ID_NUMBER}", "phone": "{PHONE}"}}}}}}').encode()
    await app.state.stores["transfer"].keep_passed_over("transfer-from-dispatch", [
        PassedOver("dispatch", 0, 41, b"transfer-x", message, "not an envelope")])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as bare:
        report = ok(await bare.get("/chain/transfer"))
    (latest,) = report["passed_over"]["latest"]
    assert ID_NUMBER not in latest["value"] and PHONE not in latest["value"], latest
    assert "6401**********1231" in latest["value"] and "张三" in latest["value"]


async def test_an_unmasked_read_is_recorded_for_the_auditor(client: httpx.AsyncClient,
                                                            world: dict[str, str]) -> None:
    seen = ok(await client.get(f"{API}/transfers/{world['transfer_id']}",
                               headers=as_(client, "dispatcher", "dispatcher-zhang")))
    assert seen["patient"]["phone"] == PHONE

    async def recorded() -> Any:
        found = ok(await client.get(f"{API}/audit/disclosures", params={"actor": "dispatcher-zhang"}))
        return found["disclosures"]

    records = await eventually(recorded, "the disclosure in the audit view")
    assert records[0]["role"] == "dispatcher" and records[0]["store"] == "dispatch"
    assert records[0]["route"] == "GET /transfers/{transfer_id}"
    assert records[0]["patients"] == [{"name": "张三", "transfer_id": world["transfer_id"],
                                       "id_number": "6401**********1231", "phone": "138****8000"}]
    masked = ok(await client.get(f"{API}/transfers/{world['transfer_id']}",
                                 headers=as_(client, "supervisor", "supervisor-ma")))
    assert masked["patient"]["phone"] == "138****8000"
    assert ok(await client.get(f"{API}/audit/disclosures",
                               params={"actor": "supervisor-ma"}))["disclosures"] == []


async def walk_trip(client: httpx.AsyncClient, world: dict[str, str]) -> None:
    for i, step in enumerate(STEPS[:5]):
        ok(await client.post(f"{API}/trips/{world['trip_id']}/steps", json={
            "step": step, "at": f"2022-11-20T09:0{i}:00+08:00", "client_event_id": f"w-{i}"}))


async def test_abuse_limits(tmp_path: Path) -> None:
    app = create_app(settings=Settings(mode="embedded", data_dir=tmp_path, max_body_bytes=4096,
                                       write_rate_per_s=1, write_burst=3))
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://t",
            auth=Acting.for_settings(app.state.settings)) as c:
        big = {**TRANSFER, "patient": {"name": "张" * 5000}}
        resp = await c.post(f"{API}/transfers", json=big)
        assert resp.status_code == 413 and resp.json()["code"] == "body_too_large"
        resp = await c.post(f"{API}/transfers", content=b"patient=1",
                            headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert resp.status_code == 415 and resp.json()["code"] == "unsupported_media_type"
        resp = await c.get(f"{API}/transfers", params={"limit": 100_000})
        assert resp.status_code == 422 and resp.json()["field"] == "limit"
        statuses = [(await c.post(f"{API}/transfers", json={})).status_code for _ in range(4)]
        assert statuses == [422, 422, 422, 429], statuses
        limited = await c.post(f"{API}/transfers", json={})
        assert limited.status_code == 429 and int(limited.headers["Retry-After"]) >= 1
        assert limited.json()["code"] == "rate_limited"
        other = await c.post(f"{API}/transfers", json={}, headers=as_(c, "dispatcher", "another"))
        assert other.status_code == 422  # the limit is per client
