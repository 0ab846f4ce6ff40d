"""The confidence detector: a Bernoulli CUSUM whose false-alarm rate is set by its ERT, on the outputs
of a real scikit-learn model (logistic regression on the digits images)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

from monitor.detectors import ModelBatch
from monitor.detectors import cusum
from monitor.detectors.confidence import LowConfidence
from monitor.events import EventDecoder


@pytest.fixture(scope="module")
def digits_model():
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, _ = train_test_split(x / 16.0, y, test_size=0.5, random_state=0)
    return LogisticRegression(max_iter=2000).fit(x_train, y_train), x_test


class Rec:
    def __init__(self, offset: int):
        self.topic, self.partition, self.offset = "logs", 0, offset


def batch_of(probabilities: np.ndarray, clients: list[str], start: int = 0) -> ModelBatch:
    """Events as the decoder makes them, carrying the model's real probabilities."""
    decoder = EventDecoder()
    events = [decoder.decode(
        b'{"event_id": "e%d", "ts": %f, "model": "digits", "client_id": "%s", "probabilities": [%s]}'
        % (start + i, 1_764_000_000 + (start + i) * 0.01, clients[i].encode(),
           ",".join(f"{p:.6f}" for p in row).encode()))
        for i, row in enumerate(probabilities)]
    return ModelBatch("digits", events, [Rec(start + i) for i in range(len(events))])


def benign(model, x, rng, n):
    rows = x[rng.integers(0, len(x), n)]
    return model.predict_proba(np.clip(rows + rng.normal(0, 0.03, rows.shape), 0, 1))


# -- the chart and its calibration ----------------------------------------------------------------

def test_the_vectorised_cusum_is_the_sequential_recursion():
    rng = np.random.default_rng(5)
    p0, p1 = 0.05, 0.2
    h = cusum.threshold_for_ert(p0, p1, 200)
    marks = (rng.random(20_000) < 0.08).astype(np.int8)
    a, b, step = cusum._grid(p0, p1)
    expected, s = [], 0.0
    for i, m in enumerate(marks):
        s = max(0.0, s + (a * step if m else -b * step))
        if s > h:
            expected.append(i)
            s = 0.0
    alarms, end = cusum.run(marks, p0, p1, h)
    assert alarms.tolist() == expected and end == pytest.approx(s)
    # and in pieces, carrying the statistic from batch to batch
    pieces, start, offset = [], 0.0, 0
    for chunk in np.array_split(marks, 37):
        found, start = cusum.run(chunk, p0, p1, h, start)
        pieces.extend((found + offset).tolist())
        offset += len(chunk)
    assert pieces == expected


@pytest.mark.parametrize("p0, shift, ert", [(0.05, 3.0, 300), (0.02, 4.0, 500)])
def test_run_length_without_change_matches_the_ert(p0, shift, ert):
    rng = np.random.default_rng(int(ert))
    h = cusum.threshold_for_ert(p0, shift * p0, ert)
    runs = []
    for _ in range(400):
        marks = (rng.random(ert * 30) < p0).astype(np.int8)
        alarms, _ = cusum.run(marks, p0, shift * p0, h)
        runs.append(alarms[0] + 1)
    runs = np.asarray(runs, dtype=float)
    assert abs(runs.mean() / ert - 1) < 0.3, runs.mean()
    # a run length without change is close to geometric: sd close to the mean, P(RL <= mean) close to 1-1/e
    assert 0.75 < runs.std() / runs.mean() < 1.2
    assert abs(np.mean(runs <= runs.mean()) - (1 - np.exp(-1))) < 0.08


def test_calibration_at_a_large_ert_takes_a_fraction_of_a_second():
    import time

    cusum.threshold_for_ert.cache_clear()
    start = time.perf_counter()
    h = cusum.threshold_for_ert(0.05, 0.15, 100_000)
    took = time.perf_counter() - start
    assert cusum.average_run_length(0.05, 0.15, h) >= 100_000
    assert took < 10, took  # generous: seconds on a loaded 2-core machine, not minutes of simulation


# -- the detector on a real model -----------------------------------------------------------------

def test_real_model_run_length_without_change_matches_the_ert(digits_model):
    """200 streams resampled from the model's own benign outputs: no change, so every alarm is a false
    one, and their mean run length must agree with the ERT."""
    model, x = digits_model
    rng = np.random.default_rng(11)
    reference = benign(model, x, rng, 20_000)
    ert, runs = 400, []
    for r in range(200):
        d = LowConfidence("digits", LowConfidence.Params(ert=ert, reference_size=5000, cooldown=0,
                                                         client_ert=1e9))
        d.update(batch_of(reference[:5000], ["c"] * 5000))
        stream = reference[5000 + rng.integers(0, 15_000, ert * 12)]
        alarms, _ = cusum.run((stream.max(axis=1) < d.bound).astype(np.int8), d.p0, d.params.shift * d.p0, d.h)
        runs.append(alarms[0] + 1 if len(alarms) else ert * 12)
    assert abs(np.mean(runs) / ert - 1) < 0.3, np.mean(runs)


def test_a_surge_of_low_confidence_is_detected_and_a_clean_stream_is_not(digits_model):
    model, x = digits_model
    rng = np.random.default_rng(2)
    d = LowConfidence("digits", LowConfidence.Params(ert=100_000, client_ert=1e7, reference_size=2000))
    clients = [f"c{i}" for i in range(20)]
    clean = benign(model, x, rng, 20_000)
    found = []
    for start in range(0, 20_000, 2000):
        found += d.update(batch_of(clean[start:start + 2000], [clients[i % 20] for i in range(2000)], start))
    assert found == [], [f.summary for f in found]

    # inputs washed out (contrast halved, noise added): the model becomes unsure
    rows = x[rng.integers(0, len(x), 2000)]
    washed = model.predict_proba(np.clip(0.3 + 0.4 * rows + rng.normal(0, 0.2, rows.shape), 0, 1))
    found = d.update(batch_of(washed, [clients[i % 20] for i in range(2000)], 20_000))
    for start in range(22_000, 30_000, 2000):  # the surge goes on
        rows = x[rng.integers(0, len(x), 2000)]
        more = model.predict_proba(np.clip(0.3 + 0.4 * rows + rng.normal(0, 0.2, rows.shape), 0, 1))
        found += d.update(batch_of(more, [clients[i % 20] for i in range(2000)], start))
    model_level = [f for f in found if f.client_id is None]
    assert model_level and model_level[0].kind == "low_confidence_spike"
    # every client is as unsure as the model: the clients are compared with the model's recent rate,
    # so the model's alarm is not repeated once per client
    assert len([f for f in found if f.client_id]) <= 2, [f.summary for f in found if f.client_id]
    assert model_level[0].evidence["observed_rate"] > 2 * model_level[0].evidence["reference_rate"]
    assert "AML.T0015" in model_level[0].atlas


def test_one_client_sending_random_inputs_is_singled_out(digits_model):
    model, x = digits_model
    rng = np.random.default_rng(4)
    d = LowConfidence("digits", LowConfidence.Params(ert=1e9, client_ert=100_000, reference_size=2000))
    d.update(batch_of(benign(model, x, rng, 2000), ["warmup"] * 2000))
    found = []
    for start in range(2000, 40_000, 2000):
        probs = benign(model, x, rng, 2000)
        clients = [f"c{i % 50}" for i in range(2000)]
        for i in range(0, 2000, 25):  # one request in 25 is mallory's, a uniformly random image
            probs[i] = model.predict_proba(rng.uniform(0, 1, (1, 64)))[0]
            clients[i] = "mallory"
        found += d.update(batch_of(probs, clients, start))
    flagged = {f.client_id for f in found}
    assert flagged == {"mallory"}, [f.summary for f in found]
    assert d.client_figures()["mallory"][1] > 0.5 * d.client_figures()["mallory"][0]


def test_a_flood_of_new_client_ids_keeps_memory_bounded_and_keeps_the_suspect(digits_model):
    model, x = digits_model
    rng = np.random.default_rng(6)
    d = LowConfidence("digits", LowConfidence.Params(ert=1e9, client_ert=1e6, reference_size=2000,
                                                     max_clients=500))
    d.update(batch_of(benign(model, x, rng, 2000), ["warmup"] * 2000))
    mixed = benign(model, x, rng, 2000)
    mixed[:14] = model.predict_proba(rng.uniform(0, 1, (14, 64)))  # the suspect: half-way to its alarm
    d.update(batch_of(mixed, ["suspect"] * 14 + [f"w{i % 30}" for i in range(1986)], 2000))
    assert d.client_h > d.clients["suspect"].statistic > d.client_h / 2
    for start in range(4000, 24_000, 2000):  # 20,000 one-off client ids
        d.update(batch_of(benign(model, x, rng, 2000), [f"sybil-{start + i}" for i in range(2000)], start))
        assert len(d.clients) <= 500 + 2000
    assert len(d.clients) <= 500 and "suspect" in d.clients


def test_the_per_client_cusums_of_a_batch_equal_one_sequential_cusum_per_client():
    """The vectorised per-client update against the plain recursion, on interleaved random clients."""
    rng = np.random.default_rng(9)
    d = LowConfidence("m", LowConfidence.Params(ert=1e9, client_ert=300, reference_size=100,
                                               min_client_events=1, cooldown=0))
    d.update(batch_of(np.tile([[0.9, 0.1]], (100, 1)) + rng.normal(0, 0.01, (100, 2)), ["w"] * 100))
    expected_stat: dict[str, float] = {}
    expected_alarms = []
    offset = 100
    for _ in range(6):
        n = 3000
        clients = [f"c{i}" for i in rng.integers(0, 40, n)]
        unsure = rng.random(n) < np.where(np.array([c in ("c3", "c7") for c in clients]), 0.5, 0.05)
        probs = np.where(unsure[:, None], [[0.55, 0.45]], [[0.95, 0.05]])
        found = d.update(batch_of(probs, clients, offset))
        # the per-client chart of this batch: compared with the baseline the detector used for it
        a, b, step = cusum._grid(d.client_base, d.params.shift * d.client_base)
        marks = (probs.max(axis=1) < d.bound)
        for i, (c, m) in enumerate(zip(clients, marks)):
            s = max(0.0, expected_stat.get(c, 0.0) + (a * step if m else -b * step))
            if s > d.client_h:
                expected_alarms.append((c, offset + i))
                s = 0.0
            expected_stat[c] = s
        offset += n
        got = sorted((f.client_id, f.source["offset"]) for f in found if f.client_id)
        assert got == sorted(a_ for a_ in expected_alarms if a_[1] >= offset - n)
    for c, s in expected_stat.items():
        assert d.clients[c].statistic == pytest.approx(s, abs=1e-9)
    assert {c for c, _ in expected_alarms} >= {"c3", "c7"}
