"""From one event to the fact rows it contributes: pure, no I/O.

Every read model of the projection is a set of fact tables. A row is keyed by what it
describes (a transfer, a trip, a cycle, a swab, a vehicle, a facility) and each of its
columns is written by events of exactly one stream. Columns keep either the first value
their stream gave (`first`) or the last (`last`). Both sources of events (the store tail
and Kafka) keep the order within a stream and nothing else, so this rule makes the
tables a function of the set of events, whatever order the streams interleave in: the
live model folded from Kafka and a rebuild folded store after store come out identical
(tests/unit/test_projection_facts.py shuffles to show it).

Views (findings, KPIs, custody, ledger, exposures) are pure functions over these rows,
evaluated when asked; they join across streams then, not here.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, NamedTuple

import orjson

from libs.events.contracts import UnknownEventType, registry

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
    try:
        return registry.upcast(type_, version, payload)[1]
    except (UnknownEventType, LookupError):
        return payload


@dataclass(frozen=True)
class TableSpec:
    key: tuple[str, ...]
    columns: tuple[str, ...]  # besides the key
    last: frozenset[str] = frozenset()  # columns whose stream's last value wins
    append_only: bool = False  # one row per event


SPECS: dict[str, TableSpec] = {
    "transfers": TableSpec(
        ("transfer_id",),
        ("day", "requested_at", "risk_category", "origin_kind", "channel", "patient_name",
         "destination_id", "vehicle_id", "priority", "request", "prioritized", "destination",
         "queued", "assigned", "reported", "handed_over"),
        last=frozenset({"destination_id", "priority", "prioritized", "destination"}),
    ),
    "decisions": TableSpec(
        ("event_id",),
        ("transfer_id", "type", "position", "stream_version", "at", "recorded_at", "actor",
         "role", "data"),
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
         *(f"s_{s}" for s in STEPS), "handover", "confirmed", "completed", "awaiting", "returned"),
    ),
    "cycles": TableSpec(
        ("cycle_id",),
        ("vehicle_id", "trip_id", "transfer_id", "opened_at", "opened", "initial", "terminal",
         "released", "quarantined"),
    ),
    "swabs": TableSpec(("sample_id",), ("cycle_id", "vehicle_id", "collected_at", "collected",
                                         "result")),
    # Events of types the fact tables do not model yet but a rule waits for (overrides,
    # exposure lists, aborts, return legs): kept by type so those rules can read them.
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
    "collected", "result",
})

# Types that rules wait for (see findings.WAITING): archived in `others` as they come.
EXPECTED_TYPES = frozenset({
    "AssignmentOverridden", "TransferReprioritized", "TransferCancelled", "TransferRedirected",
    "VehicleReassigned", "VehicleUnreserved", "TripAborted", "TripRedirected", "ReturnLegRequested",
    "ReturnTripCompleted", "PatientAdmitted", "LoopClosed", "PreArrivalNoticeSent",
    "PreArrivalNoticeAcknowledged", "ReportDelivered", "SwabResultOverdue", "ExposureListProduced",
    "VehicleReleasedEarly", "EarlyReleaseAuthorized", "ReDisinfectionOrdered", "SwabResampleRequested",
})


@dataclass(frozen=True, slots=True)
class Fact:
    table: str
    key: tuple[Any, ...]
    values: dict[str, Any]


def local_day(ts: str) -> str:
    return datetime.fromisoformat(ts).astimezone(REGION_TZ).date().isoformat()


def dump(value: Any) -> str:
    """Canonical compact JSON (sorted keys, UTF-8): the archive's payloads and the facts'
    JSON columns, the same text whichever path wrote them."""
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()


_dump = dump


def ref(ev: Ev, **extra: Any) -> str:
    """A fact's proof: which event, when (device and server), who; plus what it said."""
    return _dump({"event_id": ev.event_id, "at": ev.occurred_at, "recorded_at": ev.recorded_at,
                  "actor": ev.actor, "role": ev.role, "v": ev.stream_version, "store": ev.store,
                  **extra})


def _row(ev: Ev, **values: Any) -> dict[str, Any]:
    return {"event_id": ev.event_id, "stream_version": ev.stream_version, "position": ev.position,
            "at": ev.occurred_at, "recorded_at": ev.recorded_at, "actor": ev.actor,
            "role": ev.role, **values}


def facts_of(ev: Ev) -> list[Fact]:
    """The fact rows one event contributes. Unknown types contribute nothing here (they
    are archived and shown in timelines) unless a rule waits for them."""
    p = ev.payload
    t = ev.type
    out: list[Fact] = []
    if t == "TransferRequested":
        requested_by = p.get("requested_by") or {}
        origin = p.get("origin") or {}
        patient = p.get("patient") or {}
        out.append(Fact("transfers", (p["transfer_id"],), {
            "day": local_day(ev.occurred_at), "requested_at": ev.occurred_at,
            "risk_category": p.get("risk_category"), "origin_kind": origin.get("kind"),
            "channel": requested_by.get("channel"), "patient_name": patient.get("name"),
            "request": ref(ev, patient=patient, risk_category=p.get("risk_category"),
                           condition=p.get("condition") or {}, origin=origin,
                           purpose=p.get("purpose"), return_required=p.get("return_required"),
                           requested_by=requested_by),
        }))
    elif t == "TransferPrioritized":
        out.append(Fact("transfers", (p["transfer_id"],), {
            "priority": p.get("priority"),
            "prioritized": ref(ev, priority=p.get("priority"), reason=p.get("reason"))}))
        out.append(_decision(ev, p))
    elif t == "DestinationAssigned":
        out.append(Fact("transfers", (p["transfer_id"],), {
            "destination_id": p.get("facility_id"),
            "destination": ref(ev, facility_id=p.get("facility_id"), reason=p.get("reason"),
                               candidates=p.get("candidates") or [])}))
        out.append(_decision(ev, p))
    elif t == "TransferQueued":
        out.append(Fact("transfers", (p["transfer_id"],), {"queued": ref(ev, reason=p.get("reason"))}))
        out.append(_decision(ev, p))
    elif t == "VehicleAssigned":
        out.append(Fact("transfers", (p["transfer_id"],), {
            "vehicle_id": p.get("vehicle_id"),
            "assigned": ref(ev, vehicle_id=p.get("vehicle_id"), manual=p.get("manual", False),
                            override_reason=p.get("override_reason"), reason=p.get("reason"),
                            destination_id=p.get("destination_id"))}))
        out.append(_decision(ev, p))
    elif t == "TransferReported":
        out.append(Fact("transfers", (p["transfer_id"],), {
            "reported": ref(ev, reported_to=p.get("reported_to"), reported_by=p.get("reported_by"))}))
        out.append(_decision(ev, p))
    elif t == "TransferHandedOver":
        out.append(Fact("transfers", (p["transfer_id"],), {
            "handed_over": ref(ev, trip_id=p.get("trip_id"), facility_id=p.get("facility_id"))}))
    elif t == "VehicleRegistered":
        out.append(Fact("vehicles", (p["vehicle_id"],), {
            "plate": p.get("plate"), "kind": p.get("kind"),
            "dedicated_pool": bool(p.get("dedicated_pool")), "life_support": bool(p.get("life_support")),
            "registered": ref(ev, station=p.get("station"), location=p.get("location"))}))
        out.append(_vehicle_log(ev, p))
    elif t in ("VehicleReserved", "VehicleAwaitingDisinfection", "VehicleReturnedToService",
               "VehicleTakenOutOfService") or (ev.stream_id.startswith("vehicle-") and "vehicle_id" in p):
        out.append(_vehicle_log(ev, p))
        if t == "VehicleAwaitingDisinfection" and p.get("trip_id"):
            out.append(Fact("trips", (p["trip_id"],), {"awaiting": ref(ev, vehicle_id=p.get("vehicle_id"))}))
        elif t == "VehicleReturnedToService" and p.get("trip_id"):
            out.append(Fact("trips", (p["trip_id"],), {
                "returned": ref(ev, cycle_id=p.get("cycle_id"), vehicle_id=p.get("vehicle_id"))}))
    elif t == "FacilityRegistered":
        out.append(Fact("facilities", (p["facility_id"],), {
            "name": p.get("name"),
            "registered": ref(ev, roles=p.get("roles") or [], capacity=p.get("fever_clinic_capacity"),
                              backup_ids=p.get("backup_ids") or [],
                              threshold=p.get("overflow_threshold", 0.8))}))
    elif t == "FacilityLoadReported":
        out.append(Fact("facility_loads", (ev.event_id,), {
            "facility_id": p.get("facility_id"), "position": ev.position,
            "stream_version": ev.stream_version, "at": p.get("reported_at") or ev.occurred_at,
            "occupied": p.get("fever_clinic_occupied"), "ratio": p.get("load_ratio"),
            "overflowing": bool(p.get("overflowing"))}))
    elif t == "TripOpened":
        out.append(Fact("trips", (p["trip_id"],), {
            "transfer_id": p.get("transfer_id"), "vehicle_id": p.get("vehicle_id"),
            "destination_id": p.get("destination_id"), "opened_at": ev.occurred_at,
            "opened": ref(ev, origin=p.get("origin") or {}, destination_id=p.get("destination_id"),
                          return_required=p.get("return_required"))}))
    elif t == "TripStepReported":
        step = p.get("step")
        if step in STEPS:
            out.append(Fact("trips", (p["trip_id"],), {
                f"s_{step}": ref(ev, device_at=p.get("device_at"), position=p.get("position"),
                                 client_event_id=p.get("client_event_id"))}))
    elif t == "PatientHandedOver":
        out.append(Fact("trips", (p["trip_id"],), {
            "handover": ref(ev, facility_id=p.get("facility_id"), received_by=p.get("received_by"),
                            confirmed_by=p.get("confirmed_by"))}))
    elif t == "HandoverConfirmed":
        out.append(Fact("trips", (p["trip_id"],), {
            "confirmed": ref(ev, facility_id=p.get("facility_id"), received_by=p.get("received_by"),
                             confirmed_by=p.get("confirmed_by"))}))
    elif t == "TripCompleted":
        out.append(Fact("trips", (p["trip_id"],), {
            "transfer_id": p.get("transfer_id"), "vehicle_id": p.get("vehicle_id"),
            "completed": ref(ev)}))
    elif t == "CycleOpened":
        out.append(Fact("cycles", (p["cycle_id"],), {
            "vehicle_id": p.get("vehicle_id"), "trip_id": p.get("trip_id"),
            "transfer_id": p.get("transfer_id"), "opened_at": ev.occurred_at,
            "opened": ref(ev, reason=p.get("reason"))}))
    elif t in ("InitialDisinfectionLogged", "TerminalDisinfectionLogged"):
        column = "initial" if t == "InitialDisinfectionLogged" else "terminal"
        out.append(Fact("cycles", (p["cycle_id"],), {
            "vehicle_id": p.get("vehicle_id"), column: ref(ev, stage=p.get("stage") or {})}))
    elif t == "SurfaceSwabCollected":
        out.append(Fact("swabs", (p["sample_id"],), {
            "cycle_id": p.get("cycle_id"), "vehicle_id": p.get("vehicle_id"),
            "collected_at": p.get("collected_at") or ev.occurred_at,
            "collected": ref(ev, sites=p.get("sites") or [], collected_by=p.get("collected_by"),
                             collected_at=p.get("collected_at"))}))
    elif t == "SwabResultRecorded":
        out.append(Fact("swabs", (p["sample_id"],), {
            "result": ref(ev, result=p.get("result"), lab=p.get("lab"),
                          reported_at=p.get("reported_at"))}))
    elif t == "VehicleReleased":
        out.append(Fact("cycles", (p["cycle_id"],), {
            "released": ref(ev, trip_id=p.get("trip_id"), policy=p.get("policy"))}))
    elif t == "VehicleQuarantined":
        out.append(Fact("cycles", (p["cycle_id"],), {
            "quarantined": ref(ev, sample_id=p.get("sample_id"), reason=p.get("reason"))}))
    if t in EXPECTED_TYPES:
        out.append(Fact("others", (ev.event_id,), {
            "type": t, "stream_id": ev.stream_id, "stream_version": ev.stream_version,
            "position": ev.position, "at": ev.occurred_at, "recorded_at": ev.recorded_at,
            "actor": ev.actor, "role": ev.role, "transfer_id": p.get("transfer_id"),
            "vehicle_id": p.get("vehicle_id"), "data": ev.raw or _dump(p)}))
    return out


def _decision(ev: Ev, p: dict[str, Any]) -> Fact:
    return Fact("decisions", (ev.event_id,), {
        "transfer_id": p.get("transfer_id"), "type": ev.type,
        **{k: v for k, v in _row(ev).items() if k != "event_id"}, "data": ev.raw or _dump(p)})


def _vehicle_log(ev: Ev, p: dict[str, Any]) -> Fact:
    return Fact("vehicle_log", (ev.event_id,), {
        "vehicle_id": p.get("vehicle_id"), "type": ev.type,
        **{k: v for k, v in _row(ev).items() if k != "event_id"},
        "transfer_id": p.get("transfer_id"), "trip_id": p.get("trip_id"),
        "cycle_id": p.get("cycle_id"), "data": ev.raw or _dump(p)})


@dataclass
class Buffer:
    """Facts merged by row, with the same rule the database upsert applies: a rebuild
    merges a page here and writes each row once; the live path writes one event's facts."""

    rows: dict[str, dict[tuple[Any, ...], dict[str, Any]]] = field(default_factory=dict)
    events: int = 0
    unreadable: int = 0

    def add(self, facts: Iterable[Fact]) -> None:
        for f in facts:
            spec = SPECS[f.table]
            table = self.rows.setdefault(f.table, {})
            row = table.get(f.key)
            if row is None:
                table[f.key] = dict(f.values)
                continue
            for col, value in f.values.items():
                if value is None:
                    continue
                if col in spec.last or row.get(col) is None:
                    row[col] = value

    def add_event(self, ev: Ev) -> None:
        try:
            facts = facts_of(ev)
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            # A payload that does not have the shape its type promised (a newer version
            # without its upcaster, a forged row): it stays archived and in timelines; the
            # fact tables skip it rather than stall the subscription on it forever.
            log.warning("projection: no facts from %s %s: %r", ev.type, ev.event_id, exc)
            self.unreadable += 1
            facts = []
        self.add(facts)
        self.events += 1

    def take(self, names: Iterable[str]) -> dict[str, dict[tuple[Any, ...], dict[str, Any]]]:
        """Removes and returns the rows of these tables (a rebuild writes the append-only
        ones as it goes and keeps the keyed ones until they are whole)."""
        return {n: self.rows.pop(n) for n in list(names) if n in self.rows}

    def size(self) -> int:
        return sum(len(t) for t in self.rows.values())

    def clear(self) -> None:
        self.rows.clear()
        self.events = 0
