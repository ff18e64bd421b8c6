"""Who may read which audit view. The only place."""

from __future__ import annotations

from libs.auth.policy import Policy, Rules, roles

OVERSIGHT = ("auditor", "health_bureau", "supervisor")
# Who may read the record of reads in clear: the disclosures view, and its events on the
# live feed (others get the feed without them).
DISCLOSURE_READERS = ("auditor", "health_bureau")

RULES: Rules = {
    "GET /audit/transfers/{transfer_id}/timeline": roles(*OVERSIGHT, "dispatcher"),
    "GET /audit/vehicles/{vehicle_id}/custody": roles(*OVERSIGHT, "dispatcher", "disinfection"),
    "GET /audit/violations": roles(*OVERSIGHT),
    "GET /audit/exposures": roles(*OVERSIGHT, "dispatcher", "disinfection"),
    "GET /audit/kpis": roles(*OVERSIGHT, "dispatcher"),
    "GET /audit/ledger": roles("health_bureau", "auditor"),
    "GET /audit/disclosures": roles(*DISCLOSURE_READERS),
    "GET /audit/stream": roles(*OVERSIGHT, "dispatcher"),
    "GET /audit/verify": roles("auditor", "health_bureau", "admin"),
    "POST /audit/rebuild": roles("admin"),
    "GET /audit/rebuild": roles("admin", "auditor"),
}

POLICY = Policy("projection", RULES)
