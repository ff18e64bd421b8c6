"""The checker's report: one entry per check, with what it counted and what it found, as
data for tests and as a summary for people."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# How many offending (or open) items a check keeps; its counts stay exact.
KEEP = 200


@dataclass(frozen=True)
class EventRef:
    """Where an event is: enough to find it again in its store."""

    store: str
    stream_id: str
    stream_version: int
    type: str
    event_id: str
    position: int

    def view(self) -> dict[str, Any]:
        return {"store": self.store, "stream_id": self.stream_id, "stream_version": self.stream_version,
                "type": self.type, "event_id": self.event_id, "position": self.position}


@dataclass(frozen=True)
class Item:
    """One offending thing (or, for loops, one still open), with the events that show it."""

    code: str
    detail: str
    events: tuple[EventRef, ...] = ()
    rule: str | None = None
    context: dict[str, Any] = field(default_factory=dict)

    def view(self) -> dict[str, Any]:
        return {"code": self.code, "rule": self.rule, "detail": self.detail, **self.context,
                "events": [e.view() for e in self.events]}


@dataclass
class Check:
    group: str  # rules | loops | delivery | read_models | chains
    code: str
    summary: str
    rule: str | None = None
    counts: dict[str, int] = field(default_factory=dict)
    found: int = 0  # offending items, all of them; `items` keeps the first KEEP
    items: list[Item] = field(default_factory=list)
    still_open: int = 0  # loops only: open, not (yet) a failure
    open: list[Item] = field(default_factory=list)
    error: str | None = None  # the check could not run

    @property
    def name(self) -> str:
        return f"{self.group}.{self.code}"

    @property
    def ok(self) -> bool:
        return self.error is None and self.found == 0

    def add(self, item: Item) -> None:
        self.found += 1
        if len(self.items) < KEEP:
            self.items.append(item)

    def add_open(self, item: Item) -> None:
        self.still_open += 1
        if len(self.open) < KEEP:
            self.open.append(item)

    def count(self, key: str, n: int = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + n

    def view(self) -> dict[str, Any]:
        return {"name": self.name, "group": self.group, "rule": self.rule, "summary": self.summary,
                "ok": self.ok, "counts": self.counts, "found": self.found,
                "items": [i.view() for i in self.items], "still_open": self.still_open,
                "open": [i.view() for i in self.open], "error": self.error}


@dataclass
class Report:
    mode: str
    started_at: str
    checks: list[Check] = field(default_factory=list)
    settled: bool = True  # every consumer had caught up before the checks ran
    seconds: float = 0.0
    events: dict[str, int] = field(default_factory=dict)  # per store, as read

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def check(self, name: str) -> Check:
        return next(c for c in self.checks if c.name == name)

    def view(self) -> dict[str, Any]:
        return {"ok": self.ok, "mode": self.mode, "started_at": self.started_at,
                "seconds": round(self.seconds, 2), "settled": self.settled, "events": self.events,
                "failed": [c.name for c in self.failed()], "checks": [c.view() for c in self.checks]}

    def summary(self, shown: int = 5) -> str:
        """A line per check, failures first within each group, with their first items."""
        total = sum(self.events.values())
        lines = [f"invariants ({self.mode}): {'ALL OK' if self.ok else f'{len(self.failed())} FAILED'}"
                 f" - {len(self.checks)} checks over {total:,} events "
                 f"({', '.join(f'{s} {n:,}' for s, n in self.events.items())}) in {self.seconds:.1f} s"
                 + ("" if self.settled else "; consumers had NOT caught up when the checks ran")]
        for group in dict.fromkeys(c.group for c in self.checks):
            lines.append(f"{group}:")
            for c in sorted((c for c in self.checks if c.group == group), key=lambda c: c.ok):
                rule = f" [{c.rule}]" if c.rule else ""
                counts = ", ".join(f"{k} {v:,}" for k, v in c.counts.items())
                extra = f"; {c.still_open:,} open" if c.still_open else ""
                lines.append(f"  {'ok  ' if c.ok else 'FAIL'} {c.code}{rule}: {c.summary}"
                             f"{f' ({counts}{extra})' if counts or extra else ''}")
                if c.error:
                    lines.append(f"       error: {c.error}")
                for item in c.items[:shown]:
                    where = ", ".join(f"{e.store}/{e.stream_id}@{e.stream_version} {e.type}"
                                      for e in item.events[:3])
                    lines.append(f"       - {item.detail}{f' [{where}]' if where else ''}")
                if c.found > shown:
                    lines.append(f"       ... and {c.found - shown:,} more")
        return "\n".join(lines)
