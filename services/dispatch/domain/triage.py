"""R4: who goes first, and which patients are which class for routing (R6)."""

from __future__ import annotations

from typing import Any

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


def patient_class(risk_category: str, condition: dict[str, Any]) -> str:
    """The routing class: picks the facility roles of the region file (R6)."""
    kind = condition.get("kind")
    if condition.get("critical"):
        if kind in ("stroke", "chest_pain"):
            return "cardio_cerebro"
        if kind == "childbirth":
            return "childbirth"
        return "critical"
    if risk_category == "confirmed":
        return "confirmed_mild" if condition.get("severity") in ("mild", "asymptomatic") else (
            "confirmed_severe")
    if condition.get("fever") or condition.get("covid_symptoms") or risk_category == "suspected":
        return "fever"
    return "other"
