"""A vehicle's chain of custody, and the transfers exposed to a positive vehicle. Pure."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from services.projection.data import AuditData, received_by, ts
from services.projection.findings import (
    EPOCH,
    carried_patient,
    exposure_list,
    exposure_window,
    payload,
    positives,
    server_time,
    unlisted,
)


def _stage(ref: dict[str, Any] | None) -> dict[str, Any] | None:
    if not ref:
        return None
    stage = ref.get("stage") or {}
    return {"event_id": ref["event_id"], "logged_at": ref["recorded_at"], "actor": ref["actor"],
            "role": ref["role"], **stage}


def _step(ref: dict[str, Any] | None) -> dict[str, Any] | None:
    if not ref:
        return None
    return {"event_id": ref["event_id"], "at": ref["at"], "recorded_at": ref["recorded_at"],
            "actor": ref["actor"], "role": ref["role"]}


def _cycle_view(data: AuditData, cycle: dict[str, Any]) -> dict[str, Any]:
    released, quarantined = cycle.get("released"), cycle.get("quarantined")
    superseded = cycle.get("superseded")
    return {
        "cycle_id": cycle["cycle_id"], "opened_at": cycle.get("opened_at"),
        "reason": (cycle.get("opened") or {}).get("reason"),
        "initial": _stage(cycle.get("initial")), "terminal": _stage(cycle.get("terminal")),
        "swabs": [{
            "sample_id": s["sample_id"], "collected_at": s.get("collected_at"),
            "collected_by": (s.get("collected") or {}).get("collected_by"),
            "sites": (s.get("collected") or {}).get("sites"),
            "result": (s.get("result") or {}).get("result"), "lab": (s.get("result") or {}).get("lab"),
            "reported_at": (s.get("result") or {}).get("reported_at"),
            # The events that prove them (who logged the collection, who the result).
            "collection": _step(s.get("collected")), "result_logged": _step(s.get("result")),
        } for s in data.swabs_of_cycle(cycle["cycle_id"])],
        # An early release says so here, not only in the findings (R8/R9 overrides).
        "released": {**(_step(released) or {}), **{k: released.get(k) for k in _RELEASE}}
        if released else None,
        "quarantined": {**(_step(quarantined) or {}), "sample_id": quarantined.get("sample_id"),
                        "redisinfection_cycle_id": quarantined.get("redisinfection_cycle_id")}
        if quarantined else None,
        # A re-disinfection another positive swab overtook: the newer cycle answers for it.
        "superseded": {**(_step(superseded) or {}), "by_cycle_id": superseded.get("by_cycle_id"),
                       "sample_id": superseded.get("sample_id")} if superseded else None,
    }


_RELEASE = ("policy", "override", "override_reason", "overridden_rules", "missing", "quarantine_lifted")


def _began(opened: dict[str, Any] | None, fallback: str | None) -> datetime:
    return server_time(opened) or ts(fallback) or EPOCH


READS = ("vehicles", "vehicle_log", "transfers", "trips", "cycles", "swabs")  # what custody() reads
# The vehicle's own word on its state, beside the chain: out of service (a breakdown, a
# quarantine), duty, every return to service (one lifting a quarantine among them).
STATUS_TYPES = ("VehicleTakenOutOfService", "VehicleDutyChanged", "VehicleReturnedToService",
                "VehicleStoodDown", "VehicleHoldLifted")
_STATUS_FIELDS = ("reason", "on_duty", "quarantine_lifted", "trip_id", "cycle_id", "transfer_id",
                  "withdrawn_from")
# What exposures() reads: the exposure lists the disinfection service produced, and no
# vehicle's status (over the whole history when no vehicle is named).
EXPOSURE_READS = (*(t for t in READS if t != "vehicle_log"), "others")


def custody(data: AuditData, vehicle_id: str, findings: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Trip, first stage, terminal stage (each with its footage), swab, result, release,
    back in service; link after link over the vehicle's whole life, and where a link is
    broken, the finding that says so."""
    data = data.indexed()
    vehicle = data.vehicles.get(vehicle_id)
    trips = data.trips_of_vehicle(vehicle_id)
    if vehicle is None and not trips:
        return None
    timed: list[tuple[datetime, dict[str, Any]]] = []  # (when it began, by the server, link)
    linked_cycles: set[str] = set()
    for trip in trips:
        # Its own cycle; a re-disinfection a positive swab ordered answers for the trip too,
        # but came later: it is a link of its own, in its place in time.
        cycles = [c for c in data.cycles_of_trip(trip["trip_id"])
                  if (c.get("opened") or {}).get("kind", "trip") == "trip"]
        linked_cycles |= {c["cycle_id"] for c in cycles}
        handover, aborted, completed = trip.get("handover"), trip.get("aborted"), trip.get("completed")
        timed.append((_began(trip.get("opened"), trip.get("opened_at")), {
            "trip_id": trip["trip_id"], "transfer_id": trip.get("transfer_id"),
            "opened": _step(trip.get("opened")),
            "handed_over": {**(_step(handover) or {}), "facility_id": handover.get("facility_id"),
                            "received_by": received_by(trip)} if handover else None,
            "completed": {**(_step(completed) or {}), "reason": completed.get("reason")}
            if completed else None,
            "aborted": {**(_step(aborted) or {}), "reason": aborted.get("reason")} if aborted else None,
            "awaiting_disinfection": _step(trip.get("awaiting")),
            "cycles": [_cycle_view(data, c) for c in cycles],
            "returned_to_service": _step(trip.get("returned")),
        }))
    # Re-disinfections after a positive swab, and cycles with no trip of this vehicle.
    for cycle in (c for c in data.cycles.values()
                  if c.get("vehicle_id") == vehicle_id and c["cycle_id"] not in linked_cycles):
        timed.append((_began(cycle.get("opened"), cycle.get("opened_at")), {
            "trip_id": None, "for_trip_id": cycle.get("trip_id"), "transfer_id": cycle.get("transfer_id"),
            "opened": None, "cycles": [_cycle_view(data, cycle)]}))
    links = [link for _, link in sorted(timed, key=lambda pair: pair[0])]
    mine = [f for f in findings if f.get("vehicle_id") == vehicle_id]
    cycles = [c for link in links for c in link["cycles"]]
    released = {c["cycle_id"] for c in cycles if c["released"]}
    # A quarantine is lifted by its re-disinfection's release, or by the release of the
    # cycle that superseded it (and so on, another positive swab after another).
    successor = {c["cycle_id"]: c["superseded"]["by_cycle_id"] for c in cycles if c["superseded"]}
    for cycle_id in list(successor):
        seen, last = {cycle_id}, successor[cycle_id]
        while last in successor and last not in seen:
            seen.add(last)
            last = successor[last]
        if last in released:
            released.add(cycle_id)
    status = [{"type": r["type"], "at": r["at"], "recorded_at": r["recorded_at"], "actor": r["actor"],
               "role": r["role"], "event_id": r["event_id"],
               **{k: v for k, v in payload(r).items() if k in _STATUS_FIELDS}}
              for r in sorted(data.vehicle_log, key=lambda r: r["position"])
              if r.get("vehicle_id") == vehicle_id and r["type"] in STATUS_TYPES]
    return {
        "vehicle_id": vehicle_id,
        "vehicle": {k: (vehicle or {}).get(k) for k in ("plate", "kind", "dedicated_pool", "life_support")},
        "links": links, "status_changes": status, "findings": mine,
        # No finding, every trip that ended back in service, and every quarantine lifted
        # by a released re-disinfection: a vehicle in quarantine is not a closed chain.
        "complete": not mine and all(
            link.get("returned_to_service") or not link.get("completed")
            for link in links if link["trip_id"]) and all(
            c["quarantined"]["redisinfection_cycle_id"] in released for c in cycles if c["quarantined"]),
    }


def exposures(data: AuditData, vehicle_id: str | None = None) -> list[dict[str, Any]]:
    """For each positive swab: every transfer the vehicle carried in its exposure window
    (a trip aborted before its patient was aboard is left out)
    (findings.exposure_window: since its last negative swab until a later sample comes
    back negative; a trip after the positive result, which R9 forbids, is flagged
    `after_positive_result`), plus the trip whose cycle took the sample; and the exposure
    list the disinfection service produced for it, whether a dispatcher acknowledged it,
    and the transfers it left out (R9's exposure_list_incomplete)."""
    data = data.indexed()
    out: list[dict[str, Any]] = []
    for swab in positives(data):
        vid = swab.get("vehicle_id") or ""
        if vehicle_id and vid != vehicle_id:
            continue
        window = exposure_window(data, swab)
        ended = server_time(swab["result"])
        exposed = []
        for trip in window.trips:
            if trip.get("aborted") and not carried_patient(trip):
                continue  # aborted before pickup: its patient never rode in the vehicle
            opened = server_time(trip.get("opened"))
            t = data.transfers.get(trip.get("transfer_id") or "") or {}
            request = t.get("request") or {}
            patient = request.get("patient") or {}
            exposed.append({
                "transfer_id": trip.get("transfer_id"), "trip_id": trip["trip_id"],
                "trip_opened_at": (trip.get("opened") or {}).get("recorded_at"),
                "patient": {k: patient.get(k) for k in ("name", "id_number", "phone")},
                "origin": (request.get("origin") or {}).get("name"),
                "destination_id": t.get("destination_id"),
                "after_positive_result": bool(opened and ended and opened > ended),
            })
        listed = exposure_list(data, vid, swab["sample_id"])
        out.append({
            "vehicle_id": vid, "sample_id": swab["sample_id"], "collected_at": swab.get("collected_at"),
            "result_at": swab["result"].get("reported_at"), "result_event_id": swab["result"]["event_id"],
            "since_negative_sample": window.since_sample,
            "cleared_at": window.cleared.isoformat() if window.cleared else None,
            "transfers": exposed,
            "list": None if listed.produced is None else {
                "event_id": listed.produced["event_id"], "produced_at": listed.produced["recorded_at"],
                "transfers": sorted(listed.transfers),
                "acknowledged": [{"by": a["actor"], "at": a["recorded_at"], "event_id": a["event_id"]}
                                 for a in listed.acknowledged],
                # Patients added as their trips ended; acknowledged again or not.
                "amended": [{"transfer_id": (payload(a).get("transfer") or {}).get("transfer_id"),
                             "at": a["recorded_at"], "event_id": a["event_id"]} for a in listed.amended],
                "status": "acknowledged" if listed.acknowledged_whole else "unacknowledged",
                # What R9's exposure_list_incomplete reads: trips ended with their patient.
                "missing": unlisted(data, swab, listed),
            },
        })
    return out
