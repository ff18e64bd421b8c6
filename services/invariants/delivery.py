"""Every event delivered to every consumer exactly once in effect.

Three views of it:
- tracking: per consumer (ServiceSpec.consumers), the events of the types it handles in
  each store it reads, against its tracking rows (one per event applied, written with the
  effect, libs/events/bus.Subscription): none missing, none that no store holds;
- applied once: the events a consumer's commit caused carry the delivered event's id as
  their causation id, so two commits with one causation are one delivery applied twice;
- handoffs: for the deliveries one service counts on from another (a trip per assignment,
  a cycle per completed trip, the vehicle held and released, ...), the effect is there,
  once.
Events appended after the checker saw the consumers caught up (`settled_heads`) are not
expected to have been delivered yet.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from libs.events.bus import ALL_TYPES
from services.invariants.history import Ev
from services.invariants.report import Check, Item


@dataclass(frozen=True)
class Consumer:
    name: str  # its tracking rows' consumer, and its actor "system:<name>"
    store: str  # where its effects and tracking rows are
    reads: dict[str, frozenset[str] | None]  # source store -> the types it handles (None: all)

    def handles(self, ev: Ev) -> bool:
        if ev.store not in self.reads:
            return False
        types = self.reads[ev.store]
        return types is None or ev.type in types


def consumers() -> list[Consumer]:
    """As the runtime subscribes them (services/runtime.py SERVICES)."""
    from services.runtime import SERVICES

    return [Consumer(name, service, {source: None if ALL_TYPES in handlers else frozenset(handlers)
                                     for source, handlers in consumes.items()})
            for service, spec in SERVICES.items() for name, consumes in spec.consumers.items()]


@dataclass(frozen=True)
class Handoff:
    """A delivery another service counts on: `cause` in `source` makes `effects` in `target`."""

    source: str
    cause: str
    target: str
    effects: tuple[str, ...]
    least: int
    most: int
    what: str
    when: Callable[[dict[str, Any]], bool] = lambda payload: True


def _lifted(p: dict[str, Any]) -> bool:
    return bool(p.get("quarantine_lifted"))


HANDOFFS = (
    Handoff("dispatch", "VehicleAssigned", "transfer", ("TripOpened",), 1, 1, "a trip per assignment"),
    # A completed trip's missing cycle is loops.cycles' finding; here, no second one.
    Handoff("transfer", "TripCompleted", "disinfection", ("CycleOpened",), 0, 1, "one cycle per trip"),
    Handoff("transfer", "TripCompleted", "dispatch", ("VehicleAwaitingDisinfection",), 1, 1,
            "the vehicle held for disinfection (R2)"),
    Handoff("transfer", "PatientHandedOver", "dispatch", ("TransferHandedOver",), 1, 1,
            "the transfer handed over"),
    Handoff("transfer", "ReturnRequested", "dispatch", ("TransferRequested",), 1, 1,
            "the return leg requested (R11)"),
    Handoff("disinfection", "VehicleReleased", "dispatch",
            ("VehicleReturnedToService", "VehicleReleaseReceivedEarly"), 1, 1,
            "the released vehicle back in service (R2)", lambda p: not _lifted(p)),
    Handoff("disinfection", "VehicleReleased", "dispatch", ("VehicleReturnedToService",), 0, 1,
            "a quarantine lifted once (R9)", _lifted),
    Handoff("disinfection", "VehicleQuarantined", "dispatch", ("VehicleTakenOutOfService",), 1, 1,
            "the quarantined vehicle out of service (R9)"),
)


@dataclass
class Delivery:
    """Fed every event of every store; `tracked` holds each consumer's tracking rows."""

    consumers: list[Consumer]
    tracked: dict[str, set[str]]
    settled_heads: dict[str, int]
    checks: dict[str, Check] = field(default_factory=dict)
    effects: dict[tuple[str, str], Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    commits: dict[tuple[str, str], Ev] = field(default_factory=dict)
    causes: list[tuple[Handoff, Ev]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.by_name = {c.name: c for c in self.consumers}
        for c in self.consumers:
            sources = ", ".join(sorted(c.reads))
            self.checks[c.name] = Check("delivery", c.name, f"what {c.name} handles from {sources}, "
                                        "against its tracking rows",
                                        counts={f"{k}:{s}": 0 for s in sorted(c.reads)
                                                for k in ("expected", "delivered")})
        self.checks["applied_once"] = Check("delivery", "applied_once",
                                            "each delivery's effects in one commit")
        self.checks["handoffs"] = Check("delivery", "handoffs", "each cross-service handoff's effect, once")

    def settled(self, ev: Ev) -> bool:
        return ev.position <= self.settled_heads.get(ev.store, ev.position)

    def feed(self, ev: Ev) -> None:
        for c in self.consumers:
            if not c.handles(ev):
                continue
            check = self.checks[c.name]
            check.count(f"expected:{ev.store}")
            if ev.event_id in self.tracked[c.name]:
                self.tracked[c.name].discard(ev.event_id)
                check.count(f"delivered:{ev.store}")
            elif self.settled(ev):
                check.add(Item("not_delivered", f"{ev.type} {ev.stream_id}@{ev.stream_version} never applied "
                               f"by {c.name}", (ev.ref(),), None, {"consumer": c.name}))
        for h in HANDOFFS:
            if ev.type == h.cause and ev.store == h.source and h.when(ev.payload) and self.settled(ev):
                self.causes.append((h, ev.keep()))
        consumer = ev.actor.removeprefix("system:")
        if ev.causation_id is None or ev.role != "system" or consumer not in self.by_name:
            return
        self.effects[(ev.store, ev.causation_id)][ev.type] += 1
        first = self.commits.setdefault((consumer, ev.causation_id), ev.keep())
        if first.recorded_at != ev.recorded_at:
            self.checks["applied_once"].add(Item(
                "applied_twice", f"{consumer} applied event {ev.causation_id} in two commits "
                f"({first.type} at {first.recorded_at}, {ev.type} at {ev.recorded_at})",
                (first.ref(), ev.ref()), None, {"consumer": consumer, "cause": ev.causation_id}))
            self.commits[(consumer, ev.causation_id)] = ev.keep()  # one finding per further commit

    def finish(self) -> list[Check]:
        for name, left in self.tracked.items():
            check = self.checks[name]
            for event_id in sorted(left):
                check.add(Item("unknown_event", f"{name} has a tracking row for {event_id}, which no store "
                               "it reads holds", (), None, {"consumer": name, "event_id": event_id}))
            check.count("unknown", len(left))
        self.checks["applied_once"].count("deliveries", len(self.commits))
        handoffs = self.checks["handoffs"]
        for h, ev in self.causes:
            handoffs.count(h.cause)
            made = sum(self.effects.get((h.target, ev.event_id), Counter())[t] for t in h.effects)
            if h.least <= made <= h.most:
                continue
            handoffs.add(Item(
                "effect_missing" if made < h.least else "effect_twice",
                f"{h.what}: {ev.type} {ev.stream_id}@{ev.stream_version} made {made} "
                f"{'/'.join(h.effects)} in {h.target}", (ev.ref(),), None, {"target": h.target}))
        return list(self.checks.values())
