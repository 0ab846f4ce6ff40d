"""The detector interface every detector implements, the per-model batch it reads, and the registry.

A detector is built per model from config (``detectors.<name>``), sees that model's events one poll
at a time as a ``ModelBatch`` (columns as numpy arrays, built once and shared by all detectors), and
returns detections. It can export and restore its state for checkpoints. Adding a detector is one
module with a ``Detector`` subclass and one line in ``_BUILTINS``.
"""

from __future__ import annotations

import importlib
from functools import cached_property
from typing import Any, ClassVar, Sequence

import msgspec
import numpy as np

from monitor.detections import Detection
from monitor.errors import ConfigError


class ModelBatch:
    """One poll's events of one model, with lazily built numpy columns (NaN where a field is absent)."""

    __slots__ = ("model", "events", "records", "__dict__")

    def __init__(self, model: str, events: list[Any], records: list[Any]):
        self.model = model
        self.events = events
        self.records = records  # the raw record of each event (topic, partition, offset, ...)

    def source(self, index: int) -> tuple[str, int, int]:
        """(topic, partition, offset) of event ``index``."""
        r = self.records[index]
        return r.topic, r.partition, r.offset

    def __len__(self) -> int:
        return len(self.events)

    @cached_property
    def ts(self) -> np.ndarray:
        return np.fromiter((e.ts for e in self.events), dtype=np.float64, count=len(self.events))

    def column(self, name: str) -> np.ndarray:
        """A numeric field as float64, NaN where absent; cached per batch."""
        cache = self.__dict__.setdefault("_columns", {})
        if name not in cache:
            nan = float("nan")
            cache[name] = np.fromiter(
                (nan if (v := getattr(e, name)) is None else v for e in self.events),
                dtype=np.float64,
                count=len(self.events),
            )
        return cache[name]

    @cached_property
    def confidence(self) -> np.ndarray:
        """``confidence``, or max(probabilities) where only probabilities were sent (DESIGN §2)."""
        nan = float("nan")
        out = np.empty(len(self.events), dtype=np.float64)
        for i, e in enumerate(self.events):
            c = e.confidence
            if c is None:
                p = e.probabilities
                c = max(p) if p else nan
            out[i] = c
        return out

    @cached_property
    def probabilities(self) -> tuple[np.ndarray, np.ndarray]:
        """(matrix n x k of class probabilities, mask of rows that have them), k the batch's most common
        number of classes (rows with another number are masked out)."""
        rows = [e.probabilities for e in self.events]
        lengths = np.fromiter((len(r) if r else 0 for r in rows), dtype=np.int64, count=len(rows))
        n = len(rows)
        if not lengths.any():
            return np.empty((n, 0)), np.zeros(n, dtype=bool)
        k = int(np.bincount(lengths[lengths > 0]).argmax())
        mask = lengths == k
        matrix = np.full((n, k), np.nan)
        if mask.any():
            matrix[mask] = np.asarray([rows[i] for i in np.flatnonzero(mask)], dtype=np.float64)
        return matrix, mask

    @cached_property
    def features(self) -> tuple[np.ndarray, np.ndarray]:
        """(matrix n x d, mask of rows with features), parsed for the whole batch at once."""
        from monitor.events import features_matrix

        return features_matrix(self.events)

    @cached_property
    def classes(self) -> list[str | None]:
        """The predicted class of each event: a string or whole-number prediction, else the index of
        the top probability; None for neither (a regression output, no prediction)."""
        out = [class_name(e.prediction) for e in self.events]
        if any(c is None for c in out):
            probs, mask = self.probabilities
            if mask.any():
                top = probs.argmax(axis=1)
                out = [c if c is not None or not mask[i] else str(int(top[i])) for i, c in enumerate(out)]
        return out

    @cached_property
    def client_ids(self) -> list[str | None]:
        return [e.client_id for e in self.events]

    @cached_property
    def model_version(self) -> str | None:
        """The version of the newest event that names one."""
        for e in reversed(self.events):
            if e.model_version is not None:
                return e.model_version
        return None


_CLASS_NAMES: dict[Any, str | None] = {}  # prediction value -> class name, for the values seen


def class_name(value: Any) -> str | None:
    if value.__class__ is list:
        return None
    try:
        return _CLASS_NAMES[value]
    except KeyError:
        name = _class_of(value)
        if len(_CLASS_NAMES) < 100_000:  # bounded: a regression model's predictions are all different
            _CLASS_NAMES[value] = name
        return name


def _class_of(value: Any) -> str | None:
    if value is None or value.__class__ is list:
        return None
    if value.__class__ is float:
        return str(int(value)) if value.is_integer() else None
    return str(value)


class Detector:
    """Base class: an online algorithm with bounded memory over one model's stream.

    Subclasses set ``name`` (the config key), ``Params`` (a msgspec Struct checked at config load)
    and implement ``update``; ``state``/``restore`` default to the instance's ``__dict__``.
    """

    name: ClassVar[str]
    Params: ClassVar[type[msgspec.Struct]]
    reads_peers: ClassVar[bool] = False  # reads other detectors' figures (``bind``): runs after them

    def __init__(self, model: str, params: msgspec.Struct):
        self.model = model
        self.params = params

    def update(self, batch: ModelBatch) -> list[Detection]:
        raise NotImplementedError

    def client_counts(self) -> tuple[int, int] | None:
        """For a detector that keeps per-client state: (clients tracked, queries of clients it could not
        track since it started); None otherwise. Exported as metrics."""
        return None

    def evict_idle(self, now: float) -> int:
        """For a detector with per-client state: forget the clients idle for longer than its
        ``client_idle`` at event time ``now`` (the ``evict_idle_clients`` job); returns how many."""
        return 0

    def bind(self, peers: list["Detector"]) -> None:
        """Called once with the model's detectors (in the order they run), for a detector that reads
        another's figures; the detectors it reads run before it."""

    def state(self) -> dict[str, Any]:
        """Everything needed to resume after a restart (picklable)."""
        return {k: v for k, v in self.__dict__.items() if k not in ("model", "params")}

    def restore(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    # Per-client state moves with its Kafka partition (client_id is the record key): a checkpoint
    # keeps each partition's clients apart from the model's shared state, so that the replica that is
    # assigned the partition takes them over. Detectors without per-client state keep the defaults.

    def shared_state(self) -> dict[str, Any]:
        """``state()`` without the per-client state (which ``clients_state`` exports by partition);
        ``restore`` of it leaves no client tracked."""
        return self.state()

    def tracked_clients(self) -> list[str]:
        """The ids of the clients this detector keeps state for."""
        return []

    def clients_state(self, owner: dict[str, Any]) -> dict[Any, Any]:
        """The state of the tracked clients that ``owner`` maps to a key (a partition), grouped by that
        key (picklable, for ``adopt_clients``); one pass over the detector's own clients."""
        return {}

    def adopt_clients(self, saved: Any) -> None:
        """Take over clients exported by ``clients_state`` (of this or another replica's detector of
        the same model), replacing what is kept for them."""

    def forget_clients(self, ids: set[str]) -> None:
        """Drop the state of the clients among ``ids`` (their partition went to another replica)."""

    def report_figures(self, batch: ModelBatch) -> dict[str, Any]:
        """Where the detector stands after reading ``batch``, as a few numbers for the replay report's
        plots (see docs/replay-report.md); None where it is still learning. Not called live."""
        return {}

    def armed(self) -> bool:
        """False while the detector still learns its reference (it cannot alarm yet)."""
        return True

    def phase(self, events_since_detection: int | None) -> str:
        """Where the detector stands, for the model inventory: ``learning`` (its reference is not learnt
        yet), ``alarming`` (it reported a detection fewer than its ``cooldown`` of the model's events
        ago: ``events_since_detection``, None when it never did) or ``armed``."""
        if not self.armed():
            return "learning"
        cooldown = max(1, int(getattr(self.params, "cooldown", 0) or 0))
        if events_since_detection is not None and events_since_detection < cooldown:
            return "alarming"
        return "armed"

    def describe(self) -> dict[str, Any]:
        """What the detector watches and where it stands, for people (status, /api)."""
        return {"detector": self.name, "model": self.model, "params": msgspec.to_builtins(self.params)}


_BUILTINS = {
    "drift": "monitor.detectors.drift:Drift",
    "confidence": "monitor.detectors.confidence:LowConfidence",
    "alibi": "monitor.detectors.alibi_adapter:AlibiDetector",
    "probing": "monitor.detectors.probing:Probing",
    "resource": "monitor.detectors.resource:Resource",
}


class Registry:
    def __init__(self, builtins: dict[str, str]):
        self._paths = dict(builtins)
        self._classes: dict[str, type[Detector]] = {}

    def names(self) -> Sequence[str]:
        return sorted(self._paths)

    def get(self, name: str) -> type[Detector]:
        if name not in self._classes:
            module, _, attr = self._paths[name].partition(":")
            self._classes[name] = getattr(importlib.import_module(module), attr)
        return self._classes[name]

    def check_name(self, name: str, where: str) -> None:
        if name not in self._paths:
            raise ConfigError(f"{where}: unknown detector {name!r}; known: {', '.join(self.names())}")

    def check_params(self, name: str, params: Any, where: str) -> msgspec.Struct:
        self.check_name(name, where)
        if params is None:
            params = {}
        if not isinstance(params, dict):
            raise ConfigError(f"{where}: expected a mapping of parameters, got {type(params).__name__}")
        cls = self.get(name)
        try:
            parsed = msgspec.convert(params, cls.Params, strict=True)
        except msgspec.ValidationError as exc:
            from monitor.config import describe_validation_error

            text = describe_validation_error(str(exc), cls.Params)  # "$.streams[0]: Invalid enum value ...; expected one of: ..."
            raise ConfigError(f"{where}{text[1:]}") from None  # text starts with the path, "$..."
        check = getattr(parsed, "check", None)
        if check is not None:
            problem = check()  # (field, what was expected) or None
            if problem:
                field, expected = problem
                raise ConfigError(f"{where}.{field}: {expected}")
        return parsed

    def build(self, name: str, model: str, params: dict[str, Any]) -> Detector:
        parsed = self.check_params(name, params, f"detectors.{name}")
        return self.get(name)(model, parsed)


registry = Registry(_BUILTINS)
