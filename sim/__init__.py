"""The simulator: a realistic day for the sample region at a chosen scale, driving every
party through the public REST API on a compressed clock (`make simulate`).

    from sim import run_day
    summary = await run_day("http://127.0.0.1:8000", transfers=2000, seed=7)
    print(summary.text())
"""

from sim.runner import Progress, Target, embedded, run_day
from sim.summary import Summary

__all__ = ["Progress", "Summary", "Target", "embedded", "run_day"]
