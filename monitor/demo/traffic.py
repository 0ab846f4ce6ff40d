"""Inference traffic of real scikit-learn models, with incidents injected on a schedule.

Two models serve real predictions: ``digits`` (logistic regression on the 8x8 digits images, 64
features) and ``cancer`` (a scaled logistic regression on the breast-cancer data, 30 features).
Benign clients send held-out inputs with small augmentations. Incidents, at fractions of the run:
- 20%: client ``sponge`` sends ``digits`` requests that cost 8x the usual latency and CPU (a sponge
  attack: denial of service through expensive queries), about one in fifty requests;
- 30%: client ``mallory`` starts probing ``digits`` with uniformly random images (before the drift:
  once every client's inputs are off the reference, the probing detector waits for the model to
  come back, and only the per-client low-confidence chart can still single mallory out);
- 45%: the ``digits`` inputs drift (a brightness shift and blur-like noise): confidence falls;
- 60%: ``cancer`` is released as a new version, 1.6x slower than the one it replaces;
- throughout: one message in 400 is malformed (bad JSON, wrong types, NaN, too many features).
"""

from __future__ import annotations

import json
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np


@dataclass
class Incident:
    name: str
    at: float  # fraction of the run
    started: bool = False


@dataclass
class TrafficPlan:
    duration: float
    rate: float
    incidents: list[Incident] = field(default_factory=lambda: [
        Incident("sponge sends costly queries to digits", 0.20),
        Incident("mallory probes digits", 0.30),
        Incident("digits input drift", 0.45),
        Incident("cancer release 2024-12, 1.6x slower", 0.60),
    ])


class ServedModel:
    """A trained model plus the held-out inputs benign clients send."""

    def __init__(self, name: str, version: str, model, inputs: np.ndarray, low: float, high: float,
                 latency_ms: float):
        self.name, self.version, self.model = name, version, model
        self.inputs, self.low, self.high = inputs, low, high
        self.latency_ms = latency_ms


def train_models(seed: int = 0) -> dict[str, ServedModel]:
    from sklearn.datasets import load_breast_cancer, load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    digits = load_digits()
    x_train, x_test, y_train, _ = train_test_split(digits.data, digits.target, test_size=0.5, random_state=seed)
    digits_model = LogisticRegression(max_iter=2000).fit(x_train / 16.0, y_train)
    cancer = load_breast_cancer()
    c_train, c_test, cy_train, _ = train_test_split(cancer.data, cancer.target, test_size=0.5, random_state=seed)
    cancer_model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(c_train, cy_train)
    return {
        "digits": ServedModel("digits", "v3", digits_model, x_test / 16.0, 0.0, 1.0, 12.0),
        "cancer": ServedModel("cancer", "2024-11", cancer_model, c_test, float(cancer.data.min()),
                              float(cancer.data.max()), 25.0),
    }


TICK = 0.05  # seconds of traffic per step of the generator

MALFORMED = [
    b"this is not JSON",
    b'{"event_id": "m1", "ts": "yesterday", "model": "digits"}',
    b'{"event_id": "m2", "ts": 1, "model": "digits", "latency_ms": "fast"}',
    b'{"event_id": "m3", "ts": NaN, "model": "digits"}',
    b'{"ts": 1, "model": "cancer"}',
    b"[1, 2, 3]",
]


class TrafficGenerator:
    """Produces events to Kafka (or any ``send(key, value)``) at a steady rate from a thread."""

    def __init__(self, send: Callable[[bytes | None, bytes], None], plan: TrafficPlan,
                 on_incident: Callable[[str], None] = lambda name: None, seed: int = 1):
        self.send = send
        self.plan = plan
        self.on_incident = on_incident
        self.rng = np.random.default_rng(seed)
        self.random = random.Random(seed)
        self.models = train_models(seed)
        self.clients = [f"client-{i:03d}" for i in range(40)]
        self.sent = 0
        self.malformed = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="traffic", daemon=True)
        self._seq = 0

    def start(self) -> "TrafficGenerator":
        self.thread.start()
        return self

    def _active(self, name: str) -> bool:
        return any(i.name == name and i.started for i in self.plan.incidents)

    def _run(self) -> None:
        """Ticks of 50 ms on the wall clock. A thread starved of CPU sends the ticks it owes at once,
        each with its own time: the traffic (its rate and the incidents' share of it) stays the plan's
        whatever the machine's load."""
        start, wall = time.monotonic(), time.time()
        ticks, sent = int(self.plan.duration / TICK), 0
        while not self.stop.is_set() and sent < ticks:
            due = min(ticks, int((time.monotonic() - start) / TICK) + 1)
            for n in range(sent, due):
                self._tick(n, wall)
            sent = due
            self.stop.wait(max(0.0, start + sent * TICK - time.monotonic()))

    def simulate(self, start: float = 1_764_230_400.0) -> None:
        """The same plan in simulated time, as fast as ``send`` takes it: event times run from ``start``
        (2025-11-27T08:00:00Z) in ticks of 50 ms. The same seed gives the same events, for files
        to replay (``inferwatch demo --write FILE``)."""
        for n in range(int(self.plan.duration / TICK)):
            self._tick(n, start)

    def _tick(self, n: int, start: float) -> None:
        """The ``n``th tick's events, timed ``start + n x TICK``, after starting the incidents due."""
        elapsed = n * TICK
        for incident in self.plan.incidents:
            if not incident.started and elapsed >= incident.at * self.plan.duration:
                incident.started = True
                self.on_incident(incident.name)
        self._emit(max(1, int(self.plan.rate * TICK)), start + elapsed)

    def _emit(self, n: int, now: float) -> None:
        n_digits = n * 2 // 3
        self._batch(self.models["digits"], n_digits, now)
        self._batch(self.models["cancer"], n - n_digits, now)
        if self.random.random() < n / 400:
            self.send(None, self.random.choice(MALFORMED))
            self.malformed += 1

    def _batch(self, served: ServedModel, n: int, now: float) -> None:
        if n <= 0:
            return
        rng = self.rng
        idx = rng.integers(0, len(served.inputs), n)
        x = served.inputs[idx].copy()
        clients = [self.clients[i] for i in rng.integers(0, len(self.clients), n)]
        if served.name == "digits":
            x = np.clip(x + rng.normal(0, 0.03, x.shape), 0, 1)  # benign augmentation: sensor noise
            if self._active("digits input drift"):
                x = np.clip(0.35 + 0.5 * x + rng.normal(0, 0.25, x.shape), 0, 1)
            if self._active("mallory probes digits"):
                k = max(1, n // 5)
                x[:k] = rng.uniform(0, 1, (k, x.shape[1]))
                clients[:k] = ["mallory"] * k
            if self._active("sponge sends costly queries to digits") and self.random.random() < n / 50:
                clients[-1] = "sponge"
        else:
            x = x * rng.normal(1.0, 0.01, x.shape)
        proba = served.model.predict_proba(x)
        labels = served.model.classes_[proba.argmax(axis=1)]
        latency = rng.lognormal(np.log(served.latency_ms), 0.25, n)
        version = served.version
        if served.name == "cancer" and self._active("cancer release 2024-12, 1.6x slower"):
            latency *= 1.6
            version = "2024-12"
        latency[[c == "sponge" for c in clients]] *= 8
        cpu = latency * rng.uniform(0.7, 0.9, n)
        for i in range(n):
            self._seq += 1
            client = clients[i]
            event = {
                "event_id": f"{served.name}-{self._seq}",
                "ts": round(now, 6),
                "model": served.name,
                "model_version": version,
                "client_id": client,
                "features": np.round(x[i], 4).tolist(),
                "prediction": int(labels[i]),
                "probabilities": np.round(proba[i], 5).tolist(),
                "latency_ms": round(float(latency[i]), 3),
                "cpu_ms": round(float(cpu[i]), 3),
                "input_bytes": int(x.shape[1] * 8),
                "status": "ok",
            }
            self.send(client.encode(), json.dumps(event).encode())
            self.sent += 1
