"""Drift detection quality and cost, side by side at one ERT: this project's `drift` detector, river's
ADWIN and KSWIN (one per feature, an alarm when any feature's fires) and, when alibi-detect imports,
its CVMDriftOnline. Issue 3: alibi's CVMDriftOnline on 8 features at ERT 1,000 was measured at 369 s to
configure and 2.6 ms an event; the target is >= 100x less time per event, configuration in seconds,
the same calibration (false alarms per ERT) and no longer detection delay.

Streams (each run draws its own reference and stream, and every detector reads the same ones):
  real      scikit-learn's breast-cancer rows (30 continuous features; --real digits: 64 integer pixels
            with many ties). The reference is a bootstrap draw of --reference-size rows from the 569
            rows, the stream a separate bootstrap draw: under no change the two have exactly one law.
  gaussian  8 independent N(0, 1) features (the configuration alibi was measured on).
Changes, from event --change-at of the stream on (the events before it are unchanged), --changes picks them:
  1 mean +1 sd, 1 feature | 2 mean +0.5 sd, all features | 3 sd x1.5, 1 feature | 4 correlation (real: a
  pair with correlation 0.8 decoupled, by drawing one of the two from another row; gaussian: two
  features given correlation 0.8). The marginals of the correlation change are exactly unchanged.

Detectors, all at ERT --ert (expected events between false alarms, the detector as a whole):
  ours      monitor.detectors.drift.Drift(features, multivariate; no classes, labels or streams),
            reference_size --reference-size, fed batches of --batch events. Its features' charts share
            the ERT by a joint calibration simulated on each run's reference (the default since
            2026-12-03; --drift-params '{"calibration": "union"}' gives the union bound of before).
  ADWIN     river.drift.ADWIN per feature, primed with the reference; delta by bisection on null
            streams (separate seeds from the evaluation) so that the mean run length is the ERT.
  KSWIN     river.drift.KSWIN per feature (window 100, stat 30, seed = the feature's index), primed with
            the reference's last 99 events. Its alarm is "D >= k/30" for a whole k (the p-value of
            30 against 30 events is a function of D), so alpha moves the run length in steps: the k
            whose mean run length is nearest the ERT (in log) is taken. Run lengths come from a numpy
            replica of KSWIN.update (the same random.Random(seed) samples, D on the same windows);
            river's own class is run on two streams to check it alarms at the same event and to time it.
  CVM       alibi_detect.cd.CVMDriftOnline (--alibi), ert = ERT, window sizes --alibi-windows,
            n_bootstraps: alibi's default 10,000, raised to the least alibi accepts for the number of
            features (its threshold is a 1 - 1/(ERT*d) quantile: 30 features need about 31,500).
            Configured once per stream (its thresholds depend on the reference's size, not its values,
            and are simulated with numpy's global, unseeded generator: each configuration has its own
            calibration); each run swaps in its reference (_configure_ref). History arrays are trimmed
            as monitor/detectors/alibi_adapter.py does, else predict() slows down as the stream grows.
            FETDriftOnline is for binary features: none here, so it is not run.

Measures: configuration time; µs per event (ours: wall time of update() on batches, the features handed
over parsed as the others get them; river, alibi: wall time of the per-event loop over the features);
the mean run length to the first false alarm on null streams (censored at 10 x ERT, estimated as
sum(min(T, H)) / alarms) against the ERT; the detection delay (events from the first changed event up
to and including the alarm) over runs with no alarm before the change (those are counted apart), its
median over all such runs (runs not detected within 5 x ERT count as longer), its mean over detected
runs, and the shares detected within ERT/10 (a detector blind to the change: about 10%) and 5 x ERT
(blind: about 99%). With alibi, ours and alibi are also compared run by run on the same streams (the
runs where neither alarmed before the change; one not detected within 5 x ERT counts as 5 x ERT): the
medians and means, the mean of the differences with a 95% interval, who alarmed first, and a sign test.
Run r of a change is the same stream whatever else runs, so more runs extend a sample, never redraw it.
Runs by default: 400 null and 100 per change (ours, river), river calibrated on 100 other null runs;
30 null and 20 per change for alibi (the first of the same streams). --quick: 60, 20, 40; alibi 5, 3.

    .venv/bin/python bench/drift_quality.py [--ert 1000] [--quick]              # ours, ADWIN, KSWIN
    .venv-alibi/bin/python bench/drift_quality.py --alibi [--quick] [--river]   # + alibi CVMDriftOnline
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

NULL_HORIZON = 10  # null runs stop at this many ERTs of stream events (censored)
CHANGE_HORIZON = 5  # change runs stop this many ERTs after the change
START = time.perf_counter()


def progress(text: str) -> None:
    print(f"[{time.perf_counter() - START:7.1f}s] {text}", file=sys.stderr, flush=True)


# -- streams ----------------------------------------------------------------------------------------


class Stream:
    """Draws the reference and the stream of a run, and applies a change."""

    def __init__(self, kind: str, real: str, reference_size: int, seed: int, gaussian_features: int = 8):
        self.kind, self.reference_size, self.seed = kind, reference_size, seed
        if kind == "gaussian":
            self.d = gaussian_features
            self.names = [f"f{j}" for j in range(self.d)]
            self.pool = None
            self.mean, self.sd = np.zeros(self.d), np.ones(self.d)
            self.one, self.pair = 0, (0, 1)
            self.title = f"gaussian: {self.d} independent N(0,1) features"
        else:
            from scipy import stats
            from sklearn.datasets import load_breast_cancer, load_digits
            data = load_breast_cancer() if real == "cancer" else load_digits()
            self.pool = np.asarray(data.data, dtype=np.float64)
            self.names = [str(n) for n in data.feature_names]
            self.d = self.pool.shape[1]
            self.mean, self.sd = self.pool.mean(axis=0), self.pool.std(axis=0)
            distinct = np.array([len(np.unique(c)) for c in self.pool.T])
            skew = np.abs(stats.skew(self.pool, axis=0))
            skew[distinct < 10] = np.inf
            self.one = int(np.argmin(skew))  # the most symmetric feature: "1 sd" means the most there
            live = np.flatnonzero(distinct > 1)
            corr = np.corrcoef(self.pool[:, live].T)
            a, b = np.triu_indices_from(corr, 1)
            k = int(np.argmin(np.abs(np.abs(corr[a, b]) - 0.8)))
            self.pair = (int(live[a[k]]), int(live[b[k]]))
            self.pair_corr = float(corr[a[k], b[k]])
            ties = np.mean([1 - len(np.unique(c)) / len(c) for c in self.pool.T])
            self.title = (f"{'breast-cancer' if real == 'cancer' else 'digits'}: {self.pool.shape[0]} real rows x "
                          f"{self.d} features ({ties:.0%} of values repeat within a feature), bootstrap draws")
        self.scenarios: list[tuple[str, Callable[[np.ndarray, np.random.Generator], None]]] = [
            (f"mean +1 sd, 1 feature ({self.names[self.one]})", self._shift_one),
            ("mean +0.5 sd, all features", self._shift_all),
            (f"sd x1.5, 1 feature ({self.names[self.one]})", self._spread_one),
            (self._corr_title(), self._correlation),
        ]

    def _corr_title(self) -> str:
        a, b = self.pair
        if self.pool is None:
            return f"correlation 0 -> 0.8 ({self.names[a]}, {self.names[b]})"
        return f"correlation {self.pair_corr:.2f} -> 0 ({self.names[a]}, {self.names[b]})"

    def rows(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if self.pool is None:
            return rng.normal(size=(n, self.d))
        return self.pool[rng.integers(0, len(self.pool), size=n)]

    def run(self, scenario: int | None, run: int, length: int, change_at: int,
            salt: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(reference, stream) of one run; scenario None: no change."""
        tag = 0 if scenario is None else scenario + 1
        kind = 1 if self.pool is None else 2
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, kind, self.d, tag, salt, run]))
        reference = self.rows(rng, self.reference_size)
        x = self.rows(rng, length)
        if scenario is not None:
            self.scenarios[scenario][1](x[change_at:], rng)
        return reference, x

    def _shift_one(self, x: np.ndarray, rng: np.random.Generator) -> None:
        x[:, self.one] += self.sd[self.one]

    def _shift_all(self, x: np.ndarray, rng: np.random.Generator) -> None:
        x += 0.5 * self.sd

    def _spread_one(self, x: np.ndarray, rng: np.random.Generator) -> None:
        j = self.one
        x[:, j] = self.mean[j] + 1.5 * (x[:, j] - self.mean[j])

    def _correlation(self, x: np.ndarray, rng: np.random.Generator) -> None:
        a, b = self.pair
        if self.pool is None:
            x[:, b] = 0.8 * x[:, a] + 0.6 * x[:, b]  # still N(0, 1), now correlated 0.8 with a
        else:
            x[:, b] = self.pool[rng.integers(0, len(self.pool), size=len(x)), b]  # same marginal, independent of a


# -- results ------------------------------------------------------------------------------------------


@dataclass
class Tally:
    """One detector on one stream: costs, null run lengths and, per scenario, first alarms."""

    name: str
    setting: str = ""
    param: float = math.nan  # ADWIN's delta, KSWIN's k
    config_s: float = math.nan  # configuration: threshold calibration / construction
    config_note: str = ""
    busy_s: float = 0.0  # wall time of feeding stream events
    events: int = 0  # stream events fed
    null: list[int | None] = field(default_factory=list)  # run length (1-based) or None: censored
    null_horizon: int = 0
    changes: dict[int, list[int | None]] = field(default_factory=dict)  # alarm index per run or None
    first_columns: dict[int, list[str]] = field(default_factory=dict)

    def us_per_event(self) -> float:
        return 1e6 * self.busy_s / self.events if self.events else math.nan


def mean_run_length(lengths: list[int | None], horizon: int) -> tuple[float, int]:
    """(censored exponential estimate of the mean run length, alarms)."""
    alarms = sum(1 for t in lengths if t is not None)
    total = sum(horizon if t is None else t for t in lengths)
    return (total / alarms if alarms else math.inf), alarms


def delays(alarms: list[int | None], change_at: int, horizon: int, early: int) -> dict[str, Any]:
    before = sum(1 for a in alarms if a is not None and a < change_at)
    valid = [a for a in alarms if a is None or a >= change_at]
    delay = np.array([horizon + 1 if a is None else a - change_at + 1 for a in valid], dtype=float)
    detected = delay <= horizon
    return {"runs": len(alarms), "before": before, "valid": len(valid),
            "detected": float(detected.mean()) if len(valid) else math.nan,
            "median": float(np.median(delay)) if len(valid) else math.nan,
            "mean": float(delay[detected].mean()) if detected.any() else math.nan,
            "early": float((delay <= early).mean()) if len(valid) else math.nan,
            "censored_median": bool(len(valid) and np.median(delay) > horizon)}


# -- this project's detector ----------------------------------------------------------------------------


class Ours:
    """monitor's Drift on a run: the reference as one batch, then batches of ``batch`` events."""

    def __init__(self, ert: float, reference_size: int, batch: int, names: list[str], sample_every: int = 1,
                 extra: dict | None = None):
        from monitor.detectors import ModelBatch
        from monitor.detectors.drift import Drift
        self.Drift, self.ModelBatch = Drift, ModelBatch
        self.params = Drift.Params(ert=ert, reference_size=reference_size, features=True, multivariate=True,
                                   classes=False, labels=False, streams=[], feature_names=names,
                                   sample_every=sample_every, **(extra or {}))
        self.batch = batch
        size = max(batch, reference_size)
        self.events = [SimpleNamespace(ts=float(i), features=None, confidence=None, probabilities=None,
                                       prediction=None, label=None, event_id=str(i), client_id=None,
                                       model_version=None, latency_ms=None) for i in range(size)]
        self.records = [SimpleNamespace(topic="bench", partition=0, offset=i) for i in range(size)]
        self.warm: list[float] = []

    def _batch(self, x: np.ndarray) -> Any:
        n = len(x)
        b = self.ModelBatch("m", self.events[:n], self.records[:n])
        b.__dict__["features"] = (x, np.ones(n, dtype=bool))  # parsed: the detector's own cost only
        return b

    def first_alarm(self, reference: np.ndarray, x: np.ndarray, tally: Tally) -> tuple[int | None, list[str]]:
        start = time.perf_counter()
        detector = self.Drift("m", self.params)
        detector.update(self._batch(reference))
        spent = time.perf_counter() - start
        if math.isnan(tally.config_s):
            tally.config_s = spent  # cold: the charts' thresholds are computed (then cached per process)
        else:
            self.warm.append(spent)
        for offset in range(0, len(x), self.batch):
            part = x[offset: offset + self.batch]
            b = self._batch(part)
            start = time.perf_counter()
            found = detector.update(b)
            tally.busy_s += time.perf_counter() - start
            tally.events += len(part)
            if found:
                first = min(found, key=lambda f: f.ts)
                columns = first.evidence.get("columns", [])
                at = min((int(c["at_event"]) for c in columns), default=int(first.ts))
                return offset + int(first.ts), sorted(c["feature"] for c in columns if int(c["at_event"]) == at)
        return None, []

    def parse_cost(self, x: np.ndarray) -> float:
        """µs an event to parse JSON features of a batch (what the daemon adds before the detector)."""
        import msgspec
        events = [SimpleNamespace(features=msgspec.Raw(msgspec.json.encode(r))) for r in x.tolist()]
        start = time.perf_counter()
        self.ModelBatch("m", events, []).features  # noqa: B018
        return 1e6 * (time.perf_counter() - start) / len(x)


# -- river ------------------------------------------------------------------------------------------------


def adwin_first_alarm(reference: np.ndarray, x: np.ndarray, delta: float, tally: Tally | None) -> int | None:
    from river.drift import ADWIN
    detectors = [ADWIN(delta=delta) for _ in range(reference.shape[1])]
    updates = [a.update for a in detectors]
    for row in reference.tolist():  # primed with the reference; alarms there only cut its window
        for update, v in zip(updates, row):
            update(v)
    start = time.perf_counter()
    alarm = None
    for t, row in enumerate(x.tolist()):
        for update, v in zip(updates, row):
            update(v)
        if any(a.drift_detected for a in detectors):
            alarm = t
            break
    if tally is not None:
        tally.busy_s += time.perf_counter() - start
        tally.events += len(x) if alarm is None else alarm + 1
    return alarm


class KswinReplica:
    """river's KSWIN (window 100, stat 30, seed j for feature j) on every feature, vectorised: at each
    event it draws the same 30 of the window's first 70 positions as ``random.Random(j).sample`` does
    and computes the same two-sample KS statistic D (in 30ths, ties counted as scipy does)."""

    W, S = 100, 30

    def __init__(self, d: int, length: int):
        self.idx = []
        for j in range(d):
            r, population = random.Random(j), range(self.W - self.S)
            self.idx.append(np.array([r.sample(population, self.S) for _ in range(length)], dtype=np.intp))
        from scipy import stats
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=RuntimeWarning)
            self.p = {k: float(stats.ks_2samp(np.arange(30), np.arange(30) + k, method="auto").pvalue)
                      for k in range(31)}

    def alpha(self, k: int) -> float:
        """An alpha whose KSWIN alarms exactly at D >= k/30 (p-values fall as D grows)."""
        return self.p[k]

    def d_series(self, series: np.ndarray, j: int, m0: int, m1: int) -> np.ndarray:
        """D*30 of feature j's tests m0..m1-1 (test m sees series[m : m+100])."""
        from numpy.lib.stride_tricks import sliding_window_view
        chunk = series[m0: m1 + self.W - 1]
        ranks = np.unique(chunk, return_inverse=True)[1].astype(np.int64).ravel()
        windows = sliding_window_view(ranks, self.W)
        rnd = np.take_along_axis(windows[:, : self.W - self.S], self.idx[j][m0:m1], axis=1)
        keys = np.concatenate([rnd * 2, windows[:, self.W - self.S:] * 2 + 1], axis=1)
        keys.sort(axis=1)
        cum = np.cumsum(1 - 2 * (keys & 1), axis=1)
        value = keys >> 1
        end = np.ones(cum.shape, dtype=bool)
        end[:, :-1] = value[:, 1:] != value[:, :-1]
        return np.abs(np.where(end, cum, 0)).max(axis=1)

    def first_passages(self, reference: np.ndarray, x: np.ndarray, ks: list[int],
                       chunk: int = 1024) -> dict[int, int | None]:
        """For each k: the first stream event at which any feature's D >= k/30 (None: not in x)."""
        series = np.concatenate([reference[-(self.W - 1):], x])
        found: dict[int, int | None] = {k: None for k in ks}
        top = max(ks)
        for m0 in range(0, len(x), chunk):
            m1 = min(len(x), m0 + chunk)
            worst = np.zeros(m1 - m0, dtype=np.int64)
            for j in range(x.shape[1]):
                np.maximum(worst, self.d_series(series[:, j], j, m0, m1), out=worst)
            running = np.maximum.accumulate(worst)
            for k in ks:
                if found[k] is None and running[-1] >= k:
                    found[k] = m0 + int(np.argmax(running >= k))
            if found[top] is not None:
                break
        return found

    def first_alarm(self, reference: np.ndarray, x: np.ndarray, k: int) -> int | None:
        return self.first_passages(reference, x, [k], chunk=512)[k]


def kswin_river_first_alarm(reference: np.ndarray, x: np.ndarray, alpha: float, tally: Tally) -> int | None:
    from river.drift import KSWIN
    detectors = [KSWIN(alpha=alpha, window_size=100, stat_size=30, seed=j) for j in range(reference.shape[1])]
    for row in reference[-99:].tolist():
        for a, v in zip(detectors, row):
            a.update(v)
    start = time.perf_counter()
    alarm = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)
        for t, row in enumerate(x.tolist()):
            for a, v in zip(detectors, row):
                a.update(v)
            if any(a.drift_detected for a in detectors):
                alarm = t
                break
    tally.busy_s += time.perf_counter() - start
    tally.events += len(x) if alarm is None else alarm + 1
    return alarm


def calibrate_adwin(stream: Stream, ert: float, runs: int, change_at: int) -> tuple[float, float, float, int]:
    """delta whose mean run length over ``runs`` null streams is the ERT: bisection on log(delta),
    the same streams at every step. Returns (delta, mean run length, seconds, steps)."""
    horizon = int(NULL_HORIZON * ert)
    start = time.perf_counter()
    low, high = -14.0, math.log10(0.5)  # low: long run lengths
    best = (math.inf, 0.0, math.inf)
    steps = 0
    for steps in range(1, 15):
        mid = (low + high) / 2
        lengths = []
        for r in range(runs):
            reference, x = stream.run(None, r, horizon, change_at, salt=1)
            a = adwin_first_alarm(reference, x, 10 ** mid, None)
            lengths.append(None if a is None else a + 1)
        mean, _ = mean_run_length(lengths, horizon)
        progress(f"  ADWIN calibration step {steps}: delta {10 ** mid:.3g} -> mean run length {mean:,.0f}")
        miss = abs(math.log(mean / ert))
        if miss < best[0]:
            best = (miss, 10 ** mid, mean)
        if miss < 0.03:
            break
        if mean > ert:
            low = mid
        else:
            high = mid
    return best[1], best[2], time.perf_counter() - start, steps


def calibrate_kswin(stream: Stream, replica: KswinReplica, ert: float, runs: int,
                    change_at: int) -> tuple[int, dict[int, float], float]:
    """The k (alarm at D >= k/30) whose mean run length over ``runs`` null streams is nearest the ERT."""
    horizon = int(NULL_HORIZON * ert)
    start = time.perf_counter()
    ks = list(range(4, 31))
    passages: dict[int, list[int | None]] = {k: [] for k in ks}
    top = 30
    for r in range(runs):
        reference, x = stream.run(None, r, horizon, change_at, salt=2)
        wanted = [k for k in ks if k <= top]
        found = replica.first_passages(reference, x, wanted)
        for k in wanted:
            passages[k].append(None if found[k] is None else found[k] + 1)
        if r == 9:  # after a pilot of 10 full runs, follow only the k's near the ERT
            means = {k: mean_run_length(passages[k], horizon)[0] for k in ks}
            top = min([k for k in ks if means[k] >= 4 * ert] or [30])
            top = min(30, top + 1)
    means = {k: mean_run_length(v, horizon)[0] for k, v in passages.items() if len(v) == runs}
    k = min(means, key=lambda k: abs(math.log(means[k] / ert)) if means[k] < math.inf else math.inf)
    return k, means, time.perf_counter() - start


# -- alibi-detect -----------------------------------------------------------------------------------------


class Alibi:
    def __init__(self, stream: Stream, ert: float, windows: list[int], bootstraps: int | None, quick: bool,
                 seed: int | None = None):
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        from alibi_detect.cd import CVMDriftOnline
        beta = 1 - (1 - 1 / ert) ** (1 / stream.d)
        least = int(math.ceil(1.05 / beta)) + 64  # alibi refuses a 1-beta quantile of fewer samples
        self.bootstraps = bootstraps or (least if quick else max(10_000, least))
        self.least = least
        reference, _ = stream.run(None, 0, 1, 0)
        progress(f"  alibi CVMDriftOnline: configuring ({self.bootstraps:,} bootstrap streams, windows {windows}, "
                 f"reference {len(reference)} x {stream.d}) ...")
        start = time.perf_counter()
        if seed is not None:  # alibi simulates its thresholds with numpy's global generator
            np.random.seed(seed)
        self.detector = CVMDriftOnline(reference, ert=ert, window_sizes=windows, n_bootstraps=self.bootstraps,
                                       verbose=False)
        self.config_s = time.perf_counter() - start
        progress(f"  alibi CVMDriftOnline configured in {self.config_s:.1f}s")
        self.swap: list[float] = []

    def first_alarm(self, reference: np.ndarray, x: np.ndarray, tally: Tally) -> int | None:
        det = self.detector
        start = time.perf_counter()
        det.x_ref = reference.reshape(len(reference), -1)  # the same size n its thresholds were simulated for
        det._configure_ref()
        det.reset_state()
        self.swap.append(time.perf_counter() - start)
        keep = int(det.max_ws)
        start = time.perf_counter()
        alarm = None
        for t in range(len(x)):
            if det.predict(x[t], return_test_stat=False)["data"]["is_drift"]:
                alarm = t
                break
            if len(det.test_stats) > 64:  # as alibi_adapter._trim_history: alibi reads only the ends
                det.test_stats = det.test_stats[-1:]
                det.drift_preds = det.drift_preds[-1:]
            if len(det.xs) > 2 * keep + 64:
                det.xs = det.xs[-keep:]
        tally.busy_s += time.perf_counter() - start
        tally.events += len(x) if alarm is None else alarm + 1
        return alarm


# -- one stream -------------------------------------------------------------------------------------------


def bench_stream(stream: Stream, args: argparse.Namespace, use: dict[str, bool]) -> dict[str, Tally]:
    ert, change_at = args.ert, args.change_at
    null_horizon = int(NULL_HORIZON * ert)
    change_len = change_at + int(CHANGE_HORIZON * ert)
    tallies: dict[str, Tally] = {}
    progress(f"{stream.title}")

    ours = None
    if use["ours"]:
        ours_ert = args.ours_ert or ert
        ours = Ours(ours_ert, args.reference_size, args.batch, stream.names, args.sample_every,
                    json.loads(args.drift_params))
        tallies["ours"] = Tally("ours (Drift)",
                                f"ert {ours_ert:g}, reference {args.reference_size}, batches of {args.batch}",
                                null_horizon=null_horizon)
    if use["river"]:
        delta, achieved, seconds, steps = calibrate_adwin(stream, ert, args.calibration_runs, change_at)
        tallies["adwin"] = Tally("river ADWIN", f"delta {delta:.3g}", param=delta, config_s=seconds,
                                 null_horizon=null_horizon,
                                 config_note=f"bisection, {steps} steps x {args.calibration_runs} null runs "
                                             f"(mean run length there {achieved:,.0f})")
        progress(f"  ADWIN: delta {delta:.3g} (calibration mean run length {achieved:,.0f}, {seconds:.0f}s)")
        replica = KswinReplica(stream.d, max(null_horizon, change_len))
        k, means, seconds = calibrate_kswin(stream, replica, ert, args.calibration_runs, change_at)
        near = ", ".join(f"D>={j}/30: {means[j]:,.0f}" for j in (k - 1, k, k + 1) if j in means)
        tallies["kswin"] = Tally("river KSWIN", f"alpha {replica.alpha(k):.3g} (D >= {k}/30)", param=k,
                                 config_s=seconds,
                                 null_horizon=null_horizon,
                                 config_note=f"{args.calibration_runs} null runs, mean run lengths {near} "
                                             f"(vectorised replica; river's class would take ~80x longer)")
        progress(f"  KSWIN: alarm at D >= {k}/30 ({near}; {seconds:.0f}s)")
        # river's own KSWIN: the same first alarm as the replica, and its cost per event
        checks = [(None, 0), (0, 0)]
        for scenario, r in checks[: args.kswin_checks]:
            reference, x = (stream.run(None, r, null_horizon, change_at) if scenario is None
                            else stream.run(scenario, r, change_len, change_at))
            x = x[: args.kswin_check_events]
            want = replica.first_alarm(reference, x, k)
            got = kswin_river_first_alarm(reference, x, replica.alpha(k), tallies["kswin"])
            progress(f"  KSWIN check on {'a null' if scenario is None else 'a changed'} stream: "
                     f"river {got}, replica {want}")
            if got != want:
                raise SystemExit(f"KSWIN replica disagrees with river: river alarms at {got}, the replica at {want}")
    alibi = None
    if use["alibi"]:
        alibi = Alibi(stream, ert, args.alibi_windows, args.alibi_bootstraps, args.quick, args.alibi_seed)
        tallies["alibi"] = Tally("alibi CVMDriftOnline",
                                 f"windows {args.alibi_windows}, {alibi.bootstraps:,} bootstraps",
                                 config_s=alibi.config_s, null_horizon=null_horizon)

    def run_all(scenario: int | None, r: int, length: int) -> None:
        reference, x = (stream.run(None, r, length, change_at) if scenario is None
                        else stream.run(scenario, r, length, change_at))
        results: dict[str, int | None] = {}
        if ours is not None:
            results["ours"], columns = ours.first_alarm(reference, x, tallies["ours"])
            if scenario is not None:
                tallies["ours"].first_columns.setdefault(scenario, []).append("+".join(columns) or "-")
        if "adwin" in tallies:
            results["adwin"] = adwin_first_alarm(reference, x, tallies["adwin"].param, tallies["adwin"])
            results["kswin"] = replica.first_alarm(reference, x, int(tallies["kswin"].param))
        if alibi is not None and r < (args.alibi_null_runs if scenario is None else args.alibi_change_runs):
            results["alibi"] = alibi.first_alarm(reference, x, tallies["alibi"])
        for name, alarm in results.items():
            if scenario is None:
                tallies[name].null.append(None if alarm is None else alarm + 1)
            else:
                tallies[name].changes.setdefault(scenario, []).append(alarm)

    runs = max(args.null_runs, args.alibi_null_runs if alibi else 0)
    for r in range(runs):
        run_all(None, r, null_horizon)
        if (r + 1) % max(1, runs // 5) == 0:
            progress(f"  null runs: {r + 1}/{runs}")
    runs = max(args.change_runs, args.alibi_change_runs if alibi else 0)
    for s, (title, _) in enumerate(stream.scenarios):
        if s + 1 not in args.changes:
            continue
        for r in range(runs):
            run_all(s, r, change_len)
        progress(f"  change '{title}': {runs} runs")
    if ours is not None:
        tallies["ours"].config_note = (f"cold (thresholds computed); warm, thresholds cached: "
                                       f"{np.median(ours.warm) if ours.warm else math.nan:.3f}s")
        x = stream.run(None, 0, args.batch, change_at)[1]
        tallies["ours"].config_note += f"; parsing JSON features adds {ours.parse_cost(x):.1f} µs/event"
    if alibi is not None:
        tallies["alibi"].config_note = (f"per run, swapping in its reference: {np.median(alibi.swap):.2f}s; "
                                        f"{alibi.least:,} bootstraps is the least alibi accepts here")
    return tallies


# -- printing ---------------------------------------------------------------------------------------------


def fmt_events(v: float) -> str:
    return "-" if v != v else (f"{v:,.0f}" if v >= 10 else f"{v:.1f}")


def print_stream(stream: Stream, tallies: dict[str, Tally], args: argparse.Namespace) -> None:
    ert = args.ert
    print(f"\n### {stream.title}\n")
    print(f"Reference: {args.reference_size} rows per run, drawn apart from the stream. ERT {ert:,.0f} events. "
          f"Null runs censored at {NULL_HORIZON * ert:,.0f} events; changes start at event {args.change_at} "
          f"and runs stop {CHANGE_HORIZON * ert:,.0f} events after.\n")
    print("| detector | setting | configure (s) | µs/event | null runs | mean run length | / ERT (95% CI) "
          "| median run length |")
    print("|---|---|---|---|---|---|---|---|")
    for t in tallies.values():
        mean, alarms = mean_run_length(t.null, t.null_horizon)
        if alarms:
            lo, hi = mean / (1 + 1.96 / math.sqrt(alarms)), mean / max(1e-9, 1 - 1.96 / math.sqrt(alarms))
            ci = f"{mean / ert:.2f} ({lo / ert:.2f}-{hi / ert:.2f})" if alarms > 4 else f"{mean / ert:.2f}"
        else:
            ci = "no alarm"
        lengths = np.array([t.null_horizon + 1 if v is None else v for v in t.null], dtype=float)
        censored = len(t.null) - alarms
        print(f"| {t.name} | {t.setting} | {t.config_s:.3g} | {t.us_per_event():.1f} | {len(t.null)}"
              f"{f' ({censored} censored)' if censored else ''} | {fmt_events(mean)} | {ci} | "
              f"{fmt_events(float(np.median(lengths))) if len(lengths) else '-'} |")
    print()
    for t in tallies.values():
        if t.config_note:
            print(f"- {t.name}: {t.config_note}")
    print(f"\nDetection delay: events from the first changed event to the alarm, inclusive, over the runs with no "
          f"alarm before the change. A detector blind to a change still alarms, falsely: after a median of about "
          f"{0.69 * ert:,.0f} events, within ERT/10 in about 10% of runs and within 5 x ERT in about 99%.\n")
    horizon, early = int(CHANGE_HORIZON * ert), max(1, int(ert / 10))
    print(f"| change | detector | runs | false alarm before the change | detected within {early:,} (ERT/10) "
          f"| within {horizon:,} (5 x ERT) | median delay | mean delay (detected) |")
    print("|---|---|---|---|---|---|---|---|")
    for s, (title, _) in enumerate(stream.scenarios):
        for t in tallies.values():
            if s not in t.changes:
                continue
            d = delays(t.changes[s], args.change_at, horizon, early)
            median = f"> {horizon:,}" if d["censored_median"] else fmt_events(d["median"])
            share = lambda v: "-" if v != v else f"{v:.0%}"  # noqa: E731
            print(f"| {title} | {t.name} | {d['runs']} | {d['before']} | {share(d['early'])} | "
                  f"{share(d['detected'])} | {median} | "
                  f"{fmt_events(d['mean'])} |")
    if "ours" in tallies and tallies["ours"].first_columns:
        print("\nours, the columns of the first alarm after the change (most frequent):")
        for s, (title, _) in enumerate(stream.scenarios):
            cols = tallies["ours"].first_columns.get(s, [])
            if not cols:
                continue
            names, counts = np.unique(cols, return_counts=True)
            top = sorted(zip(counts, names), reverse=True)[:3]
            print(f"- {title}: " + ", ".join(f"{n} ({c})" for c, n in top))
    if "ours" in tallies and "alibi" in tallies:
        o, a = tallies["ours"], tallies["alibi"]
        print("\nours against alibi on the same runs (those where neither alarmed before the change):\n")
        print("| change | runs | median delay ours | median delay alibi | mean delay ours | mean delay alibi "
              "| ours - alibi, mean (95% CI) | ours first | alibi first | same event | sign test p |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for s, (title, _) in enumerate(stream.scenarios):
            pairs = [(x, y) for x, y in zip(o.changes.get(s, []), a.changes.get(s, []))
                     if (x is None or x >= args.change_at) and (y is None or y >= args.change_at)]
            if not pairs:
                continue
            late = args.change_at + horizon  # not detected: later than any detection
            ours_at = np.array([late if x is None else x for x, _ in pairs])
            alibi_at = np.array([late if y is None else y for _, y in pairs])
            print(f"| {title} | {len(pairs)} | {paired_row(ours_at - args.change_at + 1, alibi_at - args.change_at + 1)} |")
        print(f"\nalibi / ours: {a.us_per_event() / o.us_per_event():,.0f}x the time per event, "
              f"{a.config_s / o.config_s:,.0f}x the configuration time (ours cold).")


def paired_row(ours: np.ndarray, alibi: np.ndarray) -> str:
    """The paired comparison's cells: medians, means, the mean of the differences with its 95% interval
    (normal approximation; n >= 30 is what it is for), who alarmed first, and the two-sided sign test
    of "first" against a coin (same-event runs left out)."""
    from scipy import stats
    diff = ours - alibi
    half = 1.96 * diff.std(ddof=1) / math.sqrt(len(diff)) if len(diff) > 1 else math.nan
    first, second = int((ours < alibi).sum()), int((alibi < ours).sum())
    p = stats.binomtest(first, first + second).pvalue if first + second else math.nan
    return (f"{np.median(ours):,.0f} | {np.median(alibi):,.0f} | {ours.mean():,.1f} | {alibi.mean():,.1f} | "
            f"{diff.mean():+.1f} ({diff.mean() - half:+.1f} to {diff.mean() + half:+.1f}) | {first} | {second} | "
            f"{int((diff == 0).sum())} | {p:.2f}")


def code_version() -> str:
    """Which code ran (bench/provenance.py)."""
    from provenance import code_version as version
    return version([os.path.join("monitor", "detectors", f) for f in ("drift.py", "rank_cusum.py", "cusum.py",
                                                                  "joint_calibration.py")], "detector files")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ert", type=float, default=1000.0, help="expected events between false alarms (all detectors)")
    parser.add_argument("--streams", default="real,gaussian", help="comma-separated: real, gaussian")
    parser.add_argument("--real", choices=["cancer", "digits"], default="cancer")
    parser.add_argument("--gaussian-features", type=int, default=8)
    parser.add_argument("--reference-size", type=int, default=1023)
    parser.add_argument("--batch", type=int, default=2000, help="events per batch for ours")
    parser.add_argument("--alibi-seed", type=int, default=None,
                        help="seed numpy's global generator before alibi configures (its thresholds are "
                             "simulated with it: without a seed each run has its own calibration)")
    parser.add_argument("--ours-ert", type=float, default=None, metavar="EVENTS",
                        help="run ours at this ERT instead (the others stay at --ert): to compare delays at "
                             "matched false alarms when ours is more conservative than another detector")
    parser.add_argument("--drift-params", default="{}", metavar="JSON",
                        help='more parameters of our detector, e.g. \'{"shifts": [0.5, 2.0]}\' (default: none)')
    parser.add_argument("--sample-every", type=int, default=1,
                        help="ours: chart one event in this many (the daemon's default is 4, for throughput; "
                             "1 compares the methods event for event)")
    parser.add_argument("--null-runs", type=int, default=400)
    parser.add_argument("--change-runs", type=int, default=100, help="runs per change scenario")
    parser.add_argument("--calibration-runs", type=int, default=100, help="null runs to calibrate ADWIN and KSWIN")
    parser.add_argument("--change-at", type=int, default=250, help="stream event where the change starts")
    parser.add_argument("--kswin-checks", type=int, default=2, help="streams on which river's KSWIN runs (0-2)")
    parser.add_argument("--kswin-check-events", type=int, default=1500)
    parser.add_argument("--alibi", action="store_true", help="add alibi-detect's CVMDriftOnline (needs numpy<2)")
    parser.add_argument("--river", action="store_true", help="with --alibi: also run river's detectors")
    parser.add_argument("--no-river", action="store_true")
    parser.add_argument("--alibi-windows", default="20,40,80")
    parser.add_argument("--alibi-bootstraps", type=int, default=None)
    parser.add_argument("--alibi-null-runs", type=int, default=30)
    parser.add_argument("--alibi-change-runs", type=int, default=20)
    parser.add_argument("--changes", default="1,2,3,4",
                        help="comma-separated numbers of the changes to run, in the order listed above (a run's "
                             "stream does not depend on which others run)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="fewer runs (and alibi at its least bootstraps)")
    args = parser.parse_args()
    args.alibi_windows = [int(w) for w in args.alibi_windows.split(",")]
    try:
        args.changes = {int(c) for c in args.changes.split(",")}
    except ValueError:
        parser.error(f"--changes: expected numbers 1-4 separated by commas, got {args.changes!r}")
    if not args.changes <= {1, 2, 3, 4}:
        parser.error(f"--changes: the changes are numbered 1-4, got {sorted(args.changes)}")
    if args.quick:
        args.null_runs, args.change_runs, args.calibration_runs = 60, 20, 40
        args.alibi_null_runs, args.alibi_change_runs, args.kswin_checks = 5, 3, 1
    if args.reference_size < 127:
        parser.error("--reference-size must be at least 127 (the drift detector's least reference)")

    use = {"ours": True, "river": not args.no_river and (not args.alibi or args.river), "alibi": args.alibi}
    try:
        import monitor.detectors.drift  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        print(f"monitor does not import here ({type(exc).__name__}: {exc}): this project's detector is not run")
        use["ours"] = False
    if args.alibi:
        try:
            os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
            import alibi_detect  # noqa: F401
        except Exception as exc:  # noqa: BLE001
            raise SystemExit(f"--alibi: alibi-detect does not import here ({type(exc).__name__}: {exc}); "
                             "run this with .venv-alibi/bin/python") from None
    import numpy
    versions = [f"Python {sys.version.split()[0]}", f"numpy {numpy.__version__}"]
    if use["river"]:
        import river
        versions.append(f"river {river.__version__}")
    if use["alibi"]:
        import alibi_detect
        versions.append(f"alibi-detect {alibi_detect.__version__}")
    print(f"drift quality: ERT {args.ert:,.0f}; {', '.join(versions)}; detectors: "
          + ", ".join(n for n, on in use.items() if on))
    if use["ours"]:
        print(f"this project's drift detector: {code_version()}")
    if args.alibi and not args.river:
        print("river's detectors are not run with --alibi (--river adds them): this environment pins river 0.23, "
              "whose ADWIN is about 12x slower than 0.26's; their figures are those of the main run")
    if args.alibi:
        print("alibi FETDriftOnline is not run: it tests binary (Bernoulli) features, and none of these is binary")
    print(f"runs: {args.null_runs} null and {args.change_runs} per change"
          + (f" ({args.alibi_null_runs} and {args.alibi_change_runs} for alibi, the first of the same streams)"
             if args.alibi else "")
          + (f"; river calibrated on {args.calibration_runs} other null runs" if use["river"] else ""))
    started = time.perf_counter()
    for kind in args.streams.split(","):
        stream = Stream(kind.strip(), args.real, args.reference_size, args.seed, args.gaussian_features)
        begun = time.perf_counter()
        tallies = bench_stream(stream, args, use)
        print_stream(stream, tallies, args)
        print(f"\n({time.perf_counter() - begun:.0f}s for this stream)", flush=True)
    print(f"\ntotal {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
