"""Deployment helpers that are Python (the rest of deploy/ is shell)."""
