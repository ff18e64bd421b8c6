"""FreeFleet (the free vehicles filed by kit and grid cell) ranks exactly as a scan of the
free vehicles does (rank_vehicles), whatever the fleet did before: R3 and R5 fits, the least
over-equipped first, then the nearest, ties in update order."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from libs.events.catalog import dispatch as ev
from libs.events.catalog.common import Location
from libs.events.store import StateChange
from services.dispatch.domain import FreeFleet, StraightLineEta, Vehicle, VehicleNeeds, rank_vehicles

ETA = StraightLineEta()
Kit = tuple[str, bool, bool]
Change = tuple[int, Kit, tuple[float, float], str]
KITS: list[Kit] = [
    ("negative_pressure_ambulance", True, True), ("negative_pressure_ambulance", True, False),
    ("dedicated_vehicle", True, False), ("dedicated_vehicle", False, False), ("ambulance", True, True)]
STATUSES = st.sampled_from(["available", "available", "assigned", "off_duty"])
# A city, a few stations where several vehicles stand at the same spot, and one far away.
CITY = st.one_of(
    st.tuples(st.floats(38.0, 38.8), st.floats(105.8, 106.6)),
    st.sampled_from([(38.41, 106.21), (38.32, 106.11), (40.1, 107.9)]),
)


def vehicle(vid: str, kit: Kit, at: tuple[float, float], status: str) -> Vehicle:
    v = Vehicle.register(ev.VehicleRegistered(
        vehicle_id=vid, plate="宁A", kind=kit[0], dedicated_pool=kit[1], life_support=kit[2],
        station="s", location=Location(lat=at[0], lon=at[1])))
    v.status = status
    return v


def check(changes: list[Change], pickup: tuple[float, float], needs: VehicleNeeds, shown: int,
          commit_size: int) -> None:
    fleet = FreeFleet()
    latest: dict[str, tuple[int, Vehicle]] = {}
    for n, (number, kit, at, status) in enumerate(changes):
        sid = f"vehicle-v{number:03d}"
        position = n // commit_size  # several vehicles change in one commit: a position tie
        v = vehicle(f"v{number:03d}", kit, at, status)
        fleet.put(StateChange("Vehicle", sid, 1, v.status, None, "", position), lambda v=v: v)
        latest[sid] = (position, v)
    in_update_order = sorted(latest.items(), key=lambda kv: (kv[1][0], kv[0]))
    free = [v for _, (_, v) in in_update_order if v.status == "available"]
    place = Location(lat=pickup[0], lon=pickup[1])
    scanned, scan_considered = rank_vehicles(needs, place, free, ETA, shown)
    ranked, considered = fleet.rank(needs, place, ETA, shown)
    assert [v.id for v in ranked] == [v.id for v in scanned]
    assert considered == scan_considered


@settings(max_examples=300, deadline=None)
@given(changes=st.lists(st.tuples(st.integers(0, 60), st.sampled_from(KITS), CITY, STATUSES), max_size=120),
       pickup=CITY, npa=st.booleans(), life=st.booleans(), shown=st.integers(1, 12),
       commit_size=st.integers(1, 5))
def test_free_fleet_ranks_as_the_scan_does(changes: list[Change], pickup: tuple[float, float],
                                           npa: bool, life: bool, shown: int, commit_size: int) -> None:
    check(changes, pickup, VehicleNeeds(negative_pressure=npa, life_support=life), shown, commit_size)


@settings(max_examples=100, deadline=None)
@given(rnd=st.randoms(use_true_random=False), shown=st.integers(1, 12), commit_size=st.integers(1, 50))
def test_free_fleet_ranks_as_the_scan_does_in_a_crowded_district(
        rnd: random.Random, shown: int, commit_size: int) -> None:
    """Hundreds of vehicles a few cells around the pickup: the answer comes from the rings
    nearest it, not from a scan."""
    def spot() -> tuple[float, float]:
        return 38.40 + rnd.random() * 0.08, 106.20 + rnd.random() * 0.08

    statuses = ["available"] * 3 + ["assigned"]
    changes = [(rnd.randrange(400), rnd.choice(KITS[2:4]), spot(), rnd.choice(statuses))
               for _ in range(rnd.randrange(100, 600))]
    check(changes, spot(), VehicleNeeds(negative_pressure=False, life_support=False), shown, commit_size)
