"""The Bernoulli CUSUM and its threshold for a chosen expected run time (ERT) between false alarms.

The chart (Reynolds & Stoumbos 1999) accumulates the log-likelihood ratio of a rate ``p1`` against the
in-control rate ``p0`` of a 0/1 stream::

    S_t = max(0, S_{t-1} + w(x_t)),   w(1) = ln(p1/p0),   w(0) = ln((1-p1)/(1-p0))

and alarms when ``S_t > h``. The in-control run length is found without simulation, by the Markov chain
of Brook & Evans (1972): the two increments are put on a grid (``w(1) = a·δ``, ``w(0) = -b·δ`` with whole
``a`` and ``b``), the chart is a chain on the grid points below ``h``, and the average run length from 0 is
the solution of ``(I - Q) L = 1``. ``threshold_for_ert`` searches the grid point whose run length first
reaches the ERT, so the false-alarm rate is set, not hoped for. ``run`` uses the grid's increments (the smaller
one rounded by at most half of 1/200 of the larger), so the chart that runs is the chart that was
calibrated; the tests check it against simulated run lengths.

>>> h = threshold_for_ert(p0=0.05, p1=0.15, ert=1000)
>>> round(average_run_length(0.05, 0.15, h, p=0.05))  # doctest: +SKIP
1000
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from scipy import sparse
from scipy.sparse import linalg as sparse_linalg

_STEPS_PER_UP = 200


def weights(p0: float, p1: float) -> tuple[float, float]:
    """(w(1), w(0)): the log-likelihood-ratio increments of an indicator of 1 and of 0."""
    return math.log(p1 / p0), math.log((1 - p1) / (1 - p0))


def _grid(p0: float, p1: float) -> tuple[int, int, float]:
    """(a, b, step): the larger of the two increments is 200 steps, the other the nearest whole number
    of steps (so a frequent indicator, whose 0 weighs more than its 1, keeps a small chain)."""
    up, down = weights(p0, p1)
    if up >= -down:
        step = up / _STEPS_PER_UP
        return _STEPS_PER_UP, max(1, round(-down / step)), step
    step = -down / _STEPS_PER_UP
    return max(1, round(up / step)), _STEPS_PER_UP, step


def _run_length(a: int, b: int, states: int, p: float) -> float:
    """Average run length from 0 of the chain on ``states`` grid points (0 .. states-1; above: alarm)."""
    # Q[i, j]: from i, a 1 (probability p) moves up a steps, a 0 moves down b steps (floored at 0).
    # Two entries a row: a sparse solve takes milliseconds where a dense one takes a second at 3000 states.
    rows = np.arange(states)
    up = rows + a
    keep = up < states
    q = sparse.csr_matrix(
        (np.concatenate([np.full(int(keep.sum()), p), np.full(states, 1 - p)]),
         (np.concatenate([rows[keep], rows]), np.concatenate([up[keep], np.maximum(rows - b, 0)]))),
        shape=(states, states))
    return float(sparse_linalg.spsolve((sparse.identity(states, format="csc") - q).tocsc(), np.ones(states))[0])


def average_run_length(p0: float, p1: float, h: float, p: float | None = None) -> float:
    """Average number of events to the first alarm when the true rate is ``p`` (default ``p0``)."""
    a, b, step = _grid(p0, p1)
    return _run_length(a, b, int(h / step) + 1, p0 if p is None else p)


@lru_cache(maxsize=256)
def threshold_for_ert(p0: float, p1: float, ert: float) -> float:
    """The smallest ``h`` whose in-control average run length reaches ``ert`` (cached: one search per
    model and parameters, a fraction of a second)."""
    if not 0 < p0 < p1 < 1:
        raise ValueError(f"expected 0 < p0 < p1 < 1, got p0={p0}, p1={p1}")
    a, b, step = _grid(p0, p1)
    low, high = 1, a  # grid points; grow the upper bound until it reaches the ERT
    while _run_length(a, b, high, p0) < ert:
        low, high = high, high * 2
        if high > 2_000_000:
            raise ValueError(f"ERT {ert} needs a threshold beyond the calibration grid")
    while high - low > 1:
        mid = (low + high) // 2
        if _run_length(a, b, mid, p0) >= ert:
            high = mid
        else:
            low = mid
    return (high - 1) * step + step / 2  # between grid points: S above it means a state >= high


def run(indicators: np.ndarray, p0: float, p1: float, h: float, start: float = 0.0) -> tuple[np.ndarray, float]:
    """The CUSUM over a batch of 0/1 indicators, vectorised: (indices of alarms, statistic at the end).

    After an alarm the statistic restarts at 0. Within a stretch without alarm the recursion has the
    closed form ``S_t = C_t - min(0, min_{j<=t} C_j)`` with ``C`` the running sum from ``start``
    (Lindley's recursion solved by a cumulative minimum).
    """
    a, b, step = _grid(p0, p1)  # the increments on the calibration grid, so the ERT holds exactly
    w = np.where(indicators > 0, a * step, -b * step)
    alarms = []
    offset, s0 = 0, start
    if len(w) == 0:
        return np.asarray(alarms, dtype=np.int64), float(start)
    while offset < len(w):
        c = s0 + np.cumsum(w[offset:])
        s = c - np.minimum(np.minimum.accumulate(c), 0.0)
        over = np.flatnonzero(s > h)
        if over.size == 0:
            return np.asarray(alarms, dtype=np.int64), float(s[-1])
        first = int(over[0])
        alarms.append(offset + first)
        offset += first + 1
        s0 = 0.0
    return np.asarray(alarms, dtype=np.int64), 0.0


def per_segment(steps: np.ndarray, starts: np.ndarray, lengths: np.ndarray, start: np.ndarray) -> np.ndarray:
    """The CUSUM statistic after each step, for many streams laid end to end (stream ``j`` is
    ``steps[starts[j]: starts[j] + lengths[j]]``, starting from ``start[j]``), every stream at once:
    Lindley's recursion ``S = C - min(0, running min of C)`` with ``C`` each stream's running sum, the
    running minimum restarted per stream by shifting each stream below all earlier ones (by a small
    multiple of the range of ``C``, so float64 keeps its precision)."""
    if len(steps) == 0:
        return np.zeros(0)
    c = np.cumsum(steps)
    c = c - np.repeat(c[starts] - steps[starts], lengths) + np.repeat(start, lengths)
    spread = float(c.max() - c.min()) + 1.0
    shift = np.repeat(np.arange(len(starts), dtype=np.float64) * -spread, lengths)
    running = np.minimum.accumulate(c + shift) - shift
    return c - np.minimum(running, 0.0)


def adjustment(values: np.ndarray, probs: np.ndarray, k: float) -> np.ndarray:
    """Per row of ``probs``, the positive root ``theta`` of ``log E exp(theta (x - k)) = 0`` for
    increments ``x - k`` with negative mean: a CUSUM's run length grows as ``exp(theta h)``
    (Cramer-Lundberg), so ``theta`` is how its false-alarm rate falls with the threshold. The log of
    the expectation is convex and 0 at 0, so the root is bracketed and bisected (log-sum-exp: no
    overflow), every row at once."""
    x = np.asarray(values, dtype=np.float64)[None, :] - k
    logp = np.log(np.where(probs > 0, probs, 1e-300))

    def f(theta: np.ndarray) -> np.ndarray:
        z = theta[:, None] * x + logp
        top = z.max(axis=1)
        return top + np.log(np.exp(z - top[:, None]).sum(axis=1))

    low = np.zeros(len(probs))
    high = np.full(len(probs), 1.0 / max(float(np.abs(x).max()), 1e-12))
    for _ in range(200):
        grow = f(high) < 0
        if not grow.any():
            break
        high = np.where(grow, high * 2, high)
    for _ in range(60):
        mid = (low + high) / 2
        below = f(mid) < 0
        low, high = np.where(below, mid, low), np.where(below, high, mid)
    return high


def tuning_floor(p0: float, n: int, tail: float = 1e-5) -> float:
    """The smallest ``p1`` whose chart still drifts down at every rate a reference of ``n`` events with
    share ``p0`` leaves open (up to its Beta posterior's ``1 - tail`` quantile)."""
    from scipy import stats

    top = float(stats.beta.ppf(1 - tail, n * p0 + 0.5, n * (1 - p0) + 0.5))
    low, high = p0, 1.0 - 1e-9
    for _ in range(60):  # the rate at which the chart has no drift rises with p1
        mid = (low + high) / 2
        up, down = weights(p0, mid)
        low, high = (mid, high) if -down / (up - down) <= top else (low, mid)
    return high


@lru_cache(maxsize=1024)
def threshold_for_estimated_rate(p0: float, p1: float, ert: float, n: int, draws: int = 2000) -> float:
    """``threshold_for_ert`` for a ``p0`` estimated from ``n`` reference events: the threshold whose
    false-alarm rate, averaged over the rates the reference is compatible with (Beta(n p0 + 1/2,
    n (1 - p0) + 1/2)), is one per ``ert`` events. Each rate's run length is taken as the exact one at
    ``p0`` times ``exp((theta_p - theta_p0) h)`` (``adjustment``), as in ``rank_cusum``. Raises
    ValueError when rates the reference cannot rule out would make the chart drift up (``p1`` too
    close to ``p0`` for so small a reference)."""
    h0 = threshold_for_ert(p0, p1, ert)
    a, b, step = _grid(p0, p1)
    values = np.asarray([a * step, -b * step])
    rates = np.random.default_rng(n).beta(n * p0 + 0.5, n * (1 - p0) + 0.5, size=draws)
    theta = adjustment(values, np.c_[rates, 1 - rates], 0.0)
    if np.mean(values[0] * rates + values[1] * (1 - rates) >= 0) > 1 / draws:
        raise ValueError(f"p1={p1:.4g} is too close to p0={p0:.4g} estimated from {n} events")
    theta0 = adjustment(values, np.asarray([[p0, 1 - p0]]), 0.0)[0]
    log_arl0 = math.log(average_run_length(p0, p1, h0))

    def rate(h: float) -> float:
        return float(np.mean(np.exp(-drawn_log_arl(theta, h, h0, log_arl0, theta0))))

    return threshold_for_rate(rate, 1 / ert, step, h0, 1e6)


def drawn_log_arl(theta: np.ndarray, h: float, h0: float, log_arl0: float, theta0: float) -> np.ndarray:
    """log run length at threshold ``h`` of charts whose increments have adjustment ``theta``, from
    the exact ``log_arl0`` at ``h0`` of the chart the threshold was first computed for (adjustment
    ``theta0``): the run length grows as ``exp(theta h)``, so ``log_arl0 + theta0 (h - h0) +
    (theta - theta0) h``."""
    return log_arl0 + theta0 * (h - h0) + (theta - theta0) * h


def threshold_for_rate(rate, target: float, low: float, start: float, limit: float) -> float:
    """The smallest threshold (within 1e-9 relative) whose ``rate(h)``, decreasing in ``h``, is at most
    ``target``: a doubling from ``start``, then a bisection."""
    high = start
    while rate(high) > target:
        low, high = high, high * 2
        if high > limit:
            raise ValueError(f"a false-alarm rate of {target:.3g} is out of reach (threshold beyond {limit:g})")
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (low, mid) if rate(mid) <= target else (mid, high)
    return high
