"""A user's saved alibi-detect drift detector, run on a model's stream as one more detector.

The detector is the directory ``alibi_detect.saving.save_detector`` wrote (a ``config.toml`` and the
reference data), loaded with ``alibi_detect.saving.load_detector``. It watches the model's feature
vectors (``input: features``) or its confidence (``input: confidence``, a one-column stream):

- an online detector (``CVMDriftOnline``, ``FETDriftOnline``, ``MMDDriftOnline``, ``LSDDDriftOnline``:
  thresholds calibrated to an expected run time, ERT) is fed event by event, as its ``predict(x_t)``
  asks; after a drift it is ``reset_state()`` and the stream is quiet for ``cooldown`` events;
- an offline detector (``KSDrift``, ``CVMDrift``, ``MMDDrift``, ``TabularDrift``, ...) tests
  non-overlapping windows of ``window`` events (the window in progress is kept across batches), and
  after a drift the next ``cooldown`` events are not tested.

alibi-detect 0.13 is under the Business Source License 1.1 and pins numpy<2 (hence river<0.24), so it
is an optional extra (``pip install 'inferwatch[alibi]'``) and is imported only when a config names this
detector. Its online detectors cost about half a millisecond per event in Python: on a busy stream, an
offline detector on windows is the affordable choice.

Checkpoints keep the counters, the window in progress and, for the numpy-based online detectors, their
online state (``online_state_keys``: time ``t`` and test windows); other backends (torch, TensorFlow)
restart from ``reset_state()`` after a restart, so their time counter starts again at 0.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from pathlib import Path
from typing import Any, ClassVar, Literal

import msgspec
import numpy as np

from monitor.detections import Detection, make_detection
from monitor.detectors import Detector, ModelBatch
from monitor.errors import ConfigError

log = logging.getLogger("inferwatch.detectors.alibi")

INSTALL = ("pip install 'inferwatch[alibi]' (alibi-detect is under the Business Source License 1.1 and "
           "pins numpy<2, hence river<0.24: install it in an environment of its own)")
SAVED_FILES = ("config.toml", "meta.dill", "meta.pickle")  # what save_detector writes (current, legacy)
NEEDS_CONTEXT = {"ContextMMDDrift"}  # predict(x, c): the stream has no context to give it
EVIDENCE_MAX_ITEMS = 1024  # a result array larger than this is reported by its shape only
HISTORY_KEEP = 1  # online detectors append every test statistic to a history; they read only its last row

# A detector Params.check() loaded at config load, handed to the first AlibiDetector built on that
# path, so that checking a config and building the detector load (and calibrate) it once, not twice.
_checked: dict[str, Any] = {}


def _alibi_saving() -> Any:
    """``alibi_detect.saving``, imported on first use (about 3 s, and nothing else needs it)."""
    # alibi-detect imports transformers, which warns on every start that it has no torch or TensorFlow
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        import alibi_detect.saving as saving
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] == "alibi_detect":
            raise ConfigError(f"alibi-detect is not installed: {INSTALL}") from None
        raise ConfigError(f"alibi-detect is installed but does not import ({exc}): {INSTALL}") from None
    except Exception as exc:  # numpy 2 under alibi-detect 0.13 fails with errors of several types
        raise ConfigError(f"alibi-detect is installed but does not import ({type(exc).__name__}: {exc}); "
                          f"it needs numpy<2: {INSTALL}") from None
    return saving


def load_saved(path: str) -> Any:
    """The drift detector saved at ``path``; ConfigError naming the path when it cannot be run here."""
    where = Path(path)
    if not where.is_dir():
        relative = "" if where.is_absolute() else f", relative to the working directory {os.getcwd()}"
        raise ConfigError(f"{path}: no such directory{relative} (expected the directory that "
                          "alibi_detect.saving.save_detector wrote)")
    if not any((where / name).is_file() for name in SAVED_FILES):
        raise ConfigError(f"{path}: not a saved alibi-detect detector (no {' or '.join(SAVED_FILES)} in it)")
    saving = _alibi_saving()
    try:
        detector = saving.load_detector(str(where))
    except Exception as exc:
        raise ConfigError(f"{path}: alibi-detect cannot load it: {type(exc).__name__}: {exc}") from None
    meta = getattr(detector, "meta", None) or {}
    name = meta.get("name", type(detector).__name__)
    if meta.get("detector_type") != "drift":
        raise ConfigError(f"{path}: {name} is a {meta.get('detector_type', 'non-drift')} detector; "
                          "the adapter runs drift detectors (alibi_detect.cd)")
    if name in NEEDS_CONTEXT:
        raise ConfigError(f"{path}: {name} needs a context with every batch, which the stream does not carry")
    return detector


class AlibiDetector(Detector):
    """Runs a saved alibi-detect drift detector on the features (or the confidence) of one model."""

    name: ClassVar[str] = "alibi"

    class Params(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
        path: str  # the directory alibi_detect.saving.save_detector wrote
        input: Literal["features", "confidence"] = "features"
        window: int = 500  # offline detectors: events per test (non-overlapping windows)
        cooldown: int = 1000  # events of quiet after a reported drift

        def check(self) -> tuple[str, str] | None:
            if self.window < 2:
                return "window", f"expected at least 2 events per test, got {self.window}"
            if self.cooldown < 0:
                return "cooldown", f"expected a number of events >= 0, got {self.cooldown}"
            key = str(Path(self.path).resolve())
            if key not in _checked:
                try:
                    _checked[key] = load_saved(self.path)
                except ConfigError as exc:
                    return "path", str(exc)
            return None

    def __init__(self, model: str, params: Params):
        super().__init__(model, params)
        self.seen = 0  # events of the stream (rows that have the input) seen
        self.quiet_until = 0  # in ``seen`` units
        self.alarms = 0
        self.run_start_ts: float | None = None  # online: the first event since the last reset
        self.buffer = np.empty((0, 0))  # offline: the window in progress
        self.buffer_start_ts: float | None = None
        self._load()

    def _load(self) -> None:
        """The alibi detector object: kept out of ``state()`` (torch and TensorFlow ones do not pickle)."""
        detector = _checked.pop(str(Path(self.params.path).resolve()), None) or load_saved(self.params.path)
        meta = detector.meta
        self.alibi = detector
        self.alibi_name: str = meta.get("name", type(detector).__name__)
        self.online = bool(meta.get("online", self.alibi_name.endswith("Online")))
        # the backend object that holds the online state (MMDDriftOnline and others wrap one)
        self._core = getattr(detector, "_detector", detector)
        shape = getattr(self._core, "input_shape", None)
        self.n_features: int | None = int(shape[0]) if shape and len(shape) == 1 and shape[0] else None
        x_ref = getattr(self._core, "x_ref", None)
        self._dtype = x_ref.dtype if isinstance(x_ref, np.ndarray) and x_ref.dtype.kind == "f" else np.float64

    # -- the batch -----------------------------------------------------------------------------

    def update(self, batch: ModelBatch) -> list[Detection]:
        if self.params.input == "confidence":
            values = batch.confidence
            rows = np.flatnonzero(~np.isnan(values))
            x = values[rows, None]
        else:
            matrix, mask = batch.features
            rows = np.flatnonzero(mask)
            x = matrix[rows]
        if rows.size == 0:
            return []
        if self.n_features is not None and x.shape[1] != self.n_features:
            raise ConfigError(f"detectors.alibi.path: {self.params.path}: {self.alibi_name} was saved for "
                              f"{self.n_features} features, model {self.model} sends {x.shape[1]} "
                              f"({self.params.input})")
        x = x.astype(self._dtype, copy=False)
        found = self._run_online(batch, x, rows) if self.online else self._run_windows(batch, x, rows)
        self.seen += len(rows)
        return found

    def _run_online(self, batch: ModelBatch, x: np.ndarray, rows: np.ndarray) -> list[Detection]:
        """Each event through ``predict(x_t)``: the online detectors are defined per instance."""
        found = []
        detector = self.alibi
        ts = batch.ts
        k = max(0, self.quiet_until - self.seen)
        while k < len(rows):
            if self.run_start_ts is None:
                self.run_start_ts = float(ts[rows[k]])
            data = detector.predict(x[k])["data"]
            self._trim_history()
            k += 1
            if data["is_drift"]:
                index = int(rows[k - 1])
                found.append(self._detection(batch, index, data, self.run_start_ts, int(data.get("time") or 0)))
                detector.reset_state()
                self.run_start_ts = None
                self.quiet_until = self.seen + k + self.params.cooldown
                k += self.params.cooldown
        return found

    def _trim_history(self) -> None:
        """Keep the online state bounded: alibi-detect 0.13 appends every test statistic, prediction and
        instance to arrays that grow with the stream (a copy per event), and reads only their ends
        (the last statistic, the last ``max(window_sizes)`` instances)."""
        core = self._core
        for key in ("test_stats", "drift_preds"):
            history = getattr(core, key, None)
            if history is not None and len(history) > 64:
                setattr(core, key, history[-HISTORY_KEEP:])
        xs = getattr(core, "xs", None)
        keep = getattr(core, "max_ws", None)
        if keep and isinstance(xs, np.ndarray) and len(xs) > 2 * keep + 64:
            core.xs = xs[-int(keep):]

    def _run_windows(self, batch: ModelBatch, x: np.ndarray, rows: np.ndarray) -> list[Detection]:
        """Non-overlapping windows of ``window`` events through ``predict(x)``."""
        found = []
        window = self.params.window
        ts = batch.ts
        if self.buffer.shape[1] != x.shape[1]:
            self.buffer = np.empty((0, x.shape[1]), dtype=x.dtype)
        k = max(0, self.quiet_until - self.seen)
        while k < len(rows):
            if len(self.buffer) == 0:
                self.buffer_start_ts = float(ts[rows[k]])
            take = x[k: k + window - len(self.buffer)]
            self.buffer = np.concatenate([self.buffer, take]) if len(self.buffer) else take.copy()
            k += len(take)
            if len(self.buffer) < window:
                break
            data = self.alibi.predict(self.buffer)["data"]
            self.buffer = self.buffer[:0]
            if data["is_drift"]:
                found.append(self._detection(batch, int(rows[k - 1]), data, self.buffer_start_ts, window))
                self.quiet_until = self.seen + k + self.params.cooldown
                k += self.params.cooldown
        return found

    # -- the detection -------------------------------------------------------------------------

    def _detection(self, batch: ModelBatch, index: int, data: dict[str, Any], start_ts: float | None,
                   events: int) -> Detection:
        event = batch.events[index]
        topic, partition, offset = batch.source(index)
        self.alarms += 1
        score, threshold, threshold_on, drifted = verdict(data)
        names = self._feature_names(event)
        features = [names[i] if i < len(names) else str(i) for i in drifted]
        if self.params.input == "confidence":
            what, kind = "the confidence stream", "prediction_drift"
        else:
            listed = ", ".join(features[:5]) + (f" and {len(features) - 5} more" if len(features) > 5 else "")
            what, kind = (f"feature{'s' if len(features) > 1 else ''} {listed}" if features else "the features",
                          "feature_drift")
        if self.online:
            how = (f"statistic {score:.4g} above {threshold:.4g} after {events} events since its last reset, "
                   f"ERT {data.get('ert')}")
        elif threshold_on == "p_value":
            how = f"in a window of {events} events: p-value {_min_p(data):.3g} below {threshold:.3g}"
        else:
            how = f"in a window of {events} events: statistic {score:.4g} above {threshold:.4g}"
        start = float(event.ts) if start_ts is None else start_ts
        first = max(0, index - 9)
        return make_detection(
            detector=self.name, kind=kind, model=self.model, window_start=start, ts=float(event.ts),
            subject=self.alibi_name, model_version=event.model_version, severity="warning",
            score=score, threshold=threshold,
            summary=f"{self.alibi_name} (alibi-detect) finds drift in {what} of model {self.model}: {how}",
            evidence={"alibi_detector": self.alibi_name, "path": self.params.path, "input": self.params.input,
                      "online": self.online, "features": features, "threshold_on": threshold_on,
                      "window": [start, float(event.ts)], "events": events, "result": plain(data),
                      "event_ids": [e.event_id for e in batch.events[first: index + 1]]},
            source={"topic": topic, "partition": partition, "offset": offset},
        )

    def _feature_names(self, event: Any) -> list[str]:
        """Names of the features when the event sends them as an object (laid out in sorted order)."""
        if self.params.input == "confidence":
            return ["confidence"]
        raw = getattr(event, "features", None)
        if raw is not None and bytes(raw).lstrip().startswith(b"{"):
            return sorted(msgspec.json.decode(bytes(raw)))
        return []

    # -- checkpoints and people -----------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        out = {"path": self.params.path, "alibi_name": self.alibi_name, "seen": self.seen,
               "quiet_until": self.quiet_until, "alarms": self.alarms, "run_start_ts": self.run_start_ts,
               "buffer": self.buffer, "buffer_start_ts": self.buffer_start_ts, "online_state": None}
        keys = getattr(self._core, "online_state_keys", ())
        if self.online and keys:
            online = {k: getattr(self._core, k, None) for k in keys}
            if all(isinstance(v, (np.ndarray, int, float, np.generic)) for v in online.values()):
                out["online_state"] = online  # numpy-based detectors; torch/TF tensors are not kept
        return out

    def restore(self, state: dict[str, Any]) -> None:
        if (state.get("path"), state.get("alibi_name")) != (self.params.path, self.alibi_name):
            log.info("alibi detector of %s: the saved detector changed; starting fresh", self.model)
            return
        for key in ("seen", "quiet_until", "alarms", "run_start_ts", "buffer", "buffer_start_ts"):
            setattr(self, key, state[key])
        online = state.get("online_state")
        if self.online and online and set(online) == set(getattr(self._core, "online_state_keys", ())):
            for key, value in online.items():
                setattr(self._core, key, value)
        elif self.online:
            self.alibi.reset_state()  # its test windows are not in the checkpoint: time starts again at 0
            self.run_start_ts = None

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out.update({"alibi_detector": self.alibi_name, "online": self.online, "events": self.seen,
                    "alarms": self.alarms, "quiet": self.seen < self.quiet_until,
                    "buffered": 0 if self.online else len(self.buffer)})
        return out


def verdict(data: dict[str, Any]) -> tuple[float, float, str, list[int]]:
    """(score, threshold, what the threshold is on, indices of the features found drifting) of a result.

    Online detectors give a test statistic and its threshold (univariate ones per window size and
    feature: the feature's statistic is its maximum over windows, as alibi-detect decides); offline
    multivariate ones a distance and ``distance_threshold``; offline univariate ones a distance and
    p-value per feature, and a p-value threshold after the multiple-testing correction.
    """
    if data.get("test_stat") is not None:
        stat = np.asarray(data["test_stat"], dtype=np.float64)
        thresholds = np.asarray(data["threshold"], dtype=np.float64).reshape(-1)
        if stat.ndim < 2:
            return _finite(np.nanmax(stat)), _finite(thresholds.max()), "statistic", []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # windows not yet full are NaN
            per_feature = np.nanmax(stat, axis=0)
        per_feature = np.where(np.isnan(per_feature), -np.inf, per_feature)
        limit = np.broadcast_to(thresholds if thresholds.size == per_feature.size else thresholds.max(),
                                per_feature.shape)
        top = int(np.argmax(per_feature - limit))
        return (_finite(per_feature[top]), _finite(limit[top]), "statistic",
                np.flatnonzero(per_feature > limit).tolist())
    distance = np.asarray(data.get("distance") if data.get("distance") is not None else np.nan, dtype=np.float64)
    score = _finite(np.nanmax(distance)) if distance.size else 0.0
    if data.get("distance_threshold") is not None:
        return score, _finite(np.max(data["distance_threshold"])), "statistic", []
    threshold = _finite(np.max(data.get("threshold", 0.0)))
    p_values = np.asarray(data.get("p_val") if data.get("p_val") is not None else [], dtype=np.float64)
    drifted = np.flatnonzero(p_values < threshold).tolist() if p_values.ndim == 1 else []
    return score, threshold, "p_value", drifted


def _min_p(data: dict[str, Any]) -> float:
    p = data.get("p_val")
    return float(np.min(p)) if p is not None else math.nan


def _finite(value: Any) -> float:
    value = float(value)
    return value if math.isfinite(value) else 0.0


_SKIP = object()


def plain(value: Any) -> Any:
    """A result as JSON types: numpy to lists and numbers, NaN to null; objects (kernels, models) left out."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            converted = plain(v)
            if converted is not _SKIP:
                out[str(k)] = converted
        return out
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf":
            return _SKIP
        if value.size > EVIDENCE_MAX_ITEMS:
            return {"shape": list(value.shape)}
        return plain(value.tolist())
    if isinstance(value, (list, tuple)):
        return [v for v in (plain(x) for x in value) if v is not _SKIP]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return _SKIP
