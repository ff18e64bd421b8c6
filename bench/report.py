"""Printing benchmark figures: a markdown table, with each row's ratio to named peers."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass


@dataclass(frozen=True)
class Row:
    what: str
    value: float
    unit: str
    peer: str | tuple[str, ...] | None = None  # the row(s) this one is compared with

    def peers(self) -> tuple[str, ...]:
        return (self.peer,) if isinstance(self.peer, str) else self.peer or ()


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def table(title: str, rows: list[Row], higher_is_better: bool = True) -> str:
    by_name = {r.what: r for r in rows}
    lines = [f"### {title}", "", "| what | figure | vs peer |", "|---|---:|---|"]
    for r in rows:
        ratios = [f"{r.value / by_name[p].value:.2f}x {p}" for p in r.peers()
                  if p in by_name and by_name[p].value]
        ratio = "; ".join(ratios) + ("" if higher_is_better or not ratios else " (lower is better)")
        lines.append(f"| {r.what} | {r.value:,.1f} {r.unit} | {ratio} |")
    return "\n".join(lines) + "\n"
