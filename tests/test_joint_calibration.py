"""The features' joint calibration: correlated features count for fewer charts, measured on the
reference's own rows, so that the detector alarms once per ERT where the union bound made it rarer.
The data is scikit-learn's breast-cancer table (30 features, groups of them correlated at 0.99)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer

from monitor.detectors import joint_calibration
from monitor.detectors.drift import Drift, chart_set
from tests.conftest import features_batch

FAMILY = tuple((c.score, c.sign, c.k) for c in chart_set([0.5, 1.0, 2.0], 1.5))


@pytest.fixture(scope="module")
def cancer() -> np.ndarray:
    return np.asarray(load_breast_cancer().data, dtype=np.float64)


def test_copies_of_one_feature_count_as_one_and_independent_features_count_in_full():
    """Ten copies of one column alarm together: the group counts for about one column's charts.
    Ten independent columns count for about ten (the union bound with a column's own overlap)."""
    rng = np.random.default_rng(1)
    one = rng.normal(size=(1023, 1))
    ert = 500.0
    copies = joint_calibration.joint_count(joint_calibration.ReferenceNull(np.repeat(one, 10, axis=1)),
                                           FAMILY, ert, others=0.0)
    alone = joint_calibration.joint_count(joint_calibration.ReferenceNull(one), FAMILY, ert, others=0.0)
    independent = joint_calibration.joint_count(joint_calibration.ReferenceNull(rng.normal(size=(1023, 10))),
                                                FAMILY, ert, others=0.0)
    union = joint_calibration.independent_count(FAMILY, 10, independent.arl)
    print(f"copies {copies.charts:.1f}, one column {alone.charts:.1f}, independent {independent.charts:.1f} "
          f"(union bound {union:.1f})")
    assert copies.charts == pytest.approx(alone.charts, rel=0.25)
    assert independent.charts == pytest.approx(union, rel=0.25)
    assert copies.arl == pytest.approx(copies.charts * ert)  # no other charts: A = ert x count


def test_a_simulation_beyond_the_budget_is_extrapolated_towards_the_union_bound(cancer):
    """With too small a budget the group is simulated at a shorter run length and its overlap carried
    to the target thinned as a column's own: a count between the direct simulation's and the union
    bound's (fewer false alarms than asked, never more than the direct one allows)."""
    rng = np.random.default_rng(2)
    null = joint_calibration.ReferenceNull(cancer[rng.integers(0, len(cancer), 1023)])
    direct = joint_calibration.joint_count(null, FAMILY, 2000.0, others=4.0, budget=1e8)
    cheap = joint_calibration.joint_count(null, FAMILY, 2000.0, others=4.0, budget=128 * 30 * 4 * 250)
    union = joint_calibration.independent_count(FAMILY, 30, cheap.arl)
    print(f"direct {direct.charts:.1f}, extrapolated from {cheap.simulated_at:.0f} events {cheap.charts:.1f}, "
          f"union bound {union:.1f}")
    assert not direct.extrapolated and cheap.extrapolated and cheap.simulated_at == pytest.approx(250)
    assert 0.9 * direct.charts < cheap.charts < union


def test_a_reference_is_simulated_once(cancer):
    """The count is cached by the reference's digest: a second detector on the same reference (a
    model rebuilt, a replay) gets the same thresholds without simulating again."""
    reference = cancer[np.random.default_rng(3).integers(0, len(cancer), 1023)]
    params = Drift.Params(ert=1000, reference_size=1023, streams=[], classes=False, labels=False, sample_every=1)
    first, second = Drift("m", params), Drift("m", params)
    first.update(features_batch(reference))
    simulated = len(joint_calibration._CACHE)
    second.update(features_batch(reference))
    assert len(joint_calibration._CACHE) == simulated
    assert [c.h for c in first.groups["features"].charts] == [c.h for c in second.groups["features"].charts]
    described = first.describe()
    assert described["joint_calibration"]["charts"] < described["joint_calibration"]["union_charts"]
    bulk = described["bulk_charts"]["features"]  # long-tailed features (f13: area error) on their long side
    assert "f13" in bulk["mean up (2 sd, bulk)"] and bulk["mean down (2 sd, bulk)"] == []


def first_alarms(cancer: np.ndarray, calibration: str, ert: float, runs: int, seed: int,
                 per_reference: int = 4) -> tuple[float, np.ndarray]:
    """Each run: a stream drawn apart from the 569 rows (one law, no change) up to the detector's first
    alarm or 10 x ERT events; ``per_reference`` runs share a reference (also drawn from the rows), each
    from the detector as it was when armed (a reference's calibration is what costs: 4 streams a
    reference keep the test short). (mean run length: the events watched over the alarms, the first
    alarms with censored runs at the horizon)."""
    rng = np.random.default_rng(seed)
    horizon, first = int(10 * ert), []
    params = Drift.Params(ert=ert, reference_size=1023, streams=[], classes=False, labels=False, sample_every=1,
                          calibration=calibration)
    for _ in range(runs // per_reference):
        armed = Drift("m", params)
        armed.update(features_batch(cancer[rng.integers(0, len(cancer), 1023)]))
        saved = pickle.dumps(armed)
        for _ in range(per_reference):
            d, at = pickle.loads(saved), horizon
            for start in range(0, horizon, 100):
                found = d.update(features_batch(cancer[rng.integers(0, len(cancer), 100)], start))
                if found:
                    at = min(int(c["at_event"]) for f in found for c in f.evidence["columns"]) + 1
                    break
            first.append(at)
    first = np.asarray(first, dtype=float)
    return first.sum() / max(1, int((first < horizon).sum())), first


def test_joint_calibration_hits_the_ert_on_correlated_features_where_the_union_bound_did_not(cancer):
    """200 runs per calibration at ERT 300 (50 references). The union bound over 30 correlated features makes false
    alarms rarer than asked (beyond +30%); the joint count brings them to the ERT, with first alarms
    still close to geometric."""
    ert, runs = 300.0, 200
    union, _ = first_alarms(cancer, "union", ert, runs, seed=5)
    joint, first = first_alarms(cancer, "joint", ert, runs, seed=5)
    print(f"mean run length: union bound {union:.0f}, joint {joint:.0f} (ERT {ert:.0f}); first alarm "
          f"P(RL <= mean) {np.mean(first <= first.mean()):.3f}, sd/mean {first.std() / first.mean():.2f}")
    assert union > 1.3 * ert
    assert joint == pytest.approx(ert, rel=0.30)
    assert np.mean(first <= first.mean()) == pytest.approx(1 - np.exp(-1), abs=0.08)
    assert 0.6 < first.std() / first.mean() < 1.3
