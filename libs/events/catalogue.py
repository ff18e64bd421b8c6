"""Exports the event catalogue: a JSON Schema per contract and an AsyncAPI document with
a channel per producing service's topic. `make catalog` writes them to docs/events/."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import libs.events.catalog  # noqa: F401  (registers every contract)
from libs.events.bus import topic_for
from libs.events.contracts import Event, registry
from libs.events.envelope import Envelope


def published() -> dict[str, type[Event]]:
    """The contracts of libs/events/catalog/ (not, say, a test's own event types)."""
    return {n: c for n, c in registry.types().items()
            if c.__module__.startswith("libs.events.catalog.")}


SHARED = "common"  # catalog/common.py: contracts every service emits into its own store


def producers_of(cls: type) -> list[str]:
    module = cls.__module__.rsplit(".", 1)[-1]
    return ["disinfection", "dispatch", "transfer"] if module == SHARED else [module]


def asyncapi() -> dict[str, Any]:
    types = published()
    schemas: dict[str, Any] = {"Envelope": Envelope.model_json_schema()}
    messages: dict[str, Any] = {}
    channels: dict[str, Any] = {}
    for name, cls in sorted(types.items()):
        schemas[name] = cls.model_json_schema()
        messages[name] = {
            "name": name, "title": name, "summary": (cls.__doc__ or "").strip().split("\n")[0],
            "contentType": "application/json",
            "headers": {"type": "object", "properties": {"type": {"const": name}}},
            "payload": {"allOf": [
                {"$ref": "#/components/schemas/Envelope"},
                {"type": "object", "properties": {
                    "type": {"const": name}, "schema_version": {"const": cls.schema_version},
                    "payload": {"$ref": f"#/components/schemas/{name}"}}},
            ]},
            "x-schema-version": cls.schema_version,
        }
        for producer in producers_of(cls):
            topic = topic_for(producer)
            channel = channels.setdefault(topic, {
                "address": topic, "messages": {},
                "description": f"every event of the {producer} store, keyed by stream id"})
            channel["messages"][name] = {"$ref": f"#/components/messages/{name}"}
    return {
        "asyncapi": "3.0.0",
        "info": {"title": "closedloop events", "version": "1",
                 "description": "Events of the closed-loop transfer system (点对点闭环转运)."},
        "channels": channels,
        "components": {"schemas": schemas, "messages": messages},
    }


def write(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "asyncapi.json").write_text(json.dumps(asyncapi(), indent=2, ensure_ascii=False) + "\n")
    schemas = {name: {"x-schema-version": cls.schema_version, **cls.model_json_schema()}
               for name, cls in sorted(published().items())}
    (out / "schemas.json").write_text(json.dumps(schemas, indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    write(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/events"))
