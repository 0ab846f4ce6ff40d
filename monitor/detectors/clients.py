"""What the per-client detectors (``confidence``, ``resource``) share: grouping a batch's events by
client, the model-wide rate a client is compared with, the eviction of idle clients, and the
``Detector`` methods that move a partition's clients between replicas (``ClientsByDict``)."""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np

STEP = 1.25  # the rate a client is compared with moves in steps of a quarter
MIN_BATCH = 200  # a batch's own rate counts from this many events (a batch of 3 says little)


def group_by_client(ids: list[str | None]) -> tuple[list[str | None], np.ndarray, np.ndarray, np.ndarray]:
    """(distinct ids in order of first appearance, the stable order that groups the events by id, the
    start and end of each id's run in that order)."""
    codes_of = dict(zip(dict.fromkeys(ids), itertools.count()))  # C loops: a poll has thousands of ids
    codes = np.fromiter(map(codes_of.__getitem__, ids), dtype=np.int64, count=len(ids))
    order = np.argsort(codes, kind="stable")
    sorted_codes = codes[order]
    starts = np.flatnonzero(np.r_[True, sorted_codes[1:] != sorted_codes[:-1]])
    ends = np.r_[starts[1:], len(order)]
    return list(codes_of), order, starts, ends


def compared_rate(p0: float, recent: float, batch_rate: float, batch_events: int) -> float:
    """The rate a client's marks are compared with: the reference rate ``p0``, or the model's current one
    (its ``recent`` rate, or this batch's when the batch is large enough to tell) when that is a quarter
    above it, so that when the whole model moves (a drift, a load spike) the clients do not alarm with
    it, while a client far above the rest still does. Steps of a quarter: few distinct rates, so few
    threshold calibrations (cached), and none while the model is calm."""
    rate = max(recent, batch_rate if batch_events >= MIN_BATCH else 0.0)
    if rate <= STEP * p0:
        return p0
    return p0 * STEP ** math.ceil(math.log(rate / p0) / math.log(STEP))


def evict(clients: dict[str, Any], now: float, idle: float, keep_above: float, limit: int, overflow: bool) -> int:
    """Forget the clients (objects with ``last_ts`` and ``statistic``) idle for longer than ``idle`` at
    event time ``now``, then, when ``overflow``, the least recently seen beyond ``limit`` (and a tenth of
    it more, so that eviction is not paid on every batch); never one whose statistic is above
    ``keep_above`` (half-way to an alarm). Returns how many."""
    before = len(clients)
    for c in [c for c, st in clients.items() if now - st.last_ts > idle and st.statistic <= keep_above]:
        del clients[c]
    excess = len(clients) - limit
    if overflow and excess > 0:
        candidates = sorted((st.last_ts, c) for c, st in clients.items() if st.statistic <= keep_above)
        for _, c in candidates[: excess + limit // 10]:
            del clients[c]
    return before - len(clients)


class ClientsByDict:
    """The per-partition ``Detector`` methods for a detector whose per-client state is the dict
    ``self.clients`` (client id -> a picklable state object)."""

    clients: dict[str, Any]

    def shared_state(self) -> dict[str, Any]:
        return {k: v for k, v in self.state().items() if k != "clients"}  # type: ignore[attr-defined]

    def tracked_clients(self) -> list[str]:
        return list(self.clients)

    def clients_state(self, owner: dict[str, Any]) -> dict[Any, dict[str, Any]]:
        out: dict[Any, dict[str, Any]] = {}
        for client, state in self.clients.items():
            key = owner.get(client)
            if key is not None:
                out.setdefault(key, {})[client] = state
        return out

    def adopt_clients(self, saved: dict[str, Any]) -> None:
        self.clients.update(saved)

    def forget_clients(self, ids: set[str]) -> None:
        clients = self.clients
        for c in ids:
            clients.pop(c, None)
