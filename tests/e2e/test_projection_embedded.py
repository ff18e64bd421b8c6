"""The audit views on the embedded default (SQLite, in-process bus): the audit scenario
checked view by view, rebuild equal to live in both fold orders, and tampering caught."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import func, select, text

from services.projection import queries
from services.projection.rebuild import BUILDING
from services.projection.tables import archive, generation
from services.runtime import create_app
from services.settings import Settings
from tests import scenarios_audit
from tests.actors import Acting
from tests.e2e.invariants import embedded_invariants_hold
from tests.integration.test_verify_unreadable import cancelled, tamper
from tests.scenarios import eventually, ok

API = "/api/v1"


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[FastAPI]:
    app = create_app(settings=Settings(mode="embedded", data_dir=tmp_path))
    async with app.router.lifespan_context(app):
        yield app


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://embedded",
                                 auth=Acting.for_settings(app.state.settings)) as c:
        yield c


async def rebuilt(c: httpx.AsyncClient, order: str) -> dict[str, Any]:
    before = ok(await c.get(f"{API}/audit/rebuild"))["active_generation"]
    assert (await c.post(f"{API}/audit/rebuild", params={"order": order})).status_code == 202

    async def done() -> Any:
        status = ok(await c.get(f"{API}/audit/rebuild"))
        assert status["status"] != "failed", status
        return status if status["status"] == "done" else None

    status = await eventually(done, "the rebuild")
    assert status["active_generation"] == before + 1 == status["report"]["generation"]
    return dict(status)


async def test_one_rebuild_at_a_time_and_a_key_sent_again_starts_none(app: FastAPI,
                                                                      client: httpx.AsyncClient) -> None:
    """Two requests at once: one starts it, the other is told one is running (both were
    started, and the report of the first lost). The started one's Idempotency-Key sent
    again after it finished gets its answer back, and no second rebuild."""
    ok(await client.post(f"{API}/vehicles", json=scenarios_audit.AMBULANCE), 201)
    answers = await asyncio.gather(*(client.post(f"{API}/audit/rebuild", headers={"Idempotency-Key": k})
                                     for k in ("rb-1", "rb-2")))
    assert sorted(a.status_code for a in answers) == [202, 409], [a.text for a in answers]
    started = "rb-1" if answers[0].status_code == 202 else "rb-2"

    async def done() -> Any:
        status = ok(await client.get(f"{API}/audit/rebuild"))
        assert status["status"] != "failed", status
        return status if status["status"] == "done" else None

    status = await eventually(done, "the rebuild")
    again = await client.post(f"{API}/audit/rebuild", headers={"Idempotency-Key": started})
    assert again.status_code == 202 and again.headers.get("idempotent-replayed") == "true", again.text
    after = ok(await client.get(f"{API}/audit/rebuild"))
    assert after["status"] == "done" and after["active_generation"] == status["active_generation"]
    # A client's retry racing its own first request (one key, both at once): the retry gets
    # the first answer back, not "a rebuild is running" (its own).
    twins = await asyncio.gather(*(client.post(f"{API}/audit/rebuild", headers={"Idempotency-Key": "rb-3"})
                                   for _ in range(2)))
    assert [a.status_code for a in twins] == [202, 202], [a.text for a in twins]
    assert sorted(str(a.headers.get("idempotent-replayed")) for a in twins) == ["None", "true"]
    await eventually(done, "the third rebuild")
    # Another replica's request has just claimed one (its task not numbered yet): refused here.
    async with app.state.stores["projection"].engine.begin() as conn:
        await conn.execute(text("INSERT INTO audit_meta (name, value) VALUES (:n, :v)"),
                           {"n": BUILDING, "v": f"claimed@{datetime.now(UTC).isoformat()}"})
    elsewhere = await client.post(f"{API}/audit/rebuild")
    assert elsewhere.status_code == 409 and "starting" in elsewhere.json()["detail"], elsewhere.text


async def test_audit_scenario_views_rebuild_and_tampering(app: FastAPI, client: httpx.AsyncClient,
                                                          tmp_path: Path) -> None:
    ids = await scenarios_audit.run(client)
    await scenarios_audit.check_views(client, ids)
    projection = app.state.stores["projection"]

    # Rebuild equals live: in the order events were applied, and store after store.
    async with projection.engine.connect() as conn:
        live_number = (await queries.current(conn)).number  # type: ignore[union-attr]
        live = await queries.dump(conn, generation(live_number))
    views_before = ok(await client.get(f"{API}/audit/violations"))
    for order in ("seq", "store"):
        status = await rebuilt(client, order)
        async with projection.engine.connect() as conn:
            fresh = await queries.dump(conn, generation(status["active_generation"]))
        assert fresh == live, order
        assert status["report"]["events"] + status["report"]["caught_up"] == sum(
            len(r) for r in [await _archive_count(app)])
    views_after = ok(await client.get(f"{API}/audit/violations"))
    assert [f["id"] for f in views_after["findings"]] == [f["id"] for f in views_before["findings"]]
    await scenarios_audit.check_views(client, ids)  # the views read the rebuilt generation
    await embedded_invariants_hold(tmp_path)  # before the tampering below

    # Tamper evidence: edit one stored event in the dispatch store, and one in the copy.
    dispatch = app.state.stores["dispatch"]
    async with dispatch.engine.begin() as conn:
        row = (await conn.execute(text("SELECT position, payload FROM events WHERE type = 'VehicleAssigned' "
                                       "ORDER BY position LIMIT 1"))).one()
        forged = json.loads(row.payload) | {"vehicle_id": "yn-bus-02"}
        await conn.execute(text("UPDATE events SET payload = :p WHERE position = :n"),
                           {"p": json.dumps(forged, sort_keys=True, ensure_ascii=False), "n": row.position})
    verify = ok(await client.get(f"{API}/audit/verify"))
    assert not verify["ok"]
    brk = verify["chains"]["store:dispatch"]["first_break"]
    assert brk["position"] == row.position and "edited" in brk["reason"], brk
    assert verify["chains"]["copy:dispatch"]["ok"]  # the projection's copy still has the truth
    async with projection.engine.begin() as conn:
        await conn.execute(text("UPDATE audit_archive SET actor = 'someone-else' "
                                "WHERE store = 'transfer' AND position = 3"))
    verify = ok(await client.get(f"{API}/audit/verify"))
    assert verify["chains"]["copy:transfer"]["first_break"]["position"] == 3
    assert verify["chains"]["copy:transfer"]["events"] == 2  # the links before the break hold
    assert verify["own"]["applied"]["ok"] and verify["own"]["store"]["ok"]

    # The transfer store rewritten from its 2nd event on and re-hashed into a whole chain, as
    # a forger with the code would: the store's own check finds nothing; the copy names the
    # first event that is not the one it received.
    stored = await scenarios_audit.rewrite_and_rehash(app.state.stores["transfer"], 2)
    verify = ok(await client.get(f"{API}/audit/verify"))
    scenarios_audit.names_the_rewritten_event(verify["chains"]["store:transfer"], stored, 2)

    # The archive's own columns, which the hash does not cover: a row unlinked from its
    # transfer (gone from the timeline), then two events of one stream swapped in seq (the
    # feed's and the rebuild's order).
    async with projection.engine.begin() as conn:
        a, b = (await conn.execute(text(
            "SELECT seq, position, event_id, transfer_key FROM audit_archive WHERE store = 'dispatch' "
            "AND stream_id = (SELECT stream_id FROM audit_archive WHERE type = 'TransferHandedOver' LIMIT 1) "
            "ORDER BY position DESC LIMIT 2"))).all()
        await conn.execute(text("UPDATE audit_archive SET transfer_key = 'nothing' WHERE seq = :s"),
                           {"s": a.seq})
    brk = ok(await client.get(f"{API}/audit/verify"))["chains"]["copy:dispatch"]["first_break"]
    assert (brk["position"], brk["event_id"]) == (a.position, a.event_id) and "links" in brk["reason"], brk
    async with projection.engine.begin() as conn:
        await conn.execute(text("UPDATE audit_archive SET transfer_key = :k WHERE seq = :s"),
                           {"k": a.transfer_key, "s": a.seq})
        for seq, to in ((a.seq, -1), (b.seq, a.seq), (-1, b.seq)):
            await conn.execute(text("UPDATE audit_archive SET seq = :to WHERE seq = :s"),
                               {"s": seq, "to": to})
    brk = ok(await client.get(f"{API}/audit/verify"))["chains"]["copy:dispatch"]["first_break"]
    assert brk["position"] == a.position and "seq" in brk["reason"], brk

    # The last event of a store deleted from the copy: to its chain that is an event not
    # received yet; the projection's tracking row says it was applied.
    async with projection.engine.begin() as conn:
        last = (await conn.execute(text("SELECT event_id, seq, position FROM audit_archive "
                                        "WHERE store = 'disinfection' ORDER BY position DESC LIMIT 1"))).one()
        await conn.execute(text("DELETE FROM audit_archive WHERE event_id = :e"), {"e": last.event_id})
    verify = ok(await client.get(f"{API}/audit/verify"))
    assert verify["chains"]["copy:disinfection"]["ok"]  # what the chain alone cannot show
    assert verify["own"]["applied"]["first_break"]["event_id"] == last.event_id, verify["own"]
    # Its tracking row deleted too: the hole it left in seq shows (events of other stores
    # were archived after it), and the subscription's checkpoint says it was read.
    async with projection.engine.begin() as conn:
        await conn.execute(text("DELETE FROM tracking WHERE event_id = :e"), {"e": last.event_id})
        newest = (await conn.execute(text("SELECT max(seq) FROM audit_archive"))).scalar_one()
    own = ok(await client.get(f"{API}/audit/verify"))["own"]
    assert own["applied"]["ok"] and last.seq < newest, own
    assert own["archived"]["first_break"]["position"] == last.seq, own
    assert (own["read"]["first_break"]["store"], own["read"]["first_break"]["position"]) == (
        "disinfection", last.position), own

    # The projection's own store (who read patients' data in clear) is verified too.
    acting = client.auth
    assert isinstance(acting, Acting)
    ok(await client.get(f"{API}/audit/ledger", headers=acting.headers("health_bureau")))  # a read in clear
    async with projection.engine.begin() as conn:
        own = (await conn.execute(text("SELECT position FROM events ORDER BY position LIMIT 1"))).one()
        await conn.execute(text("UPDATE events SET actor = 'someone-else' WHERE position = :n"),
                           {"n": own.position})
    verify = ok(await client.get(f"{API}/audit/verify"))
    brk = verify["own"]["store"]["first_break"]
    assert not verify["ok"] and brk["position"] == own.position and "edited" in brk["reason"], verify["own"]


async def _archive_count(app: FastAPI) -> list[int]:
    async with app.state.stores["projection"].engine.connect() as conn:
        n = await conn.scalar(text("SELECT count(*) FROM audit_archive"))
    return [0] * int(n or 0)


class HeldStream:
    """GET /audit/stream held open straight over ASGI (httpx's ASGI transport hands a body
    over only once it has ended): its chunks as the app sends them, until disconnected."""

    def __init__(self, app: FastAPI, headers: dict[str, str], query: str) -> None:
        self.chunks: list[str] = []
        self.gone = asyncio.Event()
        path = f"{API}/audit/stream"
        self.scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
                      "scheme": "http", "path": path, "raw_path": path.encode(),
                      "query_string": query.encode(), "root_path": "", "server": ("embedded", 80),
                      "client": ("127.0.0.1", 1),
                      "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}
        self.task = asyncio.create_task(app(self.scope, self._receive, self._send))
        self._asked = False

    async def _receive(self) -> dict[str, Any]:
        if not self._asked:
            self._asked = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def _send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and message.get("body"):
            self.chunks.append(message["body"].decode())

    @property
    def text(self) -> str:
        return "".join(self.chunks)

    async def close(self) -> None:
        self.gone.set()
        await asyncio.wait_for(self.task, 10)


async def test_a_console_holding_the_stream_sees_what_happens_after_it_connected(
        app: FastAPI, client: httpx.AsyncClient) -> None:
    """Held open from now: nothing of before, then the vehicle registered after connecting,
    live; a reconnect's Last-Event-ID wins over the URL's `after`. A console that drops
    before any event came resumes from the id the stream opened with, not from now."""
    ok(await client.post(f"{API}/vehicles", json=scenarios_audit.AMBULANCE), 201)

    async def archived() -> bool:
        feed = await client.get(f"{API}/audit/stream", params={"follow": "false"})
        return scenarios_audit.AMBULANCE["id"] in feed.text
    await eventually(archived, "the first vehicle on the feed")
    acting = client.auth
    assert isinstance(acting, Acting)
    held = HeldStream(app, acting.headers("dispatcher"), "from_now=true&heartbeat=0.5")
    try:
        await eventually(lambda: _true(held.text.startswith("retry:")), "the stream to open")
        opened_at = int(held.text.split("\n\n")[0].split("id: ")[1])
        second = {**scenarios_audit.AMBULANCE, "id": "nx-held-2", "plate": "宁A·H0002"}
        ok(await client.post(f"{API}/vehicles", json=second), 201)
        await eventually(lambda: _true("nx-held-2" in held.text), "the new event on the held stream")
        await eventually(lambda: _true(": keep-alive" in held.text), "a keep-alive while idle")
        assert scenarios_audit.AMBULANCE["id"] not in held.text  # registered before it connected
    finally:
        await held.close()

    def events(text: str) -> list[int]:
        return [int(f.split("\n")[0][4:]) for f in text.split("\n\n") if "\nevent: " in f]

    first = events(held.text)[0]
    resumed = await client.get(f"{API}/audit/stream", params={"follow": "false", "after": 0},
                               headers={"Last-Event-ID": str(first - 1)})
    assert events(resumed.text)[0] == first
    # Dropped before its first event: the EventSource sends the opening id back, and the
    # event that came meanwhile is delivered (the URL still says from_now).
    reconnected = await client.get(f"{API}/audit/stream", params={"follow": "false", "from_now": "true"},
                                   headers={**acting.headers("dispatcher"), "Last-Event-ID": str(opened_at)})
    assert "nx-held-2" in reconnected.text
    # A polyfill that sends its last event id in the query (and jQuery's cache-buster `_`):
    # the same resumption; the header, when both come, wins.
    polyfilled = await client.get(f"{API}/audit/stream", params={
        "follow": "false", "from_now": "true", "lastEventId": str(opened_at), "_": "1764000000000"},
        headers=acting.headers("dispatcher"))
    assert polyfilled.status_code == 200 and events(polyfilled.text) == events(reconnected.text)
    both = await client.get(f"{API}/audit/stream", params={"follow": "false", "lastEventId": "0"},
                            headers={"Last-Event-ID": str(first - 1)})
    assert events(both.text)[0] == first
    # An id past the newest event (a console that saw a database since restored): it
    # resumes at the newest and gets what comes next, not nothing until the order catches up.
    beyond = await client.get(f"{API}/audit/stream", params={"follow": "false"},
                              headers={**acting.headers("dispatcher"), "Last-Event-ID": str(10**9)})
    newest = int(beyond.text.split("\n\n")[0].split("id: ")[1])
    assert beyond.status_code == 200 and newest < 10**9 and not events(beyond.text)
    third = {**scenarios_audit.AMBULANCE, "id": "nx-held-3", "plate": "宁A·H0003"}
    ok(await client.post(f"{API}/vehicles", json=third), 201)

    async def resumed_beyond() -> bool:
        again = await client.get(f"{API}/audit/stream", params={"follow": "false"},
                                 headers={**acting.headers("dispatcher"), "Last-Event-ID": str(newest)})
        return "nx-held-3" in again.text
    await eventually(resumed_beyond, "the next event after a resumption past the end")
    # Idle, it still says how far it read.
    idle = [f for f in held.text.split("\n\n") if f][-1]
    assert idle.startswith(": keep-alive\nid: ") and int(idle.split("id: ")[1]) >= events(held.text)[-1]


async def _true(value: bool) -> bool:
    return value


async def test_the_stream_keeps_reads_in_clear_for_those_who_may_read_them(client: httpx.AsyncClient) -> None:
    """A dispatcher's read of a transfer in clear is recorded (by dispatch, archived here):
    on the auditor's feed, not on a dispatcher's; and a registration names no transfer."""
    acting = client.auth
    assert isinstance(acting, Acting)
    await scenarios_audit.load_reference_data(client)
    ok(await client.post(f"{API}/vehicles", json=scenarios_audit.AMBULANCE), 201)
    transfer = ok(await client.post(f"{API}/transfers", json=scenarios_audit.TRANSFER), 201)
    ok(await client.get(f"{API}/transfers/{transfer['id']}", headers=acting.headers("dispatcher")))

    async def feed(role: str) -> str:
        return (await client.get(f"{API}/audit/stream", params={"follow": "false"},
                                 headers=acting.headers(role))).text

    await eventually(lambda: _in("PatientDataDisclosed", feed("auditor")), "the disclosure on the feed")
    dispatcher = await feed("dispatcher")
    assert "VehicleRegistered" in dispatcher and "PatientDataDisclosed" not in dispatcher
    frame = next(f for f in dispatcher.split("\n\n") if "event: VehicleRegistered" in f)
    assert json.loads(frame.split("data: ", 1)[1])["transfer_id"] is None


async def _in(needle: str, text: Any) -> bool:
    return needle in await text


async def test_a_rebuild_ending_while_its_status_is_read_is_not_done_beside_the_old_generation(
        app: FastAPI, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """The status reads the active generation and then asks whether the rebuild ended: a
    rebuild that switched in between was reported done beside the generation it replaced
    (a CI run caught it). Here it ends exactly while the generation is read."""
    switched = asyncio.Event()

    class Report:
        def view(self) -> dict[str, Any]:
            return {"generation": 2}

    async def rebuild_switching() -> Report:
        await switched.wait()
        return Report()

    read = queries.current
    seen: list[Any] = []

    async def current_while_it_ends(conn: Any) -> Any:
        gen = await read(conn)  # the switch has not committed yet
        seen.append(gen.number if gen else None)
        switched.set()
        await asyncio.sleep(0.01)  # the rebuild ends now
        return gen

    app.state.projection_rebuild = asyncio.create_task(rebuild_switching())
    monkeypatch.setattr(queries, "current", current_while_it_ends)
    status = ok(await client.get(f"{API}/audit/rebuild"))
    assert app.state.projection_rebuild.done()
    assert status == {"active_generation": seen[0], "status": "running"}


async def test_a_rebuild_elsewhere_is_refused_up_front_and_a_dead_ones_marker_can_be_taken_over(
        app: FastAPI, client: httpx.AsyncClient) -> None:
    """The command (or another process) is building: 409 at once, not a 202 that fails
    later. An admin may take over the marker of one that died (force)."""
    from libs.events.envelope import iso, utcnow
    from services.projection.rebuild import BUILDING
    from services.projection.tables import set_meta

    ok(await client.post(f"{API}/vehicles", json=scenarios_audit.AMBULANCE), 201)
    before = await eventually(lambda: _generation(client), "a live generation")
    async with app.state.stores["projection"].engine.begin() as conn:
        await set_meta(conn, BUILDING, f"{before + 1}@{iso(utcnow())}")
    refused = await client.post(f"{API}/audit/rebuild")
    assert refused.status_code == 409 and refused.json()["code"] == "rebuild_running", refused.text
    assert ok(await client.get(f"{API}/audit/rebuild"))["status"] == "idle"
    assert (await client.post(f"{API}/audit/rebuild", params={"force": "true"})).status_code == 202

    async def done() -> Any:
        status = ok(await client.get(f"{API}/audit/rebuild"))
        assert status["status"] != "failed", status
        return status if status["status"] == "done" else None

    assert (await eventually(done, "the forced rebuild"))["active_generation"] > before


async def _generation(client: httpx.AsyncClient) -> int | None:
    number: int | None = ok(await client.get(f"{API}/audit/rebuild"))["active_generation"]
    return number


async def test_the_route_names_unreadable_rows_and_a_store_no_service_owns(
        app: FastAPI, client: httpx.AsyncClient) -> None:
    """The dispatch store's 3rd and last events unreadable, the copy's 5th, and the copy's
    6th moved to a store named zzz: a 200 that names each, and reports every other store."""
    dispatch, projection = app.state.stores["dispatch"], app.state.stores["projection"]
    await cancelled(dispatch, 8)

    async def archived() -> bool:
        async with projection.engine.connect() as conn:
            return int(await conn.scalar(select(func.count()).select_from(archive)
                                         .where(archive.c.store == "dispatch")) or 0) == 8

    await eventually(archived, "the projection's copy of the dispatch store")
    assert ok(await client.get(f"{API}/audit/verify"))["ok"]
    await tamper(dispatch, "events", "", "payload = '{not json'", 3)
    await tamper(dispatch, "events", "", "payload = '{not json'", 8)  # the head: its link is still read
    await tamper(projection, "audit_archive", "store = 'dispatch' AND", "payload = '[1]'", 5)
    await tamper(projection, "audit_archive", "store = 'dispatch' AND", "store = 'zzz'", 6)

    verify = ok(await client.get(f"{API}/audit/verify"))
    chains: dict[str, Any] = verify["chains"]
    assert not verify["ok"]
    store = chains["store:dispatch"]
    assert not store["ok"] and store["first_break"]["position"] == 3, store
    assert store["first_break"]["reason"].startswith("unreadable: payload is not JSON"), store
    copy = chains["copy:dispatch"]
    assert (copy["ok"], copy["events"], copy["first_break"]["position"]) == (False, 4, 5), copy
    assert copy["first_break"]["reason"].startswith("unreadable: payload"), copy
    unowned = chains["store:zzz"]
    assert not unowned["ok"] and unowned["error"] == "no service owns store zzz", unowned
    assert not chains["copy:zzz"]["ok"]  # its only event is at 6: 1 to 5 missing
    for name in ("transfer", "disinfection"):
        assert chains[f"copy:{name}"]["ok"] and chains[f"store:{name}"]["ok"], chains
    assert verify["own"]["store"]["ok"], verify["own"]
