"""Value types that several contracts share."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from libs.events.contracts import Event, registry


class Location(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    # strict: a number, not "38.5" or true (what the JSON Schema of the API promises)
    lat: float = Field(ge=-90, le=90, strict=True)
    lon: float = Field(ge=-180, le=180, strict=True)


# Contracts below are emitted by every service, each into its own store.


@registry.register
class PatientDataDisclosed(Event):
    """Someone read patients' resident id numbers or phones in clear (issue 7): the actor
    and role are the envelope's, the time its recorded_at; which patients, here."""

    route: str
    patients: list[dict[str, Any]]  # name, masked id number and phone, transfer id where known
