"""The `alibi` detector on real alibi-detect detectors: a CVMDriftOnline and a KSDrift fitted on the
breast-cancer data of scikit-learn, saved with `save_detector`, and run by `inferwatch run --input` on
inference logs whose features shift half-way. Runs in `.venv-alibi` (`make test-alibi`): alibi-detect
0.13 needs numpy<2, which the main environment does not have."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

pytest.importorskip("alibi_detect")
from alibi_detect.cd import CVMDriftOnline, KSDrift  # noqa: E402
from alibi_detect.saving import save_detector  # noqa: E402
from sklearn.datasets import load_breast_cancer  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CLEAN = 200  # events before the shift
SHIFTED = 200
SHIFTED_FEATURE = "mean texture"


class Data:
    """Four standardized breast-cancer features, columns in the sorted order of their names (how the
    monitor lays out object-form features), split into a reference and a held-out pool."""

    def __init__(self) -> None:
        cancer = load_breast_cancer()
        names = [str(n) for n in cancer.feature_names[:4]]
        order = np.argsort(names)
        self.names = [names[i] for i in order]
        x = cancer.data[:, :4][:, order]
        x = (x - x.mean(axis=0)) / x.std(axis=0)
        rng = np.random.default_rng(7)
        x = x[rng.permutation(len(x))]
        self.reference, held_out = x[:250], x[250:]
        clean = held_out[rng.integers(0, len(held_out), CLEAN)]
        shifted = held_out[rng.integers(0, len(held_out), SHIFTED)].copy()
        shifted[:, self.names.index(SHIFTED_FEATURE)] += 1.5  # 1.5 standard deviations
        self.stream = np.vstack([clean, shifted])

    def events(self, model: str = "cancer") -> list[dict[str, Any]]:
        return [{"event_id": f"e{i}", "ts": 1_764_000_000 + i * 0.01, "model": model,
                 "features": dict(zip(self.names, map(float, row))), "confidence": 0.9}
                for i, row in enumerate(self.stream)]


@pytest.fixture(scope="module")
def data() -> Data:
    return Data()


@pytest.fixture(scope="module")
def cvm_online(data, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("alibi") / "cvm-online"
    detector = CVMDriftOnline(data.reference, ert=1000, window_sizes=[20, 40], n_bootstraps=10_000, verbose=False)
    save_detector(detector, str(path))
    return path


def write_events(path: Path, events: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(e) + "\n" for e in events))
    return path


def write_config(where: Path, **alibi: Any) -> Path:
    config = {"detectors": {"alibi": alibi},  # only this detector
              "kafka": {"poll": {"max_records": 70}},  # batches smaller than a test window
              "logging": {"level": "WARNING"}}
    where.write_text(yaml.safe_dump(config))
    return where


def inferwatch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "monitor", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def run(tmp_path: Path, config: Path, events: Path, state: Path | None = None) -> list[dict[str, Any]]:
    out = tmp_path / f"detections-{events.stem}.jsonl"
    result = inferwatch("run", "-c", str(config), "--input", str(events), "--output", str(out),
                        "--state-dir", str(state or tmp_path / "state"))
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in out.read_text().splitlines() if line.strip()]


def line_of(event_index: int) -> int:
    return event_index + 1  # a file source's offset is the line number, from 1


def test_online_detector_reports_the_shifted_feature_soon_after_the_shift(tmp_path, data, cvm_online):
    config = write_config(tmp_path / "inferwatch.yaml", path=str(cvm_online), cooldown=1000)
    found = run(tmp_path, config, write_events(tmp_path / "events.jsonl", data.events()))
    assert len(found) == 1, found  # no false alarm before the shift; quiet for the cooldown after it
    d = found[0]
    assert (d["detector"], d["kind"], d["model"]) == ("alibi", "feature_drift", "cancer")
    assert line_of(CLEAN) <= d["source"]["offset"] < line_of(CLEAN + 60)
    assert d["evidence"]["features"] == [SHIFTED_FEATURE]
    assert d["evidence"]["alibi_detector"] == "CVMDriftOnline" and d["evidence"]["online"] is True
    assert d["score"] > d["threshold"] > 0
    assert "CVMDriftOnline" in d["summary"] and SHIFTED_FEATURE in d["summary"]
    result = d["evidence"]["result"]
    assert result["is_drift"] == 1 and len(result["test_stat"]) == 2  # the two window sizes
    assert d["atlas"] == ["AML.T0015"]


def test_a_restart_keeps_the_online_detectors_windows(tmp_path, data, cvm_online):
    # The first run stops 8 events into the shift; the second run goes on from its checkpoint. A fresh
    # detector could not alarm before its smallest window (20 events) is full.
    config = write_config(tmp_path / "inferwatch.yaml", path=str(cvm_online))
    events = data.events()
    state = tmp_path / "state"
    assert run(tmp_path, config, write_events(tmp_path / "first.jsonl", events[:CLEAN + 8]), state) == []
    found = run(tmp_path, config, write_events(tmp_path / "second.jsonl", events[CLEAN + 8:]), state)
    assert len(found) == 1, found
    assert found[0]["source"]["offset"] < 20
    assert found[0]["evidence"]["events"] > 20  # its run started before the restart


def test_offline_detector_tests_whole_windows_across_batches(tmp_path, data):
    saved = tmp_path / "ks"
    save_detector(KSDrift(data.reference, p_val=0.01), str(saved))
    config = write_config(tmp_path / "inferwatch.yaml", path=str(saved), window=100, cooldown=150)
    found = run(tmp_path, config, write_events(tmp_path / "events.jsonl", data.events()))
    # windows of lines 1-100, 101-200 are clean; 201-300 is the first shifted one, then 150 events of
    # quiet, and lines 451-500 do not fill a window
    assert [d["source"]["offset"] for d in found] == [line_of(CLEAN + 99)], found
    d = found[0]
    assert (d["detector"], d["kind"], d["evidence"]["features"]) == ("alibi", "feature_drift", [SHIFTED_FEATURE])
    assert d["evidence"]["threshold_on"] == "p_value" and d["threshold"] == pytest.approx(0.01 / 4)
    assert min(d["evidence"]["result"]["p_val"]) < d["threshold"]
    assert d["evidence"]["window"] == [pytest.approx(1_764_000_000 + CLEAN * 0.01),
                                       pytest.approx(1_764_000_000 + (CLEAN + 99) * 0.01)]


def test_confidence_input_reports_prediction_drift(tmp_path, data):
    rng = np.random.default_rng(3)
    saved = tmp_path / "ks-confidence"
    save_detector(KSDrift(rng.beta(12, 1, size=(500, 1)), p_val=0.01), str(saved))
    events = data.events()
    for i, e in enumerate(events):
        e["confidence"] = float(rng.beta(12, 1) if i < CLEAN else rng.beta(4, 2))
    config = write_config(tmp_path / "inferwatch.yaml", path=str(saved), input="confidence", window=100)
    found = run(tmp_path, config, write_events(tmp_path / "events.jsonl", events))
    assert [(d["kind"], d["source"]["offset"]) for d in found] == [("prediction_drift", line_of(CLEAN + 99))]
    assert "confidence stream" in found[0]["summary"]


def test_a_missing_path_exits_2_naming_it(tmp_path):
    missing = tmp_path / "no-such-detector"
    config = write_config(tmp_path / "inferwatch.yaml", path=str(missing))
    result = inferwatch("check", "-c", str(config))
    assert result.returncode == 2, result.stderr
    assert f"$.detectors.alibi.path: {missing}: no such directory" in result.stderr


def test_a_directory_without_a_saved_detector_exits_2(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = inferwatch("check", "-c", str(write_config(tmp_path / "inferwatch.yaml", path=str(empty))))
    assert result.returncode == 2, result.stderr
    assert f"{empty}: not a saved alibi-detect detector" in result.stderr


def test_check_loads_the_saved_detector(tmp_path, cvm_online):
    result = inferwatch("check", "-c", str(write_config(tmp_path / "inferwatch.yaml", path=str(cvm_online))))
    assert result.returncode == 0, result.stderr
    assert "detectors: alibi" in result.stdout
