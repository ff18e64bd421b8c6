"""Resident id numbers and phones: masked for every reader but those who need them for the
job at hand, and every read in clear recorded (who, which patients, when).

One place decides, for every JSON answer of every service: `DisclosingRoute`. Scope comes
first (the policy's guard has already kept the crew to its own trips and a hospital to its
own transfers), so "the crew of that trip" and "the receiving hospital" are the bound roles.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

from libs.auth.tokens import Principal
from libs.events.catalog.common import PatientDataDisclosed
from libs.events.store import EventStore, Meta

# Keys whose values are personal numbers wherever they appear in a payload, including in
# events this service does not know yet (an exposure list, a pre-arrival notice).
ID_KEYS = frozenset({"id_number", "resident_id", "id_card"})
PHONE_KEYS = frozenset({"phone", "mobile", "contact_phone", "phone_number"})
# And numbers that look like them in free text (a reason typed by a dispatcher, a place's
# name): resident ids of 18 characters (also in 6-8-4 groups or in groups of four) and the
# old 15 digits; mobiles bare, with +86 or 0086 or with spaces or dashes (any dash) between
# the groups; landlines with their area code, bracketed or not, the number whole or in two
# groups; in ASCII or in the full-width forms a Chinese input method types (１３９１２３４５６７８,
# （０９５１）), matched on a folded copy of the text and masked where they stand. A whole
# UUID is kept first, whatever its groups look like: a cycle's id ending in -075123452105,
# or one starting 06123456-8217- (a landline's two-group shape), was masked, and a client
# could no longer use it (the staff's stages for that cycle were refused 404). A number
# dashed onto a bed, an extension or another number is masked (13912345678-2, 0951-5012345-8).
_FOLD = {**{0xFF10 + i: 0x30 + i for i in range(10)}, **{0xFF21 + i: 0x41 + i for i in range(26)},
         **{0xFF41 + i: 0x61 + i for i in range(26)}, 0xFF0B: 0x2B, 0xFF0D: 0x2D, 0xFF0E: 0x2E,
         0xFF08: 0x28, 0xFF09: 0x29, 0x3000: 0x20,
         **dict.fromkeys((0x2010, 0x2011, 0x2012, 0x2013, 0x2014, 0x2212), 0x2D)}
# (one character for one: a match's place in the copy is its place in the text)
_DIGITS = re.compile("[0-9\uff10-\uff19]{3}")
# In groups of four (6401 2119 8001 0112 31) an id must hold its region's first digit and
# a birth date (19xx or 20xx, month, day): times and amounts are written in fours too.
_ID_IN_FOURS = (r"[1-8][0-9]{3}[-\s][0-9]{2}(?:19|20)[-\s][0-9]{2}(?:0[1-9]|1[0-2])"
                r"[-\s](?:0[1-9]|[12][0-9]|3[01])[0-9]{2}[-\s][0-9][0-9Xx]")
_ID = (r"(?:[0-9]{17}[0-9Xx]|[0-9]{6}[-\s][0-9]{8}[-\s][0-9]{3}[0-9Xx]|" + _ID_IN_FOURS
       + r"|[0-9]{15})")
_MOBILE = r"(?:(?:\+|00)?86[-\s]?)?1[3-9][0-9](?:[-\s]?[0-9]{4}){2}"
# A local number begins with 2-8: times written as HHMM (0800-1200 1300-1700) are none.
_LANDLINE = r"(?:\(0[0-9]{2,3}\)|0[0-9]{2,3})[-\s]?(?:[2-8][0-9]{6,7}|[2-8][0-9]{2,3}[-\s][0-9]{4})"
# A number starts where a run of digits does; a '.' after a digit is a decimal point
# (38.123456789012345 is a coordinate), after anything else a separator (电话.13800138000).
_START = r"(?<![0-9])(?<![0-9]\.)"
_UUID = re.compile(r"(?<![0-9A-Za-z])[0-9A-Fa-f]{8}(?:-[0-9A-Fa-f]{4}){3}-[0-9A-Fa-f]{12}(?![0-9A-Za-z])")
_ID_IN_TEXT = re.compile(_START + _ID + r"(?![0-9A-Za-z])")
_PHONE_IN_TEXT = re.compile(
    _START + r"(?<!\+)" + _MOBILE + r"(?![0-9A-Za-z])" r"|" + _START + _LANDLINE + r"(?![0-9A-Za-z])")
# A number glued to a word (Dr.Li13912345678, patientId640121..., QQ13800138000), or
# joined to one by a dash (call-13800138000), is masked unless that word is hex: letters
# and digits all of 0-9a-f or all of 0-9A-F, as a digest or a UUID's group is written
# (...4e13912345678, 817e-139123456789). A name, a label or a title has a letter beyond f
# or mixes cases (Ed, Dad); the run of hex digits around the number would not do, as
# patientI|d640121198001011231 is one of 19. Left as hex: a word of a-f only in one case.
_HEX_WORD = re.compile(r"[0-9a-f]*[a-f]|[0-9A-F]*[A-F]")
# Keys whose values are identifiers, never personal numbers: not scanned as text.
OPAQUE_KEYS = frozenset({"event_id", "hash", "prev_hash", "head_hash", "correlation_id", "causation_id"})


_BARE = re.compile(r"\s*(?:" + _ID + "|" + _MOBILE + "|" + _LANDLINE + r")\s*")


def _identifier(key: str, value: str) -> bool:
    """An identifier's value (`id`, `sample_id`, `trip_id`, ... not `resident_id`) that is
    not a personal number whole (one typed as a transfer's id is masked): kept as it is.
    Scanned as text, a sample's barcode (YC202211200001234: a number glued to letters) would
    be mangled in every view, and no client could act on it."""
    return (key == "id" or (key.endswith("_id") and key not in ID_KEYS)) and not _BARE.fullmatch(
        value.translate(_FOLD))

# Roles that need the numbers for the job at hand; the auditor is not one.
UNMASK_ROLES = frozenset({"dispatcher", "crew", "hospital", "health_bureau"})


def mask_id_number(value: str) -> str:
    """640121198001011231 -> 6401**********1231: the region and the last four stay, so a
    clerk can still tell two people apart without learning either number."""
    if len(value) <= 8:
        return "*" * len(value)
    return value[:4] + "*" * (len(value) - 8) + value[-4:]


def mask_phone(value: str) -> str:
    """13800138000 -> 138****8000; a landline keeps its area code and last four."""
    digits = value.replace("-", "")
    if len(digits) <= 7:
        return "*" * len(value)
    return digits[:3] + "*" * (len(digits) - 7) + digits[-4:]


def _starred(text: str, folded: str, keep_head: int, keep_tail: int) -> str:
    """`text` with its digits (counted on `folded`, an id's final X among them) starred but
    the first `keep_head` and the last `keep_tail`; spaces, dashes and the width it was
    typed in stay."""
    at = [i for i, ch in enumerate(folded) if ch.isascii() and (ch.isdigit() or ch in "Xx")]
    hidden = set(at) if len(at) <= keep_head + keep_tail else set(at[keep_head:len(at) - keep_tail])
    return "".join("*" if i in hidden else ch for i, ch in enumerate(text))


def _id_mask(text: str, folded: str) -> str:
    """As mask_id_number: 6401**********1231, 6401** ******** 1231."""
    return _starred(text, folded, 4, 4)


def _phone_mask(text: str, folded: str) -> str:
    """As mask_phone, keeping how it was written: +86 139 **** 5678, 095*-***4321."""
    prefix = next((len(p) for p in ("+86", "0086", "86") if folded.startswith(p)), 0)
    return text[:prefix] + _starred(text[prefix:], folded[prefix:], 3, 4)


def _in_hex_word(folded: str, start: int, end: int) -> bool:
    """Whether the number at folded[start:end] ends a hex word (see _HEX_WORD): glued to
    it, or after a dash that follows a letter. A +86, a bracket or an id's X is no hex."""
    if not folded[start].isdigit() or folded[end - 1] in "Xx":
        return False
    stop = start - 1 if start >= 2 and folded[start - 1] == "-" and folded[start - 2].isalpha() else start
    begin = stop
    while begin > 0 and folded[begin - 1].isascii() and folded[begin - 1].isalnum():
        begin -= 1
    return begin < stop and _HEX_WORD.fullmatch(folded, begin, stop) is not None


def mask_text(text: str) -> str:
    if not _DIGITS.search(text):
        return text  # most text (a name, a place) holds no run of digits: nothing to fold
    folded = text.translate(_FOLD)
    # (start, end, how), first match wins; a UUID is kept as it is (how None)
    spans: list[tuple[int, int, Any]] = [(m.start(), m.end(), None) for m in _UUID.finditer(folded)]

    def take(start: int, end: int, how: Any) -> None:
        if all(end <= a or start >= b for a, b, _ in spans):
            spans.append((start, end, how))

    for m in _ID_IN_TEXT.finditer(folded):
        if not _in_hex_word(folded, m.start(), m.end()):
            take(m.start(), m.end(), _id_mask)
    for m in _PHONE_IN_TEXT.finditer(folded):
        if not _in_hex_word(folded, m.start(), m.end()):
            take(m.start(), m.end(), _phone_mask)
    out, last = [], 0
    for start, end, how in sorted(spans, key=lambda s: s[0]):
        kept = text[start:end]
        out += [text[last:start], kept if how is None else how(kept, folded[start:end])]
        last = end
    return "".join(out) + text[last:]


def mask(value: Any) -> Any:
    """A deep copy of a view or payload with every id number and phone masked."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            if isinstance(v, str) and k in ID_KEYS:
                out[k] = mask_id_number(v)
            elif isinstance(v, str) and k in PHONE_KEYS:
                out[k] = mask_phone(v)
            elif k in OPAQUE_KEYS or (isinstance(v, str) and _identifier(k, v)):
                out[k] = v
            else:
                out[k] = mask(v)
        return out
    if isinstance(value, list):
        return [mask(v) for v in value]
    if isinstance(value, str):
        return mask_text(value)
    return value


def may_unmask(principal: Principal | None) -> bool:
    return principal is not None and principal.role in UNMASK_ROLES


def patients_in(view: Any, transfer_id: str | None = None) -> list[dict[str, Any]]:
    """Each clear personal number in a view, with whom it belongs to (masked) and the
    transfer it was read under: what the disclosure record names."""
    found: list[dict[str, Any]] = []
    if isinstance(view, dict):
        here = view.get("transfer_id") or (view.get("id") if "patient" in view else None)
        here = here if isinstance(here, str) else transfer_id
        # Only numbers in clear: an already masked one (the disclosure record itself,
        # read back) discloses nothing.
        clear = {k: masked for k in ID_KEYS | PHONE_KEYS
                 if isinstance(view.get(k), str) and (masked := mask({k: view[k]})[k]) != view[k]}
        if clear:
            found.append({"name": view.get("name"), "transfer_id": here, **clear})
        for k, v in view.items():
            if isinstance(v, str) and k not in ID_KEYS | PHONE_KEYS | OPAQUE_KEYS and not _identifier(k, v):
                masked = mask_text(v)
                if masked != v:  # a number typed into free text, read in clear too
                    found.append({"transfer_id": here, "field": k, "in_text": masked})
            else:
                found += patients_in(v, here)
    elif isinstance(view, list):
        for v in view:
            found += patients_in(v, transfer_id)
    return found


async def record_disclosure(store: EventStore, principal: Principal, route: str,
                            patients: list[dict[str, Any]]) -> None:
    """Appended before the answer leaves: an unmasked read that cannot be recorded fails."""
    unique = list({json.dumps(p, sort_keys=True): p for p in patients}.values())
    await store.append(f"disclosure-{uuid.uuid4()}", 0,
                       [PatientDataDisclosed(route=route, patients=unique)],
                       Meta(actor=principal.subject, role=principal.role,
                            correlation_id=str(uuid.uuid4())))


# JSON answers larger than this are parsed, masked and written again in a thread: a year's
# ledger (20,000 trips) is seconds of CPU, which on the loop held every other request
# (embedded: dispatch's and the crews' too).
LARGE = 256 * 1024


async def _maybe_in_thread(large: bool, fn: Callable[..., Any], *args: Any) -> Any:
    return await asyncio.to_thread(fn, *args) if large else fn(*args)


async def disclose(request: Request, view: Any, large: bool = False) -> Any:
    """What this caller gets of a view: masked, or in clear and recorded. Routes that
    answer with a file (the ledger's CSV) call it; JSON answers get it from DisclosingRoute.
    `large`: the work is done in a thread, not on the loop."""
    principal: Principal | None = getattr(request.state, "principal", None)
    if principal is None or not may_unmask(principal):
        return await _maybe_in_thread(large, mask, view)
    patients = await _maybe_in_thread(large, patients_in, view)
    if patients:
        route = getattr(request.scope.get("route"), "path", request.url.path)
        store: EventStore = request.app.state.stores[request.state.service]
        await record_disclosure(store, principal, f"{request.method} {route}", patients)
    return view


JSON_TYPES = ("application/json", "application/problem+json")


class DisclosingRoute(APIRoute):
    """Every JSON answer of a service passes here, so no view can forget to mask."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()

        async def route(request: Request) -> Response:
            response = await handle(request)
            media = (response.media_type or "").split(";")[0]
            if media not in JSON_TYPES or not response.body:
                return response  # streams and files disclose in their routes
            large = len(response.body) > LARGE
            view = await _maybe_in_thread(large, json.loads, bytes(response.body))
            shown = await disclose(request, view, large)
            if shown is view:
                return response
            headers = {k: v for k, v in response.headers.items() if k != "content-length"}
            body = await _maybe_in_thread(large, lambda: json.dumps(shown, ensure_ascii=False).encode())
            return Response(body,
                            status_code=response.status_code, headers=headers,
                            media_type=response.media_type)

        return route
