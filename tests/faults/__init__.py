"""Fault tests: the city topology broken under load (issue 8)."""
