"""Drift of a model's inputs, outputs and accuracy against its reference, at a set false-alarm rate.

What is watched, per model (each part can be switched off):

- **every feature**, and the scalar ``streams`` (confidence, a numeric prediction, latency and cost
  figures): rank CUSUM charts (``monitor.detectors.rank_cusum``) on each value's bin among the
  reference, for a rise or fall of the level (tuned to mean shifts of ``shifts`` reference sd) and of
  the spread (tuned to the sd growing or shrinking by ``spread``); and, on a column long-tailed on one
  side, a "bulk" chart for a rise (or fall) of the level on winsorized ranks (tuned to ``bulk`` sd):
  when the bulk of a long-tailed feature moves, what changes is how many events leave its lower third,
  not how far out they fall (``ColumnGroup.limit_bulk`` decides where it watches);
- **the feature vector as a whole**: each event's kernel score against the reference (the cross term
  of the MMD, ``mean_r k(x, r)``, on random Fourier features of the reference's top principal
  components), ranked among the scores of held-out reference events, with the same charts. It sees
  changes no single feature shows when they move events to where the reference is sparse (a
  correlation that reverses, events off the reference's principal subspace); a correlation appearing
  between independent features barely moves it (bench/RESULTS.md);
- **the predicted classes**: a Bernoulli CUSUM (``monitor.detectors.cusum``) per class for its share
  rising or falling by a factor ``class_shift`` (a class unseen in the reference counts as
  ``__other__``);
- **accuracy**, when labels arrive: river's ADWIN (Bifet & Gavalda 2007) on the stream of errors,
  reporting a rise of the error rate (river's DDM alarmed every few hundred labelled events on a
  stable model in the tests; ADWIN's ``label_delta`` bounds its false alarms).

All charts of a model share one budget: the detector's expected run time between false alarms is
``ert`` events, and each of its charts is calibrated to ``ert * C`` with ``C`` what the charts count
for together (their run lengths are close to geometric, so their first alarm comes at the rate of the
sum when they alarm apart). Charts that alarm together count for fewer: a column's own charts by a
data-free table (``rank_cusum.OVERLAP``), the features' charts by a simulation of their null on the
reference's own rows, which keeps the features' correlations (``joint_calibration``; ``calibration:
union`` counts them one by one, which makes false alarms rarer than asked on correlated features).
A chart's threshold needs no simulation and no data: under no change every bin is equally likely,
whatever the feature's distribution (see ``rank_cusum``).

The reference is a file (``reference``: JSONL events or a ``.npy`` feature matrix) or the model's first
``reference_size`` events; it is built once and kept in the checkpoint. After an alarm the column that
alarmed restarts and stays quiet for ``cooldown`` events. ``method: adwin`` or ``page_hinkley`` watches
the streams with river's detectors instead of rank charts (``monitor.detectors.scalar_drift``).

>>> import numpy as np, msgspec
>>> from types import SimpleNamespace as E
>>> rng = np.random.default_rng(0)
>>> def batch(rows, t0):
...     events = [E(ts=t0 + i, features=msgspec.Raw(msgspec.json.encode(r.tolist())), confidence=None,
...                 probabilities=None, prediction=None, label=None, event_id=str(i), client_id=None,
...                 model_version=None, latency_ms=None) for i, r in enumerate(rows)]
...     return ModelBatch("m", events, [E(topic="t", partition=0, offset=i) for i in range(len(rows))])
>>> d = Drift("m", Drift.Params(ert=10_000, streams=[], reference_size=2000, sample_every=1))
>>> d.update(batch(rng.normal(size=(4000, 3)), 0.0))
[]
>>> shifted = rng.normal(size=(500, 3)); shifted[:, 1] += 1.0
>>> [(f.kind, f.evidence["features"]) for f in d.update(batch(shifted, 4000.0))]
[('feature_drift', ['f1', 'multivariate'])]
"""

from __future__ import annotations

import logging
import math
import zlib
from typing import Any, ClassVar, Literal

import msgspec
import numpy as np

from monitor.detections import Detection, make_detection
from monitor.detectors import Detector, ModelBatch
from monitor.detectors import class_name, cusum, joint_calibration, rank_cusum, reference as reference_file
from monitor.detectors.rank_cusum import RankBins
from monitor.errors import ConfigError

log = logging.getLogger("inferwatch.detectors.drift")

STREAM_KINDS = {
    "confidence": "prediction_drift",
    "prediction": "prediction_drift",
    "latency_ms": "latency_anomaly",
    "cpu_ms": "resource_anomaly",
    "memory_mb": "resource_anomaly",
    "output_tokens": "resource_anomaly",
    "input_bytes": "payload_anomaly",
}
LOG_STREAMS = {"latency_ms", "cpu_ms", "memory_mb", "output_tokens", "input_bytes"}
Stream = Literal["confidence", "prediction", "latency_ms", "cpu_ms", "memory_mb", "output_tokens", "input_bytes"]

CRITICAL_EXCESS = 1.5  # a statistic this far past its threshold SOON events after crossing: critical
SOON = 64  # charted events after a crossing at which the excess over the threshold is read (severity)
# The charts' calibration method: a checkpoint from another is rebuilt, not restored (charts on sums
# of 8 events, version 1, restored into charts that step every event alarmed several times too often).
CALIBRATION = 3
RECENT = 500  # rows kept per column group to summarise the current window of an alarm
MIN_REFERENCE = 2 * rank_cusum.BINS - 1  # the smallest reference that fills the bins twice


# -- the charts of a group of columns ------------------------------------------------------------


class Chart(msgspec.Struct, frozen=True):
    name: str  # for people: "mean up", "spread down", ...
    score: Literal["location", "spread", "winsorized"]
    sign: int  # +1 watches a rise of the score, -1 a fall
    k: int
    h: int = 0

    def support(self) -> tuple[int, ...]:
        return rank_cusum.support(self.score)


def chart_set(shifts: list[float], spread: float | None, bulk: float | None = None) -> list[Chart]:
    """The charts of a column: level and spread, then (``bulk``) the winsorized level charts, last so
    that the others stay the family whose overlap ``rank_cusum.OVERLAP`` tabulates."""
    charts = []
    for shift in shifts:
        k = rank_cusum.location_k(shift)
        charts += [Chart(f"mean up ({shift:g} sd)", "location", 1, k),
                   Chart(f"mean down ({shift:g} sd)", "location", -1, k)]
    if spread:
        charts += [Chart(f"spread up (x{spread:g})", "spread", 1, rank_cusum.spread_k(spread)),
                   Chart(f"spread down (/{spread:g})", "spread", -1, rank_cusum.spread_k(1 / spread))]
    if bulk:
        k = rank_cusum.winsorized_k(bulk)
        charts += [Chart(f"mean up ({bulk:g} sd, bulk)", "winsorized", 1, k),
                   Chart(f"mean down ({bulk:g} sd, bulk)", "winsorized", -1, k)]
    return charts


class ColumnGroup:
    """Columns ranked against one reference matrix, each with the same set of charts."""

    def __init__(self, names: list[str], kind: str, ref: np.ndarray, charts: list[Chart], log_scale: bool = False,
                 shifts: list[float] | None = None):
        """``shifts``: the mean shifts (sd) the level charts are tuned to, which decide the columns the bulk
        charts watch (``limit_bulk``)."""
        self.names = names
        self.kind = kind  # of the detection an alarm makes
        self.log_scale = log_scale  # heavy-tailed figures are summarised on log1p
        self.bins = RankBins(ref)
        self.charts = charts
        self.watch = np.ones((len(charts), len(names)), dtype=bool)  # the columns each chart watches
        self.statistics = np.zeros((len(charts), len(names)), dtype=np.int64)
        self.quiet_until = np.zeros(len(names), dtype=np.int64)
        self.seen = 0
        self.alarms = 0
        shown = np.log1p(np.maximum(ref, 0)) if log_scale else ref
        self.ref_mean = shown.mean(axis=0)
        self.ref_sd = np.where(shown.std(axis=0) > 0, shown.std(axis=0), 1.0)
        self.ref_quantiles = np.quantile(ref, [0.05, 0.5, 0.95], axis=0)
        self.recent = np.full((RECENT, len(names)), np.nan)
        self.recent_pos = 0
        self.last_excess = 0.0  # the largest alarm's excess in the last update (replay's plots)
        self.limit_bulk(ref, shifts or [])

    def family(self) -> rank_cusum.Family:
        return tuple((c.score, c.sign, c.k) for c in self.charts)

    def count(self, arl: float) -> float:
        """What the group's charts count for in the union bound at a per-chart run length ``arl`` (a
        column's own charts overlap: ``rank_cusum.effective_charts``)."""
        return joint_calibration.independent_count(self.family(), len(self.names), arl, self.watch)

    def limit_bulk(self, ref: np.ndarray, shifts: list[float]) -> None:
        """A bulk chart watches a column only where, on the column's reference moved by one of ``shifts``
        of its sd in the chart's direction, it drifts towards its threshold faster than every level
        chart of that direction (``rank_cusum.drift_rate``): where the column is long-tailed on that
        side. Elsewhere it would find nothing sooner and only raise every chart's threshold."""
        bulk = [i for i, c in enumerate(self.charts) if c.score == "winsorized"]
        if not bulk:
            return
        sd = ref.std(axis=0)
        for i in bulk:
            sign = self.charts[i].sign
            level = [c for c in self.charts if c.score == "location" and c.sign == sign]
            quicker = np.zeros(len(self.names), dtype=bool)
            for shift in shifts:
                bins = self.bins.bins(ref + sign * shift * sd)
                q = np.stack([np.bincount(b, minlength=rank_cusum.BINS) for b in bins]) / len(ref)
                best = np.max([rank_cusum.drift_rate(c.score, sign, c.k, q) for c in level], axis=0, initial=0.0)
                quicker |= rank_cusum.drift_rate("winsorized", sign, self.charts[i].k, q) > best
            self.watch[i] = quicker

    def calibrate(self, arl: float) -> None:
        """Thresholds for one false alarm per ``arl`` charted events, averaged over the
        sampling error of this group's reference (``rank_cusum.reference_threshold``)."""
        per_bin = self.bins.per_bin
        charts, kept = [], []
        for i, c in enumerate(self.charts):
            try:
                charts.append(msgspec.structs.replace(
                    c, h=rank_cusum.reference_threshold(c.score, c.sign, c.k, arl, 1, per_bin)))
                kept.append(i)
            except ValueError as exc:  # a tuning too small for this reference to tell from no change
                log.warning("%s: no %s chart: %s", ", ".join(self.names[:3]), c.name, exc)
        self.charts = charts
        self.watch = self.watch[kept]
        self.statistics = np.zeros((len(charts), len(self.names)), dtype=np.int64)

    def update(self, values: np.ndarray, bins: np.ndarray | None = None) -> list[tuple[int, int, int, float]]:
        """Run the charts over ``values`` (n x columns, no NaN; ``bins``: their ``self.bins.bins``, when the
        caller has them already). Returns the alarms as
        (column, chart, index in ``values`` of the first crossing, excess = statistic / threshold
        ``SOON`` events after the crossing, or at the batch's end if sooner: a large shift overshoots
        fast, a small one creeps).

        The charts step every event: reading sums of 8 events instead saved a fraction of a µs an event
        and cost up to 7 events of delay (bench/RESULTS.md)."""
        location = rank_cusum.location_scores(self.bins.bins(values) if bins is None else bins)
        totals = {score: np.cumsum(rank_cusum.score_values(location, score), axis=1, dtype=np.int32)
                  for score in {c.score for c, watched in zip(self.charts, self.watch) if watched.any()}}
        found: dict[int, tuple[int, int, float]] = {}
        if len(values):
            quiet = self.quiet_until > self.seen  # columns still quiet after an earlier alarm
            for c, chart in enumerate(self.charts):
                watched = self.watch[c]
                if not watched.any():
                    continue
                # a chart runs on the columns it watches only (a bulk chart: the long-tailed ones)
                rows = slice(None) if watched.all() else np.flatnonzero(watched)
                total = totals[chart.score][rows]
                first = np.full(len(self.names), -1, dtype=np.int64)
                soon = np.zeros(len(self.names), dtype=np.int64)
                first[rows], soon[rows], self.statistics[c, rows] = rank_cusum.crossings(
                    total if chart.sign > 0 else -total, chart.k, chart.h, self.statistics[c, rows], SOON)
                for j in np.flatnonzero(first >= 0).tolist():
                    index = int(first[j])
                    if quiet[j] and self.seen + index < self.quiet_until[j]:
                        continue
                    excess = float(soon[j]) / chart.h
                    if j not in found or (index, -excess) < (found[j][1], -found[j][2]):
                        found[j] = (c, index, excess)
            for j in found:
                self.statistics[:, j] = 0  # the column restarts, then waits out its cooldown
            self.statistics[:, quiet] = 0
        self._push(values)
        self.seen += len(values)
        self.alarms += len(found)
        self.last_excess = max((excess for _, _, excess in found.values()), default=0.0)
        return [(j, c, index, excess) for j, (c, index, excess) in sorted(found.items(), key=lambda kv: kv[1][1])]

    def quiet(self, columns: list[int], until: int) -> None:
        self.quiet_until[columns] = until

    def _push(self, values: np.ndarray) -> None:
        values = values[-RECENT:]
        idx = (self.recent_pos + np.arange(len(values))) % RECENT
        self.recent[idx] = values
        self.recent_pos = (self.recent_pos + len(values)) % RECENT

    def last(self, n: int) -> np.ndarray:
        """The last ``n`` rows pushed (n x columns), oldest first."""
        n = min(n, RECENT)
        return self.recent[(self.recent_pos - n + np.arange(n)) % RECENT]

    def summary(self, j: int) -> dict[str, Any]:
        """Reference against the current window of column ``j``: means, quantiles and the shift in sd."""
        now = self.recent[:, j]
        now = now[~np.isnan(now)]
        shown_now = np.log1p(np.maximum(now, 0)) if self.log_scale else now
        mean_now = float(shown_now.mean()) if len(now) else math.nan
        effect = (mean_now - self.ref_mean[j]) / self.ref_sd[j]
        sd_ratio = float(shown_now.std() / self.ref_sd[j]) if len(now) > 1 else math.nan
        back = math.expm1 if self.log_scale else float
        q_now = np.quantile(now, [0.05, 0.5, 0.95]).tolist() if len(now) else []
        return {
            "feature": self.names[j],
            "reference": {"mean": back(float(self.ref_mean[j])), "sd": float(self.ref_sd[j]),
                          "quantiles_5_50_95": [float(q) for q in self.ref_quantiles[:, j]]},
            "current": {"mean": back(mean_now), "quantiles_5_50_95": q_now, "events": int(len(now))},
            "effect_sd": round(float(effect), 4),
            "sd_ratio": round(sd_ratio, 4),
            "transform": "log1p" if self.log_scale else None,
        }


# -- the whole feature vector ---------------------------------------------------------------------


class KernelScore:
    """``mean_r k(x, r)`` for a Gaussian kernel on the top principal components of the standardised
    reference, by random Fourier features (Rahimi & Recht 2007): ``phi(x) . mean_r phi(r)``. Fitted on
    one half of the reference; the other half gives the null scores the stream's scores are ranked
    against, so the ranks are exchangeable with the stream's under no change."""

    COMPONENTS = 8
    FOURIER = 32

    def __init__(self, ref: np.ndarray, seed: int = 7):
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(ref))
        fit, held = ref[order[: len(ref) // 2]], ref[order[len(ref) // 2:]]
        self.mean = fit.mean(axis=0)
        sd = fit.std(axis=0)
        self.scale = 1.0 / np.where(sd > 0, sd, 1.0)
        # principal axes from the d x d covariance (an SVD of the n x d matrix is slower and, with
        # threaded BLAS on a busy machine, can take a second)
        z = (fit - self.mean) * self.scale
        _, vectors = np.linalg.eigh(z.T @ z)
        self.components = vectors[:, ::-1][:, : min(self.COMPONENTS, ref.shape[1])].copy()
        projected = self._project(fit)
        pairs = rng.integers(0, len(projected), size=(512, 2))
        distance = np.linalg.norm(projected[pairs[:, 0]] - projected[pairs[:, 1]], axis=1)
        bandwidth = float(np.median(distance)) or 1.0  # the median heuristic
        self.omega = rng.normal(size=(self.components.shape[1], self.FOURIER)) / bandwidth
        self.phase = rng.uniform(0, 2 * np.pi, size=self.FOURIER)
        self.embedding = np.cos(projected @ self.omega + self.phase).mean(axis=0)
        self.null_scores: np.ndarray | None = self.score(held)  # handed to a ColumnGroup, then dropped

    def _project(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.mean) * self.scale) @ self.components

    def score(self, x: np.ndarray) -> np.ndarray:
        return np.cos(self._project(x) @ self.omega + self.phase) @ self.embedding


# -- the detector ---------------------------------------------------------------------------------


class Drift(Detector):
    """Rank CUSUM charts per feature, stream and the whole vector, class-share and label charts."""

    name: ClassVar[str] = "drift"

    class Params(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
        ert: float = 100_000  # expected events between false alarms, all the model's charts together
        reference: str | None = None  # JSONL events or .npy features; default: the first events
        reference_size: int = 2000  # events that form the reference (at most this many from a file)
        feature_names: list[str] | None = None  # names of the feature vector's entries, for reports
        features: bool = True  # a chart set on every feature
        multivariate: bool = True  # and on the kernel score of the whole vector
        classes: bool = True  # predicted-class shares
        labels: bool = True  # error rate when events carry a label (river ADWIN)
        label_delta: float = 0.0005  # ADWIN's confidence on the error stream
        streams: list[Stream] = msgspec.field(default_factory=lambda: ["confidence", "latency_ms"])
        method: Literal["cusum", "adwin", "page_hinkley"] = "cusum"  # for the streams
        shifts: list[float] = msgspec.field(default_factory=lambda: [0.5, 1.0, 2.0])  # mean shifts, in sd
        spread: float | None = 1.5  # sd ratio the spread charts are tuned to; null: no spread charts
        # mean shift (reference sd) of the charts on winsorized ranks (the outer thirds flat): quick
        # when the bulk of a skewed column moves; null: no such charts
        bulk: float | None = 2.0
        # how the features' charts share the ERT: "joint" counts them as a simulation of their null on
        # the reference finds they alarm (correlated features count for fewer), "union" one by one
        calibration: Literal["joint", "union"] = "joint"
        class_shift: float = 1.5  # a class share rising or falling by this factor
        max_classes: int = 50
        sample_every: int = 8  # the charts read one event in this many (1: every event; labels: all)
        cooldown: int = 5000  # events of quiet for a column after its alarm
        critical_effect: float = 2.0  # a shift of this many reference sd is critical
        # river's detectors, for method adwin or page_hinkley
        delta: float = 0.002
        threshold: float = 50.0
        min_effect: float = 0.5

        def check(self) -> tuple[str, str] | None:
            if self.ert < 10:
                return "ert", f"expected at least 10 events between false alarms, got {self.ert:g}"
            if self.reference is not None and (problem := reference_file.check_path(self.reference)):
                return "reference", problem
            if self.reference_size < MIN_REFERENCE:
                return "reference_size", f"expected at least {MIN_REFERENCE} events, got {self.reference_size}"
            if not self.shifts or any(not 0.25 <= s <= 5 for s in self.shifts):
                return "shifts", f"expected one or more mean shifts between 0.25 and 5 sd, got {self.shifts}"
            if self.bulk is not None and not 0.25 <= self.bulk <= 5:
                return "bulk", f"expected a mean shift between 0.25 and 5 sd (or null), got {self.bulk}"
            if self.spread is not None and not 1.05 <= self.spread <= 5:
                return "spread", f"expected an sd ratio between 1.05 and 5 (or null), got {self.spread}"
            if not 1.05 <= self.class_shift <= 10:
                return "class_shift", f"expected a factor between 1.05 and 10, got {self.class_shift}"
            if self.max_classes < 2:
                return "max_classes", f"expected at least 2, got {self.max_classes}"
            if self.cooldown < 0:
                return "cooldown", f"expected >= 0 events, got {self.cooldown}"
            if not 1 <= self.sample_every <= 1000:
                return "sample_every", f"expected 1 to 1000, got {self.sample_every}"
            if not 0 < self.delta < 1:
                return "delta", f"expected 0 < delta < 1, got {self.delta}"
            if not 0 < self.label_delta < 1:
                return "label_delta", f"expected 0 < label_delta < 1, got {self.label_delta}"
            if self.critical_effect <= 0:
                return "critical_effect", f"expected > 0, got {self.critical_effect}"
            return None

    def __init__(self, model: str, params: Params):
        super().__init__(model, params)
        self.calibration = CALIBRATION  # checkpoints of another calibration are rebuilt
        self.reference_id = "stream"  # or the reference file's identity
        self.learning: dict[str, list[Any]] = {"features": [], "classes": [], "errors": []}
        self.learning.update({s: [] for s in self._rank_streams()})
        self.learned = 0
        self.built = False
        self.feature_names: list[str] | None = params.feature_names
        self.groups: dict[str, ColumnGroup] = {}  # "features", "multivariate", and one per stream
        self.kernel: KernelScore | None = None
        self.dimension = 0
        self.classes: list[str] = []
        self.class_p0 = np.zeros(0)
        self.class_charts: list[tuple[int, int, float, float, float]] = []  # (class, sign, p0, p1, h)
        self.class_statistics = np.zeros(0)
        self.class_quiet = np.zeros(0, dtype=np.int64)
        self.class_recent = np.zeros(0)
        self.class_seen = 0
        self.class_events = 0  # in the reference
        self.charts_total = 0
        self.arl = 0.0
        self.joint: dict[str, Any] | None = None  # the features' joint calibration, for describe()
        self.reference_error_rate = math.nan
        self.errors_detector = None
        self.recent_errors = np.zeros(0, dtype=np.int8)
        self.label_quiet = 0
        self.errors_seen = 0
        self.seen = 0
        self.ignored_rows = 0  # feature vectors of another dimension than the reference's
        self.sample_position = 0  # events since the last charted one, modulo sample_every
        self.charted = 0  # events the charts have read
        self.family_quiet: dict[str, int] = {}  # family -> event count until which it is not reported
        self.suppressed: dict[str, int] = {}  # column alarms not reported, within a family's cooldown
        self.dimension_quiet = 0
        self.river = None
        if params.method != "cusum" and params.streams:
            from monitor.detectors.scalar_drift import ScalarDrift
            self.river = ScalarDrift(model, ScalarDrift.Params(
                streams=list(params.streams), method=params.method, delta=params.delta,
                threshold=params.threshold, reference_size=min(params.reference_size, 10_000),
                min_effect=params.min_effect, critical_effect=max(params.critical_effect, params.min_effect),
                cooldown=params.cooldown))

    @property
    def events(self) -> int:
        """Events taken so far, for the reference and after it."""
        return self.learned + self.seen

    def _rank_streams(self) -> list[str]:
        return list(dict.fromkeys(self.params.streams)) if self.params.method == "cusum" else []

    # -- state ----------------------------------------------------------------------------------

    def restore(self, state: dict[str, Any]) -> None:
        if state.get("calibration") != CALIBRATION:
            log.info("%s: the drift checkpoint's charts were calibrated by an older version; building the "
                     "reference anew", self.model)
            return
        if reference_file.still_valid(state, self.params.reference, self.model):
            super().restore(state)

    # -- the stream -----------------------------------------------------------------------------

    def update(self, batch: ModelBatch) -> list[Detection]:
        found: list[Detection] = []
        if self.river is not None:
            found.extend(self.river.update(batch))
        start = 0
        if not self.built:
            if self.params.reference and self.reference_id == "stream":
                self._build_from_file()
            if not self.built:
                start = self._learn(batch)
                if not self.built:
                    return found
        if start >= len(batch):
            return found
        view = batch if start == 0 else _rows(batch, slice(start, None))
        found.extend(self._watch(view))
        self.seen += len(view)
        return found

    def _learn(self, batch: ModelBatch) -> int:
        """Take events for the reference; returns how many of the batch it took."""
        take = min(self.params.reference_size - self.learned, len(batch))
        part = batch if take == len(batch) else _rows(batch, slice(0, take))
        self._collect(part, self.learning)
        self.learned += take
        if self.learned >= self.params.reference_size:
            self._build(self.learning)
            self.learning = {}
        return take

    def _collect(self, batch: Any, into: dict[str, list[Any]]) -> None:
        if isinstance(batch, np.ndarray):
            into["features"].append(batch)
            return
        matrix, mask = batch.features
        if self.feature_names is None and mask.any():
            self.feature_names = _feature_names(batch)
        into["features"].append(matrix[mask])
        for stream in self._rank_streams():
            values = _stream_values(batch, stream)
            into[stream].append(values[~np.isnan(values)])
        into["classes"].extend(c for c in batch.classes if c is not None)
        if self.params.labels:
            errors = _errors(batch)
            into["errors"].append(errors[errors >= 0])

    def _build_from_file(self) -> None:
        path = self.params.reference
        try:
            data = reference_file.load(path, self.model, self.params.reference_size)
            if isinstance(data, np.ndarray) and (self._rank_streams() or self.params.classes or self.params.labels):
                log.warning("%s: %s holds feature vectors only: the streams, class shares and error rate "
                            "are not watched (give a JSONL file of events to watch them too)", self.model, path)
            parts: dict[str, list[Any]] = {"features": [], "classes": [], "errors": []}
            parts.update({s: [] for s in self._rank_streams()})
            self._collect(data, parts)
            self._build(parts)
            self.reference_id = reference_file.identity(path)
        except ConfigError as exc:
            self.reference_id = reference_file.fall_back(log, self.model, exc, path, self.params.reference_size)

    def _build(self, parts: dict[str, list[Any]]) -> None:
        """The reference summaries, the chart sets and their calibration."""
        p = self.params
        charts = chart_set(p.shifts, p.spread, p.bulk)
        features = _stack(parts.get("features", []))
        if len(features) >= MIN_REFERENCE and features.shape[1] > 0:
            self.dimension = features.shape[1]
            names = self.feature_names or []
            if len(names) != self.dimension:
                names = [f"f{j}" for j in range(self.dimension)]
            self.feature_names = names
            if p.features:
                self.groups["features"] = ColumnGroup(names, "feature_drift", features, charts, shifts=p.shifts)
            if p.multivariate and self.dimension >= 2 and len(features) >= 2 * MIN_REFERENCE + 2:
                self.kernel = KernelScore(features)
                null = self.kernel.null_scores[:, None]
                self.groups["multivariate"] = ColumnGroup(
                    ["multivariate"], "feature_drift", null, [c for c in charts if c.score == "location"])
                self.kernel.null_scores = None  # they are the group's reference now: bounded memory
        for stream in self._rank_streams():
            values = _stack(parts.get(stream, []), column=True)
            if len(values) >= MIN_REFERENCE:
                self.groups[stream] = ColumnGroup([stream], STREAM_KINDS[stream], values, charts,
                                                  stream in LOG_STREAMS, p.shifts)
        if p.classes:
            self._build_classes(parts.get("classes", []))
        errors = _stack(parts.get("errors", []), column=True)[:, 0]
        if p.labels:
            from river.drift import ADWIN
            self.errors_detector = ADWIN(delta=p.label_delta)
            if len(errors):
                self.reference_error_rate = float(errors.mean())
                for e in errors.tolist():  # the window starts with the reference's errors
                    self.errors_detector.update(float(e))
        # class charts that cannot hold the ERT are dropped below; they are few, so counting them here
        # errs by a few per cent towards fewer false alarms
        self.charts_total = (sum(int(g.watch.sum()) for g in self.groups.values())
                             + len(self.class_charts))
        # Union bound: each chart gets ert x (charts it shares the ERT with). A column's charts alarm
        # together more often than that bound assumes, so a column counts for fewer charts
        # (rank_cusum.effective_charts). That count grows with the run length, and is taken at the
        # union bound's, which is at least the final one: it errs towards fewer false alarms.
        # The charts read one event in sample_every: their run length, in the events they read, is
        # shorter by that factor for the same false alarms per event of the stream.
        union = rank_cusum.rounded_arl(float(p.ert) * max(1, self.charts_total))
        counts = {name: g.count(union / p.sample_every) for name, g in self.groups.items()}
        counted = len(self.class_charts) + sum(counts.values())
        self.arl = rank_cusum.rounded_arl(float(p.ert) * max(1.0, counted))
        # Correlated features alarm together: the union bound over them is conservative (1.8 ERTs
        # between false alarms on breast-cancer). Their count is measured instead, by simulating their
        # charts on the reference's own rows (joint_calibration); the other groups keep theirs.
        group = self.groups.get("features")
        self.joint = None
        if p.calibration == "joint" and group is not None and len(group.names) >= 2 and group.charts:
            joint = joint_calibration.joint_count(
                joint_calibration.ReferenceNull(features, seed=zlib.crc32(features.tobytes())),
                group.family(), float(p.ert) / p.sample_every, (counted - counts["features"]), watch=group.watch)
            self.joint = {"charts": round(joint.charts, 2), "union_charts": round(counts["features"], 2),
                          "simulated_run_length": round(joint.simulated_at), "extrapolated": joint.extrapolated}
            self.arl = rank_cusum.rounded_arl(joint.arl * p.sample_every)
        charted_arl = self.arl / p.sample_every
        for group in self.groups.values():
            group.calibrate(charted_arl)
        self.class_charts = [chart for c, sign, p0, p1, _ in self.class_charts
                             if (chart := self._class_chart(c, sign, p0, p1, charted_arl)) is not None]
        self.built = True
        log.info("%s: drift reference built from %d events: %d features, %d streams, %d classes, "
                 "%d charts at %.3g events each", self.model, len(features), self.dimension,
                 len(self._rank_streams()), len(self.classes), self.charts_total, self.arl)
        for name, charts in self._bulk_columns().items():
            log.info("%s: bulk charts on %s: %s", self.model, name,
                     "; ".join(f"{chart}: {', '.join(columns) or 'none'}" for chart, columns in charts.items()))

    def _build_classes(self, classes: list[str]) -> None:
        if not classes:
            return
        names, counts = np.unique(np.asarray(classes, dtype=object).astype(str), return_counts=True)
        if len(names) > self.params.max_classes:
            log.info("%s: %d predicted classes in the reference, more than max_classes; no class charts",
                     self.model, len(names))
            return
        n = self.class_events = len(classes)
        self.classes = names.tolist() + ["__other__"]
        p0 = np.append(counts / n, 0.0)
        p0 = np.clip(p0, 0.5 / n, None)
        # shares on a grid of 2% steps: far finer than their sampling error, and models with similar
        # shares share their (cached) calibrations
        p0 = np.exp(np.round(np.log(p0 / p0.sum()) / 0.02) * 0.02)
        self.class_p0 = np.minimum(p0, 0.95)
        shift = self.params.class_shift
        charts = []
        for c, share in enumerate(self.class_p0.tolist()):
            charts.append((c, 1, share, min(share * shift, (1 + share) / 2), 0.0))
            if share * n >= 20:  # a fall can only be seen in a class the reference saw often
                charts.append((c, -1, 1 - share, 1 - share / shift, 0.0))
        self.class_charts = charts
        self.class_statistics = np.zeros(len(charts))
        self.class_quiet = np.zeros(len(self.classes), dtype=np.int64)

    def _class_chart(self, c: int, sign: int, p0: float, p1: float,
                     arl: float) -> tuple[int, int, float, float, float] | None:
        """The chart with its threshold, its tuning ``p1`` moved away from ``p0`` as far as the share's
        uncertainty in the reference demands (a small reference cannot tell 10% from 12%), or None
        when the class is too rare in the reference for any change to be told apart."""
        p1 = max(p1, cusum.tuning_floor(p0, self.class_events))
        if p1 >= (1 + p0) / 2:
            log.info("%s: class %s is too rare in the reference to watch its share %s", self.model,
                     self.classes[c], "rising" if sign > 0 else "falling")
            return None
        try:
            return c, sign, p0, p1, cusum.threshold_for_estimated_rate(p0, p1, arl, self.class_events)
        except ValueError as exc:
            log.info("%s: no chart for class %s %s: %s", self.model, self.classes[c],
                     "rising" if sign > 0 else "falling", exc)
            return None

    # -- watching -------------------------------------------------------------------------------

    def _watch(self, batch: ModelBatch) -> list[Detection]:
        # The charts read one event in sample_every (counted across batches): parsing 64 numbers an
        # event and ranking them was most of the detect stage's cost. Labels are few: all are read.
        every = self.params.sample_every
        take = np.arange((-self.sample_position) % every, len(batch), every)
        self.sample_position = (self.sample_position + len(batch)) % every
        found: list[Detection] = []
        if take.size:
            found = self._watch_charted(batch if every == 1 else _rows(batch, take))
        if self.errors_detector is not None:
            found.extend(self._watch_errors(batch))
        return found

    def _watch_charted(self, batch: ModelBatch) -> list[Detection]:
        found: list[Detection] = []
        alarms: dict[str, list[tuple]] = {}  # family -> (group, column, index, excess, chart)
        features = self.groups.get("features")
        if (features is not None or self.kernel is not None) and self.dimension:
            matrix, mask = batch.features
            if matrix.shape[1] != self.dimension:
                if mask.any():
                    found.extend(self._dimension_change(batch, int(mask.sum()), matrix.shape[1]))
                mask = np.zeros(len(batch), dtype=bool)
            rows = np.flatnonzero(mask)
            if rows.size:
                values = matrix[rows]
                if features is not None:
                    self._run_group("features", values, rows, alarms)
                if self.kernel is not None:
                    self._run_group("multivariate", self.kernel.score(values)[:, None], rows, alarms)
        for stream in self._rank_streams():
            if stream in self.groups:
                values = _stream_values(batch, stream)
                rows = np.flatnonzero(~np.isnan(values))
                if rows.size:
                    self._run_group(stream, values[rows][:, None], rows, alarms)
        for family, hits in alarms.items():
            # one report per family (the features, or one stream) and cooldown: a drift makes columns
            # alarm one after another, and that is one incident, not dozens
            at = self.charted + min(h[2] for h in hits)
            if at < self.family_quiet.get(family, 0):
                self.suppressed[family] = self.suppressed.get(family, 0) + len(hits)
                continue
            self.family_quiet[family] = at + self._quiet
            found.append(self._rank_detection(batch, self.groups[hits[0][0]].kind, hits))
        if self.class_charts:
            found.extend(self._watch_classes(batch, batch.classes))
        self.charted += len(batch)
        return found

    @property
    def _quiet(self) -> int:
        """The cooldown in charted events."""
        return max(1, self.params.cooldown // self.params.sample_every)

    def _run_group(self, name: str, values: np.ndarray, rows: np.ndarray,
                   alarms: dict[str, list[tuple[str, int, int, float]]]) -> None:
        group = self.groups[name]
        before = group.seen
        hits = group.update(values)
        family = "features" if name == "multivariate" else name
        for column, chart, index, excess in hits:
            group.quiet([column], before + index + 1 + self._quiet)
            alarms.setdefault(family, []).append((name, column, int(rows[index]), excess, chart))

    def _rank_detection(self, batch: ModelBatch, kind: str, hits: list[tuple]) -> Detection:
        hits = sorted(hits, key=lambda h: -h[3])
        index = min(h[2] for h in hits)
        event = batch.events[index]
        columns = []
        for name, column, at, excess, chart in hits:
            group = self.groups[name]
            summary = group.summary(column)
            summary.update({"chart": group.charts[chart].name, "excess": round(excess, 3),
                            "threshold": group.charts[chart].h, "at_event": batch.events[at].event_id})
            if name == "multivariate":
                summary["feature"] = "multivariate"
                summary["about"] = "kernel score against the reference (MMD cross term) on its top principal components"
            columns.append(summary)
        excess = max(h[3] for h in hits)
        big = any(abs(c["effect_sd"]) >= self.params.critical_effect for c in columns if c["effect_sd"] == c["effect_sd"])
        severity = "critical" if excess >= CRITICAL_EXCESS or big else "warning"
        names = [c["feature"] for c in columns]
        described = "; ".join(_describe(c) for c in columns[:3]) + ("; ..." if len(columns) > 3 else "")
        if kind == "feature_drift":
            described = f"{len(names)} input {'column' if len(names) == 1 else 'columns'} drifted: {described}"
        topic, partition, offset = batch.source(index)
        return make_detection(
            detector=self.name, kind=kind, model=self.model, window_start=float(event.ts),
            subject=",".join(sorted(names)), ts=float(event.ts), model_version=event.model_version,
            severity=severity, score=round(excess, 4), threshold=1.0,
            summary=f"{described} (rank CUSUM, ERT {self.params.ert:,.0f} events)",
            evidence={"features": names, "columns": columns, "ert": self.params.ert,
                      "charts": self.charts_total, "reference": self.reference_id,
                      "window": [float(batch.events[max(0, index - RECENT + 1)].ts), float(event.ts)],
                      "event_ids": [e.event_id for e in batch.events[max(0, index - 9): index + 1]]},
            source={"topic": topic, "partition": partition, "offset": offset},
        )

    def _dimension_change(self, batch: ModelBatch, rows: int, dimension: int) -> list[Detection]:
        self.ignored_rows += rows
        if self.seen < self.dimension_quiet:
            return []
        self.dimension_quiet = self.seen + self.params.cooldown
        index = int(np.flatnonzero(batch.features[1])[0])
        event = batch.events[index]
        topic, partition, offset = batch.source(index)
        return [make_detection(
            detector=self.name, kind="feature_drift", model=self.model, window_start=float(event.ts),
            subject="dimension", ts=float(event.ts), model_version=event.model_version, severity="critical",
            score=float(dimension), threshold=float(self.dimension),
            summary=(f"feature vectors have {dimension} entries where the reference has {self.dimension}: "
                     f"{rows} events of this batch could not be compared"),
            evidence={"features": [], "dimension": dimension, "reference_dimension": self.dimension,
                      "ignored_events": self.ignored_rows,
                      "event_ids": [e.event_id for e in batch.events[index: index + 10]]},
            source={"topic": topic, "partition": partition, "offset": offset})]

    def _watch_classes(self, batch: ModelBatch, classes: list[str | None]) -> list[Detection]:
        rows = [i for i, c in enumerate(classes) if c is not None]
        if not rows:
            return []
        code_of = {c: i for i, c in enumerate(self.classes)}
        other = len(self.classes) - 1
        codes = np.fromiter((code_of.get(classes[i], other) for i in rows), dtype=np.int64, count=len(rows))
        hits = []
        for n, (c, sign, p0, p1, h) in enumerate(self.class_charts):
            marks = (codes == c) if sign > 0 else (codes != c)
            alarms, self.class_statistics[n] = cusum.run(marks.astype(np.int8), p0, p1, h, self.class_statistics[n])
            for at in alarms.tolist():
                if self.class_seen + at >= self.class_quiet[c]:
                    self.class_quiet[c] = self.class_seen + at + 1 + self._quiet
                    hits.append((at, c, sign))
                    break
        self.class_seen += len(rows)
        self.class_recent = np.concatenate([self.class_recent, codes])[-RECENT:]
        if not hits:
            return []
        at = min(h[0] for h in hits)
        position = self.class_seen - len(rows) + at
        if position < self.family_quiet.get("classes", 0):  # one incident, not one report per class
            self.suppressed["classes"] = self.suppressed.get("classes", 0) + len(hits)
            return []
        self.family_quiet["classes"] = position + self._quiet
        index = rows[at]
        event = batch.events[index]
        recent = self.class_recent
        shares = {self.classes[c]: {"reference": round(float(self.class_p0[c]), 4),
                                    "current": round(float(np.mean(recent == c)), 4),
                                    "direction": "up" if sign > 0 else "down"}
                  for _, c, sign in hits}
        ratio = max(max(v["current"], 1e-9) / v["reference"] if v["direction"] == "up"
                    else v["reference"] / max(v["current"], 1e-9) for v in shares.values())
        described = ", ".join(f"{name} {v['reference']:.1%} -> {v['current']:.1%}" for name, v in shares.items())
        topic, partition, offset = batch.source(index)
        return [make_detection(
            detector=self.name, kind="prediction_drift", model=self.model, window_start=float(event.ts),
            subject="classes:" + ",".join(sorted(shares)), ts=float(event.ts), model_version=event.model_version,
            severity="critical" if ratio >= 2 * self.params.class_shift else "warning",
            score=round(ratio, 4), threshold=self.params.class_shift,
            summary=(f"predicted class shares moved: {described} over the last {len(recent)} predictions "
                     f"(Bernoulli CUSUM, ERT {self.params.ert:,.0f} events)"),
            evidence={"features": [], "classes": shares, "events": int(len(recent)), "ert": self.params.ert,
                      "event_ids": [e.event_id for e in batch.events[max(0, index - 9): index + 1]]},
            source={"topic": topic, "partition": partition, "offset": offset})]

    def _watch_errors(self, batch: ModelBatch) -> list[Detection]:
        errors = _errors(batch)
        labelled = np.flatnonzero(errors >= 0)
        found = []
        detector = self.errors_detector
        for i in labelled.tolist():  # labels are few: per-event Python is affordable here
            before = detector.estimation
            detector.update(float(errors[i]))
            self.errors_seen += 1
            # a change where the recent window's error rate is above the older one's: accuracy fell
            self.recent_errors = np.append(self.recent_errors[-(RECENT - 1):], errors[i])
            if detector.drift_detected and detector.estimation > before and self.errors_seen >= self.label_quiet:
                self.label_quiet = self.errors_seen + max(100, self.params.cooldown // 10)
                recent = self.recent_errors[-200:]
                found.append(self._performance_detection(batch, i, float(recent.mean()), len(recent)))
        return found

    def _performance_detection(self, batch: ModelBatch, index: int, rate: float, events: int) -> Detection:
        event = batch.events[index]
        ref = self.reference_error_rate
        topic, partition, offset = batch.source(index)
        worse = rate - (0 if math.isnan(ref) else ref)
        return make_detection(
            detector=self.name, kind="performance_drift", model=self.model, window_start=float(event.ts),
            subject="errors", ts=float(event.ts), model_version=event.model_version,
            severity="critical" if worse >= 0.2 else "warning", score=round(rate, 4),
            threshold=None if math.isnan(ref) else round(ref, 4),
            summary=(f"error rate on labelled events rose to {rate:.1%} over the last {events}"
                     + ("" if math.isnan(ref) else f" from {ref:.1%} in the reference") + " (ADWIN)"),
            evidence={"features": [], "error_rate": rate, "reference_error_rate": None if math.isnan(ref) else ref,
                      "labelled_events": events, "method": "ADWIN",
                      "event_ids": [e.event_id for e in batch.events[max(0, index - 9): index + 1]]},
            source={"topic": topic, "partition": partition, "offset": offset})

    def report_figures(self, batch: ModelBatch) -> dict[str, Any]:
        """The largest chart statistic over its threshold at the end of the batch (1 at an alarm), or
        the excess of an alarm in the batch (its chart restarted at 0 after it), over every column."""
        if not self.built:
            return {"drift": None}
        largest = 0.0
        for group in self.groups.values():
            largest = max(largest, getattr(group, "last_excess", 0.0))  # absent in older checkpoints
            if group.charts:
                h = np.asarray([c.h for c in group.charts], dtype=np.float64)[:, None]
                largest = max(largest, float((group.statistics / h).max()))
        return {"drift": largest}

    def armed(self) -> bool:
        return self.built

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out.update({
            "state": "armed" if self.built else f"learning reference ({self.learned}/{self.params.reference_size})",
            "reference": self.reference_id, "features": self.dimension, "charts": self.charts_total,
            "chart_run_length": self.arl, "joint_calibration": self.joint, "classes": self.classes[:-1],
            "alarms": {name: g.alarms for name, g in self.groups.items()},
            "alarms_within_cooldown": dict(self.suppressed),
            "bulk_charts": self._bulk_columns(),
        })
        return out

    def _bulk_columns(self) -> dict[str, dict[str, list[str]]]:
        """Per group with bulk charts, the columns each one watches (those long-tailed on its side)."""
        out: dict[str, dict[str, list[str]]] = {}
        for name, g in self.groups.items():
            for i, c in enumerate(g.charts):
                if c.score == "winsorized":
                    out.setdefault(name, {})[c.name] = [g.names[j] for j in np.flatnonzero(g.watch[i])]
        return out


# -- per-batch columns ----------------------------------------------------------------------------


def _describe(c: dict[str, Any]) -> str:
    if c["feature"] == "multivariate":
        return f"the feature vector as a whole ({c['chart']})"
    ref, now = c["reference"]["mean"], c["current"]["mean"]
    if c["chart"].startswith("spread"):
        return f"{c['feature']} spread x{c['sd_ratio']:.2f}"
    direction = "rose" if c["effect_sd"] > 0 else "fell"
    return f"{c['feature']} {direction} from {ref:.4g} to {now:.4g} ({c['effect_sd']:+.2f} sd)"


def _stream_values(batch: ModelBatch, stream: str) -> np.ndarray:
    if stream == "confidence":
        return batch.confidence
    if stream == "prediction":
        return np.fromiter((e.prediction if e.prediction.__class__ in (float, int) else math.nan
                            for e in batch.events), dtype=np.float64, count=len(batch))
    return batch.column(stream)


def _errors(batch: ModelBatch) -> np.ndarray:
    """1 for a wrong prediction, 0 for a right one, -1 where there is no label or no class."""
    out = np.full(len(batch), -1, dtype=np.int8)
    labels = [e.label for e in batch.events]
    if labels.count(None) == len(labels):
        return out
    classes = batch.classes
    for i, label in enumerate(labels):
        if label is not None and classes[i] is not None:
            out[i] = classes[i] != class_name(label)
    return out


def _feature_names(batch: ModelBatch) -> list[str] | None:
    for e in batch.events:
        raw = bytes(e.features) if e.features else b""
        if raw[:1] == b"{":
            return sorted(msgspec.json.decode(raw))
    return None


def _stack(parts: list[np.ndarray], column: bool = False) -> np.ndarray:
    parts = [p for p in parts if len(p)]
    if not parts:
        return np.zeros((0, 1) if column else (0, 0))
    if column:
        return np.concatenate(parts)[:, None]
    dims = [p.shape[1] for p in parts]
    dim = max(set(dims), key=dims.count)
    return np.concatenate([p for p in parts if p.shape[1] == dim])


def _rows(batch: ModelBatch, rows: Any) -> ModelBatch:
    """The events at ``rows`` (a slice or indices) as a batch of their own."""
    if isinstance(rows, slice):
        return ModelBatch(batch.model, batch.events[rows], batch.records[rows])
    events, records = batch.events, batch.records
    return ModelBatch(batch.model, [events[i] for i in rows.tolist()], [records[i] for i in rows.tolist()])
