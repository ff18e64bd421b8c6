"""R4: who goes first, and which patients are which class for routing (R6)."""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from libs.events.store import StateChange

if TYPE_CHECKING:
    from services.dispatch.domain.transfer import Transfer

CRITICAL_KINDS = ("stroke", "chest_pain", "severe_trauma", "shock", "high_fever", "childbirth")


def triage(risk_category: str, condition: dict[str, Any], purpose: str) -> tuple[int, str]:
    """Priority (1 is first) and why. Critical conditions, then confirmed/suspected/fever
    cases, then the rest, then scheduled care; within a priority, by request time."""
    if condition.get("critical"):
        return 1, f"critical condition ({condition.get('kind') or 'unspecified'}) 急危重症优先 (R4)"
    if risk_category in ("confirmed", "suspected") or condition.get("fever") or condition.get(
            "covid_symptoms"):
        return 2, "confirmed/suspected case, fever or COVID-like symptoms 确诊/疑似/发热 (R4)"
    if purpose == "scheduled_care":
        return 4, "scheduled care 定期治疗 (R4)"
    return 3, "other risk transfer 其他风险人员 (R4)"


def patient_class(risk_category: str, condition: dict[str, Any], origin_kind: str | None = None) -> str:
    """The routing class: picks the facility roles of the region file (R6). A suspected
    or confirmed case found in a fever clinic goes to a designated hospital (R13), which
    the general classes would not ensure (a suspected case is routed as a fever patient,
    a mild confirmed one to a fangcang); an emergency still goes where it is treated."""
    kind = condition.get("kind")
    if condition.get("critical"):
        if kind in ("stroke", "chest_pain"):
            return "cardio_cerebro"
        if kind == "childbirth":
            return "childbirth"
        return "critical"
    if risk_category in ("confirmed", "suspected") and origin_kind == "fever_clinic":
        return "fever_clinic_case"
    if risk_category == "confirmed":
        return "confirmed_mild" if condition.get("severity") in ("mild", "asymptomatic") else (
            "confirmed_severe")
    if condition.get("fever") or condition.get("covid_symptoms") or risk_category == "suspected":
        return "fever"
    return "other"


# Dispatch order: priority, request time, then update order (store position, stream id);
# the transfer rides along and is never compared.
Waiting = tuple[int, str, float, str, "Transfer"]


class WaitingQueue:
    """The queued transfers in dispatch order (R4), kept as their states change (an IndexView
    of the transfers), so a freed vehicle walks the queue from its head instead of sorting
    all of it."""

    def __init__(self) -> None:
        self._order: list[Waiting] = []
        self._entries: dict[str, Waiting] = {}

    def put(self, change: StateChange, state: Callable[[], Any]) -> None:
        held = self._entries.pop(change.stream_id, None)
        if held is not None:
            del self._order[bisect.bisect_left(self._order, held)]
        if change.status == "queued":
            transfer: Transfer = state()
            entry = (transfer.priority, transfer.requested_at, change.position, change.stream_id, transfer)
            bisect.insort(self._order, entry)
            self._entries[change.stream_id] = entry

    def __len__(self) -> int:
        return len(self._order)

    def in_order(self, also: Transfer | None = None) -> Iterator[Transfer]:
        """Head first, as of now (a copy: the queue may move while the caller reads on).
        `also`: a transfer put back in line by the commit being built (the queue holds
        committed states), after any that tie with it."""
        order = list(self._order)
        if also is not None:
            held = self._entries.get(also.stream_id)
            if held is not None:
                del order[bisect.bisect_left(order, held)]
            bisect.insort(order, (also.priority, also.requested_at, float("inf"), also.stream_id, also))
        return (e[4] for e in order)
