"""The published event catalogue, one module per producing service."""

from libs.events.catalog import common, disinfection, dispatch, transfer

__all__ = ["common", "disinfection", "dispatch", "transfer"]
