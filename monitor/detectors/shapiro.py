"""The Shapiro-Wilk W statistic for many samples of one size at once (Royston 1992's coefficients).

``scipy.stats.shapiro`` tests one sample a call (tens of µs); the probing detector tests the recent
distances of many clients per batch, all of the same size, so the coefficients are computed once per
size and W is a sort and two reductions over a matrix. W = (sum a_i x_(i))^2 / sum (x_i - mean)^2.

>>> import numpy as np
>>> from scipy import stats
>>> x = np.random.default_rng(0).exponential(size=(3, 100))
>>> bool(np.allclose(w_statistic(x), [stats.shapiro(row).statistic for row in x], atol=1e-4))
True
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from scipy import stats


@lru_cache(maxsize=16)
def coefficients(n: int) -> np.ndarray:
    """Royston's (1992) approximation of the Shapiro-Wilk coefficients for samples of ``n`` (>= 6),
    as in AS R94 (the algorithm behind scipy's ``shapiro``)."""
    if n < 6:
        raise ValueError(f"Shapiro-Wilk needs at least 6 values, got {n}")
    m = stats.norm.ppf((np.arange(1, n + 1) - 0.375) / (n + 0.25))
    mm = float(m @ m)
    u = 1.0 / np.sqrt(n)
    c = m / np.sqrt(mm)
    a = np.empty(n)
    a_n = c[-1] + 0.221157 * u - 0.147981 * u**2 - 2.071190 * u**3 + 4.434685 * u**4 - 2.706056 * u**5
    a_n1 = c[-2] + 0.042981 * u - 0.293762 * u**2 - 1.752461 * u**3 + 5.682633 * u**4 - 3.582633 * u**5
    phi = (mm - 2 * m[-1] ** 2 - 2 * m[-2] ** 2) / (1 - 2 * a_n**2 - 2 * a_n1**2)
    a[2:-2] = m[2:-2] / np.sqrt(phi)
    a[-1], a[-2], a[0], a[1] = a_n, a_n1, -a_n, -a_n1
    return a


def w_statistic(samples: np.ndarray) -> np.ndarray:
    """W of each row of ``samples`` (rows of one size); 1.0 for a row with no spread."""
    x = np.sort(samples, axis=1)
    spread = ((x - x.mean(axis=1, keepdims=True)) ** 2).sum(axis=1)
    numerator = (x @ coefficients(x.shape[1])) ** 2
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(spread > 0, numerator / np.where(spread > 0, spread, 1.0), 1.0)
