"""Issue 8, bad input: schemathesis against every operation of the OpenAPI document of the
embedded app (all four services), each case sent as a caller the operation grants, so the
cases reach the handlers and not only the guard. Every check schemathesis has but one: no
5xx; responses, status codes, media types, headers and a 405's Allow as documented; data
that breaks the schema refused; a case without its token or a required header refused;
no use after delete, no object of another caller. Not positive_data_acceptance (below).

The world is seeded first (reference data, a finished trip whose swab came back positive
with its exposure list, an open trip, a queued transfer, a care series); schemathesis then
starts the app again on the same data dir (once per operation: its plugin ends the
lifespan after each test). Half of the generated cases name seeded ids, so commands run
against real aggregates and not only into 404s.

Bounded and deterministic: a fixed seed, derandomized, a few examples per operation. A
failure prints schemathesis' report with the request as curl (the token filtered out: the
note under it names the role it was sent as); rerun one operation with
`uv run pytest tests/e2e/test_schemathesis.py -k 'POST and trips and steps'`.
"""

from __future__ import annotations

import asyncio
import atexit
import shutil
import sqlite3
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import strategies as st
from schemathesis.config import SchemathesisConfig
from schemathesis.core.failures import FailureGroup
from schemathesis.python import asgi

from libs.auth.policy import API_PREFIX
from libs.auth.tokens import SCOPE_CLAIMS
from services.runtime import create_app
from services.settings import Settings
from tests.actors import Acting, access_rules
from tests.conftest import take_write_lock
from tests.scenarios import (
    API,
    INITIAL,
    RESULT,
    SWAB,
    TERMINAL,
    TRANSFER,
    drive_to_handover,
    load_reference_data,
    ok,
    open_cycle,
    patient,
    trip_of,
)
from tests.scenarios_trip import SECOND_NPA, steps

CONFIG = SchemathesisConfig.from_dict({
    "seed": 20221120,
    "generation": {"max-examples": 6, "deterministic": True, "database": "none"},
    "request-timeout": 10,  # /audit/stream follows forever: cut after the events it has
    # Schema-valid is not always valid here: a resident id's check digit, a date that exists,
    # a stage above its protocol's minimum, a time not ahead of the server are a 422 naming
    # the field by design (house rules), and no JSON Schema can say them all.
    "checks": {"positive_data_acceptance": {"enabled": False}},
})

# The document is read at import (the plugin makes one test per operation from it); the
# app's lifespan starts with the first case, after `world` has seeded its data dir.
DATA_DIR = Path(tempfile.mkdtemp(prefix="closedloop-schemathesis-"))
atexit.register(shutil.rmtree, DATA_DIR, True)  # also when collected and not run
APP = create_app(settings=Settings(mode="embedded", data_dir=DATA_DIR, write_burst=1_000_000,
                                   write_rate_per_s=1_000_000))
schema = schemathesis.openapi.from_dict(APP.openapi(), config=CONFIG)
schema.app = APP
ACTING = Acting.for_settings(APP.state.settings)
RULES = access_rules()
IDS: dict[str, list[str]] = {}  # path parameter -> ids that exist
TRIPS: dict[str, dict[str, Any]] = {}  # trip id -> the trip (for the crew's vehicle, the hospital)


async def seed_world(data_dir: Path) -> None:
    """Every kind of path id, existing, in states where most commands mean something."""
    app = create_app(settings=(settings := Settings(mode="embedded", data_dir=data_dir)))
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://seed",
            auth=Acting.for_settings(settings)) as c:
        await load_reference_data(c)
        done = ok(await c.post(f"{API}/transfers", json=TRANSFER), 201)
        done_trip = await trip_of(c, "nx-120-07", done["id"])
        await drive_to_handover(c, done_trip["id"], "seed")
        cycle = await open_cycle(c, "nx-120-07")
        for body in (INITIAL, TERMINAL):
            ok(await c.post(f"{API}/disinfection/cycles/{cycle['id']}/stages", json=body), 201)
        ok(await c.post(f"{API}/disinfection/cycles/{cycle['id']}/swabs", json=SWAB), 201)
        ok(await c.post(f"{API}/disinfection/swabs/{SWAB['sample_id']}/result",
                        json={**RESULT, "result": "positive"}))
        ok(await c.post(f"{API}/vehicles", json=SECOND_NPA), 201)
        riding = ok(await c.post(f"{API}/transfers", json=patient(2)), 201)
        open_trip = await trip_of(c, SECOND_NPA["id"], riding["id"])
        await steps(c, open_trip["id"], "open", ["acknowledged", "en_route"])
        queued = ok(await c.post(f"{API}/transfers", json=patient(3)), 201)
        series = ok(await c.post(f"{API}/care-series", json={
            "transfer": {**patient(4), "purpose": "scheduled_care"}, "weekdays": [1, 3, 5],
            "time": "08:30", "starts_on": "2030-01-07"}), 201)
        cycles = ok(await c.get(f"{API}/disinfection/cycles", params={"vehicle_id": "nx-120-07"}))
    IDS.update({
        "transfer_id": [done["id"], riding["id"], queued["id"]],
        "trip_id": [done_trip["id"], open_trip["id"]],
        "vehicle_id": ["nx-120-07", "yn-bus-02", SECOND_NPA["id"]],
        "facility_id": ["yc-first", "yc-second", "nx-cardio"],
        "cycle_id": [x["id"] for x in cycles],
        "sample_id": [SWAB["sample_id"]],
        "series_id": [series["id"]],
    })
    TRIPS.update({t["id"]: t for t in (done_trip, open_trip)})


def no_store_left_locked(data_dir: Path) -> None:
    """The seeding app has stopped: none of its writes may still hold a store (one left
    write-locked made every later write to it wait 30 s: the ledger's disclosure timed out)."""
    for db in sorted(data_dir.glob("*.db")):
        try:
            take_write_lock(db, timeout=5)
        except sqlite3.OperationalError as e:
            raise AssertionError(f"{db.name} is still write-locked after the seeding app stopped") from e


@pytest.fixture(scope="module", autouse=True)
def world() -> Iterator[None]:
    asyncio.run(seed_world(DATA_DIR))
    no_store_left_locked(DATA_DIR)
    yield
    asgi.shutdown_lifespans()


@schema.hook
def flatmap_path_parameters(context: Any, path_parameters: dict[str, Any] | None) -> Any:
    """Half the cases name seeded ids, so the handlers run and not only the 404."""
    generated = path_parameters or {}
    known = {k: IDS[k] for k in generated if k in IDS}
    if not known:
        return st.just(path_parameters)
    seeded = {**{k: st.just(v) for k, v in generated.items()},
              **{k: st.sampled_from(v) for k, v in known.items()}}
    return st.one_of(st.just(path_parameters), st.fixed_dictionaries(seeded))


def caller(case: Any) -> tuple[str, dict[str, str]]:
    """A role the operation grants, unbound if one is; a bound role is bound to what the case
    acts on (the vehicle or facility in the path, the trip's vehicle or destination)."""
    grants = RULES.get(f"{case.method.upper()} {case.path.removeprefix(API_PREFIX)}")
    if grants is None:  # the ops routes, open to all
        return "auditor", {}
    free = next((g for g in grants if g.within is None), None)
    if free is not None:
        return free.role, {}
    role = grants[0].role
    params = case.path_parameters or {}
    trip = TRIPS.get(str(params.get("trip_id")), {})
    claim = SCOPE_CLAIMS[role]
    value = {"vehicle_id": params.get("vehicle_id") or trip.get("vehicle_id") or "nx-120-07",
             "facility_id": params.get("facility_id") or trip.get("destination_id") or "yc-second",
             "site_id": "yn-isolation-01"}[claim]
    return role, {claim: str(value)}


@schema.auth.auth(refresh_interval=None)  # a token per case: the role depends on the operation
class Bearer:
    def get(self, case: Any, context: Any) -> str:
        role, scope = caller(case)
        return ACTING.token(role, **scope)

    def set(self, case: Any, data: str, context: Any) -> None:
        case.headers = {**(case.headers or {}), "Authorization": f"Bearer {data}"}


@schema.parametrize()
def test_every_operation(case: Any) -> None:
    try:
        case.call_and_validate()
    except FailureGroup as failure:
        role, scope = caller(case)
        failure.add_note(f"sent as {role} {scope or ''} (seed 20221120, ids {IDS})")
        raise


def test_the_live_feed_is_the_stream_its_document_describes() -> None:
    """Ended streams, one with events and one past the last (nothing but `retry`), checked
    by schemathesis against the document: generated cases found the empty one refused
    when the document still said `type: string` for the whole stream."""
    operation = schema[f"{API_PREFIX}/audit/stream"]["GET"]

    async def fetch() -> list[httpx.Response]:
        app = create_app(settings=(settings := Settings(mode="embedded", data_dir=DATA_DIR)))
        async with app.router.lifespan_context(app), httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://feed",
                auth=Acting.for_settings(settings)) as c:
            for _ in range(100):  # the embedded projection may still be taking the world in
                full = await c.get(f"{API}/audit/stream", params={"follow": "false"})
                if full.text.count("\nevent: ") > 10:
                    break
                await asyncio.sleep(0.1)
            return [full, await c.get(f"{API}/audit/stream", params={"follow": "false", "after": 10**9})]

    with_events, empty = asyncio.run(fetch())
    assert with_events.text.count("\nevent: ") > 10
    # Past the newest event: nothing to send, and it resumes after the newest.
    newest = int(empty.text.removeprefix("retry: 2000\nid: ").removesuffix("\n\n"))
    assert empty.text == f"retry: 2000\nid: {newest}\n\n" and 0 < newest < 10**9
    for resp in (with_events, empty):
        operation.validate_response(resp)
