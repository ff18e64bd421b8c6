"""Runs the benchmarks: python -m bench [bench_name ...]."""

from __future__ import annotations

import asyncio
import importlib
import pkgutil
import sys

import bench
from bench.report import machine


def main() -> None:
    names = sys.argv[1:] or sorted(
        m.name for m in pkgutil.iter_modules(bench.__path__) if m.name.startswith("bench_"))
    print(f"# closedloop benchmarks ({machine()})\n")
    if not names:
        print("no benchmarks yet")
    for name in names:
        module = importlib.import_module(f"bench.{name}")
        print(asyncio.run(module.main()))


if __name__ == "__main__":
    main()
