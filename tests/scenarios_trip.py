"""Issue 4's scenarios (the trip), run unchanged against the embedded app and against the
distributed processes: the closed loop with its return leg (R11), crew aborts, and a
breakdown after pickup (a second vehicle takes over; both are disinfected)."""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any

import httpx

from libs.web.webhooks import verify
from tests.e2e.receiver import Receiver
from tests.scenarios import (
    API,
    STEPS,
    TRANSFER,
    VEHICLES,
    disinfect,
    eventually,
    load_reference_data,
    ok,
    open_cycle,
    patient,
    trip_of,
    vehicle_status,
)

RETURN_REQUEST = {"facility_id": "yc-second", "at": "2022-11-20T11:30:00+08:00"}
HANDOVER = {"facility_id": "yc-second", "received_by": "李医生", "at": "2022-11-20T09:40:00+08:00"}
# A second negative-pressure ambulance, further from the pickup than nx-120-07.
SECOND_NPA = {"id": "nx-120-09", "plate": "宁A·120Q9", "kind": "negative_pressure_ambulance",
              "dedicated_pool": True, "life_support": True, "station": "银川市急救中心",
              "location": {"lat": 38.4700, "lon": 106.2600}}


async def steps(c: httpx.AsyncClient, trip_id: str, prefix: str, names: list[str], hour: int = 9,
                **extra: Any) -> None:
    for step in names:
        n = STEPS.index(step) + 1
        body = {"step": step, "at": f"2022-11-20T{hour:02d}:{n:02d}:10+08:00",
                "client_event_id": f"{prefix}-{n}", **extra}
        ok(await c.post(f"{API}/trips/{trip_id}/steps", json=body))


async def transfer_is(c: httpx.AsyncClient, transfer_id: str, **want: Any) -> dict[str, Any]:
    async def probe() -> Any:
        resp = await c.get(f"{API}/transfers/{transfer_id}")
        if resp.status_code != 200:
            return None
        body = resp.json()
        return body if all(body.get(k) == v for k, v in want.items()) else None

    found: dict[str, Any] = await eventually(probe, f"transfer {transfer_id} with {want}")
    return found


async def open_trip(c: httpx.AsyncClient, vehicle_id: str, transfer_id: str) -> dict[str, Any]:
    async def probe() -> Any:
        trips = ok(await c.get(f"{API}/trips", params={"vehicle_id": vehicle_id, "status": "open"}))
        return next((t for t in trips if t["transfer_id"] == transfer_id), None)

    found: dict[str, Any] = await eventually(probe, f"an open trip of {transfer_id} on {vehicle_id}")
    return found


async def closed_loop_with_return(c: httpx.AsyncClient) -> dict[str, Any]:
    """Flow 1 (R5, R6, R11): isolation site -> yc-second -> back to the isolation site. The
    return leg needs the negative-pressure ambulance again, which waits for its disinfection
    (R2), so the leg queues until the vehicle is released, and is dispatched then."""
    await load_reference_data(c)
    outbound = ok(await c.post(f"{API}/transfers", json=TRANSFER), 201)
    assert outbound["vehicle_id"] == "nx-120-07" and outbound["destination"] == "yc-second"
    trip = await trip_of(c, "nx-120-07", outbound["id"])
    await steps(c, trip["id"], "out", STEPS[:-1])
    ok(await c.post(f"{API}/trips/{trip['id']}/handover", json=HANDOVER))

    asked = ok(await c.post(f"{API}/trips/{trip['id']}/return-request", json=RETURN_REQUEST))
    assert asked["applied"] is True and asked["loop"] == "return_requested", asked
    again = ok(await c.post(f"{API}/trips/{trip['id']}/return-request", json=RETURN_REQUEST))
    assert again["applied"] is False and again["return_transfer_id"] == asked["return_transfer_id"]
    wrong = await c.post(f"{API}/trips/{trip['id']}/return-request",
                         json={**RETURN_REQUEST, "facility_id": "yc-first"})
    assert wrong.status_code == 409 and wrong.json()["code"] == "handover_facility_mismatch"
    admit = await c.post(f"{API}/trips/{trip['id']}/admission",
                         json={"facility_id": "yc-second", "at": "2022-11-20T11:31:00+08:00"})
    assert admit.status_code == 409 and admit.json()["code"] == "return_already_requested"

    back = await transfer_is(c, asked["return_transfer_id"], status="queued")
    assert back["return_of"] == outbound["id"] and back["purpose"] == "return_leg", back
    assert back["origin"]["facility_id"] == "yc-second" and back["destination"] == "origin", back
    assert back["priority"] == 2 and back["reported"] is True, back  # same rules: R4, R10
    # A new request for the same person is the live return leg, not a third transfer.
    dup = ok(await c.post(f"{API}/transfers", json=TRANSFER), 200, 201)
    assert dup["id"] == back["id"], dup

    cycle = await open_cycle(c, "nx-120-07")
    await disinfect(c, cycle["id"], "LOOP-SAMPLE-1")
    await transfer_is(c, back["id"], status="assigned", vehicle_id="nx-120-07")
    leg = await open_trip(c, "nx-120-07", back["id"])
    assert leg["return_of"] == outbound["id"] and leg["destination_id"] == "origin", leg
    await steps(c, leg["id"], "back", STEPS, hour=12, received_by="隔离点王护士")

    closed = ok(await c.get(f"{API}/trips/{trip['id']}"))
    assert closed["loop"] == "closed" and closed["loop_how"] == "returned", closed
    home = ok(await c.get(f"{API}/trips/{leg['id']}"))
    assert home["status"] == "completed" and home["handed_over_to"] == "origin", home
    await transfer_is(c, back["id"], status="handed_over")
    late = await c.post(f"{API}/trips/{trip['id']}/return-request", json=RETURN_REQUEST)
    assert late.status_code == 200 and late.json()["applied"] is False  # a resend, answered alike
    await vehicle_status(c, "nx-120-07", "awaiting_disinfection")  # one car, one disinfection

    async def timeline() -> Any:
        resp = await c.get(f"{API}/audit/transfers/{outbound['id']}/timeline")
        if resp.status_code != 200:
            return None
        types = {e["type"] for e in resp.json()["entries"]}
        return resp.json() if {"ReturnRequested", "LoopClosed"} <= types else None

    story = await eventually(timeline, "the outbound timeline to show the loop closing")
    # The return leg is part of the outbound's story, up to the handover at the origin.
    back_types = [e["type"] for e in story["entries"] if e["leg"] == "return"]
    assert story["return_legs"] == [back["id"]] and story["status"] == "loop_closed", story["status"]
    assert {"TransferRequested", "VehicleAssigned", "TripOpened", "PatientHandedOver"} <= set(back_types), \
        back_types
    assert all(e["known"] for e in story["entries"]), [e["type"] for e in story["entries"] if not e["known"]]
    return {"outbound": outbound, "trip": trip, "return": back, "leg": leg}


async def admitted_instead(c: httpx.AsyncClient) -> None:
    """R11's other end: the hospital admits the patient; the loop closes, no return leg."""
    await load_reference_data(c)
    transfer = ok(await c.post(f"{API}/transfers", json=patient(7)), 201)
    trip = await open_trip(c, transfer["vehicle_id"], transfer["id"])
    early = await c.post(f"{API}/trips/{trip['id']}/admission",
                         json={"facility_id": transfer["destination"], "at": "2022-11-20T10:00:00+08:00"})
    assert early.status_code == 409 and early.json()["code"] == "not_handed_over", early.text
    await steps(c, trip["id"], "adm", STEPS[:-1])
    ok(await c.post(f"{API}/trips/{trip['id']}/handover",
                    json={**HANDOVER, "facility_id": transfer["destination"]}))
    body = {"facility_id": transfer["destination"], "at": "2022-11-20T10:30:00+08:00"}
    admitted = ok(await c.post(f"{API}/trips/{trip['id']}/admission", json=body))
    assert admitted["loop"] == "closed" and admitted["loop_how"] == "admitted", admitted
    refused = await c.post(f"{API}/trips/{trip['id']}/return-request",
                           json={"facility_id": transfer["destination"], "at": "2022-11-20T11:00:00+08:00"})
    assert refused.status_code == 409 and refused.json()["code"] == "loop_closed", refused.text


async def crew_aborts(c: httpx.AsyncClient) -> None:
    """Flow 8: the patient refuses (the transfer is cancelled, the vehicle stands down) or is
    not there (the transfer goes back to the queue and is dispatched again, a new trip)."""
    await load_reference_data(c)
    refusing = ok(await c.post(f"{API}/transfers", json=patient(1)), 201)
    trip = await trip_of(c, "nx-120-07", refusing["id"])
    await steps(c, trip["id"], "ref", ["acknowledged", "en_route", "at_pickup"])
    abort = {"code": "patient_refused", "reason": "患者拒绝转运，已签字", "at": "2022-11-20T09:05:00+08:00"}
    aborted = ok(await c.post(f"{API}/trips/{trip['id']}/abort", json=abort))
    assert aborted["status"] == "aborted" and aborted["abort_reason"] == abort["reason"], aborted
    closed = await c.post(f"{API}/trips/{trip['id']}/abort", json=abort)
    assert closed.status_code == 409 and closed.json()["code"] == "trip_closed"
    step = await c.post(f"{API}/trips/{trip['id']}/steps", json={
        "step": "patient_aboard", "at": "2022-11-20T09:06:00+08:00", "client_event_id": "ref-late"})
    assert step.status_code == 409 and step.json()["code"] == "trip_closed"
    cancelled = await transfer_is(c, refusing["id"], status="cancelled")
    assert "patient_refused" not in cancelled["status_reason"] and "拒绝" in cancelled["status_reason"]

    async def told() -> Any:
        resp = await c.get(f"{API}/audit/transfers/{refusing['id']}/timeline")
        story = resp.json() if resp.status_code == 200 else {}
        seen = {e["type"] for e in story.get("entries", [])}
        return story if story.get("status") == "cancelled" and "TripAborted" in seen else None

    story = await eventually(told, "the refused transfer's timeline to say cancelled, with the abort")
    aborted_entry = next(e for e in story["entries"] if e["type"] == "TripAborted")
    assert aborted_entry["known"] and aborted_entry["label_zh"] == "出车中止", aborted_entry
    await vehicle_status(c, "nx-120-07", "available")  # no patient carried: no disinfection

    absent = ok(await c.post(f"{API}/transfers", json=patient(2)), 201)
    first = await trip_of(c, "nx-120-07", absent["id"])
    await steps(c, first["id"], "abs", ["acknowledged", "en_route", "at_pickup"])
    ok(await c.post(f"{API}/trips/{first['id']}/abort", json={
        "code": "patient_absent", "reason": "到达后联系不上患者", "at": "2022-11-20T09:07:00+08:00"}))
    # requeued, and the freed vehicle takes the first queued transfer it may carry again (R4)
    second = await open_trip(c, "nx-120-07", absent["id"])
    assert second["id"] != first["id"], second
    await steps(c, second["id"], "abs2", ["acknowledged", "en_route", "at_pickup", "patient_aboard"])
    refused = await c.post(f"{API}/trips/{second['id']}/abort", json=abort)
    assert refused.status_code == 409 and refused.json()["code"] == "patient_aboard", refused.text


async def breakdown_after_pickup(c: httpx.AsyncClient) -> None:
    """Flow 8: the ambulance breaks down with the patient aboard; a second one takes over and
    hands over. TripCompleted for both, so both are held for and get a disinfection cycle."""
    await load_reference_data(c)
    ok(await c.post(f"{API}/vehicles", json=SECOND_NPA), 201)
    transfer = ok(await c.post(f"{API}/transfers", json=patient(3)), 201)
    assert transfer["vehicle_id"] == VEHICLES[0]["id"], transfer
    first = await trip_of(c, "nx-120-07", transfer["id"])
    await steps(c, first["id"], "bd1", STEPS[:4])
    await transfer_is(c, transfer["id"], status="picked_up")

    ok(await c.post(f"{API}/vehicles/nx-120-07/out-of-service", json={"reason": "途中发动机故障"}))
    await transfer_is(c, transfer["id"], status="assigned", vehicle_id="nx-120-09")
    second = await open_trip(c, "nx-120-09", transfer["id"])
    assert second["takeover_of"] == "nx-120-07", second

    async def first_completed() -> Any:
        t = ok(await c.get(f"{API}/trips/{first['id']}"))
        return t if t["status"] == "completed" else None

    done = await eventually(first_completed, "the broken-down vehicle's trip to complete")
    assert done["handed_over_to"] is None
    await steps(c, second["id"], "bd2", STEPS, hour=10)
    await transfer_is(c, transfer["id"], status="handed_over")
    await vehicle_status(c, "nx-120-09", "awaiting_disinfection")

    async def both_cycles() -> Any:
        cycles = ok(await c.get(f"{API}/disinfection/cycles", params={"status": "open"}))
        vehicles = {x["vehicle_id"] for x in cycles}
        return vehicles if {"nx-120-07", "nx-120-09"} <= vehicles else None

    await eventually(both_cycles, "a disinfection cycle for both vehicles")
    broken = ok(await c.get(f"{API}/vehicles/nx-120-07"))
    assert broken["status"] == "out_of_service" and broken["awaiting_disinfection_for"] == [first["id"]]


def comparable(trip: dict[str, Any]) -> dict[str, Any]:
    return {"status": trip["status"], "last_step": trip["last_step"],
            "handed_over_to": trip["handed_over_to"],
            "steps": [(s["step"], s["device_at"]) for s in trip["steps"]]}


async def crew_link(c: httpx.AsyncClient, seed: int = 7) -> None:
    """A crew phone over a lossy link: each round it sends its unacknowledged steps at once
    (so they arrive in any order), some requests are lost, some answers are lost (applied,
    then resent); a step that waits on an earlier one (409 patient_not_aboard) stays in the
    outbox. The trip ends in the same state as another driven over a perfect link."""
    rng = random.Random(seed)
    await load_reference_data(c)
    ok(await c.post(f"{API}/vehicles", json=SECOND_NPA), 201)
    perfect_t = ok(await c.post(f"{API}/transfers", json=patient(11)), 201)
    lossy_t = ok(await c.post(f"{API}/transfers", json=patient(12)), 201)
    perfect = await open_trip(c, perfect_t["vehicle_id"], perfect_t["id"])
    lossy = await open_trip(c, lossy_t["vehicle_id"], lossy_t["id"])
    assert perfect["vehicle_id"] != lossy["vehicle_id"]
    await steps(c, perfect["id"], "perfect", STEPS)

    outbox = {step: {"step": step, "at": f"2022-11-20T09:{n:02d}:10+08:00",
                     "client_event_id": f"lossy-{n}"} for n, step in enumerate(STEPS, start=1)}
    sent = 0

    async def send(body: dict[str, Any]) -> None:
        nonlocal sent
        await asyncio.sleep(rng.random() * 0.02)  # delayed: overtaken by later steps
        if rng.random() < 0.3:
            return  # lost on the way
        sent += 1
        resp = await c.post(f"{API}/trips/{lossy['id']}/steps", json=body)
        if resp.status_code == 409:
            assert resp.json()["code"] == "patient_not_aboard", resp.text
            return
        assert resp.status_code == 200, resp.text
        if rng.random() < 0.3:
            return  # applied, but the answer was lost: resent next round
        outbox.pop(body["step"], None)

    for _ in range(200):
        if not outbox:
            break
        batch = list(outbox.values())
        rng.shuffle(batch)
        await asyncio.gather(*(send(b) for b in batch))
    assert not outbox and sent > len(STEPS)

    got = ok(await c.get(f"{API}/trips/{lossy['id']}"))
    want = ok(await c.get(f"{API}/trips/{perfect['id']}"))
    assert comparable(got) == comparable(want), (got, want)
    await transfer_is(c, lossy_t["id"], status="handed_over")
    await vehicle_status(c, lossy["vehicle_id"], "awaiting_disinfection")


NOTICE_SECRET = "his-gateway-secret"


def notice_env(receiver: Receiver) -> dict[str, str]:
    """Notices to the receiver; unacknowledged after 5 s: resent once, then escalated. (The
    acknowledged trip must be acknowledged within that window, on a busy CI machine too.)"""
    return {"CLOSEDLOOP_TRANSFER_NOTICE_WEBHOOK_URL": receiver.url,
            "CLOSEDLOOP_TRANSFER_NOTICE_WEBHOOK_SECRET": NOTICE_SECRET,
            "CLOSEDLOOP_TRANSFER_NOTICE_RETRY_BASE_S": "0.05",
            "CLOSEDLOOP_TRANSFER_NOTICE_ACK_TIMEOUT_S": "5",
            "CLOSEDLOOP_TRANSFER_NOTICE_MAX_RESENDS": "1",
            "CLOSEDLOOP_TRANSFER_NOTICE_CHECK_INTERVAL_S": "0.1"}


def notices_to(receiver: Receiver, trip_id: str) -> list[dict[str, Any]]:
    out = []
    for r in receiver.received:
        body = json.loads(r.body)
        if body.get("trip_id") == trip_id:
            assert verify(NOTICE_SECRET, r.body, r.headers["x-closedloop-signature"])
            out.append(body)
    return out


async def trip_notice(c: httpx.AsyncClient, trip_id: str, status: str) -> dict[str, Any]:
    async def probe() -> Any:
        t = ok(await c.get(f"{API}/trips/{trip_id}"))
        return t if t["notice"] and t["notice"]["status"] == status else None

    found: dict[str, Any] = await eventually(probe, f"the notice of {trip_id} to be {status}")
    return found


async def pre_arrival_notice_and_positions(c: httpx.AsyncClient, receiver: Receiver) -> None:
    """The patient aboard, the hospital gets a signed notice (ETA, category, condition), the
    first sending retried past a 503. One hospital acknowledges: nothing more. The other does
    not: resent after the timeout, then escalated to the dispatcher. Positions many a minute
    become a thinned track, and the ETA follows the last one."""
    await load_reference_data(c)
    ok(await c.post(f"{API}/vehicles", json=SECOND_NPA), 201)
    acked_t = ok(await c.post(f"{API}/transfers", json=patient(21)), 201)
    silent_t = ok(await c.post(f"{API}/transfers", json=patient(22)), 201)
    acked = await open_trip(c, acked_t["vehicle_id"], acked_t["id"])
    silent = await open_trip(c, silent_t["vehicle_id"], silent_t["id"])
    pickup = {"lat": 38.2750, "lon": 106.2400}

    await steps(c, acked["id"], "ack", STEPS[:4], position=pickup)
    issued = await trip_notice(c, acked["id"], "issued")
    assert issued["notice"]["eta_minutes"] and issued["notice"]["eta_minutes"] > 10, issued
    delivered = await eventually(lambda: _delivered(c, acked["id"]), "the notice delivered")
    assert delivered["notice"]["delivery"] == "delivered"
    sent = notices_to(receiver, acked["id"])
    assert [b["attempt"] for b in sent] == [1, 1], sent  # a 503 first, retried
    body = sent[-1]
    assert body["facility_id"] == acked_t["destination"] and body["risk_category"] == "isolation_site"
    assert body["condition"]["fever"] is True and body["eta_minutes"] == issued["notice"]["eta_minutes"]
    ack = {"notice_id": body["notice_id"], "acknowledged_by": "急诊预检分诊台",
           "at": "2022-11-20T09:05:00+08:00"}
    done = ok(await c.post(f"{API}/trips/{acked['id']}/pre-arrival-notice/ack", json=ack))
    assert done["applied"] is True and done["notice"]["status"] == "acknowledged"
    again = ok(await c.post(f"{API}/trips/{acked['id']}/pre-arrival-notice/ack", json=ack))
    assert again["applied"] is False
    wrong = await c.post(f"{API}/trips/{acked['id']}/pre-arrival-notice/ack",
                         json={**ack, "notice_id": "nope"})
    assert wrong.status_code == 409 and wrong.json()["code"] == "notice_unknown"

    await steps(c, silent["id"], "sil", STEPS[:4])
    escalated = await trip_notice(c, silent["id"], "escalated")
    assert escalated["notice"]["sendings"] == 2, escalated
    attempts = sorted({b["attempt"] for b in notices_to(receiver, silent["id"])})
    assert attempts == [1, 2], attempts
    still = ok(await c.get(f"{API}/trips/{acked['id']}"))
    assert still["notice"]["status"] == "acknowledged" and still["notice"]["sendings"] == 1

    # positions: many a minute, a point of the track when moved 200 m or a minute passed
    def at(seconds: int) -> str:
        return f"2022-11-20T09:{10 + seconds // 60:02d}:{seconds % 60:02d}+08:00"

    route = [(0, 38.3000), (10, 38.3002), (20, 38.3004), (30, 38.3100), (40, 38.3101), (110, 38.3102)]
    recorded = []
    for seconds, lat in route:
        resp = ok(await c.post(f"{API}/trips/{acked['id']}/positions",
                               json={"location": {"lat": lat, "lon": 106.2450}, "at": at(seconds)}), 202)
        recorded.append(resp["recorded"])
    assert recorded == [True, False, False, True, False, True], recorded
    late = ok(await c.post(f"{API}/trips/{acked['id']}/positions",
                           json={"location": {"lat": 38.2, "lon": 106.2}, "at": at(5)}), 202)
    assert late["recorded"] is False  # an older position arriving late changes nothing
    now = ok(await c.get(f"{API}/trips/{acked['id']}"))
    assert len(now["track"]) == 3 and now["position"]["location"]["lat"] == 38.3102
    assert 0 < now["position"]["eta_minutes"] < issued["notice"]["eta_minutes"], now["position"]


async def _delivered(c: httpx.AsyncClient, trip_id: str) -> Any:
    t = ok(await c.get(f"{API}/trips/{trip_id}"))
    return t if t["notice"] and t["notice"]["delivery"] == "delivered" else None
