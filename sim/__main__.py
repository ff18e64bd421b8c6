"""python -m sim: a simulated day with a progress bar, and its summary at the end.

    python -m sim                                  # 50,000 transfers, its own embedded app
    python -m sim --transfers 2000 --speed 600     # no faster than 600 simulated s per s
    python -m sim --url http://127.0.0.1:8000      # against `make run`
    python -m sim --distributed                    # against `make up` (8001-8004)

Exit status 1 when the day did not finish, a request got a 5xx or an actor failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from datetime import date, datetime
from pathlib import Path

from sim.runner import Progress, Target, embedded, run_day
from sim.summary import Summary

DISTRIBUTED = {"dispatch": 8001, "transfer": 8002, "disinfection": 8003, "projection": 8004}


class Bar:
    """One line redrawn on a terminal; a line every 10% of the day otherwise."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.shown = -1

    def __call__(self, p: Progress) -> None:
        width = 30
        done = int(p.day_fraction * width)
        rate = p.requests / p.wall_s if p.wall_s else 0.0
        line = (f"[{'#' * done}{'.' * (width - done)}] {p.day_fraction:4.0%} {p.sim_now:%m-%d %H:%M} | "
                f"requested {p.requested:,} done {p.completed:,} open {p.open:,} | "
                f"{p.requests:,} requests ({rate:,.0f}/s) refused {p.refused:,} 5xx {p.server_errors} "
                f"| {p.wall_s:,.0f} s")
        if self.tty:
            print("\r" + line, end="", file=sys.stderr, flush=True)
        elif int(p.day_fraction * 10) != self.shown:
            self.shown = int(p.day_fraction * 10)
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.tty:
            print(file=sys.stderr)


def speed(value: str) -> float | None:
    return None if value in ("max", "0", "") else float(value)


def pids_of(run_dir: Path) -> dict[str, int]:
    out = {}
    for svc in DISTRIBUTED:
        f = run_dir / "pids" / f"{svc}.pid"
        if f.exists():
            out[svc] = int(f.read_text().strip())
    return out


async def main(args: argparse.Namespace) -> Summary:
    bar = Bar()

    async def day(target: Target) -> Summary:
        return await run_day(target.base_urls, data_dir=target.data_dir, mode=target.mode,
                             pids=target.pids, transfers=args.transfers, speed=args.speed,
                             seed=args.seed, day=args.day, tick_s=args.tick,
                             max_inflight=args.inflight, progress=bar)

    try:
        if args.url:
            return await day(Target(args.url, args.data_dir or Path(".run/data")))
        if args.distributed:
            return await day(Target({s: f"http://127.0.0.1:{p}" for s, p in DISTRIBUTED.items()},
                                    args.data_dir or Path(".run/data"), "distributed",
                                    pids_of(Path(".run"))))
        data_dir = args.data_dir or Path(".run/sim") / datetime.now().strftime("%Y%m%d-%H%M%S")
        print(f"embedded app on its own, stores under {data_dir}", file=sys.stderr)
        async with embedded(data_dir) as target:
            return await day(target)
    finally:
        bar.close()


def cli() -> int:
    parser = argparse.ArgumentParser(prog="python -m sim", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--transfers", type=int, default=50_000, help="requests in the day")
    parser.add_argument("--speed", type=speed, default=None,
                        help="simulated seconds per wall second, or max (as fast as the system goes)")
    parser.add_argument("--seed", type=int, default=1, help="the plan is a function of the seed")
    parser.add_argument("--day", type=date.fromisoformat, default=None,
                        help="the simulated day (default: the day before yesterday)")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--url", help="a running embedded app (make run), e.g. http://127.0.0.1:8000")
    target.add_argument("--distributed", action="store_true", help="the services of make up (8001-8004)")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="where the local issuer's key is (and the stores, when the app is our own)")
    parser.add_argument("--tick", type=float, default=20.0, help="simulated seconds per tick")
    parser.add_argument("--inflight", type=int, default=48, help="requests in flight at most")
    parser.add_argument("--json", type=Path, help="also write the summary as JSON here")
    args = parser.parse_args()
    started = time.monotonic()
    summary = asyncio.run(main(args))
    print(summary.text())
    if args.json:
        args.json.write_text(json.dumps(summary.view(), ensure_ascii=False, indent=1))
    print(f"({time.monotonic() - started:,.1f} s)", file=sys.stderr)
    return 0 if summary.ok else 1


if __name__ == "__main__":
    sys.exit(cli())
