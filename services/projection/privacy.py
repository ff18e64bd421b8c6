"""Masking of resident id numbers and phone numbers in every audit view (item 11).

Every view passes what it returns through `disclose`, which masks by default. Whether a
reader may see the numbers in clear is decided in one place, `may_unmask`, so that the
role model of issue 7 governs it by changing this function only. Until identities are
verified (issue 7), nobody may: a role named in an X-Role header proves nothing.
"""

from __future__ import annotations

import re
from typing import Any

# Keys whose values are personal numbers wherever they appear in a payload, including in
# events this service does not know yet (an exposure list, a pre-arrival notice).
ID_KEYS = frozenset({"id_number", "resident_id", "id_card"})
PHONE_KEYS = frozenset({"phone", "mobile", "contact_phone", "phone_number"})
# And numbers that look like them in free text (a reason typed by a dispatcher).
_ID_IN_TEXT = re.compile(r"(?<![0-9A-Za-z])\d{17}[\dXx](?![0-9A-Za-z])")
_MOBILE_IN_TEXT = re.compile(r"(?<![0-9A-Za-z])1[3-9]\d{9}(?![0-9A-Za-z])")

# Roles that need the numbers for the job at hand (issue 7, item 3); the auditor is not one.
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


def mask_text(text: str) -> str:
    text = _ID_IN_TEXT.sub(lambda m: mask_id_number(m.group(0)), text)
    return _MOBILE_IN_TEXT.sub(lambda m: mask_phone(m.group(0)), text)


def mask(value: Any) -> Any:
    """A deep copy of a view or payload with every id number and phone masked."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            if isinstance(v, str) and k in ID_KEYS:
                out[k] = mask_id_number(v)
            elif isinstance(v, str) and k in PHONE_KEYS:
                out[k] = mask_phone(v)
            else:
                out[k] = mask(v)
        return out
    if isinstance(value, list):
        return [mask(v) for v in value]
    if isinstance(value, str):
        return mask_text(value)
    return value


def may_unmask(role: str | None, identity_verified: bool = False) -> bool:
    """The one decision on clear numbers. Issue 7 supplies verified identities; until then
    every reader gets masked numbers, whatever role it claims."""
    return identity_verified and role in UNMASK_ROLES


def disclose(view: Any, role: str | None = None, identity_verified: bool = False) -> Any:
    """What a reader gets: the view itself only when `may_unmask` says so, else masked."""
    return view if may_unmask(role, identity_verified) else mask(view)
