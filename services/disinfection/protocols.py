"""Disinfection protocols and the arithmetic that follows from them: what a treatment must
reach, when a stage can end at the earliest, when the vehicle can be ready. Pure: no I/O.

The national defaults follow the guidance for ambulances after a risk transfer (消毒技术
指南): surfaces wiped or sprayed with available chlorine at 1000 mg/L, or chlorine dioxide
at 500 mg/L, for at least 30 minutes; the closed cabin's air sprayed with peracetic acid
0.5% (5000 mg/L), hydrogen peroxide 3% (30000 mg/L) or chlorine dioxide 500 mg/L at
20 mL per cubic metre, and left closed for 60 minutes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from libs.events.aggregate import InvalidField
from libs.events.envelope import iso
from libs.web.fields import CLOCK_SKEW, not_ahead

SURFACE = "surface"
AIR = "air"
AFTER_SWAB_COLLECTED = "after_swab_collected"
AFTER_NEGATIVE_RESULT = "after_negative_result"


@dataclass(frozen=True)
class Protocol:
    """The least a disinfectant must reach on one target."""

    min_concentration_mg_per_l: float
    min_contact_minutes: float
    min_dose_ml_per_m3: float | None = None

    def as_dict(self) -> dict[str, float | None]:
        return {"min_concentration_mg_per_l": self.min_concentration_mg_per_l,
                "min_contact_minutes": self.min_contact_minutes,
                "min_dose_ml_per_m3": self.min_dose_ml_per_m3}


def percent(p: float) -> float:
    """A solution's strength in mg/L (1% w/v is 10 g/L)."""
    return p * 10_000


NATIONAL_SURFACE: dict[str, Protocol] = {
    "chlorine": Protocol(1000, 30),
    "chlorine_dioxide": Protocol(500, 30),
}
NATIONAL_AIR: dict[str, Protocol] = {
    "peracetic_acid": Protocol(percent(0.5), 60, 20),
    "hydrogen_peroxide": Protocol(percent(3), 60, 20),
    "chlorine_dioxide": Protocol(500, 60, 20),
}


@dataclass(frozen=True)
class Rules:
    """Everything configurable that the disinfection domain decides with."""

    surface: Mapping[str, Protocol] = field(default_factory=lambda: dict(NATIONAL_SURFACE))
    air: Mapping[str, Protocol] = field(default_factory=lambda: dict(NATIONAL_AIR))
    release_policy: str = AFTER_SWAB_COLLECTED
    # After a positive swab the vehicle waits for a negative one: a known-positive vehicle
    # does not go back on the road on the strength of a sample nobody has read yet.
    quarantine_release_policy: str = AFTER_NEGATIVE_RESULT
    min_swab_sites: int = 3
    result_sla: timedelta = timedelta(hours=6)
    # How far ahead of the server's clock a reported time may be (phone clocks drift).
    clock_skew: timedelta = CLOCK_SKEW
    # R8: the first stage begins once the trip has ended (the vehicle is disinfected when it
    # is back). The crew's phone and the washing bay's console keep their own clocks: a
    # stage that starts this much before the trip ended is taken for a clock's error (the
    # audit allows the same, services/projection/findings.py).
    stage_clock_tolerance: timedelta = timedelta(minutes=10)

    def protocols(self, target: str) -> Mapping[str, Protocol]:
        return self.surface if target == SURFACE else self.air

    def protocol(self, target: str, disinfectant: str, field_prefix: str = "") -> Protocol:
        known = self.protocols(target)
        protocol = known.get(disinfectant)
        if protocol is None:
            raise InvalidField(
                f"{field_prefix}disinfectant", "unknown_disinfectant",
                f"no {target} protocol for {disinfectant}; configured: {', '.join(sorted(known))}",
                f"{disinfectant}没有适用于{'物体表面' if target == SURFACE else '空气'}的消毒规程",
                rule="R8", target=target, known=sorted(known))
        return protocol

    def quickest_stage(self) -> timedelta:
        """The shortest a stage can take: the quickest surface protocol."""
        return timedelta(minutes=min(p.min_contact_minutes for p in self.surface.values()))

    def check_not_future(self, field_name: str, at: datetime, now: datetime) -> None:
        """A time that has not happened yet is a typing error or a wrong clock; it would also
        push a result's due time (R14) out of reach."""
        not_ahead(field_name, at, now, self.clock_skew)


DEFAULT_RULES = Rules()


@dataclass(frozen=True)
class Treatment:
    """One application of a disinfectant to one target, for a measured time."""

    target: str
    disinfectant: str
    concentration_mg_per_l: float
    method: str
    started_at: datetime
    ended_at: datetime
    dose_ml_per_m3: float | None = None

    @property
    def contact_minutes(self) -> float:
        return (self.ended_at - self.started_at).total_seconds() / 60

    def check(self, rules: Rules, field_prefix: str = "") -> Protocol:
        """R8: refuse a treatment below its protocol, naming the field that falls short."""
        f = field_prefix
        if self.ended_at <= self.started_at:
            raise InvalidField(f"{f}ended_at", "stage_ends_before_start",
                               "ended_at must be after started_at", "结束时间必须晚于开始时间")
        protocol = rules.protocol(self.target, self.disinfectant, f)
        if self.concentration_mg_per_l < protocol.min_concentration_mg_per_l:
            raise InvalidField(
                f"{f}concentration_mg_per_l", "concentration_below_protocol",
                f"{self.disinfectant} on {self.target} needs at least "
                f"{protocol.min_concentration_mg_per_l:g} mg/L, not {self.concentration_mg_per_l:g}",
                f"{self.disinfectant}浓度{self.concentration_mg_per_l:g} mg/L，"
                f"低于规程要求的{protocol.min_concentration_mg_per_l:g} mg/L",
                rule="R8", required=protocol.min_concentration_mg_per_l)
        if protocol.min_dose_ml_per_m3 is not None and (
                self.dose_ml_per_m3 is None or self.dose_ml_per_m3 < protocol.min_dose_ml_per_m3):
            raise InvalidField(
                f"{f}dose_ml_per_m3", "dose_below_protocol",
                f"spraying {self.disinfectant} needs at least {protocol.min_dose_ml_per_m3:g} mL/m³",
                f"喷雾用量低于规程要求的{protocol.min_dose_ml_per_m3:g} mL/m³",
                rule="R8", required=protocol.min_dose_ml_per_m3)
        if self.contact_minutes < protocol.min_contact_minutes:
            earliest = self.started_at + timedelta(minutes=protocol.min_contact_minutes)
            raise InvalidField(
                f"{f}ended_at", "contact_time_below_protocol",
                f"contact time {self.contact_minutes:.0f} min is below the protocol's "
                f"{protocol.min_contact_minutes:g} min for {self.disinfectant} on {self.target}; "
                f"the earliest end is {iso(earliest)}",
                f"作用时间{self.contact_minutes:.0f}分钟，低于规程要求的{protocol.min_contact_minutes:g}分钟",
                rule="R8", required_minutes=protocol.min_contact_minutes, earliest_end_at=iso(earliest))
        return protocol

    def earliest_end(self, protocol: Protocol) -> datetime:
        return self.started_at + timedelta(minutes=protocol.min_contact_minutes)

    def to_payload(self, protocol: Protocol) -> dict[str, object]:
        return {
            "target": self.target, "disinfectant": self.disinfectant,
            "concentration_mg_per_l": self.concentration_mg_per_l, "method": self.method,
            "dose_ml_per_m3": self.dose_ml_per_m3, "started_at": iso(self.started_at),
            "ended_at": iso(self.ended_at), "contact_minutes": round(self.contact_minutes, 1),
            "earliest_end_at": iso(self.earliest_end(protocol)), "protocol": protocol.as_dict(),
        }
