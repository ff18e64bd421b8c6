"""An open-loop load generator, a process of its own that bench_e2e starts: POST /transfers
at a fixed rate whatever the answers. A closed loop (send, wait, send) would slow down
with the server and never measure the requests a slow server makes wait (coordinated
omission); here request i is due at start + i/rate and its latency counts from then.

    python -m bench.loadgen URL DATA_DIR --rate 200 --seconds 20 --tag r200

Prints `start <t0>` once its bodies and tokens are ready (t0 on the monotonic clock, which
every process of the machine shares, a moment ahead), then, when every answer is in, one
JSON line per request: i; due, queued (handed to the connections: later than due only if
the generator itself lagged), sent (a connection took it), answered (monotonic s); status,
transfer id, the transfer's status in the answer, or the problem code or error.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import uvloop

from bench.bench_dispatch import request
from services.settings import Settings

LEAD_S = 0.5  # from `start` to the first request: the bench takes its CPU readings at t0
DISPATCHERS = 40  # a console each; 500 req/s over 40 stays within a token's 50 writes/s
# Connections, each a worker that sends the due requests one after the other, as wrk2
# does: a request due while every connection is busy waits in a queue, and that wait
# counts in its latency (from when it was due). (One task per request over a shared pool
# was tried: with thousands waiting, httpx's pool bookkeeping cost the generator more CPU
# than the requests, and it fell minutes behind.)
CONNECTIONS = 128
ANSWER_TIMEOUT_S = 60.0  # from when a request was due: later than that it is an error


def body(tag: str, i: int) -> bytes:
    """A non-critical home-monitoring patient with a phone (so dispatch checks for a live
    transfer of the same person, as it does for a real call), at a random pickup."""
    b = request(f"压测{tag}-{i}", critical=False).model_dump(mode="json", exclude_none=True)
    b["patient"]["phone"] = f"139{i:08d}"  # (the name is unique: the person is)
    return orjson.dumps(b)


async def generate(url: str, data_dir: Path, rate: float, seconds: float, tag: str) -> list[dict[str, Any]]:
    issuer = Settings(data_dir=data_dir).local_issuer()
    tokens = [f"Bearer {issuer.issue(f'bench-dispatcher-{k}', 'dispatcher')}" for k in range(DISPATCHERS)]
    n = max(1, round(rate * seconds))
    bodies = [body(tag, i) for i in range(n)]
    results: list[dict[str, Any]] = [{} for _ in range(n)]
    due_queue: asyncio.Queue[tuple[int, float, float] | None] = asyncio.Queue()

    async def connection(client: httpx.AsyncClient) -> None:
        async with client:
            while (item := await due_queue.get()) is not None:
                i, due, queued = item
                sent = time.monotonic()
                out: dict[str, Any] = {"i": i, "due": due, "queued": queued, "sent": sent}
                results[i] = out
                if sent > due + ANSWER_TIMEOUT_S:  # not sent: it would be an error anyway
                    out["status"], out["error"], out["answered"] = 0, "not sent in time", sent
                    continue
                try:
                    r = await client.post(
                        "/api/v1/transfers", content=bodies[i], timeout=due + ANSWER_TIMEOUT_S - sent,
                        headers={"Authorization": tokens[i % DISPATCHERS],
                                 "Content-Type": "application/json"})
                    out["status"] = r.status_code
                    answer = r.json()
                    if r.status_code in (200, 201):
                        out["id"], out["transfer_status"] = answer["id"], answer["status"]
                    else:
                        out["error"] = answer.get("code", r.reason_phrase)
                except (httpx.HTTPError, ValueError) as exc:  # ValueError: a body that is not JSON
                    out["status"], out["error"] = 0, type(exc).__name__
                out["answered"] = time.monotonic()

    # Made before the start: a client's making (its TLS context, unused here) takes
    # milliseconds of CPU that would hold the first requests back.
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    clients = [httpx.AsyncClient(base_url=url, timeout=ANSWER_TIMEOUT_S, limits=limits, verify=False)
               for _ in range(CONNECTIONS)]
    workers = [asyncio.create_task(connection(c)) for c in clients]
    t0 = time.monotonic() + LEAD_S
    print(f"start {t0}", flush=True)
    for i in range(n):
        due = t0 + i / rate
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        due_queue.put_nowait((i, due, time.monotonic()))
    for _ in workers:
        due_queue.put_nowait(None)
    await asyncio.gather(*workers)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url", help="the dispatch service, e.g. http://127.0.0.1:8701")
    parser.add_argument("data_dir", type=Path, help="where the local issuer's key is")
    parser.add_argument("--rate", type=float, required=True, help="requests per second")
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--tag", default="load", help="makes this run's patients its own")
    args = parser.parse_args()
    results = uvloop.run(generate(args.url, args.data_dir, args.rate, args.seconds, args.tag))
    out = sys.stdout.buffer
    for r in results:
        out.write(orjson.dumps(r) + b"\n")
    out.flush()


if __name__ == "__main__":
    main()
