"""From one event to the fact rows it contributes: pure, no I/O.

Every read model of the projection is a set of fact tables. A row is keyed by what it
describes (a transfer, a trip, a cycle, a swab, a vehicle, a facility) and each of its
columns is written by events of exactly one stream. Columns keep either the first value
their stream gave (`first`) or the last (`last`). Both sources of events (the store tail
and Kafka) keep the order within a stream and nothing else, so this rule makes the
tables a function of the set of events, whatever order the streams interleave in: the
live model folded from Kafka and a rebuild folded store after store come out identical
(tests/unit/test_projection_findings.py shuffles to show it).

Views (KPIs, custody, ledger, exposures) are pure functions over these rows, evaluated
when asked; the findings are too, but kept as a read model of their own (violations.py).
They join across streams then, not here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, NamedTuple

import orjson

log = logging.getLogger(__name__)

# The region's civil time (China has one zone and no daylight saving): ledger days and
# KPI days are local days, not UTC ones.
REGION_TZ = timezone(timedelta(hours=8), "Asia/Shanghai")

STEPS = ("acknowledged", "en_route", "at_pickup", "patient_aboard", "at_destination", "handed_over")


class Ev(NamedTuple):
    """The parts of an envelope the fold reads. Cheaper than an Envelope (and than a
    frozen dataclass): a rebuild makes a million of them."""

    event_id: str
    type: str
    store: str
    stream_id: str
    stream_version: int
    position: int
    occurred_at: str
    recorded_at: str
    actor: str
    role: str
    payload: dict[str, Any]
    schema_version: int = 1
    raw: str | None = None  # the payload's canonical text, when the archive already has it


def upcast(type_: str, version: int, payload: dict[str, Any]) -> dict[str, Any]:
    """Old payloads read as the current contract; unknown types pass as they are."""
    # Imported here: a rebuild's worker processes fold without the catalogue (pydantic)
    # until an event needs an upcaster.
    import libs.events.catalog  # noqa: F401  (registers the contracts and their upcasters)
    from libs.events.contracts import UnknownEventType, registry

    try:
        return registry.upcast(type_, version, payload)[1]
    except (UnknownEventType, LookupError):
        return payload


def current_versions() -> dict[str, int]:
    """Each registered type's schema version: an archived event at it needs no upcaster."""
    import libs.events.catalog  # noqa: F401  (registers the contracts)
    from libs.events.contracts import registry

    return {name: cls.schema_version for name, cls in registry.types().items()}


# An archive row as the rebuild reads it (audit_archive, tables.py).
ARCHIVE_COLUMNS = ("seq", "event_id", "store", "position", "stream_id", "stream_version", "type",
                   "schema_version", "occurred_at", "recorded_at", "actor", "role", "payload")


def ev_of_row(row: Any, current: dict[str, int]) -> Ev:
    """From an archive row in ARCHIVE_COLUMNS order (a SQLAlchemy row or an asyncpg
    record): by position, and without the upcaster when the version is current, because
    a rebuild does this a million times."""
    (_, event_id, store, position, stream_id, stream_version, type_, schema_version,
     occurred_at, recorded_at, actor, role, text_) = row
    payload = orjson.loads(text_)
    if current.get(type_) != schema_version:
        upcasted = upcast(type_, schema_version, payload)
        if upcasted is not payload:
            return Ev(event_id, type_, store, stream_id, stream_version, position, occurred_at,
                      recorded_at, actor, role, upcasted, schema_version, None)
    return Ev(event_id, type_, store, stream_id, stream_version, position, occurred_at, recorded_at,
              actor, role, payload, schema_version, text_)


@dataclass(frozen=True)
class TableSpec:
    key: tuple[str, ...]
    columns: tuple[str, ...]  # besides the key
    last: frozenset[str] = frozenset()  # columns whose stream's last value wins
    append_only: bool = False  # one row per event


# Dispatch's decisions about a transfer (all on its transfer-* stream): the reasons the
# timeline shows, and what R3-R7 and the override log read, in dispatch's store order.
DECISION_TYPES = frozenset({
    "TransferPrioritized", "TransferReprioritized", "DestinationAssigned", "TransferRedirected",
    "TransferQueued", "VehicleAssigned", "RuleOverridden", "VehicleWithdrawn", "TransferCancelled",
    "TransferReported", "TransferHandedOver",
})
# What a vehicle's own stream says about its reservations and its disinfection hold (R1, R2).
VEHICLE_LOG_TYPES = frozenset({
    "VehicleRegistered", "VehicleReserved", "VehicleStoodDown", "VehicleAwaitingDisinfection",
    "VehicleReleaseReceivedEarly", "VehicleReturnedToService", "VehicleTakenOutOfService",
    "VehicleDutyChanged", "VehicleHoldLifted",
})
# Events of the other services that rules read but no fact table models: kept by type.
OTHER_TYPES = frozenset({"TripAborted", "ReturnRequested", "PatientAdmitted", "LoopClosed",
                         "ExposureListProduced", "ExposureListAmended", "ExposureListAcknowledged"})

SPECS: dict[str, TableSpec] = {
    "transfers": TableSpec(
        ("transfer_id",),
        ("day", "requested_at", "risk_category", "origin_kind", "channel", "patient_name",
         "destination_id", "vehicle_id", "priority", "return_of", "request", "prioritized",
         "destination", "queued", "assigned", "reported", "handed_over", "cancelled", "delivery",
         "reassigned"),
        last=frozenset({"destination_id", "priority", "prioritized", "destination", "delivery",
                        "reassigned"}),
    ),
    "decisions": TableSpec(
        ("event_id",),
        ("transfer_id", "type", "position", "stream_version", "at", "recorded_at", "actor",
         "role", "vehicle_id", "facility_id", "data"),
        append_only=True,
    ),
    "vehicles": TableSpec(("vehicle_id",), ("plate", "kind", "dedicated_pool", "life_support",
                                            "registered")),
    "vehicle_log": TableSpec(
        ("event_id",),
        ("vehicle_id", "stream_version", "position", "type", "at", "recorded_at", "actor", "role",
         "transfer_id", "trip_id", "cycle_id", "data"),
        append_only=True,
    ),
    "facilities": TableSpec(("facility_id",), ("name", "registered")),
    "facility_loads": TableSpec(
        ("event_id",),
        ("facility_id", "position", "stream_version", "at", "occupied", "ratio", "overflowing"),
        append_only=True,
    ),
    "trips": TableSpec(
        ("trip_id",),
        ("transfer_id", "vehicle_id", "destination_id", "opened_at", "opened",
         *(f"s_{s}" for s in STEPS), "handover", "confirmed", "completed", "awaiting", "returned",
         "aborted"),
    ),
    "cycles": TableSpec(
        ("cycle_id",),
        ("vehicle_id", "trip_id", "transfer_id", "opened_at", "opened", "initial", "terminal",
         "released", "quarantined", "superseded"),
    ),
    "swabs": TableSpec(("sample_id",), ("cycle_id", "vehicle_id", "collected_at", "collected",
                                         "result")),
    "others": TableSpec(
        ("event_id",),
        ("type", "stream_id", "stream_version", "position", "at", "recorded_at", "actor", "role",
         "transfer_id", "vehicle_id", "data"),
        append_only=True,
    ),
}

JSON_COLUMNS = frozenset({
    "request", "prioritized", "destination", "queued", "assigned", "reported", "handed_over",
    "data", "registered", "opened", *(f"s_{s}" for s in STEPS), "handover", "confirmed",
    "completed", "awaiting", "returned", "initial", "terminal", "released", "quarantined",
    "collected", "result", "cancelled", "delivery", "aborted", "superseded", "reassigned",
})
_LAST = {name: spec.last for name, spec in SPECS.items()}
_APPEND_ONLY = frozenset(name for name, spec in SPECS.items() if spec.append_only)


# What the columns that are not text hold (tables.py gives them their SQL types). A value
# of another kind (a forged payload, or a newer contract without its upcaster) would fail
# the database's write, and the subscription with it, again and again: the fold refuses
# it first, and the event is unreadable to the fact tables (it stays archived).
_INT32, _INT64 = 2**31, 2**63


def _whole(limit: int) -> Callable[[Any], bool]:
    return lambda v: v.__class__ is int and -limit <= v < limit


COLUMN_KINDS: dict[str, Callable[[Any], bool]] = {
    "priority": _whole(_INT32), "occupied": _whole(_INT32), "stream_version": _whole(_INT32),
    "position": _whole(_INT64), "ratio": lambda v: v.__class__ in (int, float),
    **dict.fromkeys(("overflowing", "dedicated_pool", "life_support"), lambda v: v.__class__ is bool),
}
_kind_of = COLUMN_KINDS.get


def unfit(key: tuple[Any, ...], values: dict[str, Any]) -> str | None:
    """The first column (or "key") whose value its column cannot hold; None: all fit. Every
    other column is text: a string or nothing."""
    for part in key:
        if part.__class__ is not str:
            return "key"
    for column, value in values.items():
        if value is None or (value.__class__ is str and column not in COLUMN_KINDS):
            continue  # the common case first: text in a text column
        fits = _kind_of(column)
        if fits is None or not fits(value):
            return column
    return None


@dataclass(frozen=True, slots=True)
class Fact:
    table: str
    key: tuple[Any, ...]
    values: dict[str, Any]


def local_day(ts: str) -> str:
    return datetime.fromisoformat(ts).astimezone(REGION_TZ).date().isoformat()


_dumps = orjson.dumps
_SORTED = orjson.OPT_SORT_KEYS


def dump(value: Any) -> str:
    """Canonical compact JSON (sorted keys, UTF-8): the archive's payloads and the facts'
    JSON columns, the same text whichever path wrote them."""
    return _dumps(value, option=_SORTED).decode()


def ref(ev: Ev, **extra: Any) -> str:
    """A fact's proof: which event, when (device and server), who; plus what it said."""
    return _ref(ev, extra)


def _ref(ev: Ev, extra: dict[str, Any] | None = None) -> str:
    d = {"event_id": ev.event_id, "at": ev.occurred_at, "recorded_at": ev.recorded_at,
         "actor": ev.actor, "role": ev.role, "v": ev.stream_version, "store": ev.store}
    if extra:
        d.update(extra)
    return _dumps(d, option=_SORTED).decode()


# -- what each type contributes ------------------------------------------------------------
# One function per event type, each calling put(table, key, values) for every fact row
# it contributes: a rebuild calls them a million times, so they build their dicts
# directly and share nothing but `put`.

Put = Callable[[str, tuple[Any, ...], dict[str, Any]], None]


def _transfer_requested(ev: Ev, p: dict[str, Any], put: Put) -> None:
    requested_by = p.get("requested_by") or {}
    origin = p.get("origin") or {}
    patient = p.get("patient") or {}
    put("transfers", (p["transfer_id"],), {
        "day": local_day(ev.occurred_at), "requested_at": ev.occurred_at,
        "risk_category": p.get("risk_category"), "origin_kind": origin.get("kind"),
        "channel": requested_by.get("channel"), "patient_name": patient.get("name"),
        "return_of": p.get("return_of"),
        "request": _ref(ev, {"patient": patient, "risk_category": p.get("risk_category"),
                             "condition": p.get("condition") or {}, "origin": origin,
                             "purpose": p.get("purpose"), "return_required": p.get("return_required"),
                             "return_of": p.get("return_of"), "requested_by": requested_by}),
    })


def _decision(ev: Ev, p: dict[str, Any], put: Put) -> None:
    put("decisions", (ev.event_id,), {
        "transfer_id": p["transfer_id"], "type": ev.type, "position": ev.position,
        "stream_version": ev.stream_version, "at": ev.occurred_at, "recorded_at": ev.recorded_at,
        "actor": ev.actor, "role": ev.role, "vehicle_id": p.get("vehicle_id"),
        "facility_id": p.get("facility_id") or p.get("to_facility_id"),
        "data": ev.raw or dump(p)})


def _prioritized(ev: Ev, p: dict[str, Any], put: Put) -> None:
    put("transfers", (p["transfer_id"],), {
        "priority": p.get("priority"),
        "prioritized": _ref(ev, {"priority": p.get("priority"), "reason": p.get("reason")})})
    _decision(ev, p, put)


def _reprioritized(ev: Ev, p: dict[str, Any], put: Put) -> None:
    put("transfers", (p["transfer_id"],), {"priority": p.get("priority")})
    _decision(ev, p, put)


def _destination(ev: Ev, p: dict[str, Any], put: Put) -> None:
    facility = p.get("facility_id") or p.get("to_facility_id")
    put("transfers", (p["transfer_id"],), {
        "destination_id": facility,
        "destination": _ref(ev, {"facility_id": facility, "reason": p.get("reason"),
                                 "candidates": p.get("candidates") or []})})
    _decision(ev, p, put)


def _queued(ev: Ev, p: dict[str, Any], put: Put) -> None:
    put("transfers", (p["transfer_id"],), {"queued": _ref(ev, {"reason": p.get("reason")})})
    _decision(ev, p, put)


def _assigned(ev: Ev, p: dict[str, Any], put: Put) -> None:
    put("transfers", (p["transfer_id"],), {
        "vehicle_id": p.get("vehicle_id"),
        "assigned": _ref(ev, {"vehicle_id": p.get("vehicle_id"), "manual": p.get("manual", False),
                              "override_reason": p.get("override_reason"), "reason": p.get("reason"),
                              "destination_id": p.get("destination_id")}),
        # The latest assignment (the first stays in `assigned`): a trip names the one it
        # opened from, and its vehicle's dispatch is that one's time.
        "reassigned": _ref(ev, {"vehicle_id": p.get("vehicle_id")})})
    _decision(ev, p, put)


def _reported(ev: Ev, p: dict[str, Any], put: Put) -> None:
    put("transfers", (p["transfer_id"],), {
        "reported": _ref(ev, {"reported_to": p.get("reported_to"), "reported_by": p.get("reported_by")})})
    _decision(ev, p, put)


def _cancelled(ev: Ev, p: dict[str, Any], put: Put) -> None:
    put("transfers", (p["transfer_id"],), {"cancelled": _ref(ev, {"reason": p.get("reason")})})
    _decision(ev, p, put)


def _delivery(ev: Ev, p: dict[str, Any], put: Put) -> None:
    """Whether the 报备 reached the health bureau's system (R10): the last attempt's word."""
    put("transfers", (p["transfer_id"],), {"delivery": _ref(ev, {
        "delivered": ev.type == "ReportDelivered", "attempts": p.get("attempts"),
        "error": p.get("error")})})


def _transfer_handed_over(ev: Ev, p: dict[str, Any], put: Put) -> None:
    put("transfers", (p["transfer_id"],), {
        "handed_over": _ref(ev, {"trip_id": p.get("trip_id"), "facility_id": p.get("facility_id")})})
    _decision(ev, p, put)


def _vehicle_log(ev: Ev, p: dict[str, Any], put: Put) -> None:
    put("vehicle_log", (ev.event_id,), {
        "vehicle_id": p["vehicle_id"], "stream_version": ev.stream_version, "position": ev.position,
        "type": ev.type, "at": ev.occurred_at, "recorded_at": ev.recorded_at, "actor": ev.actor,
        "role": ev.role, "transfer_id": p.get("transfer_id"), "trip_id": p.get("trip_id"),
        "cycle_id": p.get("cycle_id"), "data": ev.raw or dump(p)})


def _vehicle_registered(ev: Ev, p: dict[str, Any], put: Put) -> None:
    put("vehicles", (p["vehicle_id"],), {
        "plate": p.get("plate"), "kind": p.get("kind"),
        "dedicated_pool": bool(p.get("dedicated_pool")), "life_support": bool(p.get("life_support")),
        # Its place in dispatch's store: R4's fold judges an assignment by the vehicles
        # registered before it, however the events were batched.
        "registered": _ref(ev, {"station": p.get("station"), "location": p.get("location"),
                                "position": ev.position})})
    _vehicle_log(ev, p, put)


def _awaiting(ev: Ev, p: dict[str, Any], put: Put) -> None:
    _vehicle_log(ev, p, put)
    if p.get("trip_id"):
        put("trips", (p["trip_id"],), {"awaiting": _ref(ev, {"vehicle_id": p.get("vehicle_id")})})


def _returned(ev: Ev, p: dict[str, Any], put: Put) -> None:
    _vehicle_log(ev, p, put)
    if p.get("trip_id"):
        put("trips", (p["trip_id"],), {"returned": _ref(ev, {
            "cycle_id": p.get("cycle_id"), "vehicle_id": p.get("vehicle_id"),
            "quarantine_lifted": bool(p.get("quarantine_lifted"))})})


def _facility_registered(ev: Ev, p: dict[str, Any], put: Put) -> None:
    put("facilities", (p["facility_id"],), {
        "name": p.get("name"),
        "registered": _ref(ev, {"roles": p.get("roles") or [], "capacity": p.get("fever_clinic_capacity"),
                                "backup_ids": p.get("backup_ids") or [],
                                "threshold": p.get("overflow_threshold", 0.8)})})


def _facility_load(ev: Ev, p: dict[str, Any], put: Put) -> None:
    put("facility_loads", (ev.event_id,), {
        "facility_id": p.get("facility_id"), "position": ev.position,
        "stream_version": ev.stream_version, "at": p.get("reported_at") or ev.occurred_at,
        "occupied": p.get("fever_clinic_occupied"), "ratio": p.get("load_ratio"),
        "overflowing": bool(p.get("overflowing"))})


def _trip_opened(ev: Ev, p: dict[str, Any], put: Put) -> None:
    put("trips", (p["trip_id"],), {
        "transfer_id": p.get("transfer_id"), "vehicle_id": p.get("vehicle_id"),
        "destination_id": p.get("destination_id"), "opened_at": ev.occurred_at,
        "opened": _ref(ev, {"origin": p.get("origin") or {}, "destination_id": p.get("destination_id"),
                            "return_required": p.get("return_required"), "takeover_of": p.get("takeover_of"),
                            "assignment_event_id": p.get("assignment_event_id")})})


_STEP_COLUMNS = {s: f"s_{s}" for s in STEPS}


def _step(ev: Ev, p: dict[str, Any], put: Put) -> None:
    column = _STEP_COLUMNS.get(p.get("step"))  # type: ignore[arg-type]
    if column is not None:
        put("trips", (p["trip_id"],), {column: _ref(ev, {
            "device_at": p.get("device_at"), "position": p.get("position"),
            "client_event_id": p.get("client_event_id")})})


def _handover(column: str) -> Callable[[Ev, dict[str, Any], Put], None]:
    def fold(ev: Ev, p: dict[str, Any], put: Put) -> None:
        put("trips", (p["trip_id"],), {column: _ref(ev, {
            "facility_id": p.get("facility_id"), "received_by": p.get("received_by"),
            "confirmed_by": p.get("confirmed_by")})})
    return fold


def _trip_completed(ev: Ev, p: dict[str, Any], put: Put) -> None:
    put("trips", (p["trip_id"],), {"transfer_id": p.get("transfer_id"), "vehicle_id": p.get("vehicle_id"),
                                   "completed": _ref(ev, {"reason": p.get("reason")})})


def _cycle_opened(ev: Ev, p: dict[str, Any], put: Put) -> None:
    put("cycles", (p["cycle_id"],), {
        "vehicle_id": p.get("vehicle_id"), "trip_id": p.get("trip_id"),
        "transfer_id": p.get("transfer_id"), "opened_at": ev.occurred_at,
        "opened": _ref(ev, {"reason": p.get("reason"), "kind": p.get("kind", "trip")})})


def _stage(column: str) -> Callable[[Ev, dict[str, Any], Put], None]:
    def fold(ev: Ev, p: dict[str, Any], put: Put) -> None:
        put("cycles", (p["cycle_id"],), {"vehicle_id": p.get("vehicle_id"),
                                         column: _ref(ev, {"stage": p.get("stage") or {}})})
    return fold


def _swab_collected(ev: Ev, p: dict[str, Any], put: Put) -> None:
    put("swabs", (p["sample_id"],), {
        "cycle_id": p.get("cycle_id"), "vehicle_id": p.get("vehicle_id"),
        "collected_at": p.get("collected_at") or ev.occurred_at,
        "collected": _ref(ev, {"sites": p.get("sites") or [], "collected_by": p.get("collected_by"),
                               "collected_at": p.get("collected_at")})})


def _swab_result(ev: Ev, p: dict[str, Any], put: Put) -> None:
    put("swabs", (p["sample_id"],), {"result": _ref(ev, {
        "result": p.get("result"), "lab": p.get("lab"), "reported_at": p.get("reported_at")})})


def _released(ev: Ev, p: dict[str, Any], put: Put) -> None:
    put("cycles", (p["cycle_id"],), {"released": _ref(ev, {
        "trip_id": p.get("trip_id"), "policy": p.get("policy"), "override": bool(p.get("override")),
        "override_reason": p.get("override_reason"), "overridden_rules": p.get("overridden_rules") or [],
        "missing": p.get("missing") or [], "quarantine_lifted": bool(p.get("quarantine_lifted"))})})


def _quarantined(ev: Ev, p: dict[str, Any], put: Put) -> None:
    put("cycles", (p["cycle_id"],), {"quarantined": _ref(ev, {
        "sample_id": p.get("sample_id"), "reason": p.get("reason"),
        "redisinfection_cycle_id": p.get("redisinfection_cycle_id")})})


def _superseded(ev: Ev, p: dict[str, Any], put: Put) -> None:
    """A re-disinfection that gave way to a newer one (another positive swab came first)."""
    put("cycles", (p["cycle_id"],), {"vehicle_id": p.get("vehicle_id"), "superseded": _ref(ev, {
        "by_cycle_id": p.get("by_cycle_id"), "sample_id": p.get("sample_id")})})


def _trip_aborted(ev: Ev, p: dict[str, Any], put: Put) -> None:
    put("trips", (p["trip_id"],), {"transfer_id": p.get("transfer_id"), "vehicle_id": p.get("vehicle_id"),
                                   "aborted": _ref(ev, {"reason": p.get("reason"), "code": p.get("code")})})
    _other(ev, p, put)


def _other(ev: Ev, p: dict[str, Any], put: Put) -> None:
    put("others", (ev.event_id,), {
        "type": ev.type, "stream_id": ev.stream_id, "stream_version": ev.stream_version,
        "position": ev.position, "at": ev.occurred_at, "recorded_at": ev.recorded_at,
        "actor": ev.actor, "role": ev.role, "transfer_id": p.get("transfer_id"),
        "vehicle_id": p.get("vehicle_id"), "data": ev.raw or dump(p)})


FOLDS: dict[str, Callable[[Ev, dict[str, Any], Put], None]] = {
    "TransferRequested": _transfer_requested,
    "TransferPrioritized": _prioritized,
    "TransferReprioritized": _reprioritized,
    "DestinationAssigned": _destination,
    "TransferRedirected": _destination,
    "TransferQueued": _queued,
    "VehicleAssigned": _assigned,
    "TransferReported": _reported,
    "TransferHandedOver": _transfer_handed_over,
    **{t: _decision for t in ("RuleOverridden", "VehicleWithdrawn")},
    "TransferCancelled": _cancelled,
    "ReportDelivered": _delivery,
    "ReportDeliveryFailed": _delivery,
    **{t: _vehicle_log for t in VEHICLE_LOG_TYPES},
    "VehicleRegistered": _vehicle_registered,
    "VehicleAwaitingDisinfection": _awaiting,
    "VehicleReturnedToService": _returned,
    "FacilityRegistered": _facility_registered,
    "FacilityLoadReported": _facility_load,
    "TripOpened": _trip_opened,
    "TripStepReported": _step,
    "PatientHandedOver": _handover("handover"),
    "HandoverConfirmed": _handover("confirmed"),
    "TripCompleted": _trip_completed,
    "CycleOpened": _cycle_opened,
    "InitialDisinfectionLogged": _stage("initial"),
    "TerminalDisinfectionLogged": _stage("terminal"),
    "SurfaceSwabCollected": _swab_collected,
    "SwabResultRecorded": _swab_result,
    "VehicleReleased": _released,
    "VehicleQuarantined": _quarantined,
    "CycleSuperseded": _superseded,
    **{t: _other for t in OTHER_TYPES},
    "TripAborted": _trip_aborted,
}
assert set(FOLDS) >= DECISION_TYPES | VEHICLE_LOG_TYPES | OTHER_TYPES


# Fact rows in memory: table -> key -> row (a fold's); and append-only rows as COPY writes
# them: table -> rows in column order, key first.
Rows = dict[str, dict[tuple[Any, ...], dict[str, Any]]]
Records = dict[str, list[tuple[Any, ...]]]


@dataclass
class Buffer:
    """Facts merged by row, with the same rule the database upsert applies: a rebuild
    merges a page here and writes each row once; the live path writes one event's facts."""

    rows: Rows = field(default_factory=dict)
    events: int = 0
    unreadable: int = 0

    def put(self, table: str, key: tuple[Any, ...], values: dict[str, Any]) -> None:
        """Merges one fact row; takes `values` over (callers pass a dict of their own)."""
        rows = self.rows.get(table)
        if rows is None:
            rows = self.rows[table] = {}
        if table in _APPEND_ONLY:  # one row per event: the first one stays, as in the database
            rows.setdefault(key, values)
            return
        row = rows.get(key)
        if row is None:
            rows[key] = values
            return
        last = _LAST[table]
        for col, value in values.items():
            if value is not None and (col in last or row.get(col) is None):
                row[col] = value

    def add(self, facts: Iterable[Fact]) -> None:
        for f in facts:
            self.put(f.table, f.key, dict(f.values))

    def add_event(self, ev: Ev) -> None:
        self.events += 1
        fold = FOLDS.get(ev.type)
        if fold is None:
            return
        staged: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
        stage = staged.append
        try:
            fold(ev, ev.payload, lambda table, key, values: stage((table, key, values)))
            for _, key, values in staged:
                if (column := unfit(key, values)) is not None:
                    raise ValueError(f"{column} does not fit its column")
        except (KeyError, TypeError, AttributeError, ValueError, OverflowError) as exc:
            # A payload that does not have the shape its type promised (a newer version
            # without its upcaster, a forged row): it stays archived and in timelines; the
            # fact tables skip it rather than stall the subscription on it forever. Its
            # rows are merged only once all of them fit, so nothing half-done is left.
            log.warning("projection: no facts from %s %s: %r", ev.type, ev.event_id, exc)
            self.unreadable += 1
            return
        put = self.put
        for table, key, values in staged:
            put(table, key, values)

    def take(self, names: Iterable[str]) -> dict[str, dict[tuple[Any, ...], dict[str, Any]]]:
        """Removes and returns the rows of these tables (a rebuild writes the append-only
        ones as it goes and keeps the keyed ones until they are whole)."""
        return {n: self.rows.pop(n) for n in list(names) if n in self.rows}

    def merge(self, other: Buffer) -> None:
        """Another buffer's rows, folded from events that came after this one's."""
        for table, rows in other.rows.items():
            for key, values in rows.items():
                self.put(table, key, values)
        self.events += other.events
        self.unreadable += other.unreadable

    def records(self, name: str) -> list[tuple[Any, ...]]:
        """A table's rows as tuples in its column order (key first), for COPY."""
        cols = SPECS[name].columns
        return [key + tuple(map(row.get, cols)) for key, row in self.rows.get(name, {}).items()]

    def size(self) -> int:
        return sum(len(t) for t in self.rows.values())

    def clear(self) -> None:
        self.rows.clear()
        self.events = 0
