"""Keyset cursors for the paged views: a page ends at (time, id) and the next starts after
it, so entries recorded meanwhile do not shift it as they shift an offset."""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Keyset:
    """One view's cursor: its two parts of the shapes that view writes, strictly, because
    the parts reach the query's comparison (a NUL, which PostgreSQL's text cannot hold, or
    text that sorts anywhere, must not)."""

    at: re.Pattern[str]
    id: re.Pattern[str]

    def cursor(self, at: str, id_: str) -> str:
        return base64.urlsafe_b64encode(f"{at}|{id_}".encode()).decode()

    def parse(self, cursor: str) -> tuple[str, str]:
        """(at, id) of the entry a page ended at; ValueError when this view did not give it."""
        try:
            at, sep, id_ = base64.urlsafe_b64decode(cursor.encode()).decode().partition("|")
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError("not a cursor") from exc
        if not (sep and self.at.fullmatch(at) and self.id.fullmatch(id_)):
            raise ValueError("not a cursor")
        return at, id_
