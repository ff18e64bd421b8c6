"""An open-loop load generator, a process of its own that bench_e2e starts: POST /transfers
at a fixed rate whatever the answers. A closed loop (send, wait, send) would slow down
with the server and never measure the requests a slow server makes wait (coordinated
omission); here request i is due at start + i/rate and its latency counts from then.

    python -m bench.loadgen URL DATA_DIR --rate 200 --seconds 20 --tag r200

Prints `start <t0>` once its bodies and tokens are ready (t0 on the monotonic clock, which
every process of the machine shares, a moment ahead), then, when every answer is in, one
JSON line per request: i, due, sent, answered (monotonic s), status, transfer id, the
transfer's status in the answer, and the problem code or error of a failure.
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
    # No pool limit: a request never waits for a connection another one holds.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:

        async def post(i: int, due: float) -> None:
            sent = time.monotonic()
            out: dict[str, Any] = {"i": i, "due": due, "sent": sent}
            try:
                r = await client.post("/api/v1/transfers", content=bodies[i], headers={
                    "Authorization": tokens[i % DISPATCHERS], "Content-Type": "application/json"})
                out["status"] = r.status_code
                answer = r.json()
                if r.status_code in (200, 201):
                    out["id"], out["transfer_status"] = answer["id"], answer["status"]
                else:
                    out["error"] = answer.get("code", r.reason_phrase)
            except (httpx.HTTPError, ValueError) as exc:  # ValueError: a body that is not JSON
                out["status"], out["error"] = 0, type(exc).__name__
            out["answered"] = time.monotonic()
            results[i] = out

        t0 = time.monotonic() + LEAD_S
        print(f"start {t0}", flush=True)
        tasks = []
        for i in range(n):
            due = t0 + i / rate
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(post(i, due)))
        await asyncio.gather(*tasks)
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
