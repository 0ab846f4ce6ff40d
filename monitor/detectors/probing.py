"""Query probing per client: model extraction, black-box adversarial search and query floods.

Every client's queries are projected into a few dimensions learnt from the model's benign reference
(the top principal components of the standardized features, plus the norm of what they leave out, so
that inputs off the reference's subspace stand far away) and kept in a short ring per client. Six
signals are read per client, each calibrated on the benign reference:

- **neighbours** (Chen, Carlini, Wagner 2019, "Stateful detection of black-box adversarial attacks"):
  the distance of a query to its ``k``-th nearest among the client's recent ``history`` queries (the
  paper takes the mean of the k nearest; the k-th is small only when k queries are close, which a
  benign client re-sending one image a few times does not make).
  A query is marked when that is below the ``mark_quantile`` of benign reference clients (clients
  drawing one class only, the narrowest benign use), and a Bernoulli CUSUM on the marks, calibrated to
  ``client_ert`` queries between false alarms for clients marked ``benign_marks`` of the time, alarms.
  Searches that query around one input (NES gradient estimation, boundary walks) mark nearly every
  query.
- **PRADA** (Juuti et al. 2019): the distance of each query to the client's nearest earlier query of
  the same predicted class, over the last ``distances`` of them; benign distances look normal,
  synthetic queries (Jacobian augmentation: fixed steps from a seed set) do not. Shapiro-Wilk W every
  ``test_every`` distances; the alarm bound is the ``check_quantile`` of W over benign reference
  clients (PRADA's fixed 0.95 does not carry from one model to another). Benign clients who re-query
  a few images also make their distances far from normal, so PRADA fires only with the neighbours or
  off-reference statistic three quarters of the way up.
- **off-reference**: the share of the client's queries that land where the benign reference has no
  mass: a query is marked when its Mahalanobis distance from the reference (all standardized
  features, ridge-regularized covariance) exceeds the ``1 - off_quantile`` quantile of the reference's
  second half (the covariance fitted on the first), and the same kind of CUSUM watches the marks.
  Random and synthetic queries, which evade both tests above, are marked at nearly every query. (A
  windowed MMD of the client's queries against the reference was tried first: benign clients who
  favour a few images are not independent draws from the reference, and it flagged a fifth of them.)
- **steps**: the share of the client's queries that differ from its closest earlier query (in the
  same batch) by one step size on most of the features that changed: sign-gradient steps
  (``x + lambda sign(g)``), the mark of Jacobian-based dataset augmentation (Papernot et al. 2017) and
  of FGSM-style searches; natural variation does not move many features by one amount. The bound is
  the reference clients' ``1 - mark_quantile`` quantile (at least a half), so discrete features (whose
  changes are often one unit) raise it out of reach; the same kind of CUSUM watches the marks.
- **boundary**: the share of the client's queries near the decision boundary, from the
  ``confidence`` detector's per-client figures (its low-confidence marks over the client's queries,
  against the share its per-client CUSUM is tuned to), when that detector runs on the model. It
  corroborates the neighbours test.
- **rate**: the client's query rate over ``rate_window`` seconds and its bursts over
  ``burst_window``, against the population of active clients: a flood is ``rate_factor`` times the
  ``rate_quantile`` of their rates (the heaviest regular clients, such as batch jobs) and at least
  ``min_rate`` queries a second.

One client risk (the largest signal over its bound) and one detection per kind and ``cooldown``:
``model_extraction`` (PRADA, off-reference, steps), ``adversarial_probing`` (neighbours; boundary with
neighbours three quarters up), ``query_flood`` (rate), each naming the signals that fired, their
values and bounds, and the others' current values.

Memory is bounded: at most ``max_clients`` clients, each about 3 KB; idle clients are forgotten after
``client_idle`` seconds; when the table is full, a new client takes the place of the least recently
seen one that is not suspicious (risk >= 0.5 or an alarm within ``cooldown`` queries): a flood of new
ids churns among themselves and cannot push out a suspicious client. Work is vectorized per batch:
each query is compared with its client's ring in one gather over the batch. An exact repeat of one of
the client's recent queries (a retry) is not scored: it tells nothing new.
"""

from __future__ import annotations

import logging
import math
from typing import Any, ClassVar

import msgspec
import numpy as np

from monitor.detections import Detection, make_detection
from monitor.detectors import Detector, ModelBatch, cusum, reference as reference_file
from monitor.detectors.shapiro import w_statistic
from monitor.errors import ConfigError

log = logging.getLogger("inferwatch.detectors.probing")

MARKED_P1 = 0.5  # the marks' CUSUMs are tuned to half of a client's queries marked
REPEAT = 1e-6  # a query this close to one of the client's recent ones is a repeat
STEP_SAME = 0.01  # changes within this fraction of the median change are "the same step"
STEP_FLOOR = 0.5  # a query is a step when at least this share of its changed features moved the same
SIMULATED_CLIENTS = 200  # benign reference clients drawn for the calibration
SIMULATED_QUERIES = 240  # queries of each (PRADA needs `distances` + a few tests)
SIGNALS = ("neighbours", "prada", "off_reference", "boundary", "rate", "steps")
KINDS = {"neighbours": "adversarial_probing", "boundary": "adversarial_probing", "prada": "model_extraction",
         "steps": "model_extraction",
         "off_reference": "model_extraction", "rate": "query_flood"}
KIND_ORDER = ("model_extraction", "adversarial_probing", "query_flood")  # columns of quiet_until
PROTECT = 0.5  # a client whose risk reaches this is not evicted for a new one
CORROBORATE = 0.75  # PRADA and the boundary share fire with another signal this far up
TYPICAL_HALF_LIFE = 20  # clients: how fast the typical client's marked share follows the stream
TYPICAL_CLIENTS = 5  # a slice's median client share counts from this many clients
SLICE = 256  # events of a batch over which the typical client's share is taken
SUSPENDED = 0.25  # the typical client marked this often: the whole model moved


class ClientTable:
    """Per-client arrays, one row (slot) per tracked client, grown by doubling up to ``capacity``."""

    def __init__(self, capacity: int, history: int, dims: int, distances: int):
        self.capacity = capacity
        # name: (shape per client, dtype, value of an empty slot)
        self.fields = {
            "ring": ((history, dims), np.float32, 0),  # recent queries, projected, oldest first
            "ring_class": ((history,), np.int16, -1),
            "queries": ((), np.int64, 0),  # queries seen (the ring holds the last `history`)
            "dist": ((distances,), np.float32, 0),  # PRADA's recent distances, oldest first
            "dist_count": ((), np.int64, 0),
            "since_test": ((), np.int64, 0),
            "near_statistic": ((), np.float64, 0),  # the marks' CUSUMs: neighbours, off-reference, steps
            "off_statistic": ((), np.float64, 0),
            "steps_statistic": ((), np.float64, 0),
            "rate_fast": ((), np.float64, 0),
            "rate_slow": ((), np.float64, 0),
            "last_ts": ((), np.float64, -math.inf),
            "evidence": ((len(SIGNALS),), np.float32, 0),
            "quiet_until": ((len(KIND_ORDER),), np.int64, 0),  # per kind, in the client's queries
        }
        self.size = 0
        self.ids: list[str | None] = []
        self.slot_of: dict[str, int] = {}
        self.free: list[int] = []
        self._grow(min(capacity, 64))

    def _grow(self, size: int) -> None:
        old = self.size
        for name, (shape, dtype, empty) in self.fields.items():
            grown = np.full((size, *shape), empty, dtype=dtype)
            if old:
                grown[:old] = getattr(self, name)
            setattr(self, name, grown)
        self.ids.extend([None] * (size - old))
        self.free.extend(range(size - 1, old - 1, -1))
        self.size = size

    def bytes_per_client(self) -> int:
        return sum(getattr(self, name).nbytes for name in self.fields) // max(1, self.size)

    def reset(self, slot: int) -> None:
        for name, (_, _, empty) in self.fields.items():
            getattr(self, name)[slot] = empty

    def slots(self, clients: list[str], now: float, idle: float) -> np.ndarray:
        """The slot of each client (-1: not tracked, the table is full of suspicious clients)."""
        out = np.empty(len(clients), dtype=np.int64)
        slot_of = self.slot_of
        busy: set[int] = set()  # slots this batch already uses: never evicted for a later row
        for i, client in enumerate(clients):
            slot = slot_of.get(client)
            if slot is None:
                slot = self._admit(client, now, idle, busy)
            out[i] = slot
            if slot >= 0:
                busy.add(slot)
        return out

    def _admit(self, client: str, now: float, idle: float, busy: set[int]) -> int:
        if not self.free and self.size < self.capacity:
            self._grow(min(self.capacity, 2 * self.size))
        if not self.free:
            self._evict(now, idle, busy)
        if not self.free:
            return -1
        slot = self.free.pop()
        self.reset(slot)
        self.last_ts[slot] = now  # not idle: it is arriving
        self.ids[slot] = client
        self.slot_of[client] = slot
        return slot

    def evict_idle(self, now: float, idle: float) -> int:
        """Forget the clients idle for longer than ``idle`` (not the suspicious ones); returns how many."""
        occupied = np.fromiter((c is not None for c in self.ids), dtype=bool, count=self.size)
        gone = np.flatnonzero((now - self.last_ts > idle) & ~self._protected(set()) & occupied)
        self._release(gone)
        return len(gone)

    def _protected(self, busy: set[int]) -> np.ndarray:
        protected = (self.evidence.max(axis=1) >= PROTECT) | (self.quiet_until.max(axis=1) > self.queries)
        protected[list(busy)] = True
        return protected

    def _evict(self, now: float, idle: float, busy: set[int]) -> None:
        """Idle clients first; then the least recently seen eighth of those that are not suspicious
        (and not in the batch being placed)."""
        protected = self._protected(busy)
        gone = np.flatnonzero((now - self.last_ts > idle) & ~protected)
        if len(gone) == 0:
            candidates = np.flatnonzero(~protected)
            if len(candidates) == 0:
                return
            take = max(1, len(candidates) // 8)
            gone = candidates[np.argpartition(self.last_ts[candidates], take - 1)[:take]]
        self._release(gone)

    def emptied(self) -> "ClientTable":
        """A table of the same shape with no client (the model's shared state in a checkpoint)."""
        table = ClientTable.__new__(ClientTable)
        table.capacity, table.fields, table.size = self.capacity, self.fields, 0
        table.ids, table.slot_of, table.free = [], {}, []
        table._grow(min(self.capacity, 64))
        return table

    # What depends on the reference's projection and class codes: reset when rows move to a table
    # built on another reference (the counts, CUSUMs, rates and evidence still hold).
    PROJECTED = ("ring", "ring_class", "dist", "dist_count", "since_test")

    def export(self, owner: dict[str, Any]) -> dict[Any, dict[str, Any]]:
        """The rows of the tracked clients that ``owner`` maps to a key, per key:
        {key: {"ids": [...], field: array, ...}}."""
        slots: dict[Any, list[tuple[str, int]]] = {}
        for client, slot in self.slot_of.items():
            key = owner.get(client)
            if key is not None:
                slots.setdefault(key, []).append((client, slot))
        out = {}
        for key, taken in slots.items():
            rows = np.asarray([s for _, s in taken], dtype=np.int64)
            out[key] = {"ids": [c for c, _ in taken], **{name: getattr(self, name)[rows].copy() for name in self.fields}}
        return out

    def adopt(self, rows: dict[str, Any], idle: float, projected: bool = True) -> int:
        """Take over exported rows, replacing these clients' rows, the most suspicious first; room is
        made as for a new client (idle, then the least recently seen unsuspicious ones). Without
        ``projected`` (another reference made them) the rows' projected history starts empty.
        Returns how many were left out (the table full of suspicious clients)."""
        order = np.argsort(-rows["evidence"].max(axis=1), kind="stable") if len(rows["ids"]) else []
        now = float(max(self.last_ts.max(initial=-math.inf), rows["last_ts"].max(initial=-math.inf)))
        busy: set[int] = set()
        left_out = 0
        for i in order:
            client = rows["ids"][i]
            slot = self.slot_of.get(client)
            if slot is None:
                slot = self._admit(client, now, idle, busy)
                if slot < 0:
                    left_out += 1
                    continue
            busy.add(slot)
            for name, (_, _, empty) in self.fields.items():
                getattr(self, name)[slot] = rows[name][i] if projected or name not in self.PROJECTED else empty
        return left_out

    def forget(self, ids: set[str]) -> None:
        self._release(np.asarray([s for c, s in self.slot_of.items() if c in ids], dtype=np.int64))

    def _release(self, gone: np.ndarray) -> None:
        for slot in gone.tolist():
            del self.slot_of[self.ids[slot]]
            self.ids[slot] = None
            self.reset(slot)  # out of the rate population too
            self.free.append(slot)


class Probing(Detector):
    """Per-client query probing: neighbours, PRADA, off-reference share, boundary share and rate."""

    name: ClassVar[str] = "probing"
    reads_peers: ClassVar[bool] = True  # the confidence detector's per-client figures

    class Params(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
        reference: str | None = None  # JSONL events or a .npy feature matrix; default: the first events
        reference_size: int = 2000
        dims: int = 8  # the projection: dims - 1 principal components and the residual norm
        history: int = 64  # recent queries kept per client
        k: int = 8  # neighbours of the stateful test
        mark_quantile: float = 0.003  # a query is marked below this quantile of benign neighbour distances
        benign_marks: float = 0.1  # the marks' CUSUMs leave benign clients this share of marked queries
        client_ert: float = 1_000_000  # queries between false alarms of a client's marks' CUSUMs
        distances: int = 100  # PRADA: the last distances tested (the paper: at least 100)
        test_every: int = 10  # PRADA: a test every this many new distances
        check_quantile: float = 0.001  # PRADA: the bound on W is this quantile over benign clients
        off_quantile: float = 0.001  # a query is off the reference beyond this quantile of its own spacing
        rate_window: float = 60.0  # seconds
        burst_window: float = 1.0  # seconds
        rate_quantile: float = 0.999  # the heaviest regular clients: this quantile of the active clients' rates
        rate_factor: float = 10.0  # a flood: this many times their rate
        min_rate: float = 100.0  # queries a second below which no client is a flood
        max_clients: int = 10_000
        client_idle: float = 3600.0  # seconds of event time after which an idle client is forgotten
        cooldown: int = 1000  # a client's queries of quiet per kind after an alarm
        seed: int = 7

        def check(self) -> tuple[str, str] | None:
            if self.reference_size < 200:
                return "reference_size", f"expected at least 200 events, got {self.reference_size}"
            if self.reference is not None and (problem := reference_file.check_path(self.reference)):
                return "reference", problem
            if not 2 <= self.dims <= 64:
                return "dims", f"expected 2 to 64 dimensions, got {self.dims}"
            if not 2 <= self.k < self.history <= 1024:
                return "k", f"expected 2 <= k < history <= 1024, got k={self.k}, history={self.history}"
            if self.distances < 20 or self.test_every < 1:
                return "distances", "expected distances >= 20 and test_every >= 1"
            if not 0 < self.benign_marks < 0.4:
                return "benign_marks", f"expected a share between 0 and 0.4, got {self.benign_marks}"
            if not 0 < self.mark_quantile < 0.5 or not 0 < self.check_quantile < 0.5:
                return "mark_quantile", "expected quantiles between 0 and 0.5"
            if not 0 < self.off_quantile < 0.1:
                return "off_quantile", f"expected a quantile between 0 and 0.1, got {self.off_quantile}"
            if self.client_ert < 100:
                return "client_ert", f"expected at least 100 queries, got {self.client_ert}"
            if self.max_clients < 1:
                return "max_clients", f"expected at least 1, got {self.max_clients}"
            return None

    def __init__(self, model: str, params: Params):
        super().__init__(model, params)
        self.reference_id = "stream"
        self.learning: list[tuple[np.ndarray, list[str | None]]] = []
        self.learned = 0
        self.built = False
        self.dimension = 0
        self.class_codes: dict[str, int] = {}
        self.clients: ClientTable | None = None
        self.confidence: Any = None  # the model's confidence detector, when it runs (bound by the pipeline)
        self.alarms = 0
        self.untracked = 0  # queries of clients that found the table full of suspicious clients

    # -- peers, state ----------------------------------------------------------------------------

    def bind(self, peers: list[Detector]) -> None:
        """Read the confidence detector's per-client figures, when it runs on the same model."""
        self.confidence = next((p for p in peers if p.name == "confidence"), None)

    def client_counts(self) -> tuple[int, int]:
        return (len(self.clients.slot_of) if self.clients is not None else 0), self.untracked

    def evict_idle(self, now: float) -> int:
        return self.clients.evict_idle(now, self.params.client_idle) if self.clients is not None else 0

    def state(self) -> dict[str, Any]:
        return {k: v for k, v in super().state().items() if k != "confidence"}

    def shared_state(self) -> dict[str, Any]:
        state = self.state()
        if self.clients is not None:
            state["clients"] = self.clients.emptied()
        return state

    def tracked_clients(self) -> list[str]:
        return list(self.clients.slot_of) if self.clients is not None else []

    def clients_state(self, owner: dict[str, Any]) -> dict[Any, dict[str, Any]]:
        if self.clients is None:
            return {}
        basis = self._basis()
        return {key: {"basis": basis, **rows} for key, rows in self.clients.export(owner).items()}

    def adopt_clients(self, saved: dict[str, Any] | None) -> None:
        if not saved or not saved["ids"]:
            return
        if self.clients is None:
            log.warning("%s: %d clients' probing state arrived before the reference is learnt; they start afresh",
                        self.model, len(saved["ids"]))
            return
        # The rings hold queries projected on the reference's components: rows projected on another
        # reference's (a replica that learnt its own) keep their counts and evidence, not their rings.
        same = saved["basis"] == self._basis()
        if not same:
            log.info("%s: %d clients' probing state was made on another reference; their recent queries "
                     "start afresh", self.model, len(saved["ids"]))
        left_out = self.clients.adopt(saved, self.params.client_idle, projected=same)
        if left_out:
            log.warning("%s: %d clients taken over found the probing table full of suspicious clients",
                        self.model, left_out)

    def _basis(self) -> str:
        """A digest of what projects a query and codes its class."""
        import hashlib

        digest = hashlib.sha256()
        for array in (self.mean, self.sd, self.components):
            digest.update(np.ascontiguousarray(array).tobytes())
        digest.update(repr(sorted(self.class_codes.items())).encode())
        return digest.hexdigest()[:16]

    def forget_clients(self, ids: set[str]) -> None:
        if self.clients is not None:
            self.clients.forget(ids)

    def restore(self, state: dict[str, Any]) -> None:
        if reference_file.still_valid(state, self.params.reference, self.model):
            super().restore(state)

    # -- the reference ---------------------------------------------------------------------------

    def _learn(self, batch: ModelBatch) -> int:
        matrix, mask = batch.features
        take = min(self.params.reference_size - self.learned, len(batch))
        rows = np.flatnonzero(mask[:take])
        classes = batch.classes
        if len(rows):  # a model without features (an LLM's latency-only log) keeps nothing
            self.learning.append((matrix[rows], [classes[i] for i in rows.tolist()]))
        self.learned += len(rows)  # feature vectors: events without them do not fill the reference
        if self.learned >= self.params.reference_size:
            self._build(self.learning)
            self.learning, self.learned = [], 0  # built, or too few usable vectors: learn anew
        return take

    def _build_from_file(self) -> None:
        path = self.params.reference
        try:
            data = reference_file.load(path, self.model, self.params.reference_size)
            if isinstance(data, np.ndarray):
                parts = [(data, [None] * len(data))]
            else:
                matrix, mask = data.features
                classes = data.classes
                parts = [(matrix[mask], [classes[i] for i in np.flatnonzero(mask).tolist()])]
            self._build(parts)
            if not self.built:
                raise ConfigError(f"reference {path}: too few feature vectors for the probing detector")
            self.reference_id = reference_file.identity(path)
        except ConfigError as exc:
            self.reference_id = reference_file.fall_back(log, self.model, exc, path, self.params.reference_size)

    def _build(self, parts: list[tuple[np.ndarray, list[str | None]]]) -> None:
        """The standardization, the projection, the class codes, the whitening and the bounds."""
        p = self.params
        vectors = [m for m, _ in parts if m.ndim == 2 and m.shape[0]]
        if not vectors:
            return
        dimension = int(np.bincount([v.shape[1] for v in vectors]).argmax())
        keep = [(m, c) for m, c in parts if m.ndim == 2 and m.shape[0] and m.shape[1] == dimension]
        x = np.concatenate([m for m, _ in keep]).astype(np.float64)
        names = [c for _, cs in keep for c in cs]
        finite = np.isfinite(x).all(axis=1)
        x, names = x[finite], [n for n, f in zip(names, finite.tolist()) if f]
        if len(x) < 200:
            log.warning("%s: %d reference feature vectors, the probing detector needs 200", self.model, len(x))
            return
        self.dimension = dimension
        self.mean = x.mean(axis=0)
        sd = x.std(axis=0)
        self.sd = np.maximum(sd, 0.1 * float(np.median(sd[sd > 0])) if (sd > 0).any() else 1.0)
        standard = (x - self.mean) / self.sd
        components = min(p.dims - 1, dimension)
        _, _, vt = np.linalg.svd(standard - standard.mean(axis=0), full_matrices=False)
        self.components = vt[:components].T.copy()  # dimension x components
        z = self._project_standard(standard)
        # the class codes: the reference's classes seen at least 20 times; the rest share one code
        counted: dict[str, int] = {}
        for n in names:
            if n is not None:
                counted[n] = counted.get(n, 0) + 1
        self.class_codes = {c: i for i, c in enumerate(sorted(c for c, count in counted.items() if count >= 20))}
        codes = self._codes(names)
        # off the reference: the Mahalanobis distance of the standardized query (every feature, not the
        # projection: synthetic queries move along directions the reference hardly varies in), its
        # bound the 1 - off_quantile quantile over the reference's second half, fitted on the first
        half = len(standard) // 2
        self.whiten = _whitening(standard[:half])
        self.off_bound = float(np.quantile(self._mahalanobis(standard[half:]), 1 - p.off_quantile))
        self.whiten = _whitening(standard)
        self.reference_z, self.reference_codes, self.reference_x = z.astype(np.float32), codes, x
        self._calibrate()
        self.clients = ClientTable(p.max_clients, p.history, z.shape[1], p.distances)
        self.reference_z = self.reference_codes = self.reference_x = None  # the bounds are all that is kept
        self.built = True
        log.info("%s: probing reference built from %d queries: neighbour bound %.3g, PRADA bound W < %.3f, "
                 "off-reference bound %.3g", self.model, len(x), self.neighbour_bound, self.prada_bound,
                 self.off_bound)

    def _project_standard(self, standard: np.ndarray) -> np.ndarray:
        inside = standard @ self.components
        residual = np.sqrt(np.maximum((standard**2).sum(axis=1) - (inside**2).sum(axis=1), 0.0))
        return np.concatenate([inside, residual[:, None]], axis=1)

    def _project(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(the projection, the standardized features)."""
        standard = (x - self.mean) / self.sd
        return self._project_standard(standard).astype(np.float32), standard

    def _mahalanobis(self, standard: np.ndarray) -> np.ndarray:
        return np.linalg.norm(standard @ self.whiten, axis=1)

    def _codes(self, names: list[str | None]) -> np.ndarray:
        other = len(self.class_codes)
        return np.fromiter((self.class_codes.get(n, other) if n is not None else other for n in names),
                           dtype=np.int16, count=len(names))

    def _calibrate(self) -> None:
        """The neighbour and PRADA bounds, from benign clients drawn from the reference: each draws
        without replacement, half of them from one class only (narrow clients stand closest together),
        and their queries go through the same code as live ones."""
        p = self.params
        rng = np.random.default_rng(p.seed + 1)
        z, codes = self.reference_z, self.reference_codes
        by_class = [np.flatnonzero(codes == c) for c in range(len(self.class_codes) + 1)]
        by_class = [rows for rows in by_class if len(rows) >= 2 * p.k + 2]
        neighbour, w, steps = [], [], []
        for i in range(SIMULATED_CLIENTS):
            pool = by_class[rng.integers(len(by_class))] if i % 2 and by_class else np.arange(len(z))
            rows = rng.permutation(pool)[:SIMULATED_QUERIES]
            knn, nearest, _, parent = _distances(z[rows], codes[rows], p.history, p.k)
            neighbour.append(knn[np.isfinite(knn)])
            has = np.flatnonzero(parent >= 0)
            steps.append(_step_shares(self.reference_x[rows[has]] - self.reference_x[rows[parent[has]]]))
            d = nearest[np.isfinite(nearest)]
            if len(d) >= p.distances:
                ends = np.arange(p.distances, len(d) + 1, p.test_every)
                w.append(w_statistic(np.stack([d[e - p.distances: e] for e in ends])))
        neighbour_all = np.concatenate(neighbour) if neighbour else np.zeros(0)
        self.neighbour_bound = float(np.quantile(neighbour_all, p.mark_quantile)) if len(neighbour_all) else 0.0
        self.prada_bound = float(np.quantile(np.concatenate(w), p.check_quantile)) if w else 0.0
        # steps: benign changes do not move many features by one amount, unless the features are
        # discrete (counts, flags): then the bound rises towards 1 and the signal all but stops
        shares = np.concatenate(steps) if steps else np.zeros(1)
        self.steps_bound = max(STEP_FLOOR, float(np.quantile(shares, 1 - p.mark_quantile)) + 1e-9)
        # the marks' CUSUMs: tuned to half the client's queries marked, against benign clients marked
        # `benign_marks` of the time, far more than the reference's simulated clients are: real ones
        # re-capture the same few images, which the reference's distinct rows do not show
        # (bench/probing_quality.py: at 1% and 3% a narrow client in 100 or 200 was flagged)
        self.marks_p0 = max(p.benign_marks, p.mark_quantile, p.off_quantile)
        self.marks_h = cusum.threshold_for_ert(self.marks_p0, MARKED_P1, float(p.client_ert))
        self.typical = {"neighbours": self.marks_p0, "off_reference": self.marks_p0, "steps": self.marks_p0}
        self.suspended: dict[str, bool] = {}

    # -- the batch -------------------------------------------------------------------------------

    def update(self, batch: ModelBatch) -> list[Detection]:
        if not self.built and self.params.reference and self.reference_id == "stream":
            self._build_from_file()
        start = 0
        if not self.built:
            start = self._learn(batch)
            if not self.built or start >= len(batch):
                return []
        matrix, mask = batch.features
        clients = batch.client_ids
        rows = [i for i in range(start, len(batch)) if clients[i] is not None and mask[i]]
        if matrix.shape[1] != self.dimension:
            rows = []
        if not rows:
            return []
        rows_a = np.asarray(rows, dtype=np.int64)
        ts = batch.ts[rows_a]
        table = self.clients
        slots = table.slots([clients[i] for i in rows], float(ts.max()), self.params.client_idle)
        tracked = slots >= 0
        self.untracked += int((~tracked).sum())
        rows_a, slots, ts = rows_a[tracked], slots[tracked], ts[tracked]
        if len(rows_a) == 0:
            return []
        x = np.nan_to_num(matrix[rows_a], nan=0.0, posinf=0.0, neginf=0.0)
        z, standard = self._project(x)
        classes = batch.classes
        codes = self._codes([classes[i] for i in rows_a.tolist()])
        order = np.argsort(slots, kind="stable")
        segments = _Segments(slots[order])
        return self._signals(batch, rows_a[order], segments, x[order], z[order], standard[order], codes[order],
                             ts[order])

    def _signals(self, batch: ModelBatch, rows: np.ndarray, seg: "_Segments", x: np.ndarray, z: np.ndarray,
                 standard: np.ndarray, codes: np.ndarray, ts: np.ndarray) -> list[Detection]:
        p, table = self.params, self.clients
        slots = seg.slots
        # the clients' rings followed by their new queries, each new query compared with the `history`
        # entries before it (its client's ring and its own earlier queries of the batch)
        sequence, sequence_codes, valid, positions = seg.with_history(table.ring, table.ring_class,
                                                                      table.queries, z, codes)
        knn, nearest, closest, parent = _gathered_distances(sequence, sequence_codes, valid, positions, p.k)
        # steps: each query against its closest earlier one, when that one is in this batch (the rings
        # keep projections only; an attacker sends most of a search within one batch)
        row_at = np.full(len(sequence), -1, dtype=np.int64)
        row_at[positions] = np.arange(len(positions))
        parent_row = np.where(parent >= 0, row_at[np.maximum(parent, 0)], -1)
        stepped = np.flatnonzero(parent_row >= 0)
        step_share = np.full(len(positions), np.nan)
        step_share[stepped] = _step_shares(x[stepped] - x[parent_row[stepped]])
        seg.keep_history(table.ring, table.ring_class, sequence, sequence_codes, positions)
        before = table.queries[slots].copy()
        table.queries[slots] += seg.lengths
        evidence = np.zeros((len(slots), len(SIGNALS)), dtype=np.float32)
        hits: dict[int, dict[str, tuple[float, int]]] = {}  # segment -> signal -> (value, row index)
        fresh = ~(closest <= REPEAT)  # a retry of a recent query is not scored

        # neighbours and off-reference: marks and their per-client CUSUMs, against the benign rate or
        # the typical client's recent rate when that is higher (a drift of the whole model moves
        # every client off the reference: the drift detector reports it, not every client)
        off = self._mahalanobis(standard)
        for column, name, figure, marked, statistics in (
                (0, "neighbours", knn, knn < self.neighbour_bound, table.near_statistic),
                (2, "off_reference", off, off > self.off_bound, table.off_statistic),
                (5, "steps", step_share, step_share >= self.steps_bound, table.steps_statistic)):
            scored = fresh & np.isfinite(figure)
            steps = self._increments(name, seg, rows, marked & scored, scored)
            end, crossed_at = seg.cusum(steps, statistics[slots], self.marks_h)
            evidence[:, column] = np.maximum(statistics[slots], end) / self.marks_h
            statistics[slots] = end
            for s in np.flatnonzero(crossed_at >= 0).tolist():
                evidence[s, column] = max(evidence[s, column], 1.0)
                window = figure[seg.starts[s]: crossed_at[s] + 1][-p.k:]
                hits.setdefault(s, {})[name] = (float(np.mean(window[np.isfinite(window)])), int(crossed_at[s]))

        # PRADA: the last `distances` nearest-same-class distances, tested every `test_every`
        new_counts = seg.append_distances(table.dist, table.dist_count, np.where(fresh, nearest, np.inf))
        table.since_test[slots] += new_counts
        due = np.flatnonzero((table.dist_count[slots] >= p.distances) & (table.since_test[slots] >= p.test_every))
        if len(due):
            w = w_statistic(table.dist[slots[due]].astype(np.float64))
            table.since_test[slots[due]] = 0
            evidence[due, 1] = (1 - w) / max(1e-9, 1 - self.prada_bound)
            # alone it does not decide: benign clients who re-query the same few images make their
            # distances far from normal too (tests/test_probing.py), so it needs another signal three quarters up
            corroborated = np.maximum(evidence[due, 0], evidence[due, 2]) >= CORROBORATE
            fires = (w < self.prada_bound) & corroborated
            for s, value in zip(due[fires].tolist(), w[fires].tolist()):
                hits.setdefault(s, {})["prada"] = (value, int(seg.ends[s] - 1))

        # boundary: the share of the client's queries the confidence detector marked low-confidence,
        # over the share its per-client CUSUM is tuned to find (shift x the reference rate)
        peer = self.confidence
        if peer is not None and getattr(peer, "p0", None):
            states, tuned = peer.clients, peer.params.shift * peer.p0
            least = peer.params.min_client_events
            evidence[:, 3] = [(st.marks / st.events / tuned if (st := states.get(table.ids[s])) is not None
                               and st.events >= least else 0.0) for s in slots.tolist()]
            for s in np.flatnonzero((evidence[:, 3] >= 1) & (evidence[:, 0] >= CORROBORATE)).tolist():
                hits.setdefault(s, {})["boundary"] = (float(evidence[s, 3]), int(seg.ends[s] - 1))

        # rate: decayed counts at each client's last query of the batch, against the active population
        evidence[:, 4], flood = self._rates(seg, ts)
        for s in flood.tolist():
            hits.setdefault(s, {})["rate"] = (float(evidence[s, 4]), int(seg.ends[s] - 1))

        table.evidence[slots] = np.maximum(evidence, 0)
        return self._detections(batch, rows, seg, hits, before, evidence)

    def _increments(self, name: str, seg: "_Segments", rows: np.ndarray, marked: np.ndarray,
                    scored: np.ndarray) -> np.ndarray:
        """The CUSUM's log-likelihood-ratio steps for each query (marked share ``MARKED_P1`` against
        the benign one), with the benign share raised to what the typical client shows at the same
        time: the median client's share in the query's slice of ``SLICE`` events of the batch, or
        recently (a half-life of ``TYPICAL_HALF_LIFE`` clients), both from slices and batches of at
        least ``TYPICAL_CLIENTS`` clients (one attacker alone is not the typical client). Where the
        typical client is marked ``SUSPENDED`` of the time, the whole model moved (a drift, which the
        drift detector reports): every query then counts as unmarked. The threshold stays the benign one's (larger shares make smaller
        steps, so fewer false alarms)."""
        p0 = self.marks_p0
        u = len(seg.slots)
        owner = np.repeat(np.arange(u), seg.lengths)
        slices = rows // SLICE
        key = (slices * u + owner)[scored]
        keys, inverse = np.unique(key, return_inverse=True)
        share = np.bincount(inverse, weights=marked[scored]) / np.bincount(inverse)
        slice_of = keys // u
        order = np.lexsort((share, slice_of))
        first, where, count = np.unique(slice_of[order], return_index=True, return_counts=True)
        median = share[order][where + (count - 1) // 2]
        typical = np.zeros(int(slices.max()) + 1 if len(slices) else 1)
        typical[first[count >= TYPICAL_CLIENTS]] = median[count >= TYPICAL_CLIENTS]
        clients = np.add.reduceat(scored.astype(np.int64), seg.starts)
        shares = np.add.reduceat(marked.astype(np.int64), seg.starts)[clients > 0] / clients[clients > 0]
        if len(shares) >= TYPICAL_CLIENTS:  # a lone client (an attacker on a quiet model) is nobody's typical
            weight = 1 - 0.5 ** (len(shares) / TYPICAL_HALF_LIFE)
            self.typical[name] += weight * (float(np.median(shares)) - self.typical[name])
        base = np.maximum(max(p0, self.typical[name]), typical[slices])
        suspended = base >= SUSPENDED
        if suspended.any() != self.suspended.get(name, False):
            self.suspended[name] = bool(suspended.any())
            log.info("%s: the typical client's %s share is %s", self.model, name,
                     f"{base.max():.0%}: the whole model moved (a drift), the signal waits"
                     if suspended.any() else "back to normal: the signal is on again")
        base = np.minimum(base, SUSPENDED)
        up, down = np.log(MARKED_P1 / base), np.log((1 - MARKED_P1) / (1 - base))
        steps = np.where(marked & ~suspended, up, np.where(scored, down, 0.0))
        return steps

    def _rates(self, seg: "_Segments", ts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(each client's rate evidence, the segments that flood): exponentially decayed query counts
        over ``rate_window`` and ``burst_window`` seconds, against ``rate_factor`` times the
        ``rate_quantile`` of the active clients' rates (the heaviest regular clients: a batch job that
        queries all day is one of them; a flood is far beyond them)."""
        p, table = self.params, self.clients
        slots = seg.slots
        end_ts = ts[seg.ends - 1]
        now = float(end_ts.max())
        out = np.zeros(len(slots))
        flood = np.zeros(len(slots), dtype=bool)
        last = np.where(np.isfinite(table.last_ts[slots]), table.last_ts[slots], end_ts)
        table.last_ts[slots] = end_ts
        active = np.flatnonzero(now - table.last_ts < p.rate_window)  # the batch's clients among them
        for name, tau in (("rate_slow", p.rate_window), ("rate_fast", p.burst_window)):
            counts = getattr(table, name)
            decayed = counts[slots] * np.exp(-np.maximum(end_ts - last, 0) / tau)
            added = np.add.reduceat(np.exp(-np.maximum(np.repeat(end_ts, seg.lengths) - ts, 0) / tau), seg.starts)
            counts[slots] = decayed + added
            rate = counts[slots] / tau  # queries a second
            population = counts[active] * np.exp(-np.maximum(now - table.last_ts[active], 0) / tau) / tau
            # without the busiest client: in a small population it would set its own bound
            others = np.sort(population)[:-1]
            heavy = float(np.quantile(others, p.rate_quantile)) if len(others) else 0.0
            bound = max(p.rate_factor * heavy, p.min_rate)
            out = np.maximum(out, rate / bound)
            flood |= rate >= bound
        return out, np.flatnonzero(flood)

    # -- detections ------------------------------------------------------------------------------

    def _detections(self, batch: ModelBatch, rows: np.ndarray, seg: "_Segments",
                    hits: dict[int, dict[str, tuple[float, int]]], before: np.ndarray,
                    evidence: np.ndarray) -> list[Detection]:
        table, found = self.clients, []
        for s, fired in sorted(hits.items()):
            slot = int(seg.slots[s])
            by_kind: dict[str, list[str]] = {}
            for signal in fired:
                by_kind.setdefault(KINDS[signal], []).append(signal)
            for kind, signals in by_kind.items():
                k = KIND_ORDER.index(kind)
                row = min(fired[sig][1] for sig in signals)
                query = int(before[s] + row - seg.starts[s] + 1)  # the client's query count at the alarm
                if query < table.quiet_until[slot, k]:
                    continue
                table.quiet_until[slot, k] = query + self.params.cooldown
                self.alarms += 1
                own = rows[seg.starts[s]: row + 1][-10:]  # the client's queries up to the alarm
                found.append(self._detection(batch, int(rows[row]), table.ids[slot], kind, signals, fired,
                                             evidence[s], query, own))
        found.sort(key=lambda d: d.ts)
        return found

    def _detection(self, batch: ModelBatch, index: int, client: str, kind: str, signals: list[str],
                   fired: dict[str, tuple[float, int]], evidence: np.ndarray, query: int,
                   own: np.ndarray) -> Detection:
        event = batch.events[index]
        topic, partition, offset = batch.source(index)
        risk = float(evidence.max())
        bounds = {"neighbours": f"distance to the {self.params.k}th nearest recent query below "
                                f"{self.neighbour_bound:.3g} for most queries",
                  "prada": f"Shapiro-Wilk W of the last {self.params.distances} distances below {self.prada_bound:.3f}",
                  "off_reference": f"Mahalanobis distance from the reference above {self.off_bound:.3g} "
                                   "for most queries",
                  "boundary": "low-confidence share above the confidence detector's per-client threshold",
                  "steps": f"at least {self.steps_bound:.0%} of the changed features moved by one amount from "
                           "an earlier query, for most queries",
                  "rate": f"query rate at least {self.params.rate_factor:g}x the active clients' "
                          f"{self.params.rate_quantile:.0%} quantile and {self.params.min_rate:g}/s"}
        why = "; ".join(f"{sig} ({bounds[sig]}: {fired[sig][0]:.3g})" for sig in signals)
        what = {"model_extraction": "model extraction", "adversarial_probing": "black-box adversarial search",
                "query_flood": "query flood"}[kind]
        return make_detection(
            detector=self.name, kind=kind, model=self.model, window_start=float(event.ts), ts=float(event.ts),
            client_id=client, model_version=event.model_version,
            severity="critical" if len(signals) > 1 or risk >= 3 else "warning",
            score=round(risk, 3), threshold=1.0,
            summary=f"{what} suspected from client {client} after {query} queries: {why}",
            evidence={"signals": {sig: round(float(evidence[i]), 4) for i, sig in enumerate(SIGNALS)},
                      "fired": {sig: {"value": fired[sig][0], "bound": bounds[sig]} for sig in signals},
                      "client_queries": query, "risk": risk,
                      "event_ids": [batch.events[i].event_id for i in own.tolist()]},
            source={"topic": topic, "partition": partition, "offset": offset},
        )

    def report_figures(self, batch: ModelBatch) -> dict[str, Any]:
        """The risk (largest signal over its threshold: 1 at an alarm) of the ten riskiest tracked clients."""
        top = 10
        table = self.clients
        if table is None:
            return {"client_risk": None}
        risk = table.evidence.max(axis=1)
        slots = [s for s in np.argsort(-risk, kind="stable")[: 4 * top].tolist() if table.ids[s] is not None][:top]
        return {"client_risk": {table.ids[s]: round(float(risk[s]), 4) for s in slots}}

    def armed(self) -> bool:
        return self.clients is not None

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        table = self.clients
        if table is None:
            out["state"] = "learning reference"
            return out
        tracked = [s for s, c in enumerate(table.ids) if c is not None]
        top = sorted(tracked, key=lambda s: -float(table.evidence[s].max()))[:10]
        out.update({
            "state": "armed", "clients_tracked": len(tracked), "alarms": self.alarms, "untracked_queries": self.untracked,
            "bytes_per_client": table.bytes_per_client(),
            "bounds": {"neighbours": self.neighbour_bound, "prada_w": self.prada_bound,
                       "off_reference": self.off_bound, "steps": self.steps_bound, "marks_cusum": self.marks_h},
            "top_clients": [{"client_id": table.ids[s], "risk": float(table.evidence[s].max()),
                             "signals": dict(zip(SIGNALS, table.evidence[s].round(3).tolist())),
                             "queries": int(table.queries[s])} for s in top],
        })
        return out


# -- the vectorized core ---------------------------------------------------------------------------


def _whitening(standard: np.ndarray) -> np.ndarray:
    """W with |x W| the Mahalanobis distance from the centre of ``standard`` (ridge-regularized: pixels
    that never vary in the reference get a finite, small variance, not none)."""
    covariance = np.cov(standard, rowvar=False) + 0.01 * np.eye(standard.shape[1])
    values, vectors = np.linalg.eigh(covariance)
    return vectors / np.sqrt(values)


def _distances(z: np.ndarray, codes: np.ndarray, history: int, k: int) -> tuple[np.ndarray, ...]:
    """One client's queries in order: ``_gathered_distances`` with an empty ring (the closest earlier
    query as an index into ``z``)."""
    n = len(z)
    sequence = np.concatenate([np.zeros((history, z.shape[1]), np.float32), z.astype(np.float32)])
    sequence_codes = np.concatenate([np.full(history, -1, np.int16), codes.astype(np.int16)])
    valid = np.concatenate([np.zeros(history, bool), np.ones(n, bool)])
    knn, nearest, closest, parent = _gathered_distances(sequence, sequence_codes, valid, history + np.arange(n), k)
    return knn, nearest, closest, np.where(parent >= 0, parent - history, -1)


def _step_shares(delta: np.ndarray) -> np.ndarray:
    """For each row of changes from an earlier query, the share of the changed features that moved by
    the same amount (within STEP_SAME of the median change): near 1 for a sign-gradient step
    (x + lambda sign(g), as in Jacobian augmentation or FGSM-style searches), near 0 for natural
    variation. 0 for rows with fewer than an eighth of the features (and 4) changed."""
    size = np.abs(delta)
    changed = size > 1e-9
    count = changed.sum(axis=1)
    enough = count >= max(4, delta.shape[1] // 8)
    out = np.zeros(len(delta))
    if enough.any():
        size, changed, count = size[enough], changed[enough], count[enough]
        median = np.nanmedian(np.where(changed, size, np.nan), axis=1)
        same = changed & (np.abs(size - median[:, None]) <= STEP_SAME * median[:, None])
        out[enough] = same.sum(axis=1) / count
    return out


def _gathered_distances(sequence: np.ndarray, sequence_codes: np.ndarray, valid: np.ndarray,
                        positions: np.ndarray, k: int, chunk: int = 4096) -> tuple[np.ndarray, ...]:
    """For the query at each of ``positions`` in ``sequence``, the ``history`` entries before it are its
    client's (the caller lays out every client as its ring, then its new queries): the k-th smallest
    distance among the valid ones, the smallest to one of the same class, the smallest
    (inf where there is none), and where in ``sequence`` the closest one is (-1 where none)."""
    history = int(positions.min()) if len(positions) else 0
    knn = np.full(len(positions), np.inf)
    nearest = np.full(len(positions), np.inf)
    closest = np.full(len(positions), np.inf)
    parent = np.full(len(positions), -1, dtype=np.int64)
    offsets = np.arange(-history, 0)
    for lo in range(0, len(positions), chunk):
        at = positions[lo: lo + chunk]
        index = at[:, None] + offsets[None, :]  # n x history
        diff = sequence[index] - sequence[at][:, None, :]
        d = np.sqrt(np.einsum("nhd,nhd->nh", diff, diff))
        ok = valid[index]
        d = np.where(ok, d, np.inf)
        enough = ok.sum(axis=1) >= k
        if enough.any():
            knn[lo: lo + chunk][enough] = np.partition(d[enough], k - 1, axis=1)[:, k - 1]
        same = ok & (sequence_codes[index] == sequence_codes[at][:, None])
        nearest[lo: lo + chunk] = np.where(same, d, np.inf).min(axis=1)
        closest[lo: lo + chunk] = d.min(axis=1)
        nearest_at = index[np.arange(len(at)), d.argmin(axis=1)]
        parent[lo: lo + chunk] = np.where(np.isfinite(closest[lo: lo + chunk]), nearest_at, -1)
    return knn, nearest, closest, parent


class _Segments:
    """A batch's tracked queries grouped by client (sorted by slot): segment ``s`` is client
    ``slots[s]`` with rows ``starts[s]:ends[s]``."""

    def __init__(self, sorted_slots: np.ndarray):
        self.starts = np.flatnonzero(np.r_[True, sorted_slots[1:] != sorted_slots[:-1]])
        self.ends = np.r_[self.starts[1:], len(sorted_slots)]
        self.lengths = self.ends - self.starts
        self.slots = sorted_slots[self.starts]
        self.n = len(sorted_slots)

    def with_history(self, ring: np.ndarray, ring_class: np.ndarray, queries: np.ndarray, z: np.ndarray,
                     codes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Each client's ring (oldest first) then its new queries, in one array; the positions of the
        new queries in it; which entries are real (a young client's ring is partly empty)."""
        history = ring.shape[1]
        u = len(self.slots)
        base = np.arange(u) * history + self.starts  # where segment s's ring begins
        total = u * history + self.n
        sequence = np.empty((total, z.shape[1]), dtype=np.float32)
        sequence_codes = np.empty(total, dtype=np.int16)
        valid = np.ones(total, dtype=bool)
        ring_positions = (base[:, None] + np.arange(history)[None, :]).ravel()
        sequence[ring_positions] = ring[self.slots].reshape(-1, z.shape[1])
        sequence_codes[ring_positions] = ring_class[self.slots].ravel()
        filled = np.minimum(queries[self.slots], history)
        valid[ring_positions] = (np.arange(history)[None, :] >= (history - filled)[:, None]).ravel()
        positions = np.repeat(base + history, self.lengths) + (np.arange(self.n) - np.repeat(self.starts, self.lengths))
        sequence[positions] = z
        sequence_codes[positions] = codes
        return sequence, sequence_codes, valid, positions

    def keep_history(self, ring: np.ndarray, ring_class: np.ndarray, sequence: np.ndarray,
                     sequence_codes: np.ndarray, positions: np.ndarray) -> None:
        """Each client's ring becomes the last ``history`` entries of its segment of ``sequence``."""
        history = ring.shape[1]
        last = positions[self.ends - 1] + 1  # one past each segment's end in the sequence
        index = last[:, None] - history + np.arange(history)[None, :]
        ring[self.slots] = sequence[index]
        ring_class[self.slots] = sequence_codes[index]

    def cusum(self, steps: np.ndarray, start: np.ndarray, h: float) -> tuple[np.ndarray, np.ndarray]:
        """A CUSUM per client over its queries' ``steps``: (statistic at the end, row of the first
        crossing of ``h`` or -1). A client that crosses restarts at 0 after the batch (its later
        crossings in the batch would wait for its cooldown anyway)."""
        s = cusum.per_segment(steps, self.starts, self.lengths, start)
        over = s > h
        crossed = np.maximum.reduceat(over.astype(np.int8), self.starts) > 0
        first = np.full(len(self.starts), -1, dtype=np.int64)
        for seg in np.flatnonzero(crossed).tolist():
            first[seg] = self.starts[seg] + int(np.argmax(over[self.starts[seg]: self.ends[seg]]))
        end = s[self.ends - 1].copy()
        end[crossed] = 0.0
        return end, first

    def append_distances(self, dist: np.ndarray, dist_count: np.ndarray, nearest: np.ndarray) -> np.ndarray:
        """Append each client's finite new distances to its ring of recent ones (the ring is laid out
        before them, and the last ``size`` entries of each client's run are kept); returns how many."""
        finite = np.isfinite(nearest)
        counts = np.add.reduceat(finite.astype(np.int64), self.starts)
        kept = np.flatnonzero(finite)
        size, u = dist.shape[1], len(self.slots)
        base = np.arange(u) * size + np.cumsum(counts) - counts  # where client s's ring begins
        sequence = np.empty(u * size + len(kept), dtype=dist.dtype)
        sequence[(base[:, None] + np.arange(size)[None, :]).ravel()] = dist[self.slots].ravel()
        rank = np.arange(len(kept)) - np.repeat(np.cumsum(counts) - counts, counts)
        sequence[np.repeat(base + size, counts) + rank] = nearest[kept]
        dist[self.slots] = sequence[(base + counts)[:, None] + np.arange(size)[None, :]]
        dist_count[self.slots] += counts
        return counts
