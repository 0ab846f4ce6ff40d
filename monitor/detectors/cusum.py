"""The Bernoulli CUSUM and its threshold for a chosen expected run time (ERT) between false alarms.

The chart (Reynolds & Stoumbos 1999) accumulates the log-likelihood ratio of a rate ``p1`` against the
in-control rate ``p0`` of a 0/1 stream::

    S_t = max(0, S_{t-1} + w(x_t)),   w(1) = ln(p1/p0),   w(0) = ln((1-p1)/(1-p0))

and alarms when ``S_t > h``. The in-control run length is found without simulation, by the Markov chain
of Brook & Evans (1972): the two increments are put on a grid (``w(1) = a·δ``, ``w(0) = -b·δ`` with whole
``a`` and ``b``), the chart is a chain on the grid points below ``h``, and the average run length from 0 is
the solution of ``(I - Q) L = 1``. ``threshold_for_ert`` searches the grid point whose run length first
reaches the ERT, so the false-alarm rate is set, not hoped for. ``run`` uses the grid's increments (``w(0)``
rounded by at most half of 1/200 of ``w(1)``), so the chart that runs is the chart that was calibrated;
the tests check it against simulated run lengths.

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
    up, down = weights(p0, p1)
    step = up / _STEPS_PER_UP
    return _STEPS_PER_UP, max(1, round(-down / step)), step


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
