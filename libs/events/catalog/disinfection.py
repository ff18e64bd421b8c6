"""Events of the disinfection service (streams cycle-*, sample-*)."""

from __future__ import annotations

from typing import Any

from libs.events.contracts import Event, registry


@registry.register
class CycleOpened(Event):
    cycle_id: str
    vehicle_id: str
    trip_id: str
    transfer_id: str
    reason: str


@registry.register
class InitialDisinfectionLogged(Event):
    """首次消毒 (R8): who, when, where, with what, how long, and the footage that shows it."""

    cycle_id: str
    vehicle_id: str
    stage: dict[str, Any]


@registry.register
class TerminalDisinfectionLogged(Event):
    """终末消毒 (R8)."""

    cycle_id: str
    vehicle_id: str
    stage: dict[str, Any]


@registry.register
class SampleRegistered(Event):
    """Claims a swab sample id for one cycle (sample ids are unique)."""

    sample_id: str
    cycle_id: str


@registry.register
class SurfaceSwabCollected(Event):
    cycle_id: str
    vehicle_id: str
    sample_id: str
    sites: list[str]
    collected_by: str
    collected_at: str


@registry.register
class SwabResultRecorded(Event):
    cycle_id: str
    vehicle_id: str
    sample_id: str
    result: str
    lab: str
    reported_at: str


@registry.register
class VehicleReleased(Event):
    cycle_id: str
    vehicle_id: str
    trip_id: str
    policy: str


@registry.register
class VehicleQuarantined(Event):
    cycle_id: str
    vehicle_id: str
    sample_id: str
    reason: str
