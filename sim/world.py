"""The actors of the simulated day, each driving the public API with its own token:

- intake: isolation sites, community grid workers, hospitals' HIS and the 120 console file
  the plan's requests at their times; the console schedules recurring care;
- a crew per vehicle: acknowledges, drives and reports each step from its phone (sometimes
  twice, sometimes late), aborts when the patient is absent or refuses, breaks down, hands
  over; the vehicle then goes through disinfection;
- hospitals: report their fever-clinic load (R7), acknowledge pre-arrival notices, confirm
  handovers, ask for the return leg after the visit or admit the patient (R11);
- disinfection staff: the two stages with their video evidence and the swab (R8, R9);
  the lab: results, now and then invalid, late (R14) or positive (R9);
- dispatchers: redirect a worsening patient, cancel, acknowledge exposure lists, and watch
  the fleet board; a supervisor releases a vehicle early now and then (R2 override).

Who learns what comes from the answers: a request's response names the vehicle; a crew
whose vehicle was freed asks dispatch for its vehicle's state; the board catches the rest.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from collections import Counter
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from sim.api import Actor, Api, Refused, idempotency_key
from sim.clock import Clock, Inbox
from sim.plan import Journey, Plan
from sim.region import Point, Region, drive_minutes, fever_load

TZ = ZoneInfo("Asia/Shanghai")
POLLS = 12  # how many times a party looks for something the system is still making
BOARD_EVERY_S = 900.0
LOAD_EVERY_S = 3600.0
SUPERVISOR = Actor("supervisor-01", "supervisor")
BOARD = Actor("dispatcher-board", "dispatcher")
LAB_NAMES = ("永宁县人民医院检验科", "银川市疾控中心实验室", "宁夏医科大学总医院检验科")
STAFF_NAMES = ("王五", "赵六", "孙七", "周八", "吴九", "郑十")
DOCTORS = ("李医生", "张护士", "王医生", "刘护士长", "陈医生")


def minutes(m: float) -> timedelta:
    return timedelta(minutes=m)


def iso(t: datetime) -> str:
    return t.astimezone(TZ).isoformat(timespec="seconds")


def point(raw: Any) -> Point | None:
    if isinstance(raw, dict) and "lat" in raw and "lon" in raw:
        return Point(float(raw["lat"]), float(raw["lon"]))
    return None


def crew(vehicle_id: str) -> Actor:
    return Actor(f"crew-{vehicle_id}", "crew", vehicle_id=vehicle_id)


def hospital(facility_id: str) -> Actor:
    return Actor(f"his-{facility_id}", "hospital", facility_id=facility_id)


def dispatcher(district: int) -> Actor:
    return Actor(f"dispatcher-{district:02d}", "dispatcher")


class World:
    def __init__(self, api: Api, clock: Clock, plan: Plan, region: Region, run_tag: str,
                 until: asyncio.Event | None = None) -> None:
        self.api, self.clock, self.plan, self.region, self.run_tag = api, clock, plan, region, run_tag
        self.until = until  # once set, no more requests are filed; what was filed goes on
        self.flows: Counter[str] = Counter()
        self.vehicles: dict[str, VehicleAgent] = {}
        self.places: dict[str, Point] = {c.id: c.at for c in region.communities}
        self.roles: dict[str, list[str]] = {}
        self.journeys: dict[str, Journey] = {}  # transfer id -> the plan's journey
        self.returns: dict[str, str] = {}  # return leg -> its outbound transfer
        self.care_series: dict[str, Journey] = {}  # series id -> its journey
        self.care_transfers: dict[str, str] = {}  # occurrence transfer -> series id
        self.open_transfers: set[str] = set()
        self.loops_pending: set[str] = set()  # outbound legs waiting for a return or admission
        self.care_pending: set[str] = set()
        self.taken: set[str] = set()  # transfers a crew has had a trip for
        self.closed: set[str] = set()  # transfers handed over or cancelled
        self.maybe_queued: set[str] = set()  # transfers last seen waiting for a vehicle
        self.by_patient = {str(j.body["patient"]["id_number"]): j for j in plan.journeys}
        self.errors: list[str] = []
        self.intake_done = False

    # -- bookkeeping --------------------------------------------------------------------

    def key(self, *parts: object) -> str:
        return idempotency_key(self.run_tag, *parts)

    def error(self, where: str, exc: Exception) -> None:
        self.flows["agent_errors"] += 1
        if len(self.errors) < 50:
            self.errors.append(f"{where}: {exc}")

    def rng(self, *parts: object) -> random.Random:
        return random.Random("/".join(map(str, (self.plan.seed, *parts))))

    async def poll(self, n: int) -> None:
        """The n-th wait of a party looking for something the system is still making: a few
        ticks of the day, and at least a little wall time (its consumers' pace)."""
        await self.clock.sleep(self.clock.tick_s * min(2 ** n, 8))
        await asyncio.sleep(min(0.1 * 2 ** n, 2.0))  # at work: the day waits for the system

    def hint(self, vehicle_id: str, transfer_id: str) -> None:
        agent = self.vehicles.get(vehicle_id)
        if agent is None:
            self.flows["assigned_to_unknown_vehicle"] += 1
            return
        agent.tell("trip", transfer_id)

    def finished(self) -> bool:
        return (self.intake_done and self.clock.essential_agents == 0
                and not self.open_transfers and not self.loops_pending and not self.care_pending
                and all(not v.busy and not v.inbox for v in self.vehicles.values()))

    def handed_over(self, transfer_id: str, trip: dict[str, Any], at: datetime) -> None:
        self.open_transfers.discard(transfer_id)
        self.closed.add(transfer_id)
        self.flows["transfers_completed"] += 1
        outbound = trip.get("return_of")
        if outbound:
            self.flows["return_legs_completed"] += 1
            if outbound in self.loops_pending:
                self.loops_pending.discard(outbound)
                self.flows["loops_closed"] += 1
                self.flows["loops_closed_returned"] += 1
        series = self.care_transfers.get(transfer_id)
        if series is not None:
            self.care_pending.discard(series)
            self.flows["care_occurrences_completed"] += 1
        if trip.get("return_required") and not outbound and trip.get("destination_id"):
            self.loops_pending.add(transfer_id)
            self.clock.spawn(self.visit(transfer_id, trip, at), name=f"visit {transfer_id}")

    def cancelled(self, transfer_id: str) -> None:
        self.maybe_queued.discard(transfer_id)
        self.open_transfers.discard(transfer_id)
        self.closed.add(transfer_id)
        self.flows["transfers_cancelled"] += 1
        series = self.care_transfers.get(transfer_id)
        if series is not None:
            self.care_pending.discard(series)

    # -- intake -------------------------------------------------------------------------

    async def intake(self) -> None:
        for n, j in enumerate(self.plan.journeys):
            await self.clock.until(j.at)
            if self.until is not None and self.until.is_set():
                self.flows["journeys_not_filed"] = len(self.plan.journeys) - n
                break
            self.clock.spawn(self.request(j), name=f"request {j.key}")
        self.intake_done = True

    async def request(self, j: Journey) -> None:
        try:
            if j.flow == "care":
                await self.schedule_care(j)
                return
            status, body = await self.api.call(j.requester, "POST", "/transfers", json=j.body,
                                               key=self.key(j.key, "request"))
        except Refused as exc:
            self.error(f"request {j.key}", exc)
            return
        tid = str(body["id"])
        self.journeys.setdefault(tid, j)
        self.opened(tid)
        self.flows["transfers_requested"] += 1
        self.flows[f"flow_{j.flow}"] += 1
        if status == 200:
            self.flows["request_was_live_already"] += 1
        destination = body.get("destination")
        if destination and "backup" in self.roles.get(str(destination), []):
            self.flows["routed_to_activated_backup"] += 1
        if body.get("vehicle_id"):
            self.flows["assigned_on_request"] += 1
            self.hint(str(body["vehicle_id"]), tid)
        else:
            self.flows["queued_on_request"] += 1
            self.maybe_queued.add(tid)

    async def schedule_care(self, j: Journey) -> None:
        """Recurring care (flow 7): a series three days a week for four weeks; its first
        appointment minutes from now on the server's clock, whose scheduler requests each
        occurrence ahead of it (the series are cancelled when the day ends)."""
        appt = (datetime.now(TZ) + timedelta(minutes=3)).replace(second=0, microsecond=0)
        days = {appt.isoweekday(), (appt.isoweekday() + 1) % 7 + 1, (appt.isoweekday() + 3) % 7 + 1}
        body = {"transfer": j.body, "weekdays": sorted(days), "time": appt.strftime("%H:%M"),
                "timezone": "Asia/Shanghai", "starts_on": appt.date().isoformat(),
                "until": (appt.date() + timedelta(days=27)).isoformat(), "lead_minutes": 5}
        series = await self.api.post(dispatcher(j.district), "/care-series", json=body,
                                     key=self.key(j.key, "care"))
        self.care_series[str(series["id"])] = j
        self.care_pending.add(str(series["id"]))
        self.flows["care_series_scheduled"] += 1

    async def end_care(self) -> None:
        for series_id, j in self.care_series.items():
            try:
                await self.api.post(dispatcher(j.district), "/care-series/{}/cancel", series_id,
                                    json={"reason": "模拟日结束"}, key=self.key(series_id, "end"))
            except Refused as exc:
                self.error(f"care series {series_id}", exc)

    async def learn(self, transfer_id: str, vehicle_id: str) -> Journey | None:
        """Which journey a crew's trip belongs to. A transfer the simulation did not file
        itself (a care occurrence, a return leg, or one whose request's answer is still on
        its way) is read as the crew sees it, and known by its patient."""
        if transfer_id in self.journeys:
            return self.journeys[transfer_id]
        if transfer_id in self.returns:
            return self.journeys.get(self.returns[transfer_id])
        body = await self.api.get(crew(vehicle_id), "/transfers/{}", transfer_id)
        self.opened(transfer_id)
        if body.get("return_of"):
            self.returns[transfer_id] = str(body["return_of"])
            return self.journeys.get(str(body["return_of"]))
        series = body.get("series_id")
        if series and series in self.care_series:
            self.care_transfers[transfer_id] = series
            self.flows["care_occurrences_requested"] += 1
            self.flows["transfers_requested"] += 1
        j = self.by_patient.get(str(body.get("patient", {}).get("id_number")))
        if j is None:
            self.flows["transfers_from_elsewhere"] += 1
            return None
        self.journeys[transfer_id] = j
        return j

    def opened(self, transfer_id: str) -> None:
        if transfer_id not in self.closed:
            self.open_transfers.add(transfer_id)

    # -- hospitals ------------------------------------------------------------------------

    async def visit(self, transfer_id: str, trip: dict[str, Any], handed_over_at: datetime) -> None:
        """The outpatient visit, then the way back (R11): a return leg, or admission."""
        j = self.journeys.get(transfer_id)
        facility = str(trip["destination_id"])
        his = hospital(facility)
        stay = j.visit_minutes if j else self.rng(transfer_id).uniform(60, 180)
        at = await self.clock.until(handed_over_at + minutes(stay))
        body = {"facility_id": facility, "at": iso(at)}
        try:
            if j is not None and j.admit:
                await self.api.post(his, "/trips/{}/admission", trip["id"], json=body,
                                    key=self.key(trip["id"], "admit"))
                self.loops_pending.discard(transfer_id)
                self.flows["admissions"] += 1
                self.flows["loops_closed"] += 1
                return
            asked = await self.api.post(his, "/trips/{}/return-request", trip["id"], json=body,
                                        key=self.key(trip["id"], "return"))
        except Refused as exc:
            self.error(f"visit {transfer_id}", exc)
            return
        back = str(asked["return_transfer_id"])
        self.returns[back] = transfer_id
        self.opened(back)
        self.flows["return_legs_requested"] += 1
        self.flows["transfers_requested"] += 1
        for n in range(POLLS):
            await self.poll(n)  # what consumers make is never there at once
            status, leg = await self.api.call(his, "GET", "/transfers/{}", back, not_yet=(404,))
            if status == 200 and leg.get("vehicle_id"):
                self.hint(str(leg["vehicle_id"]), back)
                return
            if status == 200 and leg.get("status") == "queued":
                self.flows["return_legs_queued"] += 1
                self.maybe_queued.add(back)
                return
        self.maybe_queued.add(back)  # not seen yet: a freed vehicle may find it queued

    async def report_loads(self, facility_id: str) -> None:
        """A hospital's HIS reports its fever-clinic load every hour of the day (R7)."""
        f = self.region.by_id[facility_id]
        his, rng = hospital(facility_id), self.rng("load", facility_id)
        overflowing = False
        t = self.clock.start  # the day's first hour simulated (an hour of the day)
        while t < self.plan.day + timedelta(days=1):
            at = await self.clock.until(t, essential=False)
            body = {"fever_clinic_occupied": fever_load(f, (at - self.plan.day).total_seconds() / 3600, rng),
                    "reported_at": iso(at)}
            try:
                view = await self.api.post(his, "/facilities/{}/load", facility_id, json=body,
                                           key=self.key(facility_id, "load", t.isoformat()))
            except Refused as exc:
                self.error(f"load {facility_id}", exc)
            else:
                self.flows["load_reports"] += 1
                now = view.get("status") == "overflowing"
                if now and not overflowing:
                    self.flows["overflow_backups_activated"] += 1
                elif overflowing and not now:
                    self.flows["overflow_backups_stood_down"] += 1
                overflowing = now
            t += timedelta(seconds=LOAD_EVERY_S)

    # -- dispatchers --------------------------------------------------------------------

    async def board(self) -> None:
        """The dispatchers' fleet board. An idle crew whose vehicle dispatch assigned is told
        (a care occurrence, a queued transfer a freed vehicle took); now and then, one whose
        vehicle still waits for disinfection is sent to the wash (its cycle opened late)."""
        for round_ in itertools.count():
            watched = [("assigned", "trip")]
            if round_ % 6 == 5:
                watched += [("awaiting_disinfection", "cycles"), ("quarantined", "cycles")]
            for status, what in watched:
                for v in await self.listing(BOARD, "/vehicles", status=status):
                    agent = self.vehicles.get(str(v["id"]))
                    if agent is None or agent.busy or agent.inbox:
                        continue
                    if what == "trip" and v.get("transfer_id"):
                        agent.tell("trip", str(v["transfer_id"]))
                    elif what == "cycles":
                        agent.tell("cycles", None)
                    else:
                        continue
                    self.flows[f"board_{what}_hints"] += 1
            await self.clock.sleep(BOARD_EVERY_S, essential=False)

    async def listing(self, who: Actor, path: str, **params: Any) -> list[dict[str, Any]]:
        """Every page of a list."""
        out: list[dict[str, Any]] = []
        while True:
            page = await self.api.get(who, path, params={**params, "limit": 500, "offset": len(out)})
            out += page
            if len(page) < 500:
                return out

    async def acknowledge_exposure(self, sample_id: str, district: int, positive_at: datetime) -> None:
        """R9: the exposure list reaches a dispatcher, who acknowledges it."""
        who = dispatcher(district)
        await self.clock.until(positive_at + minutes(self.rng(sample_id).uniform(5, 30)))
        for n in range(POLLS):
            status, exposure = await self.api.call(who, "GET", "/disinfection/exposures/{}",
                                                   sample_id, not_yet=(404,))
            if status == 200:
                break
            await self.poll(n)
        else:
            self.flows["exposure_list_not_found"] += 1
            return
        self.flows["exposure_lists"] += 1
        self.flows["exposed_transfers"] += len(exposure.get("transfers", []))
        await self.api.post(who, "/disinfection/exposures/{}/acknowledge", sample_id,
                            json={"note": "已逐一通知暴露人员并登记"}, key=self.key(sample_id, "ack"))
        self.flows["exposure_lists_acknowledged"] += 1

    async def takeover(self, transfer_id: str, broken: str, district: int) -> None:
        """After a breakdown with the patient aboard, dispatch sends a second vehicle."""
        for n in range(POLLS):
            await self.poll(n)  # what consumers make is never there at once
            body = await self.api.get(dispatcher(district), "/transfers/{}", transfer_id)
            vehicle = body.get("vehicle_id")
            if vehicle and vehicle != broken:
                self.flows["takeovers"] += 1
                self.hint(str(vehicle), transfer_id)
                return
            if body.get("status") == "queued":
                self.flows["takeovers_queued"] += 1
                self.maybe_queued.add(transfer_id)
                return

    # -- the lab ------------------------------------------------------------------------

    async def lab(self, vehicle: VehicleAgent, cycle: dict[str, Any], sample_id: str,
                  collected: datetime, flag: str | None) -> None:
        rng = self.rng("lab", sample_id)
        lab = Actor(f"lab-{vehicle.district:02d}", "lab")
        late = flag == "late"
        wait = rng.uniform(390, 480) if late else rng.uniform(90, 300)
        at = await self.clock.until(collected + minutes(wait))
        result = {"positive": "positive", "invalid": "invalid"}.get(flag or "", "negative")
        await self.api.post(lab, "/disinfection/swabs/{}/result", sample_id, json={
            "result": result, "lab": LAB_NAMES[vehicle.district % len(LAB_NAMES)],
            "reported_at": iso(at)}, key=self.key(sample_id, "result"))
        self.flows[f"swab_results_{result}"] += 1
        if late:
            self.flows["swab_results_late"] += 1
        if result == "positive":
            vehicle.tell("cycles", None)  # the re-disinfection, once the crew is back
            self.clock.spawn(self.acknowledge_exposure(sample_id, vehicle.district, at),
                             name=f"exposure {sample_id}")
        elif result == "invalid":
            again = f"{sample_id}-R"
            when = await self.clock.until(at + minutes(rng.uniform(20, 60)))
            await vehicle.swab(cycle, again, when)
            self.clock.spawn(self.lab(vehicle, cycle, again, when, None), name=f"lab {again}")


class VehicleAgent:
    """One vehicle: its crew's trips, then its disinfection, one after the other."""

    def __init__(self, world: World, vehicle_id: str, district: int, at: Point) -> None:
        self.w, self.id, self.district, self.at_point = world, vehicle_id, district, at
        self.crew = crew(vehicle_id)
        self.staff = Actor(f"wash-{district:02d}", "disinfection")
        self.inbox: Inbox[tuple[str, str | None]] = Inbox(world.clock)
        self.busy = False
        self.t = world.clock.now  # the crew phone's clock: the last time it reported
        self.trips: Counter[str] = Counter()  # transfer id -> trips driven for it
        self.ended: set[str] = set()  # transfers this vehicle handed over or saw cancelled
        self.samples = 0

    def tell(self, what: str, arg: str | None) -> None:
        """A message, once: several parties may tell the crew of the same assignment."""
        if (what, arg) not in self.inbox.items:
            self.inbox.put((what, arg))

    async def run(self) -> None:
        while True:
            what, arg = await self.inbox.get()
            self.busy = True
            self.catch_up()
            try:
                if what == "trip" and arg is not None:
                    await self.take(arg)
                else:
                    await self.disinfect(None)
                    await self.next_job(None)
            except Refused as exc:
                self.w.error(f"vehicle {self.id}", exc)
            self.busy = False  # (left set when cancelled mid-job: the summary names it)

    async def after(self, m: float) -> datetime:
        """The phone's clock `m` minutes on, once the simulated clock gets there."""
        self.t = await self.w.clock.until(self.t + minutes(m))
        return self.t

    def catch_up(self) -> None:
        """After waiting for a message or for the system, the crew's time is the day's."""
        self.t = max(self.t, self.w.clock.now)

    async def take(self, transfer_id: str) -> None:
        if transfer_id in self.ended:
            self.w.flows["stale_hints"] += 1
            return
        trip = await self.find_trip(transfer_id)
        if trip is None:
            self.w.flows["hints_without_trip"] += 1
            return
        outcome = await self.drive(trip)
        if outcome in ("handed_over", "cancelled", "refused"):
            self.ended.add(transfer_id)
        if outcome in ("handed_over", "breakdown"):
            await self.disinfect(str(trip["id"]))
        if outcome == "breakdown":
            await self.after(self.w.rng("repair", trip["id"]).uniform(60, 180))
            await self.w.api.post(self.crew, "/vehicles/{}/duty", self.id,
                                  json={"on_duty": True, "reason": "故障已修复，恢复执勤"},
                                  key=self.w.key(trip["id"], "repaired"))
            self.w.flows["vehicles_repaired"] += 1
        await self.next_job(transfer_id)

    async def find_trip(self, transfer_id: str) -> dict[str, Any] | None:
        """The crew's phone lists its vehicle's open trips until the assignment shows."""
        for n in range(POLLS):
            await self.w.poll(n)  # what consumers make is never there at once
            trips = await self.w.api.get(self.crew, "/trips", params={
                "vehicle_id": self.id, "status": "open"})
            found = next((t for t in trips if t["transfer_id"] == transfer_id), None)
            if found is not None:
                self.catch_up()
                return dict(found)
        return None

    async def next_job(self, previous: str | None) -> None:
        """Freed (released, stood down, repaired): dispatch may give the vehicle the first
        queued transfer it may carry (R4). The crew looks at its vehicle until it knows;
        when no transfer is known to wait, new work comes with the requests' answers."""
        if not self.w.maybe_queued:
            return
        for n in range(POLLS + 4):
            await self.w.poll(n)  # what consumers make is never there at once
            v = await self.w.api.get(self.crew, "/vehicles/{}", self.id)
            status, current = v.get("status"), v.get("transfer_id")
            if status == "assigned" and current:
                if current != previous or await self.has_trip(str(current)):
                    self.tell("trip", str(current))
                    return
            elif status not in ("awaiting_disinfection", "quarantined"):
                return

    async def has_trip(self, transfer_id: str) -> bool:
        trips = await self.w.api.get(self.crew, "/trips", params={"vehicle_id": self.id, "status": "open"})
        return any(t["transfer_id"] == transfer_id for t in trips)

    # -- the trip -----------------------------------------------------------------------

    async def step(self, trip_id: str, step: str, at: datetime, n: int, resend: bool = False,
                   **extra: Any) -> dict[str, Any]:
        """A crew step. A resend is the phone's retry after a lost answer: the same client
        event id under a new request, which the trip applies once."""
        client_event_id = f"{self.w.run_tag}-{trip_id[:13]}-{n}"
        body = {"step": step, "at": iso(at), "client_event_id": client_event_id, **extra}
        view: dict[str, Any] = await self.w.api.post(self.crew, "/trips/{}/steps", trip_id, json=body,
                                                     key=self.w.key(trip_id, "step", n, resend))
        self.w.flows["crew_steps"] += 1
        return view

    async def drive(self, trip: dict[str, Any]) -> str:
        w, trip_id, tid = self.w, str(trip["id"]), str(trip["transfer_id"])
        j = await w.learn(tid, self.id)
        first = self.trips[tid] == 0 and tid not in w.taken
        self.trips[tid] += 1
        w.maybe_queued.discard(tid)
        if tid not in w.taken:
            w.taken.add(tid)
            w.flows["transfers_assigned"] += 1
        w.flows["trips_driven"] += 1
        if trip.get("return_of"):
            w.flows["return_trips_driven"] += 1
        if trip.get("takeover_of"):
            w.flows["takeover_trips_driven"] += 1
        # A journey's incident happens on its first trip (a requeued patient is there next time).
        incident = j.incident if j is not None and first and not trip.get("return_of") else None
        rng = w.rng("trip", tid, self.trips[tid])
        pickup = point(trip.get("origin", {}).get("location")) or self.at_point
        if trip.get("takeover_of") and trip["takeover_of"] in w.vehicles:
            pickup = w.vehicles[str(trip["takeover_of"])].at_point  # where the broken one stands
        destination = str(trip.get("destination_id") or "")

        await self.step(trip_id, "acknowledged", await self.after(rng.uniform(0.5, 2)), 1)
        en_route = await self.after(rng.uniform(1, 3))
        own = j is not None and not trip.get("return_of")  # the journey's own leg, not its return
        late = own and j is not None and j.late_step and first
        if not late:
            await self.step(trip_id, "en_route", en_route, 2)
        if incident == "cancel":
            at = await self.after(rng.uniform(1, 4))
            await w.api.post(dispatcher(j.district if j else 0), "/transfers/{}/cancel", tid,
                             json={"reason": f"家属已自行安排，{at:%H:%M}撤单"}, key=w.key(tid, "cancel"))
            w.cancelled(tid)
            w.flows["cancelled_by_dispatcher"] += 1
            return "cancelled"
        travel = min(max(drive_minutes(self.at_point, pickup) + rng.uniform(1, 4), 3.0), 60.0)
        await self.step(trip_id, "at_pickup", await self.after(travel), 3, position=pickup.json())
        self.at_point = pickup
        if late:  # the phone was offline: en_route arrives after at_pickup, kept as history
            await self.step(trip_id, "en_route", en_route, 2)
            w.flows["late_steps"] += 1
        if incident in ("absent", "refused"):
            at = await self.after(rng.uniform(3, 10))
            code = "patient_absent" if incident == "absent" else "patient_refused"
            reason = "到达后联系不上患者" if incident == "absent" else "患者拒绝转运，已签字"
            await w.api.post(self.crew, "/trips/{}/abort", trip_id, key=w.key(trip_id, "abort"),
                             json={"code": code, "reason": reason, "at": iso(at)})
            w.flows[f"aborted_{code}"] += 1
            w.flows["trips_aborted"] += 1
            if incident == "absent":
                w.maybe_queued.add(tid)  # requeued by dispatch (R4 order)
            if incident == "refused":
                w.cancelled(tid)
                return "refused"
            return "aborted"
        aboard = await self.after(rng.uniform(4, 12))
        view = await self.step(trip_id, "patient_aboard", aboard, 4)
        if own and j is not None and j.flaky and first:
            again = await self.step(trip_id, "patient_aboard", aboard, 4, resend=True)
            w.flows["crew_resends"] += 1
            w.flows["crew_resends_applied_twice"] += int(bool(again.get("applied")))
        if incident == "breakdown":
            await self.after(rng.uniform(2, 8))
            await w.api.post(self.crew, "/vehicles/{}/out-of-service", self.id,
                             json={"reason": "途中车辆故障，等待接驳"}, key=w.key(trip_id, "breakdown"))
            w.flows["breakdowns"] += 1
            w.clock.spawn(w.takeover(tid, self.id, j.district if j else 0), name=f"takeover {tid}")
            return "breakdown"
        if view.get("notice") and destination:
            await self.acknowledge(trip_id, destination, rng)
        there = w.places.get(destination) or self.destination_of(tid) or pickup
        leg = drive_minutes(pickup, there) * rng.uniform(0.9, 1.3) + 2
        if incident in ("worsens", "full"):
            first_part = rng.uniform(2, max(3, leg / 2))
            await self.after(first_part)
            changed = await self.redirect(trip_id, tid, incident, j, rng)
            if changed:
                destination = changed
                here = Point(pickup.lat + (there.lat - pickup.lat) * first_part / leg,
                             pickup.lon + (there.lon - pickup.lon) * first_part / leg)
                there = w.places.get(destination, there)
                leg = drive_minutes(here, there) * rng.uniform(0.9, 1.3) + 2
                pickup = here
        if rng.random() < 0.5:
            half = await self.after(leg / 2)
            mid = Point((pickup.lat + there.lat) / 2, (pickup.lon + there.lon) / 2)
            await w.api.post(self.crew, "/trips/{}/positions", trip_id,
                             json={"location": mid.json(), "at": iso(half)}, key=w.key(trip_id, "pos"))
            w.flows["positions_reported"] += 1
            leg /= 2
        await self.step(trip_id, "at_destination", await self.after(leg), 5)
        handover = await self.after(rng.uniform(4, 12))
        received_by = rng.choice(DOCTORS) if not trip.get("return_of") else "值班工作人员"
        if j is not None and j.his_handover and not trip.get("return_of") and destination:
            await w.api.post(hospital(destination), "/trips/{}/handover", trip_id, json={
                "facility_id": destination, "received_by": received_by, "at": iso(handover)},
                key=w.key(trip_id, "his-handover"))
            w.flows["handovers_confirmed_by_hospital"] += 1
            handover = await self.after(0.5)
        await self.step(trip_id, "handed_over", handover, 6, received_by=received_by)
        self.at_point = there
        w.handed_over(tid, {**trip, "destination_id": destination}, handover)
        return "handed_over"

    def destination_of(self, transfer_id: str) -> Point | None:
        """A return leg goes back to where its outbound leg started."""
        outbound = self.w.returns.get(transfer_id)
        j = self.w.journeys.get(outbound) if outbound else None
        return point(j.body["origin"]["location"]) if j else None

    async def acknowledge(self, trip_id: str, facility: str, rng: random.Random) -> None:
        """The receiving hospital acknowledges the pre-arrival notice."""
        at = await self.w.clock.until(self.t + minutes(rng.uniform(0.5, 2)))
        await self.w.api.post(hospital(facility), "/trips/{}/pre-arrival-notice/ack", trip_id,
                              json={"acknowledged_by": f"{facility}急诊分诊台", "at": iso(at)},
                              key=self.w.key(trip_id, "notice", facility))
        self.w.flows["notices_acknowledged"] += 1

    async def redirect(self, trip_id: str, transfer_id: str, why: str, j: Journey | None,
                       rng: random.Random) -> str | None:
        """A dispatcher redirects: the patient worsened (a new condition), or the hospital is
        full. The crew learns the new destination from its trip."""
        w = self.w
        body: dict[str, Any] = {"reason": "接收医院床位已满"}
        if why == "worsens":
            condition = dict(j.body.get("condition", {})) if j else {}
            body = {"reason": "途中病情加重", "condition": {**condition, "critical": True,
                                                       "kind": "shock"}}
        status, view = await w.api.call(dispatcher(j.district if j else 0), "POST", "/transfers/{}/redirect",
                                        transfer_id, json=body, key=w.key(transfer_id, "redirect"),
                                        ok=(422,))
        if status != 200 or not view.get("destination"):
            w.flows["redirects_without_other_facility"] += 1
            return None
        new = str(view["destination"])
        w.flows[f"redirected_{why}"] += 1
        for n in range(POLLS):
            await self.w.poll(n)  # what consumers make is never there at once
            trip = await w.api.get(self.crew, "/trips/{}", trip_id)
            if trip.get("destination_id") == new:
                self.catch_up()
                if trip.get("notice"):
                    await self.acknowledge(trip_id, new, rng)
                return new
        w.flows["redirects_not_seen_by_crew"] += 1
        return None

    # -- disinfection (R8, R9) ----------------------------------------------------------

    async def disinfect(self, trip_id: str | None) -> None:
        """Every open cycle of the vehicle: the trip's (once the transfer service has ended
        it and disinfection opened it), and a re-disinfection a positive swab ordered."""
        w = self.w
        for n in range(POLLS):
            if trip_id is not None:
                await w.poll(n)  # the cycle follows the trip's end through two consumers
            cycles = await w.api.get(self.staff, "/disinfection/cycles", params={
                "vehicle_id": self.id, "status": "open"})
            if trip_id is None or any(c["trip_id"] == trip_id for c in cycles):
                break
        else:
            w.flows["cycles_not_found"] += 1
            return
        self.catch_up()
        for cycle in sorted(cycles, key=lambda c: str(c.get("opened_at") or "")):
            await self.clean(cycle)

    def stage(self, name: str, start: datetime, end: datetime, cycle_id: str) -> dict[str, Any]:
        place = self.w.region.districts[self.district % len(self.w.region.districts)].name
        camera = f"sim-{self.district:02d}-wash-cam-{int(cycle_id[:2], 16) % 4 + 1}"
        return {
            "stage": name, "disinfectant": "chlorine", "concentration_mg_per_l": 1000,
            "method": "wipe_and_spray", "started_at": iso(start), "ended_at": iso(end),
            "operator": STAFF_NAMES[self.district % len(STAFF_NAMES)],
            "location": f"{place}急救站洗消间",
            "video": {"camera_id": camera, "clip_ref": f"nvr://{camera}/{start:%Y%m%dT%H%M}",
                      "from": iso(start - minutes(1)), "to": iso(end + minutes(1))}}

    async def clean(self, cycle: dict[str, Any]) -> None:
        w, cycle_id = self.w, str(cycle["id"])
        rng = w.rng("cycle", cycle_id)
        j = w.journeys.get(str(cycle.get("transfer_id")))
        redo = cycle.get("kind") != "trip"
        flag = j.lab if j is not None and not redo else None
        start = self.t + minutes(rng.uniform(10, 25))
        end = start + minutes(rng.uniform(31, 40))
        self.t = await self.w.clock.until(end + minutes(rng.uniform(0, 2)))
        await w.api.post(self.staff, "/disinfection/cycles/{}/stages", cycle_id,
                         json=self.stage("initial", start, end, cycle_id), key=w.key(cycle_id, "initial"))
        start = end + minutes(rng.uniform(3, 12))
        end = start + minutes(rng.uniform(31, 40))
        self.t = await self.w.clock.until(end + minutes(rng.uniform(0, 2)))
        await w.api.post(self.staff, "/disinfection/cycles/{}/stages", cycle_id,
                         json=self.stage("terminal", start, end, cycle_id), key=w.key(cycle_id, "terminal"))
        w.flows["cycles_disinfected"] += 1
        if flag == "early_release":
            await self.after(rng.uniform(1, 3))
            await w.api.post(SUPERVISOR, "/disinfection/cycles/{}/release", cycle_id, json={
                "reason": "重症转运任务激增，督查批准先行放行，随后补采样"}, key=w.key(cycle_id, "early"))
            w.flows["cycles_released_early"] += 1
            w.flows["cycles_released"] += 1
        later = rng.uniform(5, 15) if flag == "early_release" else 0  # the kit comes afterwards
        collected = await self.after(rng.uniform(2, 8) + later)
        self.samples += 1
        sample_id = f"S{w.run_tag}-{self.id}-{self.samples}"
        released = await self.swab(cycle, sample_id, collected)
        if released and flag != "early_release":
            w.flows["cycles_released"] += 1
        if redo:
            # R9: the quarantined vehicle waits for a negative result before it goes back.
            at = await self.after(rng.uniform(60, 180))
            result = {"result": "negative", "lab": LAB_NAMES[0], "reported_at": iso(at)}
            await w.api.post(Actor(f"lab-{self.district:02d}", "lab"), "/disinfection/swabs/{}/result",
                             sample_id, json=result, key=w.key(sample_id, "result"))
            w.flows["swab_results_negative"] += 1
            w.flows["quarantines_lifted"] += 1
            w.flows["cycles_released"] += 1
        else:
            w.clock.spawn(w.lab(self, cycle, sample_id, collected, flag), name=f"lab {sample_id}")

    async def swab(self, cycle: dict[str, Any], sample_id: str, at: datetime) -> bool:
        """The surface swab (R9); True when it released the vehicle (the default policy)."""
        view = await self.w.api.post(self.staff, "/disinfection/cycles/{}/swabs", str(cycle["id"]), json={
            "sample_id": sample_id, "sites": ["stretcher", "handrail", "door_handle", "seat"],
            "collected_by": STAFF_NAMES[(self.district + 1) % len(STAFF_NAMES)], "collected_at": iso(at)},
            key=self.w.key(sample_id, "swab"))
        self.w.flows["swabs_collected"] += 1
        return bool(view.get("status") == "released")
