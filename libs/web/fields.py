"""Field types the services' APIs accept, so bad input is a 422 naming the field and never
reaches a handler or a database.

FastAPI validates a request's JSON in pydantic's lax Python mode, which takes `"0"` or `0`
for a time (1970-01-01), `1` for true and `"5"` for 5. The OpenAPI document promises JSON
types; these hold the API to them. Times are RFC 3339 text with their UTC offset, in the
years a trip can happen in (from 1970, so a phone whose clock reset to the epoch can still
report: its skew is recorded, not refused). Text never carries NUL, which PostgreSQL's text
and jsonb cannot hold.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import date, datetime, timedelta
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BeforeValidator,
    Strict,
    StrictBool,
    StrictInt,
    WithJsonSchema,
)

from libs.events.aggregate import InvalidField
from libs.events.envelope import iso

FIRST_YEAR, LAST_YEAR = 1970, 2099
POSITION_MAX = 2**63 - 1  # a bigint: past it, PostgreSQL and SQLite fail to compare (500)
CLOCK_SKEW = timedelta(minutes=5)  # how far ahead of the server a phone's clock may be
# The years in the pattern too, so the OpenAPI document says what is refused (JSON Schema
# has no range for times); a whole pattern, as generators build values from it.
_DATE = r"(19[7-9][0-9]|20[0-9]{2})-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"
_DAY = f"^{_DATE}$"
_TIME = (f"^{_DATE}[Tt]([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\\.[0-9]+)?"
         r"([Zz]|[+-]([01][0-9]|2[0-3]):[0-5][0-9])$")


def not_ahead(field: str, at: datetime, now: datetime, skew: timedelta = CLOCK_SKEW) -> None:
    """A device time later than the server's (past the drift phones have) is a wrong clock:
    refused, 422 naming the field. Kept, it would put everything after it "in the past"."""
    if at > now + skew:
        raise InvalidField(field, "time_in_the_future",
                           f"{field} {iso(at)} is later than the server's clock {iso(now)}",
                           f"{field}晚于服务器当前时间", server_time=iso(now))


def _text(pattern: str, what: str) -> Callable[[Any], Any]:
    regex = re.compile(pattern)

    def check(value: Any) -> Any:
        if not isinstance(value, str) or not regex.fullmatch(value):
            raise ValueError(f"{what} between {FIRST_YEAR} and {LAST_YEAR}")
        return value

    return check


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("text may not contain NUL (U+0000)")
    return value


# The pattern first: the years, leap seconds (23:59:60) and a missing offset are refused
# there; pydantic then refuses dates that do not exist (2022-02-30).
Instant = Annotated[
    AwareDatetime,
    BeforeValidator(_text(_TIME, "an RFC 3339 time with its UTC offset, e.g. 2022-11-20T09:01:10+08:00,")),
    WithJsonSchema({"type": "string", "format": "date-time", "pattern": _TIME})]
Day = Annotated[date, BeforeValidator(_text(_DAY, "a date as YYYY-MM-DD")),
                WithJsonSchema({"type": "string", "format": "date", "pattern": _DAY})]
Text = Annotated[str, AfterValidator(_no_nul)]
Flag = StrictBool
Whole = StrictInt
Real = Annotated[float, Strict()]  # an integer is a number too; a string or a bool is not
