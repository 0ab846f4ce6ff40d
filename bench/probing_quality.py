"""Query-probing detection quality and cost, side by side on the same streams: this project's per-client
`probing` detector (monitor/detectors/probing.py), PRADA (Juuti et al. 2019, delta = 0.95) and a
Chen-style stateful k-NN (Chen, Carlini, Wagner 2019, K = 50, threshold at 0.1% of benign queries), the
latter two from bench/probing_references.py. Target (the issue): every attack type detected within 100
of the attacker's queries, no more than 0.1% of benign clients flagged, ahead of both references; an
amortized cost of at most 20 µs an event at 64 features with 10,000 active clients.

The workload (tests/probing_workload.py): an MLP on scikit-learn's 8x8 digits (64 features in [0, 1])
behind a prediction API. One stream, every client's queries interleaved by timestamp; every detector
reads the same streams in the same order (the references keep one state per client, so they see each
client's queries in the same order as ours does):
  benign      --benign clients (default 2,000), kinds drawn as the workload draws them (typical 40%,
              resubmitter, narrow, batch_scorer 20% each), each --benign-queries queries (uniform in the
              range), at human rates: exponential gaps, each client's mean rate log-uniform in
              0.1-0.5 queries/s, starting at a random time in a --span second window.
  fast        --fast-scorers benign batch_scorer clients (a pass over the pool, one query per image) at
              10-50 queries/s, 1,000-2,000 queries each: as fast as the attackers, to test the rate
              signal honestly. They count as benign clients.
  attacks     --attackers per attack type (jacobian, random, boundary, nes; default 20), each
              --attack-queries queries (default 1,000) at 10-50 queries/s (exponential gaps).
  Sybil       a Sybil split: the attacker sends one attack's query sequence round-robin from k client
              ids (tests/probing_workload.sybil_split), so each id carries every k-th query: 1/k of the
              volume, at 1/k of the rate, the same kind of steps (a k-th as many of them, k times as
              far apart for a walk). A per-client detector then sees k short, slow clients instead of
              one: each id must be caught on its own, and the attacker's queries before its first id
              is caught rise about k-fold if the per-id detection point stays the same. --sybil-attackers
              per attack and k (default 5), --sybil-queries each (default 2,000), k in --sybil-ks
              (default 5, 20); the attacker's total rate is 10-50 queries/s, shared by its ids.

Detectors:
  ours        Probing("m", Params(**--params)), fed batches of --batch events (default 2,000) in stream
              order, its reference the first 2,000 events (benign reference queries, one batch, before the
              stream). Its detection's evidence["client_queries"] is the client's query count at the
              crossing; the alarm is out when the batch ends ("at batch end": the client's queries by
              then). "content" leaves out query_flood (the rate signal), which the references do not have.
              --confidence adds the `confidence` detector on the same batches, bound as the daemon binds
              it, so the boundary signal can fire (off by default).
  PRADA       Prada(delta=0.95), per query (features, the model's label).
  Chen kNN    ChenKnn(k=50, fp_rate=0.001) on a 16-dimension PCA of the same benign reference, its
              threshold calibrated on --calibration-clients separate benign clients (other seeds, the same
              mix of kinds, each query against its own client's earlier ones) at 0.1% per query.
  A client counts as flagged at the first query a detector flags it (any kind, for ours).

Cost: ours on a separate stream of --timing-events events (default 200,000) from --timing-clients
benign-like clients (default 10,000; benign reference queries, each event's client drawn uniformly, about
0.2 queries/s per client), batches of --timing-batch (default 20,000), the first batch untimed (it admits
the clients). Timed with the batch's parsed columns (features, classes, client ids, ts) built before the
timing, as the daemon builds them once per batch for all its detectors, and timed with that parse
included; the JSON decode of the events is in neither. Bytes per tracked client: the client table's
arrays over its slots. The references' µs/event are their mean over the main stream's queries.

    PYTHONPATH=. .venv/bin/python bench/probing_quality.py            # the default run (about 2.5 min on 2 cores, 1.8 GB)
    PYTHONPATH=. .venv/bin/python bench/probing_quality.py --quick    # 1,000 benign, 5 attackers per attack
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

START = time.perf_counter()
T0 = 1.7e9  # the stream's epoch
BENIGN_MIX = (0.4, 0.2, 0.2, 0.2)  # the workload's own draw of kinds
CONTENT_KINDS = ("model_extraction", "adversarial_probing")
TARGET_QUERIES = 100
TARGET_BENIGN = 0.001
TARGET_US = 20.0


def progress(text: str) -> None:
    print(f"[{time.perf_counter() - START:7.1f}s] {text}", file=sys.stderr, flush=True)


# -- the stream -------------------------------------------------------------------------------------


@dataclass
class Client:
    id: str
    group: str  # benign, fast, attack, sybil
    kind: str  # the benign kind or the attack
    n: int
    attacker: int = 0  # attack, sybil: which attacker of its kind
    k: int = 1  # sybil: ids of the attacker
    j: int = 0  # sybil: this id's place in the round-robin


@dataclass
class Stream:
    clients: list[Client]
    X: np.ndarray  # events x 64, rounded as sent (4 decimals)
    ts: np.ndarray
    client: np.ndarray  # index into clients
    labels: np.ndarray
    probs: np.ndarray  # rounded as sent (5 decimals)
    span: float


def rng_for(seed: int, *tags: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, *tags]))


def arrivals(rng: np.random.Generator, n: int, rate: float, start: float) -> np.ndarray:
    return start + np.cumsum(rng.exponential(1.0 / rate, size=n))


def build_stream(w: Any, args: argparse.Namespace) -> Stream:
    from tests.probing_workload import ATTACKS, BENIGN_KINDS, benign_client

    clients: list[Client] = []
    parts: list[tuple[np.ndarray, np.ndarray, int]] = []  # (queries, ts, client index)
    span = args.span

    def add(client: Client, X: np.ndarray, ts: np.ndarray) -> None:
        parts.append((X, ts, len(clients)))
        clients.append(client)

    lo, hi = args.benign_queries
    for i in range(args.benign):
        rng = rng_for(args.seed, 1, i)
        kind = BENIGN_KINDS[rng.choice(len(BENIGN_KINDS), p=BENIGN_MIX)]
        n = int(rng.integers(lo, hi + 1))
        X = benign_client(w, rng, n, kind)
        rate = float(np.exp(rng.uniform(np.log(0.1), np.log(0.5))))
        duration = n / rate
        ts = arrivals(rng, n, rate, rng.uniform(0, max(0.0, span - duration)))
        add(Client(f"c{len(clients):05d}", "benign", kind, n), X, ts)
    for i in range(args.fast_scorers):
        rng = rng_for(args.seed, 2, i)
        n = int(rng.integers(1000, 2001))
        X = benign_client(w, rng, n, "batch_scorer")
        rate = float(rng.uniform(10, 50))
        add(Client(f"c{len(clients):05d}", "fast", "batch_scorer (fast)", n), X,
            arrivals(rng, n, rate, rng.uniform(0, span - n / rate)))
    progress(f"benign clients drawn ({args.benign} + {args.fast_scorers} fast)")
    for a, (name, attack) in enumerate(ATTACKS.items()):
        for m in range(args.attackers):
            rng = rng_for(args.seed, 3, a, m)
            X = attack(w, rng, args.attack_queries)
            rate = float(rng.uniform(10, 50))
            start = rng.uniform(60, span - args.attack_queries / rate)
            add(Client(f"c{len(clients):05d}", "attack", name, len(X), attacker=m), X,
                arrivals(rng, len(X), rate, start))
        for kk, k in enumerate(args.sybil_ks):
            for m in range(args.sybil_attackers):
                rng = rng_for(args.seed, 4, a, kk, m)
                X = attack(w, rng, args.sybil_queries)
                rate = float(rng.uniform(10, 50))
                ts = arrivals(rng, len(X), rate, rng.uniform(60, span - args.sybil_queries / rate))
                for j in range(k):
                    add(Client(f"c{len(clients):05d}", "sybil", name, len(X[j::k]), attacker=m, k=k, j=j),
                        X[j::k], ts[j::k])
        progress(f"attack {name} drawn")
    X = np.round(np.concatenate([p[0] for p in parts]), 4)
    ts = np.concatenate([p[1] for p in parts])
    client = np.concatenate([np.full(len(p[0]), p[2], dtype=np.int32) for p in parts])
    order = np.argsort(ts, kind="stable")  # each client's queries keep their order (increasing ts)
    X, ts, client = X[order], ts[order], client[order]
    labels, probs = oracle(w, X)
    return Stream(clients, X, ts, client, labels, np.round(probs, 5), span)


def oracle(w: Any, X: np.ndarray, chunk: int = 50_000) -> tuple[np.ndarray, np.ndarray]:
    from threadpoolctl import threadpool_limits

    labels, probs = [], []
    with threadpool_limits(1):
        for lo in range(0, len(X), chunk):
            lab, pr = w.oracle(X[lo:lo + chunk])
            labels.append(lab)
            probs.append(pr)
    return np.concatenate(labels), np.concatenate(probs)


# -- ours -------------------------------------------------------------------------------------------


class Feeder:
    """Turns rows into decoded events and ModelBatches, as the daemon's pipeline would hand them over."""

    def __init__(self) -> None:
        import msgspec

        from monitor.events import EventDecoder

        self.encode = msgspec.json.encode
        self.decoder = EventDecoder()
        self.offset = 0

    def batch(self, X: np.ndarray, probs: np.ndarray, labels: np.ndarray, ids: list[str], ts: np.ndarray) -> Any:
        from monitor.detectors import ModelBatch

        decode, encode, o = self.decoder.decode, self.encode, self.offset
        events = [decode(encode({"event_id": f"e{o + i}", "ts": t, "model": "m", "features": x,
                                 "probabilities": p, "prediction": lab, "client_id": c}))
                  for i, (x, p, lab, c, t) in enumerate(zip(X.tolist(), probs.tolist(), labels.tolist(), ids,
                                                            ts.tolist()))]
        records = [SimpleNamespace(topic="inference", partition=0, offset=o + i) for i in range(len(events))]
        self.offset += len(events)
        return ModelBatch("m", events, records)


def make_ours(w: Any, args: argparse.Namespace, feeder: Feeder, ts0: float, confidence: bool = False) -> Any:
    from monitor.detectors.probing import Probing

    d = Probing("m", Probing.Params(**args.params))
    peers = [d]
    if confidence:
        from monitor.detectors.confidence import LowConfidence
        peers.insert(0, LowConfidence("m", LowConfidence.Params()))
    d.bind(peers)
    ref = np.round(w.reference(d.params.reference_size, rng_for(args.seed, 9)), 4)
    labels, probs = oracle(w, ref)
    b = feeder.batch(ref, np.round(probs, 5), labels, ["reference"] * len(ref),
                     ts0 - 1.0 - np.arange(len(ref))[::-1] * 0.01)
    for p in peers:
        p.update(b)
    assert d.built, "the probing detector did not build its reference"
    return d, peers


@dataclass
class First:
    """A detector's first flag of a client."""
    query: int  # the client's query count at the flag
    at_batch_end: int = 0  # ours: the client's queries by the end of the batch that raised it
    what: str = ""  # ours: kind [signals]


def run_ours(w: Any, s: Stream, args: argparse.Namespace) -> dict[str, Any]:
    feeder = Feeder()
    d, peers = make_ours(w, args, feeder, T0 + float(s.ts[0]), confidence=args.confidence)
    index = {c.id: i for i, c in enumerate(s.clients)}
    ids = [c.id for c in s.clients]
    first_any: dict[int, First] = {}
    first_content: dict[int, First] = {}
    kinds: dict[int, dict[str, int]] = {}  # client -> kind -> the client's query count at its first alarm
    seen = np.zeros(len(s.clients), dtype=np.int64)
    spent = build = 0.0
    for lo in range(0, len(s.X), args.batch):
        hi = min(lo + args.batch, len(s.X))
        t = time.perf_counter()
        b = feeder.batch(s.X[lo:hi], s.probs[lo:hi], s.labels[lo:hi], [ids[c] for c in s.client[lo:hi]],
                         T0 + s.ts[lo:hi])
        t1 = time.perf_counter()
        found = []
        for p in peers:
            out = p.update(b)
            if p is d:
                found = out
        spent += time.perf_counter() - t1
        build += t1 - t
        np.add.at(seen, s.client[lo:hi], 1)
        found = [f for f in found if f.detector == "probing"]
        by_client: dict[int, list[Any]] = {}
        for f in found:
            by_client.setdefault(index[f.client_id], []).append(f)
        for c, fs in by_client.items():
            for f in fs:
                kinds.setdefault(c, {}).setdefault(f.kind, int(f.evidence["client_queries"]))
            for table, keep in ((first_any, fs), (first_content, [f for f in fs if f.kind in CONTENT_KINDS])):
                if c in table or not keep:
                    continue
                q = min(int(f.evidence["client_queries"]) for f in keep)
                what = " + ".join(sorted({f"{f.kind} [{', '.join(f.evidence['fired'])}]" for f in keep
                                          if int(f.evidence["client_queries"]) == q}))
                table[c] = First(q, int(seen[c]), what)
        if (lo // args.batch) % 50 == 0:
            progress(f"ours: {hi:,}/{len(s.X):,} events")
    desc = d.describe()
    return {"any": first_any, "content": first_content, "kinds": kinds, "us": spent / len(s.X) * 1e6,
            "build_us": build / len(s.X) * 1e6, "describe": desc, "bytes": d.clients.bytes_per_client()}


# -- the references ---------------------------------------------------------------------------------


def calibrate_chen(w: Any, args: argparse.Namespace) -> tuple[Any, float, int]:
    from bench.probing_references import ChenKnn
    from tests.probing_workload import BENIGN_KINDS, benign_client

    chen = ChenKnn(k=50, fp_rate=0.001, reference=np.round(w.reference(2000, rng_for(args.seed, 9)), 4))
    lo, hi = args.benign_queries
    streams = []
    for i in range(args.calibration_clients):
        rng = rng_for(args.seed, 5, i)  # other seeds than the stream's benign clients
        kind = BENIGN_KINDS[rng.choice(len(BENIGN_KINDS), p=BENIGN_MIX)]
        streams.append(np.round(benign_client(w, rng, int(rng.integers(lo, hi + 1)), kind), 4))
    t = time.perf_counter()
    threshold = chen.calibrate(streams)
    return chen, time.perf_counter() - t, sum(len(x) - chen.k for x in streams)


def run_references(w: Any, s: Stream, args: argparse.Namespace, chen: Any) -> dict[str, Any]:
    from bench.probing_references import Prada

    prada = Prada(delta=0.95)
    benign = [i for i, c in enumerate(s.clients) if c.group == "benign"]
    run_on = np.ones(len(s.clients), dtype=bool)
    if args.reference_benign is not None and args.reference_benign < len(benign):
        skip = rng_for(args.seed, 6).choice(benign, size=len(benign) - args.reference_benign, replace=False)
        run_on[skip] = False
    ids = [c.id for c in s.clients]
    out: dict[str, Any] = {"run_on": run_on}
    for name, det in (("PRADA", prada), ("Chen kNN", chen)):
        first: dict[int, First] = {}
        count = np.zeros(len(s.clients), dtype=np.int64)
        update = det.update
        fed = 0
        t = time.perf_counter()
        for x, lab, c in zip(s.X, s.labels.tolist(), s.client.tolist()):
            if not run_on[c]:
                continue
            count[c] += 1
            fed += 1
            if update(ids[c], x, lab) and c not in first:
                first[c] = First(int(count[c]))
        took = time.perf_counter() - t
        out[name] = {"first": first, "us": took / max(1, fed) * 1e6, "fed": fed, "seconds": took}
        progress(f"{name}: {fed:,} queries in {took:.0f}s")
    # memory per client, over the benign clients run (numpy buffers + 32 B per stored Python float)
    run_benign = [ids[i] for i in benign if run_on[i]]
    pb = [sum(r.data.nbytes for r in st.growing.values()) + 32 * (len(st.distances)
          + sum(len(v) for v in st.growing_dists.values()))
          for cid in run_benign if (st := prada._clients.get(cid)) is not None]
    cb = [chen._buffers[cid][0].nbytes for cid in run_benign if cid in chen._buffers]
    out["PRADA"]["bytes"] = float(np.mean(pb)) if pb else 0.0
    out["Chen kNN"]["bytes"] = float(np.mean(cb)) if cb else 0.0
    return out


# -- cost -------------------------------------------------------------------------------------------


def timing(w: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Ours at 64 features and --timing-clients active clients: µs/event with and without the parse."""
    rng = rng_for(args.seed, 7)
    n, C, size = args.timing_events, args.timing_clients, args.timing_batch
    X = np.round(w.reference(n, rng), 4)
    labels, probs = oracle(w, X)
    probs = np.round(probs, 5)
    ids = [f"t{i}" for i in rng.integers(0, C, n)]
    ts = T0 + np.arange(n) * (C / 0.2 / n)  # about 0.2 queries/s per client
    feeder = Feeder()
    events_batches = [feeder.batch(X[lo:lo + size], probs[lo:lo + size], labels[lo:lo + size], ids[lo:lo + size],
                                   ts[lo:lo + size]) for lo in range(0, n, size)]
    progress(f"timing stream: {n:,} events decoded")
    from monitor.detectors import ModelBatch

    results: dict[str, list[float]] = {"without parse": [], "with parse": [], "parse only": []}
    tracked = bytes_per = 0
    for r in range(args.timing_repeats):
        for mode in (("without parse", "with parse") if r % 2 == 0 else ("with parse", "without parse")):
            d, _ = make_ours(w, args, Feeder(), float(ts[0]))
            batches = [ModelBatch(b.model, b.events, b.records) for b in events_batches]  # fresh caches
            parse = 0.0
            if mode == "without parse":
                for b in batches:
                    t = time.perf_counter()
                    b.features; b.classes; b.client_ids; b.ts  # noqa: B018  (the pipeline's shared parse)
                    parse += time.perf_counter() - t
            d.update(batches[0])  # warm-up: admits most clients, grows the table
            timed = sum(len(b) for b in batches[1:])
            t = time.perf_counter()
            for b in batches[1:]:
                d.update(b)
            results[mode].append((time.perf_counter() - t) / timed * 1e6)
            if mode == "without parse":
                results["parse only"].append(parse / n * 1e6)
            tracked = len(d.clients.slot_of)
            bytes_per = d.clients.bytes_per_client()
        progress(f"timing repeat {r + 1}: without parse {results['without parse'][-1]:.1f} µs/event, "
                 f"with {results['with parse'][-1]:.1f}")
    return {"results": results, "tracked": tracked, "bytes": bytes_per, "timed": n - size}


# -- summaries ----------------------------------------------------------------------------------------


def fmt_q(v: float, budget: int) -> str:
    return f"> {budget:,}" if not np.isfinite(v) else f"{v:,.0f}"


def queries_summary(firsts: dict[int, First], members: list[int], budget: int) -> dict[str, Any]:
    q = np.array([firsts[c].query if c in firsts else np.inf for c in members], dtype=float)
    return {"n": len(members), "detected": int(np.isfinite(q).sum()), "within": int((q <= TARGET_QUERIES).sum()),
            "median": float(np.median(q)) if len(q) else np.nan, "max": float(q.max()) if len(q) else np.nan,
            "q": q}


def code_version() -> str:
    """Which code ran (bench/provenance.py)."""
    from provenance import code_version as version
    return version([os.path.join("monitor", "detectors", f) for f in ("probing.py", "shapiro.py", "cusum.py")]
            + [os.path.join("tests", "probing_workload.py"), os.path.join("bench", "probing_references.py")], "detector, workload and reference files")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--benign", type=int, default=2000, help="benign clients at human rates (>= 1,000 for the "
                        "0.1%% target to mean anything)")
    parser.add_argument("--benign-queries", default="200,400", help="range of queries per benign client")
    parser.add_argument("--fast-scorers", type=int, default=10, help="benign batch scorers at 10-50 queries/s")
    parser.add_argument("--attackers", type=int, default=20, help="attackers per attack type")
    parser.add_argument("--attack-queries", type=int, default=1000, help="queries per attacker")
    parser.add_argument("--sybil-ks", default="5,20", help="ids per Sybil attacker, comma-separated")
    parser.add_argument("--sybil-attackers", type=int, default=5, help="Sybil attackers per attack type and k")
    parser.add_argument("--sybil-queries", type=int, default=2000, help="queries per Sybil attacker (all its ids)")
    parser.add_argument("--span", type=float, default=3600.0, help="seconds of event time the stream covers")
    parser.add_argument("--batch", type=int, default=2000, help="events per batch for ours")
    parser.add_argument("--params", default="{}", metavar="JSON", help="Probing.Params overrides, e.g. '{\"k\": 8}'")
    parser.add_argument("--confidence", action="store_true",
                        help="also run the confidence detector, bound to ours (enables the boundary signal)")
    parser.add_argument("--calibration-clients", type=int, default=300, help="benign clients to calibrate Chen kNN")
    parser.add_argument("--reference-benign", type=int, default=None,
                        help="run the references on this many of the benign clients only (default: all)")
    parser.add_argument("--no-references", action="store_true", help="ours only")
    parser.add_argument("--timing-clients", type=int, default=10_000)
    parser.add_argument("--timing-events", type=int, default=200_000)
    parser.add_argument("--timing-batch", type=int, default=20_000)
    parser.add_argument("--timing-repeats", type=int, default=3, help="timing runs per mode (alternating order)")
    parser.add_argument("--no-timing", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="1,000 benign, 5 attackers per attack, 2 Sybil "
                        "attackers per attack and k, 100 calibration clients, one 100,000-event timing run")
    args = parser.parse_args()
    if args.quick:
        args.benign, args.attackers, args.sybil_attackers, args.calibration_clients = 1000, 5, 2, 100
        args.timing_events, args.timing_repeats = 100_000, 1
    args.benign_queries = tuple(int(v) for v in args.benign_queries.split(","))
    args.sybil_ks = [int(v) for v in args.sybil_ks.split(",") if v.strip()]
    args.params = json.loads(args.params)
    if args.benign_queries[0] < 60 or args.benign_queries[0] > args.benign_queries[1]:
        parser.error("--benign-queries: expected lo,hi with 60 <= lo <= hi")

    import numpy
    import scipy

    from tests.probing_workload import ATTACKS, BENIGN_KINDS, build

    started = time.perf_counter()
    w = build(0)
    print(f"# probing quality: ours vs PRADA (delta 0.95) vs Chen kNN (K 50, 0.1% per query)\n")
    print(f"Python {sys.version.split()[0]}, numpy {numpy.__version__}, scipy {scipy.__version__}; {code_version()}; "
          f"seed {args.seed}; ours: Probing.Params({', '.join(f'{k}={v!r}' for k, v in args.params.items())})"
          + (" + the confidence detector (boundary signal)" if args.confidence else
             " without the confidence detector (no boundary signal)"))
    from tests.probing_workload import augment
    augmented = float((w.oracle(augment(w.x_pool, rng_for(args.seed, 8)))[0] == w.y_pool).mean())
    print(f"Model: MLP on 8x8 digits (64 features), accuracy {w.accuracy:.3f} on the held-out pool, {augmented:.3f} on "
          "the same images augmented as benign clients send them (a 1-pixel shift, x0.8-1.2, noise): benign "
          "queries' predicted classes are far more spread than their true classes.\n")

    s = build_stream(w, args)
    counts = {g: sum(1 for c in s.clients if c.group == g) for g in ("benign", "fast", "attack", "sybil")}
    per_group = {g: int(sum(c.n for c in s.clients if c.group == g)) for g in counts}
    n_benign = counts["benign"] + counts["fast"]
    print("## Setup\n")
    print("| group | clients | queries | rate (queries/s per client) |")
    print("|---|---|---|---|")
    lo, hi = args.benign_queries
    print(f"| benign (human rate) | {counts['benign']:,} | {per_group['benign']:,} ({lo}-{hi} each) | 0.1-0.5 |")
    print(f"| benign batch_scorer (fast) | {counts['fast']} | {per_group['fast']:,} (1,000-2,000 each) | 10-50 |")
    print(f"| attackers | {counts['attack']} ({args.attackers} x {len(ATTACKS)} attacks) | {per_group['attack']:,} "
          f"({args.attack_queries:,} each) | 10-50 |")
    print(f"| Sybil ids | {counts['sybil']} ({args.sybil_attackers} attackers x {len(ATTACKS)} attacks x k in "
          f"{args.sybil_ks}) | {per_group['sybil']:,} ({args.sybil_queries:,} per attacker) | 10-50 per attacker, "
          "/ k per id |")
    print(f"\n{len(s.X):,} events over {s.span:,.0f} s of event time, interleaved by timestamp; ours in batches of "
          f"{args.batch:,} (about {args.batch / (len(s.X) / s.span):.0f} s of traffic each at the stream's mean "
          f"{len(s.X) / s.span:.0f} events/s). Benign clients: {n_benign:,} (resolution: one client = {1 / n_benign:.3%}; the 0.1% "
          f"target allows {int(TARGET_BENIGN * n_benign)}).")

    ours = run_ours(w, s, args)
    refs: dict[str, Any] = {}
    chen_note = ""
    if not args.no_references:
        chen, cal_s, cal_q = calibrate_chen(w, args)
        chen_note = (f"Chen kNN threshold {chen.threshold:.4g} (16-d PCA), calibrated on {args.calibration_clients} "
                     f"separate benign clients ({cal_q:,} scored queries) at 0.1% per query, {cal_s:.0f}s.")
        progress("Chen kNN calibrated")
        refs = run_references(w, s, args, chen)
    detectors = ["ours", "ours (content)"] + [n for n in ("PRADA", "Chen kNN") if n in refs]

    def firsts(name: str) -> dict[int, First]:
        return ours["any"] if name == "ours" else ours["content"] if name == "ours (content)" else refs[name]["first"]

    def ran(name: str, c: int) -> bool:
        return name.startswith("ours") or bool(refs["run_on"][c])

    b = ours["describe"]["bounds"]
    print(f"\nOurs: bounds neighbours {b['neighbours']:.3g}, PRADA W < {b['prada_w']:.3f}, off-reference "
          f"{b['off_reference']:.3g}, marks CUSUM h {b['marks_cusum']:.3g}; {ours['describe']['clients_tracked']:,} "
          f"clients tracked at the end, {ours['describe']['untracked_queries']} queries untracked.")
    if chen_note:
        print(chen_note)
    if refs and not refs["run_on"].all():
        print(f"The references ran on {int(refs['run_on'][[i for i, c in enumerate(s.clients) if c.group == 'benign']].sum()):,} "
              f"of the {counts['benign']:,} human-rate benign clients (a seeded subsample), and on every other client.")

    # -- attacks
    print(f"\n## Attacks: queries to the first detection (the attacker's own queries, budget "
          f"{args.attack_queries:,})\n")
    print("| attack | detector | attackers | detected | within 100 | median | max | ours: median at batch end |")
    print("|---|---|---|---|---|---|---|---|")
    summary: dict[tuple[str, str], dict[str, Any]] = {}
    for name in ATTACKS:
        members = [i for i, c in enumerate(s.clients) if c.group == "attack" and c.kind == name]
        for det in detectors:
            r = summary[name, det] = queries_summary(firsts(det), members, args.attack_queries)
            end = ""
            if det.startswith("ours"):
                ends = [firsts(det)[c].at_batch_end if c in firsts(det) else np.inf for c in members]
                end = fmt_q(float(np.median(ends)), args.attack_queries)
            print(f"| {name} | {det} | {r['n']} | {r['detected']}/{r['n']} | {r['within']}/{r['n']} | "
                  f"{fmt_q(r['median'], args.attack_queries)} | {fmt_q(r['max'], args.attack_queries)} | {end} |")
    print(f"\n'At batch end': the attacker's queries answered by the end of the batch whose update raised the "
          f"alarm (here a batch is about {args.batch / (len(s.X) / s.span):.0f} s of traffic, in which an attacker "
          "at 10-50 queries/s sends hundreds of queries); the earlier columns count to the crossing query.")
    print("\nOurs, the first detection of each attacker (kind [signals that fired]: attackers):\n")
    for name in ATTACKS:
        members = [i for i, c in enumerate(s.clients) if c.group == "attack" and c.kind == name]
        whats: dict[str, int] = {}
        for c in members:
            key = ours["any"][c].what if c in ours["any"] else "not detected"
            whats[key] = whats.get(key, 0) + 1
        later = []
        for kind in ("model_extraction", "adversarial_probing", "query_flood"):
            at = [ours["kinds"][c][kind] for c in members if kind in ours["kinds"].get(c, {})]
            if at:
                later.append(f"{kind} {len(at)}/{len(members)} (median query {np.median(at):,.0f})")
        print(f"- {name}: " + "; ".join(f"{k}: {v}" for k, v in sorted(whats.items(), key=lambda kv: -kv[1]))
              + ". Every kind that fired on them: " + ", ".join(later))

    # -- benign
    print("\n## Benign clients flagged (count / clients run, share)\n")
    print("| benign kind | clients | " + " | ".join(detectors) + " |")
    print("|---|---|" + "---|" * len(detectors))
    groups = [(k, [i for i, c in enumerate(s.clients) if c.group == "benign" and c.kind == k]) for k in BENIGN_KINDS]
    groups.append(("batch_scorer (fast)", [i for i, c in enumerate(s.clients) if c.group == "fast"]))
    groups.append(("all human-rate", [i for i, c in enumerate(s.clients) if c.group == "benign"]))
    groups.append(("all benign", [i for i, c in enumerate(s.clients) if c.group in ("benign", "fast")]))
    benign_share: dict[str, float] = {}
    for kind, members in groups:
        cells = []
        for det in detectors:
            run = [c for c in members if ran(det, c)]
            flagged = sum(1 for c in run if c in firsts(det))
            share = flagged / max(1, len(run))
            if kind == "all benign":
                benign_share[det] = share
            cells.append(f"{flagged}/{len(run)} ({share:.2%})")
        print(f"| {kind} | {len(members):,} | " + " | ".join(cells) + " |")
    flagged_ours = [(c, ours["any"][c]) for kind, members in groups[-1:] for c in members if c in ours["any"]]
    if flagged_ours:
        print("\nOurs, the benign clients flagged (kind: query at the flag, what fired):\n")
        for c, f in flagged_ours[:30]:
            labels = s.labels[s.client == c]
            print(f"- {s.clients[c].kind} ({s.clients[c].n} queries, {len(np.unique(labels))} predicted classes, "
                  f"{len(np.unique(labels[:f.query]))} by the flag): query {f.query}, {f.what}")
        if len(flagged_ours) > 30:
            print(f"- ... and {len(flagged_ours) - 30} more")

    # -- Sybil
    print("\n## Sybil split: each attack round-robin over k ids (k = 1: the single attackers above)\n")
    print("Each id carries every k-th query of one attack at 1/k of the attacker's rate. Columns: ids flagged; "
          "attackers with at least one id flagged; the per-id query count at an id's first flag (median over "
          "flagged ids); the attacker's total queries sent when its first id is flagged (median over attackers; "
          "'>' = none of its ids flagged within the budget).\n")
    print("| attack | k | detector | ids flagged | attackers caught | per-id queries at flag | attacker's queries "
          "before its first flag |")
    print("|---|---|---|---|---|---|---|")
    sybil_gain: dict[tuple[str, int, str], float] = {}
    for name in ATTACKS:
        single = [i for i, c in enumerate(s.clients) if c.group == "attack" and c.kind == name]
        for det in detectors:
            r = summary[name, det]
            sybil_gain[name, 1, det] = r["median"]
            print(f"| {name} | 1 | {det} | {r['detected']}/{r['n']} | {r['detected']}/{r['n']} | "
                  f"{fmt_q(r['median'], args.attack_queries)} | {fmt_q(r['median'], args.attack_queries)} |")
        for k in args.sybil_ks:
            members = [i for i, c in enumerate(s.clients) if c.group == "sybil" and c.kind == name and c.k == k]
            for det in detectors:
                f = firsts(det)
                flagged = [c for c in members if c in f]
                per_id = [f[c].query for c in flagged]
                totals = []
                for m in range(args.sybil_attackers):
                    mine = [c for c in members if s.clients[c].attacker == m]
                    t = [s.clients[c].j + (f[c].query - 1) * k + 1 for c in mine if c in f]
                    totals.append(min(t) if t else np.inf)
                caught = sum(1 for t in totals if np.isfinite(t))
                med = float(np.median(totals))
                sybil_gain[name, k, det] = med
                print(f"| {name} | {k} | {det} | {len(flagged)}/{len(members)} ({len(flagged) / len(members):.0%}) | "
                      f"{caught}/{args.sybil_attackers} | {f'{np.median(per_id):,.0f}' if per_id else '-'} | "
                      f"{fmt_q(med, args.sybil_queries)} |")
    print("\nWhat the attacker gains (ours, any kind): the median of its queries answered before its first "
          "flag, k = 1 -> " + " -> ".join(f"k = {k}" for k in args.sybil_ks) + ":\n")
    for name in ATTACKS:
        seq = [fmt_q(sybil_gain[name, 1, "ours"], args.attack_queries)]
        seq += [fmt_q(sybil_gain[name, k, "ours"], args.sybil_queries) for k in args.sybil_ks]
        print(f"- {name}: " + " -> ".join(seq))

    # -- cost
    tim = None if args.no_timing else timing(w, args)
    print("\n## Cost\n")
    print("| detector | setting | µs/event | bytes per tracked client |")
    print("|---|---|---|---|")
    if tim:
        res = tim["results"]
        setting = (f"{tim['tracked']:,} clients tracked, {tim['timed']:,} events timed in batches of "
                   f"{args.timing_batch:,}, 64 features; best of {args.timing_repeats} (all: ")
        print(f"| ours, parse outside (as the daemon shares it) | {setting}"
              f"{', '.join(f'{v:.1f}' for v in res['without parse'])}) | {min(res['without parse']):.1f} | "
              f"{tim['bytes']:,} |")
        print(f"| ours, parse included | the same; the parse alone {min(res['parse only']):.1f} µs/event "
              f"(all: {', '.join(f'{v:.1f}' for v in res['with parse'])}) | {min(res['with parse']):.1f} | "
              f"{tim['bytes']:,} |")
    print(f"| ours, main stream | parse included, {len(s.X):,} events, batches of {args.batch:,}"
          f"{' (+ confidence)' if args.confidence else ''}; building the events (JSON encode + decode) took "
          f"{ours['build_us']:.1f} µs/event more | {ours['us']:.1f} | {ours['bytes']:,} |")
    for name in ("PRADA", "Chen kNN"):
        if name in refs:
            r = refs[name]
            print(f"| {name} | per query in Python, main stream ({r['fed']:,} queries, {r['seconds']:.0f}s) | "
                  f"{r['us']:.1f} | {r['bytes']:,.0f} (mean over the benign clients run) |")
    print("\nOurs' bytes: the client table's numpy arrays over its slots (the id string and its dict entry, "
          "about 100 B more, are not counted). PRADA's: its stored queries and distances, growing with the "
          "client's queries (32 B per Python float). Chen kNN's: its 1,000 x 16 float64 buffer.")

    # -- targets
    print("\n## Targets\n")
    lines = []
    for det_label, det in (("any kind", "ours"), ("content signals only, without the rate signal", "ours (content)")):
        ok = {name: summary[name, det]["within"] == summary[name, det]["n"] for name in ATTACKS}
        lines.append(f"- Every attacker of every attack type detected within {TARGET_QUERIES} of its queries (ours, "
                     f"{det_label}): {'MET' if all(ok.values()) else 'NOT MET'} ("
                     + ", ".join(f"{n} {summary[n, det]['within']}/{summary[n, det]['n']}" for n in ATTACKS) + ")")
    flagged_n = sum(1 for c in range(len(s.clients)) if s.clients[c].group in ("benign", "fast") and c in ours["any"])
    lines.append(f"- At most 0.1% of benign clients flagged (ours, any kind): "
                 f"{'MET' if benign_share['ours'] <= TARGET_BENIGN else 'NOT MET'} ({flagged_n}/{n_benign}, "
                 f"{benign_share['ours']:.2%}; content kinds only {benign_share['ours (content)']:.2%})")
    for ref in ("PRADA", "Chen kNN"):
        if ref not in refs:
            continue
        behind = []
        for name in ATTACKS:
            o, r = summary[name, "ours"], summary[name, ref]
            if o["within"] < r["within"] or o["median"] > r["median"]:
                behind.append(f"{name} (ours {o['within']} within 100, median {fmt_q(o['median'], args.attack_queries)};"
                              f" {ref} {r['within']}, {fmt_q(r['median'], args.attack_queries)})")
        if benign_share["ours"] > benign_share[ref]:
            behind.append(f"benign flagged ({benign_share['ours']:.2%} vs {benign_share[ref]:.2%})")
        lines.append(f"- Ahead of {ref} (per attack: at least as many attackers within 100 and a median no later; "
                     f"no more benign clients flagged): {'MET' if not behind else 'NOT MET: ' + '; '.join(behind)}")
    if tim:
        best = min(tim["results"]["without parse"])
        with_parse = min(tim["results"]["with parse"])
        lines.append(f"- At most {TARGET_US:.0f} µs/event at 64 features with {args.timing_clients:,} active clients: "
                     f"{'MET' if best <= TARGET_US else 'NOT MET'} without the shared parse ({best:.1f}); "
                     f"{'met' if with_parse <= TARGET_US else 'not met'} with it ({with_parse:.1f})")
    print("\n".join(lines))
    print(f"\ntotal {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
