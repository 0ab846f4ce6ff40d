"""Surges of low-confidence predictions, per model and per client, at a set false-alarm rate.

Each prediction is marked low-confidence when its score crosses a bound learnt from the model's
reference (its first ``reference_size`` events): the top probability below its ``quantile`` (default),
the margin between the two top probabilities below its ``quantile``, or the entropy of the probabilities
above its ``1 - quantile``. The reference also gives the in-control rate ``p0`` of low-confidence marks.
A Bernoulli CUSUM (Reynolds & Stoumbos 1999) watches the marks for a rise to ``p1 = shift * p0``, with
the threshold calibrated to ``ert`` events between false alarms by the Markov chain of Brook & Evans
(1972) (see ``monitor.detectors.cusum``). One CUSUM runs on the model's whole stream (vectorised per
batch), and one per client (``client_ert``, larger by default, since many clients are watched at once).

The per-client figures (marks, events, CUSUM statistic) are kept for the probing detector
(``client_figures``); at most ``max_clients`` clients are tracked, the idle ones forgotten first, and a
client whose statistic is above half its threshold is never evicted by a flood of new ids.

>>> import random
>>> from types import SimpleNamespace as E
>>> random.seed(3)
>>> d = LowConfidence("digits", LowConfidence.Params(ert=100_000, reference_size=1000))
>>> calm = [E(ts=float(i), confidence=random.betavariate(12, 1), probabilities=None, client_id="c1",
...           event_id=str(i), model_version=None) for i in range(3000)]
>>> d.update(ModelBatch("digits", calm, [E(topic="t", partition=0, offset=i) for i in range(3000)]))
[]
>>> unsure = [E(ts=3000.0 + i, confidence=random.uniform(0.3, 0.7), probabilities=None, client_id="c1",
...             event_id=str(i), model_version=None) for i in range(300)]
>>> found = d.update(ModelBatch("digits", unsure, [E(topic="t", partition=0, offset=i) for i in range(300)]))
>>> [f.kind for f in found][:1], found[0].client_id
(['low_confidence_spike'], None)
"""

from __future__ import annotations

import logging
import math
from typing import Any, ClassVar, Literal

import msgspec
import numpy as np

from monitor.detections import Detection, make_detection
from monitor.detectors import Detector, ModelBatch
from monitor.detectors import cusum, reference as reference_file
from monitor.detectors.clients import ClientsByDict, compared_rate, evict, group_by_client
from monitor.errors import ConfigError

log = logging.getLogger("inferwatch.detectors.confidence")


RECENT_HALF_LIFE = 5000  # events: how fast the model's recent rate of marks follows the stream


class ClientState:
    __slots__ = ("statistic", "events", "marks", "last_ts", "quiet_until")

    def __init__(self) -> None:
        self.statistic = 0.0
        self.events = 0
        self.marks = 0
        self.last_ts = -math.inf
        self.quiet_until = 0

    def __getstate__(self) -> tuple:
        return (self.statistic, self.events, self.marks, self.last_ts, self.quiet_until)

    def __setstate__(self, state: tuple) -> None:
        self.statistic, self.events, self.marks, self.last_ts, self.quiet_until = state


class LowConfidence(ClientsByDict, Detector):
    """Bernoulli CUSUM on low-confidence marks, per model and per client, calibrated to an ERT."""

    name: ClassVar[str] = "confidence"

    class Params(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
        ert: float = 10_000  # expected events between false alarms on the model's stream
        client_ert: float = 100_000  # the same for each client's stream
        indicator: Literal["max_probability", "margin", "entropy"] = "max_probability"
        quantile: float = 0.05  # the reference quantile that sets the bound (so p0 is about this)
        bound: float | None = None  # a fixed bound instead of the reference quantile
        shift: float = 3.0  # the CUSUM is tuned to detect a rise of the rate to shift * p0
        reference_size: int = 2000
        reference: str | None = None  # JSONL events or a 1-column .npy of the indicator; default: the first events
        min_client_events: int = 30  # a client's alarm needs at least this many of its events
        max_clients: int = 10_000
        client_idle: float = 3600.0  # seconds of event time after which an idle client is forgotten
        cooldown: int = 1000  # events of quiet on a stream after its alarm

        def check(self) -> tuple[str, str] | None:
            if self.ert < 10 or self.client_ert < 10:
                return "ert", "expected at least 10 events between false alarms"
            if not 0 < self.quantile < 0.5:
                return "quantile", f"expected 0 < quantile < 0.5, got {self.quantile}"
            if self.shift <= 1:
                return "shift", f"expected a rise factor above 1, got {self.shift}"
            if self.reference_size < 100:
                return "reference_size", f"expected at least 100 events, got {self.reference_size}"
            if self.reference is not None and (problem := reference_file.check_path(self.reference)):
                return "reference", problem
            if self.max_clients < 1 or self.min_client_events < 1:
                return "max_clients", "expected max_clients >= 1 and min_client_events >= 1"
            return None

    def __init__(self, model: str, params: Params):
        super().__init__(model, params)
        self.reference: list[float] = []
        self.reference_id = "stream"  # or the reference file's identity
        self.bound: float | None = params.bound
        self.p0: float | None = None
        self.p1: float | None = None
        self.h: float | None = None
        self.client_h: float | None = None
        self.recent_rate = 0.0
        self.client_base: float | None = None
        self.statistic = 0.0
        self.seen = 0
        self.quiet_until = 0
        self.alarms = 0
        self.marks_recent = np.zeros(0)
        self.clients: dict[str, ClientState] = {}

    # -- the mark ------------------------------------------------------------------------------

    def _scores(self, batch: ModelBatch) -> np.ndarray:
        """Higher is more confident, whatever the indicator (entropy is negated)."""
        kind = self.params.indicator
        if kind == "max_probability":
            return batch.confidence
        probs, mask = batch.probabilities
        out = np.full(len(batch), np.nan)
        if probs.shape[1] >= 2 and mask.any():
            p = probs[mask]
            if kind == "margin":
                top2 = np.sort(p, axis=1)[:, -2:]
                out[mask] = top2[:, 1] - top2[:, 0]
            else:
                with np.errstate(divide="ignore", invalid="ignore"):
                    out[mask] = np.nansum(p * np.log(np.where(p > 0, p, 1.0)), axis=1)  # -entropy
        return out

    def _learn(self, scores: np.ndarray, final: bool = False) -> None:
        need = self.params.reference_size - len(self.reference)
        self.reference.extend(scores[:need].tolist())
        if len(self.reference) < self.params.reference_size and not final:
            return
        ref = np.asarray(self.reference)
        if self.bound is None:
            self.bound = float(np.quantile(ref, self.params.quantile))
        # p0 from the reference itself (ties at the bound make it differ from the quantile)
        p0 = float(np.mean(ref < self.bound))
        self.p0 = min(max(p0, 1e-4), 0.5)
        self.p1 = min(self.params.shift * self.p0, 0.99)
        self.h = cusum.threshold_for_ert(self.p0, self.p1, float(self.params.ert))
        self.client_h = cusum.threshold_for_ert(self.p0, self.p1, float(self.params.client_ert))
        self.recent_rate = self.p0
        self.client_base = self.p0
        self.reference = []  # the bound, p0 and thresholds are all that is kept

    # -- the batch -----------------------------------------------------------------------------

    def restore(self, state: dict[str, Any]) -> None:
        if reference_file.still_valid(state, self.params.reference, self.model):
            super().restore(state)

    def _learn_from_file(self) -> None:
        path = self.params.reference
        try:
            data = reference_file.load(path, self.model, self.params.reference_size)
            if isinstance(data, np.ndarray):
                if data.shape[1] != 1:
                    raise ConfigError(f"reference {path}: the confidence detector needs events (JSONL) or a "
                                      f"1-column array of its indicator, not {data.shape[1]} columns")
                scores = data[:, 0]
            else:
                scores = self._scores(data)
            scores = scores[~np.isnan(scores)]
            if len(scores) < 100:
                raise ConfigError(f"reference {path}: {len(scores)} events with a {self.params.indicator}, "
                                  "expected at least 100")
            self.reference = scores.tolist()
            self._learn(np.zeros(0), final=True)
            self.reference_id = reference_file.identity(path)
        except ConfigError as exc:
            self.reference_id = reference_file.fall_back(log, self.model, exc, path, self.params.reference_size)

    def update(self, batch: ModelBatch) -> list[Detection]:
        if self.h is None and self.params.reference and self.reference_id == "stream":
            self._learn_from_file()
        scores = self._scores(batch)
        present = np.flatnonzero(~np.isnan(scores))
        if present.size == 0:
            return []
        scores = scores[present]
        if self.h is None:
            before = len(self.reference)
            self._learn(scores)
            used = (len(scores) if self.h is None else self.params.reference_size - before)
            self.seen += used
            if self.h is None:
                return []
            present, scores = present[used:], scores[used:]
            if present.size == 0:
                return []
        marks = (scores < self.bound).astype(np.int8)
        # the model's recent rate of marks, with a half-life of RECENT_HALF_LIFE events
        weight = 1 - 0.5 ** (len(marks) / RECENT_HALF_LIFE)
        self.recent_rate += weight * (float(marks.mean()) - self.recent_rate)
        found = self._model_stream(batch, present, marks)
        found.extend(self._client_streams(batch, present, marks))
        self.seen += len(marks)
        return found

    def _model_stream(self, batch: ModelBatch, present: np.ndarray, marks: np.ndarray) -> list[Detection]:
        alarms, self.statistic = cusum.run(marks, self.p0, self.p1, self.h, self.statistic)
        found = []
        for i in alarms.tolist():
            if self.seen + i < self.quiet_until:
                continue
            self.quiet_until = self.seen + i + self.params.cooldown
            self.alarms += 1
            window = marks[max(0, i - 199): i + 1]
            found.append(self._detection(batch, int(present[i]), None, float(window.mean()), len(window),
                                         self.h, self.params.ert))
        return found

    def _client_streams(self, batch: ModelBatch, present: np.ndarray, marks: np.ndarray) -> list[Detection]:
        """Every client's CUSUM over its events of the batch at once: the events are grouped by client
        (a stable sort of client codes), and within each client's run the recursion is solved by a
        running sum and a running minimum that restarts at the client's first event (see cusum.run).
        Only a client whose statistic crosses its threshold is replayed event by event."""
        rate = compared_rate(self.p0, self.recent_rate, float(marks.mean()), len(marks))
        base = min(rate, 0.98 / self.params.shift)
        p1 = min(self.params.shift * base, 0.99)
        a, b, step = cusum._grid(base, p1)
        h = self.client_h = cusum.threshold_for_ert(base, p1, float(self.params.client_ert))
        self.client_base = base
        up, down = a * step, -b * step
        events = batch.events
        names, order, starts, ends = group_by_client([events[j].client_id for j in present.tolist()])
        w = np.where(marks[order] > 0, up, down)
        clients = self.clients
        states = [None if name is None else clients.get(name) or clients.setdefault(name, ClientState())
                  for name in names]
        s0 = np.fromiter((st.statistic if st is not None else 0.0 for st in states), dtype=np.float64,
                         count=len(states))
        s = cusum.per_segment(w, starts, ends - starts, s0)
        crossed = np.maximum.reduceat(s, starts) > h
        marks_sorted = marks[order]
        n_marks = np.add.reduceat(marks_sorted, starts)
        found = []
        ts = batch.ts
        for k, st in enumerate(states):
            if st is None:
                continue
            lo, hi = int(starts[k]), int(ends[k])
            last = int(present[order[hi - 1]])
            st.last_ts = float(ts[last])
            if not crossed[k]:
                st.events += hi - lo
                st.marks += int(n_marks[k])
                st.statistic = float(s[hi - 1])
                continue
            for pos in range(lo, hi):  # the rare client that alarms: its events one by one
                mark = int(marks_sorted[pos])
                st.events += 1
                st.marks += mark
                value = st.statistic + (up if mark else down)
                st.statistic = value if value > 0.0 else 0.0
                if st.statistic > h:
                    st.statistic = 0.0
                    if st.events >= self.params.min_client_events and st.events >= st.quiet_until:
                        st.quiet_until = st.events + self.params.cooldown
                        window = marks_sorted[lo: pos + 1]
                        found.append(self._detection(batch, int(present[order[pos]]), names[k],
                                                     float(window.mean()), len(window), h, self.params.client_ert,
                                                     base))
        if len(clients) > self.params.max_clients:
            self.evict_idle(float(batch.ts[-1]), overflow=True)
        found.sort(key=lambda d: d.ts)
        return found

    def evict_idle(self, now: float, overflow: bool = False) -> int:
        """Forget idle clients, then (``overflow``) the least recently seen beyond ``max_clients``; never
        one whose CUSUM is half-way up. Returns how many."""
        if self.client_h is None:
            return 0
        return evict(self.clients, now, self.params.client_idle, self.client_h / 2, self.params.max_clients, overflow)

    def _detection(self, batch: ModelBatch, index: int, client: str | None, rate: float, events: int,
                   h: float, ert: float, baseline: float | None = None) -> Detection:
        event = batch.events[index]
        topic, partition, offset = batch.source(index)
        baseline = self.p0 if baseline is None else baseline
        ratio = rate / baseline if baseline else math.inf
        severity = "critical" if ratio >= 2 * self.params.shift else "warning"
        who = f"client {client}" if client else "the model"
        return make_detection(
            detector=self.name, kind="low_confidence_spike", model=self.model, window_start=float(event.ts),
            ts=float(event.ts), client_id=client, model_version=event.model_version, severity=severity,
            score=round(ratio, 3), threshold=self.params.shift,
            summary=(f"low-confidence predictions of {who} at {rate:.1%} of "
                     f"{'its last' if client else 'the last'} {events} events, {ratio:.1f}x the "
                     f"{'reference' if baseline == self.p0 else 'model-wide'} {baseline:.1%} "
                     f"(Bernoulli CUSUM, ERT {ert:,.0f})"),
            evidence={"indicator": self.params.indicator, "bound": self.bound, "reference_rate": self.p0,
                      "compared_with_rate": baseline, "model_recent_rate": self.recent_rate,
                      "observed_rate": rate, "events": events, "cusum_threshold": h, "ert": ert,
                      "event_ids": [e.event_id for e in batch.events[max(0, index - 9): index + 1]]},
            source={"topic": topic, "partition": partition, "offset": offset},
        )

    # -- for people and for the probing detector ------------------------------------------------

    def client_counts(self) -> tuple[int, int]:
        return len(self.clients), 0  # a new client always finds room: eviction makes it

    def client_figures(self) -> dict[str, tuple[int, int, float]]:
        """client -> (events, low-confidence marks, CUSUM statistic)."""
        return {c: (st.events, st.marks, st.statistic) for c, st in self.clients.items()}

    def report_figures(self, batch: ModelBatch) -> dict[str, Any]:
        """The batch's share of low-confidence predictions, the reference share and the share the
        model's chart is tuned to detect."""
        if self.h is None:
            return {"low_confidence_rate": None, "low_confidence_reference": None, "low_confidence_alarm": None}
        scores = self._scores(batch)
        scores = scores[~np.isnan(scores)]
        rate = float((scores < self.bound).mean()) if scores.size else None
        return {"low_confidence_rate": rate, "low_confidence_reference": self.p0, "low_confidence_alarm": self.p1}

    def armed(self) -> bool:
        return self.h is not None

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        top = sorted(self.clients.items(), key=lambda kv: -kv[1].statistic)[:10]
        out.update({
            "state": "learning reference" if self.h is None else "armed",
            "bound": self.bound, "reference_rate": self.p0, "threshold": self.h, "client_threshold": self.client_h,
            "statistic": self.statistic, "alarms": self.alarms, "clients_tracked": len(self.clients),
            "top_clients": [{"client_id": c, "events": st.events, "marks": st.marks, "statistic": st.statistic}
                            for c, st in top],
        })
        return out
