"""Compliance findings from the event history: the audit's second line of defence.

Each check is a pure function of the fact rows (AuditData) and the time of asking. None
of them calls the command side's code: the rules are restated here from DOMAIN.md, so a
bug that let a forbidden history through the command side is still caught here (the
tests append such histories straight into a store).

A check names the event types it needs. Checks whose events the catalogue does not have
yet (overrides of issue 3, early release and exposure lists of issue 5, return legs and
aborts of issue 4) are written against the names we expect and reported as waiting, not
as passing; they switch on by themselves once those events are registered.
"""

from __future__ import annotations

import bisect
import hashlib
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from services.projection.data import AuditData, seconds, ts

log = logging.getLogger(__name__)

# SLAs and protocols, restated from DOMAIN.md and the seeds (issue 5 makes the protocols
# configurable on the command side; these are the audit's own copy on purpose).
REPORT_SLA = timedelta(minutes=15)  # R10: 报备 at once; flagged after this
FEVER_CLINIC_TRANSFER_SLA = timedelta(hours=2)  # R13: seeds 000/003, "2 小时" to report and move
SWAB_RESULT_SLA = timedelta(hours=6)  # R14: "4-6 小时回报核酸检测结果"
RETURN_LEG_SLA = timedelta(hours=24)  # R11
PROTOCOLS = {"chlorine": (1000.0, 30.0), "chlorine_dioxide": (500.0, 30.0)}  # mg/L, minutes
STAGE_FIELDS = ("disinfectant", "concentration_mg_per_l", "method", "started_at", "ended_at",
                "operator", "location")
VIDEO_FIELDS = ("camera_id", "clip_ref", "from", "to")
# R6, as DOMAIN.md states it: which facility roles fit which patients. Classes R6 says
# nothing about are not checked.
R6_ROLES = {
    "fever": {"fever_clinic", "temporary_emergency"},
    "cardio_cerebro": {"specialty_cardio_cerebro"},
    "confirmed": {"designated", "sub_designated", "fangcang"},
}
STAGE_ZH = {"initial": "首次消毒", "terminal": "终末消毒"}
NPA_AREAS = {"isolation_site", "sealed_area", "controlled_area"}
# What ends a vehicle's reservation on its own stream (the last two are expected from
# issue 3: cancellation and reassignment).
RESERVATION_ENDS = {"VehicleAwaitingDisinfection", "VehicleTakenOutOfService", "VehicleUnreserved",
                    "VehicleReassigned"}


@dataclass(frozen=True)
class Finding:
    rule: str
    check: str
    kind: str  # violation | override | sla
    at: str
    detail: str
    message_zh: str
    evidence: tuple[dict[str, Any], ...]
    transfer_id: str | None = None
    vehicle_id: str | None = None
    facility_id: str | None = None

    @property
    def id(self) -> str:
        ids = ",".join(sorted(str(e.get("event_id")) for e in self.evidence))
        return hashlib.sha256(f"{self.rule}:{self.check}:{ids}".encode()).hexdigest()[:16]

    def view(self) -> dict[str, Any]:
        actors = sorted({(e.get("actor") or "", e.get("role") or "") for e in self.evidence})
        return {
            "id": self.id, "rule": self.rule, "check": self.check, "kind": self.kind, "at": self.at,
            "transfer_id": self.transfer_id, "vehicle_id": self.vehicle_id,
            "facility_id": self.facility_id, "detail": self.detail, "message_zh": self.message_zh,
            "actors": [{"actor": a, "role": r} for a, r in actors],
            "evidence": [{k: e.get(k) for k in ("event_id", "type", "store", "at", "recorded_at",
                                                 "actor", "role")} for e in self.evidence],
        }


Check = Callable[[AuditData, datetime], Iterable[Finding]]


@dataclass(frozen=True)
class CheckSpec:
    rule: str
    code: str
    summary: str
    needs: frozenset[str]
    run: Check
    waiting_on: str | None = None  # which issue brings the events, while they are missing


def _ev(ref: dict[str, Any] | None, type_: str) -> dict[str, Any]:
    return {**(ref or {}), "type": type_}


def _log_ev(row: dict[str, Any]) -> dict[str, Any]:
    return {"event_id": row["event_id"], "type": row["type"], "at": row["at"],
            "recorded_at": row["recorded_at"], "actor": row["actor"], "role": row["role"],
            "store": "dispatch"}


def _after(a: str | None, b: str | None) -> bool:
    """a strictly after b (server clocks)."""
    d = seconds(b, a)
    return d is not None and d > 0


# -- R1 one patient, one vehicle ---------------------------------------------------------


def _vehicle_streams(data: AuditData) -> dict[str, list[dict[str, Any]]]:
    by: dict[str, list[dict[str, Any]]] = {}
    for row in data.vehicle_log:
        by.setdefault(row["vehicle_id"], []).append(row)
    for rows in by.values():
        rows.sort(key=lambda r: r["stream_version"])
    return by


def r1_reserved_twice(data: AuditData, now: datetime) -> Iterator[Finding]:
    for vehicle_id, rows in _vehicle_streams(data).items():
        holding: dict[str, Any] | None = None
        for row in rows:
            if row["type"] == "VehicleReserved":
                if holding is not None:
                    yield Finding(
                        "R1", "vehicle_reserved_twice", "violation", row["recorded_at"],
                        f"vehicle {vehicle_id} reserved for {row['transfer_id']} while still carrying "
                        f"{holding['transfer_id']}",
                        f"车辆{vehicle_id}在承担转运{holding['transfer_id']}期间又被派给{row['transfer_id']}（一人一车）",
                        (_log_ev(holding), _log_ev(row)), transfer_id=row["transfer_id"],
                        vehicle_id=vehicle_id)
                holding = row
            elif row["type"] in RESERVATION_ENDS:
                holding = None


# Ends of a trip other than TripCompleted (issue 4's abort), read when they exist.
TRIP_ENDS = {"TripAborted"}


def _trip_ends(data: AuditData) -> dict[str, str]:
    out: dict[str, str] = {}
    for row in data.others:
        if row["type"] in TRIP_ENDS:
            p = orjson.loads(row["data"]) if isinstance(row["data"], str) else row["data"]
            if p.get("trip_id"):
                out.setdefault(p["trip_id"], row["recorded_at"])
    return out


def r1_overlapping_trips(data: AuditData, now: datetime) -> Iterator[Finding]:
    """Independent of dispatch's stream: two trips of one vehicle open at once."""
    by: dict[str, list[dict[str, Any]]] = {}
    for trip in data.trips.values():
        if trip.get("opened") and trip.get("vehicle_id"):
            by.setdefault(trip["vehicle_id"], []).append(trip)
    ended = _trip_ends(data)
    for vehicle_id, trips in by.items():
        trips.sort(key=lambda t: (t["opened"]["recorded_at"], t["trip_id"]))
        for i, first in enumerate(trips):
            end = (first.get("completed") or {}).get("recorded_at") or ended.get(first["trip_id"])
            for later in trips[i + 1:]:
                if end is not None and not _after(end, later["opened"]["recorded_at"]):
                    break
                yield Finding(
                    "R1", "overlapping_trips", "violation", later["opened"]["recorded_at"],
                    f"vehicle {vehicle_id} opened trip {later['trip_id']} before trip "
                    f"{first['trip_id']} ended",
                    f"车辆{vehicle_id}上一趟转运未结束即开始新的转运（一人一车）",
                    (_ev(first["opened"], "TripOpened"), _ev(later["opened"], "TripOpened")),
                    transfer_id=later.get("transfer_id"), vehicle_id=vehicle_id)


# -- R2 no assignment before release -----------------------------------------------------


def r2_reserved_awaiting(data: AuditData, now: datetime) -> Iterator[Finding]:
    for vehicle_id, rows in _vehicle_streams(data).items():
        awaiting: dict[str, dict[str, Any]] = {}
        for row in rows:
            if row["type"] == "VehicleAwaitingDisinfection":
                awaiting[row["trip_id"]] = row
            elif row["type"] == "VehicleReturnedToService":
                awaiting.pop(row["trip_id"], None)
            elif row["type"] == "VehicleReserved" and awaiting:
                held = next(iter(awaiting.values()))
                yield Finding(
                    "R2", "reserved_before_release", "violation", row["recorded_at"],
                    f"vehicle {vehicle_id} reserved for {row['transfer_id']} while awaiting "
                    f"disinfection after trip {held['trip_id']}",
                    f"车辆{vehicle_id}洗消未放行即被派车（一车一消）",
                    (_log_ev(held), _log_ev(row)), transfer_id=row["transfer_id"],
                    vehicle_id=vehicle_id)


def r2_trip_before_release(data: AuditData, now: datetime) -> Iterator[Finding]:
    """Across stores: a trip opened after the vehicle's previous trip completed and before
    disinfection released it."""
    by: dict[str, list[dict[str, Any]]] = {}
    for trip in data.trips.values():
        if trip.get("vehicle_id") and trip.get("opened"):
            by.setdefault(trip["vehicle_id"], []).append(trip)
    for vehicle_id, trips in by.items():
        trips.sort(key=lambda t: (ts(t["opened"]["recorded_at"]), t["trip_id"]))
        opened_at = [ts(t["opened"]["recorded_at"]) for t in trips]
        for done in trips:
            completed = done.get("completed")
            if not completed:
                continue
            releases = [c["released"] for c in data.cycles_of_trip(done["trip_id"]) if c.get("released")]
            released_at = min((ts(r["recorded_at"]) for r in releases), key=_key, default=None)
            start = bisect.bisect_right(opened_at, ts(completed["recorded_at"]))  # type: ignore[type-var]
            for later in trips[start:]:
                opened = later["opened"]
                if released_at is not None and not (ts(opened["recorded_at"]) or released_at) < released_at:
                    break
                yield Finding(
                    "R2", "trip_before_release", "violation", opened["recorded_at"],
                    f"vehicle {vehicle_id} started trip {later['trip_id']} before disinfection "
                    f"released it after trip {done['trip_id']}",
                    f"车辆{vehicle_id}上一趟转运后未经洗消放行即再次出车（一车一消）",
                    (_ev(completed, "TripCompleted"), _ev(opened, "TripOpened"),
                     *(_ev(r, "VehicleReleased") for r in releases)),
                    transfer_id=later.get("transfer_id"), vehicle_id=vehicle_id)


def _key(t: datetime | None) -> datetime:
    return t or datetime.max.replace(tzinfo=UTC)


# -- R3 / R5 the right vehicle, and every override --------------------------------------


def needs_negative_pressure(risk_category: str | None, condition: dict[str, Any]) -> bool:
    covid_like = bool(condition.get("fever") or condition.get("covid_symptoms"))
    return risk_category in ("confirmed", "suspected") or (risk_category in NPA_AREAS and covid_like)


def _assignments(data: AuditData) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for d in data.decisions:
        if d["type"] == "VehicleAssigned":
            yield d, orjson.loads(d["data"]) if isinstance(d["data"], str) else d["data"]


def _decision_ev(d: dict[str, Any]) -> dict[str, Any]:
    return {"event_id": d["event_id"], "type": d["type"], "at": d["at"], "recorded_at": d["recorded_at"],
            "actor": d["actor"], "role": d["role"], "store": "dispatch"}


def broken_by_assignment(data: AuditData, transfer_id: str, vehicle_id: str) -> list[tuple[str, str, str]]:
    """(rule, code, why) for each vehicle rule this assignment breaks."""
    transfer = data.transfers.get(transfer_id) or {}
    request = transfer.get("request") or {}
    vehicle = data.vehicles.get(vehicle_id)
    if vehicle is None or not request:
        return []
    broken = []
    if not vehicle.get("dedicated_pool"):
        broken.append(("R3", "vehicle_not_dedicated",
                       f"risk transfer carried by {vehicle_id}, which is not in the dedicated pool"))
    if needs_negative_pressure(request.get("risk_category"), request.get("condition") or {}) and \
            vehicle.get("kind") != "negative_pressure_ambulance":
        broken.append(("R5", "negative_pressure_required",
                       f"{request.get('risk_category')} patient with fever/COVID-like symptoms carried by "
                       f"{vehicle.get('kind')} {vehicle_id}, not a negative-pressure ambulance"))
    return broken


def r3_r5_vehicle_fit(data: AuditData, now: datetime) -> Iterator[Finding]:
    for d, p in _assignments(data):
        for rule, code, why in broken_by_assignment(data, p["transfer_id"], p["vehicle_id"]):
            reason = p.get("override_reason")
            yield Finding(
                rule, code, "override" if reason else "violation", d["recorded_at"],
                why + (f"; overridden: {reason}" if reason else ""),
                ("专车专用：风险转运使用了非专用车辆" if rule == "R3" else "应使用负压救护车而未使用")
                + (f"（调度员改派理由：{reason}）" if reason else ""),
                (_decision_ev(d),), transfer_id=p["transfer_id"], vehicle_id=p["vehicle_id"])


def manual_overrides(data: AuditData, now: datetime) -> Iterator[Finding]:
    """Every manual assignment with an override reason, whether or not it broke a rule."""
    for d, p in _assignments(data):
        if p.get("manual") and p.get("override_reason"):
            yield Finding(
                "override", "manual_assignment_override", "override", d["recorded_at"],
                f"{d['actor']} ({d['role']}) assigned {p['vehicle_id']} by hand: {p['override_reason']}",
                f"{d['actor']}手动改派车辆{p['vehicle_id']}，理由：{p['override_reason']}",
                (_decision_ev(d),), transfer_id=p["transfer_id"], vehicle_id=p["vehicle_id"])


# Overrides that other issues will emit: type -> (rule, field holding the reason).
OVERRIDE_EVENTS = {
    "AssignmentOverridden": ("R3", "reason"),
    "TransferReprioritized": ("R4", "reason"),
    "VehicleReleasedEarly": ("R2", "reason"),
    "EarlyReleaseAuthorized": ("R2", "reason"),
}


def other_overrides(data: AuditData, now: datetime) -> Iterator[Finding]:
    for row in data.others:
        if row["type"] not in OVERRIDE_EVENTS:
            continue
        rule, field = OVERRIDE_EVENTS[row["type"]]
        p = orjson.loads(row["data"]) if isinstance(row["data"], str) else row["data"]
        rule = p.get("rule") or rule
        yield Finding(
            rule, f"{row['type']}", "override", row["recorded_at"],
            f"{row['actor']} ({row['role']}): {row['type']}: {p.get(field)}",
            f"{row['actor']}越权操作（{row['type']}），理由：{p.get(field)}",
            ({"event_id": row["event_id"], "type": row["type"], "at": row["at"],
              "recorded_at": row["recorded_at"], "actor": row["actor"], "role": row["role"]},),
            transfer_id=row.get("transfer_id"), vehicle_id=row.get("vehicle_id"))


# -- R4 critical first ------------------------------------------------------------------


def fits(vehicle: dict[str, Any], request: dict[str, Any]) -> bool:
    condition = request.get("condition") or {}
    if not vehicle.get("dedicated_pool"):
        return False
    if needs_negative_pressure(request.get("risk_category"), condition) and \
            vehicle.get("kind") != "negative_pressure_ambulance":
        return False
    return not (condition.get("critical") and not vehicle.get("life_support"))


def r4_priority_inversion(data: AuditData, now: datetime) -> Iterator[Finding]:
    """In dispatch's store order: a vehicle went to a transfer while a more urgent one it
    could carry waited in the queue."""
    waiting: dict[str, dict[str, Any]] = {}
    for d in sorted(data.decisions, key=lambda d: d["position"]):
        tid = d["transfer_id"]
        if d["type"] == "TransferQueued":
            waiting[tid] = d
        elif d["type"] == "VehicleAssigned":
            waiting.pop(tid, None)
            p = orjson.loads(d["data"]) if isinstance(d["data"], str) else d["data"]
            vehicle = data.vehicles.get(p["vehicle_id"])
            mine = (data.transfers.get(tid) or {}).get("priority")
            if vehicle is None or mine is None:
                continue
            for other_id, queued in waiting.items():
                other = data.transfers.get(other_id) or {}
                if other.get("priority") is not None and other["priority"] < mine and \
                        fits(vehicle, other.get("request") or {}):
                    yield Finding(
                        "R4", "priority_inversion", "violation", d["recorded_at"],
                        f"vehicle {p['vehicle_id']} went to {tid} (priority {mine}) while {other_id} "
                        f"(priority {other['priority']}) waited and could ride it",
                        f"车辆{p['vehicle_id']}派给了优先级{mine}的转运，而优先级{other['priority']}的转运{other_id}仍在排队",
                        (_decision_ev(queued), _decision_ev(d)), transfer_id=other_id,
                        vehicle_id=p["vehicle_id"])


# -- R6 / R7 destination --------------------------------------------------------------


def patient_class(request: dict[str, Any]) -> str:
    condition = request.get("condition") or {}
    if condition.get("critical") and condition.get("kind") in ("stroke", "chest_pain"):
        return "cardio_cerebro"
    if condition.get("critical"):
        return "critical"
    if request.get("risk_category") == "confirmed":
        return "confirmed"
    if condition.get("fever") or request.get("risk_category") == "suspected":
        return "fever"
    return "other"


def r6_destination_role(data: AuditData, now: datetime) -> Iterator[Finding]:
    for d in data.decisions:
        if d["type"] != "DestinationAssigned":
            continue
        p = orjson.loads(d["data"]) if isinstance(d["data"], str) else d["data"]
        request = (data.transfers.get(p["transfer_id"]) or {}).get("request") or {}
        facility = data.facilities.get(p["facility_id"])
        allowed = R6_ROLES.get(patient_class(request)) if request else None
        if facility is None or allowed is None:
            continue
        roles = set((facility.get("registered") or {}).get("roles") or [])
        if not roles & allowed:
            yield Finding(
                "R6", "destination_role_mismatch", "violation", d["recorded_at"],
                f"{patient_class(request)} patient sent to {p['facility_id']} (roles {sorted(roles)}), "
                f"which is none of {sorted(allowed)}",
                f"目的地{facility.get('name') or p['facility_id']}的职能与患者类别不符",
                (_decision_ev(d),), transfer_id=p["transfer_id"], facility_id=p["facility_id"])


def r7_overflowing_destination(data: AuditData, now: datetime) -> Iterator[Finding]:
    loads: dict[str, list[dict[str, Any]]] = {}
    for row in data.facility_loads:
        loads.setdefault(row["facility_id"], []).append(row)
    for rows in loads.values():
        rows.sort(key=lambda r: r["position"])
    for d in data.decisions:
        if d["type"] != "DestinationAssigned":
            continue
        p = orjson.loads(d["data"]) if isinstance(d["data"], str) else d["data"]
        before = [r for r in loads.get(p["facility_id"], []) if r["position"] < d["position"]]
        request = (data.transfers.get(p["transfer_id"]) or {}).get("request") or {}
        facility = data.facilities.get(p["facility_id"]) or {}
        other_wards = set((facility.get("registered") or {}).get("roles") or []) - {
            "fever_clinic", "backup"}
        # R7 is about the fever clinic: a full one does not close the hospital's other wards
        # (a severe confirmed case still goes to its designated ward), as dispatch reads it.
        if patient_class(request) != "fever" and other_wards:
            continue
        if before and before[-1]["overflowing"]:
            last = before[-1]
            yield Finding(
                "R7", "overflowing_destination", "violation", d["recorded_at"],
                f"{p['facility_id']} was past its overflow threshold (load {last['ratio']}) and still "
                "got a new patient instead of its backups",
                f"{p['facility_id']}发热门诊负荷已超过阈值，仍被指定为目的地，未启用备用医院",
                ({"event_id": last["event_id"], "type": "FacilityLoadReported", "at": last["at"],
                  "recorded_at": last["at"], "actor": "", "role": ""}, _decision_ev(d)),
                transfer_id=p["transfer_id"], facility_id=p["facility_id"])


# -- R8 two stages before release --------------------------------------------------------


def stage_problems(stage: dict[str, Any]) -> list[str]:
    """What a logged stage lacks against the protocol (checked again, independently)."""
    problems = [f"missing {f}" for f in STAGE_FIELDS if stage.get(f) in (None, "")]
    video = stage.get("video") or {}
    problems += [f"missing video.{f}" for f in VIDEO_FIELDS if not video.get(f)]
    started, ended = ts(stage.get("started_at")), ts(stage.get("ended_at"))
    protocol = PROTOCOLS.get(stage.get("disinfectant") or "")
    if protocol is None and stage.get("disinfectant"):
        problems.append(f"no protocol for {stage.get('disinfectant')}")
    if started and ended:
        minutes = (ended - started).total_seconds() / 60
        if protocol and minutes < protocol[1]:
            problems.append(f"contact time {minutes:.0f} min below {protocol[1]:g} min")
        vf, vt = ts(video.get("from")), ts(video.get("to"))
        if vf and vt and (vf > started or vt < ended):
            problems.append("video window does not cover the stage")
    conc = stage.get("concentration_mg_per_l")
    if protocol and isinstance(conc, int | float) and conc < protocol[0]:
        problems.append(f"concentration {conc:g} mg/L below {protocol[0]:g}")
    return problems


def r8_stages(data: AuditData, now: datetime) -> Iterator[Finding]:
    for cycle in data.cycles.values():
        vid, cid = cycle.get("vehicle_id"), cycle["cycle_id"]
        initial, terminal, released = cycle.get("initial"), cycle.get("terminal"), cycle.get("released")
        for name, ref in (("initial", initial), ("terminal", terminal)):
            if ref and (problems := stage_problems(ref.get("stage") or {})):
                yield Finding(
                    "R8", "stage_below_protocol", "violation", ref["recorded_at"],
                    f"{name} stage of cycle {cid}: " + "; ".join(problems),
                    f"{'首次' if name == 'initial' else '终末'}消毒记录不符合规程：" + "；".join(problems),
                    (_ev(ref, f"{name.capitalize()}DisinfectionLogged"),),
                    transfer_id=cycle.get("transfer_id"), vehicle_id=vid)
        if terminal and (initial is None or initial["v"] > terminal["v"]):
            yield Finding(
                "R8", "terminal_before_initial", "violation", terminal["recorded_at"],
                f"cycle {cid}: terminal stage logged before the initial stage",
                "终末消毒先于首次消毒登记", (_ev(terminal, "TerminalDisinfectionLogged"),),
                transfer_id=cycle.get("transfer_id"), vehicle_id=vid)
        if released:
            missing = [n for n, ref in (("initial", initial), ("terminal", terminal))
                       if ref is None or ref["v"] > released["v"]]
            if missing:
                yield Finding(
                    "R8", "released_without_both_stages", "violation", released["recorded_at"],
                    f"cycle {cid} released vehicle {vid} without the {' and '.join(missing)} stage",
                    f"车辆{vid}未完成{'、'.join(STAGE_ZH[m] for m in missing)}即被放行",
                    tuple(_ev(r, t) for r, t in ((released, "VehicleReleased"),
                                                 (cycle.get("opened"), "CycleOpened")) if r),
                    transfer_id=cycle.get("transfer_id"), vehicle_id=vid)


def r8_returned_without_terminal(data: AuditData, now: datetime) -> Iterator[Finding]:
    """Across stores: dispatch put the vehicle back in service, but no terminal stage of
    that trip's cycle was on record by then."""
    for trip in data.trips.values():
        returned = trip.get("returned")
        if not returned:
            continue
        cycles = data.cycles_of_trip(trip["trip_id"])
        vid = trip.get("vehicle_id") or returned.get("vehicle_id")
        terminals = [c["terminal"] for c in cycles if c.get("terminal")]
        if any(not _after(t["recorded_at"], returned["recorded_at"]) for t in terminals):
            continue
        yield Finding(
            "R8", "returned_without_terminal", "violation", returned["recorded_at"],
            f"vehicle {vid} returned to service after trip {trip['trip_id']} with no "
            "terminal disinfection on record",
            f"车辆{vid}未完成终末消毒即恢复可派状态",
            (_ev(returned, "VehicleReturnedToService"),
             *(_ev(c.get("opened"), "CycleOpened") for c in cycles if c.get("opened"))),
            transfer_id=trip.get("transfer_id"), vehicle_id=vid)


# -- R9 swabs and positives ---------------------------------------------------------------


def r9_released_without_swab(data: AuditData, now: datetime) -> Iterator[Finding]:
    for cycle in data.cycles.values():
        released = cycle.get("released")
        if not released:
            continue
        swabs = [s for s in data.swabs_of_cycle(cycle["cycle_id"])
                 if s.get("collected") and s["collected"]["v"] < released["v"]]
        if not swabs:
            yield Finding(
                "R9", "released_without_swab", "violation", released["recorded_at"],
                f"cycle {cycle['cycle_id']} released vehicle {cycle.get('vehicle_id')} with no surface swab",
                f"车辆{cycle.get('vehicle_id')}未做物体表面核酸采样即被放行",
                (_ev(released, "VehicleReleased"),), transfer_id=cycle.get("transfer_id"),
                vehicle_id=cycle.get("vehicle_id"))


def positives(data: AuditData) -> list[dict[str, Any]]:
    return sorted((s for s in data.swabs.values()
                   if (s.get("result") or {}).get("result") == "positive"),
                  key=lambda s: s["result"]["recorded_at"])


def r9_positive_handling(data: AuditData, now: datetime) -> Iterator[Finding]:
    for swab in positives(data):
        result = swab["result"]
        cycle = data.cycles.get(swab.get("cycle_id") or "") or {}
        vid = swab.get("vehicle_id")
        if not cycle.get("quarantined"):
            yield Finding(
                "R9", "positive_not_quarantined", "violation", result["recorded_at"],
                f"sample {swab['sample_id']} of vehicle {vid} positive, vehicle not quarantined",
                f"车辆{vid}物表核酸阳性，未停用隔离", (_ev(result, "SwabResultRecorded"),),
                transfer_id=cycle.get("transfer_id"), vehicle_id=vid)
        # After a positive, the vehicle carries nobody until a later swab comes back negative.
        cleared = min((s["result"]["recorded_at"] for s in data.swabs.values()
                       if s.get("vehicle_id") == vid and (s.get("result") or {}).get("result") == "negative"
                       and _after(s.get("collected_at"), result.get("reported_at") or result["recorded_at"])),
                      default=None)
        for trip in data.trips_of_vehicle(vid or ""):
            opened = trip["opened"]
            if _after(opened["recorded_at"], result["recorded_at"]) and (
                    cleared is None or _after(cleared, opened["recorded_at"])):
                yield Finding(
                    "R9", "trip_after_positive", "violation", opened["recorded_at"],
                    f"vehicle {vid} carried {trip.get('transfer_id')} after its positive swab "
                    f"{swab['sample_id']} and before a negative one",
                    f"车辆{vid}物表核酸阳性后未经复检阴性即再次出车",
                    (_ev(result, "SwabResultRecorded"), _ev(opened, "TripOpened")),
                    transfer_id=trip.get("transfer_id"), vehicle_id=vid)


# -- R10 报备 -------------------------------------------------------------------------------


def r10_reporting(data: AuditData, now: datetime) -> Iterator[Finding]:
    for tid, t in data.transfers.items():
        request = t.get("request")
        if not request:
            continue
        reported = t.get("reported")
        if reported is None:
            waited = now - (ts(request["recorded_at"]) or now)
            if waited > REPORT_SLA:
                yield Finding(
                    "R10", "not_reported", "sla", request["recorded_at"],
                    f"transfer {tid} not reported to the county health bureau after {waited}",
                    f"转运{tid}超过{int(REPORT_SLA.total_seconds() // 60)}分钟未向县卫健局报备",
                    (_ev(request, "TransferRequested"),), transfer_id=tid)
            continue
        late = seconds(request["recorded_at"], reported["recorded_at"])
        if late is not None and late > REPORT_SLA.total_seconds():
            yield Finding(
                "R10", "reported_late", "sla", reported["recorded_at"],
                f"transfer {tid} reported {late / 60:.0f} min after the request",
                f"转运{tid}报备延迟{late / 60:.0f}分钟",
                (_ev(request, "TransferRequested"), _ev(reported, "TransferReported")), transfer_id=tid)
        channel = (request.get("requested_by") or {}).get("channel")
        if channel == "direct_call" and reported.get("reported_by") != "120":
            yield Finding(
                "R10", "direct_call_not_reported_by_120", "violation", reported["recorded_at"],
                f"transfer {tid} came by a direct 120 call but was reported by {reported.get('reported_by')}",
                "患者直接拨打120的转运应由120向县卫健局报备",
                (_ev(reported, "TransferReported"),), transfer_id=tid)


# -- R11 the loop closes (waiting on issue 4) ------------------------------------------------


def r11_loop_closed(data: AuditData, now: datetime) -> Iterator[Finding]:
    """Return-required transfers handed over more than RETURN_LEG_SLA ago, with neither a
    return leg that ended nor an admission. Written against issue 4's expected events."""
    closed: set[str] = set()
    return_of: dict[str, str] = {}
    for row in data.others:
        p = orjson.loads(row["data"]) if isinstance(row["data"], str) else row["data"]
        if row["type"] in ("PatientAdmitted", "LoopClosed") and p.get("transfer_id"):
            closed.add(p["transfer_id"])
        elif row["type"] == "ReturnLegRequested" and p.get("return_transfer_id"):
            return_of[p["return_transfer_id"]] = p.get("transfer_id") or ""
    for rid, origin in return_of.items():
        if (data.transfers.get(rid) or {}).get("handed_over"):
            closed.add(origin)
    for tid, t in data.transfers.items():
        request = t.get("request") or {}
        handed = t.get("handed_over")
        if not request.get("return_required") or not handed or tid in closed:
            continue
        if now - (ts(handed["recorded_at"]) or now) > RETURN_LEG_SLA:
            yield Finding(
                "R11", "loop_not_closed", "sla", handed["recorded_at"],
                f"transfer {tid} needs the return leg; neither returned nor admitted",
                f"转运{tid}需闭环返回，至今未返回也未收治入院", (_ev(handed, "TransferHandedOver"),),
                transfer_id=tid)


# -- R12 the ledger names everyone ---------------------------------------------------------


def r12_trip_without_request(data: AuditData, now: datetime) -> Iterator[Finding]:
    for trip in data.trips.values():
        tid = trip.get("transfer_id")
        if trip.get("opened") and tid and not (data.transfers.get(tid) or {}).get("request"):
            yield Finding(
                "R12", "trip_without_request", "violation", trip["opened"]["recorded_at"],
                f"trip {trip['trip_id']} of vehicle {trip.get('vehicle_id')} has no transfer request: "
                "the ledger cannot name who rode",
                "出车记录无对应转运申请，台账无法登记人员", (_ev(trip["opened"], "TripOpened"),),
                transfer_id=tid, vehicle_id=trip.get("vehicle_id"))


# -- R13 fever-clinic cases move at once ------------------------------------------------------


def r13_fever_clinic_cases(data: AuditData, now: datetime) -> Iterator[Finding]:
    for tid, t in data.transfers.items():
        request = t.get("request") or {}
        from_clinic = t.get("origin_kind") == "fever_clinic" or t.get("risk_category") == "fever_clinic"
        case = request.get("risk_category") in ("confirmed", "suspected") or (
            t.get("risk_category") == "fever_clinic" and (request.get("condition") or {}).get("fever"))
        if not request or not from_clinic or not case:
            continue
        trip = data.first_trip(tid)
        handover = (trip or {}).get("handover")
        end = handover["at"] if handover else None
        hours = int(FEVER_CLINIC_TRANSFER_SLA.total_seconds() // 3600)
        took = seconds(request["at"], end) if end else (now - (ts(request["at"]) or now)).total_seconds()
        if took is not None and took > FEVER_CLINIC_TRANSFER_SLA.total_seconds():
            yield Finding(
                "R13", "fever_clinic_case_delayed", "sla", end or request["recorded_at"],
                f"case {tid} from a fever clinic reached the designated hospital after {took / 60:.0f} min"
                if end else f"case {tid} from a fever clinic not yet at a designated hospital after "
                f"{took / 60:.0f} min",
                f"发热门诊疑似/确诊病例{tid}未在{hours}小时内转运至定点医院（责任倒查）",
                tuple(e for e in (_ev(request, "TransferRequested"),
                                  _ev(handover, "PatientHandedOver") if handover else None) if e),
                transfer_id=tid, vehicle_id=t.get("vehicle_id"), facility_id=t.get("destination_id"))
        dest = data.facilities.get(t.get("destination_id") or "")
        if dest and "designated" not in ((dest.get("registered") or {}).get("roles") or []):
            yield Finding(
                "R13", "fever_clinic_case_not_to_designated", "violation",
                (t.get("destination") or {}).get("recorded_at") or request["recorded_at"],
                f"case {tid} from a fever clinic sent to {t.get('destination_id')}, "
                "not a designated hospital",
                "发热门诊疑似/确诊病例未转运至定点医院", (_ev(t.get("destination"), "DestinationAssigned"),),
                transfer_id=tid, facility_id=t.get("destination_id"))


# -- R14 swab results on time -----------------------------------------------------------------


def r14_swab_overdue(data: AuditData, now: datetime) -> Iterator[Finding]:
    for sid, s in data.swabs.items():
        collected = s.get("collected")
        if not collected:
            continue
        result = s.get("result")
        start = s.get("collected_at") or collected["at"]
        if result is None:
            late = (now - (ts(start) or now)).total_seconds()
            what = f"no result for sample {sid} after {late / 3600:.1f} h"
        else:
            late = seconds(start, result.get("reported_at") or result["recorded_at"]) or 0.0
            what = f"result for sample {sid} came {late / 3600:.1f} h after collection"
        if late > SWAB_RESULT_SLA.total_seconds():
            yield Finding(
                "R14", "swab_result_overdue", "sla", result["recorded_at"] if result else start,
                what, f"样本{sid}核酸结果超过{int(SWAB_RESULT_SLA.total_seconds() // 3600)}小时未回报",
                tuple(_ev(r, t) for r, t in ((collected, "SurfaceSwabCollected"),
                                             (result, "SwabResultRecorded")) if r),
                vehicle_id=s.get("vehicle_id"))


CHECKS: tuple[CheckSpec, ...] = (
    CheckSpec("R1", "vehicle_reserved_twice", "a vehicle reserved again before its trip ended",
              frozenset({"VehicleReserved", "VehicleAwaitingDisinfection"}), r1_reserved_twice),
    CheckSpec("R1", "overlapping_trips", "two trips of one vehicle open at once",
              frozenset({"TripOpened", "TripCompleted"}), r1_overlapping_trips),
    CheckSpec("R2", "reserved_before_release", "reserved while awaiting disinfection",
              frozenset({"VehicleAwaitingDisinfection", "VehicleReserved", "VehicleReturnedToService"}),
              r2_reserved_awaiting),
    CheckSpec("R2", "trip_before_release", "a trip started before disinfection released the vehicle",
              frozenset({"TripCompleted", "TripOpened", "VehicleReleased"}), r2_trip_before_release),
    CheckSpec("R3", "vehicle_not_dedicated", "risk transfer in a vehicle outside the dedicated pool",
              frozenset({"VehicleAssigned", "VehicleRegistered"}), r3_r5_vehicle_fit),
    CheckSpec("override", "manual_assignment_override", "every manual assignment with an override reason",
              frozenset({"VehicleAssigned"}), manual_overrides),
    CheckSpec("override", "overrides_of_other_services",
              "reprioritisation (issue 3), supervisor early release (issue 5)",
              frozenset({"TransferReprioritized", "VehicleReleasedEarly"}), other_overrides,
              waiting_on="TransferReprioritized (issue 3), VehicleReleasedEarly (issue 5)"),
    CheckSpec("R4", "priority_inversion", "a queued, more urgent transfer passed over for a vehicle it fits",
              frozenset({"TransferQueued", "VehicleAssigned", "TransferPrioritized"}), r4_priority_inversion),
    CheckSpec("R6", "destination_role_mismatch", "destination role does not fit the patient",
              frozenset({"DestinationAssigned", "FacilityRegistered"}), r6_destination_role),
    CheckSpec("R7", "overflowing_destination", "a facility past its threshold took a new patient",
              frozenset({"DestinationAssigned", "FacilityLoadReported"}), r7_overflowing_destination),
    CheckSpec("R8", "stages", "stage below protocol, terminal before initial, release without both stages",
              frozenset({"InitialDisinfectionLogged", "TerminalDisinfectionLogged", "VehicleReleased"}),
              r8_stages),
    CheckSpec("R8", "returned_without_terminal", "back in service with no terminal stage on record",
              frozenset({"VehicleReturnedToService", "TerminalDisinfectionLogged"}),
              r8_returned_without_terminal),
    CheckSpec("R9", "released_without_swab", "released with no surface swab",
              frozenset({"VehicleReleased", "SurfaceSwabCollected"}), r9_released_without_swab),
    CheckSpec("R9", "positive_handling", "a positive not quarantined, or the vehicle used again",
              frozenset({"SwabResultRecorded", "VehicleQuarantined"}), r9_positive_handling),
    CheckSpec("R10", "reporting", "not reported, reported late, or a direct call not reported by 120",
              frozenset({"TransferRequested", "TransferReported"}), r10_reporting),
    CheckSpec("R11", "loop_not_closed", "return leg neither done nor replaced by an admission",
              frozenset({"ReturnLegRequested", "PatientAdmitted"}), r11_loop_closed,
              waiting_on="ReturnLegRequested and PatientAdmitted (issue 4)"),
    CheckSpec("R12", "trip_without_request", "a trip the ledger cannot attribute to a person",
              frozenset({"TripOpened", "TransferRequested"}), r12_trip_without_request),
    CheckSpec("R13", "fever_clinic_cases", "fever-clinic cases not at a designated hospital in time",
              frozenset({"TransferRequested", "PatientHandedOver"}), r13_fever_clinic_cases),
    CheckSpec("R14", "swab_result_overdue", "swab result later than the lab SLA",
              frozenset({"SurfaceSwabCollected", "SwabResultRecorded"}), r14_swab_overdue),
)
# R5 is checked by r3_r5_vehicle_fit (listed under R3 above) and named in its findings.
ALSO_CHECKED_BY = {"R5": "vehicle_not_dedicated"}


def active_checks(known_types: set[str]) -> tuple[list[CheckSpec], list[CheckSpec]]:
    """(checks that run, checks waiting for events the catalogue does not have yet)."""
    running = [c for c in CHECKS if c.needs <= known_types]
    waiting = [c for c in CHECKS if not c.needs <= known_types]
    return running, waiting


def evaluate(data: AuditData, now: datetime, known_types: set[str],
             failed: list[dict[str, str]] | None = None) -> list[Finding]:
    """Every running check over the data. A check that trips over odd data is reported in
    `failed` (and logged), never allowed to hide the others' findings."""
    indexed = data.indexed()
    running, _ = active_checks(known_types)
    found: dict[str, Finding] = {}
    for check in running:
        try:
            for f in check.run(indexed, now):
                found.setdefault(f.id, f)
        except Exception as exc:
            log.exception("check %s %s failed", check.rule, check.code)
            if failed is not None:
                failed.append({"rule": check.rule, "check": check.code, "error": repr(exc)})
    return sorted(found.values(), key=lambda f: (f.at, f.rule, f.id))


def rules_status(known_types: set[str]) -> list[dict[str, Any]]:
    running, waiting = active_checks(known_types)
    out = [{"rule": c.rule, "check": c.code, "summary": c.summary, "status": "checked"}
           for c in running]
    out += [{"rule": c.rule, "check": c.code, "summary": c.summary, "status": "waiting",
             "waiting_on": c.waiting_on or ", ".join(sorted(c.needs - known_types))} for c in waiting]
    if "vehicle_not_dedicated" in {c.code for c in running}:
        out.append({"rule": "R5", "check": "negative_pressure_required",
                    "summary": "fever/COVID-like patients from risk areas in a negative-pressure ambulance",
                    "status": "checked"})
    return out


def registry_types() -> set[str]:
    """The event types the catalogue has registered: what decides which checks run."""
    import libs.events.catalog  # noqa: F401  (registers them)
    from libs.events.contracts import registry

    return set(registry.types())
