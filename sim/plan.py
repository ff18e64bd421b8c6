"""The day's plan, a function of the seed alone: who asks for which transfer and when, and
what each party will do (DOMAIN.md's flows 1-8 in a realistic mix), and the fleet that can
serve it. What the system decides (which vehicle, which hospital) is its own business."""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sim.api import Actor
from sim.region import Community, Facility, Point, Region

# DOMAIN.md's flows, share of the day's transfers.
FLOWS: dict[str, float] = {
    "isolation_fever": 0.24,  # flow 1: isolation-site fever patient, NPA, fever clinic and back
    "community_visit": 0.18,  # flow 2: home monitoring / sealed area, dedicated vehicle, and back
    "community_fever": 0.10,  # controlled-area fever patient, NPA, fever clinic and back
    "critical": 0.16,  # flow 3: stroke, chest pain, ... by a direct 120 call
    "clinic_positive": 0.16,  # flow 4: fever-clinic positive to the designated hospital (R13)
    "fangcang_worse": 0.06,  # flow 4: a fangcang patient worsens
    "care": 0.10,  # flow 7: recurring care (dialysis, chemotherapy, pregnancy checks)
}
RETURNING = ("isolation_fever", "community_visit", "community_fever", "care")
# What goes wrong (flow 8), and the lab's and the supervisor's part (flow 6): the share of
# journeys, and whether even a small day must show it at least once.
INCIDENTS: dict[str, tuple[float, bool]] = {
    "absent": (0.012, True),  # the patient is not there: requeued (crew abort)
    "refused": (0.008, True),  # the patient refuses: cancelled (crew abort)
    "cancel": (0.008, True),  # the dispatcher cancels before pickup
    "breakdown": (0.004, True),  # the vehicle breaks down with the patient aboard
    "worsens": (0.015, True),  # the patient worsens en route: redirected
    "full": (0.006, False),  # the hospital is full: redirected
}
LAB: dict[str, tuple[float, bool]] = {
    "positive": (0.004, True),  # R9: quarantine, re-disinfection, exposure list
    "invalid": (0.004, False),  # the lab asks for a new sample
    "late": (0.01, False),  # the result comes back after the 6 h SLA (R14)
    "early_release": (0.01, True),  # a supervisor releases the vehicle before the swab (R2 override)
}
HOURLY = (0.35, 0.3, 0.3, 0.3, 0.35, 0.4, 0.5, 0.8, 1.2, 1.6, 1.6, 1.6,
          1.3, 1.4, 1.6, 1.6, 1.6, 1.3, 1.1, 0.9, 0.9, 0.9, 0.6, 0.5)
CRITICAL_KINDS = (("stroke", 0.25), ("chest_pain", 0.25), ("severe_trauma", 0.15), ("shock", 0.1),
                  ("high_fever", 0.15), ("childbirth", 0.1))
CARE_KINDS = ("血液透析", "肿瘤化疗", "孕期产检")
SURNAMES = ("王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗郑梁谢宋唐许韩"
            "冯邓曹彭曾肖田董袁潘于蒋蔡余杜叶程苏魏吕丁任沈姚")
GIVEN = "伟芳娜秀英敏静丽强磊军洋勇艳杰娟涛明超秀兰霞平刚桂英华玉兰萍红梅建国志强海燕春梅"
_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK = "10X98765432"
# Expected busy time of a vehicle per leg (the trip, then the two-stage disinfection and
# the swab), for sizing the fleet.
LEG_HOURS = 3.0
VISIT_HOURS = 2.0


@dataclass
class Journey:
    index: int
    flow: str
    at: datetime  # when the request is made (simulated clock)
    requester: Actor
    body: dict[str, Any]  # POST /transfers (or the template of a care series)
    district: int
    incident: str | None = None
    lab: str | None = None
    admit: bool = False  # R11: admitted instead of going back
    his_handover: bool = False  # the hospital's system confirms the handover
    flaky: bool = False  # the phone resends a step
    late_step: bool = False  # a step arrives after the next one
    visit_minutes: float = 120.0

    @property
    def key(self) -> str:
        return f"j{self.index}"

    @property
    def returning(self) -> bool:
        return self.flow in RETURNING

    @property
    def needs(self) -> tuple[bool, bool]:
        """(negative pressure, life support), as dispatch reads R5 and the condition."""
        risk, cond = self.body["risk_category"], self.body.get("condition", {})
        covid_like = bool(cond.get("fever") or cond.get("covid_symptoms"))
        npa = risk in ("confirmed", "suspected") or (
            risk in ("isolation_site", "sealed_area", "controlled_area") and covid_like)
        return npa, bool(cond.get("critical"))


@dataclass(frozen=True)
class VehicleSpec:
    id: str
    kind: str
    life_support: bool
    district: int
    at: Point

    def body(self, station: str) -> dict[str, Any]:
        return {"id": self.id, "plate": f"宁A·S{self.id[-5:]}", "kind": self.kind,
                "dedicated_pool": True, "life_support": self.life_support, "station": station,
                "location": self.at.json()}


@dataclass
class Plan:
    seed: int
    day: datetime
    journeys: list[Journey]
    fleet: list[VehicleSpec]
    mix: Counter[str] = field(default_factory=Counter)


def resident_id(rng: random.Random, index: int) -> str:
    """A valid GB 11643 number, unique per index: Yongning county, a birth date, a serial."""
    born = datetime(1940, 1, 1) + timedelta(days=index % 29_000)
    serial = (index // 29_000) % 1000
    body = f"640121{born:%Y%m%d}{serial:03d}"
    total = sum(int(d) * w for d, w in zip(body, _ID_WEIGHTS, strict=True))
    return body + _ID_CHECK[total % 11]


def patient(rng: random.Random, index: int) -> dict[str, Any]:
    name = rng.choice(SURNAMES) + "".join(rng.choice(GIVEN) for _ in range(rng.randint(1, 2)))
    return {"name": name, "id_number": resident_id(rng, index),
            "phone": f"1{rng.choice('3589')}{rng.randrange(10**9):09d}"}


def arrival_times(rng: random.Random, n: int, day: datetime) -> list[datetime]:
    """n request times over the day, more in the morning and afternoon peaks."""
    total = sum(HOURLY)
    cumulative = [sum(HOURLY[:h + 1]) / total for h in range(24)]
    out = []
    for _ in range(n):
        u = rng.random()
        h = next(i for i, c in enumerate(cumulative) if u <= c)
        before = cumulative[h - 1] if h else 0.0
        within = (u - before) / (cumulative[h] - before)
        out.append(day + timedelta(hours=h + within))
    return sorted(out)


def _place(f: Facility) -> dict[str, Any]:
    kind = "isolation_site" if "isolation_site" in f.roles else "hospital"
    return {"kind": kind, "name": f.name, "location": f.at.json(), "facility_id": f.id}


def _community(c: Community, rng: random.Random) -> dict[str, Any]:
    return {"kind": "community", "name": c.name, "location": c.at.near(rng, 0.8).json(),
            "facility_id": c.id}


def journey(index: int, flow: str, at: datetime, rng: random.Random, region: Region) -> Journey:
    d = rng.randrange(len(region.districts))
    district = region.districts[d]
    person = patient(rng, index)
    console = Actor(f"dispatcher-{d:02d}", "dispatcher")
    body: dict[str, Any]
    cond: dict[str, Any]
    if flow == "isolation_fever":
        site = rng.choice(region.with_role("isolation_site", d))
        requester = Actor(f"site-{site.id}", "site", site_id=site.id)
        body = {"risk_category": "isolation_site", "purpose": "outpatient_visit",
                "condition": {"fever": True, "covid_symptoms": rng.random() < 0.4},
                "origin": _place(site), "return_required": True,
                "requested_by": {"channel": "isolation_site", "org": site.name}}
    elif flow in ("community_visit", "community_fever", "care"):
        c = rng.choice([c for c in region.communities if c.district == d])
        requester = Actor(f"grid-{c.id}", "site", site_id=c.id) if flow != "care" else console
        if flow == "community_fever":
            risk, cond = rng.choice(("sealed_area", "controlled_area")), {"fever": True}
        else:
            risk, cond = rng.choice(("home_monitoring", "home_monitoring", "sealed_area",
                                     "controlled_area", "precaution_area")), {}
        purpose = "scheduled_care" if flow == "care" else "outpatient_visit"
        org = rng.choice(CARE_KINDS) if flow == "care" else c.name
        body = {"risk_category": risk, "purpose": purpose, "condition": cond,
                "origin": _community(c, rng), "return_required": True,
                "requested_by": {"channel": "console" if flow == "care" else "community", "org": org}}
    elif flow == "critical":
        kind = rng.choices([k for k, _ in CRITICAL_KINDS], [w for _, w in CRITICAL_KINDS])[0]
        risk = rng.choice(("home_monitoring", "sealed_area", "controlled_area", "precaution_area"))
        requester = console
        body = {"risk_category": risk, "purpose": "emergency",
                "condition": {"critical": True, "kind": kind,
                              "fever": kind == "high_fever" or rng.random() < 0.15},
                "origin": {"kind": "home", "name": f"{district.name}居民家中",
                           "location": district.centre.near(rng, 6.0).json()},
                "return_required": False,
                "requested_by": {"channel": "direct_call", "org": "银川市紧急救援中心",
                                 "name": person["name"]}}
    else:
        role = "fever_clinic" if flow == "clinic_positive" else "fangcang"
        source = rng.choice(region.with_role(role, d) or region.with_role(role))
        requester = Actor(f"his-{source.id}", "hospital", facility_id=source.id)
        if flow == "clinic_positive":
            risk = rng.choice(("suspected", "suspected", "confirmed"))
            cond = {"fever": True}
            if risk == "confirmed":
                cond["severity"] = rng.choice(("severe", "mild", "asymptomatic"))
        else:
            risk, cond = "confirmed", {"fever": True, "severity": "severe"}
        body = {"risk_category": risk, "purpose": "transfer_to_designated", "condition": cond,
                "origin": _place(source), "return_required": False,
                "requested_by": {"channel": "hospital_his", "org": source.name}}
    body["patient"] = person
    return Journey(index, flow, at, requester, body, d,
                   admit=flow in RETURNING and rng.random() < 0.2,
                   his_handover=rng.random() < 0.25, flaky=rng.random() < 0.03,
                   late_step=rng.random() < 0.02, visit_minutes=rng.uniform(60, 180))


def _assign(rng: random.Random, journeys: list[Journey], table: dict[str, tuple[float, bool]],
            attr: str, eligible: list[Journey]) -> None:
    """Each incident on its own journeys: a binomial count, at least one where required."""
    pool = list(eligible)
    rng.shuffle(pool)
    for name, (rate, required) in table.items():
        count = sum(rng.random() < rate for _ in journeys)
        count = max(count, 1 if required else 0)
        for j in pool[:count]:
            setattr(j, attr, name)
        pool = pool[count:]


def build_plan(transfers: int, seed: int, region: Region, day: datetime) -> Plan:
    rng = random.Random(f"plan/{seed}")
    flows = list(FLOWS)
    times = arrival_times(rng, transfers, day)
    journeys = [journey(i, rng.choices(flows, [FLOWS[f] for f in flows])[0], at,
                        random.Random(f"journey/{seed}/{i}"), region)
                for i, at in enumerate(times)]
    # Incidents on journeys a crew drives (not care series: the scheduler makes those).
    driven = [j for j in journeys if j.flow != "care"]
    _assign(rng, journeys, INCIDENTS, "incident", driven)
    _assign(rng, journeys, LAB, "lab", [j for j in driven if j.incident is None])
    return Plan(seed, day, journeys, size_fleet(journeys, region, seed),
                Counter(j.flow for j in journeys))


def within(plan: Plan, start: datetime, end: datetime) -> Plan:
    """The plan's journeys requested in [start, end) only (the fleet stays the day's)."""
    journeys = [j for j in plan.journeys if start <= j.at < end]
    return Plan(plan.seed, plan.day, journeys, plan.fleet, Counter(j.flow for j in journeys))


def size_fleet(journeys: list[Journey], region: Region, seed: int) -> list[VehicleSpec]:
    """Enough vehicles of each kind for the busiest quarter hour of the plan, with headroom:
    each leg holds a vehicle about LEG_HOURS (trip, two-stage disinfection, swab); a return
    leg follows the visit."""
    bins: dict[tuple[bool, bool], Counter[int]] = {}
    for j in journeys:
        busy = bins.setdefault(j.needs, Counter())
        start = (j.at - journeys[0].at).total_seconds() / 900
        legs = [start]
        if j.returning and not j.admit:
            legs.append(start + (1.2 + j.visit_minutes / 60) * 4)
        for s in legs:
            for q in range(int(s), int(s + LEG_HOURS * 4) + 1):
                busy[q] += 1
    rng = random.Random(f"fleet/{seed}")
    fleet: list[VehicleSpec] = []
    kinds = {(True, True): ("negative_pressure_ambulance", True),
             (True, False): ("negative_pressure_ambulance", False),
             (False, True): ("ambulance", True), (False, False): ("dedicated_vehicle", False)}
    for needs, (kind, life_support) in kinds.items():
        peak = max(bins.get(needs, Counter()).values(), default=0)
        for _ in range(math.ceil(peak * 1.25) + 2):
            district = region.districts[len(fleet) % len(region.districts)]
            fleet.append(VehicleSpec(f"sim-v{len(fleet):05d}", kind, life_support, district.index,
                                     district.station.near(rng, 0.5)))
    return fleet
