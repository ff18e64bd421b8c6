"""Dispatch scenarios (issue 3), run unchanged on the embedded app and the distributed
processes. Rule ids in the names and messages."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import httpx

from libs.web.webhooks import verify
from tests.e2e.receiver import Receiver
from tests.scenarios import API, TRANSFER, eventually, load_reference_data, ok

REPORT_SECRET = "bureau-shared-secret"


def person(name: str, id_number: str | None = None, **changes: Any) -> dict[str, Any]:
    patient: dict[str, Any] = {"name": name}
    if id_number:
        patient["id_number"] = id_number
    return {**TRANSFER, "patient": patient, **changes}


STROKE = {"critical": True, "kind": "stroke"}
HOME = {"risk_category": "home_monitoring", "condition": {}}


async def intake_validation(c: httpx.AsyncClient) -> None:
    """422 names the field; one live transfer per person."""
    bad = [({"patient": {"name": "张三", "id_number": "640121198001011230"}}, "patient.id_number"),
           ({"patient": {"name": "张三", "phone": "12345"}}, "patient.phone"),
           ({"origin": {**TRANSFER["origin"], "location": {"lat": 91, "lon": 106.2}}}, "origin.location.lat"),
           ({"risk_category": "vip"}, "risk_category"),
           ({"requested_by": {"channel": "telepathy"}}, "requested_by.channel")]
    for change, field in bad:
        resp = await c.post(f"{API}/transfers", json={**TRANSFER, **change})
        assert resp.status_code == 422, resp.text
        problem = resp.json()
        assert problem["field"] == field and problem["message_zh"], problem
        assert resp.headers["content-type"].startswith("application/problem+json")
    first = ok(await c.post(f"{API}/transfers", json=TRANSFER), 201)
    again = await c.post(f"{API}/transfers", json={**TRANSFER, "purpose": "admission"})
    assert again.status_code == 200 and again.json()["id"] == first["id"] and again.json()["existing"]
    assert len(ok(await c.get(f"{API}/transfers"))) == 1


async def queue_overflow_and_fleet(c: httpx.AsyncClient) -> None:
    await load_reference_data(c)  # yc-first at 85%: backups active (R7)
    fever = ok(await c.post(f"{API}/transfers", json=person("发热甲", "640121198001011231")), 201)
    assert (fever["vehicle_id"], fever["destination"]) == ("nx-120-07", "yc-second")
    home = ok(await c.post(f"{API}/transfers", json=person("居家乙", **HOME)), 201)
    assert home["vehicle_id"] == "yn-bus-02"  # R5: the dedicated car, not a spare NPA

    # Nothing free now: the queue orders by priority, then request time (R4).
    waiting_fever = ok(await c.post(f"{API}/transfers", json=person("发热丙")), 201)
    stroke = ok(await c.post(f"{API}/transfers", json=person("卒中丁", condition=STROKE)), 201)
    later_home = ok(await c.post(f"{API}/transfers", json=person("居家戊", **HOME)), 201)
    order = [t["id"] for t in ok(await c.get(f"{API}/queue"))]
    assert order == [stroke["id"], waiting_fever["id"], later_home["id"]], order
    assert stroke["destination"] == "nx-cardio"  # R6: stroke to the specialty hospital
    ok(await c.post(f"{API}/transfers/{later_home['id']}/priority",
                    json={"priority": 2, "reason": "家属报告胸闷"}))
    order = [t["id"] for t in ok(await c.get(f"{API}/queue"))]
    assert order == [stroke["id"], waiting_fever["id"], later_home["id"]]  # same priority: by time
    ok(await c.post(f"{API}/transfers/{later_home['id']}/priority", json={"priority": 1, "reason": "胸痛"}))
    order = [t["id"] for t in ok(await c.get(f"{API}/queue"))]
    assert order == [stroke["id"], later_home["id"], waiting_fever["id"]]

    # R7: the load falls back, the backups stand down, new fever patients go to yc-first.
    ok(await c.post(f"{API}/facilities/yc-first/load",
                    json={"fever_clinic_occupied": 50, "reported_at": "2022-11-20T12:00:00+08:00"}))
    back = ok(await c.post(f"{API}/transfers", json=person("发热己")), 201)
    assert back["destination"] == "yc-first"
    # Full again: redirected by the rules, the patient goes to the backup its overflow
    # activates, not past it (R7); then the load falls back once more.
    ok(await c.post(f"{API}/facilities/yc-first/load",
                    json={"fever_clinic_occupied": 90, "reported_at": "2022-11-20T12:10:00+08:00"}))
    moved = ok(await c.post(f"{API}/transfers/{back['id']}/redirect", json={"reason": "发热门诊已满"}))
    assert moved["destination"] == "yc-second", moved
    ok(await c.post(f"{API}/facilities/yc-first/load",
                    json={"fever_clinic_occupied": 50, "reported_at": "2022-11-20T12:20:00+08:00"}))

    # Cancel a waiting transfer: off the queue.
    ok(await c.post(f"{API}/transfers/{waiting_fever['id']}/cancel", json={"reason": "患者拒绝"}))
    assert waiting_fever["id"] not in [t["id"] for t in ok(await c.get(f"{API}/queue"))]
    refused = await c.post(f"{API}/transfers/{waiting_fever['id']}/cancel", json={"reason": "again"})
    assert refused.status_code == 409 and refused.json()["code"] == "transfer_closed"

    # Breakdown before pickup: the car's transfer goes back to the queue, its trip is aborted.
    ok(await c.post(f"{API}/vehicles/yn-bus-02/out-of-service", json={"reason": "发动机故障"}))
    requeued = ok(await c.get(f"{API}/transfers/{home['id']}"))
    assert requeued["status"] == "queued" and requeued["vehicle_id"] is None

    async def trip_aborted() -> bool:
        trips = ok(await c.get(f"{API}/trips", params={"vehicle_id": "yn-bus-02"}))
        return bool(trips) and trips[0]["status"] == "aborted"

    await eventually(trip_aborted, "the broken-down car's trip to be aborted")

    # A new ambulance takes the first queued transfer it may carry: the stroke (R4).
    ok(await c.post(f"{API}/vehicles", json={
        "id": "nx-120-08", "plate": "宁A·120Q8", "kind": "negative_pressure_ambulance",
        "dedicated_pool": True, "life_support": True, "station": "银川市急救中心",
        "location": {"lat": 38.48, "lon": 106.23}}), 201)
    assert ok(await c.get(f"{API}/transfers/{stroke['id']}"))["vehicle_id"] == "nx-120-08"


async def report_delivery(c: httpx.AsyncClient, receiver: Receiver) -> None:
    """报备 (R10): delivered to the bureau's endpoint, signed, retried after a failure."""
    t = ok(await c.post(f"{API}/transfers", json=person("报备庚", "640121198001011231")), 201)

    async def delivered() -> Any:
        got = ok(await c.get(f"{API}/transfers/{t['id']}"))
        return got if got["report_delivery"] == "delivered" else None

    await eventually(delivered, "the 报备 to be delivered", timeout=30)
    assert len(receiver.received) == receiver.fail_first + 1
    for request in receiver.received:
        assert verify(REPORT_SECRET, request.body, request.headers["x-closedloop-signature"])
    report = json.loads(receiver.received[-1].body)
    assert report["transfer"]["id"] == t["id"] and report["reported_to"] == "county_health_bureau"
    assert len({r.headers["x-closedloop-event-id"] for r in receiver.received}) == 1


async def recurring_care(c: httpx.AsyncClient) -> None:
    """A dialysis series: the occurrence due now becomes one transfer, once."""
    tz = ZoneInfo("Asia/Shanghai")
    appointment = (datetime.now(tz) + timedelta(minutes=30)).replace(second=0, microsecond=0)
    series = ok(await c.post(f"{API}/care-series", json={
        "transfer": person("透析辛", "110101199003074477", **HOME, purpose="scheduled_care"),
        "weekdays": [appointment.isoweekday()], "time": appointment.strftime("%H:%M"),
        "starts_on": appointment.date().isoformat(), "lead_minutes": 60}), 201)

    async def requested() -> Any:
        found = [t for t in ok(await c.get(f"{API}/transfers")) if t["series_id"] == series["id"]]
        return found or None

    found = await eventually(requested, "the scheduled transfer", timeout=30)
    await asyncio.sleep(1.0)  # several scheduler rounds later: still one
    again = [t for t in ok(await c.get(f"{API}/transfers")) if t["series_id"] == series["id"]]
    assert len(found) == len(again) == 1 and again[0]["purpose"] == "scheduled_care"
    assert again[0]["priority"] == 4
    ok(await c.post(f"{API}/care-series/{series['id']}/cancel", json={"reason": "疗程结束"}))
    refused = await c.post(f"{API}/care-series/{series['id']}/cancel", json={"reason": "again"})
    assert refused.status_code == 409
