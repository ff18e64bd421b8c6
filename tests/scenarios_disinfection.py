"""Disinfection scenarios (issue 5) that run unchanged against the embedded app and the
distributed processes. The canonical requests are those of API-EXAMPLES.md, as written;
later trips shift their times so each vehicle's story reads in order."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import httpx

from tests.actors import as_
from tests.scenarios import (
    API,
    INITIAL,
    RESULT,
    SWAB,
    TERMINAL,
    TRANSFER,
    drive_to_handover,
    eventually,
    load_reference_data,
    ok,
    trip_of,
    vehicle_status,
)

NPA = "nx-120-07"
CAR = "yn-bus-02"
TIME_KEYS = ("started_at", "ended_at", "from", "to", "collected_at", "reported_at")


def shifted(body: dict[str, Any], hours: float) -> dict[str, Any]:
    """The same request, `hours` later."""
    out: dict[str, Any] = {}
    for k, v in body.items():
        if isinstance(v, dict):
            out[k] = shifted(v, hours)
        elif k in TIME_KEYS:
            out[k] = (datetime.fromisoformat(v) + timedelta(hours=hours)).isoformat()
        else:
            out[k] = v
    return out


def fever_patient(name: str, phone: str) -> dict[str, Any]:
    return {**TRANSFER, "patient": {"name": name, "phone": phone}}


async def ensure_reference_data(c: httpx.AsyncClient) -> None:
    if not ok(await c.get(f"{API}/vehicles")):
        await load_reference_data(c)


async def cycle_of(c: httpx.AsyncClient, vehicle_id: str, trip_id: str,
                   kind: str = "trip") -> dict[str, Any]:
    async def probe() -> Any:
        cycles = ok(await c.get(f"{API}/disinfection/cycles", params={"vehicle_id": vehicle_id}))
        return next((x for x in cycles if x["trip_id"] == trip_id and x["kind"] == kind), None)

    found: dict[str, Any] = await eventually(probe, f"the {kind} cycle of trip {trip_id}")
    return found


async def ride(c: httpx.AsyncClient, body: dict[str, Any], vehicle_id: str,
               tag: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A transfer that gets `vehicle_id`, driven to the handover; returns it and its cycle."""
    transfer = ok(await c.post(f"{API}/transfers", json=body), 201)
    assert transfer["vehicle_id"] == vehicle_id, transfer
    trip = await trip_of(c, vehicle_id, transfer["id"])
    await drive_to_handover(c, trip["id"], tag)
    return transfer, await cycle_of(c, vehicle_id, trip["id"])


async def disinfect(c: httpx.AsyncClient, cycle_id: str, hours: float) -> None:
    for body in (INITIAL, TERMINAL):
        ok(await c.post(f"{API}/disinfection/cycles/{cycle_id}/stages", json=shifted(body, hours)), 201)


async def swab(c: httpx.AsyncClient, cycle_id: str, sample_id: str, hours: float) -> dict[str, Any]:
    body = {**shifted(SWAB, hours), "sample_id": sample_id}
    found: dict[str, Any] = ok(await c.post(f"{API}/disinfection/cycles/{cycle_id}/swabs", json=body), 201)
    return found


async def result(c: httpx.AsyncClient, sample_id: str, outcome: str, hours: float) -> dict[str, Any]:
    body = {**shifted(RESULT, hours), "result": outcome}
    found: dict[str, Any] = ok(await c.post(f"{API}/disinfection/swabs/{sample_id}/result", json=body))
    return found


def problem(resp: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert resp.status_code == status, f"{resp.request.url}: {resp.status_code} {resp.text}"
    assert resp.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = resp.json()
    assert body["code"] == code and body["message_zh"], body
    return body


async def timeline_types(c: httpx.AsyncClient, transfer_id: str, wanted: set[str]) -> list[dict[str, Any]]:
    async def probe() -> Any:
        resp = await c.get(f"{API}/audit/transfers/{transfer_id}/timeline")
        if resp.status_code != 200:
            return None
        entries = resp.json()["entries"]
        return entries if wanted <= {e["type"] for e in entries} else None

    found: list[dict[str, Any]] = await eventually(probe, f"{wanted} on the timeline of {transfer_id}")
    return found


async def full_cycle_default_policy(c: httpx.AsyncClient) -> None:
    """Release after the terminal stage and a collected swab (the default); every refusal
    over HTTP names its rule or field; a negative result closes the cycle."""
    await ensure_reference_data(c)
    _, cycle = await ride(c, TRANSFER, NPA, "default")
    cid = cycle["id"]
    assert (cycle["status"], cycle["next_action"]) == ("open", "initial_stage")
    assert cycle["earliest_ready_at"] is not None
    stages = f"{API}/disinfection/cycles/{cid}/stages"

    assert problem(await c.post(stages, json=TERMINAL), 409, "terminal_before_initial")["rule"] == "R8"
    short = {**INITIAL, "ended_at": "2022-11-20T10:00:00+08:00"}  # 10 minutes of chlorine
    too_short = problem(await c.post(stages, json=short), 422, "contact_time_below_protocol")
    assert too_short["field"] == "ended_at" and too_short["earliest_end_at"] == "2022-11-20T10:20:00+08:00"
    weak = {**INITIAL, "concentration_mg_per_l": 500}
    assert problem(await c.post(stages, json=weak), 422,
                   "concentration_below_protocol")["field"] == "concentration_mg_per_l"
    video: dict[str, Any] = dict(INITIAL["video"])  # type: ignore[call-overload]
    blind = {**INITIAL, "video": {**video, "from": "2022-11-20T10:00:00+08:00"}}
    assert problem(await c.post(stages, json=blind), 422, "video_does_not_cover_stage")["field"] == "video"
    unsigned = {k: v for k, v in INITIAL.items() if k != "operator"}
    assert problem(await c.post(stages, json=unsigned), 422, "validation_failed")["field"] == "operator"
    no_clip = {**INITIAL, "video": {k: v for k, v in video.items() if k != "clip_ref"}}
    assert problem(await c.post(stages, json=no_clip), 422, "validation_failed")["field"] == "video.clip_ref"
    swabs = f"{API}/disinfection/cycles/{cid}/swabs"
    assert problem(await c.post(swabs, json=SWAB), 409, "swab_before_terminal")["rule"] == "R8"

    logged = ok(await c.post(stages, json=INITIAL), 201)
    assert logged["initial"]["video"]["clip_ref"] == INITIAL["video"]["clip_ref"]  # type: ignore[index]
    assert logged["initial"]["earliest_end_at"] == "2022-11-20T10:20:00+08:00"
    assert logged["next_action"] == "terminal_stage"
    ok(await c.post(stages, json=TERMINAL), 201)
    few = {**SWAB, "sites": ["stretcher", "seat"]}
    assert problem(await c.post(swabs, json=few), 422, "too_few_sites")["field"] == "sites"
    collected = ok(await c.post(swabs, json=SWAB), 201)
    assert collected["status"] == "released" and collected["release"]["policy"] == "after_swab_collected"
    assert collected["swabs"][0]["due_at"] == "2022-11-20T17:20:00+08:00"  # R14: 6 h
    await vehicle_status(c, NPA, "available")

    again = await c.post(f"{API}/disinfection/cycles/{cid}/swabs", json={**SWAB, "sample_id": "X-1"})
    problem(again, 409, "swab_not_needed")
    url = f"{API}/disinfection/swabs/{SWAB['sample_id']}/result"
    closed = ok(await c.post(url, json=RESULT))
    assert closed["status"] == "closed" and closed["swabs"][0]["turnaround_minutes"] == 225
    assert ok(await c.post(url, json=RESULT))["version"] == closed["version"]  # the lab resends
    problem(await c.post(url, json={**RESULT, "result": "positive"}), 409, "result_already_recorded")
    problem(await c.post(f"{API}/disinfection/swabs/NO-SUCH/result", json=RESULT), 404, "sample_not_found")
    protocols = ok(await c.get(f"{API}/disinfection/protocols"))
    assert protocols["surface"]["chlorine"]["min_concentration_mg_per_l"] == 1000
    assert protocols["air"]["hydrogen_peroxide"]["min_dose_ml_per_m3"] == 20


async def full_cycle_negative_result_policy(c: httpx.AsyncClient) -> None:
    """Release only after a negative result (CLOSEDLOOP_DISINFECTION_RELEASE_POLICY=
    after_negative_result): the vehicle waits for the lab; an invalid result asks for a new
    sample; the late result is flagged (R14); then the queued transfer gets the vehicle."""
    await ensure_reference_data(c)
    first, cycle = await ride(c, TRANSFER, NPA, "strict")
    await disinfect(c, cycle["id"], 0)
    held = await swab(c, cycle["id"], "STRICT-1", 0)
    assert held["status"] == "awaiting_result" and held["release"] is None
    waiting = ok(await c.post(f"{API}/transfers", json=fever_patient("李四", "13800138001")), 201)
    assert waiting["status"] == "queued"  # R2: no vehicle until the lab says negative

    async def flagged() -> Any:  # the sample dates from 2022: long past its 6 hours
        got = ok(await c.get(f"{API}/disinfection/cycles/{cycle['id']}"))
        return got if got["swabs"][0]["overdue"] else None

    await eventually(flagged, "the overdue flag (R14)")
    invalid = await result(c, "STRICT-1", "invalid", 0)
    assert (invalid["status"], invalid["next_action"]) == ("resample_required", "swab")
    await vehicle_status(c, NPA, "awaiting_disinfection")  # dispatch learns of the trip end in its own time
    await swab(c, cycle["id"], "STRICT-2", 1)
    negative = await result(c, "STRICT-2", "negative", 1)
    assert negative["status"] == "closed" and negative["release"]["policy"] == "after_negative_result"

    async def served() -> bool:
        t = ok(await c.get(f"{API}/transfers/{waiting['id']}"))
        return bool(t["vehicle_id"] == NPA and t["status"] == "assigned")

    await eventually(served, "the queued transfer to get the released vehicle")
    entries = await timeline_types(c, first["id"], {"SwabResultOverdue", "VehicleReleased"})
    overdue = next(e for e in entries if e["type"] == "SwabResultOverdue")
    assert overdue["payload"]["rule"] == "R14" and overdue["payload"]["sample_id"] == "STRICT-1"


async def positive_swab_after_two_more_trips(c: httpx.AsyncClient) -> None:
    """R9 under the default policy: trip A's swab is negative; trip T0's swab is collected
    and the vehicle released; it does T1 and T2; then T0's swab comes back positive. The
    vehicle is quarantined at once, a re-disinfection opens, and the exposure list holds
    exactly T0 (the swabbed trip), T1 and T2 (carried after it), with the patients, and
    not A. The re-disinfection's negative swab lifts the quarantine."""
    await ensure_reference_data(c)
    _, a = await ride(c, fever_patient("甲", "13800138010"), NPA, "pos-a")
    await disinfect(c, a["id"], 2)
    await swab(c, a["id"], "POS-A", 2)
    await result(c, "POS-A", "negative", 2)
    await vehicle_status(c, NPA, "available")

    rides: list[dict[str, Any]] = []
    for n, name in enumerate(("乙", "丙", "丁"), start=1):
        transfer, cycle = await ride(c, fever_patient(name, f"1380013802{n}"), NPA, f"pos-{n}")
        await disinfect(c, cycle["id"], 2 + n)
        await swab(c, cycle["id"], f"POS-{n}", 2 + n)
        await vehicle_status(c, NPA, "available")
        rides.append({"transfer": transfer, "cycle": cycle})
    t0, t1, t2 = rides

    quarantined = await result(c, "POS-1", "positive", 6)
    assert quarantined["status"] == "quarantined" and quarantined["positive_sample_id"] == "POS-1"
    await vehicle_status(c, NPA, "quarantined")
    waiting = ok(await c.post(f"{API}/transfers", json=fever_patient("戊", "13800138030")), 201)
    assert waiting["vehicle_id"] is None  # the only negative-pressure ambulance is out
    refused = await c.post(f"{API}/transfers/{waiting['id']}/assign", json={"vehicle_id": NPA})
    assert problem(refused, 409, "vehicle_quarantined")["rule"] == "R9"

    redo = await cycle_of(c, NPA, t0["cycle"]["trip_id"], kind="redisinfection")
    assert redo["status"] == "open" and redo["after_sample_id"] == "POS-1"
    early = await c.post(f"{API}/disinfection/cycles/{redo['id']}/release",
                         json={"reason": "急需用车"}, headers=as_(c, "supervisor", "supervisor-ma"))
    assert problem(early, 409, "quarantine_not_overridable")["rule"] == "R9"

    exposures = ok(await c.get(f"{API}/disinfection/exposures", params={"vehicle_id": NPA}))
    assert [x["sample_id"] for x in exposures] == ["POS-1"]
    exposure = exposures[0]
    assert exposure["status"] == "unacknowledged" and exposure["last_negative_sample_id"] == "POS-A"
    listed = [(t["transfer_id"], t["relation"], t["patient"]["name"], t["patient"]["phone"])
              for t in exposure["transfers"]]
    assert listed == [
        (t0["transfer"]["id"], "swabbed_trip", "乙", "13800138021"),
        (t1["transfer"]["id"], "after_swab", "丙", "13800138022"),
        (t2["transfer"]["id"], "after_swab", "丁", "13800138023"),
    ]

    # The re-disinfection follows the positive result (reported at 21:05, hour 6).
    await disinfect(c, redo["id"], 12)
    held = await swab(c, redo["id"], "POS-R", 12)
    assert held["status"] == "awaiting_result"  # a quarantine waits for a negative result
    assert ok(await c.get(f"{API}/vehicles/{NPA}"))["status"] == "quarantined"
    lifted = await result(c, "POS-R", "negative", 12)
    assert lifted["status"] == "closed" and lifted["release"]["quarantine_lifted"] is True

    async def served() -> bool:
        t = ok(await c.get(f"{API}/transfers/{waiting['id']}"))
        return bool(t["vehicle_id"] == NPA and t["status"] == "assigned")

    await eventually(served, "the queued transfer to get the vehicle back from quarantine")
    acked = ok(await c.post(f"{API}/disinfection/exposures/POS-1/acknowledge",
                            json={"note": "已通知疾控"}, headers=as_(c, "dispatcher", "dispatcher-wang")))
    assert acked["status"] == "acknowledged"
    assert acked["acknowledgements"] == [{"acknowledged_by": "dispatcher-wang", "note": "已通知疾控"}]
    entries = await timeline_types(c, t0["transfer"]["id"], {
        "VehicleQuarantined", "ExposureListProduced", "ExposureListAcknowledged", "CycleOpened"})
    produced = next(e for e in entries if e["type"] == "ExposureListProduced")
    assert produced["payload"]["rule"] == "R9" and len(produced["payload"]["transfers"]) == 3


async def supervisor_early_release(c: httpx.AsyncClient) -> None:
    """R2's override: only a supervisor, only with a reason; the release says what was
    skipped, and the audit shows who did it."""
    await ensure_reference_data(c)
    home = {**TRANSFER, "patient": {"name": "己"}, "risk_category": "home_monitoring",
            "condition": {"fever": False, "critical": False}}
    transfer, cycle = await ride(c, home, CAR, "early")
    url = f"{API}/disinfection/cycles/{cycle['id']}/release"
    ok(await c.post(f"{API}/disinfection/cycles/{cycle['id']}/stages", json=INITIAL), 201)
    body = {"reason": "重大交通事故，急需车辆"}
    refused = problem(await c.post(url, json=body, headers=as_(c, "dispatcher")), 403,
                      "role_not_permitted")
    assert refused["role"] == "dispatcher" and refused["allowed_roles"] == ["supervisor"]
    assert problem(await c.post(url, json={"reason": ""}, headers=as_(c, "supervisor", "supervisor-ma")), 422,
                   "validation_failed")["field"] == "reason"
    released = ok(await c.post(url, json=body, headers=as_(c, "supervisor", "supervisor-ma")))
    assert released["status"] == "released"
    assert released["release"] == {
        "policy": "supervisor_override", "override": True, "override_reason": body["reason"],
        "overridden_rules": ["R2", "R8"], "missing": ["terminal", "swab"], "quarantine_lifted": False}
    await vehicle_status(c, CAR, "available")
    entries = await timeline_types(c, transfer["id"], {"VehicleReleased"})
    audit = next(e for e in entries if e["type"] == "VehicleReleased")
    assert (audit["actor"], audit["role"]) == ("supervisor-ma", "supervisor")
    assert audit["payload"]["override"] is True and audit["payload"]["override_reason"] == body["reason"]
