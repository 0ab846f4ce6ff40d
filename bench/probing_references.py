"""Two per-client query-probing detectors from the literature, as references for the benchmark of this
project's probing detector on the same streams (tests/probing_workload.py). Both are plain numpy/scipy,
one client state per client id, and ``update(client_id, x, label) -> bool`` (True: the client is
flagged on this query).

  Prada     Juuti, Szyller, Marchal, Asokan: "PRADA: Protecting Against DNN Model Stealing Attacks",
            IEEE EuroS&P 2019 (arXiv:1805.02628), Algorithm 1.
  ChenKnn   Chen, Carlini, Wagner: "Stateful Detection of Black-Box Adversarial Attacks", ACM AsiaCCS
            SPAI workshop 2020 (arXiv:1907.05587).

Both are reference implementations, written for fidelity over memory: Prada keeps every query that
joins a growing set (unbounded, as in the paper); ChenKnn keeps the last ``buffer_size`` projected
queries per client.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy import stats


class _Rows:
    """An append-only matrix with amortised O(1) appends (a reference detector's stored queries)."""

    def __init__(self, dim: int):
        self.data = np.empty((16, dim))
        self.n = 0

    def append(self, row: np.ndarray) -> None:
        if self.n == len(self.data):
            self.data = np.concatenate([self.data, np.empty_like(self.data)])
        self.data[self.n] = row
        self.n += 1

    def view(self) -> np.ndarray:
        return self.data[:self.n]


class _PradaClient:
    def __init__(self) -> None:
        self.growing: dict[int, _Rows] = {}  # G_c: the class's growing set of queries
        self.growing_dists: dict[int, list[float]] = {}  # D_{G_c}: the d_min of G_c's members
        self.threshold: dict[int, float] = {}  # T_c
        self.distances: list[float] = []  # D: the client's d_min, every query but a class's first


class Prada:
    """PRADA (Juuti et al. 2019, Algorithm 1), per client.

    For each query x of predicted class c (the deployed model's label, passed in as ``label``):
      * the first query of class c starts the growing set: G_c = {x}, D_{G_c} = {0}, T_c = 0; it adds
        no distance to D;
      * otherwise d_min = min over y in G_c of ||x - y||_2 (L2 on the raw input) joins D, and if
        d_min > T_c the query joins G_c, d_min joins D_{G_c}, and T_c = max(T_c, mean(D_{G_c}) -
        std(D_{G_c})): G_c only grows by queries that are far from what the class already holds, so
        near-duplicates are measured but do not crowd the set;
      * once |D| >= ``min_distances`` (the authors' code waits for more than 100), D' = the members
        of D within mean(D) +- 3 std(D) (the paper's outlier trim), W = the Shapiro-Wilk statistic of
        D', and the client is flagged when W < ``delta``. Benign queries' distances are close to normal
        (W near 1); synthetic extraction queries (small steps from earlier queries) are not.
    This is evaluated on every query, so the flag can clear again when W recovers.

    Differences from the authors' code (github.com/SSGAalto/prada-protecting-against-dnn-model-stealing-
    attacks), which follows the same rule: it tests W only on every 10th query and only on the
    distances of classes with at least 10 of them, and trims at 3 std with a strict inequality. Here the
    paper's rule is used as written. One case the paper does not cover: when D' has no spread at all
    (a client that repeats one input: every d_min is 0) W is undefined; that is taken as no evidence
    (not flagged), since such a client learns nothing about the model.

    Memory: every query that joins a growing set is kept, without bound (a reference, not a production
    design): up to 64 floats a query, plus one float a query for D. Time: O(|G_c|) a query for d_min,
    and a Shapiro-Wilk test of O(|D| log |D|) on every query.
    """

    def __init__(self, delta: float = 0.95, min_distances: int = 100, trim_sd: float = 3.0):
        self.delta = delta
        self.min_distances = min_distances
        self.trim_sd = trim_sd
        self._clients: dict[str, _PradaClient] = {}
        self.last_w: dict[str, float] = {}  # the latest W per client, for the benchmark's figures

    def update(self, client_id: str, x: np.ndarray, label: int) -> bool:
        st = self._clients.get(client_id)
        if st is None:
            st = self._clients[client_id] = _PradaClient()
        x = np.asarray(x, dtype=float).ravel()
        c = int(label)

        if c not in st.growing:
            st.growing[c] = _Rows(len(x))
            st.growing[c].append(x)
            st.growing_dists[c] = [0.0]
            st.threshold[c] = 0.0
        else:
            d_min = float(np.sqrt(((st.growing[c].view() - x) ** 2).sum(axis=1)).min())
            st.distances.append(d_min)
            if d_min > st.threshold[c]:
                st.growing[c].append(x)
                dg = st.growing_dists[c]
                dg.append(d_min)
                st.threshold[c] = max(st.threshold[c], float(np.mean(dg) - np.std(dg)))

        if len(st.distances) < self.min_distances:
            return False
        D = np.asarray(st.distances)
        mean, sd = D.mean(), D.std()
        D_trim = D[np.abs(D - mean) <= self.trim_sd * sd]
        if len(D_trim) < 3 or np.ptp(D_trim) == 0.0:
            return False
        with warnings.catch_warnings():  # N > 5000: scipy warns that the p-value (unused) is rough
            warnings.simplefilter("ignore", UserWarning)
            W = float(stats.shapiro(D_trim).statistic)
        self.last_w[client_id] = W
        return W < self.delta


class ChenKnn:
    """The stateful k-NN detector of Chen, Carlini, Wagner (2019), per client.

    Each client has a buffer of its recent queries, encoded. For a new query q (once the client has at
    least k earlier queries in the buffer), the figure is the mean L2 distance from enc(q) to its k
    nearest buffered queries; the client is flagged when the figure is below the threshold. The query
    then joins the buffer; on a detection the buffer is cleared (the paper counts detections that way:
    the attacker starts from an empty history each time, and "queries per detection" is the cost).

    The encoder: the paper trains a similarity encoder (contrastive, on augmented pairs of the training
    data) so that an image and its benign transformations land close together. Here a fixed PCA to
    ``n_components`` = 16 dimensions fitted on the benign reference stands in for it (no training of a
    network in a benchmark dependency); distances are L2 in that projection. The paper's buffer keeps
    every query until a detection; here the last ``buffer_size`` (1,000) are kept, bounding memory and
    time per query (O(buffer_size * n_components)).

    The threshold: the paper sets it so that 0.1% of benign queries would be flagged, from the k-NN
    figure over benign data (their code: the 0.1th percentile of each training image's mean distance to
    its k nearest training images). Here ``calibrate(benign_streams)`` takes the ``fp_rate`` quantile of
    the per-query figures of benign client streams (each query measured against its own client's
    earlier queries, only once there are at least k of them), which is the same rate measured in the
    setting the detector runs in.
    """

    def __init__(self, k: int = 50, fp_rate: float = 0.001, reference: np.ndarray | None = None,
                 n_components: int = 16, buffer_size: int = 1000):
        if buffer_size < k:
            raise ValueError("buffer_size must hold at least k queries")
        self.k = k
        self.fp_rate = fp_rate
        self.n_components = n_components
        self.buffer_size = buffer_size
        self.threshold: float | None = None
        self._mean: np.ndarray | None = None
        self._components: np.ndarray | None = None
        self._buffers: dict[str, tuple[np.ndarray, list[int]]] = {}  # rows, [count, next slot]
        if reference is not None:
            self.fit_projection(reference)

    def fit_projection(self, reference: np.ndarray) -> None:
        """PCA of the benign reference (centred, top ``n_components`` right singular vectors)."""
        X = np.asarray(reference, dtype=float)
        self._mean = X.mean(axis=0)
        _, _, vt = np.linalg.svd(X - self._mean, full_matrices=False)
        self._components = vt[:self.n_components]

    def encode(self, X: np.ndarray) -> np.ndarray:
        if self._components is None:
            raise RuntimeError("no projection: pass reference= or call calibrate() first")
        return (np.asarray(X, dtype=float) - self._mean) @ self._components.T

    def _figure(self, buffered: np.ndarray, z: np.ndarray) -> float:
        dists = np.sqrt(((buffered - z) ** 2).sum(axis=1))
        return float(np.partition(dists, self.k - 1)[:self.k].mean())

    def stream_figures(self, stream: np.ndarray) -> np.ndarray:
        """The figure of every query of one client's stream that has >= k earlier queries (no
        detections, so no clearing: what a benign stream's figures are)."""
        Z = self.encode(stream)
        return np.array([self._figure(Z[max(0, i - self.buffer_size):i], Z[i])
                         for i in range(self.k, len(Z))])

    def calibrate(self, benign_streams: list[np.ndarray]) -> float:
        """Set the threshold to the ``fp_rate`` quantile of benign clients' per-query figures. Fits
        the projection on the streams' queries first if none was given."""
        if self._components is None:
            self.fit_projection(np.concatenate(benign_streams))
        figures = np.concatenate([self.stream_figures(s) for s in benign_streams])
        if len(figures) == 0:
            raise ValueError(f"no benign stream has more than k = {self.k} queries")
        self.threshold = float(np.quantile(figures, self.fp_rate))
        return self.threshold

    def update(self, client_id: str, x: np.ndarray, label: int) -> bool:
        """``label`` is not used (the detector looks at inputs only); it is taken for a common API."""
        if self.threshold is None:
            raise RuntimeError("calibrate() first")
        z = self.encode(np.asarray(x, dtype=float).ravel()[None])[0]
        entry = self._buffers.get(client_id)
        if entry is None:
            entry = self._buffers[client_id] = (np.empty((self.buffer_size, len(z))), [0, 0])
        rows, (count, slot) = entry
        flagged = count >= self.k and self._figure(rows[:count], z) < self.threshold
        if flagged:
            entry[1][:] = [0, 0]  # detection: the client's history starts again
            return True
        rows[slot] = z  # a ring: the oldest query is overwritten once the buffer is full
        entry[1][:] = [min(count + 1, self.buffer_size), (slot + 1) % self.buffer_size]
        return False
