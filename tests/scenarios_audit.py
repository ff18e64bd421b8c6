"""The audit scenario: the flows that exist today, driven through the public API, then
every audit view checked against what happened. Runs unchanged on the embedded app and
on the distributed processes (tests/e2e/test_projection_*.py).

What happens (device times run on a simulated clock starting two days ago, so that none is
ahead of the server's clock, which the services refuse; server times are real):
  T1 isolation-site fever patient, NPA nx-120-07, to the backup yc-second (yc-first past
     80%), handed over; two stages, swab, negative result on time; vehicle released.
  T2 home-monitoring person, dedicated yn-bus-02; swab result 8 h late (R14).
  T3 stroke in a sealed area by a direct 120 call: priority 1, nx-120-07, reported by
     120, to the specialty hospital nx-cardio (R6); swab collected (vehicle released by
     policy), then...
  T4 another isolation fever patient rides nx-120-07 while T3's result is pending;
     T3's result comes back positive: quarantine, exposure list = T3 and T4 (not T1).
  T5 isolation fever patient queued (no NPA free), assigned by hand to the ordinary
     ambulance yc-amb-03 with an override reason (R3, R5 overrides).
  T6 a confirmed case from a fever clinic: to a designated hospital, yc-first, whose full
     fever clinic does not close its designated ward (R6, R7, R13). The audit's catching
     what the command side would let through is tested on forbidden histories appended
     straight into a store (tests/unit/test_projection_findings.py, tests/integration/).
"""

from __future__ import annotations

import csv
import io
import json
import zipfile
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from sqlalchemy import text

from libs.events.envelope import Envelope
from libs.events.store import EventStore
from tests.actors import as_
from tests.scenarios import (
    API,
    STEPS,
    TRANSFER,
    eventually,
    load_reference_data,
    ok,
    open_cycle,
    trip_of,
    vehicle_status,
)

AMBULANCE = {"id": "yc-amb-03", "plate": "宁A·12003", "kind": "ambulance", "dedicated_pool": False,
             "life_support": True, "station": "银川市急救中心", "location": {"lat": 38.47, "lon": 106.27}}
HOME = {**TRANSFER, "patient": {"name": "李四", "id_number": "64012119900307007X", "phone": "13900139000"},
        "risk_category": "home_monitoring", "condition": {"fever": False, "critical": False},
        "origin": {"kind": "home", "name": "永宁县杨和镇某小区",
                   "location": {"lat": 38.28, "lon": 106.24}},
        "requested_by": {"channel": "community", "org": "杨和镇社区"}}
STROKE = {**TRANSFER, "patient": {"name": "王五", "phone": "13700137000"},
          "risk_category": "sealed_area", "condition": {"critical": True, "kind": "stroke"},
          "origin": {"kind": "home", "name": "永宁县封控小区", "location": {"lat": 38.27, "lon": 106.25}},
          "purpose": "emergency", "return_required": False,
          "requested_by": {"channel": "direct_call", "name": "家属"}}
CONFIRMED = {**TRANSFER, "patient": {"name": "赵七"}, "risk_category": "confirmed",
             "condition": {"fever": True}, "purpose": "transfer_to_designated", "return_required": False,
             "origin": {"kind": "fever_clinic", "name": "银川市第二人民医院发热门诊",
                        "location": {"lat": 38.48, "lon": 106.27}},
             "requested_by": {"channel": "hospital_his", "org": "银川市第二人民医院"}}
OVERRIDE_REASON = "负压车均在途，患者病情不允许等待"


class Clock:
    """Device times: a simulated clock that starts two days ago and only moves forward."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC).replace(microsecond=0) - timedelta(days=2)

    def tick(self, minutes: float = 1) -> str:
        self.now += timedelta(minutes=minutes)
        return self.now.isoformat()


def stage(kind: str, start: datetime, where: str) -> dict[str, Any]:
    end = start + timedelta(minutes=35)
    return {"stage": kind, "disinfectant": "chlorine", "concentration_mg_per_l": 1000,
            "method": "wipe_and_spray", "started_at": start.isoformat(), "ended_at": end.isoformat(),
            "operator": "王五", "location": where,
            "video": {"camera_id": f"cam-{kind}", "clip_ref": f"nvr://wash/{kind}/{start:%Y%m%dT%H%M}",
                      "from": (start - timedelta(minutes=1)).isoformat(),
                      "to": (end + timedelta(minutes=1)).isoformat()}}


async def drive(c: httpx.AsyncClient, clock: Clock, trip_id: str, prefix: str, facility: str) -> None:
    for n, step in enumerate(STEPS[:-1], start=1):
        body = {"step": step, "at": clock.tick(3), "client_event_id": f"{prefix}-{n}"}
        ok(await c.post(f"{API}/trips/{trip_id}/steps", json=body))
    handover = {"facility_id": facility, "received_by": "李医生", "at": clock.tick(4)}
    ok(await c.post(f"{API}/trips/{trip_id}/handover", json=handover))


async def disinfect(c: httpx.AsyncClient, clock: Clock, vehicle_id: str, sample_id: str) -> dict[str, Any]:
    cycle = await open_cycle(c, vehicle_id)
    clock.tick(5)
    ok(await c.post(f"{API}/disinfection/cycles/{cycle['id']}/stages",
                    json=stage("initial", clock.now, "洗消点")), 201)
    clock.tick(40)
    ok(await c.post(f"{API}/disinfection/cycles/{cycle['id']}/stages",
                    json=stage("terminal", clock.now, "急救站洗消间")), 201)
    clock.tick(40)
    swab = {"sample_id": sample_id, "sites": ["stretcher", "handrail", "door_handle", "seat"],
            "collected_by": "赵六", "collected_at": clock.now.isoformat()}
    ok(await c.post(f"{API}/disinfection/cycles/{cycle['id']}/swabs", json=swab), 201)
    return cycle


async def result(c: httpx.AsyncClient, sample_id: str, value: str, at: datetime) -> None:
    body = {"result": value, "lab": "永宁县人民医院检验科", "reported_at": at.isoformat()}
    ok(await c.post(f"{API}/disinfection/swabs/{sample_id}/result", json=body))


async def run(c: httpx.AsyncClient) -> dict[str, Any]:
    clock = Clock()
    await load_reference_data(c)
    ok(await c.post(f"{API}/vehicles", json=AMBULANCE), 201)
    ids: dict[str, Any] = {"clock_start": clock.now}

    t1 = ok(await c.post(f"{API}/transfers", json=TRANSFER), 201)
    assert (t1["vehicle_id"], t1["destination"]) == ("nx-120-07", "yc-second"), t1
    trip1 = await trip_of(c, "nx-120-07", t1["id"])
    await drive(c, clock, trip1["id"], "t1", "yc-second")
    await disinfect(c, clock, "nx-120-07", "S-T1")
    await result(c, "S-T1", "negative", clock.now + timedelta(hours=3))
    await vehicle_status(c, "nx-120-07", "available")

    t2 = ok(await c.post(f"{API}/transfers", json=HOME), 201)
    assert t2["vehicle_id"] == "yn-bus-02", t2
    trip2 = await trip_of(c, "yn-bus-02", t2["id"])
    await drive(c, clock, trip2["id"], "t2", t2["destination"])
    await disinfect(c, clock, "yn-bus-02", "S-T2")
    await result(c, "S-T2", "negative", clock.now + timedelta(hours=8))  # late: R14

    t3 = ok(await c.post(f"{API}/transfers", json=STROKE), 201)
    assert (t3["priority"], t3["vehicle_id"], t3["destination"]) == (1, "nx-120-07", "nx-cardio"), t3
    trip3 = await trip_of(c, "nx-120-07", t3["id"])
    await drive(c, clock, trip3["id"], "t3", t3["destination"])
    await disinfect(c, clock, "nx-120-07", "S-T3")
    await vehicle_status(c, "nx-120-07", "available")  # released when the swab was taken

    t4 = ok(await c.post(f"{API}/transfers", json={**TRANSFER, "patient": {"name": "孙八"}}), 201)
    assert t4["vehicle_id"] == "nx-120-07", t4
    trip4 = await trip_of(c, "nx-120-07", t4["id"])
    await result(c, "S-T3", "positive", clock.now + timedelta(hours=4))
    await vehicle_status(c, "nx-120-07", "quarantined")

    t5 = ok(await c.post(f"{API}/transfers", json={**TRANSFER, "patient": {"name": "周九"}}), 201)
    assert t5["status"] == "queued", t5
    assigned = ok(await c.post(f"{API}/transfers/{t5['id']}/assign",
                               json={"vehicle_id": "yc-amb-03", "override_reason": OVERRIDE_REASON},
                               headers=as_(c, "dispatcher", "dispatcher-zhang")))
    assert assigned["vehicle_id"] == "yc-amb-03"
    trip5 = await trip_of(c, "yc-amb-03", t5["id"])

    t6 = ok(await c.post(f"{API}/transfers", json=CONFIRMED), 201)
    ids.update(t1=t1["id"], t2=t2["id"], t3=t3["id"], t4=t4["id"], t5=t5["id"], t6=t6["id"],
               trip1=trip1["id"], trip3=trip3["id"], trip4=trip4["id"], trip5=trip5["id"],
               t6_destination=t6["destination"])
    return ids


async def settled(c: httpx.AsyncClient, ids: dict[str, Any]) -> None:
    """The projection learns from events, later: wait until it has seen the last ones."""
    async def probe() -> bool:
        r = await c.get(f"{API}/audit/transfers/{ids['t6']}/timeline")
        if r.status_code != 200:
            return False
        custody = (await c.get(f"{API}/audit/vehicles/nx-120-07/custody")).json()
        quarantined = any(cy.get("quarantined") for link in custody.get("links", [])
                          for cy in link.get("cycles", []))
        t5 = (await c.get(f"{API}/audit/transfers/{ids['t5']}/timeline")).json()
        return quarantined and any(e["type"] == "TripOpened" for e in t5.get("entries", []))

    await eventually(probe, "the projection to catch up")
    await caught_up(c)


async def caught_up(c: httpx.AsyncClient) -> dict[str, Any]:
    """Until the projection's copy of every store holds as many events as the store
    (each service says how many it has: /audit/verify asks them)."""
    async def probe() -> Any:
        chains = ok(await c.get(f"{API}/audit/verify"))["chains"]
        stores = [k.split(":", 1)[1] for k in chains if k.startswith("store:")]
        return chains if all(chains[f"copy:{s}"]["events"] == chains[f"store:{s}"]["events"]
                             for s in stores) else None

    found: dict[str, Any] = await eventually(probe, "the projection's copy to hold every store's events")
    return found


async def check_views(c: httpx.AsyncClient, ids: dict[str, Any]) -> None:
    await settled(c, ids)
    # -- timeline of T1: every step, both clocks, actors, place, reasons, notifications ---------
    tl = ok(await c.get(f"{API}/audit/transfers/{ids['t1']}/timeline"))
    # A vehicle's or a facility's id is no transfer (their registrations correlate by it).
    for other in ("nx-120-07", "yc-second"):
        assert ok(await c.get(f"{API}/audit/transfers/{other}/timeline"), 404)["code"] == "transfer_not_found"
    types = [e["type"] for e in tl["entries"]]
    for expected in ("TransferRequested", "TransferPrioritized", "DestinationAssigned", "VehicleAssigned",
                     "TransferReported", "TripOpened", "PatientHandedOver", "TripCompleted",
                     "CycleOpened", "InitialDisinfectionLogged", "TerminalDisinfectionLogged",
                     "SurfaceSwabCollected", "SwabResultRecorded", "VehicleReleased",
                     "VehicleReturnedToService"):
        assert expected in types, (expected, types)
    steps = [e["payload"]["step"] for e in tl["entries"] if e["type"] == "TripStepReported"]
    assert steps == list(STEPS[:-1]), steps
    assert tl["status"] == "awaiting_return_leg" and tl["return_required"] is True
    requested = tl["entries"][0]
    assert requested["type"] == "TransferRequested" and requested["place"] == TRANSFER["origin"]["name"]
    assert requested["payload"]["patient"]["id_number"] == "6401**********1231"  # masked
    assert requested["payload"]["patient"]["phone"] == "138****8000"
    assert "640121198001011231" not in str(tl) and "13800138000" not in str(tl)
    dest = next(e for e in tl["entries"] if e["type"] == "DestinationAssigned")
    assert "candidates" in dest["why"] and dest["place"] == "yc-second"
    step = next(e for e in tl["entries"] if e["type"] == "TripStepReported")
    assert step["occurred_at"] != step["recorded_at"]  # the phone's clock beside the server's
    sent = [(n["what"], n["state"]) for n in tl["notifications"]]
    assert sent[0] == ("报备 (R10)", "sent") and ("pre-arrival notice", "issued") in sent, sent

    # -- custody of nx-120-07: three trips, stages with footage, swabs, release, quarantine ----
    cu = ok(await c.get(f"{API}/audit/vehicles/nx-120-07/custody"))
    trips = [link["transfer_id"] for link in cu["links"] if link["trip_id"]]
    assert trips == [ids["t1"], ids["t3"], ids["t4"]], trips
    first = cu["links"][0]
    cycle = first["cycles"][0]
    assert cycle["initial"]["video"]["clip_ref"].startswith("nvr://wash/initial/")
    assert cycle["terminal"]["video"]["clip_ref"].startswith("nvr://wash/terminal/")
    assert cycle["swabs"][0]["result"] == "negative" and cycle["released"]
    assert first["returned_to_service"] is not None
    third_cycle = cu["links"][1]["cycles"][0]
    assert third_cycle["swabs"][0]["result"] == "positive" and third_cycle["quarantined"]

    # -- findings ----------------------------------------------------------------------------
    found = ok(await c.get(f"{API}/audit/violations"))
    by_check = {(f["rule"], f["check"]): f for f in found["findings"]}
    assert ("R14", "swab_result_overdue") in by_check
    assert by_check[("R14", "swab_result_overdue")]["vehicle_id"] == "yn-bus-02"
    override = by_check[("override", "manual_assignment_override")]
    assert override["transfer_id"] == ids["t5"] and override["actors"] == [
        {"actor": "dispatcher-zhang", "role": "dispatcher"}]
    assert by_check[("R3", "vehicle_not_dedicated")]["kind"] == "override"
    assert by_check[("R5", "negative_pressure_required")]["kind"] == "override"
    assert ids["t6_destination"] == "yc-first"
    for forbidden in ("R1", "R2", "R4", "R6", "R7", "R8", "R9", "R10", "R12", "R13"):
        assert not [f for f in found["findings"] if f["rule"] == forbidden], (forbidden, found["findings"])
    # R11: T1 and T2 were handed over two days ago (the crews' clocks) and neither came back
    # nor was admitted; T3 needed no return leg.
    assert {f["transfer_id"] for f in found["findings"] if f["rule"] == "R11"} == {ids["t1"], ids["t2"]}
    assert {r["status"] for r in found["rules"]} == {"checked"}
    only_r14 = ok(await c.get(f"{API}/audit/violations", params={"rule": "R14"}))
    assert {f["rule"] for f in only_r14["findings"]} == {"R14"}
    by_vehicle = ok(await c.get(f"{API}/audit/violations", params={"vehicle_id": "yc-amb-03"}))
    assert by_vehicle["total"] >= 3 and all(f["vehicle_id"] == "yc-amb-03" for f in by_vehicle["findings"])

    # -- exposures: T3 (its own cycle) and T4 (carried while the result was pending) -----------
    ex = ok(await c.get(f"{API}/audit/exposures", params={"vehicle_id": "nx-120-07"}))["exposures"]
    assert len(ex) == 1 and ex[0]["sample_id"] == "S-T3" and ex[0]["since_negative_sample"] == "S-T1"
    assert [t["transfer_id"] for t in ex[0]["transfers"]] == [ids["t3"], ids["t4"]]
    assert ex[0]["transfers"][0]["patient"]["phone"] == "137****7000"
    # The list the disinfection service produced for it, read against the events: complete.
    produced = ex[0]["list"]
    assert produced is not None and produced["missing"] == [], produced
    assert ids["t3"] in produced["transfers"], produced
    assert produced["status"] == "unacknowledged" and produced["acknowledged"] == [], produced

    # -- indicators ---------------------------------------------------------------------------
    k = ok(await c.get(f"{API}/audit/kpis"))
    assert k["transfers"] == 6
    r2d = k["overall"]["segments"]["request_to_dispatch"]
    assert r2d["n"] == 5 and r2d["p95"] is not None and r2d["p95"] < 180
    assert k["overall"]["segments"]["at_pickup_to_at_destination"]["p50"] == 6 * 60  # two 3-min steps
    assert k["overall"]["segments"]["swab_turnaround"]["n"] == 3
    rate = k["overall"]["dispatch_within_3_min"]
    assert rate["met"] == 5 and rate["meets_target"] is True
    # 3分钟出车率, per trip from its dispatch to en route: by the server's clock (the crews'
    # phones here run on the scenario's clock, days before the server's), each left at once.
    departure = ok(await c.get(f"{API}/audit/kpis", params={"clock": "server"}))["overall"][
        "departure_within_3_min"]
    assert departure["counted"] >= 3 and departure["met"] == departure["counted"], departure
    assert set(k["by_facility"]) >= {"yc-second"}
    assert set(k["by_vehicle"]) >= {"nx-120-07", "yn-bus-02", "yc-amb-03"}
    assert "None" not in k["by_vehicle"] and "None" not in k["by_facility"]

    # -- the ledger: every trip by person, masked, with 报备; CSV and XLSX ----------------------
    ledger = ok(await c.get(f"{API}/audit/ledger"))["rows"]
    assert {r["transfer_id"] for r in ledger} == {ids[f"t{i}"] for i in range(1, 7)}
    li = next(r for r in ledger if r["transfer_id"] == ids["t2"])
    assert li["id_number"] == "6401**********007X" and li["reported"] == "已报备"
    assert li["vehicle_id"] == "yn-bus-02" and li["plate"] == "宁A·Z5022" and li["handed_over_at"]
    assert li["requested_at"].endswith("+08:00") and li["handed_over_at"].endswith("+08:00")  # local time
    waiting = next(r for r in ledger if r["transfer_id"] == ids["t6"])
    assert waiting["trip_id"] is None and waiting["status"] == "waiting"
    day = li["day"]
    resp = await c.get(f"{API}/audit/ledger", params={"date": day}, headers={"Accept": "text/csv"})
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/csv")
    text = resp.content.decode("utf-8-sig")
    table = list(csv.reader(io.StringIO(text)))
    assert table[0][:3] == ["日期", "姓名", "身份证号"] and len(table) == 1 + len(ledger)
    assert "640121198001011231" not in text and "6401**********1231" in text
    resp = await c.get(f"{API}/audit/ledger", params={"date": day, "format": "xlsx"})
    assert resp.status_code == 200
    with zipfile.ZipFile(io.BytesIO(resp.content)) as book:
        sheet = book.read("xl/worksheets/sheet1.xml").decode()
    assert "李四" in sheet and "6401**********007X" in sheet and "64012119900307007X" not in sheet

    # -- the live feed: resumable by Last-Event-ID ------------------------------------------------
    resp = await c.get(f"{API}/audit/stream", params={"follow": "false"})
    frames = [f for f in resp.text.split("\n\n") if f.startswith("id: ")]
    assert len(frames) > 50 and "13800138000" not in resp.text
    middle = int(frames[20].split("\n")[0][4:])
    resumed = await c.get(f"{API}/audit/stream", params={"follow": "false"},
                          headers={"Last-Event-ID": str(middle)})
    again = [f for f in resumed.text.split("\n\n") if f.startswith("id: ")]
    assert again[:len(frames) - 21] == frames[21:]

    # -- tamper evidence ------------------------------------------------------------------------
    verify = ok(await c.get(f"{API}/audit/verify"))
    assert verify["ok"], verify


async def rewrite_and_rehash(store: EventStore, position: int) -> list[Envelope]:
    """A forger with database access and the code: the event at `position` edited and every
    hash from it on recomputed, so the store's own chain is whole again. The events as they
    were."""
    stored = await store.read_all(0)
    prev = stored[position - 2].hash if position > 1 else "0" * 64
    async with store.engine.begin() as conn:
        for env in stored[position - 1:]:
            payload = {**env.payload, "note": "rewritten"} if env.position == position else env.payload
            env = env.model_copy(update={"payload": payload, "prev_hash": prev})
            prev = env.compute_hash()
            await conn.execute(
                text("UPDATE events SET payload = :p, prev_hash = :ph, hash = :h WHERE position = :n"),
                {"p": json.dumps(payload, sort_keys=True, ensure_ascii=False), "ph": env.prev_hash,
                 "h": prev, "n": env.position})
    return stored


def names_the_rewritten_event(entry: dict[str, Any], stored: list[Envelope], position: int) -> None:
    """/audit/verify's entry for that store: not ok, the first event that departs from the
    copy named, not the copy's last (what one comparison at the copy's end could say)."""
    brk = entry["first_break"]
    assert not entry["ok"] and brk["position"] == position, entry
    assert brk["event_id"] == str(stored[position - 1].event_id) and "re-hashed" in brk["reason"], entry
