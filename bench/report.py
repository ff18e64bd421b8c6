"""Printing benchmark figures: a markdown table, with each row's ratio to a named peer."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass


@dataclass(frozen=True)
class Row:
    what: str
    value: float
    unit: str
    peer: str | None = None  # the row this one is compared with


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def table(title: str, rows: list[Row], higher_is_better: bool = True) -> str:
    by_name = {r.what: r for r in rows}
    lines = [f"### {title}", "", "| what | figure | vs peer |", "|---|---:|---|"]
    for r in rows:
        ratio = ""
        if r.peer and r.peer in by_name and by_name[r.peer].value:
            x = r.value / by_name[r.peer].value
            ratio = f"{x:.2f}x {r.peer}" + ("" if higher_is_better else " (lower is better)")
        lines.append(f"| {r.what} | {r.value:,.1f} {r.unit} | {ratio} |")
    return "\n".join(lines) + "\n"
