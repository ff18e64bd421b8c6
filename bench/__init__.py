"""Benchmarks: `make bench` runs every bench_*.py module in one run (or those named in
BENCH=...), each printing its figures beside the peers named in its issue, as ratios."""
