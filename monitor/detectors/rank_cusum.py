"""Rank CUSUM charts: distribution-free change detection on many streams at one calibrated ERT.

Each value is placed among the reference by its rank, with ties broken at random (the randomized
probability integral transform), and the rank is cut into ``BINS`` equal bins. Under no change the bin
of a new value is uniform on ``0 .. BINS-1`` whatever the stream's distribution, because the rank of
one more draw among ``N`` exchangeable draws is uniform; the reference is trimmed to ``N + 1`` a
multiple of ``BINS`` so that the bins are exactly equal. Two integer scores are read off the bin::

    location    c = 2·bin - (BINS - 1)      uniform on the odd numbers -63 .. 63
    spread      s = |c| - BINS / 2          uniform on the odd numbers -31 .. 31
    winsorized  w = clip(c, -21, 21)        c with the outer 22 bins at each end flattened

and CUSUM charts (Page 1954) accumulate them, one upward and one downward per score and tuning::

    S_t = max(0, S_{t-1} + x_t - k)    alarm when S_t >= H

``S_t`` is the largest sum of ``x - k`` over every window ending at ``t``, so one chart scans all window
lengths at once; the tuning ``k`` (half the score's mean under the shift the chart is for) decides
which windows win: a small ``k`` accumulates a small shift over a long window, a large ``k`` reacts to
a large shift in a few events. A large ``k`` on ``c`` still weighs an event by how far out it falls,
which suits a normal stream's shift; when the bulk of a skewed column moves (``+0.5 sd`` of a
long-tailed feature empties its lowest bins), what counts is how many events leave the lower third,
and ``w`` weighs them so (1.5-1.9x ``c``'s information on breast-cancer's skewed features). The charts may read sums of ``block`` events' scores (a chart step per
block), which divides their work by ``block``.

Since the scores are integers with a known null law, the in-control run length is computed exactly by
the Markov chain of Brook & Evans (1972) on the states ``0 .. H-1``, with no simulation and no
dependence on the data (``lattice_threshold``). One thing does depend on the reference: its sampling
error makes the bins a little unequal, which at a large ERT changes the false-alarm rate of a chart
tuned to a small shift several-fold. ``reference_threshold`` raises the threshold so that the rate
averaged over that sampling error (whose law is known, the same for every continuous stream) is the
nominal one. Both are cached by their parameters: one calibration serves every feature of every
model with the same reference size. The tests check the chains against simulated and real-model
run lengths.

>>> H = lattice_threshold(LOCATION, 9, 1000.0)
>>> 950 < lattice_arl(LOCATION, 9, H) and lattice_arl(LOCATION, 9, H - 2) < 1000
True
"""

from __future__ import annotations

import zlib
from functools import lru_cache

import numpy as np
from scipy import sparse, stats
from scipy.sparse import linalg as sparse_linalg

from monitor.detectors.cusum import adjustment, drawn_log_arl, threshold_for_rate

BINS = 64
LOCATION: tuple[int, ...] = tuple(range(-(BINS - 1), BINS, 2))
SPREAD: tuple[int, ...] = tuple(range(-(BINS // 2 - 1), BINS // 2, 2))
WINSOR = 21  # the winsorized score's bound: bins 22 .. 41 keep their steps, the 22 at each end are flat
# a support lists each bin's score (repeats allowed): under no change the score is uniform on it
WINSORIZED: tuple[int, ...] = tuple(int(v) for v in np.clip(LOCATION, -WINSOR, WINSOR))


def support(score: str) -> tuple[int, ...]:
    """The scores of the 64 bins (or of 32 bin pairs, for the spread) for ``score``."""
    return {"location": LOCATION, "spread": SPREAD, "winsorized": WINSORIZED}[score]


def score_values(location: np.ndarray, score: str) -> np.ndarray:
    """``score`` of events whose location scores are ``location`` (see the module docstring)."""
    if score == "location":
        return location
    if score == "spread":
        return np.abs(location.astype(np.int16)) - BINS // 2
    return np.clip(location, -WINSOR, WINSOR)


@lru_cache(maxsize=8)
def bin_scores(score: str) -> np.ndarray:
    """``score`` of each of the ``BINS`` bins, lowest bin first (float64, read-only)."""
    out = score_values(np.asarray(LOCATION, dtype=np.int64), score).astype(np.float64)
    out.flags.writeable = False
    return out


def usable_reference_size(n: int) -> int:
    """The largest ``N <= n`` with ``N + 1`` a multiple of ``BINS`` (equal bins without randomness)."""
    return max(0, (n + 1) // BINS * BINS - 1)


# -- calibration ---------------------------------------------------------------------------------


def block_steps(values: np.ndarray, probs: np.ndarray, k: int, block: int) -> tuple[np.ndarray, np.ndarray, int]:
    """The increments of a chart on sums of ``block`` scores (``values``, evenly spaced and ascending,
    with ``probs``) less ``block·k``, their probabilities, and their common divisor ``g``: the
    increments come in units of ``g`` (the statistic is always a multiple of it, so the chain needs only
    every ``g``-th state)."""
    pmf = probs
    for _ in range(block - 1):
        pmf = np.convolve(pmf, probs)
    sums = block * int(values[0]) + int(values[1] - values[0]) * np.arange(len(pmf), dtype=np.int64)
    keep = pmf > 1e-300
    steps = sums[keep] - block * k
    g = int(np.gcd.reduce(np.abs(steps[steps != 0]))) or 1
    return steps // g, pmf[keep], g


@lru_cache(maxsize=64)
def _steps(support: tuple[int, ...], k: int, block: int) -> tuple[np.ndarray, np.ndarray, int]:
    """``block_steps`` for scores uniform on ``support`` (equal bins; a repeated score adds up)."""
    values, counts = np.unique(np.asarray(support, dtype=np.int64), return_counts=True)
    return block_steps(values, counts / len(support), k, block)


def lattice_arl(support: tuple[int, ...], k: int, h: int, block: int = 1) -> float:
    """Average run length, in blocks, from 0 of ``S = max(0, S + x - block·k)`` with ``x`` the sum of
    ``block`` scores uniform on ``support``, alarm at ``S >= h``: the solution at 0 of ``(I - Q) L = 1``
    on the in-control states."""
    steps, probs, g = _steps(support, k, block)
    return _arl(steps, probs, -(-h // g))


def _arl(steps: np.ndarray, probs: np.ndarray, h: int) -> float:
    if h <= 0:
        return 1.0
    states = np.arange(h, dtype=np.int64)
    to = np.maximum(states[:, None] + steps[None, :], 0)
    keep = to < h
    rows = np.broadcast_to(states[:, None], to.shape)[keep]
    weights = np.broadcast_to(probs[None, :], to.shape)[keep]
    q = sparse.csr_matrix((weights, (rows, to[keep])), shape=(h, h))  # duplicates (the floor at 0) add up
    system = (sparse.identity(h, format="csc") - q).tocsc()
    return float(sparse_linalg.spsolve(system, np.ones(h))[0])


@lru_cache(maxsize=512)
def lattice_threshold(support: tuple[int, ...], k: int, arl: float, block: int = 1) -> int:
    """The smallest ``H`` whose in-control average run length reaches ``arl`` blocks (a doubling, then
    a bisection on whole states: milliseconds a solve, a fraction of a second a threshold)."""
    if arl <= 1:
        return 1
    if sum(support) / len(support) - k >= 0:
        raise ValueError(f"k={k} gives the chart no downward drift: its run length is not bounded")
    steps, probs, g = _steps(support, k, block)
    low, high = 0, max(8, 2 * int(steps.max()))
    while _arl(steps, probs, high) < arl:
        low, high = high, high * 2
        if high > 1_000_000:
            raise ValueError(f"an ERT of {arl:.3g} needs a threshold beyond the calibration range")
    while high - low > 1:
        mid = (low + high) // 2
        if _arl(steps, probs, mid) >= arl:
            high = mid
        else:
            low = mid
    return high * g


# -- the reference's sampling error -------------------------------------------------------------

DRAWS = 4000  # draws of the reference's spacings (cheap: one root per draw, no chain solve)


@lru_cache(maxsize=16)
def reference_laws(per_bin: int) -> np.ndarray:
    """Bin probabilities given a reference, one row per draw of the reference. They are the spacings of
    uniform order statistics ``per_bin`` apart, so Dirichlet(per_bin, ..., per_bin) whatever the data."""
    return np.random.default_rng(per_bin).dirichlet(np.full(BINS, float(per_bin)), size=DRAWS)


def score_laws(p: np.ndarray, score: str, sign: int) -> tuple[np.ndarray, np.ndarray]:
    """(score values, their probabilities per row of bin probabilities ``p``) for one chart."""
    per_bin = bin_scores(score)
    if score == "location":
        return sign * per_bin, p
    values = np.unique(per_bin)
    probs = np.zeros((p.shape[0], len(values)))
    np.add.at(probs, (slice(None), np.searchsorted(values, per_bin)), p)
    return sign * values, probs


def law_arl(p: np.ndarray, score: str, sign: int, k: int, h: int, block: int) -> float:
    """The chain's run length, in blocks, when the bins have probabilities ``p`` (a drawn reference)."""
    values, probs = score_laws(p[None, :], score, sign)
    order = np.argsort(values)
    steps, pmf, g = block_steps(values[order].astype(np.int64), probs[0][order], k, block)
    return _arl(steps, pmf, -(-h // g))


EXACT = 16  # drawn references whose run length is solved exactly, to correct the approximation


@lru_cache(maxsize=256)
def _run_length_model(score: str, sign: int, k: int, arl: float, block: int,
                      per_bin: int) -> tuple[int, float, float, np.ndarray]:
    """(h0, log ARL at h0 for equal bins, theta for equal bins, correction polynomial in theta)."""
    h0 = lattice_threshold(support(score), k, arl, block)
    values, probs = score_laws(reference_laws(per_bin), score, sign)
    theta_equal = adjustment(values, np.full((1, len(values)), 1.0 / len(values)), k)[0]
    theta = adjustment(values, probs, k)
    log_arl0 = float(np.log(lattice_arl(support(score), k, h0, block)))
    # Taking every draw's constant factor as equal bins' one errs (towards shorter run lengths) for
    # draws far from equal bins: exact chains for draws spread over the range of theta measure the
    # error, and a quadratic in theta corrects it.
    laws = reference_laws(per_bin)
    picked = np.argsort(theta)[np.linspace(0, len(theta) - 1, EXACT).astype(int)]
    error = [np.log(law_arl(laws[i], score, sign, k, h0, block)) - drawn_log_arl(theta[i], h0, h0, log_arl0, theta_equal)
             for i in picked]
    return h0, log_arl0, float(theta_equal), np.polyfit(theta[picked], error, 2)


def draw_log_arl(p: np.ndarray, score: str, sign: int, k: int, arl: float, block: int, per_bin: int,
                 h: float) -> np.ndarray:
    """log run length (blocks) at threshold ``h`` of references whose bins have probabilities ``p``
    (rows): equal bins' exact one, times ``exp((theta_draw - theta_equal) h)`` (the run length grows
    as ``exp(theta h)``, see ``adjustment``), corrected by exact chains of a few draws."""
    return _log_arl(adjustment(*score_laws(p, score, sign), k), score, sign, k, arl, block, per_bin, h)


def _log_arl(theta: np.ndarray, score: str, sign: int, k: int, arl: float, block: int, per_bin: int,
             h: float) -> np.ndarray:
    h0, log_arl0, theta_equal, correction = _run_length_model(score, sign, k, arl, block, per_bin)
    return drawn_log_arl(theta, h, h0, log_arl0, theta_equal) + np.polyval(correction, theta)


@lru_cache(maxsize=256)
def reference_threshold(score: str, sign: int, k: int, arl: float, block: int, per_bin: int) -> int:
    """The threshold whose false-alarm rate, averaged over the sampling error of a reference of
    ``64·per_bin - 1`` values, is one per ``arl`` blocks.

    With the reference fixed, the bins are not exactly equal: their probabilities are the reference's
    uniform spacings (``reference_laws``). A chart tuned to a small shift is sensitive to that: at a
    large ERT, a reference whose middle bins are a little wide can alarm several times more often than
    the nominal rate. So the threshold for equal bins (exact, by the chain) is raised until the mean
    rate over 4,000 draws of the spacings is the nominal one, each draw's run length by
    ``draw_log_arl``; the tests check that against exact chains of other drawn references.
    """
    if score != "spread" and sign < 0:  # the spacings' law is symmetric: a fall is a mirrored rise
        return reference_threshold(score, 1, k, arl, block, per_bin)
    h0 = _run_length_model(score, sign, k, arl, block, per_bin)[0]
    theta = adjustment(*score_laws(reference_laws(per_bin), score, sign), k)

    def rate(h: float) -> float:  # false alarms per block, averaged over the draws
        return float(np.mean(np.exp(-_log_arl(theta, score, sign, k, arl, block, per_bin, h))))

    high = threshold_for_rate(rate, 1 / arl, 1.0, float(h0), 1e7)
    g = _steps(support(score), k, block)[2]
    return int(-(-high // g) * g)


def rounded_arl(arl: float) -> float:
    """``arl`` rounded to the nearest eighth of an octave (within 4.5%), so that models whose numbers of
    charts differ a little share their calibrations."""
    return float(2 ** (np.round(np.log2(arl) * 8) / 8))


def location_k(shift_sd: float) -> int:
    """``k`` for the location score, tuned to a mean shift of ``shift_sd`` reference sd of a normal
    stream: half the expected score under that shift (rounded to a whole step)."""
    return max(1, round(float(_normal_bins(lambda q: stats.norm.cdf(q - shift_sd)) @ bin_scores("location")) / 2))


def spread_k(ratio: float) -> int:
    """``k`` for the spread score, tuned to the sd multiplied by ``ratio`` (> 1 up, < 1 down)."""
    expected = float(_normal_bins(lambda q: stats.norm.cdf(q / ratio)) @ bin_scores("spread"))
    return max(1, round(abs(expected) / 2))


@lru_cache(maxsize=32)
def winsorized_k(shift_sd: float) -> int:
    """``k`` for the winsorized score, tuned to a mean shift of ``shift_sd`` reference sd of a normal
    stream: the ``k`` with the largest rate ``theta(k)·(E[w] - k)`` (the chart's delay is about
    ``log(ARL) / rate``, with ``theta`` the root of ``adjustment``). Half the expected score, as
    ``location_k`` takes, is far from it for a score this bounded (2 sd: 10 where the best is 15)."""
    shifted = _normal_bins(lambda q: stats.norm.cdf(q - shift_sd))
    ks = [k for k in range(1, WINSOR) if k < shifted @ bin_scores("winsorized")]
    if not ks:
        return 1
    return ks[int(np.argmax([drift_rate("winsorized", 1, k, shifted)[0] for k in ks]))]


@lru_cache(maxsize=256)
def _null_theta(score: str, sign: int, k: int) -> float:
    return float(adjustment(sign * bin_scores(score), np.full((1, BINS), 1.0 / BINS), k)[0])


def drift_rate(score: str, sign: int, k: int, q: np.ndarray) -> np.ndarray:
    """How fast a chart moves towards its threshold when the bins have probabilities ``q`` (rows):
    ``theta·(E_q[score] - k)``, with ``theta`` the root of ``cusum.adjustment`` for no change. Its delay
    is about ``log(ARL) / rate`` (the threshold is about ``log(ARL) / theta``); not positive: the chart
    does not move towards it at all."""
    return _null_theta(score, sign, k) * (np.atleast_2d(q) @ (sign * bin_scores(score)) - k)


def _normal_bins(cdf) -> np.ndarray:
    """The bins' probabilities for a normal stream, changed so that its cdf is ``cdf``."""
    edges = stats.norm.ppf(np.arange(1, BINS) / BINS)
    return np.diff(np.concatenate([[0.0], cdf(edges), [1.0]]))


# -- running ---------------------------------------------------------------------------------------


def crossings(total: np.ndarray, k: int, h: int, start: np.ndarray,
              soon: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One chart over a batch, every column at once.

    ``total`` is the running sum of the increments' scores (columns x steps, int), negated for a
    downward chart, and ``k`` the allowance per step. Lindley's recursion from ``start`` has the closed
    form ``S_t = D_t - min(0, min_{j<=t} D_j)`` with ``D_t = start + total_t - k·(t+1)``. Returns (the
    step of the first crossing per column or -1, the statistic ``soon`` steps after it (or at the end,
    if sooner), the statistic at the end).
    """
    steps = total.shape[1]
    d = total - k * np.arange(1, steps + 1, dtype=total.dtype)
    d += start.astype(total.dtype)[:, None]
    floor = np.minimum.accumulate(d, axis=1)
    np.minimum(floor, 0, out=floor)
    d -= floor  # now S
    over = d >= h
    crossed = over.any(axis=1)
    first = np.where(crossed, over.argmax(axis=1), -1)
    at = np.where(crossed, d[np.arange(d.shape[0]), np.minimum(np.maximum(first, 0) + soon, steps - 1)], 0)
    return first, at, d[:, -1].copy()


class RankBins:
    """Columns' reference and the map from new values to their uniform bins.

    A value's bin is ``rank // (N+1)/BINS`` with ``rank`` the number of reference values below it;
    that is the number of the reference's ``BINS - 1`` bin edges (its order statistics at multiples of
    ``(N+1)/BINS``) below it, so a column needs only its edges (a search among 63 values). A column
    where an edge's value repeats in the reference also keeps its whole sorted reference, to break
    the ties of values equal to an edge at random.
    """

    def __init__(self, reference: np.ndarray):
        """``reference``: n x m, NaN-free columns (the caller drops rows with NaN)."""
        n = usable_reference_size(reference.shape[0])
        ordered = np.sort(reference[:n], axis=0)
        self.size = n
        self.per_bin = (n + 1) // BINS
        self.edges = np.ascontiguousarray(ordered[self.per_bin - 1:: self.per_bin][: BINS - 1].T)
        # Ties matter where a value can equal an edge with a probability that counts: where an edge's
        # value occurs more than once in the reference (a rounded continuous feature has a few
        # repeats, rarely at an edge; a count or a pixel has them everywhere).
        tied = [j for j in range(ordered.shape[1])
                if (np.searchsorted(ordered[:, j], self.edges[j], side="right")
                    - np.searchsorted(ordered[:, j], self.edges[j], side="left")).max(initial=0) > 1]
        self.tied = {j: ordered[:, j].copy() for j in tied}
        # Ties are broken by a generator seeded from the reference: the same input gives the same
        # output (a replay repeats a run), and different references draw independently.
        self._rng = np.random.default_rng(zlib.crc32(ordered.tobytes()))

    def bins(self, values: np.ndarray) -> np.ndarray:
        """The bins (columns x n, int16) of ``values`` (n x columns, no NaN), uniform under no change."""
        out = np.empty((values.shape[1], values.shape[0]), dtype=np.int16)
        columns = np.ascontiguousarray(values.T)
        for j, column in enumerate(columns):
            edges = self.edges[j]
            out[j] = np.searchsorted(edges, column, side="left")
            reference = self.tied.get(j)
            if reference is None:
                continue
            # A value equal to no edge has all its ties inside one bin: the count of edges below it is
            # its bin. Only values equal to an edge need their rank among the ties drawn.
            on_edge = np.flatnonzero(edges[np.minimum(out[j], BINS - 2)] == column)  # the first edge >= x is x
            if on_edge.size:
                values = column[on_edge]
                below = np.searchsorted(reference, values, side="left")
                equal = np.searchsorted(reference, values, side="right") - below
                # the rank among the reference plus this value, ties in random order: uniform on 0..N
                rank = below + (self._rng.random(len(below)) * (equal + 1)).astype(np.int64)
                out[j, on_edge] = rank // self.per_bin
        return out


def location_scores(bins: np.ndarray) -> np.ndarray:
    """The location scores of the bins (see the module docstring); ``score_values`` gives the others."""
    return 2 * bins - (BINS - 1)


# -- the charts of one column together ------------------------------------------------------------

Family = tuple[tuple[str, int, int], ...]  # (score, sign, k) of each chart on one column


def family_overlap(family: Family, arl: float, runs: int, seed: int = 0) -> float:
    """How much longer than the union bound says the charts of one column run, together, to their
    first false alarm: (mean run length of the first alarm of any of them, simulated on equal bins) /
    (``arl / len(family)``), each chart at its equal-bin threshold for ``arl``.

    The union bound counts the charts as if they never alarmed together; charts tuned to nearby
    shifts on the same scores do, so the family runs longer than it. The ratio falls towards 1 as
    ``arl`` grows (rarer alarms take more different paths); it depends on nothing but the family and
    ``arl``, so ``OVERLAP`` tabulates it once (``bench/chart_overlap.py``)."""
    rng = np.random.default_rng(seed)
    thresholds = [lattice_threshold(support(score), k, arl) for score, _, k in family]
    lengths = np.zeros(runs, dtype=np.int64)  # the runs' first alarms (the censored: their length)
    for group in np.array_split(np.arange(runs), -(-runs // 1024)):
        statistics = np.zeros((len(family), len(group)), dtype=np.int64)
        active, done = group, 0
        chunk = int(min(4096, max(64, arl / len(family) / 4)))
        while len(active) and done < 100 * arl:
            location = location_scores(rng.integers(0, BINS, (len(active), chunk)))
            totals = {score: np.cumsum(score_values(location, score), axis=1, dtype=np.int32)
                      for score in {score for score, _, _ in family}}
            first = np.full(len(active), chunk, dtype=np.int64)
            for i, ((score, sign, k), h) in enumerate(zip(family, thresholds)):
                crossed, _, statistics[i] = crossings(sign * totals[score], k, h, statistics[i])
                first = np.where(crossed >= 0, np.minimum(first, crossed), first)
            done += chunk
            ended = first < chunk
            lengths[active[ended]] = done - chunk + first[ended] + 1
            active, statistics = active[~ended], statistics[:, ~ended]
        lengths[active] = done  # censored runs count as their length: errs towards a lower ratio
    return float(lengths.mean() / (arl / len(family)))


# family_overlap of drift's default charts (shifts 0.5, 1 and 2 sd, spread x1.5) by bench/chart_overlap.py
# (1,000-20,000 runs an entry, standard errors 0.7-3.6%)
OVERLAP_FAMILY: Family = (("location", 1, 9), ("location", -1, 9), ("location", 1, 17), ("location", -1, 17),
                          ("location", 1, 27), ("location", -1, 27), ("spread", 1, 4), ("spread", -1, 4))
OVERLAP: tuple[tuple[float, float], ...] = (
    (100, 1.999), (316, 1.753), (1000, 1.568), (3162, 1.476), (10000, 1.377), (31623, 1.324), (100000, 1.252),
    (316228, 1.197), (1000000, 1.264), (3162278, 1.132), (10000000, 1.124))


def effective_charts(family: Family, arl: float) -> float:
    """What the charts of one column count for in a union bound at a per-chart run length ``arl``:
    ``len(family) / overlap``, with the overlap of the default family read from ``OVERLAP``
    (interpolated in log run length, never above an entry at a shorter run length, since the true ratio
    falls; below the table, its first entry). Another family, or a run length beyond the table, counts in
    full: the union bound, which errs towards fewer false alarms. So do charts added after the default
    family (the winsorized ones): the default family counts as tabulated, each added chart as one."""
    base = len(OVERLAP_FAMILY)
    if family[:base] != OVERLAP_FAMILY or arl > OVERLAP[-1][0]:
        return float(len(family))
    arls, ratios = zip(*OVERLAP)
    falling = np.minimum.accumulate(ratios)
    return base / max(1.0, float(np.interp(np.log(arl), np.log(arls), falling))) + len(family) - base
