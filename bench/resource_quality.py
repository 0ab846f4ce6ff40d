"""Resource-anomaly detection quality and cost: this project's `resource` detector
(monitor/detectors/resource.py) side by side with river's ADWIN on the log of the model's latency, on
real measured traffic of a digits MLP server (tests/resource_workload.py: v2 is a larger network, about
1.6x slower; a sponge client asks for an 8-pass uncertainty estimate, about 8x the median latency;
malformed requests fail in validation, before any model runs).

Streams: ``workload.events`` (200 Zipf-active benign clients; each event carries every figure of one
recorded request of its condition). A run is ``REFERENCE`` (1,023) clean v1 events, the baseline, then
the stream. Null runs: clean v1 traffic, --null-horizon stream events, each run its own seed. Changes,
from stream event --change-offset on (after the baseline), runs stopping --change-horizon events after:
  switch   every event served by v2 (real, 1.6x)
  canary   10% of the events served by v2 (real)
  scale    v1's latency_ms and cpu_ms x1.2 (semi-synthetic: the recorded figures scaled)
  sponge   a sponge client sending 2% of the events (real)
  errors   a client sending malformed requests, 5% of the events (real)

Detectors:
  ours   Resource("digits", Params(ert=--ert, min_ratio=...)), every other parameter at its default
         (HalfSpaceTrees on), fed the run's events in batches of --batch from the first one. A
         model-level alarm is a detection without a client (latency/resource/payload_anomaly,
         error_spike, the trees); a client-level one names a client (the sponge chart, payload outliers).
         A chart crossing is judged on the values since the change its chart found and the 16 after
         it, and reported (at the 16th) when their median is min_ratio x the baseline's or more. The
         false-alarm comparison runs it at min_ratio 1.0, the least allowed: a crossing is then dropped
         only when that median is below the baseline's (the bench counts them), so its rate is nearly
         the charts' own, the one the ERT promises. The default 1.1 drops the many false crossings
         whose median rose by a few per cent: its rate is shown beside (on the first
         --default-null-runs of the same streams). Change runs use --delay-min-ratio (default 1.0, the
         rate ADWIN is matched to).
  ADWIN  river.drift.ADWIN (river's defaults but delta: clock 32) on log(latency_ms), one value per
         event, fed through its Rust helper as monitor/detectors/scalar_drift.py does (what
         ADWIN.update runs, a detection followed by a fresh window, in a third of the time). It reads the
         1,023 baseline events first (detections there only reset it). ADWIN alarms on any change of
         the mean; ours watches rises only, so only a rise counts: a detection whose kept (recent)
         window's mean is above the mean of the part it dropped; a fall resets it, as river does, and
         it reads on. Its delta is set by bisection on log10(delta) in [1e-14, 0.99], on
         --calibration-runs null runs of other seeds, so that its mean run length to a rise is ours'
         measured at min_ratio 1.0: the two at the same false alarms. On clean traffic ADWIN's rises
         are rare: even at delta 0.99 it runs about 33,000 events between them, so the ERT must be
         large enough for ours to alarm as seldom (the default 30,000 gives about 54,000 events); the
         bench says so when it is not. Also shown: river's default delta, 0.002. On the errors change
         ADWIN reads the 0/1 error stream instead, with the same deltas: clean traffic has no error
         (none in 8,000 recorded v1 requests), so neither detector can alarm falsely on errors and
         there is nothing to calibrate there.

Measures: the mean run length to the first alarm after the baseline, censored at the horizon and
estimated as sum(min(T, H)) / alarms (exact for exponential run lengths, which a CUSUM's nearly are;
the horizon may be below the mean: the 95% interval, from the number of alarms, says how well it is
known), its median and the runs censored; per kind of ours' model-level alarms the same, to that
kind's first report (the charts' kinds share one cooldown per version, so a report of one silences
the others for 5,000 events: per-kind figures lean long); ours' client-level false alarms against the
client_ert's promise (client events / client_ert). Delays: events from the first changed event to the
alarm, inclusive, over the runs with no alarm of that detector before the change; the sponge also in
the sponge client's own requests (ours: to the alarm naming it; ADWIN, which cannot name a client: to
its first rise). Cost: µs per event of ours on decoded events in batches of --batch (the numpy columns
built from the events included, and apart), after its warm-up (baseline, the trees' learning and
reference); ADWIN per value through the helper and through ADWIN.update.

A detector instance costs about 0.2 s in HalfSpaceTrees' construction and learning, whatever its
stream's length: that, and drawing the events (3 µs each), set the run time, about 4 minutes by
default on 2 shared cores.

    .venv/bin/python bench/resource_quality.py                         # the default run
    .venv/bin/python bench/resource_quality.py --quick                 # fewer runs, about a minute
    .venv/bin/python bench/resource_quality.py --changes scale,sponge --delay-min-ratio 1.1  # the default's delays
    .venv/bin/python bench/resource_quality.py --record                # on traffic recorded now (~40 s more)
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from monitor.detectors import ModelBatch  # noqa: E402  (after the path)
from monitor.detectors.resource import HST_LEARN, HST_REFERENCE, Resource  # noqa: E402
from monitor.events import EventDecoder  # noqa: E402
from tests import resource_workload as workload  # noqa: E402

START = time.perf_counter()
MODEL = "digits"
REFERENCE = Resource.Params().reference_size  # 1,023 events: the baseline
SPONGE, BROKEN = "sponger", "broken"
TREES = "river HalfSpaceTrees"  # how the trees' detections' evidence names their method
MAX_DELTA = 0.99  # ADWIN's delta is a probability: below 1
RIVER_DELTA = 0.002  # river's default (and scalar_drift's)
ADWIN_CLOCK = 32  # river's default: ADWIN tests for a change every this many values
SPONGE_REQUESTS = 40  # the sponge table's "within" column: the sponge client's own requests
WARM_UP = REFERENCE + HST_LEARN + HST_REFERENCE  # events before ours runs as it will from then on


def progress(text: str) -> None:
    print(f"[{time.perf_counter() - START:7.1f}s] {text}", file=sys.stderr, flush=True)


Keep = Callable[["Alarm"], bool]


# -- streams ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Change:
    key: str
    title: str
    stream: str  # what ADWIN reads: "latency" or "errors"
    kwargs: dict[str, Any] = field(default_factory=dict)  # for workload.events
    scale: float = 1.0  # latency_ms and cpu_ms of the events from the change on


def changes(at: int) -> list[Change]:
    return [
        Change("switch", "v2 full switch (real)", "latency", {"v2_from": at}),
        Change("canary", "v2 canary, 10% of events (real)", "latency", {"v2_from": at, "v2_share": 0.1}),
        Change("scale", "v1 latency and CPU x1.2 (semi-synthetic)", "latency", scale=1.2),
        Change("sponge", "sponge client, 2% of events (real)", "latency",
               {"sponge_client": SPONGE, "sponge_from": at, "sponge_share": 0.02}),
        Change("errors", "error client, 5% of events (real)", "errors",
               {"error_client": BROKEN, "error_from": at, "error_share": 0.05}),
    ]


class Streams:
    """Builds the runs' events from one recording: dicts as workload.events makes them, and decoded
    (the Event structs the daemon's decoder makes, as the pipeline hands them to detectors)."""

    def __init__(self, traffic: dict[str, np.ndarray], seed: int):
        import msgspec

        self.traffic = traffic
        self.base = seed * 1_000_000
        self.event_list = list[EventDecoder().type]
        self.convert = msgspec.convert

    def dicts(self, n: int, seed: int, change: Change | None = None, at: int = 0) -> list[dict]:
        events = workload.events(self.traffic, n=n, seed=self.base + seed, model=MODEL,
                                 **(change.kwargs if change else {}))
        if change is not None and change.scale != 1.0:
            for e in events[at:]:
                e["latency_ms"] *= change.scale
                e["cpu_ms"] *= change.scale
        return events

    def decoded(self, events: list[dict]) -> list[Any]:
        return self.convert(events, self.event_list)


def adwin_values(events: list[dict], stream: str) -> list[float]:
    if stream == "errors":
        return [float(e["status"] != "ok") for e in events]
    return [math.log(e["latency_ms"]) for e in events]


# -- ours -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Alarm:
    at: int  # index of the event in the run (baseline included)
    kind: str
    client: str | None
    version: str | None
    trees: bool
    ratio: float  # the detection's evidence["ratio"]

    @property
    def family(self) -> str:
        """Ours' per-kind figures: the chart kinds, and the trees apart."""
        return f"{self.kind}{' (trees)' if self.trees else ''}"

    @property
    def label(self) -> str:
        return self.family + (f" {self.version}" if self.version else "") + (f" client {self.client}" if self.client else "")


def model_level(a: Alarm) -> bool:
    return a.client is None


class Ours:
    """The resource detector on a run, in batches."""

    def __init__(self, params: Resource.Params, batch: int, length: int):
        self.params, self.batch = params, batch
        self.records = [SimpleNamespace(topic="bench", partition=0, offset=i) for i in range(length)]
        self.last: Resource | None = None  # the detector of the last run (for its thresholds)

    def bounds(self, n: int) -> list[int]:
        return [*range(0, n, self.batch), n]

    def run(self, events: list[Any]) -> list[Alarm]:
        detector = Resource(MODEL, self.params)
        edges = self.bounds(len(events))
        alarms: list[Alarm] = []
        for lo, hi in zip(edges, edges[1:]):
            for d in detector.update(ModelBatch(MODEL, events[lo:hi], self.records[lo:hi])):
                alarms.append(Alarm(int(d.source["offset"]), d.kind, d.client_id, d.model_version,
                                    str(d.evidence.get("method", "")).startswith(TREES),
                                    float(d.evidence.get("ratio") or math.nan)))
        self.last = detector
        return alarms


def first_after(alarms: list[Alarm], keep: Keep, start: int) -> int | None:
    return min((a.at for a in alarms if a.at >= start and keep(a)), default=None)


# -- ADWIN ------------------------------------------------------------------------------------------


def adwin_first_rise(values: list[float], delta: float, start: int) -> int | None:
    """Index of ADWIN's first detection at or after ``start`` whose kept window's mean is above the
    dropped part's (None: no such detection). Between detections ADWIN's window only grows, so the
    window before a detection is every value since the last reset: ``count`` values summing ``total``."""
    from river.drift import ADWIN

    helper = ADWIN(delta=delta)._helper
    update = helper.update
    count, total = 0, 0.0
    for i, v in enumerate(values):
        count += 1
        total += v
        if update(v):
            width, kept = helper.get_width(), helper.get_total()
            if i >= start and kept / width > (total - kept) / (count - width):
                return i
            helper = ADWIN(delta=delta)._helper  # what ADWIN.update does after a detection
            update = helper.update
            count, total = 0, 0.0
    return None


@dataclass
class Calibration:
    delta: float
    mean: float  # ADWIN's mean run length at delta, on the calibration runs
    target: float
    steps: int
    seconds: float
    reachable: bool  # False: even at MAX_DELTA, ADWIN alarms less often than the target


def calibrate_adwin(streams: Streams, args: argparse.Namespace, target: float) -> Calibration:
    """delta whose mean run length to a rise, over --calibration-runs null runs of their own seeds, is
    ``target``: bisection on log10(delta) in [1e-14, MAX_DELTA], the same runs at every step."""
    started = time.perf_counter()
    horizon = args.null_horizon
    runs = [adwin_values(streams.dicts(REFERENCE + horizon, 100_000 + r), "latency")
            for r in range(args.calibration_runs)]
    progress(f"ADWIN calibration: {len(runs)} null runs drawn")

    def mean_at(delta: float) -> float:
        lengths = [None if (at := adwin_first_rise(v, delta, REFERENCE)) is None else at - REFERENCE + 1
                   for v in runs]
        return censored_mean(lengths, horizon)[0]

    most = mean_at(MAX_DELTA)
    if most > target:  # ADWIN cannot alarm this often: the nearest it comes
        progress(f"  ADWIN at delta {MAX_DELTA} runs {most:,.0f} events to a rise, above the target {target:,.0f}")
        return Calibration(MAX_DELTA, most, target, 1, time.perf_counter() - started, False)
    low, high = -14.0, math.log10(MAX_DELTA)  # low: long run lengths
    best = (math.inf, MAX_DELTA, most)
    steps = 1
    for steps in range(2, 13):  # the mean moves in steps (finite runs): no closer than that
        mid = (low + high) / 2
        mean = mean_at(10 ** mid)
        progress(f"  step {steps}: delta {10 ** mid:.3g} -> mean run length {mean:,.0f} (target {target:,.0f})")
        miss = abs(math.log(mean / target))
        if miss < best[0]:
            best = (miss, 10 ** mid, mean)
        if miss < 0.02:
            break
        if mean > target:
            low = mid
        else:
            high = mid
    return Calibration(best[1], best[2], target, steps, time.perf_counter() - started, True)


# -- statistics and printing ------------------------------------------------------------------------


def censored_mean(lengths: list[int | None], horizon: int) -> tuple[float, int]:
    """(sum(min(T, horizon)) / alarms: the exponential estimate of the mean run length, alarms)."""
    alarms = sum(1 for t in lengths if t is not None)
    total = sum(horizon if t is None else t for t in lengths)
    return (total / alarms if alarms else math.inf), alarms


def run_lengths(runs: list[list[Alarm]], keep: Keep) -> list[int | None]:
    """Per run: events after the baseline to the first alarm ``keep`` takes (1-based), None: none."""
    firsts = [first_after(alarms, keep, REFERENCE) for alarms in runs]
    return [None if a is None else a - REFERENCE + 1 for a in firsts]


def run_length_cells(lengths: list[int | None], horizon: int, ert: float) -> list[str]:
    """runs (censored), mean run length, / ERT (95% interval), median."""
    mean, alarms = censored_mean(lengths, horizon)
    censored = len(lengths) - alarms
    if alarms > 4:
        lo, hi = mean / (1 + 1.96 / math.sqrt(alarms)), mean / (1 - 1.96 / math.sqrt(alarms))
        ratio = f"{mean / ert:.2f} ({lo / ert:.2f}-{hi / ert:.2f})"
    else:
        ratio = (f"{mean / ert:.2f} ({alarms} alarm{'s' if alarms > 1 else ''})" if alarms
                 else f"no alarm in {len(lengths) * horizon:,} events")
    median = float(np.median([horizon + 1 if t is None else t for t in lengths]))
    return [f"{len(lengths)}" + (f" ({censored} censored)" if censored else ""), fmt(mean), ratio,
            f"> {horizon:,}" if median > horizon else fmt(median)]


def fmt(v: float) -> str:
    if v != v or v == math.inf:
        return "-"
    return f"{v:,.0f}" if v >= 10 else f"{v:.1f}"


def share(v: float) -> str:
    return "-" if v != v else f"{v:.0%}"


def table(header: list[str], rows: list[list[str]]) -> None:
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


# -- null runs ----------------------------------------------------------------------------------------


@dataclass
class Null:
    """Per run: ours' alarms per min_ratio; ADWIN's log-latencies (kept for after its calibration)
    and its run lengths per delta."""

    alarms: dict[float, list[list[Alarm]]]
    dropped: dict[float, int] = field(default_factory=dict)  # chart crossings judged too small to report
    latencies: list[list[float]] = field(default_factory=list)
    adwin: dict[float, list[int | None]] = field(default_factory=dict)
    detector: Resource | None = None  # ours (min_ratio 1.0) of the last run, for its thresholds


def null_runs(streams: Streams, args: argparse.Namespace) -> Null:
    n = REFERENCE + args.null_horizon
    counts = {1.0: args.null_runs, 1.1: args.default_null_runs}
    ours = {r: Ours(Resource.Params(ert=args.ert, min_ratio=r), args.batch, n) for r in counts}
    out = Null(alarms={r: [] for r in counts}, dropped={r: 0 for r in counts})
    for run in range(args.null_runs):
        events = streams.dicts(n, run)
        decoded = streams.decoded(events)
        for ratio, runs in counts.items():
            if run < runs:
                out.alarms[ratio].append(ours[ratio].run(decoded))
                out.dropped[ratio] += sum(v.small_rises for v in ours[ratio].last.versions.values())
        out.latencies.append(adwin_values(events, "latency"))
        if (run + 1) % max(1, args.null_runs // 5) == 0:
            progress(f"null runs: {run + 1}/{args.null_runs}")
    out.detector = ours[1.0].last
    return out


def thresholds(detector: Resource | None, ert: float) -> None:
    """What ours' calibration made of the ERT on this traffic (v1 of the last null run)."""
    if detector is None or "v1" not in detector.versions:
        return
    b = detector.versions["v1"].baseline
    charts = sum(len(g.charts) for g in b.groups.values())
    shared = charts + (b.error_chart is not None) + detector.params.hst
    errors = f"error chart p0 {b.error_p0:.2%} -> p1 {b.error_chart[1]:.0%}; " if b.error_chart else ""
    print(f"- ours' v1 baseline: {charts} rank CUSUM charts ({', '.join(b.groups)}; tuned to "
          f"{', '.join(c.name for c in detector.charts)}), the error chart and the trees: {shared} charts share ERT "
          f"{ert:,.0f}, each calibrated to {b.arl:,.0f} events between false alarms (ERT x {shared}, the plain union "
          f"bound, rounded to an eighth of an octave). {errors}sponge chart: expensive share "
          f"{detector.client_p0:.2%} (a client figure in the top {detector.params.expensive_bins}/64 bins), CUSUM h "
          f"{detector.client_h:.3g} at client_ert {detector.params.client_ert:,.0f}.")


def print_null(null: Null, cal: Calibration, args: argparse.Namespace) -> None:
    horizon, ert = args.null_horizon, args.ert
    print(f"\n### False alarms: {args.null_runs} null runs of clean v1 traffic\n")
    print(f"Each run: {REFERENCE:,} baseline events, then {horizon:,} events ({horizon / ert:.1f} x ERT). Run "
          f"length T: events from the end of the baseline to the first alarm, inclusive; mean = "
          f"sum(min(T, {horizon:,})) / alarms.\n")
    rows = []
    for ratio, runs in null.alarms.items():
        if runs:
            rows.append([f"ours, min_ratio {ratio:g}" + (" (default)" if ratio == 1.1 else ""),
                         "model-level, any kind", *run_length_cells(run_lengths(runs, model_level), horizon, ert)])
    for delta, lengths in null.adwin.items():
        what = ("river's default" if delta != cal.delta else "matched to ours at min_ratio 1" if cal.reachable
                else "its most sensitive: NOT matched")
        rows.append([f"river ADWIN, delta {delta:.3g} ({what})", "log(latency_ms), rises only",
                     *run_length_cells(lengths, horizon, ert)])
    table(["detector", "alarm", "runs", "mean run length", "/ ERT (95% CI)", "median run length"], rows)
    if cal.reachable:
        how = (f"bisection on log10(delta), {cal.steps} steps on {args.calibration_runs} null runs of other seeds: "
               f"mean run length there {cal.mean:,.0f} against ours' {cal.target:,.0f}; {cal.seconds:.0f} s")
    else:
        how = (f"NOT MATCHED: ours alarms more often ({cal.target:,.0f} events) than ADWIN can at any delta (at "
               f"{MAX_DELTA}: {cal.mean:,.0f} on {args.calibration_runs} null runs of other seeds); compared at "
               f"{MAX_DELTA}, ADWIN alarming less often than ours")
    print(f"\n- ADWIN's delta: {how}.")
    for ratio, runs in null.alarms.items():
        if runs:
            reports = sum(1 for alarms in runs for a in alarms if model_level(a) and not a.trees
                          and a.kind != "error_spike")
            print(f"- ours at min_ratio {ratio:g}: chart reports {reports}; chart crossings dropped as under "
                  f"min_ratio (the median of the crossing's window and the 16 values after it) {null.dropped[ratio]}.")
    thresholds(null.detector, ert)
    print(f"- ours' trees learn {HST_LEARN:,} events after the baseline and score {HST_REFERENCE:,} more to set "
          f"their bound: no tree alarm in the first {HST_LEARN + HST_REFERENCE:,} stream events.")

    print("\nOurs per kind of model-level alarm: run length to that kind's first report; in how many runs it was "
          "the first alarm; the median ratio of all its reports (charts: median since the change the chart "
          "found / baseline median; trees: share of marked scores / the baseline's share).\n")
    rows = []
    for ratio, runs in null.alarms.items():
        families = sorted({a.family for alarms in runs for a in alarms if model_level(a) and a.at >= REFERENCE})
        firsts = [min((a for a in alarms if model_level(a) and a.at >= REFERENCE), key=lambda a: a.at, default=None)
                  for alarms in runs]
        for fam in families:
            def keep(a: Alarm, fam: str = fam) -> bool:
                return model_level(a) and a.family == fam

            cells = run_length_cells(run_lengths(runs, keep), horizon, ert)
            seen = [a.ratio for alarms in runs for a in alarms if keep(a)]
            first = sum(1 for f in firsts if f is not None and f.family == fam)
            rows.append([f"{ratio:g}", fam, cells[1], cells[2], cells[3], f"{first}/{len(runs)}",
                         f"{np.median(seen):.3f}"])
    table(["min_ratio", "kind", "mean run length", "/ ERT (95% CI)", "median", "first alarm of the run",
           "median ratio"], rows)

    client_ert = Resource.Params().client_ert
    print(f"\nOurs' client-level false alarms (a client named: the sponge chart, payload outliers). Every event "
          f"names a client; clients are not judged in the 5,000 events after a model-level chart report, so the "
          f"client events after the baselines are an upper bound on the exposure, and their number over "
          f"client_ert ({client_ert:,.0f}) one on the alarms expected:\n")
    rows = []
    for ratio, runs in null.alarms.items():
        if not runs:
            continue
        events = len(runs) * horizon
        flagged = [a for alarms in runs for a in alarms if not model_level(a)]
        rows.append([f"{ratio:g}", f"{len(runs)}", f"{events:,}", f"{events / client_ert:.1f}", f"{len(flagged)}",
                     f"{sum(1 for alarms in runs if any(not model_level(a) for a in alarms))}",
                     ", ".join(sorted({a.kind for a in flagged})) or "-"])
    table(["min_ratio", "runs", "client events", "expected alarms (at most)", "client alarms", "runs with one",
           "kinds"], rows)


# -- change runs ------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """One detector on one change: per run, its detection (event index, None: none) and whether it
    alarmed before the change; the sponge's own requests by the detection."""

    alarms: list[int | None] = field(default_factory=list)
    before: list[bool] = field(default_factory=list)
    sponge: list[int | None] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)  # ours: what its detection was


@dataclass
class ChangeResult:
    outcomes: dict[str, Outcome]
    benign_flagged: list[int] = field(default_factory=list)  # ours: benign clients flagged after the change
    model_after: list[bool] = field(default_factory=list)  # ours: a model-level alarm after the change


def detection(change: Change) -> Keep:
    """Which of ours' alarms detect the change."""
    if change.key == "sponge":
        return lambda a: a.client == SPONGE
    if change.key == "errors":
        return lambda a: a.kind == "error_spike"
    return model_level


def change_runs(streams: Streams, change: Change, s: int, deltas: dict[str, float],
                args: argparse.Namespace) -> ChangeResult:
    at = REFERENCE + args.change_offset
    n = at + args.change_horizon
    ours = Ours(Resource.Params(ert=args.ert, min_ratio=args.delay_min_ratio), args.batch, n)
    keep = detection(change)
    out = ChangeResult({"ours": Outcome()} | {k: Outcome() for k in deltas})
    for run in range(args.change_runs):
        events = streams.dicts(n, 200_000 + 10_000 * s + run, change, at)
        sponge = np.cumsum([e["client_id"] == SPONGE for e in events])
        alarms = ours.run(streams.decoded(events))
        hit = first_after(alarms, keep, at)
        o = out.outcomes["ours"]
        o.alarms.append(hit)
        o.before.append(any(REFERENCE <= a.at < at for a in alarms))
        o.labels.append(next(a.label for a in alarms if a.at == hit and keep(a)) if hit is not None else "none")
        o.sponge.append(None if hit is None else int(sponge[hit]))
        out.benign_flagged.append(len({a.client for a in alarms
                                       if a.at >= at and a.client not in (None, SPONGE, BROKEN)}))
        out.model_after.append(any(a.at >= at and model_level(a) for a in alarms))
        values = adwin_values(events, change.stream)
        for name, delta in deltas.items():
            first = adwin_first_rise(values, delta, REFERENCE)
            o = out.outcomes[name]
            o.alarms.append(first)
            o.before.append(first is not None and first < at)
            o.sponge.append(None if first is None else int(sponge[first]))
    return out


def delay_cells(o: Outcome, at: int, horizon: int, early: int) -> list[str]:
    """before, within early, within horizon, median, mean (detected): over the runs without an alarm before."""
    delays = np.array([horizon + 1 if a is None else a - at + 1 for a, b in zip(o.alarms, o.before) if not b],
                      dtype=float)
    if not len(delays):
        return [f"{sum(o.before)}", "-", "-", "-", "-"]
    detected = delays <= horizon
    median = float(np.median(delays))
    return [f"{sum(o.before)}", share(float((delays <= early).mean())), share(float(detected.mean())),
            f"> {horizon:,}" if median > horizon else fmt(median),
            fmt(float(delays[detected].mean())) if detected.any() else "-"]


def print_changes(results: dict[str, ChangeResult], cs: list[Change], deltas: dict[str, float],
                  args: argparse.Namespace) -> None:
    at = REFERENCE + args.change_offset
    horizon, early = args.change_horizon, int(args.ert / 10)
    tick = (-at) % ADWIN_CLOCK or ADWIN_CLOCK  # ADWIN's first test after the change (it tests at multiples)
    print(f"\n### Detection delay: {args.change_runs} runs per change\n")
    print(f"Changes from stream event {args.change_offset:,} after the baseline on; runs stop {horizon:,} events "
          f"after. Delay: events from the first changed event to the alarm, inclusive, over the runs with no alarm of "
          f"that detector before the change (counted apart; for ours any alarm, model- or client-level). Ours: "
          f"ERT {args.ert:,.0f}, min_ratio {args.delay_min_ratio:g}, batches of {args.batch:,}; its detection is its "
          f"first model-level alarm, on the sponge its alarm naming the sponge client, on the errors its "
          f"error_spike. ADWIN: its first rise on log(latency_ms), on the errors on the 0/1 error stream; it tests "
          f"one value in {ADWIN_CLOCK} (river's clock), here {tick}, {tick + ADWIN_CLOCK}, ... events after the "
          f"change (unless a detection restarted it). A "
          f"detector blind to a change still alarms, falsely: within {early:,} events (ERT/10) in a share of runs "
          f"about {early:,} / its mean run length.\n")
    rows = []
    for c in cs:
        r = results[c.key]
        for name, o in r.outcomes.items():
            what = ""
            if name == "ours":
                labels, counts = np.unique(o.labels, return_counts=True)
                what = ", ".join(f"{lab} ({cnt})" for cnt, lab in sorted(zip(counts, labels), reverse=True)[:3])
            detector = name + (" (errors 0/1)" if name != "ours" and c.stream == "errors" else "")
            rows.append([c.title, detector, f"{len(o.alarms)}", *delay_cells(o, at, horizon, early), what])
    table(["change", "detector", "runs", "false alarm before the change", f"detected within {early:,} (ERT/10)",
           f"within {horizon:,}", "median delay", "mean delay (detected)", "ours: its detection (runs)"], rows)

    print("\nOurs, all its alarms after the change (all runs): runs with a model-level alarm; benign clients "
          "flagged (in how many runs).\n")
    table(["change", "runs with a model-level alarm", "benign clients flagged (runs)"],
          [[c.title, f"{sum(results[c.key].model_after)}/{len(results[c.key].model_after)}",
            f"{sum(results[c.key].benign_flagged)} ({sum(1 for b in results[c.key].benign_flagged if b)})"]
           for c in cs])
    if "sponge" not in results:
        return
    print(f"\nThe sponge client, in its own requests (2% of the traffic) up to the detection, inclusive, over the runs "
          f"with no alarm of that detector before the change. ADWIN cannot say which client: its alarm is on the "
          f"model's latency.\n")
    rows = []
    for name, o in results["sponge"].outcomes.items():
        got = np.array([math.inf if c is None else c for c, b in zip(o.sponge, o.before) if not b], dtype=float)
        found = got[np.isfinite(got)]
        label = "ours (the alarm naming it)" if name == "ours" else f"{name} (its first rise)"
        median = float(np.median(got)) if len(got) else math.nan
        rows.append([label, f"{len(got)}", f"{len(found)}", share(float((got <= SPONGE_REQUESTS).mean())) if len(got) else "-",
                     fmt(median) if np.isfinite(median) else "not detected",
                     fmt(float(found.mean())) if len(found) else "-", fmt(float(found.max())) if len(found) else "-"])
    table(["detector", "runs", "detected", f"within {SPONGE_REQUESTS} requests", "median requests",
           "mean (detected)", "max (detected)"], rows)


# -- cost -------------------------------------------------------------------------------------------


def timing(streams: Streams, args: argparse.Namespace) -> dict[str, list[float]]:
    """µs per event, alternating: ours with the columns built inside (as the detector builds them on a
    fresh batch) and prebuilt (as when another detector built them first); ADWIN through the helper and
    through ADWIN.update. Ours' steady state: the batches after those that hold its WARM_UP events."""
    from river.drift import ADWIN

    n = REFERENCE + args.timing_events
    events = streams.dicts(n, 900_000)
    decoded = streams.decoded(events)
    values = adwin_values(events, "latency")[REFERENCE:]
    ours = Ours(Resource.Params(ert=args.ert), args.batch, n)
    edges = ours.bounds(n)
    warm = math.ceil(WARM_UP / args.batch)  # batches
    out: dict[str, list[float]] = {"ours": [], "ours, columns prebuilt": [], "warm-up s": [],
                                   "ADWIN helper": [], "ADWIN.update": []}
    for repeat in range(args.timing_repeats):
        for prebuilt in ((False, True) if repeat % 2 == 0 else (True, False)):
            detector = Resource(MODEL, ours.params)
            batches = [ModelBatch(MODEL, decoded[lo:hi], ours.records[lo:hi]) for lo, hi in zip(edges, edges[1:])]
            if prebuilt:
                for b in batches:
                    b.ts  # noqa: B018
                    for f in ours.params.figures:
                        b.column(f)
            t = time.perf_counter()
            for b in batches[:warm]:
                detector.update(b)
            t1 = time.perf_counter()
            for b in batches[warm:]:
                detector.update(b)
            timed = sum(len(b) for b in batches[warm:])
            out["ours, columns prebuilt" if prebuilt else "ours"].append((time.perf_counter() - t1) / timed * 1e6)
            if not prebuilt:
                out["warm-up s"].append(t1 - t)
        helper_update = ADWIN(delta=1e-9)._helper.update  # a delta too small to alarm here: the plain loop
        t = time.perf_counter()
        for i, v in enumerate(values):
            if helper_update(v):
                break
        out["ADWIN helper"].append((time.perf_counter() - t) / (i + 1) * 1e6)
        adwin = ADWIN(delta=1e-9)
        t = time.perf_counter()
        for i, v in enumerate(values):
            adwin.update(v)
            if adwin.drift_detected:
                break
        out["ADWIN.update"].append((time.perf_counter() - t) / (i + 1) * 1e6)
        progress(f"timing repeat {repeat + 1}: ours {out['ours'][-1]:.2f} µs/event, ADWIN {out['ADWIN helper'][-1]:.3f}")
    return out


def print_timing(t: dict[str, list[float]], args: argparse.Namespace) -> None:
    print("\n### Cost\n")
    print(f"One clean stream of {args.timing_events:,} events after the baseline, {args.timing_repeats} repeats, "
          f"alternating; the best and all. The machine has 2 cores and the other one ran other work, so the best is "
          f"the figure to compare and the spread is the machine's.\n")
    warm = math.ceil(WARM_UP / args.batch) * args.batch  # events
    note = {"ours": f"whole detector (default params, ERT {args.ert:,.0f}), decoded events in batches of "
                    f"{args.batch:,}, the numpy columns built from them inside; after the first {warm:,} events",
            "ours, columns prebuilt": "the same with the figures' columns and ts built before (the daemon builds "
                                      "them once per batch for all detectors)",
            "ADWIN helper": "one log(latency_ms) value per event through river's Rust helper, as scalar_drift feeds it",
            "ADWIN.update": "the same through ADWIN.update"}
    table(["detector", "setting", "µs/event (best)", "all"],
          [["ours" if k.startswith("ours") else "river ADWIN", v, f"{min(t[k]):.2f}",
            ", ".join(f"{x:.2f}" for x in t[k])] for k, v in note.items()])
    print(f"\nOurs' warm-up, once per model: {statistics.median(t['warm-up s']):.2f} s for the first {warm:,} events "
          f"(median of {len(t['warm-up s'])}): the baseline's charts calibrated (their thresholds cached per "
          f"process), the trees built, learning {HST_LEARN:,} events and scoring {HST_REFERENCE:,}, each one. JSON "
          f"decoding is in neither figure.")


# -- main -------------------------------------------------------------------------------------------


def code_version() -> list[str]:
    """Which code ran (bench/provenance.py)."""
    from provenance import code_version as version
    return [version([os.path.join("monitor", "detectors", "resource.py")], "monitor/detectors/resource.py"),
            version([os.path.join("monitor", "detectors", f) for f in ("rank_cusum.py", "cusum.py", "drift.py")]
                    + [os.path.join("tests", "resource_workload.py")],
                    "its helpers (rank_cusum, cusum, drift) and the workload")]


def describe_traffic(traffic: dict[str, np.ndarray], recorded: bool) -> str:
    m = workload.meta(traffic)
    med = {c: float(np.median(traffic[f"{c}.latency_ms"])) for c in workload.CONDITIONS}
    cpu = {c: float(np.median(traffic[f"{c}.cpu_ms"])) for c in ("v1", "v2")}
    source = "recorded now" if recorded else f"the stored recording {os.path.relpath(workload.DATA)}"
    return (f"traffic: {source} ({', '.join(f'{c} {v}' for c, v in m['counts'].items())} requests; numpy "
            f"{m['numpy']}, {m['cpus']} cpus); median latency v1 {med['v1']:.3f} ms, v2/v1 {med['v2'] / med['v1']:.2f} "
            f"(CPU {cpu['v2'] / cpu['v1']:.2f}), sponge/v1 {med['sponge'] / med['v1']:.1f}, errors/v1 "
            f"{med['errors'] / med['v1']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ert", type=float, default=30_000.0,
                        help="ours' ERT: expected events between false alarms (ADWIN is matched to what it gives)")
    parser.add_argument("--null-runs", type=int, default=200, help="null runs (ours at min_ratio 1.0, ADWIN)")
    parser.add_argument("--default-null-runs", type=int, default=50,
                        help="of those, the first this many also run ours at the default min_ratio 1.1")
    parser.add_argument("--null-horizon", type=int, default=60_000, help="stream events of a null run")
    parser.add_argument("--calibration-runs", type=int, default=100, help="null runs (other seeds) to set ADWIN's delta")
    parser.add_argument("--change-runs", type=int, default=60, help="runs per change")
    parser.add_argument("--change-offset", type=int, default=500, help="stream events after the baseline before the change")
    parser.add_argument("--change-horizon", type=int, default=20_000, help="change runs stop this many events after it")
    parser.add_argument("--changes", default="switch,canary,scale,sponge,errors",
                        help="the changes to run, comma-separated (default: all five)")
    parser.add_argument("--delay-min-ratio", type=float, default=1.0, help="ours' min_ratio in the change runs")
    parser.add_argument("--batch", type=int, default=2000, help="events per batch for ours")
    parser.add_argument("--timing-events", type=int, default=60_000, help="events of the cost measurement's stream")
    parser.add_argument("--timing-repeats", type=int, default=3, help="cost measurements, alternating")
    parser.add_argument("--no-timing", action="store_true", help="no cost measurement")
    parser.add_argument("--seed", type=int, default=0, help="the runs' seeds are this x 1,000,000 + their own")
    parser.add_argument("--record", action="store_true",
                        help="record fresh traffic (about 40 s) instead of the stored recording; it is not saved")
    parser.add_argument("--quick", action="store_true",
                        help="40 null runs (20 at min_ratio 1.1), 40 calibration runs, 15 per change, one timing repeat")
    args = parser.parse_args()
    if args.quick:
        args.null_runs, args.default_null_runs, args.calibration_runs = 40, 20, 40
        args.change_runs, args.timing_repeats = 15, 1
    args.default_null_runs = min(args.default_null_runs, args.null_runs)
    all_changes = changes(REFERENCE + args.change_offset)
    keys = [k.strip() for k in args.changes.split(",") if k.strip()]
    unknown = set(keys) - {c.key for c in all_changes}
    if unknown:
        parser.error(f"--changes: unknown {sorted(unknown)}; expected some of {[c.key for c in all_changes]}")
    if args.null_runs < 10 or args.calibration_runs < 10:
        parser.error("--null-runs and --calibration-runs: at least 10")
    if args.delay_min_ratio < 1:
        parser.error("--delay-min-ratio: at least 1 (the detector's own bound)")

    import river

    if args.record:
        progress("recording traffic (tests/resource_workload.record) ...")
        traffic = workload.record()
    else:
        traffic = workload.load()
    streams = Streams(traffic, args.seed)
    print(f"## resource quality: ours vs river ADWIN on log latency, ERT {args.ert:,.0f}\n")
    print("```")
    print(f"Python {platform.python_version()}, numpy {np.__version__}, river {river.__version__}; "
          f"{os.cpu_count()} cpus; seed {args.seed}")
    for line in code_version():
        print(line)
    print(describe_traffic(traffic, args.record))
    print(f"runs: {args.null_runs} null ({args.default_null_runs} also at min_ratio 1.1), {args.calibration_runs} "
          f"ADWIN calibration, {args.change_runs} per change; ours in batches of {args.batch:,}")
    print("```")

    started = time.perf_counter()
    null = null_runs(streams, args)
    target = censored_mean(run_lengths(null.alarms[1.0], model_level), args.null_horizon)[0]
    progress(f"ours at min_ratio 1.0: mean run length {target:,.0f}; calibrating ADWIN to it")
    cal = calibrate_adwin(streams, args, target)
    deltas = {f"river ADWIN, delta {cal.delta:.3g}": cal.delta, f"river ADWIN, delta {RIVER_DELTA:g}": RIVER_DELTA}
    for delta in deltas.values():
        null.adwin[delta] = [None if (at := adwin_first_rise(v, delta, REFERENCE)) is None else at - REFERENCE + 1
                             for v in null.latencies]
    null.latencies = []
    print_null(null, cal, args)
    progress("null runs done")

    results = {}
    for s, c in enumerate(all_changes):
        if c.key in keys:
            results[c.key] = change_runs(streams, c, s, deltas, args)
            progress(f"change '{c.title}': {args.change_runs} runs")
    if results:
        print_changes(results, [c for c in all_changes if c.key in keys], deltas, args)

    if not args.no_timing:
        print_timing(timing(streams, args), args)
    print(f"\ntotal {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
