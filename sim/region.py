"""The simulated region: the sample region of seed 003 (Yinchuan city and Yongning county)
grown to the chosen scale. Districts around Yinchuan, each with a designated hospital whose
fever clinic has a backup next door (R7), a county hospital, isolation sites and
communities; specialty, maternity, fangcang and temporary emergency hospitals every other
district. The fleet is sized from the day's plan (sim/plan.py), so the day can be served."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

DISTRICTS = ("兴庆区", "金凤区", "西夏区", "永宁县", "贺兰县", "灵武市", "望远镇", "杨和镇",
             "李俊镇", "胜利乡", "闽宁镇", "习岗镇", "立岗镇", "洪广镇")
CENTRE = (38.47, 106.27)  # Yinchuan
TRANSFERS_PER_DISTRICT = 4000
ROAD_FACTOR, SPEED_KMH = 1.3, 40.0  # as the region file's ETA model


@dataclass(frozen=True)
class Point:
    lat: float
    lon: float

    def json(self) -> dict[str, float]:
        return {"lat": round(self.lat, 5), "lon": round(self.lon, 5)}

    def near(self, rng: random.Random, km: float) -> Point:
        """A point within `km` of this one."""
        r, a = km * math.sqrt(rng.random()), rng.uniform(0, 2 * math.pi)
        return Point(self.lat + r * math.cos(a) / 111.0,
                     self.lon + r * math.sin(a) / (111.0 * math.cos(math.radians(self.lat))))


def distance_km(a: Point, b: Point) -> float:
    p1, p2 = math.radians(a.lat), math.radians(b.lat)
    dp, dl = p2 - p1, math.radians(b.lon - a.lon)
    h = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * 6371.0 * math.asin(math.sqrt(h))


def drive_minutes(a: Point, b: Point) -> float:
    return distance_km(a, b) * ROAD_FACTOR / SPEED_KMH * 60


@dataclass(frozen=True)
class Facility:
    id: str
    name: str
    roles: tuple[str, ...]
    at: Point
    district: int
    capacity: int | None = None
    backups: tuple[str, ...] = ()
    # Fever-clinic load over the day (R7): base + peak at the early afternoon.
    load_base: float = 0.0
    load_peak: float = 0.0

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "name": self.name, "roles": list(self.roles),
                               "location": self.at.json()}
        if self.capacity is not None:
            out["fever_clinic_capacity"] = self.capacity
        if self.backups:
            out["backup_ids"] = list(self.backups)
        return out


@dataclass(frozen=True)
class Community:
    id: str  # the grid worker's site id
    name: str
    at: Point
    district: int


@dataclass(frozen=True)
class District:
    index: int
    name: str
    centre: Point
    station: Point


@dataclass
class Region:
    districts: list[District]
    facilities: list[Facility]
    communities: list[Community]
    by_id: dict[str, Facility] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.by_id = {f.id: f for f in self.facilities}

    def with_role(self, role: str, district: int | None = None) -> list[Facility]:
        return [f for f in self.facilities if role in f.roles
                and (district is None or f.district == district)]


def build_region(transfers: int, seed: int) -> Region:
    rng = random.Random(f"region/{seed}")
    count = max(3, min(len(DISTRICTS), math.ceil(transfers / TRANSFERS_PER_DISTRICT)))
    centre = Point(*CENTRE)
    districts: list[District] = []
    for d in range(count):
        # Yinchuan in the middle, the others on rings about 12 km apart.
        ring, slot = (0, 0) if d == 0 else (1 + (d - 1) // 6, (d - 1) % 6)
        angle = slot * math.pi / 3 + ring * 0.5
        km = ring * 12.0
        c = Point(centre.lat + km * math.cos(angle) / 111.0,
                  centre.lon + km * math.sin(angle) / (111.0 * math.cos(math.radians(centre.lat))))
        districts.append(District(d, DISTRICTS[d], c, c.near(rng, 1.5)))
    facilities: list[Facility] = []
    communities: list[Community] = []
    for district in districts:
        i, name, c = district.index, district.name, district.centre
        # Half the districts' fever clinics pass 80% in the early afternoon (R7).
        hot = i % 2 == 0
        fever_id, backup_id = f"sim-{i:02d}-fever", f"sim-{i:02d}-backup"
        facilities.append(Facility(
            fever_id, f"{name}定点医院", ("fever_clinic", "designated"), c.near(rng, 0.5), i,
            capacity=rng.randrange(80, 160, 10), backups=(backup_id,),
            load_base=0.5 if hot else 0.3, load_peak=0.45 if hot else 0.25))
        facilities.append(Facility(
            backup_id, f"{name}发热门诊备用医院", ("fever_clinic", "backup"), c.near(rng, 1.2), i,
            capacity=rng.randrange(60, 110, 10), load_base=0.2, load_peak=0.2))
        facilities.append(Facility(f"sim-{i:02d}-county", f"{name}人民医院", ("county_hospital",),
                                   c.near(rng, 3.0), i))
        if i % 2 == 0:
            facilities.append(Facility(f"sim-{i:02d}-cardio", f"{name}心脑血管病医院",
                                       ("specialty_cardio_cerebro",), c.near(rng, 3.0), i))
            facilities.append(Facility(f"sim-{i:02d}-fangcang", f"{name}方舱医院",
                                       ("fangcang", "sub_designated"), c.near(rng, 5.0), i))
        else:
            facilities.append(Facility(f"sim-{i:02d}-maternity", f"{name}妇幼保健院",
                                       ("maternity",), c.near(rng, 3.0), i))
            facilities.append(Facility(f"sim-{i:02d}-temp", f"{name}临时急救医院",
                                       ("temporary_emergency",), c.near(rng, 5.0), i))
        for s in range(2):
            facilities.append(Facility(f"sim-{i:02d}-iso-{s}", f"{name}集中隔离医学观察点{s + 1}号",
                                       ("isolation_site",), c.near(rng, 6.0), i))
        for s in range(6):
            communities.append(Community(f"sim-{i:02d}-comm-{s}", f"{name}第{s + 1}社区",
                                         c.near(rng, 6.0), i))
    return Region(districts, facilities, communities)


def fever_load(f: Facility, hour: float, rng: random.Random) -> int:
    """The fever clinic's occupied places at `hour` (0-24): a busy early afternoon."""
    ratio = f.load_base + f.load_peak * math.exp(-(((hour - 13.0) / 4.5) ** 2)) + rng.uniform(-0.03, 0.03)
    return max(0, round(min(ratio, 1.0) * (f.capacity or 0)))
