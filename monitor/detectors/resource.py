"""Resource anomalies: cost regressions per model version, expensive ("sponge") clients, payloads far
outside the reference, error and timeout spikes, and the model servers' own gauges.

Every event's cost figures (``latency_ms``, ``cpu_ms``, ``memory_mb``, ``input_bytes``,
``output_tokens``) are ranked among a **baseline** of the model version that served it: its first
``reference_size`` events, kept as rank bins (``rank_cusum.RankBins``: a median and quantiles come with
them). A new version is compared with the newest baseline of the versions before it until its own is
learnt, so a release that is slower than the one it replaces is caught in its first events; afterwards
it is compared with itself. With the ``reference_refresh`` job on, baselines slide: each version keeps
its last ``reference_size`` events and the job rebuilds the baseline from them, unless the version is
alarming or half-way to an alarm.

What is watched:

- **regressions**: per version and figure, rank CUSUM charts (``rank_cusum``, as in ``drift``) for a rise
  of the figure, tuned to ``shifts`` (reference sd of the rank score); a sustained rise (a version 50%
  slower, a cost creeping up) crosses, a burst does not. ``latency_anomaly`` for latency,
  ``payload_anomaly`` for input sizes, ``resource_anomaly`` for the rest;
- **errors**: per version, a Bernoulli CUSUM on the share of events whose ``status`` is not ``ok``
  (errors, timeouts), tuned to a rise to ``error_rate`` or three times the baseline's rate:
  ``error_spike``;
- **the figures together**: river's HalfSpaceTrees on the events' ranks (scaled to [0, 1]) scores one
  event in ``hst_every``; a Bernoulli CUSUM watches the share of scores above their ``hst_quantile`` in
  the first scored events (``resource_anomaly``, "unusual combination"). The trees learn as they go
  (river's sliding windows): this is the one part whose false-alarm rate is approximate;
- **sponge clients** (MITRE ATLAS AML.T0029, AML.T0034.001): an event is *expensive* when one of its
  ``client_figures`` lies in the top ``expensive_bins`` of 64 rank bins of its version; each client has
  a Bernoulli CUSUM for its share of expensive events rising to ``client_shift`` times the version's
  (calibrated to ``client_ert``). While a whole version is expensive (a regression, a load spike), each
  client is compared with the model's current share instead, so clients do not alarm with the model;
- **payloads**: an event whose ``input_bytes`` exceeds ``payload_factor`` times the largest of its
  baseline is reported at once (``payload_anomaly``), once per client per quarter of ``client_idle``;
- **model servers**: figures scraped from the servers' Prometheus endpoints (``jobs.scrape`` in the
  config; CPU cores, resident memory, GPU utilisation) are charted per target like the event figures,
  against the target's first ``server_reference`` scrapes, at ``server_ert`` scrapes between false
  alarms.

All charts of a version share ``ert``: each is calibrated to ``ert`` times their number (a union bound).
Detections carry the baseline, the observed value and their ratio. Memory is bounded: ``max_versions``
versions per model, ``max_clients`` clients (idle ones evicted first, never a client half-way to an
alarm), fixed-size windows.
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Any, ClassVar, Literal

import msgspec
import numpy as np

from monitor.detections import Detection, make_detection
from monitor.detectors import Detector, ModelBatch, cusum, rank_cusum
from monitor.detectors.clients import ClientsByDict, compared_rate, evict, group_by_client
from monitor.detectors.drift import RECENT, Chart, ColumnGroup
from monitor.detectors.rank_cusum import BINS

log = logging.getLogger("inferwatch.detectors.resource")

Figure = Literal["latency_ms", "cpu_ms", "memory_mb", "input_bytes", "output_tokens"]
FIGURES: tuple[str, ...] = ("latency_ms", "cpu_ms", "memory_mb", "input_bytes", "output_tokens")
SERVER_FIGURES: tuple[str, ...] = ("cpu_cores", "memory_mb", "gpu_utilization")
KINDS = {"latency_ms": "latency_anomaly", "input_bytes": "payload_anomaly"}  # else resource_anomaly
CRITICAL_RATIO = 2.0  # a figure at twice its baseline (or more) is critical
CONFIRM = 16  # values after a crossing that it is judged on, with those since the change
SERVER_CONFIRM = 4  # scrapes likewise
HST_LEARN = 1024  # events the trees learn (two of river's windows), then they stay as they are
HST_REFERENCE = 1023  # scored events that set the trees' mark bound and its in-control rate
CLIENT_HALF_LIFE = 16  # events: a client's recent cost follows its last few dozen events
MODEL_HALF_LIFE = 5000  # events: the model's recent share of expensive events


def _kind(figure: str) -> str:
    return KINDS.get(figure, "resource_anomaly")


def up_charts(shifts: list[float]) -> list[Chart]:
    return [Chart(f"rise ({s:g} sd)", "location", 1, rank_cusum.location_k(s)) for s in shifts]


# A server's baseline is short (two scrapes a bin): a 0.5 sd tuning cannot be told from its sampling error
SERVER_CHARTS = up_charts([1.0, 2.0])


class Baseline:
    """A version's (or a server's) rank bins per figure, with the charts on them."""

    def __init__(self, owner: str, rows: np.ndarray, figures: tuple[str, ...], charts: list[Chart], ert: float,
                 other_charts: int = 0):
        """Charts on each figure with enough values in ``rows``; all of them and ``other_charts`` more
        (errors, the trees) share ``ert``: each is calibrated to ``arl = ert x their number``."""
        self.owner = owner  # the version (or target) whose events it was learnt from
        self.events = len(rows)
        self.payload_bound = math.inf  # input_bytes above this are reported
        self.expensive_share = math.nan  # share of its events with a client figure in the top bins
        self.error_p0 = math.nan
        self.error_chart: tuple[float, float, float] | None = None  # (p0, p1, h) of the error share
        self.groups: dict[str, ColumnGroup] = {}
        counts = (~np.isnan(rows)).sum(axis=0)
        present = [j for j in range(len(figures)) if counts[j] >= 2 * BINS - 1]
        self.arl = rank_cusum.rounded_arl(ert * max(1, len(present) * len(charts) + other_charts))
        for j in present:
            values = rows[:, j]
            group = ColumnGroup([figures[j]], _kind(figures[j]), values[~np.isnan(values)][:, None], charts,
                                log_scale=True)
            group.calibrate(self.arl)
            if group.charts:
                self.groups[figures[j]] = group

    def fresh(self) -> "Baseline":
        """The same bins with charts at rest: what a new version starts from."""
        other = copy.copy(self)
        other.groups = {}
        for figure, group in self.groups.items():
            g = copy.copy(group)
            g.statistics = np.zeros_like(group.statistics)
            g.quiet_until = np.zeros_like(group.quiet_until)
            g.recent = np.full_like(group.recent, np.nan)
            g.recent_pos, g.seen, g.alarms = 0, 0, 0
            other.groups[figure] = g
        return other

    def median(self, figure: str) -> float:
        return float(self.groups[figure].ref_quantiles[1, 0])

    def largest_charted(self) -> float:
        """The largest statistic over threshold of any chart (0 at rest, 1 at an alarm)."""
        return max((float((g.statistics[:, 0] / np.asarray([c.h for c in g.charts])).max())
                    for g in self.groups.values() if g.charts), default=0.0)


class Version:
    """One model version: its baseline (its own, or inherited while it learns), error chart and window."""

    def __init__(self, name: str, inherited: Baseline | None):
        self.name = name
        self.label = name or "(no version)"
        self.baseline = inherited.fresh() if inherited is not None else None
        self.own = False
        self.learning: list[np.ndarray] = []  # rows (events x figures) for its own baseline
        self.learning_status: list[np.ndarray] = []
        self.learned = 0
        self.error_statistic = 0.0
        self.errors_recent = np.zeros(0, dtype=np.int8)
        self.seen = 0  # events watched
        self.last_ts = -math.inf
        self.quiet: dict[str, int] = {}  # family -> version events until which it is not reported
        self.ring: np.ndarray | None = None  # recent rows for a baseline refresh (when the job runs)
        self.ring_pos = 0
        self.ring_count = 0
        self.payload_quiet = -math.inf  # event time until which payloads without a client are not reported
        self.small_rises = 0  # chart alarms not reported: the rise was under min_ratio
        self.pending: dict[str, dict[str, Any]] = {}  # figure -> a crossing waiting for CONFIRM values

    @property
    def state(self) -> str:
        if self.own:
            return "own baseline"
        if self.baseline is not None:
            return f"learning ({self.learned} events), compared with {self.baseline.owner}"
        return f"learning ({self.learned} events)"


class ClientState:
    __slots__ = ("statistic", "events", "marks", "last_ts", "quiet_until", "payload_quiet", "cost")

    def __init__(self, figures: int) -> None:
        self.statistic = 0.0
        self.events = 0
        self.marks = 0
        self.last_ts = -math.inf
        self.quiet_until = 0  # the client's event count until which it is not reported again
        self.payload_quiet = -math.inf  # event time until which its payloads are not reported again
        self.cost = np.full(figures, np.nan)  # recent mean of log1p of each client figure

    def __getstate__(self) -> tuple:
        return (self.statistic, self.events, self.marks, self.last_ts, self.quiet_until, self.payload_quiet,
                self.cost)

    def __setstate__(self, state: tuple) -> None:
        (self.statistic, self.events, self.marks, self.last_ts, self.quiet_until, self.payload_quiet,
         self.cost) = state


class Resource(ClientsByDict, Detector):
    """Cost regressions per version, sponge clients, payloads, error spikes and server gauges."""

    name: ClassVar[str] = "resource"

    class Params(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
        ert: float = 100_000  # events between false alarms of a model's version charts together
        client_ert: float = 1_000_000  # a client's events between false alarms of its sponge chart
        server_ert: float = 100_000  # scrapes of a server between false alarms of its charts together
        figures: list[Figure] = msgspec.field(default_factory=lambda: list(FIGURES))
        client_figures: list[Figure] = msgspec.field(default_factory=lambda: ["latency_ms", "cpu_ms", "output_tokens"])
        reference_size: int = 1023  # events of a version that form its baseline
        shifts: list[float] = msgspec.field(default_factory=lambda: [0.5, 2.0])  # rises the charts are tuned to (sd)
        min_ratio: float = 1.1  # a rise is reported when the median since the change is this x the baseline's
        expensive_bins: int = 4  # an event in the top this many of 64 rank bins of a client figure is expensive
        client_shift: float = 4.0  # a client's share of expensive events rising to this x the model's
        min_client_events: int = 20  # a client's alarm needs this many of its events
        max_clients: int = 10_000
        client_idle: float = 3600.0  # seconds of event time after which an idle client is forgotten
        payload_factor: float = 4.0  # input_bytes above this x the baseline's largest: payload_anomaly
        error_rate: float = 0.02  # the error chart is tuned to a rise to this share (or 3x the baseline's)
        ok_statuses: list[str] = msgspec.field(default_factory=lambda: ["ok", "success", "200"])  # any case
        hst: bool = True  # HalfSpaceTrees on the figures together
        # the figures the trees read: what a request costs, and its size (memory is most often a
        # process's, not a request's, and would dilute their splits)
        hst_figures: list[Figure] = msgspec.field(default_factory=lambda: ["latency_ms", "cpu_ms", "input_bytes",
                                                                           "output_tokens"])
        hst_every: int = 32  # the trees score one event in this many (about 80 µs an event scored)
        hst_trees: int = 25  # about 3 MB of trees per model at height 8
        hst_height: int = 8
        hst_quantile: float = 0.99
        max_versions: int = 16
        server_reference: int = 128  # scrapes of a target that form its baseline (its CPU: one fewer)
        cooldown: int = 5000  # a version's events of quiet per family after its alarm; a client's likewise

        def check(self) -> tuple[str, str] | None:
            if min(self.ert, self.client_ert, self.server_ert) < 10:
                return "ert", "expected at least 10 events between false alarms"
            if not self.figures:
                return "figures", "expected at least one figure"
            if self.reference_size < 2 * BINS - 1:
                return "reference_size", f"expected at least {2 * BINS - 1} events, got {self.reference_size}"
            if self.server_reference < 2 * BINS:
                return "server_reference", f"expected at least {2 * BINS} scrapes, got {self.server_reference}"
            if not self.shifts or any(not 0.25 <= s <= 5 for s in self.shifts):
                return "shifts", f"expected one or more shifts between 0.25 and 5 sd, got {self.shifts}"
            if not 1 <= self.expensive_bins <= BINS // 4:
                return "expensive_bins", f"expected 1 to {BINS // 4} bins, got {self.expensive_bins}"
            if self.client_shift <= 1:
                return "client_shift", f"expected a factor above 1, got {self.client_shift}"
            if self.min_ratio < 1:
                return "min_ratio", f"expected at least 1, got {self.min_ratio}"
            if self.payload_factor < 1:
                return "payload_factor", f"expected at least 1, got {self.payload_factor}"
            if not 0 < self.error_rate < 1:
                return "error_rate", f"expected 0 < error_rate < 1, got {self.error_rate}"
            if not 0.5 <= self.hst_quantile < 1:
                return "hst_quantile", f"expected 0.5 <= hst_quantile < 1, got {self.hst_quantile}"
            if not (1 <= self.hst_trees <= 100 and 2 <= self.hst_height <= 16):
                return "hst_trees", "expected 1 to 100 trees of height 2 to 16"
            if self.hst_every < 1 or self.max_versions < 1 or self.max_clients < 1 or self.min_client_events < 1:
                return "hst_every", "expected hst_every, max_versions, max_clients and min_client_events >= 1"
            if self.cooldown < 0:
                return "cooldown", f"expected >= 0 events, got {self.cooldown}"
            return None

    def __init__(self, model: str, params: Params):
        super().__init__(model, params)
        p = params
        self.figures = tuple(dict.fromkeys(p.figures))
        self.client_columns = [self.figures.index(f) for f in dict.fromkeys(p.client_figures) if f in self.figures]
        self.ok = frozenset(s.lower() for s in p.ok_statuses)
        self.hst_columns = [self.figures.index(f) for f in dict.fromkeys(p.hst_figures) if f in self.figures]
        self.hst_names = [self.figures[j] for j in self.hst_columns]
        self.charts = up_charts(p.shifts)
        self.versions: dict[str, Version] = {}
        self.established: Baseline | None = None  # the newest baseline learnt: a new version starts on it
        self.clients: dict[str, ClientState] = {}
        self.client_p0 = math.nan
        self.client_h = math.nan
        self.recent_share = math.nan  # the model's recent share of expensive events (calm clients')
        self.costlier = False  # a version reported a rise in this batch
        self.hst: Any = None
        self.hst_position = 0
        self.hst_learned = 0
        self.hst_tie = 0.0  # the probability that a score equal to the bound is marked
        self.hst_rng = np.random.default_rng(7)  # seeded: a replay marks the same events
        self.hst_points: list[np.ndarray] = []  # what the trees learnt: a checkpoint keeps these, not the trees
        self.hst_scores: list[float] = []
        self.hst_chart: tuple[float, float, float, float] | None = None  # (bound, p0, p1, h)
        self.hst_statistic = 0.0
        self.hst_marks_recent = np.zeros(0, dtype=np.int8)
        self.hst_seen = 0
        self.hst_quiet = 0
        self.servers: dict[str, dict[str, Any]] = {}
        self.params_id = msgspec.json.encode(p).hex()  # a checkpoint of other parameters is not restored
        self.recording = False  # the refresh job ran once: versions keep recent rows
        self.untracked = 0  # events of versions beyond max_versions, not watched
        self.alarms = 0

    # -- the batch ------------------------------------------------------------------------------

    def update(self, batch: ModelBatch) -> list[Detection]:
        n = len(batch)
        if n == 0:
            return []
        matrix = np.column_stack([batch.column(f) for f in self.figures])
        status = _status(batch, self.ok)
        names = [e.model_version or "" for e in batch.events]
        expensive = np.full(n, -1, dtype=np.int8)  # 1 expensive, 0 not, -1 not comparable
        ranks = np.full((n, len(self.figures)), np.nan)
        found: list[Detection] = []
        groups = _group(names)
        for name, rows in groups.items():
            version = self._version(name, groups)
            if version is None:
                continue
            version.last_ts = float(batch.ts[rows[-1]])
            found.extend(self._take(version, batch, rows, matrix, status, expensive, ranks))
            if self.recording:
                _remember(version, matrix[rows], self.params.reference_size)
        if self.params.hst and self.hst_columns:
            found.extend(self._watch_hst(batch, ranks[:, self.hst_columns]))
        found.extend(self._watch_clients(batch, matrix, expensive))
        if len(self.clients) > self.params.max_clients:
            self.evict_idle(float(batch.ts[-1]), overflow=True)
        self.alarms += len(found)
        found.sort(key=lambda d: d.ts)
        return found

    def _take(self, version: Version, batch: ModelBatch, rows: np.ndarray, matrix: np.ndarray, status: np.ndarray,
              expensive: np.ndarray, ranks: np.ndarray) -> list[Detection]:
        """A version's events, watched against its baseline. While it learns its own, the events that
        go into it are watched against the inherited one (if any) first, and those after it against its
        own: the same events give the same detections whatever the batch sizes."""
        found: list[Detection] = []
        if not version.own:
            head = rows[: self.params.reference_size - version.learned]
            if version.baseline is not None:
                found.extend(self._watch_rows(version, batch, head, matrix, status, expensive, ranks))
            self._learn(version, matrix[head], status[head])
            rows = rows[len(head):]
        if version.own and rows.size:
            found.extend(self._watch_rows(version, batch, rows, matrix, status, expensive, ranks))
        return found

    def _watch_rows(self, version: Version, batch: ModelBatch, rows: np.ndarray, matrix: np.ndarray,
                    status: np.ndarray, expensive: np.ndarray, ranks: np.ndarray) -> list[Detection]:
        found = self._watch(version, batch, rows, matrix[rows], status[rows], expensive, ranks)
        version.seen += len(rows)
        return found

    def _version(self, name: str, active: dict[str, np.ndarray]) -> Version | None:
        """The version's state; a new one takes the place of the least recently seen version that is
        neither in this batch nor the newest baseline's. None when there is no such place: its events
        are counted (``untracked``) but not watched."""
        version = self.versions.get(name)
        if version is not None:
            return version
        if len(self.versions) >= self.params.max_versions:
            owner = self.established.owner if self.established is not None else None
            candidates = [v for v in self.versions.values() if v.name not in active and v.label != owner]
            if not candidates:
                self.untracked += len(active[name])
                return None
            gone = min(candidates, key=lambda v: (v.own, v.last_ts))  # learning ones first, then the least recent
            del self.versions[gone.name]
            log.info("%s: more than %d versions; forgot %r", self.model, self.params.max_versions, gone.label)
        version = self.versions[name] = Version(name, self.established)
        return version

    def _learn(self, version: Version, rows: np.ndarray, status: np.ndarray) -> None:
        """Take events for the version's own baseline (``rows``: at most what it still needs)."""
        version.learning.append(rows)
        version.learning_status.append(status)
        version.learned += len(rows)
        if version.learned >= self.params.reference_size:
            learnt, learnt_status = np.concatenate(version.learning), np.concatenate(version.learning_status)
            version.learning, version.learning_status = [], []
            self._build(version, learnt, learnt_status)

    def _build(self, version: Version, rows: np.ndarray, status: np.ndarray) -> None:
        """The version's own baseline from ``rows`` (its first events, or its recent ones at a refresh)."""
        p = self.params
        counted = status[status >= 0]
        # the union bound: the version's charts (figures x tunings, errors if it reports a status, the
        # trees) share ert
        others = (1 if len(counted) or (version.baseline and version.baseline.error_chart) else 0) + int(p.hst)
        baseline = Baseline(version.label, rows, self.figures, self.charts, p.ert, others)
        payload = rows[:, self.figures.index("input_bytes")] if "input_bytes" in self.figures else np.zeros(0)
        payload = payload[~np.isnan(payload)]
        largest = float(payload.max()) if len(payload) else 0.0
        baseline.payload_bound = largest * p.payload_factor if largest > 0 else math.inf  # no sizes: no check
        marks = self._expensive(baseline, rows)
        marks = marks[marks >= 0]
        baseline.expensive_share = float(marks.mean()) if len(marks) >= 2 * BINS else math.nan
        # errors: the rate estimated with half an error added, so a baseline without any is not 0; a
        # refresh (figures only) keeps the rate it had
        if len(counted):
            p0 = (float(counted.sum()) + 0.5) / (len(counted) + 1)
            baseline.error_p0 = p0
            if p0 < 0.3:
                baseline.error_chart = _bernoulli_chart(p0, max(3 * p0, p.error_rate), baseline.arl, len(counted))
            else:  # most events "fail": their status is not what ok_statuses says success looks like
                log.warning("%s: %.0f%% of the statuses of version %s are not in ok_statuses %s: no error "
                            "chart for it", self.model, 100 * p0, version.label, p.ok_statuses)
            version.error_statistic = 0.0
        elif version.baseline is not None:
            baseline.error_p0, baseline.error_chart = version.baseline.error_p0, version.baseline.error_chart
        version.baseline = baseline
        version.own = True
        self.established = baseline
        if not math.isnan(baseline.expensive_share) and math.isnan(self.client_p0):
            self._calibrate_clients(baseline.expensive_share, len(marks))
        log.info("%s: resource baseline of version %s from %d events: %s", self.model, baseline.owner, len(rows),
                 ", ".join(f"{f} median {baseline.median(f):.4g}" for f in baseline.groups) or "no figures")

    def _calibrate_clients(self, p0: float, n: int) -> None:
        p0 = min(max(p0, 1e-4), 0.5)
        self.client_p0 = self.client_base = self.recent_share = p0
        self.client_h = _bernoulli_chart(p0, self.params.client_shift * p0, self.params.client_ert, n)[2]

    def _expensive(self, baseline: Baseline, rows: np.ndarray) -> np.ndarray:
        """1 where a client figure is in the top ``expensive_bins`` of its bins, 0 where none is, -1 where
        the event has no client figure the baseline knows."""
        out = np.full(len(rows), -1, dtype=np.int8)
        top = BINS - self.params.expensive_bins
        for j in self.client_columns:
            group = baseline.groups.get(self.figures[j])
            if group is None:
                continue
            present = np.flatnonzero(~np.isnan(rows[:, j]))
            if present.size == 0:
                continue
            b = group.bins.bins(rows[present, j][:, None])[0]
            out[present] = np.maximum(out[present], (b >= top).astype(np.int8))
        return out

    # -- a version's charts ---------------------------------------------------------------------

    def _watch(self, version: Version, batch: ModelBatch, rows: np.ndarray, values: np.ndarray,
               status: np.ndarray, expensive: np.ndarray, ranks: np.ndarray) -> list[Detection]:
        found: list[Detection] = []
        baseline = version.baseline
        bins_of: dict[int, np.ndarray] = {}
        rises: list[tuple[int, str, dict[str, Any]]] = []  # (batch index, figure, what rose)
        for j, figure in enumerate(self.figures):
            group = baseline.groups.get(figure)
            if group is None:
                continue
            present = np.flatnonzero(~np.isnan(values[:, j]))
            if present.size == 0:
                continue
            column = values[present, j][:, None]
            bins = group.bins.bins(column)
            bins_of[j] = bins[0]
            if version.own:  # the trees see ranks against the event's own version only
                ranks[rows[present], j] = bins[0] / (BINS - 1)
            before = group.last(RECENT)[:, 0]
            before = before[~np.isnan(before)]
            start = group.seen
            hits = group.update(column, bins)
            for pos, chart, excess, window in _judged(group, version.pending, figure, column[:, 0], before, hits,
                                                      CONFIRM):
                observed, base = float(np.median(window)), float(group.ref_quantiles[1, 0])
                ratio = _ratio(observed, base)
                if not _rose(observed, base, ratio, self.params.min_ratio):
                    version.small_rises += 1  # a crossing whose rise is too small to report
                    continue
                group.quiet([0], start + pos + 1 + self.params.cooldown)
                rises.append((int(rows[present[pos]]), figure, {
                    "baseline": {"median": base, "events": version.baseline.events,
                                 "quantiles_5_50_95": [float(q) for q in group.ref_quantiles[:, 0]]},
                    "observed": {"median": observed, "events": len(window),
                                 "quantiles_5_50_95": np.quantile(window, [0.05, 0.5, 0.95]).tolist()},
                    "ratio": ratio, "chart": chart, "excess": round(excess, 3)}))
        if rises:
            # one report per version and cooldown: a slower release moves latency and CPU together
            index = min(r[0] for r in rises)
            at = version.seen + int(np.searchsorted(rows, index))
            if at >= version.quiet.get("figures", 0):
                version.quiet["figures"] = at + self.params.cooldown
                found.append(self._regression(batch, version, index, rises))
        marks = np.full(len(rows), -1, dtype=np.int8)
        # a version on its predecessor's baseline judges no client: when it is slower, every request of
        # it is expensive
        if bins_of and version.own:
            top = BINS - self.params.expensive_bins
            for j in self.client_columns:
                if j in bins_of:
                    present = np.flatnonzero(~np.isnan(values[:, j]))
                    marks[present] = np.maximum(marks[present], (bins_of[j] >= top).astype(np.int8))
            self.costlier = self.costlier or bool(rises)
        expensive[rows] = marks
        found.extend(self._watch_errors(version, batch, rows, status))
        found.extend(self._watch_payloads(version, batch, rows, values))
        return found

    def _regression(self, batch: ModelBatch, version: Version, index: int,
                    rises: list[tuple[int, str, dict[str, Any]]]) -> Detection:
        """The figures whose charts crossed, each with the median since the change its chart found
        against the baseline's."""
        # latency first when it rose (it names the kind), then by how far each rose
        figures = {figure: rise for _, figure, rise in sorted(
            rises, key=lambda r: (r[1] != "latency_ms", -(r[2]["ratio"] if r[2]["ratio"] is not None else math.inf)))}
        top, rise = next(iter(figures.items()))
        ratio = rise["ratio"]
        kind = "latency_anomaly" if "latency_ms" in figures else _kind(top)
        compared = version.baseline.owner
        against = "its own baseline" if version.own and compared == version.label else f"the baseline of {compared}"
        others = [f"{f} {_times(r['ratio'])}" for f, r in list(figures.items())[1:]]
        return self._detection(
            batch, index, kind, subject=f"{version.label}:figures", client=None,
            severity="critical" if ratio is None or ratio >= CRITICAL_RATIO or rise["excess"] >= 1.5 else "warning",
            score=ratio if ratio is not None else rise["observed"]["median"], threshold=self.params.min_ratio,
            summary=(f"{top} of {self.model} {version.label} is {_times(ratio)} {against} (median "
                     f"{rise['observed']['median']:.4g} against {rise['baseline']['median']:.4g}) over its last "
                     f"{rise['observed']['events']} events" + (f"; also {', '.join(others)}" if others else "")
                     + f" (rank CUSUM, ERT {self.params.ert:,.0f} events)"),
            evidence={"version": version.label, "baseline_of": compared, "figures": figures,
                      "baseline": rise["baseline"], "observed": rise["observed"], "ratio": ratio,
                      "ert": self.params.ert,
                      "event_ids": [e.event_id for e in batch.events[max(0, index - 9): index + 1]]})

    def _watch_errors(self, version: Version, batch: ModelBatch, rows: np.ndarray, status: np.ndarray) -> list[Detection]:
        counted = np.flatnonzero(status >= 0)
        if counted.size == 0 or version.baseline.error_chart is None:
            return []
        marks = status[counted]
        before = version.errors_recent
        version.errors_recent = np.concatenate([before, marks])[-RECENT:]
        p0, p1, h = version.baseline.error_chart
        alarms, version.error_statistic = cusum.run(marks, p0, p1, h, version.error_statistic)
        found = []
        for i in alarms.tolist():
            index = int(rows[counted[i]])
            at = version.seen + int(counted[i])
            if at < version.quiet.get("errors", 0):
                continue
            version.quiet["errors"] = at + self.params.cooldown
            window = np.concatenate([before, marks[: i + 1]])[-200:]
            rate = float(window.mean())
            label = version.label
            statuses: dict[str, int] = {}
            clients: dict[str, int] = {}
            for j in rows[counted[max(0, i - 199): i + 1]][marks[max(0, i - 199): i + 1] > 0].tolist():
                e = batch.events[j]  # this version's failed events of the window (in this batch)
                statuses[e.status] = statuses.get(e.status, 0) + 1
                if e.client_id is not None:
                    clients[e.client_id] = clients.get(e.client_id, 0) + 1
            ratio = rate / p0
            found.append(self._detection(
                batch, index, "error_spike", subject=f"{label}:errors", client=None,
                severity="critical" if rate >= 0.1 or ratio >= 10 else "warning", score=ratio, threshold=p1 / p0,
                summary=(f"errors and timeouts of {self.model} {label} at {rate:.1%} of its last {len(window)} "
                         f"events, {ratio:.1f}x the baseline's {p0:.2%} (Bernoulli CUSUM, ERT "
                         f"{self.params.ert:,.0f} events)"),
                evidence={"version": label, "baseline": {"error_rate": p0}, "observed": {"error_rate": rate,
                          "events": len(window)}, "ratio": round(ratio, 4), "statuses": statuses,
                          "top_clients": dict(sorted(clients.items(), key=lambda kv: -kv[1])[:5]),
                          "event_ids": [e.event_id for e in batch.events[max(0, index - 9): index + 1]]}))
        return found

    def _watch_payloads(self, version: Version, batch: ModelBatch, rows: np.ndarray, values: np.ndarray) -> list[Detection]:
        bound = version.baseline.payload_bound
        if "input_bytes" not in self.figures or not math.isfinite(bound):
            return []
        sizes = values[:, self.figures.index("input_bytes")]
        over = np.flatnonzero(sizes > bound)  # NaN compares false
        found = []
        reported: dict[str | None, int] = {}
        for i in over.tolist():
            index = int(rows[i])
            event = batch.events[index]
            client = event.client_id
            if client in reported:
                continue
            state = self.clients.get(client) if client is not None else None
            ts = float(event.ts)
            if state is not None and ts < state.payload_quiet:
                continue
            if client is None and ts < version.payload_quiet:
                continue
            if state is None and client is not None:
                state = self.clients[client] = ClientState(len(self.client_columns))
                state.last_ts = ts
            if state is not None:
                state.payload_quiet = ts + self.params.client_idle / 4
            else:
                version.payload_quiet = ts + self.params.client_idle / 4
            reported[client] = index
            largest = bound / self.params.payload_factor
            size = float(sizes[i])
            label = version.label
            found.append(self._detection(
                batch, index, "payload_anomaly", subject=f"{label}:payload", client=client,
                severity="critical" if size >= 4 * bound else "warning",
                score=size / largest, threshold=self.params.payload_factor,
                summary=(f"payload of {size:,.0f} bytes to {self.model} {label} from "
                         f"{'client ' + client if client else 'an unnamed client'}: {size / largest:.1f}x the "
                         f"largest of the baseline ({largest:,.0f} bytes)"),
                evidence={"figure": "input_bytes", "version": label, "baseline": {"largest": largest},
                          "observed": {"input_bytes": size}, "ratio": round(size / largest, 4),
                          "bound": bound, "more_in_batch": len(over) - 1,
                          "event_ids": [event.event_id]}))
        return found

    # -- the figures together -------------------------------------------------------------------

    def _watch_hst(self, batch: ModelBatch, ranks: np.ndarray) -> list[Detection]:
        """The trees learn ``HST_LEARN`` events, then stay as they are (river's trees otherwise swap their
        reference window every ``window_size`` events, and the scores jump with it, in clumps that a CUSUM
        takes for a change); the next ``HST_REFERENCE`` events' scores set the mark bound and its rate.
        Both phases read every event (a fraction of a second, once); then one event in ``hst_every``."""
        every = self.params.hst_every if self.hst_chart is not None else 1
        take = np.arange((-self.hst_position) % every, len(batch), every)
        self.hst_position = (self.hst_position + len(batch)) % every
        take = take[~np.isnan(ranks[take]).all(axis=1)] if take.size else take
        if self.hst_chart is None:  # learning or setting the bound: what is left of a poll is not scored
            take = take[: max(0, HST_LEARN - self.hst_learned) + HST_REFERENCE - len(self.hst_scores)]
        if take.size == 0:
            return []
        if self.hst is None:
            self.hst = self._trees(self.hst_points)
        points = [{f: (0.5 if math.isnan(r) else r) for f, r in zip(self.hst_names, row)}
                  for row in ranks[take].tolist()]
        if self.hst_learned < HST_LEARN:
            learn = HST_LEARN - self.hst_learned
            for x in points[:learn]:
                self.hst.learn_one(x)
            self.hst_points.append(np.nan_to_num(ranks[take[:learn]], nan=0.5))
            self.hst_learned += min(learn, len(points))
            points = points[learn:]
            take = take[learn:]
        scores = np.fromiter((self.hst.score_one(x) for x in points), dtype=np.float64, count=len(points))
        if self.hst_chart is None:
            self.hst_scores.extend(scores[: HST_REFERENCE - len(self.hst_scores)].tolist())
            if len(self.hst_scores) >= HST_REFERENCE:
                # The trees' scores take few values: a score equal to the bound is marked with the
                # probability that makes the marked share 1 - hst_quantile (ties broken at random, as
                # the ranks are), instead of a share anywhere between 0 and several times that.
                ref = np.asarray(self.hst_scores)
                bound = float(np.quantile(ref, self.params.hst_quantile))
                above, equal = float(np.mean(ref > bound)), float(np.mean(ref == bound))
                self.hst_tie = min(1.0, max(0.0, (1 - self.params.hst_quantile - above) / equal)) if equal else 0.0
                p0 = min(max(above + self.hst_tie * equal, 1e-3), 0.5)
                arl = self.established.arl if self.established is not None else self.params.ert
                self.hst_chart = (bound, *_bernoulli_chart(p0, 4 * p0, arl / self.params.hst_every, len(ref)))
                self.hst_scores = []
            return []
        bound, p0, p1, h = self.hst_chart
        marks = ((scores > bound) | ((scores == bound) & (self.hst_rng.random(len(scores)) < self.hst_tie))).astype(np.int8)
        self.hst_marks_recent = np.concatenate([self.hst_marks_recent, marks])[-200:]
        alarms, self.hst_statistic = cusum.run(marks, p0, p1, h, self.hst_statistic)
        found = []
        for a in alarms.tolist():
            if self.hst_seen + a < self.hst_quiet:
                continue
            self.hst_quiet = self.hst_seen + a + max(1, self.params.cooldown // every)
            index = int(take[a])
            rate = float(self.hst_marks_recent.mean())
            worst = int(take[int(np.argmax(scores[: a + 1]))])
            found.append(self._detection(
                batch, index, "resource_anomaly", subject="joint", client=None,
                severity="warning", score=rate / p0, threshold=p1 / p0,
                summary=(f"unusual combinations of cost figures on {self.model}: {rate:.1%} of the last "
                         f"{len(self.hst_marks_recent)} scored events, {rate / p0:.1f}x the "
                         f"{p0:.1%} of its first scored events (HalfSpaceTrees, one event in {every})"),
                evidence={"method": "river HalfSpaceTrees on the figures' ranks", "bound": bound,
                          "baseline": {"rate": p0}, "observed": {"rate": rate}, "ratio": round(rate / p0, 4),
                          "most_unusual": {"event_id": batch.events[worst].event_id,
                                           "ranks": {f: (None if math.isnan(r) else round(r, 3))
                                                     for f, r in zip(self.hst_names, ranks[worst].tolist())}},
                          "event_ids": [batch.events[int(i)].event_id for i in take[max(0, a - 9): a + 1]]}))
        self.hst_seen += len(take)
        return found

    # -- clients --------------------------------------------------------------------------------

    def _watch_clients(self, batch: ModelBatch, matrix: np.ndarray, expensive: np.ndarray) -> list[Detection]:
        """Every client's CUSUM on its expensive requests, all clients at once (``cusum.per_segment``).

        A client is compared with the rest of the model: the reference share, or the share of the other
        clients' requests of the batch (when there are enough of them) or the model's recent share when
        that is higher. Leaving the client out matters for a client that sends a third of the traffic;
        the recent share leaves out the clients half-way to an alarm for the same reason."""
        if math.isnan(self.client_h):
            return []
        present = np.flatnonzero(expensive >= 0)
        if present.size == 0:
            return []
        marks = expensive[present]
        names, order, starts, ends = group_by_client([batch.events[i].client_id for i in present.tolist()])
        marks_sorted = marks[order]
        counts = ends - starts
        n_marks = np.add.reduceat(marks_sorted.astype(np.int64), starts)
        states = list(map(self.clients.get, names))  # None for a new client (and for events without one)
        statistics = np.asarray([st.statistic if st is not None else 0.0 for st in states])
        events = np.asarray([st.events if st is not None else 0 for st in states], dtype=np.int64)
        quiet_until = np.asarray([st.quiet_until if st is not None else 0 for st in states], dtype=np.int64)
        calm = (statistics <= self.client_h / 2) & (events >= quiet_until)  # as _calm says, all at once
        if calm.any():
            weight = 1 - 0.5 ** (int(counts[calm].sum()) / MODEL_HALF_LIFE)
            self.recent_share += weight * (float(n_marks[calm].sum() / counts[calm].sum()) - self.recent_share)
        # The rate each client is compared with depends on its events and marks only through the rest of
        # the batch's: a poll of thousands of clients has a handful of distinct (rest, marks) pairs.
        width = int(counts.max()) + 1  # (events, marks) of a client as one number
        pairs, which = np.unique(counts * width + n_marks, return_inverse=True)
        rest_n, rest_m = len(marks) - pairs // width, int(n_marks.sum()) - pairs % width
        pair_bases = [compared_rate(self.client_p0, self.recent_share, float(m) / n if n else 0.0, int(n))
                      for n, m in zip(rest_n.tolist(), rest_m.tolist())]
        charts = {base: self._client_chart(base) for base in pair_bases}  # (up, down, h); None: no client stands out
        up = np.asarray([charts[b][0] if charts[b] else 0.0 for b in pair_bases])[which]
        down = np.asarray([charts[b][1] if charts[b] else 0.0 for b in pair_bases])[which]
        h = np.asarray([charts[b][2] if charts[b] else math.inf for b in pair_bases])[which]
        steps = np.where(marks_sorted > 0, np.repeat(up, counts), np.repeat(down, counts))
        s = cusum.per_segment(steps, starts, counts, statistics)
        crossed = (np.maximum.reduceat(s, starts) > h).tolist()
        charted = np.asarray([charts[b] is not None for b in pair_bases])[which].tolist()
        costs = None
        if self.client_columns:
            nan = np.full(len(self.client_columns), np.nan)
            before = np.array([st.cost if st is not None else nan for st in states])
            logged = np.log1p(np.maximum(matrix[present][:, self.client_columns], 0))
            costs = _recent_costs(before, logged[order], counts)
        last_ts = batch.ts[present[order[ends - 1]]].tolist()
        last_s = s[ends - 1].tolist()
        counts_l, n_marks_l = counts.tolist(), n_marks.tolist()
        found = []
        # Per client, only the bookkeeping: everything computed above for all clients at once.
        for k, client in enumerate(names):
            if client is None:
                continue
            state = states[k]
            if state is None:
                state = self.clients[client] = ClientState(len(self.client_columns))
            state.last_ts = last_ts[k]
            if costs is not None:
                state.cost[:] = costs[k]
            if not charted[k]:  # the rest of the model is as expensive: nothing to tell
                state.events += counts_l[k]
                state.marks += n_marks_l[k]
                continue
            if not crossed[k]:
                state.events += counts_l[k]
                state.marks += n_marks_l[k]
                state.statistic = last_s[k]
                continue
            base = pair_bases[which[k]]
            for pos in range(int(starts[k]), int(ends[k])):  # the rare client that alarms: its events one by one
                mark = int(marks_sorted[pos])
                state.events += 1
                state.marks += mark
                state.statistic = max(0.0, state.statistic + (up[k] if mark else down[k]))
                if state.statistic > h[k]:
                    state.statistic = 0.0
                    if state.events >= self.params.min_client_events and state.events >= state.quiet_until:
                        state.quiet_until = state.events + self.params.cooldown
                        found.append(self._sponge(batch, int(present[order[pos]]), client, state,
                                                  state.marks / state.events, state.events, base, float(h[k])))
        if self.costlier:
            # A version reported a rise: clients are compared with the calm clients' share of this batch
            # from now on, not once the recent share has caught up (a quiet model polls in tiny batches).
            self.costlier = False
            calm = np.fromiter((self._calm(self.clients.get(c)) for c in names), dtype=bool, count=len(names))
            if calm.any():
                self.recent_share = max(self.recent_share, float(n_marks[calm].sum() / counts[calm].sum()))
        return found

    def _calm(self, state: ClientState | None) -> bool:
        """Neither half-way to an alarm nor within the cooldown of one: its requests say what the model's
        are like (a client under suspicion may be what makes the model expensive)."""
        return state is None or (state.statistic <= self.client_h / 2 and state.events >= state.quiet_until)

    def _client_chart(self, base: float) -> tuple[float, float, float] | None:
        """(increment of an expensive request, of another, threshold) of a client compared with ``base``;
        None when ``client_shift`` x ``base`` is no rise (most of the model is expensive)."""
        p1 = self.params.client_shift * base
        if p1 >= 0.99:
            return None
        h = self.client_h if base == self.client_p0 else cusum.threshold_for_ert(base, p1, self.params.client_ert)
        a, b, step = cusum._grid(base, p1)
        return a * step, -b * step, h

    def _sponge(self, batch: ModelBatch, index: int, client: str, state: ClientState, rate: float, events: int,
                base: float, h: float) -> Detection:
        version = self.versions.get(batch.events[index].model_version or "")
        baseline = version.baseline if version is not None and version.baseline is not None else self.established
        figures = {}
        for n, j in enumerate(self.client_columns):
            figure = self.figures[j]
            if baseline is None or figure not in baseline.groups or math.isnan(state.cost[n]):
                continue
            median = baseline.median(figure)
            observed = math.expm1(float(state.cost[n]))
            # the client's recent typical value: an exponential mean of log1p over its last few dozen requests
            figures[figure] = {"baseline_median": median, "client_recent": observed,
                               "ratio": round(observed / median, 4) if median > 0 else None}
        top = max((f for f in figures.values() if f["ratio"] is not None), key=lambda f: f["ratio"], default=None)
        worst = max(figures, key=lambda f: figures[f]["ratio"] or 0) if figures else None
        ratio = top["ratio"] if top else rate / base
        text = (f"; its recent {worst} is {ratio:.1f}x the baseline median ({figures[worst]['client_recent']:.4g} "
                f"against {figures[worst]['baseline_median']:.4g})" if top else "")
        return self._detection(
            batch, index, "resource_anomaly", subject="sponge", client=client,
            severity="critical" if ratio >= 4 else "warning", score=ratio, threshold=1.0,
            summary=(f"client {client} sends expensive requests to {self.model}: {rate:.0%} of its {events} "
                     f"requests in the top {self.params.expensive_bins}/64 of the cost baseline, against "
                     f"{base:.1%} for the model{text} (Bernoulli CUSUM, ERT {self.params.client_ert:,.0f})"),
            evidence={"figures": figures, "baseline": {"expensive_share": base,
                      "reference_share": self.client_p0}, "observed": {"expensive_share": rate, "events": events},
                      "ratio": ratio, "client_events": state.events, "cusum_threshold": h,
                      "event_ids": [e.event_id for e in batch.events[max(0, index - 199): index + 1]
                                    if e.client_id == client][-10:]})

    def evict_idle(self, now: float, overflow: bool = False) -> int:
        """Forget clients idle for ``client_idle`` seconds of event time (then, when ``overflow``, the
        least recently seen beyond ``max_clients``); never one half-way to an alarm. Returns how many."""
        keep = (self.client_h / 2) if not math.isnan(self.client_h) else math.inf
        return evict(self.clients, now, self.params.client_idle, keep, self.params.max_clients, overflow)

    # -- scheduled work -------------------------------------------------------------------------

    def refresh(self) -> list[str]:
        """The ``reference_refresh`` job: rebuild each version's baseline from its recent events. The first
        run starts keeping them; a version alarming or half-way to an alarm keeps its baseline. Returns
        the versions rebuilt."""
        if not self.recording:
            self.recording = True
            return []
        rebuilt = []
        for version in self.versions.values():
            if not version.own or version.ring is None or version.ring_count < self.params.reference_size:
                continue
            quiet = max(version.quiet.values(), default=0)
            chart = version.baseline.error_chart
            if (version.seen < quiet or version.baseline.largest_charted() > 0.5
                    or (chart is not None and version.error_statistic > chart[2] / 2)):
                continue
            rows = np.roll(version.ring, -version.ring_pos, axis=0)
            self._build(version, rows, np.full(len(rows), -1, dtype=np.int8))
            rebuilt.append(version.label)
        if rebuilt and (self.hst_learned or self.hst_chart):  # the trees learn the new baselines' ranks afresh
            self.hst, self.hst_learned, self.hst_chart, self.hst_statistic = None, 0, None, 0.0
            self.hst_points, self.hst_scores = [], []
        return rebuilt

    def observe_server(self, target: str, ts: float, figures: dict[str, float]) -> list[Detection]:
        """One scrape of a model server: charted against the target's first ``server_reference`` scrapes."""
        server = self.servers.setdefault(target, {"learning": [], "baseline": None, "seen": 0, "pending": {},
                                                  "last": {}, "ts": ts})
        row = np.asarray([[figures.get(f, math.nan) for f in SERVER_FIGURES]], dtype=np.float64)
        server["last"], server["ts"] = dict(figures), ts
        server["seen"] += 1
        if server["baseline"] is None:
            server["learning"].append(row)
            if len(server["learning"]) >= self.params.server_reference:
                server["baseline"] = Baseline(target, np.concatenate(server["learning"]), SERVER_FIGURES,
                                              SERVER_CHARTS, self.params.server_ert)
                server["learning"] = []
            return []
        found = []
        for j, figure in enumerate(SERVER_FIGURES):
            group = server["baseline"].groups.get(figure)
            if group is None or math.isnan(row[0, j]):
                continue
            before = group.last(RECENT)[:, 0]
            before = before[~np.isnan(before)]
            start = group.seen
            hits = group.update(row[:, j:j + 1])
            for pos, chart, excess, window in _judged(group, server["pending"], figure, row[:, j], before, hits,
                                                      SERVER_CONFIRM):
                observed, base = float(np.median(window)), float(group.ref_quantiles[1, 0])
                ratio = _ratio(observed, base)
                if not _rose(observed, base, ratio, self.params.min_ratio):
                    continue
                group.quiet([0], start + pos + 1 + self.params.server_reference)
                found.append(make_detection(
                    detector=self.name, kind="resource_anomaly", model=self.model, window_start=ts, ts=ts,
                    subject=f"server:{target}:{figure}",
                    severity="critical" if ratio is None or ratio >= CRITICAL_RATIO else "warning",
                    score=ratio if ratio is not None else observed, threshold=self.params.min_ratio,
                    summary=(f"model server {target} of {self.model}: {figure} {observed:.4g} against a baseline "
                             f"median of {base:.4g} ({_times(ratio)}) over its last {len(window)} scrapes (rank "
                             f"CUSUM, ERT {self.params.server_ert:,.0f} scrapes)"),
                    evidence={"server": target, "figure": figure, "baseline": {"median": base},
                              "observed": {"median": observed, "scrapes": len(window)}, "ratio": ratio,
                              "chart": chart, "excess": round(excess, 3), "event_ids": []}))
        return found

    # -- reports --------------------------------------------------------------------------------

    def _detection(self, batch: ModelBatch, index: int, kind: str, *, subject: str, client: str | None,
                   severity: str, score: float, threshold: float, summary: str, evidence: dict[str, Any]) -> Detection:
        event = batch.events[index]
        topic, partition, offset = batch.source(index)
        return make_detection(
            detector=self.name, kind=kind, model=self.model, window_start=float(event.ts), ts=float(event.ts),
            subject=subject, client_id=client, model_version=event.model_version, severity=severity,
            score=round(float(score), 4), threshold=round(float(threshold), 4), summary=summary, evidence=evidence,
            source={"topic": topic, "partition": partition, "offset": offset})

    def _trees(self, learnt: list[np.ndarray]) -> Any:
        """river's HalfSpaceTrees, having learnt ``learnt`` (rows of ranks): the same trees again, since
        they are seeded and learn the same points in the same order."""
        from river.anomaly import HalfSpaceTrees

        trees = HalfSpaceTrees(n_trees=self.params.hst_trees, height=self.params.hst_height,
                               window_size=HST_LEARN // 2, seed=7)
        for rows in learnt:
            for row in rows.tolist():
                trees.learn_one(dict(zip(self.hst_names, row)))
        return trees

    def state(self) -> dict[str, Any]:
        """Without the trees (megabytes): ``restore`` grows them again from the points they learnt."""
        return {k: v for k, v in super().state().items() if k != "hst"}

    def restore(self, state: dict[str, Any]) -> None:
        if state.get("params_id") != self.params_id:
            log.info("%s: the resource checkpoint was made with other parameters; learning baselines anew",
                     self.model)
            return
        super().restore(state)
        self.hst = None  # grown again from hst_points when next needed

    def client_counts(self) -> tuple[int, int]:
        return len(self.clients), 0

    def report_figures(self, batch: ModelBatch) -> dict[str, Any]:
        """The latency baseline (median) of the batch's version, and the median a reported rise needs."""
        version = self.versions.get(batch.model_version or "")
        baseline = version.baseline if version is not None else None
        if baseline is None or "latency_ms" not in baseline.groups:
            return {"latency_baseline_median": None, "latency_threshold": None}
        median = baseline.median("latency_ms")
        return {"latency_baseline_median": median, "latency_threshold": median * self.params.min_ratio}

    def armed(self) -> bool:
        return self.established is not None

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        versions = {}
        for v in self.versions.values():
            b = v.baseline
            versions[v.label] = {
                "state": v.state, "events": v.seen,
                "error_rate_baseline": None if b is None or math.isnan(b.error_p0) else b.error_p0,
                "medians": {f: b.median(f) for f in b.groups} if b is not None else {},
                "charts_largest": round(b.largest_charted(), 3) if b is not None else 0.0,
                "crossings_too_small": v.small_rises,
            }
        top = sorted(self.clients.items(), key=lambda kv: -kv[1].statistic)[:10]
        out.update({
            "state": "armed" if self.established is not None else "learning baselines",
            "versions": versions, "clients_tracked": len(self.clients), "alarms": self.alarms,
            "untracked_version_events": self.untracked,
            "client_threshold": None if math.isnan(self.client_h) else self.client_h,
            "top_clients": [{"client_id": c, "events": st.events, "expensive": st.marks, "statistic": st.statistic}
                            for c, st in top],
            "hst": "off" if not self.params.hst else ("armed" if self.hst_chart else "learning"),
            "servers": {t: {"state": "armed" if s["baseline"] is not None else f"learning ({len(s['learning'])} scrapes)",
                            "last": s["last"]} for t, s in self.servers.items()},
        })
        return out


# -- helpers ------------------------------------------------------------------------------------


def _judged(group: ColumnGroup, pending: dict[str, dict[str, Any]], key: str, column: np.ndarray,
            before: np.ndarray, hits: list[tuple[int, int, int, float]],
            confirm: int) -> list[tuple[int, str, float, np.ndarray]]:
    """The crossings of a figure's charts that can be judged now, as (position in ``column`` where the
    judgement falls, chart, excess, the values judged). A crossing is judged on the values since the
    change its chart found (the suffix of the recent values whose sum of ``score - k`` is largest, the
    window the CUSUM statistic sums) and the ``confirm`` values after it: the crossing's own window is
    the luckiest stretch of the stream, and its median alone makes a false alarm look like a 1.5x rise.
    A crossing still waiting for its values is kept in ``pending`` under ``key`` (across batches); the
    chart's crossings meanwhile are part of it."""
    out = []
    resolved = -1
    entry = pending.get(key)
    if entry is not None:
        take = min(entry["left"], len(column))
        entry["values"] = np.concatenate([entry["values"], column[:take]])
        entry["left"] -= take
        if entry["left"] == 0:
            del pending[key]
            resolved = take - 1
            out.append((resolved, entry["chart"], entry["excess"], entry["values"]))
    for _, chart, index, excess in hits:
        if key in pending or index <= resolved:
            continue
        c = group.charts[chart]
        window = np.concatenate([before, column[: index + 1]])[-RECENT:]
        scores = 2 * group.bins.bins(window[:, None])[0].astype(np.int64) - (BINS - 1) - c.k
        since = int(np.argmax(np.cumsum(scores[::-1])[::-1]))
        after = column[index + 1: index + 1 + confirm]
        values = np.concatenate([window[since:], after])
        if len(after) == confirm:
            out.append((index + confirm, c.name, excess, values))
        else:
            pending[key] = {"values": values, "left": confirm - len(after), "chart": c.name, "excess": excess}
    return out


def _ratio(observed: float, base: float) -> float | None:
    """observed / base, rounded; None when the baseline's median is 0 (no ratio to speak of)."""
    return round(observed / base, 4) if base > 0 else None


def _rose(observed: float, base: float, ratio: float | None, min_ratio: float) -> bool:
    return observed > base if ratio is None else ratio >= min_ratio


def _times(ratio: float | None) -> str:
    return "above 0" if ratio is None else f"{ratio:.2f}x"


def _status(batch: ModelBatch, ok: frozenset[str]) -> np.ndarray:
    """1 for an event whose status is not one of ``ok`` (an error, a timeout), 0 for one, -1 for none."""
    statuses = [e.status for e in batch.events]
    code = {s: -1 if s is None else int(s.lower() not in ok) for s in set(statuses)}  # a poll has a few
    return np.fromiter(map(code.__getitem__, statuses), dtype=np.int8, count=len(statuses))


def _group(names: list[str]) -> dict[str, np.ndarray]:
    """Indices of each distinct name, in order of first appearance."""
    if len(set(names)) == 1:
        return {names[0]: np.arange(len(names))}
    out: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        out.setdefault(name, []).append(i)
    return {name: np.asarray(rows) for name, rows in out.items()}


def _decay(m: int) -> tuple[np.ndarray, float, float]:
    """The weights of a client's ``m`` newest values (oldest first), their sum, and the weight left to
    its previous mean: an exponential average with a half-life of ``CLIENT_HALF_LIFE`` events."""
    alpha = 1 - 0.5 ** (1 / CLIENT_HALF_LIFE)
    weights = alpha * (1 - alpha) ** np.arange(m - 1, -1, -1)
    return weights, float(weights.sum()), (1 - alpha) ** m


# A client with fewer values than this in a poll (most of them when a poll holds thousands of clients)
# has its mean summed position by position, oldest first, for all such clients at once; one with more,
# by a dot product of its own. OpenBLAS's dot product adds fewer than 16 terms one by one, oldest first:
# with it, the two give the same figures to the last bit.
SHORT = 16
_DECAYS = [_decay(m) for m in range(SHORT)]
_WEIGHTS = np.array([np.pad(w, (0, SHORT - m)) for m, (w, _, _) in enumerate(_DECAYS)])  # row m: m weights, 0s
_WEIGHT_SUMS = np.array([weight_sum for _, weight_sum, _ in _DECAYS])
_PRIORS = np.array([prior for _, _, prior in _DECAYS])


def _recent_costs(before: np.ndarray, costs: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Each client's recent mean of each figure (log1p), an exponential average over its events:
    ``(sum_i w_i x_i + (1 - a)^m mean) / (sum_i w_i + (1 - a)^m)`` over its ``m`` new values, with
    ``w_i = a (1 - a)^(m - 1 - i)`` (its newest value weighs ``a``); the previous mean's terms drop
    out while it has none. ``before``: clients x figures (NaN: no mean yet); ``costs``: the events'
    figures grouped by client (``counts`` of each, in order), NaN where absent."""
    after = before.copy()
    owner_all = np.repeat(np.arange(len(counts)), counts)
    for n in range(costs.shape[1]):
        present = ~np.isnan(costs[:, n])
        if not present.any():
            continue
        values, owner = costs[present, n], owner_all[present]
        m = np.bincount(owner, minlength=len(counts))
        first = np.cumsum(m) - m
        short = np.flatnonzero((m > 0) & (m < SHORT))
        if short.size:
            ms = m[short]
            total = np.zeros(len(short))
            for i in range(int(ms.max())):  # oldest first
                on = ms > i
                at = first[short[on]] + i
                total[on] += _WEIGHTS[ms[on], i] * values[at]
            old = before[short, n]
            known = ~np.isnan(old)
            prior = _PRIORS[ms]
            after[short, n] = ((total + np.where(known, prior * old, 0.0))
                               / (_WEIGHT_SUMS[ms] + np.where(known, prior, 0.0)))
        for k in np.flatnonzero(m >= SHORT).tolist():
            weights, weight_sum, prior = _decay(int(m[k]))
            old = before[k, n]
            column = values[first[k]: first[k] + m[k]]
            after[k, n] = float(weights @ column + (prior * old if not math.isnan(old) else 0.0)) / (
                weight_sum + (prior if not math.isnan(old) else 0.0))
    return after


def _remember(version: Version, rows: np.ndarray, size: int) -> None:
    if version.ring is None:
        version.ring = np.full((size, rows.shape[1]), np.nan)  # float64: the figures as they came
    rows = rows[-size:]
    at = (version.ring_pos + np.arange(len(rows))) % size
    version.ring[at] = rows
    version.ring_pos = int((version.ring_pos + len(rows)) % size)
    version.ring_count = min(size, version.ring_count + len(rows))


def _bernoulli_chart(p0: float, p1: float, arl: float, n: int) -> tuple[float, float, float]:
    """(p0, p1, h) of a Bernoulli CUSUM for a share ``p0`` estimated from ``n`` events rising to ``p1``,
    at ``arl`` events between false alarms averaged over what the ``n`` events leave open."""
    p1 = min(p1, 0.99)
    try:
        return p0, p1, cusum.threshold_for_estimated_rate(p0, p1, arl, n)
    except ValueError:  # a rise too small for so small a baseline to tell apart: tune to one it can
        p1 = min(max(p1, cusum.tuning_floor(p0, n)), 0.99)
        return p0, p1, cusum.threshold_for_ert(p0, p1, arl)
