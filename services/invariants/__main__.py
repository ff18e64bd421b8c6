"""python -m services.invariants: every check over the stores, a summary, exit 1 on a failure."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from services.invariants.run import STORES, check
from services.settings import Settings


def main() -> int:
    defaults = Settings()
    parser = argparse.ArgumentParser(prog="python -m services.invariants", description=__doc__)
    parser.add_argument("--mode", choices=("embedded", "distributed"), default=defaults.mode)
    parser.add_argument("--data-dir", type=Path, default=defaults.data_dir,
                        help="embedded: where the SQLite stores are (CLOSEDLOOP_DATA_DIR)")
    parser.add_argument("--pg-url", default=defaults.pg_url,
                        help="distributed: a database per service, {service} in the URL (CLOSEDLOOP_PG_URL)")
    parser.add_argument("--settle", type=float, default=30.0,
                        help="seconds to wait for the consumers to catch up before checking")
    parser.add_argument("--max-open-age", type=float, default=None,
                        help="seconds after which an open transfer, trip, cycle, swab or exposure list "
                             "fails the check (default: open ones are listed, not failed)")
    parser.add_argument("--no-rebuild", action="store_true", help="skip the live == rebuild comparison")
    parser.add_argument("--json", type=Path, help="also write the whole report here")
    args = parser.parse_args()
    settings = Settings(mode=args.mode, data_dir=args.data_dir, pg_url=args.pg_url)
    if args.mode == "embedded":
        missing = [s for s in STORES if not (args.data_dir / f"{s}.db").exists()]
        if missing:
            print(f"no {', '.join(missing)} store under {args.data_dir}", file=sys.stderr)
            return 2
    report = asyncio.run(check(settings, settle_s=args.settle, max_open_age=args.max_open_age,
                               compare_read_models=not args.no_rebuild))
    print(report.summary())
    if args.json:
        args.json.write_text(json.dumps(report.view(), ensure_ascii=False, indent=1))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
