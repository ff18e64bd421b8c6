"""API scenarios that run unchanged against the embedded app and the distributed
processes. The requests are those of shared/design/API-EXAMPLES.md, as written."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

API = "/api/v1"

FACILITIES = [
    {"id": "yc-first", "name": "银川市第一人民医院", "roles": ["fever_clinic", "designated"],
     "location": {"lat": 38.4870, "lon": 106.2300}, "fever_clinic_capacity": 100,
     "backup_ids": ["yc-second", "yc-maternity"]},
    {"id": "yc-second", "name": "银川市第二人民医院", "roles": ["fever_clinic", "backup"],
     "location": {"lat": 38.4800, "lon": 106.2700}, "fever_clinic_capacity": 80},
    {"id": "nx-cardio", "name": "宁夏医科大学总医院心脑血管病医院",
     "roles": ["specialty_cardio_cerebro"], "location": {"lat": 38.4950, "lon": 106.2000}},
]
LOAD = {"fever_clinic_occupied": 85, "reported_at": "2022-11-20T09:00:00+08:00"}
VEHICLES = [
    {"id": "nx-120-07", "plate": "宁A·120Q7", "kind": "negative_pressure_ambulance",
     "dedicated_pool": True, "life_support": True, "station": "永宁县急救站",
     "location": {"lat": 38.2800, "lon": 106.2500}},
    {"id": "yn-bus-02", "plate": "宁A·Z5022", "kind": "dedicated_vehicle",
     "dedicated_pool": True, "life_support": False, "station": "永宁县卫健局",
     "location": {"lat": 38.2780, "lon": 106.2530}},
]
TRANSFER = {
    "patient": {"name": "张三", "id_number": "640121198001011231", "phone": "13800138000"},
    "risk_category": "isolation_site",
    "condition": {"fever": True, "critical": False},
    "origin": {"kind": "isolation_site", "name": "永宁县集中隔离医学观察点",
               "location": {"lat": 38.2750, "lon": 106.2400}},
    "purpose": "outpatient_visit", "return_required": True,
    "requested_by": {"channel": "console", "org": "银川市紧急救援中心"},
}
STEPS = ["acknowledged", "en_route", "at_pickup", "patient_aboard", "at_destination", "handed_over"]
INITIAL = {
    "stage": "initial", "disinfectant": "chlorine", "concentration_mg_per_l": 1000,
    "method": "wipe_and_spray", "started_at": "2022-11-20T09:50:00+08:00",
    "ended_at": "2022-11-20T10:25:00+08:00", "operator": "王五", "location": "银川市第二人民医院洗消点",
    "video": {"camera_id": "yc2-wash-cam-03", "clip_ref": "nvr://yc2/wash/cam-03/20221120T0950",
              "from": "2022-11-20T09:49:00+08:00", "to": "2022-11-20T10:26:00+08:00"},
}
TERMINAL = {
    "stage": "terminal", "disinfectant": "chlorine", "concentration_mg_per_l": 1000,
    "method": "wipe_and_spray", "started_at": "2022-11-20T10:40:00+08:00",
    "ended_at": "2022-11-20T11:15:00+08:00", "operator": "王五", "location": "永宁县急救站洗消间",
    "video": {"camera_id": "yn-wash-cam-01", "clip_ref": "nvr://yn/wash/cam-01/20221120T1040",
              "from": "2022-11-20T10:39:00+08:00", "to": "2022-11-20T11:16:00+08:00"},
}
SWAB = {"sample_id": "YN-SW-20221120-0007", "sites": ["stretcher", "handrail", "door_handle", "seat"],
        "collected_by": "赵六", "collected_at": "2022-11-20T11:20:00+08:00"}
RESULT = {"result": "negative", "lab": "永宁县人民医院检验科", "reported_at": "2022-11-20T15:05:00+08:00"}


async def eventually(probe: Callable[[], Awaitable[Any]], what: str, timeout: float = 30.0,
                     every: float = 0.05) -> Any:
    """Poll until the probe returns something truthy: services learn from events, later."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = await probe()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(every)


def ok(resp: httpx.Response, *codes: int) -> Any:
    assert resp.status_code in (codes or (200, 201)), f"{resp.request.url}: {resp.status_code} {resp.text}"
    return resp.json()


async def load_reference_data(c: httpx.AsyncClient) -> None:
    for facility in FACILITIES:
        ok(await c.post(f"{API}/facilities", json=facility), 201)
    ok(await c.post(f"{API}/facilities/yc-first/load", json=LOAD), 200)
    for vehicle in VEHICLES:
        ok(await c.post(f"{API}/vehicles", json=vehicle), 201)


async def trip_of(c: httpx.AsyncClient, vehicle_id: str, transfer_id: str) -> dict[str, Any]:
    async def probe() -> Any:
        trips = ok(await c.get(f"{API}/trips", params={"vehicle_id": vehicle_id}))
        return next((t for t in trips if t["transfer_id"] == transfer_id), None)

    found: dict[str, Any] = await eventually(probe, f"the trip of {transfer_id}")
    return found


async def open_cycle(c: httpx.AsyncClient, vehicle_id: str) -> dict[str, Any]:
    async def probe() -> Any:
        cycles = ok(await c.get(f"{API}/disinfection/cycles",
                                params={"vehicle_id": vehicle_id, "status": "open"}))
        return cycles[0] if cycles else None

    found: dict[str, Any] = await eventually(probe, f"an open cycle for {vehicle_id}")
    return found


async def vehicle_status(c: httpx.AsyncClient, vehicle_id: str, status: str) -> None:
    async def probe() -> bool:
        return bool(ok(await c.get(f"{API}/vehicles/{vehicle_id}"))["status"] == status)

    await eventually(probe, f"{vehicle_id} to be {status}")


async def walking_skeleton(c: httpx.AsyncClient) -> dict[str, Any]:
    """API-EXAMPLES.md from reference data to a released vehicle and the audit timeline."""
    await load_reference_data(c)
    headers = {"Idempotency-Key": "2b0f3c9e-5d1a-4a55-9d7e-2f6b1c0e8a11"}
    transfer = ok(await c.post(f"{API}/transfers", json=TRANSFER, headers=headers), 201)
    assert transfer["vehicle_id"] == "nx-120-07", transfer  # fever from isolation: NPA (R5)
    assert transfer["destination"] == "yc-second", transfer  # yc-first past 80% (R7)
    assert transfer["priority"] == 2
    again = ok(await c.post(f"{API}/transfers", json=TRANSFER, headers=headers), 201)
    assert again["id"] == transfer["id"]
    assert len(ok(await c.get(f"{API}/transfers"))) == 1

    trip = await trip_of(c, "nx-120-07", transfer["id"])
    for n, step in enumerate(STEPS, start=1):
        body = {"step": step, "at": f"2022-11-20T09:{n:02d}:10+08:00", "client_event_id": f"c0a8-{n:04d}"}
        applied = ok(await c.post(f"{API}/trips/{trip['id']}/steps", json=body))
        assert applied["applied"] is True
        if step == "en_route":  # the phone resends: applied once
            resent = ok(await c.post(f"{API}/trips/{trip['id']}/steps", json=body))
            assert resent["applied"] is False
    handover = {"facility_id": "yc-second", "received_by": "李医生", "at": "2022-11-20T09:40:00+08:00"}
    ok(await c.post(f"{API}/trips/{trip['id']}/handover", json=handover))

    await vehicle_status(c, "nx-120-07", "awaiting_disinfection")
    cycle = await open_cycle(c, "nx-120-07")
    ok(await c.post(f"{API}/disinfection/cycles/{cycle['id']}/stages", json=INITIAL), 201)
    ok(await c.post(f"{API}/disinfection/cycles/{cycle['id']}/stages", json=TERMINAL), 201)
    ok(await c.post(f"{API}/disinfection/cycles/{cycle['id']}/swabs", json=SWAB), 201)
    ok(await c.post(f"{API}/disinfection/swabs/{SWAB['sample_id']}/result", json=RESULT))
    await vehicle_status(c, "nx-120-07", "available")

    expected = {"TransferRequested", "TransferPrioritized", "DestinationAssigned", "VehicleAssigned",
                "TransferReported", "TripOpened", "TripStepReported", "PatientHandedOver",
                "HandoverConfirmed", "TripCompleted", "CycleOpened", "InitialDisinfectionLogged",
                "TerminalDisinfectionLogged", "SurfaceSwabCollected", "VehicleReleased",
                "SwabResultRecorded", "VehicleAwaitingDisinfection", "VehicleReturnedToService"}

    async def full_timeline() -> Any:
        resp = await c.get(f"{API}/audit/transfers/{transfer['id']}/timeline")
        if resp.status_code != 200:
            return None
        body = resp.json()
        return body if expected <= {e["type"] for e in body["entries"]} else None

    timeline = await eventually(full_timeline, "the full timeline")
    steps = [e["payload"]["step"] for e in timeline["entries"] if e["type"] == "TripStepReported"]
    assert steps == STEPS
    aboard = next(e for e in timeline["entries"] if e["type"] == "TripStepReported"
                  and e["payload"]["step"] == "patient_aboard")
    assert aboard["occurred_at"] == "2022-11-20T09:04:10+08:00"  # the phone's clock, kept
    return {"transfer": transfer, "trip": trip, "cycle": cycle, "timeline": timeline}


async def drive_to_handover(c: httpx.AsyncClient, trip_id: str, prefix: str) -> None:
    for n, step in enumerate(STEPS, start=1):
        body = {"step": step, "at": f"2022-11-20T09:{n:02d}:10+08:00", "client_event_id": f"{prefix}-{n}"}
        ok(await c.post(f"{API}/trips/{trip_id}/steps", json=body))


async def disinfect(c: httpx.AsyncClient, cycle_id: str, sample_id: str) -> None:
    ok(await c.post(f"{API}/disinfection/cycles/{cycle_id}/stages", json=INITIAL), 201)
    ok(await c.post(f"{API}/disinfection/cycles/{cycle_id}/stages", json=TERMINAL), 201)
    swab = {**SWAB, "sample_id": sample_id}
    ok(await c.post(f"{API}/disinfection/cycles/{cycle_id}/swabs", json=swab), 201)


def patient(i: int) -> dict[str, Any]:
    return {**TRANSFER, "patient": {"name": f"病人{i}"}}


async def r1_concurrent_assignments(c: httpx.AsyncClient, n: int = 24) -> None:
    """R1: n fever patients from an isolation site wait (they need a negative-pressure
    ambulance, R5); the only vehicle is a dedicated car, so auto-assignment leaves them
    queued. n dispatchers then assign that car at once, each overriding R5 with a reason.
    Exactly one wins; every other gets 409 naming R1: an override never breaks R1."""
    ids = [ok(await c.post(f"{API}/transfers", json=patient(i)), 201)["id"] for i in range(n)]
    ok(await c.post(f"{API}/vehicles", json=VEHICLES[1]), 201)
    assert len(ok(await c.get(f"{API}/queue"))) == n  # the car does not fit: all still queued
    body = {"vehicle_id": "yn-bus-02", "override_reason": "负压车全部在途，家属同意"}
    responses = await asyncio.gather(*[
        c.post(f"{API}/transfers/{tid}/assign", json=body) for tid in ids
    ])
    codes = sorted(r.status_code for r in responses)
    assert codes == [200] + [409] * (n - 1), codes
    for r in responses:
        if r.status_code == 409:
            problem = r.json()
            assert problem["rule"] == "R1" and problem["code"] == "vehicle_already_assigned", problem
            assert r.headers["content-type"].startswith("application/problem+json")
            assert problem["message_zh"]
    winner = next(r.json() for r in responses if r.status_code == 200)
    assert winner["overrides"] == [{"rule": "R5", "reason": body["override_reason"]}]
    vehicle = ok(await c.get(f"{API}/vehicles/yn-bus-02"))
    assert vehicle["status"] == "assigned" and vehicle["transfer_id"] == winner["id"]
    assigned = [t for t in ok(await c.get(f"{API}/transfers")) if t["vehicle_id"] == "yn-bus-02"]
    assert [t["id"] for t in assigned] == [winner["id"]]


async def r2_not_assignable_before_release(c: httpx.AsyncClient) -> None:
    """R2: after its trip the vehicle waits for disinfection; assigning it is refused until
    the cycle releases it, and then the queued transfer gets it."""
    await load_reference_data(c)
    first = ok(await c.post(f"{API}/transfers", json=patient(1)), 201)
    assert first["vehicle_id"] == "nx-120-07"
    trip = await trip_of(c, "nx-120-07", first["id"])
    await drive_to_handover(c, trip["id"], "r2")
    await vehicle_status(c, "nx-120-07", "awaiting_disinfection")

    second = ok(await c.post(f"{API}/transfers", json=patient(2)), 201)
    assert second["status"] == "queued" and second["vehicle_id"] is None
    refused = await c.post(f"{API}/transfers/{second['id']}/assign", json={"vehicle_id": "nx-120-07"})
    assert refused.status_code == 409 and refused.json()["rule"] == "R2", refused.text

    cycle = await open_cycle(c, "nx-120-07")
    await disinfect(c, cycle["id"], "R2-SAMPLE-1")

    async def served() -> bool:
        t = ok(await c.get(f"{API}/transfers/{second['id']}"))
        return bool(t["vehicle_id"] == "nx-120-07" and t["status"] == "assigned")

    await eventually(served, "the queued transfer to get the released vehicle")
