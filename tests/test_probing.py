"""The probing detector on a real model: a scikit-learn MLP on the digits images, benign clients that
query augmented real inputs, and four attacks that query the model adaptively (tests/probing_workload.py)."""

from __future__ import annotations

import pickle

import msgspec
import numpy as np
import pytest

from monitor.detectors import ModelBatch, registry
from monitor.detectors.confidence import LowConfidence
from monitor.detectors.probing import Probing
from monitor.errors import ConfigError
from monitor.events import EventDecoder
from tests.probing_workload import ATTACKS, BENIGN_KINDS, benign_client, build

T0 = 1_764_000_000.0


class Rec:
    def __init__(self, offset: int):
        self.topic, self.partition, self.offset = "logs", 0, offset


@pytest.fixture(scope="module")
def w():
    return build()


_decoder = EventDecoder()


def batch(w, x: np.ndarray, clients: list[str], ts: np.ndarray, start: int = 0) -> ModelBatch:
    labels, probabilities = w.oracle(x)
    events = [_decoder.decode(msgspec.json.encode({
        "event_id": f"e{start + i}", "ts": float(ts[i]), "model": "digits", "client_id": clients[i],
        "features": np.round(x[i], 4).tolist(), "probabilities": np.round(probabilities[i], 5).tolist(),
        "prediction": int(labels[i])})) for i in range(len(x))]
    return ModelBatch("digits", events, [Rec(start + i) for i in range(len(x))])


def armed(w, **params) -> Probing:
    """A detector with its benign reference learnt (2,000 augmented held-out images)."""
    d = Probing("digits", Probing.Params(**params))
    reference = w.reference(2000, np.random.default_rng(100))
    assert d.update(batch(w, reference, ["reference"] * 2000, T0 + np.arange(2000) * 0.01)) == []
    assert d.built
    return d


def interleave(streams: dict[str, np.ndarray], rng, seconds: dict[str, float], t0: float):
    """The clients' queries merged in time: each client at its own pace (seconds between queries)."""
    rows, clients, ts = [], [], []
    for client, x in streams.items():
        start = t0 + rng.uniform(0, 60)
        times = start + np.cumsum(rng.exponential(seconds[client], len(x)))
        rows.append(x)
        clients += [client] * len(x)
        ts.append(times)
    x, ts = np.concatenate(rows), np.concatenate(ts)
    order = np.argsort(ts, kind="stable")
    return x[order], [clients[i] for i in order.tolist()], ts[order]


def run(w, d: Probing, x, clients, ts, size: int = 2000) -> list:
    found = []
    for lo in range(0, len(x), size):
        found += d.update(batch(w, x[lo: lo + size], clients[lo: lo + size], ts[lo: lo + size], 10_000 + lo))
    return found


# -- benign clients and attacks -------------------------------------------------------------------

def test_benign_clients_of_every_kind_are_not_flagged(w):
    rng = np.random.default_rng(1)
    streams = {f"{kind}-{i}": benign_client(w, rng, 300, kind) for kind in BENIGN_KINDS for i in range(50)}
    pace = {c: 0.2 if c.startswith("batch") else 5.0 for c in streams}
    d = armed(w)
    found = run(w, d, *interleave(streams, rng, pace, T0 + 100))
    assert found == [], [(f.client_id, f.kind, f.summary) for f in found]
    assert d.describe()["clients_tracked"] == 200


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_each_attack_is_detected_within_100_of_its_queries_among_benign_clients(w, attack):
    rng = np.random.default_rng(2)
    streams = {f"benign-{i}": benign_client(w, rng, 200) for i in range(40)}
    attackers = {f"attacker-{i}": ATTACKS[attack](w, rng, 300) for i in range(4)}
    streams.update(attackers)
    pace = {c: 0.05 if c.startswith("attacker") else 5.0 for c in streams}
    found = run(w, armed(w), *interleave(streams, rng, pace, T0 + 100))
    first = {}
    for f in found:
        first.setdefault(f.client_id, f)
    assert set(first) == set(attackers), [(f.client_id, f.kind) for f in found]
    for f in first.values():
        assert f.evidence["client_queries"] <= 100, f.summary
        assert f.kind in ("model_extraction", "adversarial_probing")
        assert f.atlas and f.client_id in f.summary and f.evidence["fired"]


# -- memory: idle clients, the cap, a flood of new ids --------------------------------------------

def test_a_flood_of_new_ids_neither_grows_memory_nor_pushes_out_a_suspicious_client(w):
    rng = np.random.default_rng(3)
    d = armed(w, max_clients=300)
    attack = ATTACKS["boundary"](w, rng, 200)
    # the attacker starts: not yet alarmed, but its neighbour statistic is half-way up
    sent = 0
    while True:
        assert run(w, d, attack[sent: sent + 1], ["attacker"], T0 + 100 + np.array([sent * 0.05])) == []
        sent += 1
        slot = d.clients.slot_of["attacker"]
        if d.clients.evidence[slot].max() >= 0.5:
            break
    # 20,000 new ids, one query each, from real images
    flood = w.reference(20_000, rng)
    ids = [f"sybil-{i}" for i in range(20_000)]
    found = run(w, d, flood, ids, T0 + 101 + np.arange(20_000) * 0.001)
    assert found == []
    assert d.clients.size <= 300 and len(d.clients.slot_of) <= 300
    assert d.clients.slot_of["attacker"] == slot
    # the attacker goes on, and its count goes on too
    found = run(w, d, attack[sent:], ["attacker"] * (200 - sent), T0 + 130 + np.arange(200 - sent) * 0.05)
    assert [f.client_id for f in found][:1] == ["attacker"]
    assert sent < found[0].evidence["client_queries"] <= 100


def test_idle_clients_are_forgotten_when_the_table_is_full(w):
    rng = np.random.default_rng(4)
    d = armed(w, max_clients=8, client_idle=600.0)
    early = [f"early-{i}" for i in range(7)]
    run(w, d, w.reference(7, rng), early, T0 + 100 + np.arange(7.0))
    later = [f"later-{i}" for i in range(7)]
    run(w, d, w.reference(7, rng), later, T0 + 2000 + np.arange(7.0))
    tracked = set(d.clients.slot_of)
    assert set(later) <= tracked and not set(early) & tracked


# -- rate -----------------------------------------------------------------------------------------

def test_a_query_flood_is_reported_against_the_population(w):
    rng = np.random.default_rng(5)
    streams = {f"benign-{i}": benign_client(w, rng, 30) for i in range(200)}
    streams["flooder"] = w.reference(3000, rng)  # real images, nothing odd but the rate
    pace = {c: 100.0 for c in streams}
    pace["flooder"] = 0.004  # 250 queries a second
    found = run(w, armed(w), *interleave(streams, rng, pace, T0 + 100))
    assert {(f.client_id, f.kind) for f in found} == {("flooder", "query_flood")}
    assert found[0].atlas == ["AML.T0034.000", "AML.T0029"]


# -- state and peers ------------------------------------------------------------------------------

def test_a_restart_from_a_checkpoint_keeps_the_clients_and_their_evidence(w):
    rng = np.random.default_rng(6)
    d = armed(w)
    attack = ATTACKS["nes"](w, rng, 200)
    assert run(w, d, attack[:8], ["attacker"] * 8, T0 + 100 + np.arange(8) * 0.05) == []
    state = pickle.loads(pickle.dumps(d.state()))
    restarted = Probing("digits", Probing.Params())
    restarted.restore(state)
    found = run(w, restarted, attack[8:], ["attacker"] * 192, T0 + 101 + np.arange(192) * 0.05)
    assert found and found[0].client_id == "attacker"
    assert found[0].evidence["client_queries"] <= 100


def test_the_boundary_share_is_read_from_the_confidence_detector(w):
    rng = np.random.default_rng(7)
    confidence = LowConfidence("digits", LowConfidence.Params(reference_size=2000, indicator="margin"))
    d = Probing("digits", Probing.Params())
    d.bind([confidence, d])
    assert d.confidence is confidence
    reference = batch(w, w.reference(2000, rng), ["reference"] * 2000, T0 + np.arange(2000) * 0.01)
    confidence.update(reference)
    d.update(reference)
    attack = ATTACKS["boundary"](w, rng, 100)
    b = batch(w, attack, ["attacker"] * 100, T0 + 100 + np.arange(100) * 0.05)
    confidence.update(b)
    found = d.update(b)
    assert found and found[0].evidence["signals"]["boundary"] > 0  # boundary points have small margins
    assert "confidence" not in d.state()


def test_parameters_are_checked_at_config_load():
    with pytest.raises(ConfigError, match=r"detectors\.probing\.k: expected 2 <= k < history"):
        registry.check_params("probing", {"k": 64, "history": 64}, "detectors.probing")
    with pytest.raises(ConfigError, match=r"detectors\.probing: .*unknown field `nearest`; known keys"):
        registry.check_params("probing", {"nearest": 3}, "detectors.probing")


# -- end to end: the daemon on the real broker ----------------------------------------------------

def test_on_kafka_the_daemon_reports_the_attacker_and_no_benign_client(broker, tmp_path, daemons, w):
    import json

    from tests.conftest import Daemon, write_config

    rng = np.random.default_rng(8)
    topics = broker.topics("probing")

    def lines(x, clients, ts):
        labels, probabilities = w.oracle(x)
        return [json.dumps({"event_id": f"{clients[i]}-{i}", "ts": float(ts[i]), "model": "digits",
                            "client_id": clients[i], "features": np.round(x[i], 4).tolist(),
                            "probabilities": np.round(probabilities[i], 5).tolist(),
                            "prediction": int(labels[i])}).encode() for i in range(len(x))]

    reference = tmp_path / "digits-reference.jsonl"
    reference.write_bytes(b"\n".join(lines(w.reference(2000, rng), ["reference"] * 2000, T0 + np.arange(2000.0))))
    streams = {f"user-{i}": benign_client(w, rng, 150) for i in range(30)}
    streams["attacker"] = ATTACKS["nes"](w, rng, 150)
    pace = {c: 0.05 if c == "attacker" else 5.0 for c in streams}
    x, clients, ts = interleave(streams, rng, pace, T0 + 5000)
    # keyed by client: a client's queries stay in one partition, in order
    broker.produce(topics["logs"], lines(x, clients, ts), keys=[c.encode() for c in clients])
    config = write_config(tmp_path / "c.yaml", broker.bootstrap, topics, tmp_path / "state",
                          detectors={"confidence": {"reference": str(reference), "indicator": "margin"},
                                     "probing": {"reference": str(reference)}})
    d = Daemon(config, tmp_path / "daemon.log")
    daemons.append(d)
    d.wait_for(lambda: d.metric("inferwatch_events_total", model="digits", outcome="processed") == len(x),
               what="all events processed")
    found = [json.loads(r.value) for r in broker.consume_all(topics["detections"], expect=1)]
    probing = [f for f in found if f["detector"] == "probing"]
    assert {f["client_id"] for f in probing} == {"attacker"}, d.log()[-3000:]
    # at 20 queries a second against people's one in five, it is a flood as well
    assert {f["kind"] for f in probing} <= {"adversarial_probing", "query_flood"}
    first = min(probing, key=lambda f: f["evidence"]["client_queries"])
    assert first["kind"] == "adversarial_probing"
    assert first["evidence"]["client_queries"] <= 100 and "neighbours" in first["evidence"]["fired"]
    assert first["atlas"][0] == "AML.T0043.001" and first["source"]["topic"] == topics["logs"]
    assert d.metric("inferwatch_detections_total", model="digits", detector="probing",
                    kind="adversarial_probing", severity=first["severity"]) >= 1
    assert d.metric("inferwatch_clients_tracked", model="digits", detector="probing") == len(streams)
    assert d.metric("inferwatch_untracked_queries_total", model="digits", detector="probing") == 0
    assert d.stop() == 0


def test_a_client_placed_earlier_in_a_batch_keeps_its_slot_when_the_table_is_full(w):
    rng = np.random.default_rng(9)
    d = armed(w, max_clients=1)
    run(w, d, w.reference(20, rng), ["alice"] * 10 + ["bob"] * 10, T0 + 5000 + np.arange(20.0))
    assert d.clients.ids == ["alice"] and int(d.clients.queries[0]) == 10
    assert d.untracked == 10  # bob found the table full of clients of this very batch


def test_events_without_features_do_not_count_towards_the_reference(w):
    rng = np.random.default_rng(10)
    d = Probing("digits", Probing.Params(reference_size=200))
    bare = [_decoder.decode(msgspec.json.encode({"event_id": f"b{i}", "ts": T0 + i, "model": "digits",
                                                 "client_id": "c"})) for i in range(300)]
    d.update(ModelBatch("digits", bare, [Rec(i) for i in range(300)]))
    assert not d.built
    d.update(batch(w, w.reference(300, rng), ["c"] * 300, T0 + 400 + np.arange(300.0)))
    assert d.built


def test_a_model_without_features_keeps_nothing(w):
    d = Probing("llm", Probing.Params(reference_size=200))
    for b in range(50):
        events = [_decoder.decode(msgspec.json.encode({"event_id": f"b{b}-{i}", "ts": T0 + b * 100 + i,
                                                       "model": "llm", "client_id": f"c{i % 7}",
                                                       "latency_ms": 300.0})) for i in range(100)]
        assert d.update(ModelBatch("llm", events, [Rec(i) for i in range(100)])) == []
    assert not d.built and d.learning == [] and d.learned == 0
