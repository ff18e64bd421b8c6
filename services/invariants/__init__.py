"""The invariant checker, run after every simulation and fault test, on either way to run
(embedded: the SQLite files under the data dir; distributed: a database per service):

- rules: nothing in the stores that the system should have refused (rules.py);
- loops: every transfer, trip, cycle, swab and exposure list closed, or open with its age
  and what it waits for (loops.py);
- delivery: every event delivered to every consumer exactly once in effect (delivery.py);
- read models: the live ones identical to a rebuild from the archive;
- chains: every store's hash chain, and the projection's copy of each, verifies.

    python -m services.invariants [--mode embedded|distributed] [--data-dir D] [--pg-url U]
    make check

`run(stores, ...)` (or `check(settings, ...)`) returns a Report: each check with its name,
ok, counts, offending items and the rule id where one applies; `Report.summary()` prints it.
"""

from services.invariants.report import Check, EventRef, Item, Report
from services.invariants.run import check, open_stores, run

__all__ = ["Check", "EventRef", "Item", "Report", "check", "open_stores", "run"]
