"""What the store benchmarks write: a real TransferRequested (about 600 bytes of payload, with
Chinese text) in streams of 10 events."""

from __future__ import annotations

from libs.events.catalog import dispatch as ev
from libs.events.store import Commit, EventStore, Meta, NewEvent, StreamAppend

META = Meta(actor="bench", role="dispatcher", correlation_id="bench")
STREAM_LENGTH = 10
EVENT = ev.TransferRequested(
    transfer_id="t-bench",
    patient={"name": "张三", "id_number": "640121198001011231", "phone": "13800138000"},
    risk_category="isolation_site", condition={"fever": True, "critical": False},
    origin={"kind": "isolation_site", "name": "永宁县集中隔离医学观察点",
            "location": {"lat": 38.27, "lon": 106.24}},
    purpose="outpatient_visit", return_required=True,
    requested_by={"channel": "console", "org": "银川市紧急救援中心"})


async def fill(store: EventStore, streams: list[str]) -> None:
    """STREAM_LENGTH events in each stream, through the store (so the hash chain is real),
    100 streams a commit."""
    for i in range(0, len(streams), 100):
        await store.commit(Commit(meta=META, appends=[
            StreamAppend(s, 0, [NewEvent(EVENT)] * STREAM_LENGTH) for s in streams[i:i + 100]]))
