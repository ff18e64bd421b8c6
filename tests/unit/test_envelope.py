"""The envelope, its hash chain, and upcasting of old event versions."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from uuid import uuid4

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from libs.events.contracts import Event, Registry
from libs.events.envelope import GENESIS_HASH, Envelope, canonical_json, event_hash, verify_chain


def chain(n: int) -> list[Envelope]:
    out: list[Envelope] = []
    prev = GENESIS_HASH
    for i in range(1, n + 1):
        fields = {
            "event_id": str(uuid4()), "type": "ThingHappened", "schema_version": 1, "store": "s",
            "stream_id": "thing-1", "stream_version": i, "position": i,
            "occurred_at": "2022-11-20T09:01:10+08:00", "recorded_at": "2022-11-20T01:01:11+00:00",
            "actor": "crew-07", "role": "crew", "correlation_id": "t-1", "causation_id": None,
            "payload": {"n": i, "名字": "张三"}, "prev_hash": prev,
        }
        env = Envelope(**fields, hash=event_hash(fields))
        out.append(env)
        prev = env.hash
    return out


def test_a_clean_chain_verifies() -> None:
    assert verify_chain(chain(5)) is None


def test_a_payload_encoded_beforehand_hashes_the_same() -> None:
    env = chain(1)[0]
    # Even an actor whose name holds the text the payload is spliced at.
    for fields in (env.hashed_fields(), {**env.hashed_fields(), "actor": '"payload":0,"x'}):
        assert event_hash(fields, canonical_json(fields["payload"])) == event_hash(fields)


def test_the_hash_covers_every_field() -> None:
    env = chain(1)[0]
    for field, value in [("payload", {"n": 2}), ("actor", "someone-else"), ("position", 9),
                         ("occurred_at", "2022-11-20T09:01:11+08:00"), ("role", "admin")]:
        edited = env.model_copy(update={field: value})
        assert edited.compute_hash() != env.hash, field


def test_an_edited_event_is_named() -> None:
    events = chain(4)
    events[2] = events[2].model_copy(update={"payload": {"n": 99}})
    broken = verify_chain(events)
    assert broken is not None and broken.position == 3 and "edited" in broken.reason


def test_a_removed_event_breaks_the_chain() -> None:
    events = chain(4)
    del events[1]
    broken = verify_chain(events)
    assert broken is not None and broken.position == 3


def test_a_rehashed_forgery_still_breaks_the_next_link() -> None:
    events = chain(3)
    forged = events[1].model_copy(update={"payload": {"n": 42}})
    forged = forged.model_copy(update={"hash": forged.compute_hash()})
    broken = verify_chain([events[0], forged, events[2]])
    assert broken is not None and broken.position == 3 and "prev_hash" in broken.reason


def test_json_round_trip_keeps_the_hash() -> None:
    env = chain(1)[0]
    assert Envelope.from_json(env.to_json()).compute_hash() == env.hash


def test_an_envelope_no_store_could_hold_is_refused_as_it_is_read() -> None:
    """The limits are the stores' columns: a consumer's write must not be where a forged
    envelope (from the broker) fails, again and again."""
    body = chain(1)[0].model_dump(mode="json")
    assert Envelope.model_validate({**body, "stream_id": "x" * 200}).stream_id == "x" * 200
    for field, value in (("stream_id", "x" * 201), ("type", "T" * 101), ("role", "r" * 51),
                         ("stream_version", 2**31), ("position", -1)):
        with pytest.raises(ValueError, match=field):
            Envelope.model_validate({**body, field: value})


def test_naive_datetimes_are_refused() -> None:
    from datetime import datetime

    from libs.events.envelope import iso

    with pytest.raises(ValueError):
        iso(datetime(2022, 11, 20, 9, 0))


def test_upcasters_chain_old_versions_to_the_current_one() -> None:
    reg = Registry()

    @reg.register
    class SwabTaken(Event):
        schema_version = 3
        sample_id: str
        sites: list[str]
        collected_by: str

    @reg.upcaster("SwabTaken", 1)
    def v1_to_v2(p: dict[str, object]) -> dict[str, object]:
        return {"sample_id": p["sample"], "sites": [p["site"]]}

    @reg.upcaster("SwabTaken", 2)
    def v2_to_v3(p: dict[str, object]) -> dict[str, object]:
        return {**p, "collected_by": "unknown (recorded before v3)"}

    old = reg.decode("SwabTaken", 1, {"sample": "S-1", "site": "stretcher"})
    assert old == SwabTaken(sample_id="S-1", sites=["stretcher"], collected_by="unknown (recorded before v3)")
    current = reg.decode("SwabTaken", 3, {"sample_id": "S-2", "sites": [], "collected_by": "赵六"})
    assert current.collected_by == "赵六"  # type: ignore[attr-defined]


def test_an_upcaster_that_edits_in_place_leaves_what_was_read_as_it_was() -> None:
    """The projection keeps an event's stored text beside its payload when no upcaster
    changed it (`payload is` the one read): an upcaster editing in place made the two
    disagree, the fold's proofs showing the old text under the new payload."""
    reg = Registry()

    @reg.register
    class Counted(Event):
        schema_version = 2
        n: int
        unit: str

    @reg.upcaster("Counted", 1)
    def v1_to_v2(p: dict[str, object]) -> dict[str, object]:
        p["unit"] = "trips"
        return p

    read = {"n": 3}
    version, upcast = reg.upcast("Counted", 1, read)
    assert (version, upcast) == (2, {"n": 3, "unit": "trips"}) and upcast is not read
    assert read == {"n": 3}


def test_a_missing_upcaster_is_an_error_not_a_guess() -> None:
    reg = Registry()

    @reg.register
    class Thing(Event):
        schema_version = 2
        n: int

    with pytest.raises(LookupError):
        reg.decode("Thing", 1, {"n": 1})


def test_the_catalogue_exports_json_schema_and_asyncapi() -> None:
    from libs.events.catalogue import asyncapi

    doc = asyncapi()
    schemas = doc["components"]["schemas"]
    assert "VehicleAssigned" in schemas and "SwabResultRecorded" in schemas
    assert "client_event_id" in schemas["TripStepReported"]["properties"]
    assert doc["components"]["messages"]["TripStepReported"]["x-schema-version"] == 1
    assert "TripCompleted" in doc["channels"]["closedloop.transfer"]["messages"]
    assert "ThingHappened" not in schemas  # a test's own contract is not published


def test_the_committed_catalogue_is_current(tmp_path: Path) -> None:
    """docs/events/ is what other teams read: `make catalog` must have been run."""
    from libs.events.catalogue import write

    write(tmp_path)
    committed = Path(__file__).parents[2] / "docs" / "events"
    for name in ("asyncapi.json", "schemas.json"):
        fresh, kept = (tmp_path / name).read_text(), (committed / name).read_text()
        assert fresh == kept, f"docs/events/{name} is stale: run `make catalog`"


_JSONISH = st.recursive(
    st.none() | st.booleans() | st.floats() | st.integers(min_value=-2**70, max_value=2**70)
    | st.text() | st.sampled_from([1e-05, 1.5e-07, 1e+16, 1e-4, 123456789012345678.0, -0.0]),
    lambda inner: st.lists(inner, max_size=4) | st.tuples(inner, inner)
    | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=20)


@settings(max_examples=600, deadline=None)
@given(_JSONISH)
def test_canonical_json_is_the_text_the_stored_hashes_were_computed_over(value: object) -> None:
    """The fast path (orjson) writes exactly what json.dumps writes, or is not taken:
    floats below 1e-4 and NaN, big ints, lone surrogates, every edge. A stored event's
    hash would otherwise no longer verify."""
    assert canonical_json(value) == json.dumps(value, sort_keys=True, separators=(",", ":"),
                                               ensure_ascii=False)


def test_canonical_json_refuses_what_json_refuses() -> None:
    """A datetime is no JSON value: refused as before, not written the way orjson would."""
    with pytest.raises(TypeError):
        canonical_json({"at": datetime(2022, 11, 20, tzinfo=UTC)})
    with pytest.raises(TypeError):
        canonical_json({1: "a key that is not text", "b": 1})
