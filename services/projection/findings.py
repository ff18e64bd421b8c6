"""Compliance findings from the event history: the audit's second line of defence.

Each check is a pure function of the fact rows (AuditData). None of them calls the command
side's code: the rules are restated here from DOMAIN.md, so a bug that let a forbidden
history through the command side is still caught here (the tests append such histories
straight into a store). None of them reads the clock either: a rule that breaks when
time passes without an event (报备 not filed, a swab result not back) gives a finding
whose `at` is the deadline, and a finding counts only once its `at` has come. So the
findings are a function of the events alone, and are kept as a read model
(violations.py) that a rebuild reproduces exactly.

Every check has a scope, the one thing whose rows it reads and whose id its findings
carry: a vehicle (its own stream, its trips, cycles and swabs), a transfer (its
decisions, trips, return leg, and the vehicles and facilities those name), or dispatch's
store order (R4: what waited in the queue when a vehicle was given). A new event
re-evaluates the scopes it touches; a rebuild evaluates them all.
"""

from __future__ import annotations

import bisect
import hashlib
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cached_property
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
    # DOMAIN.md R6: severe confirmed -> designated hospital; mild/asymptomatic -> fangcang
    # (a hospital that takes the severe may take the mild too).
    "confirmed_severe": {"designated"},
    "confirmed_mild": {"fangcang", "sub_designated", "designated"},
    # R13: a suspected or confirmed case found in a fever clinic -> designated hospital.
    "fever_clinic_case": {"designated"},
}
STAGE_ZH = {"initial": "首次消毒", "terminal": "终末消毒"}
NPA_AREAS = {"isolation_site", "sealed_area", "controlled_area"}
# What ends a vehicle's reservation on its own stream: its trip ended (it now waits for
# disinfection), it stood down from a transfer it never carried (cancelled, crew abort,
# reassigned), or it broke down.
RESERVATION_ENDS = {"VehicleAwaitingDisinfection", "VehicleStoodDown", "VehicleTakenOutOfService"}
# Ends of a trip besides TripCompleted: a trip aborted before pickup carried nobody.
TRIP_ENDS = {"TripAborted"}
DESTINATIONS = ("DestinationAssigned", "TransferRedirected")
VEHICLE, TRANSFER, DISPATCH = "vehicle", "transfer", "dispatch"


def utc_key(at: str) -> str:
    """A finding's time as sortable text (UTC, fixed width): pages and filters compare it."""
    return datetime.fromisoformat(at).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _later(at: str, delta: timedelta) -> str:
    return (datetime.fromisoformat(at) + delta).isoformat()


@dataclass(frozen=True)
class Finding:
    rule: str
    check: str
    kind: str  # violation | override | sla
    at: str  # when the rule broke; for a deadline that passed, the deadline
    detail: str
    message_zh: str
    evidence: tuple[dict[str, Any], ...]
    transfer_id: str | None = None
    vehicle_id: str | None = None
    facility_id: str | None = None

    @cached_property
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


# A finding as a row of the findings read model (tables.generation, violations.py).
ROW_COLUMNS = ("id", "scope", "rule", "check", "kind", "at_key", "transfer_id", "vehicle_id",
               "facility_id", "body")


def row_of(scope: str, f: Finding) -> dict[str, Any]:
    return {"id": f.id, "scope": scope, "rule": f.rule, "check": f.check, "kind": f.kind,
            "at_key": utc_key(f.at), "transfer_id": f.transfer_id, "vehicle_id": f.vehicle_id,
            "facility_id": f.facility_id,
            "body": orjson.dumps(f.view(), option=orjson.OPT_SORT_KEYS).decode()}


Check = Callable[[AuditData], Iterable[Finding]]


@dataclass(frozen=True)
class CheckSpec:
    rule: str
    code: str
    summary: str
    needs: frozenset[str]
    run: Check
    scope: str  # vehicle | transfer (dispatch's store order is the R4 fold below)


def _ev(ref: dict[str, Any] | None, type_: str) -> dict[str, Any]:
    return {**(ref or {}), "type": type_}


def _log_ev(row: dict[str, Any], store: str = "dispatch") -> dict[str, Any]:
    return {"event_id": row["event_id"], "type": row["type"], "at": row["at"],
            "recorded_at": row["recorded_at"], "actor": row["actor"], "role": row["role"],
            "store": store}


def payload(row: dict[str, Any]) -> dict[str, Any]:
    """A row's whole payload (kept as text until a check needs it)."""
    value = row["data"]
    if isinstance(value, str):
        value = row["data"] = orjson.loads(value)
    return value  # type: ignore[no-any-return]


def _after(a: str | None, b: str | None) -> bool:
    """a strictly after b (server clocks)."""
    d = seconds(b, a)
    return d is not None and d > 0


def _overrides_of(data: AuditData, transfer_id: str | None, vehicle_id: str | None) -> list[dict[str, Any]]:
    """Dispatch's RuleOverridden events for this transfer and vehicle."""
    return [d for d in data.decisions if d["type"] == "RuleOverridden" and d["transfer_id"] == transfer_id
            and d.get("vehicle_id") == vehicle_id]


def _overrides(data: AuditData, rule: str, transfer_id: str | None, vehicle_id: str | None) -> list[
        dict[str, Any]]:
    return [d for d in _overrides_of(data, transfer_id, vehicle_id) if payload(d).get("rule") == rule]


# -- R1 one patient, one vehicle ---------------------------------------------------------


def _vehicle_streams(data: AuditData) -> dict[str, list[dict[str, Any]]]:
    by: dict[str, list[dict[str, Any]]] = {}
    for row in data.vehicle_log:
        by.setdefault(row["vehicle_id"], []).append(row)
    for rows in by.values():
        rows.sort(key=lambda r: r["stream_version"])
    return by


def r1_reserved_twice(data: AuditData) -> Iterator[Finding]:
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
            elif row["type"] in RESERVATION_ENDS and _ends(row, holding):
                holding = None


def _ends(row: dict[str, Any], holding: dict[str, Any] | None) -> bool:
    """Whether this end of a reservation ends the one held. An entry that names its
    transfer (a breakdown: the transfer it withdrew from) ends that one only: an earlier
    trip's end arriving late leaves the current one held. Entries written before they named
    it (before 2026-11-24) end whatever the vehicle held."""
    if holding is None:
        return True
    key = "withdrawn_from" if row["type"] == "VehicleTakenOutOfService" else "transfer_id"
    p = payload(row)
    return key not in p or p[key] == holding["transfer_id"]


def _trip_ends(data: AuditData) -> dict[tuple[str, str], str]:
    out: dict[tuple[str, str], str] = {}
    for row in data.others:
        if row["type"] in TRIP_ENDS:
            p = payload(row)
            if p.get("trip_id") and row.get("vehicle_id"):
                out.setdefault((row["vehicle_id"], p["trip_id"]), row["recorded_at"])
    return out


def _trips_by_vehicle(data: AuditData) -> dict[str, list[dict[str, Any]]]:
    by: dict[str, list[dict[str, Any]]] = {}
    for trip in data.trips.values():
        if trip.get("opened") and trip.get("vehicle_id"):
            by.setdefault(trip["vehicle_id"], []).append(trip)
    for trips in by.values():
        trips.sort(key=lambda t: (ts(t["opened"]["recorded_at"]), t["trip_id"]))
    return by


def r1_overlapping_trips(data: AuditData) -> Iterator[Finding]:
    """Independent of dispatch's stream: two trips of one vehicle open at once."""
    ended = _trip_ends(data)
    for vehicle_id, trips in _trips_by_vehicle(data).items():
        for i, first in enumerate(trips):
            end = ((first.get("completed") or {}).get("recorded_at")
                   or ended.get((vehicle_id, first["trip_id"])))
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

MAY_OVERRIDE_R2 = "supervisor"  # DOMAIN.md: R2 is hard; a supervisor's override, with a reason


def _r2_override(data: AuditData, transfer_id: str | None, vehicle_id: str) -> tuple[
        str, tuple[dict[str, Any], ...], str, str]:
    """(kind, extra evidence, why, why in Chinese) for a vehicle taken before its release:
    a supervisor's recorded R2 override makes it an override, else a violation (R2 is
    hard: an override recorded by anyone else is no override)."""
    found = _overrides(data, "R2", transfer_id, vehicle_id)
    if not found:
        return "violation", (), "", ""
    allowed = [d for d in found if d["role"] == MAY_OVERRIDE_R2]
    if not allowed:
        d = found[0]
        return ("violation", tuple(_log_ev(o) for o in found),
                f"; overridden by {d['actor']} ({d['role']}), who may not override R2",
                f"（{d['actor']}（{d['role']}）无权越权放行）")
    reason = payload(allowed[0]).get("reason") or ""
    return ("override", tuple(_log_ev(d) for d in allowed), f"; overridden: {reason}",
            f"（督查越权理由：{reason}）")


def r2_reserved_awaiting(data: AuditData) -> Iterator[Finding]:
    for vehicle_id, rows in _vehicle_streams(data).items():
        awaiting: dict[str, dict[str, Any]] = {}
        for row in rows:
            if row["type"] == "VehicleAwaitingDisinfection":
                awaiting[row["trip_id"]] = row
            elif row["type"] == "VehicleReturnedToService":
                if payload(row).get("quarantine_lifted"):
                    awaiting.clear()  # the re-disinfection after a positive covers every trip
                else:
                    awaiting.pop(row["trip_id"], None)
            elif row["type"] == "VehicleReserved" and awaiting:
                held = next(iter(awaiting.values()))
                kind, extra, why, why_zh = _r2_override(data, row["transfer_id"], vehicle_id)
                yield Finding(
                    "R2", "reserved_before_release", kind, row["recorded_at"],
                    f"vehicle {vehicle_id} reserved for {row['transfer_id']} while awaiting "
                    f"disinfection after trip {held['trip_id']}" + why,
                    f"车辆{vehicle_id}洗消未放行即被派车（一车一消）" + why_zh,
                    (_log_ev(held), _log_ev(row), *extra), transfer_id=row["transfer_id"],
                    vehicle_id=vehicle_id)


def lifts_quarantine(cycle: dict[str, Any]) -> bool:
    """A release that ends a positive swab's quarantine: the re-disinfection's (R9). It
    covers every trip the vehicle had completed, as dispatch reads it."""
    released = cycle.get("released") or {}
    kind = (cycle.get("opened") or {}).get("kind")
    return bool(released.get("quarantine_lifted")) or kind == "redisinfection"


def r2_trip_before_release(data: AuditData) -> Iterator[Finding]:
    """Across stores: a trip opened after the vehicle's previous trip completed and before
    disinfection released it (its own cycle's release, or a quarantine lifted after it)."""
    for vehicle_id, trips in _trips_by_vehicle(data).items():
        opened_at = [ts(t["opened"]["recorded_at"]) for t in trips]
        lifts = [c["released"] for c in _vehicle_cycles(data)
                 if c["vehicle_id"] == vehicle_id and c.get("released") and lifts_quarantine(c)]
        for done in trips:
            completed = done.get("completed")
            if not completed:
                continue
            releases = [c["released"] for c in data.cycles_of_trip(done["trip_id"])
                        if c.get("released") and c.get("vehicle_id") == vehicle_id]
            releases += [r for r in lifts if r not in releases
                         and not _after(completed["recorded_at"], r["recorded_at"])]
            released_at = min((ts(r["recorded_at"]) for r in releases), key=_key, default=None)
            start = bisect.bisect_right(opened_at, ts(completed["recorded_at"]))  # type: ignore[type-var]
            for later in trips[start:]:
                opened = later["opened"]
                if released_at is not None and not (ts(opened["recorded_at"]) or released_at) < released_at:
                    break
                kind, extra, why, why_zh = _r2_override(data, later.get("transfer_id"), vehicle_id)
                yield Finding(
                    "R2", "trip_before_release", kind, opened["recorded_at"],
                    f"vehicle {vehicle_id} started trip {later['trip_id']} before disinfection "
                    f"released it after trip {done['trip_id']}" + why,
                    f"车辆{vehicle_id}上一趟转运后未经洗消放行即再次出车（一车一消）" + why_zh,
                    (_ev(completed, "TripCompleted"), _ev(opened, "TripOpened"),
                     *(_ev(r, "VehicleReleased") for r in releases), *extra),
                    transfer_id=later.get("transfer_id"), vehicle_id=vehicle_id)


def _key(t: datetime | None) -> datetime:
    return t or datetime.max.replace(tzinfo=UTC)


# -- R3 / R5 the right vehicle, and every override --------------------------------------


def needs_negative_pressure(risk_category: str | None, condition: dict[str, Any]) -> bool:
    covid_like = bool(condition.get("fever") or condition.get("covid_symptoms"))
    return risk_category in ("confirmed", "suspected") or (risk_category in NPA_AREAS and covid_like)


def _of_type(data: AuditData, *types: str) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for d in data.decisions:
        if d["type"] in types:
            yield d, payload(d)


def _decision_ev(d: dict[str, Any]) -> dict[str, Any]:
    return {"event_id": d["event_id"], "type": d["type"], "at": d["at"], "recorded_at": d["recorded_at"],
            "actor": d["actor"], "role": d["role"], "store": "dispatch"}


def condition_at(data: AuditData, transfer_id: str, position: int) -> dict[str, Any]:
    """The patient's condition when dispatch decided at `position` of its store: the latest
    a redirect recorded before it, else the request's (as dispatch keeps it)."""
    latest = max(((d["position"], p["condition"]) for d, p in _of_type(data, "TransferRedirected")
                  if p.get("transfer_id") == transfer_id and d["position"] < position
                  and isinstance(p.get("condition"), dict)), key=lambda pc: pc[0], default=None)
    if latest is not None:
        return latest[1]  # type: ignore[no-any-return]
    return ((data.transfers.get(transfer_id) or {}).get("request") or {}).get("condition") or {}


def broken_by_assignment(data: AuditData, transfer_id: str, vehicle_id: str,
                         position: int) -> list[tuple[str, str, str]]:
    """(rule, code, why) for each vehicle rule the assignment at `position` breaks."""
    transfer = data.transfers.get(transfer_id) or {}
    request = transfer.get("request") or {}
    vehicle = data.vehicles.get(vehicle_id)
    if vehicle is None or not request:
        return []
    broken = []
    if not vehicle.get("dedicated_pool"):
        broken.append(("R3", "vehicle_not_dedicated",
                       f"risk transfer carried by {vehicle_id}, which is not in the dedicated pool"))
    if needs_negative_pressure(request.get("risk_category"), condition_at(data, transfer_id, position)) and \
            vehicle.get("kind") != "negative_pressure_ambulance":
        broken.append(("R5", "negative_pressure_required",
                       f"{request.get('risk_category')} patient with fever/COVID-like symptoms carried by "
                       f"{vehicle.get('kind')} {vehicle_id}, not a negative-pressure ambulance"))
    return broken


def r3_r5_vehicle_fit(data: AuditData) -> Iterator[Finding]:
    for d, p in _of_type(data, "VehicleAssigned"):
        for rule, code, why in broken_by_assignment(data, p["transfer_id"], p["vehicle_id"], d["position"]):
            reason = p.get("override_reason")
            recorded = _overrides(data, rule, p["transfer_id"], p["vehicle_id"]) if reason else []
            yield Finding(
                rule, code, "override" if reason else "violation", d["recorded_at"],
                why + (f"; overridden: {reason}" if reason else ""),
                ("专车专用：风险转运使用了非专用车辆" if rule == "R3" else "应使用负压救护车而未使用")
                + (f"（调度员改派理由：{reason}）" if reason else ""),
                (_decision_ev(d), *(_decision_ev(o) for o in recorded)),
                transfer_id=p["transfer_id"], vehicle_id=p["vehicle_id"])


def manual_overrides(data: AuditData) -> Iterator[Finding]:
    """Every assignment with an override reason, with the rules dispatch recorded as
    overridden (RuleOverridden, written just before it on the transfer's stream)."""
    assignments = sorted(_of_type(data, "VehicleAssigned"), key=lambda dp: dp[0]["stream_version"])
    previous: dict[str, int] = {}
    for d, p in assignments:
        tid = p["transfer_id"]
        since = previous.get(tid, 0)
        previous[tid] = d["stream_version"]
        if not p.get("override_reason"):
            continue
        recorded = [o for o in _overrides_of(data, tid, p["vehicle_id"])
                    if since < o["stream_version"] < d["stream_version"]]
        rules = sorted({payload(o).get("rule") or "" for o in recorded})
        named = f" (rules {', '.join(rules)})" if rules else " (no RuleOverridden recorded)"
        reason = p["override_reason"]
        yield Finding(
            "override", "manual_assignment_override", "override", d["recorded_at"],
            f"{d['actor']} ({d['role']}) assigned {p['vehicle_id']}{named}: {reason}",
            f"{d['actor']}越权派车{p['vehicle_id']}（{'、'.join(rules) or '未记录规则'}），理由：{reason}",
            (_decision_ev(d), *(_decision_ev(o) for o in recorded)), transfer_id=tid,
            vehicle_id=p["vehicle_id"])


def reprioritized(data: AuditData) -> Iterator[Finding]:
    """A dispatcher's change to a transfer's priority moves it in R4's queue: logged."""
    for d, p in _of_type(data, "TransferReprioritized"):
        yield Finding(
            "override", "reprioritized", "override", d["recorded_at"],
            f"{d['actor']} ({d['role']}) set the priority of {p['transfer_id']} from {p.get('previous')} "
            f"to {p.get('priority')} (R4): {p.get('reason')}",
            f"{d['actor']}调整转运{p['transfer_id']}的优先级（{p.get('previous')}→{p.get('priority')}），"
            f"理由：{p.get('reason')}",
            (_decision_ev(d),), transfer_id=p["transfer_id"])


def early_releases(data: AuditData) -> Iterator[Finding]:
    """A supervisor released a vehicle before its cycle would have (R2's override)."""
    for cycle in data.cycles.values():
        released = cycle.get("released") or {}
        if not released.get("override") or not cycle.get("vehicle_id"):
            continue
        rules = ", ".join(released.get("overridden_rules") or []) or "R2"
        missing = ", ".join(released.get("missing") or []) or "nothing"
        if released.get("role") != MAY_OVERRIDE_R2:
            yield Finding(
                "R2", "early_release_not_by_supervisor", "violation", released["recorded_at"],
                f"{released.get('actor')} ({released.get('role')}) released vehicle {cycle['vehicle_id']} "
                f"early from cycle {cycle['cycle_id']} (missing {missing}); only a supervisor may",
                f"{released.get('actor')}（{released.get('role')}）无权提前放行车辆{cycle['vehicle_id']}"
                f"（缺：{missing}）", (_ev(released, "VehicleReleased"),),
                transfer_id=cycle.get("transfer_id"), vehicle_id=cycle["vehicle_id"])
            continue
        yield Finding(
            "override", "supervisor_early_release", "override", released["recorded_at"],
            f"{released.get('actor')} ({released.get('role')}) released vehicle {cycle['vehicle_id']} "
            f"early from cycle {cycle['cycle_id']} (rules {rules}; missing {missing}): "
            f"{released.get('override_reason')}",
            f"{released.get('actor')}提前放行车辆{cycle['vehicle_id']}（{rules}；缺：{missing}），"
            f"理由：{released.get('override_reason')}",
            (_ev(released, "VehicleReleased"),), transfer_id=cycle.get("transfer_id"),
            vehicle_id=cycle["vehicle_id"])


# -- R4 critical first: a fold in dispatch's store order ----------------------------------


def fits(vehicle: dict[str, Any], request: dict[str, Any], condition: dict[str, Any] | None = None) -> bool:
    """Whether the vehicle may carry the patient (R3, R5, life support for the critical),
    in `condition` (the latest a redirect recorded) or the request's."""
    condition = condition if condition is not None else (request.get("condition") or {})
    if not vehicle.get("dedicated_pool"):
        return False
    if needs_negative_pressure(request.get("risk_category"), condition) and \
            vehicle.get("kind") != "negative_pressure_ambulance":
        return False
    return not (condition.get("critical") and not vehicle.get("life_support"))


R4_TYPES = ("TransferPrioritized", "TransferReprioritized", "TransferQueued", "VehicleAssigned",
            "TransferCancelled", "TransferHandedOver", "VehicleWithdrawn", "TransferRedirected")
# Whose requests R4's fold compares: the transfers that waited (queued, or left without a
# vehicle by a withdrawal), and each that got a vehicle (a newer one given a vehicle
# straight away while an older one of its priority waited).
R4_REQUESTS = ("TransferQueued", "VehicleAssigned", "VehicleWithdrawn")


@dataclass
class QueueFold:
    """R4 over dispatch's decisions in store order: which transfers waited in the queue,
    at what priority, when a vehicle was given to another. Its state is small (the live
    transfers) and is kept between events (violations.py), so the live model folds each
    decision once, in position order, as a rebuild does."""

    position: int = 0
    priority: dict[str, int] = field(default_factory=dict)  # until cancelled or handed over
    # The decision that left it without a vehicle: TransferQueued, or VehicleWithdrawn
    # (dispatch reassigns or queues it in the same commit; a history that does neither
    # leaves it waiting all the same).
    waiting: dict[str, dict[str, Any]] = field(default_factory=dict)
    condition: dict[str, dict[str, Any]] = field(default_factory=dict)  # the latest a redirect recorded

    def state(self) -> dict[str, Any]:
        return {"position": self.position, "priority": self.priority, "waiting": self.waiting,
                "condition": self.condition}

    @classmethod
    def of(cls, state: dict[str, Any]) -> QueueFold:
        return cls(state["position"], dict(state["priority"]), dict(state["waiting"]),
                   dict(state.get("condition") or {}))

    def apply(self, d: dict[str, Any], data: AuditData) -> Iterator[Finding]:
        """One decision (a `decisions` row); `data` holds the vehicles and the requests."""
        tid, t = d["transfer_id"], d["type"]
        if t in ("TransferPrioritized", "TransferReprioritized"):
            priority = payload(d).get("priority")
            if isinstance(priority, int):
                self.priority[tid] = priority
        elif t in ("TransferQueued", "VehicleWithdrawn"):
            self.waiting[tid] = _decision_ev(d)
        elif t == "TransferRedirected":
            condition = payload(d).get("condition")
            if isinstance(condition, dict):
                self.condition[tid] = condition
        elif t in ("TransferCancelled", "TransferHandedOver"):
            self.waiting.pop(tid, None)
            self.priority.pop(tid, None)
            self.condition.pop(tid, None)
        elif t == "VehicleAssigned":
            self.waiting.pop(tid, None)
            vehicle_id = payload(d).get("vehicle_id") or ""
            vehicle = data.vehicles.get(vehicle_id)
            mine = self.priority.get(tid)
            # A vehicle registered only after it was given (a forged or imported history):
            # not judged here, whether the registration came in the same batch or later.
            registered_at = ((vehicle or {}).get("registered") or {}).get("position")
            if vehicle is None or mine is None or (
                    isinstance(registered_at, int) and registered_at > d["position"]):
                return
            # Within a priority, request order (the loaders bring the requests of R4_REQUESTS).
            requested = ((data.transfers.get(tid) or {}).get("request") or {}).get("recorded_at")
            for other_id, queued in self.waiting.items():
                theirs = self.priority.get(other_id)
                request = (data.transfers.get(other_id) or {}).get("request") or {}
                if theirs is None or not fits(vehicle, request, self.condition.get(other_id)):
                    continue
                if theirs < mine:
                    check = "priority_inversion"
                    what = (f"vehicle {vehicle_id} went to {tid} (priority {mine}) while {other_id} "
                            f"(priority {theirs}) waited and could ride it")
                    what_zh = (f"车辆{vehicle_id}派给了优先级{mine}的转运，"
                               f"而优先级{theirs}的转运{other_id}仍在排队")
                elif theirs == mine and requested and _earlier(request.get("recorded_at"), requested):
                    check = "queue_order"
                    what = (f"vehicle {vehicle_id} went to {tid} while {other_id}, of the same priority "
                            f"{mine} and requested earlier, waited and could ride it")
                    what_zh = f"车辆{vehicle_id}派给了后申请的转运{tid}，同级且先申请的转运{other_id}仍在排队"
                else:
                    continue
                yield Finding("R4", check, "violation", d["recorded_at"], what, what_zh,
                              (queued, _decision_ev(d)), transfer_id=other_id, vehicle_id=vehicle_id)


# Dispatch orders by its own clock at the request, a few milliseconds before the request
# is recorded: two requests closer than this are not told apart by their record times.
QUEUE_ORDER_TOLERANCE = timedelta(seconds=1)


def _earlier(a: str | None, b: str | None) -> bool:
    ta, tb = ts(a), ts(b)
    return ta is not None and tb is not None and ta + QUEUE_ORDER_TOLERANCE < tb


def r4_priority_inversion(data: AuditData) -> list[Finding]:
    """The whole fold at once (tests, and a rebuild's reference)."""
    fold = QueueFold()
    out: list[Finding] = []
    for d in sorted((d for d in data.decisions if d["type"] in R4_TYPES), key=lambda d: d["position"]):
        out.extend(fold.apply(d, data))
    return out


# -- R6 / R7 destination --------------------------------------------------------------


def patient_class(request: dict[str, Any], condition: dict[str, Any] | None = None) -> str:
    condition = condition if condition is not None else (request.get("condition") or {})
    if condition.get("critical") and condition.get("kind") in ("stroke", "chest_pain"):
        return "cardio_cerebro"
    if condition.get("critical"):
        return "critical"
    if is_fever_clinic_case(request):
        return "fever_clinic_case"
    if request.get("risk_category") == "confirmed":
        mild = condition.get("severity") in ("mild", "asymptomatic")
        return "confirmed_mild" if mild else "confirmed_severe"
    covid_like = condition.get("fever") or condition.get("covid_symptoms")
    if covid_like or request.get("risk_category") == "suspected":
        return "fever"
    return "other"


def _destinations(data: AuditData) -> Iterator[tuple[dict[str, Any], str, str, dict[str, Any],
                                                    dict[str, Any] | None]]:
    """(decision, transfer, facility, request, condition) of every destination dispatch
    chose or redirected to, in dispatch's store order, with the condition then in effect:
    the latest one a redirect recorded (a patient who worsened stays worse through a later
    redirect that says nothing of it, as dispatch routes), else None (the request's). A
    return leg goes back to its origin whatever its role (R11), so R6 and R7 do not apply
    to it."""
    latest: dict[str, dict[str, Any]] = {}
    for d, p in sorted(_of_type(data, *DESTINATIONS), key=lambda dp: dp[0]["position"]):
        if isinstance(p.get("condition"), dict):
            latest[p["transfer_id"]] = p["condition"]
        request = (data.transfers.get(p["transfer_id"]) or {}).get("request") or {}
        facility_id = p.get("facility_id") or p.get("to_facility_id")
        if not facility_id or request.get("return_of"):
            continue
        yield d, p["transfer_id"], facility_id, request, latest.get(p["transfer_id"])


def r6_destination_role(data: AuditData) -> Iterator[Finding]:
    for d, tid, facility_id, request, condition in _destinations(data):
        facility = data.facilities.get(facility_id)
        pclass = patient_class(request, condition) if request else None
        allowed = R6_ROLES.get(pclass or "")
        if facility is None or allowed is None:
            continue
        roles = set((facility.get("registered") or {}).get("roles") or [])
        if not roles & allowed:
            yield Finding(
                "R6", "destination_role_mismatch", "violation", d["recorded_at"],
                f"{pclass} patient sent to {facility_id} (roles {sorted(roles)}), "
                f"which is none of {sorted(allowed)}",
                f"目的地{facility.get('name') or facility_id}的职能与患者类别不符",
                (_decision_ev(d),), transfer_id=tid, facility_id=facility_id)


class _Loads:
    """Each facility's load reports in dispatch's store order: what its fever clinic's
    state was when dispatch made a decision (the last report before it)."""

    def __init__(self, data: AuditData) -> None:
        self.rows: dict[str, list[dict[str, Any]]] = {}
        for row in data.facility_loads:
            self.rows.setdefault(row["facility_id"], []).append(row)
        for rows in self.rows.values():
            rows.sort(key=lambda r: r["position"])
        self.positions = {f: [r["position"] for r in rows] for f, rows in self.rows.items()}

    def before(self, facility_id: str, position: int) -> dict[str, Any] | None:
        at = bisect.bisect_left(self.positions.get(facility_id, []), position)
        return self.rows[facility_id][at - 1] if at else None


def _load_ev(load: dict[str, Any]) -> dict[str, Any]:
    return {"event_id": load["event_id"], "type": "FacilityLoadReported", "at": load["at"],
            "recorded_at": load["at"], "actor": "", "role": ""}


def r7_overflowing_destination(data: AuditData) -> Iterator[Finding]:
    loads = _Loads(data)
    for d, tid, facility_id, request, condition in _destinations(data):
        last = loads.before(facility_id, d["position"])
        facility = data.facilities.get(facility_id) or {}
        roles = set((facility.get("registered") or {}).get("roles") or []) - {"backup"}
        # R7 is about the fever clinic: a full one does not close the hospital's other wards
        # that take the patient (a severe confirmed case still goes to its designated ward,
        # a fever patient to its temporary emergency hospital), as dispatch reads it. For a
        # class R6 does not name, any other ward may.
        allowed = R6_ROLES.get(patient_class(request, condition))
        if not (roles if allowed is None else roles & allowed) <= {"fever_clinic"}:
            continue
        if last is not None and last["overflowing"]:
            yield Finding(
                "R7", "overflowing_destination", "violation", d["recorded_at"],
                f"{facility_id} was past its overflow threshold (load {last['ratio']}) and still "
                "got a new patient instead of its backups",
                f"{facility_id}发热门诊负荷已超过阈值，仍被指定为目的地，未启用备用医院",
                (_load_ev(last), _decision_ev(d)), transfer_id=tid, facility_id=facility_id)


def backup_ids(registered: dict[str, Any] | None) -> list[str]:
    """The backups a facility's registration names (what is not an id is no backup: a
    forged registration must not stall the findings' upkeep)."""
    named = (registered or {}).get("backup_ids")
    return [b for b in named if isinstance(b, str) and b] if isinstance(named, list) else []


def is_backup(facility: dict[str, Any]) -> bool:
    """A facility registered as a backup hospital (R7): it takes patients only while
    activated."""
    return "backup" in ((facility.get("registered") or {}).get("roles") or ())


def backed_up_by(data: AuditData) -> dict[str, list[str]]:
    """Backup hospital -> the hospitals that name it as their backup (registration)."""
    out: dict[str, list[str]] = {}
    for facility_id, facility in sorted(data.facilities.items()):
        for backup in backup_ids(facility.get("registered")):
            out.setdefault(backup, []).append(facility_id)
    return out


def r7_backup_not_activated(data: AuditData) -> Iterator[Finding]:
    """A backup hospital takes new patients only while a hospital it backs up is past its
    threshold (R7; dispatch's routing skips it otherwise): one that got a patient while
    none was had not been activated, and was not ready for them."""
    loads = _Loads(data)
    primaries = backed_up_by(data)
    for d, tid, facility_id, _, _ in _destinations(data):
        facility = data.facilities.get(facility_id)
        if facility is None or not is_backup(facility):
            continue
        states = [(p, loads.before(p, d["position"])) for p in primaries.get(facility_id, [])]
        if any(last is not None and last["overflowing"] for _, last in states):
            continue
        name = facility.get("name") or facility_id
        backs = ", ".join(f"{p} (load {last['ratio'] if last else 'not reported'})" for p, last in states)
        yield Finding(
            "R7", "backup_not_activated", "violation", d["recorded_at"],
            f"{facility_id} is a backup hospital and got a new patient while none of the hospitals it "
            f"backs up was past its threshold: {backs or 'no hospital names it as its backup'}",
            f"备用医院{name}未被启用（其主医院发热门诊负荷未超过阈值），仍被指定为目的地" if states else
            f"备用医院{name}未被任何医院登记为备用，不应被启用，仍被指定为目的地",
            (*(_load_ev(last) for _, last in states if last is not None), _decision_ev(d)),
            transfer_id=tid, facility_id=facility_id)


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


def _release_kind(released: dict[str, Any]) -> tuple[str, str, str]:
    """A release a supervisor forced (R2's override) makes what it skipped an override;
    forced by anyone else, it is no override."""
    if released.get("override") and released.get("role") == MAY_OVERRIDE_R2:
        reason = released.get("override_reason") or ""
        return ("override", f"; released early by {released.get('actor')}: {reason}",
                f"（督查提前放行：{reason}）")
    return "violation", "", ""


def _vehicle_cycles(data: AuditData) -> Iterator[dict[str, Any]]:
    return (c for c in data.cycles.values() if c.get("vehicle_id"))


def r8_stages(data: AuditData) -> Iterator[Finding]:
    for cycle in _vehicle_cycles(data):
        vid, cid = cycle["vehicle_id"], cycle["cycle_id"]
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
        yield from _stage_times(data, cycle, initial, terminal)
        if released:
            missing = [n for n, ref in (("initial", initial), ("terminal", terminal))
                       if ref is None or ref["v"] > released["v"]]
            if missing:
                kind, why, why_zh = _release_kind(released)
                yield Finding(
                    "R8", "released_without_both_stages", kind, released["recorded_at"],
                    f"cycle {cid} released vehicle {vid} without the {' and '.join(missing)} stage" + why,
                    f"车辆{vid}未完成{'、'.join(STAGE_ZH[m] for m in missing)}即被放行" + why_zh,
                    tuple(_ev(r, t) for r, t in ((released, "VehicleReleased"),
                                                 (cycle.get("opened"), "CycleOpened")) if r),
                    transfer_id=cycle.get("transfer_id"), vehicle_id=vid)


# A crew's phone and a washing bay's console keep their own clocks: a first stage that
# starts this much before the trip ended is not a clock's error.
STAGE_CLOCK_TOLERANCE = timedelta(minutes=10)


def _stage_times(data: AuditData, cycle: dict[str, Any], initial: dict[str, Any] | None,
                 terminal: dict[str, Any] | None) -> Iterator[Finding]:
    """R8 in time, not only in the order logged: the first stage after the trip ended (the
    vehicle is disinfected when it is back), the terminal one after the first one ended."""
    vid, cid = cycle["vehicle_id"], cycle["cycle_id"]
    first, last = (initial or {}).get("stage") or {}, (terminal or {}).get("stage") or {}
    first_ended, last_started = ts(first.get("ended_at")), ts(last.get("started_at"))
    if terminal and first_ended and last_started and last_started < first_ended:
        yield Finding(
            "R8", "terminal_overlaps_initial", "violation", terminal["recorded_at"],
            f"cycle {cid}: terminal stage started {last.get('started_at')}, before the initial stage "
            f"ended ({first.get('ended_at')})", "终末消毒在首次消毒结束前开始",
            tuple(_ev(r, t) for r, t in ((initial, "InitialDisinfectionLogged"),
                                         (terminal, "TerminalDisinfectionLogged")) if r),
            transfer_id=cycle.get("transfer_id"), vehicle_id=vid)
    # Held to the handover (on the crew's clock, never later than the server received it);
    # a trip dispatch ended (a takeover) is dated when the transfer service heard of it,
    # which a lagging consumer puts late: its last step with the patient aboard bounds it.
    trip = data.trips.get(cycle.get("trip_id") or "") or {}
    end = trip.get("handover") or trip.get("s_at_destination") or trip.get("s_patient_aboard")
    trip_ended = _earliest((end or {}).get("at"), (end or {}).get("recorded_at"))
    # The stage began with whichever treatment came first.
    first_started = _earliest(first.get("started_at"), (first.get("air") or {}).get("started_at"))
    if initial and trip_ended and first_started and first_started < trip_ended - STAGE_CLOCK_TOLERANCE:
        yield Finding(
            "R8", "stage_before_trip_ended", "violation", initial["recorded_at"],
            f"cycle {cid}: initial stage started {first.get('started_at')}, before trip "
            f"{trip.get('trip_id')} ended ({trip_ended.isoformat()})", "首次消毒记录早于该趟转运结束",
            (_ev(initial, "InitialDisinfectionLogged"),
             _ev(end, "PatientHandedOver" if end is trip.get("handover") else "TripStepReported")),
            transfer_id=cycle.get("transfer_id"), vehicle_id=vid)


def _earliest(*times: Any) -> datetime | None:
    return min(filter(None, map(ts, times)), default=None)


def r8_returned_without_terminal(data: AuditData) -> Iterator[Finding]:
    """Across stores: dispatch put the vehicle back in service, but no terminal stage of
    that trip's cycle was on record by then."""
    for trip in data.trips.values():
        returned = trip.get("returned")
        if not returned:
            continue
        # Dispatch may return a vehicle after a trip the transfer service never opened.
        vid = trip.get("vehicle_id") or returned.get("vehicle_id")
        if not vid:
            continue
        cycles = [c for c in data.cycles_of_trip(trip["trip_id"]) if c.get("vehicle_id") == vid]
        terminals = [c["terminal"] for c in cycles if c.get("terminal")]
        if any(not _after(t["recorded_at"], returned["recorded_at"]) for t in terminals):
            continue
        forced = next((c["released"] for c in cycles if (c.get("released") or {}).get("override")), None)
        kind, why, why_zh = _release_kind(forced or {})
        yield Finding(
            "R8", "returned_without_terminal", kind, returned["recorded_at"],
            f"vehicle {vid} returned to service after trip {trip['trip_id']} with no "
            "terminal disinfection on record" + why,
            f"车辆{vid}未完成终末消毒即恢复可派状态" + why_zh,
            (_ev(returned, "VehicleReturnedToService"),
             *(_ev(c.get("opened"), "CycleOpened") for c in cycles if c.get("opened"))),
            transfer_id=trip.get("transfer_id"), vehicle_id=vid)
    # A quarantine's lift returns the vehicle under the positive trip's id, whose row keeps
    # that trip's first return: each lift is checked on the vehicle's own stream, against
    # the re-disinfection cycle it names.
    for row in data.vehicle_log:
        if row["type"] != "VehicleReturnedToService" or not payload(row).get("quarantine_lifted"):
            continue
        vid = row["vehicle_id"]
        redo = data.cycles.get(row.get("cycle_id") or "") or {}
        redo = redo if redo.get("vehicle_id") == vid else {}
        terminal = redo.get("terminal")
        if terminal and not _after(terminal["recorded_at"], row["recorded_at"]):
            continue
        kind, why, why_zh = _release_kind(redo.get("released") or {})
        yield Finding(
            "R8", "returned_without_terminal", kind, row["recorded_at"],
            f"vehicle {vid} returned to service as its quarantine lifted, with no terminal stage of "
            f"the re-disinfection {row.get('cycle_id')} on record" + why,
            f"车辆{vid}解除停用恢复可派，但重新洗消无终末消毒记录" + why_zh,
            (_log_ev(row), *((_ev(redo["opened"], "CycleOpened"),) if redo.get("opened") else ())),
            transfer_id=redo.get("transfer_id"), vehicle_id=vid)


# -- R9 swabs and positives ---------------------------------------------------------------


def r9_released_without_swab(data: AuditData) -> Iterator[Finding]:
    for cycle in _vehicle_cycles(data):
        released = cycle.get("released")
        if not released:
            continue
        swabs = [s for s in data.swabs_of_cycle(cycle["cycle_id"])
                 if s.get("vehicle_id") == cycle["vehicle_id"] and s.get("collected")
                 and s["collected"]["v"] < released["v"]]
        if not swabs:
            kind, why, why_zh = _release_kind(released)
            yield Finding(
                "R9", "released_without_swab", kind, released["recorded_at"],
                f"cycle {cycle['cycle_id']} released vehicle {cycle['vehicle_id']} with no surface swab"
                + why,
                f"车辆{cycle['vehicle_id']}未做物体表面核酸采样即被放行" + why_zh,
                (_ev(released, "VehicleReleased"),), transfer_id=cycle.get("transfer_id"),
                vehicle_id=cycle["vehicle_id"])


def positives(data: AuditData) -> list[dict[str, Any]]:
    return sorted((s for s in data.swabs.values()
                   if (s.get("result") or {}).get("result") == "positive"),
                  key=lambda s: s["result"]["recorded_at"])


EPOCH = datetime.fromtimestamp(0, UTC)


def server_time(ref: dict[str, Any] | None) -> datetime | None:
    return ts(ref.get("recorded_at")) if ref else None


@dataclass
class ExposureWindow:
    """The trips a positive swab exposes: every trip of the vehicle opened after its last
    negative swab before the positive one and before the first negative after it (trips
    while the result was pending, and after it, which R9 forbids, count), plus the trip
    whose cycle took the sample. Server times on both ends, so a skewed phone or lab clock
    cannot move a trip out of it."""

    trips: list[dict[str, Any]]
    since_sample: str | None
    cleared: datetime | None


def exposure_window(data: AuditData, swab: dict[str, Any]) -> ExposureWindow:
    vid = swab.get("vehicle_id") or ""
    negatives: list[tuple[datetime, dict[str, Any]]] = []
    for s in data.swabs.values():
        at = server_time(s.get("collected"))
        if s.get("vehicle_id") == vid and (s.get("result") or {}).get("result") == "negative" and at:
            negatives.append((at, s))
    at_positive = server_time(swab.get("collected")) or EPOCH  # no collection on record: from the start
    last_negative = max(((at, s) for at, s in negatives if at < at_positive), key=lambda p: p[0],
                        default=(None, None))[1]
    since = server_time(last_negative.get("collected")) if last_negative else None
    cleared = min((at for at, _ in negatives if at > at_positive), default=None)
    # The trip the swabbed cycle disinfected after. A re-disinfection's cycle names the trip
    # whose swab was positive, but disinfected after that swab, not after the trip.
    cycle = data.cycles.get(swab.get("cycle_id") or "") or {}
    own_trip = cycle.get("trip_id") if (cycle.get("opened") or {}).get("kind", "trip") == "trip" else None
    trips = []
    for trip in data.trips_of_vehicle(vid):
        opened = server_time(trip.get("opened"))
        in_window = opened is not None and (since is None or opened > since) and \
            (cleared is None or opened < cleared)
        if in_window or trip["trip_id"] == own_trip:
            trips.append(trip)
    return ExposureWindow(trips, last_negative["sample_id"] if last_negative else None, cleared)


def carried_patient(trip: dict[str, Any]) -> bool:
    """Its patient rode in the vehicle: aboard, handed over, or the trip completed. A trip
    aborted before pickup (patient absent, refused, a breakdown on the way) carried nobody;
    one aborted after it (a breakdown with the patient aboard, who goes on in another
    vehicle) did."""
    return bool(trip.get("completed") or trip.get("handover") or trip.get("s_patient_aboard"))


def ended_carrying(trip: dict[str, Any]) -> bool:
    """Over, with its patient carried: what an exposure list must name. A trip still under
    way joins the list when it ends (ExposureListAmended)."""
    return bool(trip.get("completed") or (trip.get("aborted") and carried_patient(trip)))


@dataclass
class ExposureList:
    """What the disinfection service listed for a positive sample (R9's exposure list)."""

    produced: dict[str, Any] | None
    transfers: set[str]
    acknowledged: list[dict[str, Any]]
    amended: list[dict[str, Any]]

    @property
    def acknowledged_whole(self) -> bool:
        """A dispatcher acknowledged the list as it stands: after it was produced and after
        its last amendment (a patient added later was not in what they acknowledged). In
        the disinfection service's order (its store's positions)."""
        last = max((r["position"] for r in [*([self.produced] if self.produced else []), *self.amended]),
                   default=None)
        return last is not None and any(a["position"] > last for a in self.acknowledged)


EXPOSURE_TYPES = ("ExposureListProduced", "ExposureListAmended", "ExposureListAcknowledged")


def exposure_list(data: AuditData, vehicle_id: str, sample_id: str) -> ExposureList:
    rows = [r for r in data.others if r["type"] in EXPOSURE_TYPES and r.get("vehicle_id") == vehicle_id
            and payload(r).get("sample_id") == sample_id]
    produced = next((r for r in rows if r["type"] == "ExposureListProduced"), None)
    listed = {t.get("transfer_id") for t in (payload(produced).get("transfers") or [])} if produced else set()
    listed |= {(payload(r).get("transfer") or {}).get("transfer_id") for r in rows
               if r["type"] == "ExposureListAmended"}
    listed.discard(None)
    return ExposureList(produced, {str(t) for t in listed},
                        [r for r in rows if r["type"] == "ExposureListAcknowledged"],
                        [r for r in rows if r["type"] == "ExposureListAmended"])


def unlisted(data: AuditData, swab: dict[str, Any], listed: ExposureList) -> list[str]:
    """The transfers exposed to a positive swab (their trips ended, carrying, in its window)
    that no exposure list of the same episode names: the vehicle's positive samples since
    the same negative one. A patient is told once: a trip that ends during a quarantine
    joins the newest list (the disinfection service amends only that one), and a
    re-disinfection's positive swab need not list again who an earlier list named."""
    vid = swab.get("vehicle_id") or ""
    window = exposure_window(data, swab)
    exposed = {str(t["transfer_id"]) for t in window.trips if ended_carrying(t) and t.get("transfer_id")}
    episode = [s for s in positives(data) if s.get("vehicle_id") == vid and s is not swab
               and exposure_window(data, s).since_sample == window.since_sample]
    named = listed.transfers.union(*(exposure_list(data, vid, s["sample_id"]).transfers for s in episode))
    return sorted(exposed - named)


def r9_exposure_list(data: AuditData) -> Iterator[Finding]:
    """The disinfection service's exposure list names every transfer the audit finds
    exposed (its trip ended in the exposure window): a second reading of the same events,
    so a patient its list left out (a bug, an edited history) is found here."""
    for swab in positives(data):
        vid = swab.get("vehicle_id")
        if not vid:
            continue
        listed = exposure_list(data, vid, swab["sample_id"])
        if listed.produced is None:
            # The disinfection service lists them in the commit that records the positive.
            exposed = sorted({str(t["transfer_id"]) for t in exposure_window(data, swab).trips
                              if ended_carrying(t) and t.get("transfer_id")})
            yield Finding(
                "R9", "exposure_list_missing", "violation", swab["result"]["recorded_at"],
                f"sample {swab['sample_id']} of vehicle {vid} positive and no exposure list produced"
                + (f" ({', '.join(exposed)} carried in its exposure window)" if exposed else ""),
                f"车辆{vid}物表核酸阳性（样本{swab['sample_id']}），未生成密接车次清单",
                (_ev(swab["result"], "SwabResultRecorded"),),
                transfer_id=exposed[0] if exposed else None, vehicle_id=vid)
            continue
        missing = unlisted(data, swab, listed)
        if missing:
            produced = listed.produced
            yield Finding(
                "R9", "exposure_list_incomplete", "violation", produced["recorded_at"],
                f"the exposure list for sample {swab['sample_id']} of vehicle {vid} leaves out "
                f"{', '.join(missing)}, carried in its exposure window",
                f"车辆{vid}阳性样本{swab['sample_id']}的密接车次清单漏列转运{'、'.join(missing)}",
                (_ev(swab["result"], "SwabResultRecorded"), _log_ev(produced, "disinfection")),
                transfer_id=missing[0], vehicle_id=vid)


def r9_positive_handling(data: AuditData) -> Iterator[Finding]:
    for swab in positives(data):
        result = swab["result"]
        vid = swab.get("vehicle_id")
        if not vid:
            continue
        cycle = data.cycles.get(swab.get("cycle_id") or "") or {}
        if cycle.get("vehicle_id") != vid:
            cycle = {}
        quarantined = cycle.get("quarantined")
        if not quarantined:
            yield Finding(
                "R9", "positive_not_quarantined", "violation", result["recorded_at"],
                f"sample {swab['sample_id']} of vehicle {vid} positive, vehicle not quarantined",
                f"车辆{vid}物表核酸阳性，未停用隔离", (_ev(result, "SwabResultRecorded"),),
                transfer_id=cycle.get("transfer_id"), vehicle_id=vid)
        else:
            # The quarantine names the re-disinfection it ordered, opened in the same commit.
            redo_id = quarantined.get("redisinfection_cycle_id")
            redo = data.cycles.get(redo_id or "") or {}
            if not redo.get("opened") or redo.get("vehicle_id") != vid:
                yield Finding(
                    "R9", "redisinfection_not_ordered", "violation", quarantined["recorded_at"],
                    f"sample {swab['sample_id']} of vehicle {vid} positive and quarantined, and no "
                    f"re-disinfection cycle opened ({redo_id or 'none named'})",
                    f"车辆{vid}物表核酸阳性已停用，但未开启重新洗消",
                    (_ev(result, "SwabResultRecorded"), _ev(quarantined, "VehicleQuarantined")),
                    transfer_id=cycle.get("transfer_id"), vehicle_id=vid)
        # After a positive, the vehicle carries nobody until a later swab comes back negative.
        cleared = min((s["result"]["recorded_at"] for s in data.swabs.values()
                       if s.get("vehicle_id") == vid and (s.get("result") or {}).get("result") == "negative"
                       and _after(s.get("collected_at"), result.get("reported_at") or result["recorded_at"])),
                      default=None)
        for trip in data.trips_of_vehicle(vid):
            opened = trip.get("opened")
            if opened and _after(opened["recorded_at"], result["recorded_at"]) and (
                    cleared is None or _after(cleared, opened["recorded_at"])):
                yield Finding(
                    "R9", "trip_after_positive", "violation", opened["recorded_at"],
                    f"vehicle {vid} carried {trip.get('transfer_id')} after its positive swab "
                    f"{swab['sample_id']} and before a negative one",
                    f"车辆{vid}物表核酸阳性后未经复检阴性即再次出车",
                    (_ev(result, "SwabResultRecorded"), _ev(opened, "TripOpened")),
                    transfer_id=trip.get("transfer_id"), vehicle_id=vid)
        # Nor is its quarantine lifted before then (released back to service on no negative
        # result), unless a supervisor forced it. A trip's own cycle released meanwhile (a
        # trip under way when the result came) leaves it quarantined.
        for other in _vehicle_cycles(data):
            released = other.get("released")
            if other["vehicle_id"] != vid or not released or not lifts_quarantine(other) or not _after(
                    released["recorded_at"], result["recorded_at"]):
                continue
            if cleared is None or _after(cleared, released["recorded_at"]):
                kind, why, why_zh = _release_kind(released)
                yield Finding(
                    "R9", "released_before_negative", kind, released["recorded_at"],
                    f"vehicle {vid} released from cycle {other['cycle_id']} after its positive swab "
                    f"{swab['sample_id']} and before a negative one" + why,
                    f"车辆{vid}物表核酸阳性后未经复检阴性即被放行" + why_zh,
                    (_ev(result, "SwabResultRecorded"), _ev(released, "VehicleReleased")),
                    transfer_id=other.get("transfer_id"), vehicle_id=vid)


# -- R10 报备 -------------------------------------------------------------------------------


def report_delay(transfer: dict[str, Any]) -> float | None:
    """Seconds from the request to its 报备 (server times), when both are on record."""
    request, reported = transfer.get("request"), transfer.get("reported")
    return seconds(request["recorded_at"], reported["recorded_at"]) if request and reported else None


def reported_late(transfer: dict[str, Any]) -> bool:
    """Reported, but past R10's deadline."""
    delay = report_delay(transfer)
    return delay is not None and delay > REPORT_SLA.total_seconds()


def r10_reporting(data: AuditData) -> Iterator[Finding]:
    minutes = int(REPORT_SLA.total_seconds() // 60)
    for tid, t in data.transfers.items():
        request = t.get("request")
        if not request:
            continue
        reported = t.get("reported")
        late = report_delay(t)
        if reported is None or reported_late(t):
            # Not reported by the deadline: a finding from the deadline on, whether the
            # report came later (then it names how late) or never.
            yield Finding(
                "R10", "reported_late" if reported else "not_reported", "sla",
                _later(request["recorded_at"], REPORT_SLA),
                f"transfer {tid} reported {(late or 0) / 60:.0f} min after the request" if reported
                else f"transfer {tid} not reported to the county health bureau within {minutes} min",
                f"转运{tid}报备延迟{(late or 0) / 60:.0f}分钟" if reported
                else f"转运{tid}超过{minutes}分钟未向县卫健局报备",
                tuple(_ev(r, ty) for r, ty in ((request, "TransferRequested"), (reported, "TransferReported"))
                      if r), transfer_id=tid)
        if reported is None:
            continue
        delivery = t.get("delivery")
        if delivery and not delivery.get("delivered"):
            # Dispatch reported, but the bureau's system has not taken it (the last attempt
            # failed): the bureau was not told. Gone once a later attempt gets through.
            yield Finding(
                "R10", "report_not_delivered", "violation",
                max(delivery["recorded_at"], _later(request["recorded_at"], REPORT_SLA), key=utc_key),
                f"transfer {tid}: the 报备 did not reach the county health bureau's system "
                f"({delivery.get('attempts')} attempts; {delivery.get('error') or 'no answer'})",
                f"转运{tid}的报备未送达县卫健局系统",
                (_ev(reported, "TransferReported"), _ev(delivery, "ReportDeliveryFailed")), transfer_id=tid)
        channel = (request.get("requested_by") or {}).get("channel")
        if channel == "direct_call" and reported.get("reported_by") != "120":
            yield Finding(
                "R10", "direct_call_not_reported_by_120", "violation", reported["recorded_at"],
                f"transfer {tid} came by a direct 120 call but was reported by {reported.get('reported_by')}",
                "患者直接拨打120的转运应由120向县卫健局报备",
                (_ev(reported, "TransferReported"),), transfer_id=tid)


# -- R11 the loop closes -------------------------------------------------------------------


RETURN_TO_ORIGIN = "origin"  # dispatch's destination for a return leg with no origin facility


def needs_return(request: dict[str, Any]) -> bool:
    """R11's loops: a transfer asked to return, and every outpatient visit (the rule says so
    whatever the request said; dispatch refuses one that says no)."""
    return bool(request.get("return_required")) or request.get("purpose") == "outpatient_visit"


def r11_loop_closed(data: AuditData) -> Iterator[Finding]:
    """A return-required transfer whose patient was handed over is closed by the hospital's
    admission (PatientAdmitted) or by its return leg (the transfer whose request names it
    in `return_of`) handed over in turn; not by the transfer service's own LoopClosed,
    which this check does not take on trust. Open RETURN_LEG_SLA after the handover (the
    crew's time, as R13 reads it): a finding from then on."""
    admitted = {row["transfer_id"] for row in data.others if row["type"] == "PatientAdmitted"}
    returned: set[str] = set()
    for leg_id, leg in data.transfers.items():
        outbound_id, handed = leg.get("return_of"), leg.get("handed_over")
        if not outbound_id or not handed:
            continue
        returned.add(outbound_id)
        # The return leg goes back to where the outbound leg started ("origin", dispatch's
        # word for it, or that facility).
        origin = (((data.transfers.get(outbound_id) or {}).get("request") or {}).get("origin") or {})
        went = handed.get("facility_id") or leg.get("destination_id")
        if went not in (RETURN_TO_ORIGIN, origin.get("facility_id"), None):
            yield Finding(
                "R11", "return_leg_elsewhere", "violation", handed["recorded_at"],
                f"return leg {leg_id} of {outbound_id} handed the patient over at {went}, not at the "
                f"origin ({origin.get('name') or origin.get('facility_id')})",
                f"返程转运{leg_id}未将患者送回原出发地，而是送至{went}",
                (_ev(handed, "TransferHandedOver"),), transfer_id=outbound_id, facility_id=went)
    for tid, t in data.transfers.items():
        request = t.get("request") or {}
        handed = t.get("handed_over")
        if not needs_return(request) or not handed or tid in admitted or tid in returned:
            continue
        trip = data.carrying_trip(tid) or {}
        handover = trip.get("handover") or handed
        hours = int(RETURN_LEG_SLA.total_seconds() // 3600)
        yield Finding(
            "R11", "loop_not_closed", "sla", _later(handover["at"], RETURN_LEG_SLA),
            f"transfer {tid} needs the return leg; neither returned nor admitted {hours} h after "
            "the handover",
            f"转运{tid}需闭环返回，交接后{hours}小时内既未返回也未收治入院",
            (_ev(handover, "PatientHandedOver" if trip.get("handover") else "TransferHandedOver"),),
            transfer_id=tid, facility_id=handover.get("facility_id"))


# -- R12 the ledger names everyone ---------------------------------------------------------


def r12_trip_without_request(data: AuditData) -> Iterator[Finding]:
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


def is_fever_clinic_case(request: dict[str, Any]) -> bool:
    """R13's cases: suspected or confirmed, found in a fever clinic (not every fever-clinic
    patient: a fever is why they are there)."""
    return request.get("risk_category") in ("confirmed", "suspected") and (
        (request.get("origin") or {}).get("kind") == "fever_clinic")


def r13_fever_clinic_cases(data: AuditData) -> Iterator[Finding]:
    hours = int(FEVER_CLINIC_TRANSFER_SLA.total_seconds() // 3600)
    for tid, t in data.transfers.items():
        request = t.get("request") or {}
        if not request or not is_fever_clinic_case(request):
            continue
        trip = data.carrying_trip(tid)
        handover = (trip or {}).get("handover")
        took = seconds(request["at"], handover["at"]) if handover else None
        if handover is None or (took is not None and took > FEVER_CLINIC_TRANSFER_SLA.total_seconds()):
            yield Finding(
                "R13", "fever_clinic_case_delayed", "sla", _later(request["at"], FEVER_CLINIC_TRANSFER_SLA),
                f"case {tid} from a fever clinic reached the designated hospital after "
                f"{(took or 0) / 60:.0f} min" if handover
                else f"case {tid} from a fever clinic not at a designated hospital within {hours} h",
                f"发热门诊疑似/确诊病例{tid}未在{hours}小时内转运至定点医院（责任倒查）",
                tuple(e for e in (_ev(request, "TransferRequested"),
                                  _ev(handover, "PatientHandedOver") if handover else None) if e),
                transfer_id=tid, vehicle_id=t.get("vehicle_id"), facility_id=t.get("destination_id"))
        dest = data.facilities.get(t.get("destination_id") or "")
        # An emergency goes where it is treated first (R6: a stroke to the specialty hospital).
        emergency = (request.get("condition") or {}).get("critical")
        if dest and not emergency and "designated" not in ((dest.get("registered") or {}).get("roles") or []):
            yield Finding(
                "R13", "fever_clinic_case_not_to_designated", "violation",
                (t.get("destination") or {}).get("recorded_at") or request["recorded_at"],
                f"case {tid} from a fever clinic sent to {t.get('destination_id')}, "
                "not a designated hospital",
                "发热门诊疑似/确诊病例未转运至定点医院", (_ev(t.get("destination"), "DestinationAssigned"),),
                transfer_id=tid, facility_id=t.get("destination_id"))


# -- R14 swab results on time -----------------------------------------------------------------


def r14_swab_overdue(data: AuditData) -> Iterator[Finding]:
    hours = int(SWAB_RESULT_SLA.total_seconds() // 3600)
    for sid, s in data.swabs.items():
        collected = s.get("collected")
        if not collected or not s.get("vehicle_id"):
            continue
        result = s.get("result")
        start = s.get("collected_at") or collected["at"]
        if result is None:
            what = f"no result for sample {sid} within {hours} h"
        else:
            # By the lab's and the collector's own times, and by the server's receipt of both
            # (a lab's report time written earlier than it reached the system hides nothing).
            late = max(seconds(start, result.get("reported_at") or result["recorded_at"]) or 0.0,
                       seconds(collected["recorded_at"], result["recorded_at"]) or 0.0)
            if late <= SWAB_RESULT_SLA.total_seconds():
                continue
            what = f"result for sample {sid} came {late / 3600:.1f} h after collection"
        yield Finding(
            "R14", "swab_result_overdue", "sla", _later(start, SWAB_RESULT_SLA), what,
            f"样本{sid}核酸结果超过{hours}小时未回报",
            tuple(_ev(r, t) for r, t in ((collected, "SurfaceSwabCollected"), (result, "SwabResultRecorded"))
                  if r),
            vehicle_id=s["vehicle_id"])


# What a finding's `rule` can be: a rule of DOMAIN.md, or an override of one.
RULE_IDS = (*(f"R{n}" for n in range(1, 15)), "override")

CHECKS: tuple[CheckSpec, ...] = (
    CheckSpec("R1", "vehicle_reserved_twice", "a vehicle reserved again before its trip ended",
              frozenset({"VehicleReserved", "VehicleAwaitingDisinfection", "VehicleStoodDown"}),
              r1_reserved_twice, VEHICLE),
    CheckSpec("R1", "overlapping_trips", "two trips of one vehicle open at once",
              frozenset({"TripOpened", "TripCompleted", "TripAborted"}), r1_overlapping_trips, VEHICLE),
    CheckSpec("R2", "reserved_before_release",
              "reserved while awaiting disinfection (or a supervisor's override)",
              frozenset({"VehicleAwaitingDisinfection", "VehicleReserved", "VehicleReturnedToService",
                         "RuleOverridden"}), r2_reserved_awaiting, VEHICLE),
    CheckSpec("R2", "trip_before_release", "a trip started before disinfection released the vehicle",
              frozenset({"TripCompleted", "TripOpened", "VehicleReleased"}), r2_trip_before_release, VEHICLE),
    CheckSpec("R3", "vehicle_not_dedicated", "risk transfer in a vehicle outside the dedicated pool",
              frozenset({"VehicleAssigned", "VehicleRegistered"}), r3_r5_vehicle_fit, TRANSFER),
    CheckSpec("override", "manual_assignment_override",
              "every assignment with an override reason, with the rules recorded as overridden",
              frozenset({"VehicleAssigned", "RuleOverridden"}), manual_overrides, TRANSFER),
    CheckSpec("override", "reprioritized", "every change of a transfer's priority by a dispatcher (R4)",
              frozenset({"TransferReprioritized"}), reprioritized, TRANSFER),
    CheckSpec("override", "supervisor_early_release",
              "every release a supervisor forced (R2, R8); forced by another role, an R2 violation",
              frozenset({"VehicleReleased"}), early_releases, VEHICLE),
    CheckSpec("R6", "destination_role_mismatch", "destination role does not fit the patient",
              frozenset({"DestinationAssigned", "TransferRedirected", "FacilityRegistered"}),
              r6_destination_role, TRANSFER),
    CheckSpec("R7", "overflowing_destination", "a facility past its threshold took a new patient",
              frozenset({"DestinationAssigned", "FacilityLoadReported"}), r7_overflowing_destination,
              TRANSFER),
    CheckSpec("R7", "backup_not_activated",
              "a backup hospital took a new patient while no hospital it backs up was past its threshold",
              frozenset({"DestinationAssigned", "FacilityRegistered", "FacilityLoadReported"}),
              r7_backup_not_activated, TRANSFER),
    CheckSpec("R8", "stages", "stage below protocol, terminal before initial, release without both stages",
              frozenset({"InitialDisinfectionLogged", "TerminalDisinfectionLogged", "VehicleReleased"}),
              r8_stages, VEHICLE),
    CheckSpec("R8", "returned_without_terminal", "back in service with no terminal stage on record",
              frozenset({"VehicleReturnedToService", "TerminalDisinfectionLogged"}),
              r8_returned_without_terminal, VEHICLE),
    CheckSpec("R9", "released_without_swab", "released with no surface swab",
              frozenset({"VehicleReleased", "SurfaceSwabCollected"}), r9_released_without_swab, VEHICLE),
    CheckSpec("R9", "positive_handling",
              "a positive not quarantined or with no re-disinfection ordered, the vehicle used or "
              "released from quarantine before a negative",
              frozenset({"SwabResultRecorded", "VehicleQuarantined", "CycleOpened"}), r9_positive_handling,
              VEHICLE),
    CheckSpec("R9", "exposure_list_incomplete",
              "no exposure list for a positive, or one that leaves out a patient the events show exposed",
              frozenset({"SwabResultRecorded", "ExposureListProduced", "ExposureListAmended"}),
              r9_exposure_list, VEHICLE),
    CheckSpec("R10", "reporting",
              "not reported, reported late, not delivered to the bureau, or a direct call not reported "
              "by 120",
              frozenset({"TransferRequested", "TransferReported"}), r10_reporting, TRANSFER),
    CheckSpec("R11", "loop_not_closed",
              "return leg neither done nor replaced by an admission, or done to somewhere else",
              frozenset({"TransferHandedOver", "PatientAdmitted"}), r11_loop_closed, TRANSFER),
    CheckSpec("R12", "trip_without_request", "a trip the ledger cannot attribute to a person",
              frozenset({"TripOpened", "TransferRequested"}), r12_trip_without_request, TRANSFER),
    CheckSpec("R13", "fever_clinic_cases", "fever-clinic cases not at a designated hospital in time",
              frozenset({"TransferRequested", "PatientHandedOver"}), r13_fever_clinic_cases, TRANSFER),
    CheckSpec("R14", "swab_result_overdue", "swab result later than the lab SLA",
              frozenset({"SurfaceSwabCollected", "SwabResultRecorded"}), r14_swab_overdue, VEHICLE),
)
R4_SPEC = CheckSpec("R4", "priority_inversion",
                    "a waiting transfer (queued, or left without its vehicle) passed over for a vehicle "
                    "it fits, in its condition then, by a less urgent one, or by a later one of its "
                    "priority",
                    frozenset({"TransferQueued", "VehicleAssigned", "TransferPrioritized",
                               "TransferReprioritized", "TransferCancelled"}),
                    r4_priority_inversion, DISPATCH)
ALL_CHECKS = (*CHECKS, R4_SPEC)


def active_checks(known_types: set[str]) -> tuple[list[CheckSpec], list[CheckSpec]]:
    """(checks that run, checks waiting for events the catalogue does not have)."""
    running = [c for c in ALL_CHECKS if c.needs <= known_types]
    waiting = [c for c in ALL_CHECKS if not c.needs <= known_types]
    return running, waiting


def scope_key(check: CheckSpec, f: Finding) -> str | None:
    """Which scope a finding belongs to: the key the live model re-evaluates it under."""
    if check.scope == DISPATCH:
        return DISPATCH
    key = f.vehicle_id if check.scope == VEHICLE else f.transfer_id
    return f"{check.scope}:{key}" if key else None


def evaluate_scope(data: AuditData, scope: str, known_types: set[str],
                   failed: list[dict[str, str]] | None = None) -> list[tuple[str, Finding]]:
    """(scope key, finding) of every running check of this scope (vehicle or transfer)
    over the data, whatever their time. A check that trips over odd data is reported in
    `failed` (and logged), never allowed to hide the others' findings."""
    indexed = data.indexed()
    running, _ = active_checks(known_types)
    out: dict[str, tuple[str, Finding]] = {}
    for check in running:
        if check.scope != scope:
            continue
        try:
            for f in check.run(indexed):
                key = scope_key(check, f)
                if key is not None:
                    out.setdefault(f.id, (key, f))
        except Exception as exc:
            log.exception("check %s %s failed", check.rule, check.code)
            if failed is not None:
                failed.append({"rule": check.rule, "check": check.code, "error": repr(exc)})
    return list(out.values())


def evaluate(data: AuditData, now: datetime, known_types: set[str],
             failed: list[dict[str, str]] | None = None) -> list[Finding]:
    """Every running check over the data, the findings whose time has come by `now`."""
    found: dict[str, Finding] = {}
    for scope in (VEHICLE, TRANSFER):
        for _, f in evaluate_scope(data, scope, known_types, failed):
            found.setdefault(f.id, f)
    if R4_SPEC.needs <= known_types:
        for f in r4_priority_inversion(data.indexed()):
            found.setdefault(f.id, f)
    cut = utc_key(now.isoformat())
    return sorted((f for f in found.values() if utc_key(f.at) <= cut),
                  key=lambda f: (utc_key(f.at), f.rule, f.id))


def rules_status(known_types: set[str]) -> list[dict[str, Any]]:
    running, waiting = active_checks(known_types)
    out = [{"rule": c.rule, "check": c.code, "summary": c.summary, "status": "checked"}
           for c in running]
    out += [{"rule": c.rule, "check": c.code, "summary": c.summary, "status": "waiting",
             "waiting_on": ", ".join(sorted(c.needs - known_types))} for c in waiting]
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
