"""How many charts a group of correlated columns counts for, by simulating its null on the reference.

The drift detector shares its ERT between its charts by a union bound: ``C`` charts, each calibrated to
``ert x C``. That is exact when the charts never alarm together, and conservative when they do: a
model whose features are correlated (breast-cancer: radius, perimeter and area at 0.99) has charts
that rise and fall together, and its false alarms came 1.8 ERTs apart. A column's own charts overlap
the same way; ``rank_cusum.OVERLAP`` tabulates that once, data-free. Between columns it depends on the
data, so it is measured on the reference itself:

- each simulated event is a reference row drawn at random (a bootstrap draw: its columns keep the
  reference's dependence, its empirical copula), and each of its values is given the bin the detector
  would give it, ties broken at random as ``RankBins`` breaks them;
- every chart of every column runs on those bins at its equal-bin threshold for a per-chart run length
  ``A`` (``rank_cusum.lattice_threshold``), and the first alarm of any of them ends a run. The mean
  run length ``L(A)`` over ``RUNS`` runs gives the group's count, ``A / L(A)`` charts;
- ``A`` is found so that the whole detector (this group and the others, which keep their union-bound
  count) alarms once per ``ert``: the fixed point of ``A = ert x (others + A / L(A))``, a few steps,
  every step on the same draws (common random numbers, so ``L`` moves only with ``A``).

The thresholds then set are the detector's usual ones at ``A`` (``rank_cusum.reference_threshold``:
raised for the reference's sampling error), so the count corrects the union bound only.

Simulating to a run length of ``ert`` costs ``RUNS x ert x columns`` chart steps: at a large ERT that is
beyond a configuration in seconds (64 features at 12,500 charted events an alarm: 16 s). Beyond
``BUDGET`` column-events a step, the group is simulated at the largest run length the budget allows
and its excess overlap over independent columns (``r - 1``, with ``r`` the independent columns' count
over the simulated one) is carried to the target run length thinned as a column's own charts' overlap
thins there (``OVERLAP``: 0.57 at 1,000 events, 0.25 at 100,000). Correlations near 1 thin more slowly
than that, so the extrapolated count errs towards more charts, i.e. fewer false alarms than asked.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from monitor.detectors import rank_cusum
from monitor.detectors.rank_cusum import BINS, Family

RUNS = 128  # simulated runs: the mean run length within about 9% (one sd)
HORIZON = 4  # a run stops at this many times the target run length (counted as censored)
BUDGET = 20_000_000  # column-events a step may simulate (about half a second on one core)
STEPS = 3  # fixed-point steps at most (the count moves little with A: two are within 2%)
CHUNK = 256  # events simulated at a time per run


@dataclass(frozen=True)
class JointCount:
    charts: float  # what the group counts for in the union bound, at the per-chart run length ``arl``
    arl: float  # per-chart run length (charted events) that gives the whole detector its ERT
    simulated_at: float  # the group's run length that was simulated (charted events)
    extrapolated: bool  # True: the target was beyond the budget (see the module docstring)


class ReferenceNull:
    """The reference's rows as the detector would score them. A draw of row ``i`` has, in column ``j``,
    the rank ``below + U{0 .. equal}`` among the reference plus itself (``below``, ``equal``: the
    reference's values below and equal to it; ``RankBins`` breaks ties the same way), and its bin's
    location score. The ties are broken ahead, ``VARIANTS`` times per row and column independently, so
    that a draw is one gather from a table of scores."""

    VARIANTS = 8

    def __init__(self, reference: np.ndarray, seed: int = 0):
        n = rank_cusum.usable_reference_size(reference.shape[0])
        ref = np.ascontiguousarray(reference[:n], dtype=np.float64)
        self.rows, self.columns = ref.shape
        per_bin = (n + 1) // BINS
        ordered = np.sort(ref, axis=0)
        rng = np.random.default_rng(seed)
        self.location = np.empty((self.VARIANTS * n, self.columns), dtype=np.int8)
        for j in range(self.columns):
            below = np.searchsorted(ordered[:, j], ref[:, j], side="left")
            equal = np.searchsorted(ordered[:, j], ref[:, j], side="right") - below
            rank = below + (rng.random((self.VARIANTS, n)) * (equal + 1)).astype(np.int64)
            self.location[:, j] = (2 * (rank // per_bin) - (BINS - 1)).ravel()
        self.digest = hashlib.sha256(ref.tobytes()).hexdigest()[:16]

    def scores(self, rng: np.random.Generator, runs: int, events: int) -> np.ndarray:
        """Location scores (columns x runs x events, int8) of ``runs x events`` rows drawn with
        replacement."""
        drawn = self.location[rng.integers(0, len(self.location), size=(runs, events))]
        return np.ascontiguousarray(np.transpose(drawn, (2, 0, 1)))


def union_run_length(null: ReferenceNull, family: Family, arl: float, runs: int, horizon: int,
                     seed: int, watch: np.ndarray | None = None) -> float:
    """Mean run length (charted events) to the first alarm of any chart of any column, every chart at
    its equal-bin threshold for ``arl``: ``sum(min(T, horizon)) / alarms`` over ``runs`` runs (the same
    draws for the same ``seed``, whatever ``arl``). ``watch`` (charts x columns, bool): the columns each
    chart watches (default: all)."""
    thresholds = [rank_cusum.lattice_threshold(rank_cusum.support(score), k, arl) for score, _, k in family]
    used = {score for score, _, _ in family}
    rng = np.random.default_rng(seed)
    columns = null.columns
    watched = np.ones((len(family), columns * runs), dtype=bool) if watch is None else np.repeat(watch, runs, axis=1)
    statistics = np.zeros((len(family), columns * runs), dtype=np.int32)
    length = np.full(runs, -1, dtype=np.int64)  # first alarm (events), -1 while running
    done = 0
    while done < horizon and (length < 0).any():
        chunk = min(CHUNK, horizon - done)
        drawn = null.scores(rng, runs, chunk).reshape(columns * runs, chunk)  # every run: the same draws
        active = np.tile(length < 0, columns)
        location = drawn[active]
        totals = {score: np.cumsum(rank_cusum.score_values(location, score), axis=1, dtype=np.int32)
                  for score in used}
        first = np.full(int(active.sum()), chunk, dtype=np.int64)
        for i, ((score, sign, k), h) in enumerate(zip(family, thresholds)):
            crossed, _, end = rank_cusum.crossings(sign * totals[score], k, h, statistics[i, active])
            statistics[i, active] = end
            first = np.where((crossed >= 0) & watched[i, active], np.minimum(first, crossed), first)
        per_run = np.full(columns * runs, chunk, dtype=np.int64)
        per_run[active] = first
        per_run = per_run.reshape(columns, runs).min(axis=0)
        ended = (length < 0) & (per_run < chunk)
        length[ended] = done + per_run[ended] + 1
        done += chunk
    alarms = int((length > 0).sum())
    total = float(np.where(length > 0, length, horizon).sum())
    return total / max(alarms, 1) if alarms else float(horizon) * runs


def independent_count(family: Family, columns: int, arl: float, watch: np.ndarray | None = None) -> float:
    """What ``columns`` independent columns with these charts count for (the union bound, with a
    column's own overlap from ``rank_cusum.OVERLAP``); ``watch``: the columns each chart watches."""
    if watch is None:
        return columns * rank_cusum.effective_charts(family, arl)
    return sum(rank_cusum.effective_charts(tuple(c for c, on in zip(family, column) if on), arl)
               for column in watch.T)


def _excess_overlap(arl: float) -> float:
    """``OVERLAP - 1`` at a per-chart run length ``arl``, as tabulated (its last entry beyond it)."""
    arls, ratios = zip(*rank_cusum.OVERLAP)
    falling = np.minimum.accumulate(ratios)
    return max(1e-3, float(np.interp(np.log(max(arl, arls[0])), np.log(arls), falling)) - 1.0)


_CACHE: dict[tuple, JointCount] = {}


def joint_count(null: ReferenceNull, family: Family, ert: float, others: float, seed: int = 0,
                runs: int = RUNS, budget: float = BUDGET, watch: np.ndarray | None = None) -> JointCount:
    """The group's count and the per-chart run length ``A`` (both in charted events) for which the
    whole detector alarms once per ``ert`` charted events, when its other charts count for ``others``
    (see the module docstring); ``watch`` (charts x columns, bool): the columns each chart watches, when
    not all. Cached by the reference's digest and the arguments."""
    key = (null.digest, family, round(ert, 6), round(others, 6), seed, runs, budget,
           None if watch is None else np.packbits(watch).tobytes())
    if key in _CACHE:
        return _CACHE[key]
    columns = null.columns
    arl = ert * (others + independent_count(family, columns, ert * columns * len(family), watch))
    target = ert  # the group's run length is at most the detector's
    affordable = budget / (runs * columns * HORIZON)
    extrapolated = target > affordable
    simulated_at = min(target, affordable)
    scale = simulated_at / target  # simulate at a shorter run length when the budget says so
    count = independent_count(family, columns, arl, watch)
    for _ in range(STEPS):
        sim_arl = max(2.0, arl * scale)
        horizon = int(HORIZON * max(simulated_at, sim_arl / max(count, 1.0)))
        length = union_run_length(null, family, sim_arl, runs, horizon, seed, watch)
        simulated = sim_arl / length
        if extrapolated:
            r = independent_count(family, columns, sim_arl, watch) / simulated
            r_target = 1 + (r - 1) * _excess_overlap(arl) / _excess_overlap(sim_arl)
            count = independent_count(family, columns, arl, watch) / r_target
        else:
            count = simulated
        new = ert * (others + count)
        converged = abs(new / arl - 1) < 0.03
        arl = new
        if converged:
            break
    result = JointCount(charts=float(count), arl=float(arl), simulated_at=float(simulated_at),
                        extrapolated=extrapolated)
    if len(_CACHE) > 256:
        _CACHE.clear()
    _CACHE[key] = result
    return result
