"""Tokens, masking and the write limiter: the pure parts of issue 7."""

from __future__ import annotations

import base64
import json
import random
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from libs.auth import privacy, tokens
from libs.auth.issuer import LocalIssuer
from libs.auth.tokens import KeySet, Principal, TokenVerifier, Unauthenticated
from libs.web.limits import RateLimiter, TooManyRequests


@pytest.fixture
def issuer(tmp_path: Path) -> LocalIssuer:
    return LocalIssuer(tmp_path / "auth" / "key.pem", "closedloop-local", "closedloop")


def verifier(issuer: LocalIssuer) -> TokenVerifier:
    return TokenVerifier("closedloop-local", "closedloop", KeySet(issuer.jwks()))


async def test_a_good_token_names_subject_role_and_binding(issuer: LocalIssuer) -> None:
    token = issuer.issue("crew-li", "crew", vehicle_id="nx-120-07")
    who = await verifier(issuer).verify(token)
    assert who == Principal(subject="crew-li", role="crew", vehicle_id="nx-120-07")
    assert who.scope == "vehicle_id=nx-120-07"


def _b64(data: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def _defects(issuer: LocalIssuer) -> dict[str, str]:
    now = int(time.time())
    good = issuer.issue("d1", "dispatcher")
    head, body, sig = good.split(".")
    claims = jwt.decode(good, options={"verify_signature": False})
    other = LocalIssuer.__new__(LocalIssuer)
    other.key, other.kid = Ed25519PrivateKey.generate(), issuer.kid  # same kid, wrong key
    other.issuer, other.audience = issuer.issuer, issuer.audience
    return {
        "token_expired": issuer.issue("d1", "dispatcher", ttl_s=60, now=now - 3600),
        "token_not_yet_valid": issuer.issue("d1", "dispatcher", now=now + 3600),
        "token_wrong_audience": jwt.encode({**claims, "aud": "another-system"}, issuer.key,
                                           algorithm="EdDSA", headers={"kid": issuer.kid}),
        "token_wrong_issuer": jwt.encode({**claims, "iss": "https://evil.example"}, issuer.key,
                                         algorithm="EdDSA", headers={"kid": issuer.kid}),
        "token_algorithm_refused": f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{body}.",
        "token_signature_invalid": f"{head}.{_b64({**claims, 'role': 'supervisor'})}.{sig}",
        "token_signature_invalid ": other.issue("d1", "dispatcher"),
        "token_algorithm_refused ": jwt.encode(claims, "a-shared-secret-of-32-bytes-long!",
                                               algorithm="HS256", headers={"kid": issuer.kid}),
        "token_malformed": "not-a-jwt",
        "token_role_unknown": jwt.encode({**claims, "role": "root"}, issuer.key,
                                         algorithm="EdDSA", headers={"kid": issuer.kid}),
        "token_scope_missing": jwt.encode({**claims, "role": "crew"}, issuer.key,
                                          algorithm="EdDSA", headers={"kid": issuer.kid}),
        "token_key_unknown": jwt.encode(claims, issuer.key, algorithm="EdDSA",
                                        headers={"kid": "rotated-away"}),
    }


async def test_every_token_defect_is_refused_with_its_own_code(issuer: LocalIssuer) -> None:
    check = verifier(issuer)
    await check.verify(issuer.issue("d1", "dispatcher"))  # a remembered good token changes nothing
    for expected, token in _defects(issuer).items():
        with pytest.raises(Unauthenticated) as refused:
            await check.verify(token)
        assert refused.value.code == expected.strip(), (expected, refused.value.detail)


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def _remembering(issuer: LocalIssuer) -> tuple[TokenVerifier, Clock]:
    clock = Clock()
    return TokenVerifier("closedloop-local", "closedloop", KeySet(issuer.jwks()), clock), clock


def _withdraw_keys(check: TokenVerifier, tmp_path: Path) -> None:
    """The issuer's keys replaced by another's: a token checked again is refused."""
    check.keys = KeySet(LocalIssuer(tmp_path / "other.pem", "closedloop-local", "closedloop").jwks())


async def _refused(check: TokenVerifier, token: str) -> bool:
    try:
        await check.verify(token)
    except Unauthenticated:
        return True
    return False


async def test_a_verified_token_is_remembered_at_most_a_minute(issuer: LocalIssuer,
                                                               tmp_path: Path) -> None:
    check, clock = _remembering(issuer)
    token = issuer.issue("d1", "dispatcher")
    who = await check.verify(token)
    _withdraw_keys(check, tmp_path)
    clock.now += tokens.REMEMBER_S - 1
    assert await check.verify(token) is who  # not checked again
    assert await _refused(check, issuer.issue("d2", "dispatcher"))  # a new token is
    clock.now += 2
    assert await _refused(check, token)  # past the minute: checked again, and refused


async def test_a_remembered_token_lasts_no_longer_than_its_expiry(issuer: LocalIssuer,
                                                                  tmp_path: Path) -> None:
    check, clock = _remembering(issuer)
    expires = int(clock.now) + 5
    token = issuer.issue("d1", "dispatcher", ttl_s=5, now=expires - 5)
    await check.verify(token)
    _withdraw_keys(check, tmp_path)
    clock.now = expires + tokens.LEEWAY_S - 1
    assert not await _refused(check, token)
    clock.now = expires + tokens.LEEWAY_S + 1  # the token's own end (with the leeway decode allows)
    assert await _refused(check, token)


async def test_a_refused_token_is_not_remembered(issuer: LocalIssuer, tmp_path: Path) -> None:
    check, _ = _remembering(issuer)
    good = check.keys
    _withdraw_keys(check, tmp_path)
    token = issuer.issue("d1", "dispatcher")
    assert await _refused(check, token)
    check.keys = good
    assert not await _refused(check, token)


async def test_the_remembered_tokens_are_bounded_oldest_out(issuer: LocalIssuer, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tokens, "REMEMBERED", 3)
    check, _ = _remembering(issuer)
    issued = [issuer.issue(f"d{i}", "dispatcher") for i in range(4)]
    for token in issued:
        await check.verify(token)
    _withdraw_keys(check, tmp_path)
    assert [await _refused(check, t) for t in issued] == [True, False, False, False]


def test_the_key_is_kept_so_a_restart_verifies_old_tokens(tmp_path: Path) -> None:
    first = LocalIssuer(tmp_path / "k.pem", "i", "a")
    again = LocalIssuer(tmp_path / "k.pem", "i", "a")
    assert first.jwks() == again.jwks()
    assert (tmp_path / "k.pem").stat().st_mode & 0o077 == 0  # private to its owner


def test_masking_reaches_nested_views_and_free_text() -> None:
    assert privacy.mask_id_number("640121198001011231") == "6401**********1231"
    assert privacy.mask_phone("13800138000") == "138****8000"
    view = {"patient": {"id_number": "640121198001011231", "phone": "13800138000"},
            "note": "家属电话13800138000，身份证640121198001011231",
            "hash": "a13800138000b" + "0" * 51}
    masked = privacy.mask(view)
    assert masked["patient"] == {"id_number": "6401**********1231", "phone": "138****8000"}
    assert masked["note"] == "家属电话138****8000，身份证6401**********1231"
    assert masked["hash"] == view["hash"]
    assert privacy.mask(masked) == masked  # masking twice changes nothing


def test_numbers_typed_as_people_write_them_are_masked_in_free_text() -> None:
    """A reason or a place typed by hand: +86, spaces and dashes, landlines, old 15-digit
    ids; identifiers (an event id, a hash, a plate, a time, a coordinate) are left alone."""
    cases = {
        "回拨+8613912345678或139-1234-5678": "回拨+86139****5678或139-****-5678",
        "家属电话+86 139 1234 5678 / 0951-7654321": "家属电话+86 139 **** 5678 / 095*-***4321",
        "旧证640121800101123，联系人 138 0013 8000。": "旧证6401*******1123，联系人 138 **** 8000。",
        "event 72bc70d5-3e4b-49a6-817e-139123456789 at 2026-11-23T16:27:00+08:00, 宁A13912":
            "event 72bc70d5-3e4b-49a6-817e-139123456789 at 2026-11-23T16:27:00+08:00, 宁A13912",
        "38.123456789012345, 106.1": "38.123456789012345, 106.1",
        # A UUID whose last group is all digits: a landline's shape, but an id.
        "cycle 40b09cdb-7a3c-55a8-bb4d-075123452105 does not exist, 0951-7654321":
            "cycle 40b09cdb-7a3c-55a8-bb4d-075123452105 does not exist, 095*-***4321",
        # (a word that is not hex, dashed onto the number, does not hide it)
        "trip 9e0c2d1a-0000-4000-8000-139123456780, v-640121198001011231":
            "trip 9e0c2d1a-0000-4000-8000-139123456780, v-6401**********1231",
        # A UUID whose first two groups are a landline's two-group shape (a simulated day's
        # cycle was listed as 061*****-8217-..., and its stages were refused 404).
        "cycle 06123456-8217-5bad-b6e3-461268e2e950 does not exist, 0951-501-2345-":
            "cycle 06123456-8217-5bad-b6e3-461268e2e950 does not exist, 095*-***-2345-",
        # ... but a number dashed onto a bed, an extension or another number is masked.
        "联系电话13912345678-2，0951-5012345-8，身份证640121198001011231-1，Tel13912345678-2":
            "联系电话139****5678-2，095*-***2345-8，身份证6401**********1231-1，Tel139****5678-2",
        "13912345678-13812345678，13912345678－2": "139****5678-138****5678，139****5678－2",
        "/cycles/06123456-8217-5bad-b6e3-461268e2e950/stages":
            "/cycles/06123456-8217-5bad-b6e3-461268e2e950/stages",
        # Glued to a word that says what it is: masked all the same.
        "Tel13912345678, tel.139-1234-5678, Mobile+8613912345678, ID No.640121198001011231":
            "Tel139****5678, tel.139-****-5678, Mobile+86139****5678, ID No.6401**********1231",
        "callback TEL0951-7654321, idno64012119800101123x, 身份证ID640121800101123":
            "callback TEL095*-***4321, idno6401**********123x, 身份证ID6401*******1123",
        # Full width, as a Chinese input method types them; an id in its 6-8-4 groups.
        "联系人电话１３９１２３４５６７８，身份证６４０１２１１９８００１０１１２３１":
            "联系人电话１３９****５６７８，身份证６４０１**********１２３１",
        "证件 640121 19800101 1231 / 640121-19800101-123X，ＴＥＬ１３９１２３４５６７８":
            "证件 6401** ******** 1231 / 6401**-********-123X，ＴＥＬ１３９****５６７８",
        # Area codes in brackets (ASCII or full width), a local number in two groups, 0086,
        # and dashes of every kind between a mobile's groups.
        "家属电话（0951）5012345 / 0086-13912345678 / (0951)501 2345 / 0951 501 2345":
            "家属电话（095*）***2345 / 0086-139****5678 / (095*)*** 2345 / 095* *** 2345",
        "联系138—0013—8000或138–0013–8000，座机（０９５１）５０１２３４５":
            "联系138—****—8000或138–****–8000，座机（０９５*）***２３４５",
        # Times written as HHMM are no landline (a local number begins with 2-8).
        "时段 0800-1200 1300-1700，班次 0730 0800 1600 1630，20221120 0930 1030 1130":
            "时段 0800-1200 1300-1700，班次 0730 0800 1600 1630，20221120 0930 1030 1130",
        # A hex word (a hash's tail) keeps its digits; any other word glued on does not.
        "v13912345678 ab13912345678 f13912345678 RTel13912345678":
            "v139****5678 ab13912345678 f13912345678 RTel139****5678",
    }
    for typed, shown in cases.items():
        assert privacy.mask_text(typed) == shown, typed
        assert privacy.mask_text(shown) == shown  # masking twice changes nothing
    digits = "139123456789012345678"
    view = {"event_id": digits[:15], "hash": digits, "note": digits[:15]}
    assert privacy.mask(view) == {"event_id": digits[:15], "hash": digits, "note": "1391*******9012"}


def test_a_number_typed_right_after_a_word_or_a_separator_is_masked() -> None:
    """A name, a title or a label glued to the number, or a '.' or '-' between them, is no
    identifier: the number is masked in every view (a handover's receiver was listed as
    Dr.Li13912345678 in the timeline, the ledger and its CSV and XLSX)."""
    cases = {
        "Dr.Li13912345678": "Dr.Li139****5678",
        "Mr.Wang13800138000": "Mr.Wang138****8000",
        "patientId640121198001011231": "patientId6401**********1231",
        "Zhangsan640121198001011231": "Zhangsan6401**********1231",
        "QQ13800138000": "QQ138****8000",
        "电话.13800138000": "电话.138****8000",
        "call-13800138000": "call-138****8000",
        "v-13800138000, Ed13800138000": "v-138****8000, Ed138****8000",  # Ed: hex letters, two cases
        "患者.640121198001011231，Li-64012119800101123X": "患者.6401**********1231，Li-6401**********123X",
        "cafe6401211980010112X3": "cafe6401211980010112X3",  # 22 characters: no id
        "abc64012119800101123X": "abc6401**********123X",  # an X is no hex
        "Tel:+8613912345678 Mobile+86 139 1234 5678": "Tel:+86139****5678 Mobile+86 139 **** 5678",
    }
    for typed, shown in cases.items():
        assert privacy.mask_text(typed) == shown, typed
        assert privacy.mask_text(shown) == shown  # masking twice changes nothing
    view = {"transfer_id": "t5", "handover": {"received_by": "Dr.Li13912345678"}}
    assert privacy.mask(view) == {"transfer_id": "t5", "handover": {"received_by": "Dr.Li139****5678"}}


def test_an_id_number_in_groups_of_four_is_masked() -> None:
    cases = {
        "6401 2119 8001 0112 31": "6401 **** **** **12 31",
        "证件6401-2119-8001-0112-3X。": "证件6401-****-****-**12-3X。",
        "ID 6401 2119 8001 0112 31 / ６４０１ ２１１９ ８００１ ０１１２ ３１":
            "ID 6401 **** **** **12 31 / ６４０１ **** **** **１２ ３１",
    }
    for typed, shown in cases.items():
        assert privacy.mask_text(typed) == shown, typed
        assert privacy.mask_text(shown) == shown
    # A card number in groups of four is longer, a date and times are not of this shape.
    for kept in ("6222 6212 3456 7890 123", "6222 6212 3456 7890", "0800 1200 1300 1700 30 min",
                 "1200 1300 1400 1500 16", "2022 1120 0930 1030 11"):
        assert privacy.mask_text(kept) == kept, kept


def test_hex_tokens_and_numbers_that_are_no_personal_number_stay_unmasked() -> None:
    """Only a word all of hex digits (one case), as a digest or a UUID's group is written,
    keeps a number glued to it; the rest of what is no phone or id stays as typed."""
    hashes = ["9f" * 20 + "c" + "640121198001011231" + "aaaaa", "3b" * 26 + "e13912345678",
              "4" * 45 + "d640121198001011231", "0" * 40 + "c13912345678" + "0" * 12]
    assert all(len(h) == 64 for h in hashes)
    hashes += [h.upper() for h in hashes]
    kept = [*hashes,
            "72bc70d5-3e4b-49a6-817e-139123456789", "disclosure-06123456-8217-5bad-b6e3-461268e2e950",
            "817e-13912345678 a-640121198001011231 f13912345678 ab13912345678",
            "at 2022-11-20T08:00:00+08:00 to 2022-11-20T09:30:00.123456+08:00, 20221120T0950",
            "position 13, seq 139123, stream_position 4012, version 64012",
            "宁A12345 宁A13912 京B6401",
            "38.27, 106.13912345678, 38.123456789012345, 106.640121198001011231",
            "PT15M, 900 s, 1500 ms, 45 min, 139 秒",
            "139123456789 and 6401211980010112312, 1391234567890123",
            "nvr://yc2/wash/cam-03/20221120T0950", "yc-amb-03, cam-1, lk-12"]
    for text in kept:
        assert privacy.mask_text(text) == text, text
    view = {"note": hashes[1], "event": {"ref": "817e-13912345678"}}
    assert privacy.mask(view) == view
    assert privacy.patients_in(view) == []


def test_a_disclosure_counts_numbers_masked_after_a_word() -> None:
    view = {"transfer_id": "t5", "handover": {"received_by": "Dr.Li13912345678"},
            "entries": [{"why": "call-13800138000 or patientId640121198001011231"},
                        {"why": "6401 2119 8001 0112 31"}, {"why": "f13912345678"}]}
    assert privacy.patients_in(view) == [
        {"transfer_id": "t5", "field": "received_by", "in_text": "Dr.Li139****5678"},
        {"transfer_id": "t5", "field": "why", "in_text": "call-138****8000 or patientId6401**********1231"},
        {"transfer_id": "t5", "field": "why", "in_text": "6401 **** **** **12 31"}]


def test_an_identifier_glued_to_letters_is_kept_and_a_personal_number_typed_as_one_is_not() -> None:
    """A sample's barcode, a trip's id: a client acts on them, so they are shown as they are;
    text around them still masks a number glued to a word; a resident id typed as an id is
    masked (a refusal must not echo it)."""
    view = {"sample_id": "YC202211200001234", "trip_id": "SN640121198001011231", "id": "v13912345678",
            "transfer_id": "640121198001011231", "note": "barcode YC202211200001234"}
    assert privacy.mask(view) == {**view, "transfer_id": "6401**********1231",
                                  "note": "barcode YC2022*******1234"}
    assert [p.get("field") for p in privacy.patients_in(view)] == ["transfer_id", "note"]


def test_a_uuid_is_shown_as_it_is_wherever_it_stands() -> None:
    """Ids are masked by their shape only (a resident id typed as a transfer id is one), so
    a UUID whose groups look like a number must stay whole in a list, as a client acts on it."""
    uuid = "06123456-8217-5bad-b6e3-461268e2e950"
    view = [{"id": uuid, "trip_id": uuid.replace("5bad", "5139"), "note": f"0951-5012345 {uuid}"}]
    assert privacy.mask(view) == [{**view[0], "note": f"095*-***2345 {uuid}"}]
    rng = random.Random(20261124)  # UUIDs whose groups are all digits, led by 0 or 1
    for _ in range(2000):
        digits = "".join(rng.choice("0123456789") for _ in range(32))
        u = f"{rng.choice('01')}{digits[1:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"
        for text in (u, f"周期{u}不存在", f"/cycles/{u}/stages", f"disclosure-{u}"):
            assert privacy.mask_text(text) == text, text


def test_only_the_roles_that_need_the_numbers_see_them() -> None:
    clear = {r for r in ("dispatcher", "supervisor", "crew", "disinfection", "lab", "hospital",
                         "site", "health_bureau", "auditor", "admin")
             if privacy.may_unmask(Principal(subject="x", role=r))}
    assert clear == {"dispatcher", "crew", "hospital", "health_bureau"}
    assert not privacy.may_unmask(None)


def test_a_disclosure_names_the_patient_masked_and_the_transfer() -> None:
    view = [{"id": "t1", "patient": {"name": "张三", "id_number": "640121198001011231",
                                     "phone": "13800138000"}}, {"id": "t2", "patient": {"name": "李四"}}]
    assert privacy.patients_in(view) == [{"name": "张三", "transfer_id": "t1",
                                          "id_number": "6401**********1231", "phone": "138****8000"}]
    typed = {"transfer_id": "t3", "entries": [{"why": "家属电话139-1234-5678"}]}
    assert privacy.patients_in(typed) == [
        {"transfer_id": "t3", "field": "why", "in_text": "家属电话139-****-5678"}]


def test_numbers_already_masked_disclose_nothing() -> None:
    """The record of reads in clear names its patients masked: the health bureau reading it
    (a role that sees numbers in clear) read nothing in clear, and is not recorded again
    and again for it."""
    record = {"disclosures": [{"route": "GET /transfers/{transfer_id}", "patients": [
        {"name": "张三", "transfer_id": "t1", "id_number": "6401**********1231", "phone": "138****8000"}]}]}
    assert privacy.patients_in(record) == []
    half = {"transfer_id": "t1", "id_number": "6401**********1231", "phone": "13800138000"}
    assert privacy.patients_in(half) == [{"name": None, "transfer_id": "t1", "phone": "138****8000"}]


def test_the_write_limiter_allows_a_burst_then_the_rate() -> None:
    limiter = RateLimiter(rate_per_s=2, burst=3)
    for _ in range(3):
        limiter.take("crew-li", now=100.0)
    with pytest.raises(TooManyRequests) as refused:
        limiter.take("crew-li", now=100.0)
    assert refused.value.extra["retry_after_s"] == 1
    limiter.take("someone-else", now=100.0)  # per client
    limiter.take("crew-li", now=100.5)  # one token back after half a second at 2/s


@pytest.mark.parametrize("rows", [3, 2000])
def test_every_json_answer_is_masked_small_or_large(rows: int) -> None:
    """DisclosingRoute masks every JSON answer; one over LARGE (a year's ledger) is parsed,
    masked and written again in a thread rather than on the loop, to the same effect."""
    import asyncio

    import httpx
    from fastapi import APIRouter, FastAPI

    router = APIRouter(route_class=privacy.DisclosingRoute)

    @router.get("/rows")
    async def many() -> dict[str, Any]:
        return {"rows": [{"n": n, "phone": "13800138000", "note": f"call 13912345678 {'x' * 150}"}
                         for n in range(rows)]}

    app = FastAPI()
    app.include_router(router)

    async def get() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return await c.get("/rows")

    resp = asyncio.run(get())
    assert (len(resp.content) > privacy.LARGE) == (rows == 2000)
    body = resp.json()
    assert len(body["rows"]) == rows and "13800138000" not in resp.text and "13912345678" not in resp.text
    last = {"n": rows - 1, "phone": "138****8000", "note": f"call 139****5678 {'x' * 150}"}
    assert body["rows"][-1] == last

