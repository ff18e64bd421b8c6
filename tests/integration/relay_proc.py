"""A relay in its own process, so a test can SIGKILL it mid-batch.
Usage: python -m tests.integration.relay_proc STORE_NAME SCHEMA BOOTSTRAP"""

from __future__ import annotations

import asyncio
import sys

from libs.events.bus import KafkaPublisher, Relay
from tests.conftest import pg_store


async def main(name: str, schema: str, bootstrap: str) -> None:
    store = pg_store(name, schema)
    publisher = KafkaPublisher(bootstrap)
    await publisher.start()
    relay = Relay(store, publisher, batch=40, ttl_ms=1500)
    print("relay started", flush=True)
    await relay.run(asyncio.Event())


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
