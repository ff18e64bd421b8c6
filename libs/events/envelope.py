"""The envelope every event travels in, and the hash that chains it to the one before.

The hash covers every field but itself, in a canonical JSON form, so a stored event
that is edited afterwards (payload, actor, time, order) no longer matches its hash or
breaks the link to the next event.
"""

from __future__ import annotations

import hashlib
import json
import math
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import orjson
from pydantic import BaseModel, ConfigDict, Field

GENESIS_HASH = "0" * 64


def utcnow() -> datetime:
    return datetime.now(UTC)


def iso(ts: datetime) -> str:
    """RFC 3339 text that keeps the sender's offset (a crew phone's +08:00 stays visible)."""
    if ts.tzinfo is None:
        raise ValueError("naive datetimes are refused: every time needs its offset")
    return ts.isoformat()


def canonical_json(value: Any) -> str:
    """Sorted keys, no spaces, UTF-8: the text every stored hash was computed over, which
    is `json.dumps(sort_keys=True, separators=(",", ":"), ensure_ascii=False)`. orjson
    writes the same text three times faster (an append encodes twice per event), except
    for floats below 1e-4 (`1e-7`, not `1e-07`), NaN and infinities (null), values that
    are not JSON's types (a datetime: json refuses it), ints past 64 bits and lone
    surrogates (orjson refuses those): such a value takes json's path."""
    if _orjson_writes_as_json(value):
        try:
            return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
        except TypeError:
            pass
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


_PLAIN = (str, int, bool, type(None))


def _orjson_writes_as_json(value: Any) -> bool:
    stack = [value]
    pop, push = stack.pop, stack.extend
    while stack:
        v = pop()
        t = type(v)
        if t is dict:
            push(v.values())  # keys: orjson refuses any but str, as it must
        elif t is list or t is tuple:
            push(v)
        elif t is float:
            if not (1e-4 <= abs(v) < math.inf or v == 0.0):  # NaN fails both
                return False
        elif t not in _PLAIN:  # subclasses too: an enum, a datetime, ...
            return False
    return True


class Envelope(BaseModel):
    """An event as stored and as published: contract payload plus who, when, where from."""

    model_config = ConfigDict(frozen=True)

    # The limits are the stores' columns (libs/events/store.py): an envelope no store could
    # hold (one forged at the broker) is refused as it is read, not by a consumer's write.
    event_id: UUID
    type: str = Field(max_length=100)
    schema_version: int = Field(ge=0, lt=2**31)
    store: str = Field(max_length=50)
    stream_id: str = Field(max_length=200)
    stream_version: int = Field(ge=0, lt=2**31)
    position: int = Field(ge=0, lt=2**63)
    occurred_at: str = Field(max_length=40, description="the actor's clock (e.g. the crew phone), RFC 3339")
    recorded_at: str = Field(max_length=40, description="the server's clock when the store committed it")
    actor: str = Field(max_length=200)
    role: str = Field(max_length=50)
    correlation_id: str = Field(max_length=200)
    causation_id: str | None = Field(default=None, max_length=200)
    payload: dict[str, Any]
    prev_hash: str = Field(max_length=64)
    hash: str = Field(max_length=64)

    def hashed_fields(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude={"hash"})

    def compute_hash(self) -> str:
        return event_hash(self.hashed_fields())

    def to_json(self) -> bytes:
        return canonical_json(self.model_dump(mode="json")).encode()

    @classmethod
    def from_json(cls, raw: bytes | str) -> Envelope:
        return cls.model_validate_json(raw)


def event_hash(fields: dict[str, Any], payload_text: str | None = None) -> str:
    """`payload_text`: the payload's canonical JSON when the caller has it already, spliced
    in rather than encoded again (the same bytes: the fields' keys are sorted, and a quote
    inside a string value is escaped, so `"payload":0` can only be the key)."""
    if payload_text is None:
        text = canonical_json(fields)
    else:
        text = canonical_json({**fields, "payload": 0}).replace('"payload":0', f'"payload":{payload_text}', 1)
    return hashlib.sha256(text.encode()).hexdigest()


class ChainBreak(BaseModel):
    store: str
    position: int
    event_id: str
    reason: str


def verify_chain(events: list[Envelope], prev_hash: str = GENESIS_HASH) -> ChainBreak | None:
    """The first broken link in a run of consecutive store events, or None."""
    expected_position: int | None = None
    for ev in events:
        if expected_position is not None and ev.position != expected_position:
            return ChainBreak(
                store=ev.store, position=ev.position, event_id=str(ev.event_id),
                reason=f"position {expected_position} is missing",
            )
        if ev.prev_hash != prev_hash:
            return ChainBreak(
                store=ev.store, position=ev.position, event_id=str(ev.event_id),
                reason="prev_hash does not match the previous event's hash",
            )
        if ev.compute_hash() != ev.hash:
            return ChainBreak(
                store=ev.store, position=ev.position, event_id=str(ev.event_id),
                reason="content does not match its hash (edited after it was written)",
            )
        prev_hash = ev.hash
        expected_position = ev.position + 1
    return None
