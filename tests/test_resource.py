"""The resource detector on real model traffic: the figures of a digits MLP served and measured for real
(``tests/resource_workload.py``; v2 is a larger network, 1.6x slower; the sponge client asks for an
8-pass uncertainty estimate, about 8x the median latency; malformed requests fail in validation)."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from monitor.detectors import ModelBatch
from monitor.detectors.resource import Resource
from monitor.events import EventDecoder
from tests import resource_workload as workload


class Rec:
    def __init__(self, offset: int):
        self.topic, self.partition, self.offset = "logs", 0, offset


@pytest.fixture(scope="module")
def traffic():
    return workload.load()


def batches(events: list[dict], size: int = 1000, start: int = 0):
    """The events as the decoder makes them, in batches as a poll hands them over."""
    decoder = EventDecoder()
    for k in range(0, len(events), size):
        chunk = [decoder.decode(json.dumps(e).encode()) for e in events[k:k + size]]
        yield ModelBatch("digits", chunk, [Rec(start + k + i) for i in range(len(chunk))])


def run(detector: Resource, events: list[dict], size: int = 1000) -> list:
    found = []
    for batch in batches(events, size):
        found.extend(detector.update(batch))
    return found


def position(events: list[dict], detection) -> int:
    return next(i for i, e in enumerate(events) if e["event_id"] == detection.evidence["event_ids"][-1])


def test_a_clean_stream_raises_no_alarm(traffic):
    events = workload.events(traffic, n=30_000, seed=11)
    detector = Resource("digits", Resource.Params())
    assert run(detector, events) == []
    state = detector.describe()
    assert state["versions"]["v1"]["state"] == "own baseline"
    assert state["hst"] == "armed"
    assert state["clients_tracked"] == 200


def test_a_new_version_60_percent_slower_is_caught_in_its_first_events(traffic):
    events = workload.events(traffic, n=12_000, seed=12, v2_from=6000)
    found = run(Resource("digits", Resource.Params()), events)
    assert [d.kind for d in found] == ["latency_anomaly"], [d.summary for d in found]
    d = found[0]
    assert d.model_version == "v2" and d.client_id is None
    assert 6000 <= position(events, d) < 6000 + 50  # within its first 50 events
    assert d.evidence["baseline_of"] == "v1"  # compared with the release it replaced
    latency = d.evidence["figures"]["latency_ms"]
    assert 1.45 < latency["ratio"] < 1.8
    assert latency["baseline"]["median"] == pytest.approx(np.median(traffic["v1.latency_ms"]), rel=0.05)
    assert "cpu_ms" in d.evidence["figures"]  # CPU rose with it, in the same report
    assert d.atlas == ["AML.T0029"]
    assert f"{latency['ratio']:.2f}x the baseline of v1" in d.summary


def test_a_canary_that_is_slower_is_caught_and_no_client_is_blamed(traffic):
    events = workload.events(traffic, n=16_000, seed=13, v2_from=4000, v2_share=0.1)
    found = run(Resource("digits", Resource.Params()), events)
    assert [(d.kind, d.model_version, d.client_id) for d in found] == [("latency_anomaly", "v2", None)]


def test_the_sponge_client_at_8x_the_median_latency_is_reported_and_no_one_else(traffic):
    events = workload.events(traffic, n=12_000, seed=14, sponge_client="sponger", sponge_from=4000, sponge_share=0.02)
    found = run(Resource("digits", Resource.Params()), events)
    assert [(d.kind, d.client_id) for d in found] == [("resource_anomaly", "sponger")], [d.summary for d in found]
    d = found[0]
    own = [i for i, e in enumerate(events) if e["client_id"] == "sponger"]
    assert own.index(position(events, d)) < 40  # within its first 40 requests
    latency = d.evidence["figures"]["latency_ms"]
    assert 6 < latency["ratio"] < 10
    assert d.evidence["observed"]["expensive_share"] > 0.9
    assert set(d.atlas) == {"AML.T0034.001", "AML.T0029"} and d.severity == "critical"
    assert events[position(events, d)]["client_id"] == "sponger"


@pytest.mark.parametrize("share", [0.3, 0.5])
def test_a_sponge_client_sending_a_large_share_of_the_traffic_is_still_named(traffic, share):
    """Compared with the rest of the model, not with a model it makes expensive itself."""
    events = workload.events(traffic, n=12_000, seed=30, sponge_client="sponger", sponge_from=4000, sponge_share=share)
    found = [d for d in run(Resource("digits", Resource.Params()), events) if d.client_id is not None]
    assert [d.client_id for d in found] == ["sponger"]
    own = [i for i, e in enumerate(events) if e["client_id"] == "sponger"]
    assert own.index(position(events, found[0])) < 60


def test_a_version_slowing_down_for_everyone_blames_no_client_even_in_tiny_batches(traffic):
    events = workload.events(traffic, n=6000, seed=31)
    for e in events[3000:]:
        e["latency_ms"] *= 1.6
        e["cpu_ms"] *= 1.6
    found = run(Resource("digits", Resource.Params()), events, size=10)
    assert [(d.kind, d.client_id) for d in found] == [("latency_anomaly", None)], [d.summary for d in found]


@pytest.mark.parametrize("size", [1000, 5000, 20_000])
def test_the_slower_version_and_its_errors_are_seen_whatever_the_batch_size(traffic, size):
    """A batch holding a new version's first 1,023 events (its whole baseline) is still compared with
    the predecessor's baseline before it becomes the version's own."""
    events = workload.events(traffic, n=12_000, seed=22, v2_from=6000)
    rng = np.random.default_rng(1)
    for e in events[6000:]:
        if rng.random() < 0.3:
            e["status"] = "timeout"
    found = run(Resource("digits", Resource.Params()), events, size=size)
    assert sorted(d.kind for d in found) == ["error_spike", "latency_anomaly"], [d.summary for d in found]
    assert all(d.model_version == "v2" for d in found)


def test_a_sponge_client_is_seen_on_a_quiet_model_polled_in_tiny_batches(traffic):
    events = workload.events(traffic, n=5000, seed=23, sponge_client="sponger", sponge_from=2000, sponge_share=0.05)
    found = run(Resource("digits", Resource.Params()), events, size=2)
    assert [(d.kind, d.client_id) for d in found] == [("resource_anomaly", "sponger")]


def test_statuses_are_read_case_blind_and_a_model_whose_statuses_all_differ_is_not_broken(traffic, caplog):
    events = workload.events(traffic, n=4000, seed=24)
    for i, e in enumerate(events):
        e["status"] = ("OK", "Success", "200")[i % 3]
    detector = Resource("digits", Resource.Params())
    assert run(detector, events) == []
    assert detector.versions["v1"].baseline.error_chart is not None
    for e in events:
        e["status"] = "served"  # not a status ok_statuses knows
    other = Resource("digits", Resource.Params())
    assert run(other, events) == []
    assert other.versions["v1"].own and other.versions["v1"].baseline.error_chart is None
    assert "no error chart" in caplog.text


def test_figures_that_are_zero_in_the_baseline_do_not_break_ratios_or_payloads(traffic):
    events = workload.events(traffic, n=5000, seed=25)
    rng = np.random.default_rng(2)
    for i, e in enumerate(events):
        e["input_bytes"] = 0.0 if i < 3000 else 500.0  # a server that did not report sizes, then does
        e["cpu_ms"] = 0.0 if i < 3000 or rng.random() < 0.5 else 3.0  # CPU below the clock's resolution
    found = run(Resource("digits", Resource.Params()), events)
    assert len(found) == 1, [d.summary for d in found]
    d = found[0]
    assert d.kind == "resource_anomaly" and "cpu_ms" in d.evidence["figures"]
    assert d.evidence["figures"]["cpu_ms"]["ratio"] is None and "above 0" in d.summary
    assert json.loads(json.dumps(d.evidence))  # no inf or NaN in what is published


def test_a_checkpoint_of_other_parameters_is_not_restored(traffic):
    events = workload.events(traffic, n=3000, seed=26)
    first = Resource("digits", Resource.Params())
    run(first, events)
    changed = Resource("digits", Resource.Params(reference_size=511, figures=["latency_ms"]))
    changed.restore(pickle.loads(pickle.dumps(first.state())))
    assert changed.versions == {}
    assert run(changed, events) == []
    assert list(changed.versions["v1"].baseline.groups) == ["latency_ms"]


def test_a_refresh_after_a_restart_does_what_it_does_without_one(traffic):
    events = workload.events(traffic, n=9000, seed=27)
    straight = Resource("digits", Resource.Params())
    run(straight, events[:3000])
    straight.refresh()
    run(straight, events[3000:6000])
    restarted = Resource("digits", Resource.Params())
    restarted.restore(pickle.loads(pickle.dumps(straight.state())))
    assert straight.refresh() == restarted.refresh() == ["v1"]
    run(straight, events[6000:])
    run(restarted, events[6000:])
    assert restarted.hst_chart == straight.hst_chart is not None
    assert np.array_equal(np.concatenate(restarted.hst_points), np.concatenate(straight.hst_points))


def test_payloads_of_a_new_client_are_reported_once(traffic):
    events = workload.events(traffic, n=3000, seed=28)
    for i in (2000, 2300, 2600):
        events[i].update(client_id="bulk", input_bytes=5_000_000.0)
    found = run(Resource("digits", Resource.Params()), events, size=100)
    assert [(d.kind, d.client_id) for d in found] == [("payload_anomaly", "bulk")]


def test_the_version_in_production_keeps_its_state_when_versions_churn(traffic):
    events = workload.events(traffic, n=8000, seed=29)
    for i, e in enumerate(events[2000:]):
        if i % 2:
            e["model_version"] = f"canary-{i % 14}"
    detector = Resource("digits", Resource.Params(max_versions=4))
    run(detector, events)
    assert detector.versions["v1"].own and detector.versions["v1"].seen > 2000
    assert len(detector.versions) <= 4 and detector.untracked > 0


def test_an_error_spike_is_reported_with_the_client_behind_it(traffic):
    events = workload.events(traffic, n=10_000, seed=15, error_client="broken", error_from=5000, error_share=0.05)
    found = run(Resource("digits", Resource.Params()), events)
    kinds = [d.kind for d in found]
    assert kinds.count("error_spike") == 1, [d.summary for d in found]
    d = next(d for d in found if d.kind == "error_spike")
    assert 5000 <= position(events, d) < 5400
    assert next(iter(d.evidence["top_clients"])) == "broken"
    assert d.evidence["observed"]["error_rate"] > 5 * d.evidence["baseline"]["error_rate"]


def test_a_payload_far_outside_the_baseline_is_reported_once_per_client(traffic):
    events = workload.events(traffic, n=6000, seed=16)
    for i in (3000, 3001, 3500):
        events[i].update(client_id="bulk", input_bytes=float(2_000_000 + i))
    found = run(Resource("digits", Resource.Params()), events)
    assert [(d.kind, d.client_id) for d in found] == [("payload_anomaly", "bulk")]
    d = found[0]
    assert d.evidence["observed"]["input_bytes"] == 2_003_000
    assert d.evidence["baseline"]["largest"] == pytest.approx(traffic["v1.input_bytes"].max(), rel=0.2)
    assert d.evidence["ratio"] > 1000 and d.severity == "critical"


def test_an_unusual_combination_is_seen_by_the_trees_alone(traffic):
    """Requests whose CPU time no longer goes with their latency (an accounting fault, a noisy
    neighbour): each figure keeps exactly its distribution, only their combination is new."""
    events = workload.events(traffic, n=40_000, seed=17)
    rng = np.random.default_rng(0)
    changed = [i for i in range(20_000, 40_000) if rng.random() < 0.3]
    cpu = [events[i]["cpu_ms"] for i in changed]
    rng.shuffle(cpu)  # the same CPU figures, each on another request: the marginals do not move
    for i, c in zip(changed, cpu):
        events[i]["cpu_ms"] = c
    found = run(Resource("digits", Resource.Params()), events)
    assert found and {d.kind for d in found} == {"resource_anomaly"}, [d.summary for d in found]
    assert all(d.evidence["method"].startswith("river HalfSpaceTrees") for d in found)
    assert 20_000 < position(events, found[0]) < 25_000
    assert found[0].evidence["ratio"] > 2


def test_the_false_alarm_rate_follows_the_ert(traffic):
    """Clean real traffic at a small ERT: the mean run length to the first alarm of a version's charts
    (figures, errors; the trees off: their rate is approximate) is at least the ERT (the union bound
    errs towards fewer alarms: latency and CPU move together) and of its order. By default a crossing
    whose rise is under ``min_ratio`` is not reported, which makes reports rarer still."""
    ert = 300
    lengths = []
    for seed in range(60):
        events = workload.events(traffic, n=1023 + 10 * ert, seed=1000 + seed)
        # every crossing reported (min_ratio 1): the charts' own rate
        detector = Resource("digits", Resource.Params(ert=ert, hst=False, client_ert=10**9, min_ratio=1.0))
        found = run(detector, events, size=500)
        lengths.append(position(events, found[0]) - 1023 + 1 if found else 10 * ert)
    mean = float(np.mean(lengths))
    assert 0.8 * ert < mean < 3 * ert, mean


def test_state_survives_a_restart_mid_stream(traffic):
    events = workload.events(traffic, n=8000, seed=18, v2_from=5000)
    first = Resource("digits", Resource.Params())
    assert run(first, events[:5000]) == []
    saved = pickle.dumps(first.state())
    assert len(saved) < 300_000  # the trees (megabytes) are not in it: they grow again from what they learnt
    restored = Resource("digits", Resource.Params())
    restored.restore(pickle.loads(saved))
    restored.hst = restored._trees(restored.hst_points)  # as the next scored event would
    points = [dict(zip(first.figures, np.random.default_rng(i).random(5))) for i in range(50)]
    assert [restored.hst.score_one(x) for x in points] == [first.hst.score_one(x) for x in points]
    found = run(restored, events[5000:])
    assert [d.kind for d in found] == ["latency_anomaly"]
    assert found[0].evidence["baseline_of"] == "v1"


def test_the_refresh_job_slides_baselines_but_not_while_a_version_alarms(traffic):
    events = workload.events(traffic, n=4000, seed=19)
    detector = Resource("digits", Resource.Params())
    run(detector, events[:2000])
    assert detector.refresh() == []  # the first run starts keeping recent events
    slower = [dict(e, latency_ms=e["latency_ms"] * 1.05) for e in events[2000:]]  # within min_ratio
    run(detector, slower)
    before = detector.versions["v1"].baseline.median("latency_ms")
    assert detector.refresh() == ["v1"]
    after = detector.versions["v1"].baseline.median("latency_ms")
    assert after == pytest.approx(before * 1.05, rel=0.02)

    # a version whose charts are half-way to an alarm keeps its baseline
    detector.versions["v1"].baseline.groups["latency_ms"].statistics[:] = 10**9
    assert detector.refresh() == []


def test_memory_is_bounded_under_a_flood_of_clients_and_versions(traffic):
    events = workload.events(traffic, n=6000, seed=20)
    for i, e in enumerate(events[2000:]):
        e["client_id"] = f"flood-{i}"
        e["model_version"] = f"v{i % 40}"
    detector = Resource("digits", Resource.Params(max_clients=500, max_versions=8))
    run(detector, events)
    assert len(detector.clients) <= 500
    assert len(detector.versions) <= 8
    assert detector.evict_idle(events[-1]["ts"] + 10 * 3600) == len(detector.clients) > 0 or len(detector.clients) == 0


def test_idle_clients_are_evicted_by_every_per_client_detector(traffic):
    from monitor.config import load_config
    from monitor.ops.metrics import Metrics
    from monitor.pipeline import Pipeline

    config = load_config(None, {"detectors": {"resource": {}, "confidence": {"reference_size": 500}}})
    pipeline = Pipeline(config, Metrics())
    events = workload.events(traffic, n=3000, seed=21)
    records = []
    for i, e in enumerate(events):
        rec = Rec(i)
        rec.value, rec.key, rec.timestamp = json.dumps(e).encode(), None, None
        records.append(rec)
    pipeline.process(records)
    pipeline.flush()
    route = pipeline.routes["digits"]
    assert all(d.client_counts()[0] > 0 for d in route.detectors)
    assert pipeline.evict_idle() == 0  # nobody idle yet in event time
    route.last_ts += 2 * 3600
    gone = pipeline.evict_idle()
    assert gone > 0 and all(d.client_counts()[0] == 0 for d in route.detectors)


@pytest.mark.parametrize("params, field", [
    ({"figures": []}, "figures"), ({"reference_size": 10}, "reference_size"), ({"shifts": [9]}, "shifts"),
    ({"expensive_bins": 0}, "expensive_bins"), ({"client_shift": 1}, "client_shift"),
    ({"error_rate": 0}, "error_rate"), ({"min_ratio": 0.5}, "min_ratio"), ({"figures": ["gpu"]}, "figures"),
])
def test_bad_parameters_are_config_errors(params, field):
    from monitor.config import load_config
    from monitor.errors import ConfigError

    with pytest.raises(ConfigError, match=field):
        load_config(None, {"detectors": {"resource": params}})
