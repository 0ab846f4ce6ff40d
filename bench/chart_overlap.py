"""Tabulate ``rank_cusum.OVERLAP``: how much longer than the union bound the default charts of one
column (``drift.chart_set`` with the default ``shifts`` and ``spread``) run together to their first
false alarm, at per-chart run lengths from 100 to 10 million events. Data-free (equal bins), seeded.

    .venv/bin/python bench/chart_overlap.py      # about 5 minutes on the 2-core machine
"""

from __future__ import annotations

import time

import monitor  # noqa: F401  (single-threaded BLAS before numpy loads)
from monitor.detectors import rank_cusum
from monitor.detectors.drift import Drift, chart_set



def main() -> None:
    p = Drift.Params()
    family = tuple((c.score, c.sign, c.k) for c in chart_set(p.shifts, p.spread))
    print(f"family (score, sign, k): {family}")
    rows = []
    for exponent in range(4, 15):
        arl = 10 ** (exponent / 2)
        runs = int(max(1000, min(20_000, 2e9 / arl)))  # standard errors of 0.7-3%
        start = time.perf_counter()
        ratio = rank_cusum.family_overlap(family, arl, runs, seed=exponent)
        rows.append((arl, ratio))
        print(f"arl {arl:>12,.0f}  runs {runs:>6}  overlap {ratio:.3f} (+-{ratio / runs ** 0.5:.3f})  "
              f"{time.perf_counter() - start:.0f}s", flush=True)
    print("OVERLAP = (" + ", ".join(f"({a:.0f}, {r:.3f})" for a, r in rows) + ")")


if __name__ == "__main__":
    main()
