"""The projection's schema, as the runtime creates it at start (see tables.py)."""

from services.projection.tables import metadata

__all__ = ["metadata"]
