"""Findings on the events the services really emit: each flow is driven through the
public API by the other services' own scenarios, then /audit/violations is read. Where a
flow may legitimately look like a broken rule (a vehicle reserved again after it stood
down, a loop closed by the return leg, a supervisor's override), the audit must say what
happened, not cry wolf; where a rule was overridden, it must say by whom and why.
Forbidden histories the command side refuses are appended straight into stores
(tests/integration/test_projection_store.py); here each absence is followed by its positive
control: the forbidden next step forged into the running app's store (`Forge`) must come
out as the finding, through the same pipeline, or the absence proved nothing."""

from __future__ import annotations

from collections.abc import Awaitable
from datetime import UTC, datetime
from typing import Any, Protocol

import httpx

from libs.events.catalog import dispatch as dsp
from libs.events.contracts import Event
from tests import scenarios_disinfection, scenarios_dispatch, scenarios_trip
from tests.actors import as_
from tests.scenarios import API, drive_to_handover, load_reference_data, ok, patient, trip_of, vehicle_status
from tests.scenarios_audit import caught_up


class Forge(Protocol):
    """Appends events to a stream of the running app's store, as nobody's command would;
    with `occurred_at`, as a device whose clock says so."""

    def __call__(self, store: str, stream: str, *events: Event,
                 occurred_at: datetime | None = None) -> Awaitable[None]: ...


async def findings(c: httpx.AsyncClient, **params: Any) -> list[dict[str, Any]]:
    """Every finding, once the projection holds every event the stores have, page by page."""
    await caught_up(c)
    out: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        query = {**params, "limit": 2, **({"cursor": cursor} if cursor else {})}
        page = ok(await c.get(f"{API}/audit/violations", params=query))
        out += page["findings"]
        assert len(page["findings"]) <= 2
        cursor = page["next_cursor"]
        if cursor is None:
            assert len(out) == page["total"], (len(out), page["total"])
            return out


def of(found: list[dict[str, Any]], rule: str, check: str | None = None) -> list[dict[str, Any]]:
    return [f for f in found if f["rule"] == rule and (check is None or f["check"] == check)]


async def stood_down_vehicles_are_not_reserved_twice(c: httpx.AsyncClient, forge: Forge) -> None:
    """R1: a refusing patient (the vehicle stands down) and an absent one (stands down,
    then takes the requeued transfer again): one vehicle, three reservations, never two
    at once."""
    await scenarios_trip.crew_aborts(c)
    found = await findings(c)
    assert not of(found, "R1"), of(found, "R1")
    # The control: two reservations with nothing between them.
    await forge("dispatch", "vehicle-nx-120-07",
                dsp.VehicleReserved(vehicle_id="nx-120-07", transfer_id="f1"),
                dsp.VehicleReserved(vehicle_id="nx-120-07", transfer_id="f2"))
    # The vehicle still carries the absent patient's second trip: both forged reservations break R1.
    r1 = of(await findings(c, vehicle_id="nx-120-07"), "R1")
    assert {(f["check"], f["transfer_id"]) for f in r1} == {
        ("vehicle_reserved_twice", "f1"), ("vehicle_reserved_twice", "f2")}, r1
    assert all({"actor": "forger", "role": "system"} in f["actors"] for f in r1), r1


async def a_breakdown_ends_the_reservation(c: httpx.AsyncClient, forge: Forge) -> None:
    """R1, R2: the broken-down vehicle's patient is taken over by a second one; both are
    held for disinfection."""
    await scenarios_trip.breakdown_after_pickup(c)
    found = await findings(c)
    assert not of(found, "R1") and not of(found, "R2"), found
    # The control: the second vehicle, awaiting its disinfection, reserved anyway.
    await forge("dispatch", "vehicle-nx-120-09", dsp.VehicleReserved(vehicle_id="nx-120-09", transfer_id="f"))
    [early] = of(await findings(c, vehicle_id="nx-120-09"), "R2", "reserved_before_release")
    assert early["kind"] == "violation", early


async def loops_closed_by_return_or_admission(c: httpx.AsyncClient, forge: Forge, how: str) -> None:
    """R11, on the transfer service's ReturnRequested / PatientAdmitted and the return
    leg's handover: both handovers are far past the audit's 24 h (their crews' clocks say
    2022), so a loop the audit did not see closed would be a finding."""
    if how == "returned":
        legs = await scenarios_trip.closed_loop_with_return(c)
        transfer_id = legs["outbound"]["id"]
        tl = ok(await c.get(f"{API}/audit/transfers/{transfer_id}/timeline"))
        assert tl["status"] == "loop_closed", tl["status"]
        assert ("pre-arrival notice", "issued") in [(n["what"], n["state"]) for n in tl["notifications"]]
    else:
        await scenarios_trip.admitted_instead(c)
        transfer_id = ok(await c.get(f"{API}/transfers"))[0]["id"]
    found = await findings(c, transfer_id=transfer_id)
    assert not of(found, "R11"), found
    assert {f["transfer_id"] for f in found} <= {transfer_id}
    # The control: a return-required transfer handed over in 2022 by its crew's clock, with
    # neither a return leg nor an admission since.
    request = {"patient": {"name": "f"}, "risk_category": "isolation_site", "condition": {"fever": True},
               "origin": {"kind": "isolation_site"}, "purpose": "outpatient_visit", "return_required": True,
               "requested_by": {"channel": "console"}}
    await forge("dispatch", "transfer-f-open", dsp.TransferRequested(transfer_id="f-open", **request),
                dsp.TransferHandedOver(transfer_id="f-open", trip_id="f-trip", facility_id="yc-fourth"),
                occurred_at=datetime(2022, 11, 20, 9, 0, tzinfo=UTC))
    [open_loop] = of(await findings(c, transfer_id="f-open"), "R11")
    assert (open_loop["check"], open_loop["kind"]) == ("loop_not_closed", "sla"), open_loop
    assert open_loop["at"].startswith("2022-11-21T09:00:00"), open_loop  # 24 h after the handover


async def supervisor_releases_early(c: httpx.AsyncClient) -> None:
    """R2's override on the disinfection side: the release names what it skipped; the audit
    lists the override, by whom and why, and counts the skipped stages and swab as
    overridden, not as violations."""
    await scenarios_disinfection.supervisor_early_release(c)
    found = await findings(c, kind="override")
    release = of(found, "override", "supervisor_early_release")
    assert len(release) == 1 and release[0]["actors"] == [{"actor": "supervisor-ma", "role": "supervisor"}]
    assert "重大交通事故" in release[0]["detail"] and "R8" in release[0]["detail"]
    assert {(f["rule"], f["check"]) for f in found} >= {
        ("R8", "released_without_both_stages"), ("R9", "released_without_swab")}
    assert not await findings(c, kind="violation", vehicle_id=release[0]["vehicle_id"])


async def supervisor_assigns_before_release(c: httpx.AsyncClient) -> None:
    """R2's override on the dispatch side: a supervisor gives a vehicle still waiting for
    its disinfection, with a reason (dispatch records RuleOverridden R2)."""
    await load_reference_data(c)
    first = ok(await c.post(f"{API}/transfers", json=patient(1)), 201)
    trip = await trip_of(c, "nx-120-07", first["id"])
    await drive_to_handover(c, trip["id"], "r2o")
    await vehicle_status(c, "nx-120-07", "awaiting_disinfection")
    second = ok(await c.post(f"{API}/transfers", json=patient(2)), 201)
    reason = "批量伤员，洗消前紧急出车"
    ok(await c.post(f"{API}/transfers/{second['id']}/assign",
                    json={"vehicle_id": "nx-120-07", "override_reason": reason},
                    headers=as_(c, "supervisor", "supervisor-ma")))
    await trip_of(c, "nx-120-07", second["id"])
    found = await findings(c, transfer_id=second["id"])
    r2 = of(found, "R2")
    assert {f["check"] for f in r2} == {"reserved_before_release", "trip_before_release"}, found
    assert all(f["kind"] == "override" and reason in f["detail"] for f in r2), r2
    assert any(e["type"] == "RuleOverridden" for f in r2 for e in f["evidence"])
    [logged] = of(found, "override", "manual_assignment_override")
    assert "R2" in logged["detail"] and logged["actors"] == [{"actor": "supervisor-ma", "role": "supervisor"}]


async def reprioritisations_are_logged(c: httpx.AsyncClient, forge: Forge) -> None:
    """R4: the dispatcher raises a waiting transfer's priority twice (logged, with the
    reasons); a waiting transfer is cancelled; a breakdown requeues another. The queue
    the audit folds from dispatch's decisions finds no urgent transfer passed over."""
    await scenarios_dispatch.queue_overflow_and_fleet(c)
    found = await findings(c)
    raised = of(found, "override", "reprioritized")
    assert sorted(f["detail"].rsplit(": ", 1)[1] for f in raised) == ["家属报告胸闷", "胸痛"], raised
    assert not of(found, "R4") and not of(found, "R1"), found
    # The control: an urgent transfer waits while a vehicle that fits it goes to a routine one.
    request = {"patient": {"name": "f"}, "risk_category": "isolation_site", "condition": {"fever": True},
               "origin": {"kind": "isolation_site"}, "purpose": "outpatient_visit", "return_required": False,
               "requested_by": {"channel": "console"}}
    for tid, priority in (("f-urgent", 1), ("f-routine", 3)):
        await forge("dispatch", f"transfer-{tid}", dsp.TransferRequested(transfer_id=tid, **request),
                    dsp.TransferPrioritized(transfer_id=tid, priority=priority, reason="r"))
    await forge("dispatch", "transfer-f-urgent",
                dsp.TransferQueued(transfer_id="f-urgent", reason="no vehicle"))
    await forge("dispatch", "transfer-f-routine", dsp.VehicleAssigned(
        transfer_id="f-routine", vehicle_id="nx-120-07", destination_id=None, origin={},
        return_required=False, reason="r"))
    # It passed over the scenario's own urgent transfers still waiting too: each is named.
    waiting = {t["id"] for t in ok(await c.get(f"{API}/queue"))}
    r4 = of(await findings(c, rule="R4"), "R4", "priority_inversion")
    assert "f-urgent" in {f["transfer_id"] for f in r4} and len(r4) >= 2, r4
    assert {f["transfer_id"] for f in r4} - {"f-urgent"} <= waiting, (r4, waiting)
    forger = {"actor": "forger", "role": "system"}
    assert all("f-routine (priority 3)" in f["detail"] and forger in f["actors"] for f in r4), r4
