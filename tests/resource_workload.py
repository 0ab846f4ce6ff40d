"""The resource workload: a real model-serving workload whose measured per-request resource figures feed
the tests and benchmark of the resource-anomaly detector. This module owns the workload and the
streams built from it (no detector is in here).

What is real (``record``): two scikit-learn MLPClassifiers trained on the 8x8 digits serve JSON requests
in this process, and every request is measured as it is handled.
  v1, v2  hidden layers (2048, 2048) and (2432, 2432). Their weights (34 and 48 MB) are larger than
          the last-level cache of the machine they were recorded on (32 MB), so every request streams
          them from memory: its cost is set by the model's size (v2 takes about 1.6x as long), not by
          which requests ran before it, and it dwarfs the Python overhead of a request (tens of us of
          ~1.2 ms). On a machine with a much larger cache, check the ratios printed when re-recording.
  benign  a held-out digit with sensor noise (sd 0.03), e.g. ``{"features": [64 numbers]}``.
  sponge  the same request with ``"samples": 8``. The server then runs 8 forward passes on perturbed
          copies of the input for an uncertainty estimate (test-time augmentation), so it costs about 8x.
  errors  malformed requests: the wrong number of features, a non-number, or truncated JSON. They fail
          in validation before any model runs, so their cost does not depend on the model version.
Each request's measurements: ``latency_ms`` (time.perf_counter around the whole handling, error path
included), ``cpu_ms`` (time.thread_time), ``memory_mb`` (the process RSS from /proc/self/statm, read
just after), ``input_bytes`` (the request body's length), its status, prediction and confidence.
BLAS runs on one thread and the conditions are interleaved in random order, so a hiccup of the machine
is spread over all of them. The measurements are stored in tests/data/resource_traffic.npz (with their
metadata, e.g. layer sizes and library versions, under ``meta``).

What is sampled (``events``): a stream of inference-log events is built by drawing recorded requests of
the right condition at random, with replacement. Each event keeps all the figures of the one request it
was drawn from, so latency, CPU, size and confidence stay jointly real. The clients, timestamps, version
routing and attack schedule are synthetic.

Re-record after changing the server, or to take the figures on another machine (about 45 s):
``.venv/bin/python tests/resource_workload.py --record``. Without ``--record`` it prints the sanity
figures of a few streams built from the stored recording.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits  # installed with scikit-learn

DATA = Path(__file__).resolve().parent / "data" / "resource_traffic.npz"
D = 64  # 8x8 pixels
HIDDEN = {"v1": (2048, 2048), "v2": (2432, 2432)}
SPONGE_SAMPLES = 8
MAX_SAMPLES = 64  # the server refuses more forward passes than this per request
CONDITIONS = ("v1", "v2", "sponge", "errors")
FLOAT_FIELDS = ("latency_ms", "cpu_ms", "memory_mb", "input_bytes", "confidence")
NOISE_SD = 0.03  # sensor noise of the benign clients' images
TTA_SD = 0.02  # the perturbation of the server's test-time-augmentation copies
WARMUP = 300
_PAGE_MB = os.sysconf("SC_PAGE_SIZE") / 2**20


# --------------------------------------------------------------------------------------------------
# The server


@dataclass(frozen=True, eq=False)
class Model:
    """A trained MLPClassifier's layers. ``proba`` is its forward pass (ReLU hidden layers, softmax
    output), checked against ``predict_proba`` when built. The service does not call ``predict_proba``:
    it validates a request once itself, while sklearn would re-validate the input on every pass."""

    version: str
    hidden: tuple[int, ...]
    weights: tuple[np.ndarray, ...]
    biases: tuple[np.ndarray, ...]

    def proba(self, X: np.ndarray) -> np.ndarray:
        for W, b in zip(self.weights[:-1], self.biases[:-1]):
            X = np.maximum(X @ W + b, 0.0)
        z = X @ self.weights[-1] + self.biases[-1]
        e = np.exp(z - z.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)


class DigitsServer:
    """The prediction service: ``handle`` is what the endpoint runs, ``serve`` runs and measures it."""

    def __init__(self, models: dict[str, Model], seed: int):
        self.models = models
        self._rng = np.random.default_rng(seed)  # the test-time-augmentation copies

    def handle(self, version: str, body: bytes) -> bytes:
        """Parse and validate the request, score it, build the response. Raises on a malformed request."""
        request = json.loads(body)
        x = np.asarray(request["features"], dtype=np.float64)
        if x.shape != (D,):
            raise ValueError(f"expected {D} features, got {x.size}")
        if not np.isfinite(x).all():
            raise ValueError("features must be finite numbers")
        samples = request.get("samples", 1)
        if not isinstance(samples, int) or not 1 <= samples <= MAX_SAMPLES:
            raise ValueError(f"samples must be an integer in 1..{MAX_SAMPLES}")
        model = self.models[version]
        response: dict[str, object] = {"model_version": version}
        if samples == 1:
            probs = model.proba(x[None])[0]
        else:  # one forward pass per perturbed copy, as a test-time-augmentation loop does
            passes = np.stack([
                model.proba(np.clip(x + self._rng.normal(0.0, TTA_SD, D), 0.0, 1.0)[None])[0]
                for _ in range(samples)])
            probs = passes.mean(axis=0)
            response["uncertainty"] = float(passes[:, probs.argmax()].std())
        response.update(prediction=int(probs.argmax()), confidence=float(probs.max()),
                        probabilities=[round(p, 6) for p in probs.tolist()])
        return json.dumps(response).encode()

    def serve(self, version: str, body: bytes) -> tuple[float, float, float, bool, int, float]:
        """Handle one request and measure it: (latency_ms, cpu_ms, memory_mb, error, prediction,
        confidence); prediction -1 and confidence NaN for an error."""
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            response = self.handle(version, body)
            error = False
        except (ValueError, KeyError, TypeError) as exc:  # json.JSONDecodeError is a ValueError
            response = json.dumps({"error": str(exc)}).encode()
            error = True
        latency_ms, cpu_ms = (time.perf_counter() - t0) * 1e3, (time.thread_time() - c0) * 1e3
        with open("/proc/self/statm", "rb") as f:
            memory_mb = int(f.read().split()[1]) * _PAGE_MB
        if error:
            return latency_ms, cpu_ms, memory_mb, True, -1, float("nan")
        out = json.loads(response)
        return latency_ms, cpu_ms, memory_mb, False, out["prediction"], out["confidence"]


def build_server(seed: int = 0) -> tuple[DigitsServer, np.ndarray, dict[str, float]]:
    """Train v1 and v2 on half of the digits (stratified) and return the server, the held-out images
    (scaled to [0, 1]) that clients send, and each version's accuracy on them."""
    from sklearn.datasets import load_digits
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier

    X, y = load_digits(return_X_y=True)
    x_train, x_pool, y_train, y_pool = train_test_split(
        X / 16.0, y, test_size=0.5, stratify=y, random_state=seed)  # pixel values are 0..16
    models, accuracy = {}, {}
    for version, hidden in HIDDEN.items():
        clf = MLPClassifier(hidden_layer_sizes=hidden, max_iter=5, random_state=seed)
        with warnings.catch_warnings():  # 5 epochs reach ~95% held-out accuracy: enough to serve
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf.fit(x_train, y_train)
        model = Model(version, hidden, tuple(clf.coefs_), tuple(clf.intercepts_))
        assert np.allclose(model.proba(x_pool), clf.predict_proba(x_pool))
        models[version] = model
        accuracy[version] = float((model.proba(x_pool).argmax(axis=1) == y_pool).mean())
    return DigitsServer(models, seed), x_pool, accuracy


# --------------------------------------------------------------------------------------------------
# The clients' requests


def _image(pool: np.ndarray, rng: np.random.Generator) -> list[float]:
    x = np.clip(pool[rng.integers(len(pool))] + rng.normal(0.0, NOISE_SD, D), 0.0, 1.0)
    return np.round(x, 4).tolist()


def request(condition: str, pool: np.ndarray, rng: np.random.Generator) -> tuple[str, bytes]:
    """One request of a condition: (the version it is sent to, its JSON body)."""
    if condition in ("v1", "v2"):
        return condition, json.dumps({"features": _image(pool, rng)}).encode()
    if condition == "sponge":
        return "v1", json.dumps({"features": _image(pool, rng), "samples": SPONGE_SAMPLES}).encode()
    if condition != "errors":
        raise ValueError(f"unknown condition {condition!r}")
    features = _image(pool, rng)
    kind = rng.integers(3)
    if kind == 0:  # the wrong number of features, e.g. a client on an old or new input schema
        n = int(rng.integers(16, 2 * D - 1))
        n += n >= D  # 16..127 features, never 64
        return "v1", json.dumps({"features": (features * 2)[:n]}).encode()
    if kind == 1:  # a missing value encoded as null
        features[int(rng.integers(D))] = None
        return "v1", json.dumps({"features": features}).encode()
    body = json.dumps({"features": features}).encode()  # cut short, as by a dropped connection
    return "v1", body[:int(rng.integers(1, len(body)))]


# --------------------------------------------------------------------------------------------------
# Recording


def record(n_v1: int = 8000, n_v2: int = 4000, n_sponge: int = 800, n_errors: int = 400,
           seed: int = 0) -> dict[str, np.ndarray]:
    """Run the server for real and measure every request. Keys ``"<condition>.<field>"`` for the
    conditions in CONDITIONS: float64 ``latency_ms``, ``cpu_ms``, ``memory_mb``, ``input_bytes``,
    ``confidence`` (NaN for errors), bool ``error``, int64 ``prediction`` (-1 for errors); and ``meta``,
    a 0-d string array holding JSON (layer sizes, accuracies, versions, training and recording time)."""
    import sklearn

    started = time.perf_counter()
    counts = dict(zip(CONDITIONS, (n_v1, n_v2, n_sponge, n_errors)))
    rng = np.random.default_rng(seed)
    with threadpool_limits(1):
        server, pool, accuracy = build_server(seed)
        trained = time.perf_counter()
        order = rng.permutation(np.repeat(np.arange(len(CONDITIONS)), list(counts.values())))
        warmup = rng.choice(len(CONDITIONS), size=WARMUP, p=np.array(list(counts.values())) / len(order))
        requests = [request(CONDITIONS[c], pool, rng) for c in np.concatenate([warmup, order])]
        for version, body in requests[:WARMUP]:
            server.serve(version, body)
        measured = [server.serve(version, body) for version, body in requests[WARMUP:]]

    out: dict[str, np.ndarray] = {}
    for c, condition in enumerate(CONDITIONS):
        rows = np.flatnonzero(order == c)
        latency, cpu, memory, error, prediction, confidence = zip(*(measured[i] for i in rows))
        sizes = [len(requests[WARMUP + i][1]) for i in rows]
        columns = {"latency_ms": latency, "cpu_ms": cpu, "memory_mb": memory, "input_bytes": sizes,
                   "confidence": confidence}
        for field, values in columns.items():
            out[f"{condition}.{field}"] = np.array(values, dtype=np.float64)
        out[f"{condition}.error"] = np.array(error, dtype=bool)
        out[f"{condition}.prediction"] = np.array(prediction, dtype=np.int64)
    info = {
        "hidden": {v: list(h) for v, h in HIDDEN.items()}, "sponge_samples": SPONGE_SAMPLES,
        "noise_sd": NOISE_SD, "tta_sd": TTA_SD, "warmup": WARMUP, "seed": seed, "counts": counts,
        "accuracy": accuracy, "numpy": np.__version__, "sklearn": sklearn.__version__,
        "python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
        "training_s": round(trained - started, 2), "recording_s": round(time.perf_counter() - trained, 2),
    }
    out["meta"] = np.array(json.dumps(info))
    return out


def save(traffic: dict[str, np.ndarray], path: Path = DATA) -> None:
    """Write a recording, compressed and loadable without pickle."""
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **traffic)


def load(path: Path = DATA) -> dict[str, np.ndarray]:
    """The stored recording, as ``record`` returned it."""
    with np.load(path, allow_pickle=False) as f:
        return {key: f[key] for key in f.files}


def meta(traffic: dict[str, np.ndarray]) -> dict:
    return json.loads(str(traffic["meta"]))


# --------------------------------------------------------------------------------------------------
# Streams


def events(traffic: dict[str, np.ndarray], *, n: int, seed: int, clients: int = 200,
           start_ts: float = 1_764_230_400.0, rate: float = 200.0, model: str = "digits",
           v2_from: int | None = None, v2_share: float = 1.0,
           sponge_client: str | None = None, sponge_from: int = 0, sponge_share: float = 0.05,
           error_client: str | None = None, error_from: int = 0, error_share: float = 0.02) -> list[dict]:
    """``n`` inference-log events in time order, the same for the same arguments.

    Timestamps advance at ``rate`` events/s, each jittered within its 1/rate slot. Benign clients
    ``client-0000``.. have Zipf-like activity (client k's share is proportional to 1/(k+1)^1.1).
    From event ``v2_from`` on, a share ``v2_share`` of the events is served by v2 (1.0: a full switch,
    0.1: a canary). From ``sponge_from`` on, ``sponge_client`` sends a share ``sponge_share`` of all
    events, drawn from the ``sponge`` condition; likewise ``error_client`` with the ``errors``
    condition. Sponge requests were measured on v1, so the sponge client's events are v1's (sticky
    routing in a canary) and a full switch to v2 while it is active is refused. Malformed requests cost
    the same on either version (they fail before the model runs) and are routed like benign ones.
    """
    shares = (sponge_share if sponge_client else 0.0) + (error_share if error_client else 0.0)
    if not 0.0 <= shares <= 1.0 or not 0.0 <= v2_share <= 1.0:
        raise ValueError("shares must be in [0, 1] and the attack shares must sum to at most 1")
    if (sponge_client and sponge_share > 0 and v2_from is not None and v2_share == 1.0
            and max(v2_from, sponge_from) < n):
        raise ValueError("the sponge condition was recorded on v1 only: it cannot run after a full v2 switch")
    rng = np.random.default_rng(seed)
    i = np.arange(n)
    ts = start_ts + (i + rng.uniform(size=n)) / rate
    u = rng.uniform(size=n)
    s_share = np.where(bool(sponge_client) & (i >= sponge_from), sponge_share, 0.0)
    e_share = np.where(bool(error_client) & (i >= error_from), error_share, 0.0)
    sponge = u < s_share
    error = ~sponge & (u < s_share + e_share)
    v2 = (v2_from is not None) & (i >= (v2_from or 0)) & (rng.uniform(size=n) < v2_share) & ~sponge
    weights = 1.0 / np.arange(1, clients + 1) ** 1.1
    benign = rng.choice(clients, size=n, p=weights / weights.sum())

    condition = np.where(sponge, "sponge", np.where(error, "errors", np.where(v2, "v2", "v1")))
    columns = {f: np.empty(n) for f in FLOAT_FIELDS} | {"error": np.empty(n, bool),
                                                         "prediction": np.empty(n, np.int64)}
    for c in CONDITIONS:  # each event takes every figure of one recorded request of its condition
        mask = condition == c
        rows = rng.integers(len(traffic[f"{c}.error"]), size=int(mask.sum()))
        for field, column in columns.items():
            column[mask] = traffic[f"{c}.{field}"][rows]

    col = {field: column.tolist() for field, column in columns.items()}
    out = []
    for k in range(n):
        failed = col["error"][k]
        out.append({
            "event_id": f"{model}-{seed}-{k:07d}",
            "ts": round(float(ts[k]), 6),
            "model": model,
            "model_version": "v2" if v2[k] else "v1",
            "client_id": sponge_client if sponge[k] else error_client if error[k] else f"client-{benign[k]:04d}",
            "latency_ms": col["latency_ms"][k],
            "cpu_ms": col["cpu_ms"][k],
            "memory_mb": col["memory_mb"][k],
            "input_bytes": col["input_bytes"][k],
            "status": "error" if failed else "ok",
            "confidence": None if failed else col["confidence"][k],
            "prediction": None if failed else col["prediction"][k],
        })
    return out


def to_jsonl(events: list[dict], path: str | os.PathLike[str]) -> None:
    """Write events one JSON object a line, as the daemon's file source reads them."""
    with open(path, "w", encoding="utf-8") as f:
        for event in events:
            f.write(json.dumps(event, separators=(",", ":")) + "\n")


# --------------------------------------------------------------------------------------------------
# Sanity figures: python tests/resource_workload.py [--record]


def _summary(traffic: dict[str, np.ndarray]) -> None:
    m = meta(traffic)
    print(f"hidden {m['hidden']}, sponge samples {m['sponge_samples']}, held-out accuracy {m['accuracy']}, "
          f"numpy {m['numpy']}, sklearn {m['sklearn']}; trained in {m['training_s']} s, recorded in "
          f"{m['recording_s']} s")
    med = {(c, f): float(np.median(traffic[f"{c}.{f}"])) for c in CONDITIONS for f in FLOAT_FIELDS[:4]}
    for c in CONDITIONS:
        print(f"  {c:7s} n={len(traffic[f'{c}.error']):5d}  errors {traffic[f'{c}.error'].mean():.3f}  median "
              + "  ".join(f"{f} {med[c, f]:.4g}" for f in FLOAT_FIELDS[:4])
              + "  latency p5-p95 {:.4g}-{:.4g}".format(*np.percentile(traffic[f"{c}.latency_ms"], [5, 95])))
    for f in ("latency_ms", "cpu_ms"):
        print(f"  {f}: v2/v1 {med['v2', f] / med['v1', f]:.2f}, sponge/v1 {med['sponge', f] / med['v1', f]:.2f}, "
              f"errors/v1 {med['errors', f] / med['v1', f]:.2f}")


def _streams(traffic: dict[str, np.ndarray]) -> None:
    cases = {
        "baseline": {},
        "v2 switch at 10000": {"v2_from": 10_000},
        "v2 canary 10% at 10000": {"v2_from": 10_000, "v2_share": 0.1},
        "sponge 5% + errors 2% at 10000": {"sponge_client": "sponger", "sponge_from": 10_000,
                                           "error_client": "broken", "error_from": 10_000},
    }
    for name, kwargs in cases.items():
        t = time.perf_counter()
        evs = events(traffic, n=20_000, seed=1, **kwargs)
        took = time.perf_counter() - t
        assert len({e["event_id"] for e in evs}) == len(evs)
        assert all(a["ts"] < b["ts"] for a, b in zip(evs, evs[1:]))
        groups: dict[tuple[str, str], list[float]] = {}
        for e in evs:
            kind = e["client_id"] if e["client_id"] in ("sponger", "broken") else "benign"
            groups.setdefault((kind, e["model_version"]), []).append(e["latency_ms"])
        clients = {e["client_id"] for e in evs}
        print(f"{name}: {len(evs)} events in {took:.2f} s, {len(clients)} clients, span "
              f"{evs[-1]['ts'] - evs[0]['ts']:.1f} s; median latency_ms (n) by client kind, version: "
              + ", ".join(f"{k}/{v} {np.median(x):.3f} ({len(x)})" for (k, v), x in sorted(groups.items())))


def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--record", action="store_true", help=f"re-record {DATA}")
    if parser.parse_args().record:
        save(record())
        print(f"wrote {DATA} ({DATA.stat().st_size / 1024:.0f} KiB)")
    traffic = load()
    _summary(traffic)
    _streams(traffic)


if __name__ == "__main__":
    _main()
