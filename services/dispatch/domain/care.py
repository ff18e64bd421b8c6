"""Scheduled care that must not lapse (dialysis, chemotherapy, pregnancy checks; seeds 000,
002): a series that requests each transfer ahead of its appointment, cancellable."""

from __future__ import annotations

import uuid
from datetime import date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from libs.events.aggregate import Aggregate, StateConflict
from libs.events.catalog import dispatch as ev


def occurrence_transfer_id(series_id: str, appointment_at: str) -> str:
    """Deterministic: a scheduler that runs twice requests each occurrence once."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"care:{series_id}:{appointment_at}"))


class CareSeries(Aggregate):
    stream_prefix = "care"

    status: str = "active"
    template: dict[str, Any] = {}
    weekdays: list[int] = []  # ISO: Monday is 1
    time: str = "08:00"
    timezone: str = "Asia/Shanghai"
    starts_on: str = ""
    until: str | None = None
    lead_minutes: int = 60
    requested: list[str] = []  # appointment times already requested

    @classmethod
    def schedule(cls, event: ev.CareSeriesScheduled) -> CareSeries:
        series = cls(id=event.series_id)
        series.record(event)
        return series

    def _on_CareSeriesScheduled(self, e: ev.CareSeriesScheduled) -> None:
        self.template, self.weekdays, self.time, self.timezone = e.template, e.weekdays, e.time, e.timezone
        self.starts_on, self.until, self.lead_minutes = e.starts_on, e.until, e.lead_minutes

    def appointments(self, start: datetime, end: datetime) -> list[datetime]:
        """Appointments whose request time (appointment less the lead) falls in [start, end)."""
        tz = ZoneInfo(self.timezone)
        hh, mm = (int(x) for x in self.time.split(":"))
        first = max(date.fromisoformat(self.starts_on), (start.astimezone(tz) - timedelta(days=1)).date())
        last = (end.astimezone(tz) + timedelta(minutes=self.lead_minutes, days=1)).date()
        if self.until:
            last = min(last, date.fromisoformat(self.until))
        out: list[datetime] = []
        day = first
        while day <= last:
            if day.isoweekday() in self.weekdays:
                at = datetime.combine(day, time(hh, mm), tz)
                request_at = at - timedelta(minutes=self.lead_minutes)
                if start <= request_at < end:
                    out.append(at)
            day += timedelta(days=1)
        return out

    def due(self, now: datetime, since: datetime) -> list[datetime]:
        """Appointments due to be requested by now and not requested yet."""
        if self.status != "active":
            return []
        return [a for a in self.appointments(since, now) if a.isoformat() not in self.requested]

    def mark_requested(self, appointment_at: datetime, transfer_id: str) -> None:
        self.record(ev.CareOccurrenceRequested(series_id=self.id, appointment_at=appointment_at.isoformat(),
                                               transfer_id=transfer_id))

    def _on_CareOccurrenceRequested(self, e: ev.CareOccurrenceRequested) -> None:
        self.requested = [*self.requested, e.appointment_at]

    def cancel(self, reason: str) -> None:
        if self.status != "active":
            raise StateConflict("series_cancelled", f"series {self.id} is already cancelled",
                                f"定期转运计划{self.id}已取消")
        self.record(ev.CareSeriesCancelled(series_id=self.id, reason=reason))

    def _on_CareSeriesCancelled(self, e: ev.CareSeriesCancelled) -> None:
        self.status = "cancelled"
