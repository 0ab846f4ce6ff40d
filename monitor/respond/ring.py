"""The last inference-log events per model and per client, kept in memory for evidence snapshots.

The detect loop appends every event's original message bytes; the ``snapshot`` action reads them from
an action thread when an incident asks for evidence. Memory is bounded by counts: at most
``per_model`` events for each of at most ``max_models`` models, and ``per_client`` events for each of at
most ``max_clients`` (model, client) pairs, the least recently seen pair evicted first, so a flood of
new client ids cannot grow it. Both rings hold references to the same bytes objects, so an event kept
in both costs its bytes once.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from typing import Iterable


class EventRing:
    """The last events (raw JSON bytes) of each model and of each client of a model; thread-safe.

    ``add`` is on the hot path (every event), so it does a few dictionary and deque operations under one
    lock; ``add_many`` takes the lock once for a batch (measured here: 0.4 us an event, 0.6 us when
    every event comes from a client new to the LRU). ``last`` copies under the lock and returns the
    newest event last. Memory: at most ``per_model * max_models + per_client * max_clients`` events.

    A client's events are the longer of two suffixes of the same sequence (the client's own ring, and
    the client's events still in the model's ring), so a client that was evicted from the client LRU,
    or one with more recent events than ``per_client`` in the model's window, still yields all that
    is kept.

    Parameters: ``per_model`` events per model, ``per_client`` per (model, client) pair,
    ``max_clients`` pairs (least recently seen evicted), ``max_models`` models (likewise).

    >>> ring = EventRing(per_model=3, per_client=2, max_clients=2)
    >>> for i, client in enumerate(["a", "b", "a", "c", "a"]):
    ...     ring.add("fraud", client, b'{"event_id": "e%d"}' % i)
    >>> ring.last("fraud", None, 10)
    [b'{"event_id": "e2"}', b'{"event_id": "e3"}', b'{"event_id": "e4"}']
    >>> ring.last("fraud", "a", 10)
    [b'{"event_id": "e2"}', b'{"event_id": "e4"}']
    >>> ring.last("fraud", "b", 10)   # evicted from the client LRU, and out of the model's window
    []
    >>> ring.stats()
    {'models': 1, 'clients': 2, 'model_events': 3, 'client_events': 3}
    """

    def __init__(self, per_model: int = 1000, per_client: int = 100, max_clients: int = 256,
                 max_models: int = 256):
        if per_model < 1 or per_client < 0 or max_clients < 0 or max_models < 1:
            raise ValueError("EventRing: per_model and max_models must be >= 1, per_client and max_clients >= 0")
        self.per_model = per_model
        self.per_client = per_client
        self.max_clients = max_clients
        self.max_models = max_models
        # model -> deque of (client_id, raw): the client id lets ``last`` find a client's events here too
        self._models: OrderedDict[str, deque[tuple[str | None, bytes]]] = OrderedDict()
        self._clients: OrderedDict[tuple[str, str], deque[bytes]] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, model: str, client_id: str | None, raw: bytes) -> None:
        """Keep one event's original bytes."""
        with self._lock:
            self._add(model, client_id, raw)

    def add_many(self, models: Iterable[str], clients: Iterable[str | None], raws: Iterable[bytes]) -> None:
        """Keep a batch of events, in order (three parallel sequences): ``add`` with the lock taken once
        and its body inlined, since this is per-event work."""
        model_rings, client_rings = self._models, self._clients
        per_model, per_client, max_models, max_clients = self.per_model, self.per_client, self.max_models, self.max_clients
        keep_clients = bool(max_clients and per_client)
        last_model, ring = None, None
        with self._lock:
            for model, client_id, raw in zip(models, clients, raws):
                if model != last_model:  # batches come grouped by model: look it up once per run
                    ring = model_rings.get(model)
                    if ring is None:
                        if len(model_rings) >= max_models:
                            model_rings.popitem(last=False)
                        ring = model_rings[model] = deque(maxlen=per_model)
                    else:
                        model_rings.move_to_end(model)
                    last_model = model
                ring.append((client_id, raw))  # type: ignore[union-attr]
                if client_id and keep_clients:
                    key = (model, client_id)
                    mine = client_rings.get(key)
                    if mine is None:
                        if len(client_rings) >= max_clients:
                            mine = client_rings.popitem(last=False)[1]  # reused: no allocation under churn
                            mine.clear()
                        else:
                            mine = deque(maxlen=per_client)
                        client_rings[key] = mine
                    else:
                        client_rings.move_to_end(key)
                    mine.append(raw)

    def _add(self, model: str, client_id: str | None, raw: bytes) -> None:
        models = self._models
        ring = models.get(model)
        if ring is None:
            if len(models) >= self.max_models:
                models.popitem(last=False)
            ring = models[model] = deque(maxlen=self.per_model)
        else:
            models.move_to_end(model)
        ring.append((client_id, raw))
        if client_id and self.max_clients and self.per_client:
            clients = self._clients
            key = (model, client_id)
            mine = clients.get(key)
            if mine is None:
                if len(clients) >= self.max_clients:
                    mine = clients.popitem(last=False)[1]
                    mine.clear()
                else:
                    mine = deque(maxlen=self.per_client)
                clients[key] = mine
            else:
                clients.move_to_end(key)
            mine.append(raw)

    def last(self, model: str, client_id: str | None, n: int) -> list[bytes]:
        """The newest ``n`` events of ``client_id`` on ``model`` (of the whole model when None), oldest first."""
        if n <= 0:
            return []
        with self._lock:
            ring = self._models.get(model)
            if not client_id:
                return [raw for _, raw in list(ring)[-n:]] if ring else []
            own = list(self._clients.get((model, client_id)) or ())
            in_model = [raw for client, raw in ring if client == client_id] if ring else []
        # Both are suffixes of the client's sequence of events on this model: the longer holds the other.
        longer = in_model if len(in_model) > len(own) else own
        return longer[-n:]

    def stats(self) -> dict[str, int]:
        """How much is kept: models, client rings, and events in each kind of ring."""
        with self._lock:
            return {"models": len(self._models), "clients": len(self._clients),
                    "model_events": sum(len(r) for r in self._models.values()),
                    "client_events": sum(len(r) for r in self._clients.values())}
