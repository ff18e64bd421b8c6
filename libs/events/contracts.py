"""Event contracts: pydantic models with a type name and a schema version.

Old versions stay readable: an upcaster turns a payload of version N into N+1, and
the registry applies them in a chain when an event is read back (store or bus).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict

Payload = dict[str, Any]
Upcaster = Callable[[Payload], Payload]


class Event(BaseModel):
    """Base of every event contract. Names are in the past tense."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    event_type: ClassVar[str]
    schema_version: ClassVar[int] = 1


E = TypeVar("E", bound=type[Event])


class UnknownEventType(LookupError):
    pass


class Registry:
    def __init__(self) -> None:
        self._types: dict[str, type[Event]] = {}
        self._upcasters: dict[tuple[str, int], Upcaster] = {}

    def register(self, cls: E) -> E:
        name = cls.__name__
        if name in self._types and self._types[name] is not cls:
            raise ValueError(f"event type {name} registered twice")
        cls.event_type = name
        self._types[name] = cls
        return cls

    def upcaster(self, event_type: str, from_version: int) -> Callable[[Upcaster], Upcaster]:
        def deco(fn: Upcaster) -> Upcaster:
            self._upcasters[(event_type, from_version)] = fn
            return fn

        return deco

    def types(self) -> dict[str, type[Event]]:
        return dict(self._types)

    def upcast(self, event_type: str, version: int, payload: Payload) -> tuple[int, Payload]:
        cls = self._types.get(event_type)
        if cls is None:
            raise UnknownEventType(event_type)
        if version < cls.schema_version:
            # A step that edits its payload in place must not edit the caller's: what was read
            # (and its stored text, which the projection keeps beside it) stays as it was.
            payload = copy.deepcopy(payload)
        while version < cls.schema_version:
            step = self._upcasters.get((event_type, version))
            if step is None:
                raise LookupError(f"no upcaster for {event_type} v{version}")
            payload = step(payload)
            version += 1
        return version, payload

    def decode(self, event_type: str, version: int, payload: Payload) -> Event:
        _, current = self.upcast(event_type, version, payload)
        return self._types[event_type].model_validate(current)


registry = Registry()
