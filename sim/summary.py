"""What a simulated day did: the flows, the requests with their refusals, retries and
latencies, the events written per store, time and memory. `Summary.text()` is what
`make simulate` prints; `Summary.view()` is the same as JSON."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from sim.api import Stats

# The headline flows, in the order the summary shows them (the rest follow by name).
HEADLINE = (
    "transfers_requested", "transfers_assigned", "transfers_completed", "transfers_cancelled",
    "trips_aborted", "loops_closed", "return_legs_completed", "admissions",
    "cycles_disinfected", "cycles_released", "cycles_released_early", "swabs_collected",
    "swab_results_positive", "exposure_lists", "exposed_transfers", "quarantines_lifted",
    "overflow_backups_activated", "routed_to_activated_backup", "breakdowns", "takeovers",
    "care_series_scheduled", "care_occurrences_completed",
)


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile; 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


@dataclass
class Summary:
    seed: int
    transfers: int  # the plan's requests (care series included)
    speed: float | None  # simulated seconds per wall second; None: as fast as the system goes
    target: dict[str, Any]  # mode, base URLs, data dir (for the invariant checker)
    day: str  # the simulated day (device times), in the past of the server's clock
    finished: bool  # every planned journey ended before the deadline
    wall_s: float
    setup_s: float
    sim_hours: float  # how much simulated time passed, drain after the day included
    fleet: dict[str, int]
    facilities: int
    mix: dict[str, int]
    flows: dict[str, int]
    requests: int
    endpoints: dict[str, dict[str, float]]  # "POST /trips/{id}/steps" -> n, p50_ms, p99_ms
    refused: dict[str, int]  # "409 step_out_of_order" -> n
    refused_by_endpoint: dict[str, int]
    retries: dict[str, int]
    not_yet: int  # probes for something the system was still making (404, counted apart)
    server_errors: int
    events: dict[str, dict[str, int]]  # store -> before, after, written
    chains_ok: bool | None
    chain_breaks: dict[str, Any]  # chain -> its first break, for those that do not verify
    projection_caught_up_s: float | None
    peak_rss_mb: dict[str, float]
    unfinished: dict[str, list[str]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    @staticmethod
    def http(stats: Stats) -> dict[str, Any]:
        return {
            "requests": stats.total,
            "endpoints": {e: {"n": stats.requests[e], "p50_ms": round(percentile(lat, 50) * 1000, 1),
                              "p99_ms": round(percentile(lat, 99) * 1000, 1)}
                          for e, lat in sorted(stats.latencies.items())},
            "refused": {f"{s} {c}".strip(): n for (s, c), n in sorted(stats.refused.items())},
            "refused_by_endpoint": {f"{e} -> {s} {c}".strip(): n
                                    for (e, s, c), n in sorted(stats.refused_by_endpoint.items())},
            "retries": dict(sorted(stats.retries.items())),
            "not_yet": sum(stats.not_yet.values()),
            "server_errors": stats.server_errors,
        }

    @property
    def events_written(self) -> int:
        return sum(e["written"] for e in self.events.values())

    @property
    def ok(self) -> bool:
        """The day ran to its end, with no 5xx and no agent that failed."""
        return self.finished and self.server_errors == 0 and not self.errors and self.chains_ok is not False

    def view(self) -> dict[str, Any]:
        return {**asdict(self), "events_written": self.events_written, "ok": self.ok}

    def text(self) -> str:
        f = self.flows
        lines = [
            f"simulated day {self.day}: {self.transfers:,} transfers planned, seed {self.seed}, "
            f"speed {'max' if self.speed is None else f'{self.speed:g}x'}, "
            f"target {self.target.get('mode')} {self.target.get('base_urls')}",
            f"  {'finished' if self.finished else 'NOT FINISHED (deadline)'} in {self.wall_s:,.1f} s wall "
            f"(setup {self.setup_s:,.1f} s), {self.sim_hours:.1f} simulated hours; "
            f"fleet {sum(self.fleet.values()):,} vehicles "
            f"({', '.join(f'{k} {v}' for k, v in self.fleet.items())}), {self.facilities} facilities",
            "  mix: " + ", ".join(f"{k} {v}" for k, v in self.mix.items()),
            "flows:",
        ]
        shown = [k for k in HEADLINE if k in f] + sorted(k for k in f if k not in HEADLINE)
        width = max((len(k) for k in shown), default=10)
        lines += [f"  {k:<{width}} {f[k]:>9,}" for k in shown]
        lines.append(f"requests: {self.requests:,} sent, {sum(self.refused.values()):,} refused, "
                     f"{sum(self.retries.values()):,} retried, {self.server_errors} 5xx, "
                     f"{self.not_yet:,} probes not there yet")
        lines += [f"  refused {k}: {n:,}" for k, n in self.refused_by_endpoint.items()]
        lines += [f"  retried {k}: {n:,}" for k, n in self.retries.items()]
        lines.append(f"  {'endpoint':<52} {'n':>8} {'p50 ms':>8} {'p99 ms':>8}")
        lines += [f"  {e:<52} {v['n']:>8,.0f} {v['p50_ms']:>8.1f} {v['p99_ms']:>8.1f}"
                  for e, v in self.endpoints.items()]
        chains = {True: "ok", False: "NOT ok", None: "not read"}[self.chains_ok]
        caught_up = (f", projection caught up {self.projection_caught_up_s:.1f} s after the day"
                     if self.projection_caught_up_s is not None else "")
        lines.append(f"events written: {self.events_written:,} (hash chains {chains}{caught_up})")
        lines += [f"  {store:<22} {e['written']:>10,} (now {e['after']:,})"
                  for store, e in self.events.items()]
        lines += [f"  chain {k} broken: {v}" for k, v in self.chain_breaks.items()]
        if self.peak_rss_mb:
            lines.append("peak RSS: " + ", ".join(f"{k} {v:,.0f} MiB" for k, v in self.peak_rss_mb.items()))
        for what, ids in self.unfinished.items():
            lines.append(f"unfinished {what}: {len(ids)} (e.g. {', '.join(ids[:3])})")
        lines += [f"error: {e}" for e in self.errors[:20]]
        return "\n".join(lines)
