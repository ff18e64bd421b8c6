"""The fault tests' end check turns the invariant checker's report into their verdict: any
finding fails the fault test; findings of something missing or applied twice are counted
as lost or doubled in the fault report."""

from __future__ import annotations

from services.invariants import Check, Item, Report
from tests.faults.checks import tally
from tests.faults.harness import Verdict


def report(*checks: Check, settled: bool = True) -> Report:
    return Report(mode="distributed", started_at="2026-11-23T00:00:00+00:00", checks=list(checks),
                  settled=settled, events={"dispatch": 10, "transfer": 7})


def test_a_clean_report_is_a_clean_verdict() -> None:
    verdict = Verdict()
    tally(report(Check("delivery", "transfer", "..."), Check("chains", "store:dispatch", "...")), verdict)
    assert verdict.ok and (verdict.lost, verdict.doubled) == (0, 0)
    assert verdict.counts == {"dispatch events": 10, "transfer events": 7, "checks": 2, "still open": 0,
                              "checker s": 0}


def test_every_finding_fails_and_the_missing_and_doubled_are_counted() -> None:
    delivery = Check("delivery", "transfer", "...")
    applied = Check("delivery", "applied_once", "...")
    rules = Check("rules", "stage_logged_twice", "...", rule="R8")
    delivery.add(Item("not_delivered", "TripOpened t-1@1 never applied by disinfection"))
    applied.add(Item("applied_twice", "transfer applied event e-1 in two commits"))
    rules.add(Item("stage_logged_twice", "cycle c-1's initial stage logged twice"))
    verdict = Verdict()
    tally(report(delivery, applied, rules), verdict)
    assert not verdict.ok and (verdict.lost, verdict.doubled) == (1, 1)
    assert "rules.stage_logged_twice: 1 found" in verdict.problems
    assert "  TripOpened t-1@1 never applied by disinfection" in verdict.problems


def test_consumers_that_never_caught_up_fail_it_too() -> None:
    verdict = Verdict()
    tally(report(Check("loops", "transfers", "..."), settled=False), verdict)
    assert not verdict.ok and verdict.problems == ["the consumers had not caught up after 120 s"]
