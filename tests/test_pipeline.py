"""The pipeline on real records, detectors and metrics: routing per model, the model limit, ignored
models, a failing detector, state carried across a restart and batches put in event-time order."""

from __future__ import annotations

import json
import logging
import pickle
import random
import time
from typing import Any

import msgspec
import pytest

from monitor.config import load_config
from monitor.detectors.drift import Drift
from monitor.ops.metrics import Metrics
from monitor.pipeline import Pipeline
from monitor.sources.files import FileRecord

T0 = 1_764_000_000.0


def event(i: int, model: str = "fraud", **fields: Any) -> dict[str, Any]:
    return {"event_id": f"{model}-{i}", "ts": T0 + i * 0.01, "model": model, "confidence": 0.9, **fields}


def records(events: list[dict[str, Any]] | list[bytes], topic: str = "logs") -> list[FileRecord]:
    return [FileRecord(e if isinstance(e, bytes) else json.dumps(e).encode(), None, topic, 0, i, None)
            for i, e in enumerate(events)]


def confident_then_unsure(n_good: int, n_bad: int, start: int = 0, seed: int = 7) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [event(i, confidence=min(1.0, rng.gauss(0.93, 0.02)) if i < start + n_good else rng.gauss(0.6, 0.05))
            for i in range(start, start + n_good + n_bad)]


def pipeline(metrics: Metrics | None = None, restored: dict | None = None, **overrides: Any) -> Pipeline:
    """A pipeline whose detectors read each batch as given (ticks of event time: the tests below them)."""
    overrides.setdefault("event_time.tick", None)
    return Pipeline(load_config(None, overrides), metrics or Metrics(), restored)


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def drift(p: Pipeline, model: str) -> Drift:
    return p.routes[model].detectors[0]


def test_first_event_of_a_model_builds_its_configured_detectors():
    p = pipeline()
    p.process(records([event(0, "fraud"), event(1, "credit")]))
    assert [type(d) for d in p.routes["fraud"].detectors] == [Drift]
    assert [type(d) for d in p.routes["credit"].detectors] == [Drift]
    assert p.routes["fraud"].detectors[0] is not p.routes["credit"].detectors[0]


def test_a_model_keeps_its_detectors_across_batches():
    p = pipeline()
    p.process(records([event(0)]))
    first = p.routes["fraud"].detectors[0]
    p.process(records([event(1)]))
    assert p.routes["fraud"].detectors[0] is first
    assert drift(p, "fraud").events == 2


def test_detectors_follow_the_model_overrides():
    p = pipeline(**{"models.overrides": [{"model": "canary-*", "detectors": {"drift": False}}]})
    p.process(records([event(0, "canary-1"), event(1, "fraud")]))
    assert p.routes["canary-1"].detectors == []
    assert len(p.routes["fraud"].detectors) == 1


def test_processed_events_are_counted_per_model():
    metrics = Metrics()
    p = pipeline(metrics)
    result = p.process(records([event(i, "fraud") for i in range(7)] + [event(i, "credit") for i in range(3)]))
    assert result.processed == 10
    assert sample(metrics, "inferwatch_events_total", model="fraud", outcome="processed") == 7
    assert sample(metrics, "inferwatch_events_total", model="credit", outcome="processed") == 3
    assert sample(metrics, "inferwatch_models_tracked") == 2


def test_models_beyond_max_models_are_counted_as_untracked_under_other():
    metrics = Metrics()
    p = pipeline(metrics, **{"limits.max_models": 2})
    p.process(records([event(i, f"model-{m}") for m in range(5) for i in range(10)]))
    tracked = [name for name, route in p.routes.items() if route is not None and route.label == name]
    assert tracked == ["model-0", "model-1"]
    assert sample(metrics, "inferwatch_models_tracked") == 2
    assert sample(metrics, "inferwatch_events_total", model="__other__", outcome="untracked") == 30
    assert sample(metrics, "inferwatch_events_total", model="model-0", outcome="processed") == 10
    for m in range(2, 5):
        assert metrics.registry.get_sample_value("inferwatch_events_total",
                                                 {"model": f"model-{m}", "outcome": "processed"}) is None


def test_model_limit_holds_across_batches():
    metrics = Metrics()
    p = pipeline(metrics, **{"limits.max_models": 2})
    for m in range(5):
        p.process(records([event(i, f"model-{m}") for i in range(4)]))
    assert p.tracked == 2
    assert sample(metrics, "inferwatch_events_total", model="__other__", outcome="untracked") == 12


def test_models_not_watched_are_counted_as_ignored():
    metrics = Metrics()
    p = pipeline(metrics, **{"models.watch": ["fraud-*"], "models.ignore": ["*-shadow"]})
    result = p.process(records([event(0, "fraud-eu"), event(1, "credit"), event(2, "credit"),
                                event(3, "fraud-eu-shadow")]))
    assert result.processed == 1
    assert sample(metrics, "inferwatch_events_total", model="__other__", outcome="ignored") == 3
    assert p.routes["credit"] is None and p.routes["fraud-eu-shadow"] is None
    assert sample(metrics, "inferwatch_models_tracked") == 1


def test_bad_messages_become_dead_letters_with_their_source():
    metrics = Metrics()
    p = pipeline(metrics)
    result = p.process(records([event(0), b"not json", event(1), b'{"ts": 1, "model": "fraud"}'], topic="t1"))
    assert result.processed == 2
    assert [(d.reason, d.topic, d.offset) for d in result.dead_letters] == [("invalid_json", "t1", 1),
                                                                           ("missing_field", "t1", 3)]
    assert result.dead_letters[0].value == b"not json"
    assert sample(metrics, "inferwatch_dead_letters_total", reason="invalid_json") == 1
    assert sample(metrics, "inferwatch_events_total", model="__none__", outcome="dead_letter") == 2


def test_an_event_with_bad_features_is_a_dead_letter_and_its_model_goes_on():
    metrics = Metrics()
    p = pipeline(metrics, **{"limits.max_features": 3})
    result = p.process(records([event(0, features=[1, 2]), event(1, features=[1, 2, 3, 4]),
                                event(2, features={"a": 1, "b": "x"}), event(3, features=[3, 4])]))
    assert sorted((d.reason, d.offset) for d in result.dead_letters) == [("too_many_features", 1), ("wrong_type", 2)]
    assert result.processed == 2
    assert sample(metrics, "inferwatch_events_total", model="fraud", outcome="processed") == 2


def test_invalid_utf8_in_a_feature_name_does_not_stop_the_batch():
    good = json.dumps(event(0)).encode()
    poison = b'{"event_id": "p", "ts": 1764000000, "model": "fraud", "features": {"amount\xff": 1}}'
    result = pipeline().process(records([good, poison]))
    assert [d.reason for d in result.dead_letters] == ["invalid_utf8"]
    assert result.processed == 1


def test_a_failing_detector_does_not_stop_other_models(monkeypatch):
    metrics = Metrics()
    p = pipeline(metrics)
    p.process(records([event(0, "broken"), event(0, "healthy")]))

    def update(batch):
        raise RuntimeError("detector bug")

    monkeypatch.setattr(p.routes["broken"].detectors[0], "update", update)
    result = p.process(records([event(i, "broken") for i in range(1, 6)] + [event(i, "healthy") for i in range(1, 6)]))
    assert drift(p, "healthy").events == 6
    assert result.processed == 10
    assert sample(metrics, "inferwatch_events_total", model="healthy", outcome="processed") == 6


def test_a_failing_detector_is_counted_and_logged_with_its_model(monkeypatch, caplog):
    metrics = Metrics()
    p = pipeline(metrics)
    p.process(records([event(0, "broken")]))

    def update(batch):
        raise RuntimeError("detector bug")

    monkeypatch.setattr(p.routes["broken"].detectors[0], "update", update)
    with caplog.at_level(logging.ERROR, logger="inferwatch.pipeline"):
        p.process(records([event(i, "broken") for i in range(1, 4)]))
        p.process(records([event(i, "broken") for i in range(4, 6)]))
    assert sample(metrics, "inferwatch_detector_errors_total", detector="drift") == 2
    failures = [r for r in caplog.records if r.exc_info]
    assert len(failures) == 2
    assert "broken" in failures[0].getMessage() and "drift" in failures[0].getMessage()
    assert isinstance(failures[0].exc_info[1], RuntimeError)


def test_restored_state_continues_without_relearning():
    before = pipeline()
    before.process(records([event(i, confidence=0.5 + i % 97 / 200) for i in range(2100)]))
    checkpoint = pickle.loads(pickle.dumps(before.state()))  # what the checkpoint store does

    after = pipeline(restored=checkpoint)
    after.process(records([event(i) for i in range(2100, 2110)]))
    assert drift(after, "fraud").events == 2110
    assert drift(after, "fraud").describe()["state"] == "armed"


def test_a_change_right_after_a_restart_is_detected():
    events = confident_then_unsure(3000, 1500)
    before = pipeline()
    assert before.process(records(events[:3000])).detections == []
    checkpoint = pickle.loads(pickle.dumps(before.state()))

    after = pipeline(restored=checkpoint)
    found = after.process(records(events[3000:])).detections
    assert [(d.model, d.kind, d.evidence["features"]) for d in found][:1] == [("fraud", "prediction_drift", ["confidence"])]


def test_without_restored_state_the_change_becomes_the_reference():
    events = confident_then_unsure(3000, 1500)
    fresh = pipeline()
    assert fresh.process(records(events[3000:])).detections == []


def test_restored_state_of_a_model_not_yet_seen_is_kept_for_the_next_checkpoint():
    before = pipeline()
    before.process(records([event(0, "fraud"), event(0, "credit")]))
    checkpoint = pickle.loads(pickle.dumps(before.state()))

    after = pipeline(restored=checkpoint)
    after.process(records([event(1, "fraud")]))
    assert set(after.state()) == {"fraud", "credit"}
    assert after.state()["credit"]["drift"]["learned"] == 1


def test_out_of_order_batch_is_given_to_detectors_in_event_time_order():
    p = pipeline(**{"detectors.drift": {"sample_every": 1}})  # every event charted, so all 50 are seen
    p.process(records([event(i, confidence=0.5 + i % 89 / 200) for i in range(2000)]))  # the reference
    events = [event(i, confidence=0.5 + i / 100_000) for i in range(2000, 2050)]
    random.Random(3).shuffle(events)
    p.process(records(events))
    values = drift(p, "fraud").groups["confidence"].last(50)[:, 0]
    assert list(values) == pytest.approx([0.5 + i / 100_000 for i in range(2000, 2050)])  # in event-time order


def test_last_event_timestamp_is_the_newest_event_time_of_the_batch():
    metrics = Metrics()
    p = pipeline(metrics)
    p.process(records([event(5), event(9), event(2)]))
    assert sample(metrics, "inferwatch_last_event_timestamp_seconds", model="fraud") == T0 + 0.09
    p.process(records([event(1)]))  # an older straggler does not move it back
    assert sample(metrics, "inferwatch_last_event_timestamp_seconds", model="fraud") == T0 + 0.09


def test_a_message_that_triggers_a_bug_is_isolated_as_a_dead_letter_and_the_rest_go_on(monkeypatch):
    metrics = Metrics()
    p = pipeline(metrics)
    real_decode = p.decoder.decode_unchecked_features

    def decode_with_a_bug(raw):
        if b'"e-poison"' in raw:
            raise KeyError("a bug in the decoder")
        return real_decode(raw)

    monkeypatch.setattr(p.decoder, "decode_unchecked_features", decode_with_a_bug)
    batch = [event(i) for i in range(50)]
    batch[20]["event_id"] = "e-poison"
    result = p.process(records(batch))

    assert [(d.reason, d.offset) for d in result.dead_letters] == [("processing_failed", 20)]
    assert "KeyError" in result.dead_letters[0].error
    assert result.processed == 49
    assert metrics.registry.get_sample_value("inferwatch_dead_letters_total", {"reason": "processing_failed"}) == 1
    assert metrics.registry.get_sample_value("inferwatch_events_total", {"model": "fraud", "outcome": "processed"}) == 49


def test_a_detection_step_that_fails_turns_that_models_events_into_dead_letters_once(monkeypatch):
    metrics = Metrics()
    p = pipeline(metrics)
    import monitor.pipeline as module

    real = module.in_event_time_order

    def broken_for_b(batch):
        if batch.model == "b":
            raise RuntimeError("a bug in the detection step")
        return real(batch)

    monkeypatch.setattr(module, "in_event_time_order", broken_for_b)
    seen = []
    result = p.process(records([event(i, model="a") for i in range(5)] + [b"not json"]
                               + [event(i, model="b") for i in range(2)]))
    route = p.routes["a"]
    seen.append(route.detectors[0].events)
    assert result.processed == 5 and seen == [5], "model a is processed once, not replayed"
    assert sorted(d.reason for d in result.dead_letters) == ["invalid_json", "processing_failed", "processing_failed"]
    get = metrics.registry.get_sample_value
    assert get("inferwatch_dead_letters_total", {"reason": "invalid_json"}) == 1
    assert get("inferwatch_events_total", {"model": "a", "outcome": "processed"}) == 5


# -- ticks of event time ---------------------------------------------------------------------------


def ticked(**overrides: Any) -> Pipeline:
    """Batches of one tick each (min_batch_events 1), unless asked otherwise."""
    return Pipeline(load_config(None, {"event_time.tick": "1s", "event_time.min_batch_events": 1, **overrides}),
                    Metrics())


def test_the_newest_tick_of_a_model_waits_and_a_commit_stops_before_it() -> None:
    p = ticked(detectors={"confidence": {"reference_size": 100}})
    batch = records([event(i) for i in range(250)])  # 2.5 s of events: ticks 0, 1 and half of 2
    result = p.process(batch)
    assert result.processed == 200 and p.held() == 50
    assert p.held_floor() == {("logs", 0): 200}, "the first event still held: a restart reads it again"
    assert p.flush(idle_since=0.0).processed == 0, "not idle since then: nothing flushed"
    later = time.monotonic() + 1
    assert p.flush(idle_since=later).processed == 0, "no batch since without its events: a backlog, not idle"
    p.process(records([event(0, model="other")]))
    assert p.flush(idle_since=later).processed == 50 and p.held() == 1  # fraud flushed, other's tick held
    assert p.flush(idle_since=later, caught_up=True).processed == 1, "the last poll found nothing"
    assert p.held() == 0 and p.held_floor() == {}


def test_a_late_event_joins_a_batch_of_its_own_tick_and_nothing_is_lost() -> None:
    p = ticked()
    p.process(records([event(i) for i in range(150)]))  # ticks 0 and 1 (held)
    late = p.process(records([event(5, event_id="late")] + [event(i) for i in range(150, 300)]))
    assert late.processed == 1 + 100  # the late one (tick 0, a batch of its own), then all of tick 1
    assert p.held() == 100 and p.flush().processed == 100  # tick 2
    assert p.routes["fraud"].events == 301


def test_ticked_detections_do_not_depend_on_how_the_stream_was_polled() -> None:
    events = confident_then_unsure(3000, 1500)
    found = []
    for size in (1, 37, 4500):
        p = ticked(detectors={"confidence": {"reference_size": 1000}}, **{"event_time.min_batch_events": 500})
        out = []
        stream = records(events)
        for start in range(0, len(stream), size):
            out.extend(p.process(stream[start:start + size]).detections)
        out.extend(p.flush().detections)
        found.append(sorted(msgspec.to_builtins(d)["detection_id"] for d in out))
    assert found[0] and found[0] == found[1] == found[2]


def test_complete_ticks_gather_into_batches_of_min_batch_events_or_max_batch_span() -> None:
    p = ticked(**{"event_time.min_batch_events": 250, "event_time.max_batch_span": "60s"})
    sizes = []
    p.after_batch = lambda route, batch: sizes.append(len(batch))
    p.process(records([event(i) for i in range(1000)]))  # ticks of 100 events: batches close at 300
    assert sizes == [300, 300, 300] and p.held() == 100
    p = ticked(**{"event_time.min_batch_events": 10_000, "event_time.max_batch_span": "2s"})
    sizes.clear()
    p.after_batch = lambda route, batch: sizes.append(len(batch))
    p.process(records([event(i) for i in range(1000)]))  # a quiet model: 2 s of event time at most
    assert sizes == [200] * 4 and p.held() == 200


def test_a_gap_in_event_time_closes_a_batch_where_a_live_daemon_flushes_an_idle_model() -> None:
    quiet = [event(i * 100) for i in range(7)] + [event(i * 100) for i in range(20, 23)]  # 0..6 s, 20..22 s
    settings = {"event_time.min_batch_events": 10_000, "event_time.max_batch_span": "10s",
                "event_time.flush_after": "5s"}
    at_once = ticked(**settings)
    sizes: list[int] = []
    at_once.after_batch = lambda route, batch: sizes.append(len(batch))
    at_once.process(records(quiet))
    at_once.flush()
    live = ticked(**settings)
    live_sizes: list[int] = []
    live.after_batch = lambda route, batch: live_sizes.append(len(batch))
    live.process(records(quiet[:7]))
    live.process(records([event(0, model="other")]))  # a batch without the quiet model's events ...
    live.flush(idle_since=time.monotonic() + 1)  # ... and 5 s without any: flushed as idle
    live.process(records(quiet[7:]))
    live.flush()
    assert sizes == [7, 3] and live_sizes[:1] + [n for n in live_sizes[1:] if n != 1] == [7, 3]


def test_an_event_stamped_in_the_future_does_not_hold_its_partition_for_long(monkeypatch) -> None:
    import monitor.pipeline as pipeline_module

    p = ticked()
    p.process(records([event(3600 * 100)] + [event(i) for i in range(300)]))  # one event an hour ahead
    assert p.held_floor() == {("logs", 0): 0} and p.held() == 1
    p.process(records([event(i) for i in range(300, 400)]))
    assert p.flush(idle_since=time.monotonic() + 1).processed == 0, "the model is busy"
    monkeypatch.setattr(pipeline_module, "STALE_SECONDS", 0.0)
    assert p.flush(idle_since=time.monotonic() + 1).processed == 1 and p.held_floor() == {}
