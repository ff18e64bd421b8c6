"""The published event catalogue, one module per producing service."""

from libs.events.catalog import disinfection, dispatch, transfer

__all__ = ["disinfection", "dispatch", "transfer"]
