"""The evidence and containment actions against real parts: ``block_client`` writes the denylist to the
real broker and ConfigMaps to a local HTTP server speaking the Kubernetes API; ``snapshot`` writes
files read back with gzip and re-hashed; ``EventRing`` holds its memory bound under a flood of clients.
The actions are called directly, as the engine calls them."""

from __future__ import annotations

import gzip
import json
import re
import stat
import threading
import tracemalloc
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import kubernetes.client
import msgspec
import pytest
from kafka import KafkaProducer
from kafka.errors import KafkaTimeoutError

from monitor.respond.actions import get as get_action
from monitor.respond.actions.base import Final, Incident, Services, Transient
from monitor.respond.actions.block import BlockClient, configmap_key, expire
from monitor.respond.actions.snapshot import Snapshot, verify
from monitor.respond.ring import EventRing
from tests.conftest import event
from tests.k8s_fake import send_json

T0 = 1_764_230_400.0
CONFIGMAP_KEY = re.compile(r"^[-._a-zA-Z0-9]{1,253}$")


# ----------------------------------------------------------------------------- a Kubernetes API for ConfigMaps

class FakeConfigMaps:
    """ConfigMaps behind the real API paths: merge-patch, create, get; records every request and
    answers injected errors (``fail(method, status, times)``) with a Status body, as the API server does."""

    PATH = re.compile(r"^/api/v1/namespaces/(?P<ns>[^/]+)/configmaps(?:/(?P<name>[^/?]+))?(?:\?.*)?$")

    def __init__(self) -> None:
        self.maps: dict[tuple[str, str], dict[str, Any]] = {}
        self.requests: list[tuple[str, str, str | None, Any]] = []  # method, path, content type, body
        self.faults: list[list[Any]] = []  # [method, status, headers, times left]
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = json.loads(raw) if raw else None
                with fake.lock:
                    fake.requests.append((self.command, self.path, self.headers.get("Content-Type"), body))
                    status, answer, headers = fake.answer(self.command, self.path,
                                                          self.headers.get("Content-Type"), body)
                send_json(self, status, answer, headers)

            do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = serve

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def fail(self, method: str, status: int, times: int = 1, headers: dict[str, str] | None = None) -> None:
        self.faults.append([method, status, headers or {}, times])

    def data(self, namespace: str, name: str) -> dict[str, str]:
        return dict(self.maps[(namespace, name)].get("data") or {})

    @staticmethod
    def status(code: int, reason: str, message: str) -> dict[str, Any]:
        return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message,
                "reason": reason, "code": code}

    def answer(self, method: str, path: str, content_type: str | None, body: Any) -> tuple[int, Any, dict[str, str]]:
        for fault in self.faults:
            if fault[0] == method and fault[3] > 0:
                fault[3] -= 1
                return fault[1], self.status(fault[1], "Injected", f"injected {fault[1]}"), fault[2]
        match = self.PATH.match(path)
        if not match:
            return 404, self.status(404, "NotFound", "the server could not find the requested resource"), {}
        ns, name = match["ns"], match["name"]
        if method == "POST":
            name = body["metadata"]["name"]
            if (ns, name) in self.maps:
                return 409, self.status(409, "AlreadyExists", f'configmaps "{name}" already exists'), {}
            self.maps[(ns, name)] = body
            return 201, body, {}
        current = self.maps.get((ns, name))
        if current is None:
            return 404, self.status(404, "NotFound", f'configmaps "{name}" not found'), {}
        if method == "GET":
            return 200, current, {}
        if method == "PATCH":
            if content_type != "application/merge-patch+json":
                return 415, self.status(415, "UnsupportedMediaType", str(content_type)), {}
            data = current.setdefault("data", {})
            for key, value in (body.get("data") or {}).items():
                if value is None:
                    data.pop(key, None)  # RFC 7386: null removes the member
                else:
                    data[key] = value
            return 200, current, {}
        return 405, self.status(405, "MethodNotAllowed", method), {}


@pytest.fixture
def k8s() -> Iterator[FakeConfigMaps]:
    fake = FakeConfigMaps()
    fake.thread.start()
    yield fake
    fake.server.shutdown()
    fake.server.server_close()
    fake.thread.join(5)


# ----------------------------------------------------------------------------- helpers

class Clock:
    def __init__(self, t: float = T0):
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def denylist(broker) -> str:
    topic = f"denylist-{uuid.uuid4().hex[:8]}"
    broker.broker.create_topics({topic: 1})
    return topic


@pytest.fixture
def producer(broker) -> Iterator[KafkaProducer]:
    p = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all", linger_ms=0)
    yield p
    p.close(5)


def services(tmp_path: Path, *, producer: Any = None, k8s: FakeConfigMaps | None = None, topic: str | None = None,
             events: Any = None, clock: Clock | None = None) -> Services:
    api = kubernetes.client.ApiClient(kubernetes.client.Configuration(host=k8s.url)) if k8s else None
    return Services(state_dir=tmp_path, http_timeout=5.0, now=clock or Clock(),
                    producer=(lambda: producer) if producer is not None else None,
                    kubernetes=(lambda: api) if api is not None else None, events=events,
                    extras={"denylist_topic": topic} if topic else {})


def incident(id: str = "inc0001", client: str | None = "c3", model: str = "fraud") -> Incident:
    detection = {"detection_id": f"d-{id}", "ts": T0, "detector": "probing", "kind": "model_extraction",
                 "model": model, "model_version": "v3", "client_id": client, "severity": "critical",
                 "score": 12.3, "threshold": 9.1, "summary": "query pattern of a model extraction",
                 "evidence": {"window": [T0 - 60, T0]}, "atlas": ["AML.T0024.002"]}
    return Incident(id=id, playbook="extraction-response", key=f"{model}/{client}", opened_at=T0, detection=detection)


def block_params(**fields: Any) -> BlockClient.Params:
    """As the engine makes them: the rendered ``with:`` converted to the action's Params."""
    return msgspec.convert({"client_id": "c3", **fields}, BlockClient.Params, strict=False)


def snapshot_params(**fields: Any) -> Snapshot.Params:
    return msgspec.convert(fields, Snapshot.Params, strict=False)


def tracked(state_dir: Path) -> list[dict[str, Any]]:
    path = state_dir / "denylist.json"
    return list(json.loads(path.read_text())["blocks"].values()) if path.exists() else []


# ----------------------------------------------------------------------------- the registry

def test_registry_names_both_actions() -> None:
    assert isinstance(get_action("block_client"), BlockClient) and BlockClient.destructive
    assert isinstance(get_action("snapshot"), Snapshot) and not Snapshot.destructive and not Snapshot.notifies


# ----------------------------------------------------------------------------- EventRing

def test_ring_returns_the_last_events_newest_last() -> None:
    ring = EventRing(per_model=5, per_client=3)
    for i in range(20):
        ring.add("fraud", f"c{i % 2}", b"%d" % i)
    ring.add("other", "c0", b"x")
    assert ring.last("fraud", None, 3) == [b"17", b"18", b"19"]
    assert ring.last("fraud", "c1", 10) == [b"15", b"17", b"19"]
    assert ring.last("fraud", "c0", 2) == [b"16", b"18"]
    assert ring.last("other", "c0", 10) == [b"x"]
    assert ring.last("fraud", "nobody", 10) == [] and ring.last("unknown", None, 10) == []


def test_ring_add_many_is_add_in_order() -> None:
    one, many = EventRing(per_model=4, per_client=2), EventRing(per_model=4, per_client=2)
    rows = [("fraud", f"c{i % 3}" if i % 4 else None, b"%d" % i) for i in range(11)]
    for row in rows:
        one.add(*row)
    many.add_many(*zip(*rows))
    for client in (None, "c0", "c1", "c2"):
        assert one.last("fraud", client, 10) == many.last("fraud", client, 10)


def test_ring_evicts_the_least_recently_seen_client() -> None:
    ring = EventRing(per_model=1, per_client=5, max_clients=3)
    for client in ("a", "b", "c"):
        ring.add("fraud", client, client.encode())
    ring.add("fraud", "a", b"a2")  # a is now the most recent, b the least
    ring.add("fraud", "d", b"d")
    assert ring.last("fraud", "b", 10) == []
    assert ring.last("fraud", "a", 10) == [b"a", b"a2"]
    assert ring.last("fraud", "c", 10) == [b"c"] and ring.last("fraud", "d", 10) == [b"d"]
    assert ring.stats()["clients"] == 3


def test_ring_memory_is_bounded_under_a_flood_of_clients_and_models() -> None:
    ring = EventRing(per_model=500, per_client=10, max_clients=100, max_models=4)
    payload = b'{"event_id": "%d", "model": "fraud", "features": [' + b"0.5, " * 40 + b"1.0]}"
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(40_000):
            ring.add(f"model-{i % 4}", f"client-{i}", payload % i)
        for i in range(10):  # more models than kept: the least recently seen go
            ring.add(f"late-{i}", None, payload % i)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    stats = ring.stats()
    assert stats == {"models": 4, "clients": 100, "model_events": 4, "client_events": 100}
    assert ring.last("late-9", None, 5) == [payload % 9] and ring.last("model-0", None, 5) == []
    # At most 2000 + 100 events of ~250 bytes plus the rings were ever kept; all 40000 are above 10 MB.
    assert grown < 2_000_000, grown


def test_ring_is_safe_to_read_while_the_detect_loop_appends() -> None:
    ring = EventRing(per_model=300, per_client=50, max_clients=8)
    done = threading.Event()
    problems: list[str] = []

    def append() -> None:
        for start in range(0, 30_000, 100):
            ids = range(start, start + 100)
            ring.add_many(["fraud"] * 100, [f"c{i % 11}" for i in ids], [b"%d" % i for i in ids])
        done.set()

    def read() -> None:
        while not done.is_set():
            for client in (None, "c3"):
                got = [int(x) for x in ring.last("fraud", client, 200)]
                if got != sorted(got):
                    problems.append(f"out of order: {got[:5]}")

    threads = [threading.Thread(target=append)] + [threading.Thread(target=read) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not problems
    assert ring.last("fraud", None, 1) == [b"29999"]


# ----------------------------------------------------------------------------- snapshot

def filled_ring() -> tuple[EventRing, list[dict[str, Any]]]:
    ring = EventRing(per_model=50, per_client=20, max_clients=16)
    events = [event(i) for i in range(60)] + [event(1000 + i, model="other", client_id="c3") for i in range(5)]
    for e in events:
        ring.add(e["model"], e["client_id"], json.dumps(e).encode())
    return ring, events


def read_snapshot(detail: dict[str, Any]) -> list[dict[str, Any]]:
    path = Path(detail["manifest"]).parent / detail["file"]
    with gzip.open(path, "rt") as handle:
        return [json.loads(line) for line in handle]


def test_snapshot_keeps_the_detection_then_the_clients_last_events(tmp_path: Path) -> None:
    ring, events = filled_ring()
    inc = incident(client="c3")
    detail = Snapshot().run(snapshot_params(last_events=4), inc, services(tmp_path, events=ring))

    lines = read_snapshot(detail)
    assert lines[0] == {"detection": inc.detection}
    wanted = [e for e in events if e["model"] == "fraud" and e["client_id"] == "c3"][-4:]
    assert lines[1:] == wanted
    manifest_path = Path(detail["manifest"])
    manifest = json.loads(manifest_path.read_text())
    assert manifest_path.parent == tmp_path / "evidence" / inc.id
    assert manifest_path.name == "20251127T080000.000Z-client.manifest.json"
    assert manifest["file"] == "20251127T080000.000Z-client.jsonl.gz"
    assert {k: manifest[k] for k in ("incident", "playbook", "detection_id", "model", "client_id", "scope", "events")} == {
        "incident": inc.id, "playbook": "extraction-response", "detection_id": inc.detection["detection_id"],
        "model": "fraud", "client_id": "c3", "scope": "client", "events": 4}
    assert manifest["created_at"] == T0 and manifest["bytes"] == (manifest_path.parent / manifest["file"]).stat().st_size
    assert {k: v for k, v in detail.items() if k != "manifest"} == manifest
    assert verify(manifest_path)
    for path in manifest_path.parent.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o640, path
    assert not [p for p in manifest_path.parent.iterdir() if p.name.endswith(".tmp")]


def test_snapshot_of_the_model_keeps_every_clients_events(tmp_path: Path) -> None:
    ring, events = filled_ring()
    detail = Snapshot().run(snapshot_params(last_events=10, scope="model"), incident(client="c3"),
                            services(tmp_path, events=ring))
    assert detail["scope"] == "model" and detail["events"] == 10
    assert read_snapshot(detail)[1:] == [e for e in events if e["model"] == "fraud"][-10:]


def test_snapshot_without_a_client_in_the_detection_keeps_the_models_events(tmp_path: Path) -> None:
    ring, events = filled_ring()
    detail = Snapshot().run(snapshot_params(last_events=3, scope="client"), incident(client=None),
                            services(tmp_path, events=ring))
    assert detail["scope"] == "model" and detail["client_id"] is None
    assert read_snapshot(detail)[1:] == [e for e in events if e["model"] == "fraud"][-3:]


def test_snapshot_without_events_still_keeps_the_detection(tmp_path: Path) -> None:
    inc = incident()
    for events in (None, EventRing()):
        detail = Snapshot().run(snapshot_params(dir=str(tmp_path / f"out-{events is None}")), inc,
                                services(tmp_path, events=events))
        assert detail["events"] == 0
        assert read_snapshot(detail) == [{"detection": inc.detection}]
        assert verify(detail["manifest"])


def test_snapshot_keeps_a_multi_line_event_on_one_line(tmp_path: Path) -> None:
    ring = EventRing()
    pretty = json.dumps(event(1, client_id="c3", labels={"note": "two\nlines"}), indent=2).encode()
    assert pretty.count(b"\n") > 3
    ring.add("fraud", "c3", pretty)
    detail = Snapshot().run(snapshot_params(), incident(client="c3"), services(tmp_path, events=ring))
    assert read_snapshot(detail)[1:] == [json.loads(pretty)]


def test_verify_detects_a_changed_truncated_or_missing_file(tmp_path: Path) -> None:
    ring, _ = filled_ring()
    detail = Snapshot().run(snapshot_params(), incident(), services(tmp_path, events=ring))
    manifest = Path(detail["manifest"])
    data = manifest.parent / detail["file"]
    original = data.read_bytes()
    assert verify(manifest)

    changed = bytearray(original)
    changed[len(changed) // 2] ^= 0x01
    data.write_bytes(bytes(changed))
    assert not verify(manifest)
    data.write_bytes(original[:-1])
    assert not verify(manifest)
    data.write_bytes(original)
    assert verify(manifest)
    escaping = json.loads(manifest.read_text()) | {"file": f"../{manifest.parent.name}/{detail['file']}"}
    other = tmp_path / "elsewhere.manifest.json"
    other.write_text(json.dumps(escaping))
    assert not verify(other)  # a manifest names only a file beside itself
    data.unlink()
    assert not verify(manifest)


def test_snapshot_taken_again_for_the_same_incident_is_the_first_one(tmp_path: Path) -> None:
    ring, _ = filled_ring()
    clock = Clock()
    svc = services(tmp_path, events=ring, clock=clock)
    first = Snapshot().run(snapshot_params(last_events=5), incident(), svc)
    clock.t += 30
    again = Snapshot().run(snapshot_params(last_events=5), incident(), svc)
    assert again["manifest"] == first["manifest"] and again["existing"]
    other = Snapshot().run(snapshot_params(last_events=5, scope="model"), incident(), svc)
    assert other["manifest"] != first["manifest"]
    assert len(list((tmp_path / "evidence" / "inc0001").glob("*.jsonl.gz"))) == 2


def test_snapshot_refuses_an_incident_id_that_is_a_path(tmp_path: Path) -> None:
    with pytest.raises(Final):
        Snapshot().run(snapshot_params(), incident(id="../../etc"), services(tmp_path))


# ----------------------------------------------------------------------------- block_client: checks

def test_block_check_at_load_time() -> None:
    action = BlockClient()
    action.check(block_params(client_id="{{ client_id }}", ttl="{{ ttl }}"))
    action.check(block_params(ttl=3600, configmap={"namespace": "ml", "name": "inferwatch-denylist"}))
    for bad, field in ((dict(ttl="soon"), "ttl"), (dict(ttl="0s"), "ttl"),
                       (dict(configmap={"namespace": "ml"}), "configmap"),
                       (dict(configmap={"namespace": "ml", "name": "d", "key": "x"}), "configmap"),
                       (dict(configmap={"namespace": "ML", "name": "d"}), "configmap.namespace"),
                       (dict(topic="deny list"), "topic")):
        with pytest.raises(ValueError, match=f"^{re.escape(field)}"):
            action.check(block_params(**bad))


def test_block_without_a_client_is_final(tmp_path: Path, producer: KafkaProducer, denylist: str) -> None:
    for rendered in ("", "  "):
        with pytest.raises(Final, match="the detection names no client"):
            BlockClient().run(block_params(client_id=rendered), incident(client=None),
                              services(tmp_path, producer=producer, topic=denylist))
    assert tracked(tmp_path) == []


def test_block_with_nowhere_to_write_is_final(tmp_path: Path, producer: KafkaProducer) -> None:
    with pytest.raises(Final, match="nowhere to write"):
        BlockClient().run(block_params(), incident(), services(tmp_path, producer=producer))
    with pytest.raises(Final, match="nowhere to write"):  # "" turns the daemon's topic off
        BlockClient().run(block_params(topic=""), incident(), services(tmp_path, producer=producer, topic="deny"))


# ----------------------------------------------------------------------------- block_client: the topic

def test_block_writes_the_entry_to_the_denylist_topic(tmp_path: Path, broker, producer: KafkaProducer,
                                                      denylist: str) -> None:
    inc = incident(client="c3")
    detail = BlockClient().run(block_params(client_id="c3", ttl="1h", model="fraud"), inc,
                               services(tmp_path, producer=producer, topic=denylist))

    [record] = broker.consume_all(denylist, expect=1)
    assert record.key == b"fraud/c3"
    assert json.loads(record.value) == {
        "client_id": "c3", "model": "fraud", "blocked_at": T0, "until": T0 + 3600, "incident": inc.id,
        "playbook": "extraction-response", "reason": "model_extraction: query pattern of a model extraction"}
    assert detail["topic"] == {"name": denylist, "key": "fraud/c3", "partition": 0, "offset": record.offset}
    assert detail["until"] == T0 + 3600 and not detail["extended"] and detail["configmap"] is None
    [block_record] = tracked(tmp_path)
    assert block_record["written"] and block_record["place"] == {"topic": denylist}
    assert block_record["incidents"] == [inc.id] and block_record["entry"] == json.loads(record.value)
    assert stat.S_IMODE((tmp_path / "denylist.json").stat().st_mode) == 0o600


def test_blocking_again_extends_until(tmp_path: Path, broker, producer: KafkaProducer, denylist: str) -> None:
    clock = Clock()
    svc = services(tmp_path, producer=producer, topic=denylist, clock=clock)
    BlockClient().run(block_params(ttl="1h"), incident("inc0001"), svc)
    clock.t = T0 + 1800
    detail = BlockClient().run(block_params(ttl="1h"), incident("inc0002"), svc)
    assert detail["extended"] and detail["until"] == T0 + 5400 and detail["blocked_at"] == T0
    clock.t = T0 + 1900
    shorter = BlockClient().run(block_params(ttl="1m"), incident("inc0003"), svc)
    assert shorter["until"] == T0 + 5400  # a shorter ttl never shortens a block

    records = broker.consume_all(denylist, expect=3)
    assert [json.loads(r.value)["until"] for r in records] == [T0 + 3600, T0 + 5400, T0 + 5400]
    assert {r.key for r in records} == {b"*/c3"}
    [block_record] = tracked(tmp_path)
    assert block_record["incidents"] == ["inc0001", "inc0002", "inc0003"]


def test_expiry_writes_a_tombstone_and_survives_a_restart(tmp_path: Path, broker, producer: KafkaProducer,
                                                          denylist: str, k8s: FakeConfigMaps) -> None:
    clock = Clock()
    cm = {"namespace": "ml", "name": "inferwatch-denylist"}
    BlockClient().run(block_params(ttl="1h", model="fraud", configmap=cm), incident(),
                      services(tmp_path, producer=producer, topic=denylist, k8s=k8s, clock=clock))
    BlockClient().run(block_params(client_id="c5", ttl="2h", model="fraud", configmap=cm), incident("inc0002", "c5"),
                      services(tmp_path, producer=producer, topic=denylist, k8s=k8s, clock=clock))
    assert len(k8s.data("ml", "inferwatch-denylist")) == 2

    # A restart: new producer, new Services, new action instances; only the state directory is the same.
    later = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
    try:
        svc = services(tmp_path, producer=later, topic=denylist, k8s=k8s, clock=Clock(T0 + 1800))
        assert expire(svc, T0 + 1800) == 0
        assert expire(svc, T0 + 3600) == 2  # c3's topic entry and ConfigMap key
        assert expire(svc, T0 + 3601) == 0
    finally:
        later.close(5)

    records = broker.consume_all(denylist, expect=3)
    assert [(r.key, r.value is None) for r in records] == [(b"fraud/c3", False), (b"fraud/c5", False),
                                                            (b"fraud/c3", True)]
    assert list(k8s.data("ml", "inferwatch-denylist")) == [configmap_key("fraud", "c5")]
    assert [b["client_id"] for b in tracked(tmp_path)] == ["c5", "c5"]
    removal = k8s.requests[-1]
    assert removal[0] == "PATCH" and removal[3] == {"data": {configmap_key("fraud", "c3"): None}}


def test_a_place_shared_by_two_blocks_is_lifted_when_the_longer_ends(tmp_path: Path, producer: KafkaProducer,
                                                                      denylist: str, k8s: FakeConfigMaps) -> None:
    clock = Clock()
    svc = services(tmp_path, producer=producer, topic=denylist, k8s=k8s, clock=clock)
    BlockClient().run(block_params(ttl="1h", configmap={"namespace": "ml", "name": "deny"}), incident("inc0001"), svc)
    clock.t = T0 + 10
    BlockClient().run(block_params(ttl="2h"), incident("inc0002"), svc)  # another playbook: the topic only

    assert expire(svc, T0 + 3600) == 1  # the ConfigMap key; the topic entry holds until T0 + 7210
    assert k8s.data("ml", "deny") == {}
    [left] = tracked(tmp_path)
    assert left["place"] == {"topic": denylist} and left["entry"]["until"] == T0 + 7210
    assert expire(svc, T0 + 7210) == 1 and tracked(tmp_path) == []


def test_a_refused_topic_write_is_transient_and_tracked(tmp_path: Path) -> None:
    class Unacknowledged:  # a broker that never answers, without waiting the producer's timeouts
        def send(self, *args: Any, **kwargs: Any) -> Any:
            raise KafkaTimeoutError("Failed to update metadata after 10.0 secs.")

    with pytest.raises(Transient, match="not acknowledged"):
        BlockClient().run(block_params(), incident(), services(tmp_path, producer=Unacknowledged(), topic="deny"))
    # The send may have landed: the block stays tracked, so expiry lifts it.
    [block_record] = tracked(tmp_path)
    assert not block_record["written"] and block_record["detail"] is None


# ----------------------------------------------------------------------------- block_client: the ConfigMap

def test_block_writes_the_configmap_creating_it_when_missing(tmp_path: Path, k8s: FakeConfigMaps) -> None:
    cm = {"namespace": "ml", "name": "inferwatch-denylist"}
    svc = services(tmp_path, k8s=k8s)
    odd = "alice@example.com/ä key:1"
    first = BlockClient().run(block_params(client_id=odd, topic="", configmap=cm), incident(client=odd), svc)
    second = BlockClient().run(block_params(client_id="10.0.0.7", model="fraud", configmap=cm),
                               incident("inc0002", "10.0.0.7"), svc)

    assert [(m, p.split("?")[0], c) for m, p, c, _ in k8s.requests] == [
        ("PATCH", "/api/v1/namespaces/ml/configmaps/inferwatch-denylist", "application/merge-patch+json"),
        ("POST", "/api/v1/namespaces/ml/configmaps", "application/json"),
        ("PATCH", "/api/v1/namespaces/ml/configmaps/inferwatch-denylist", "application/merge-patch+json")]
    assert first["configmap"]["change"] == "created" and second["configmap"]["change"] == "patched"
    assert first["topic"] is None
    created = k8s.maps[("ml", "inferwatch-denylist")]
    assert created["metadata"]["labels"] == {"app.kubernetes.io/managed-by": "inferwatch"}
    data = k8s.data("ml", "inferwatch-denylist")
    assert all(CONFIGMAP_KEY.match(key) for key in data)
    entries = {key: json.loads(value) for key, value in data.items()}
    assert entries[configmap_key("*", odd)]["client_id"] == odd
    assert entries[configmap_key("fraud", "10.0.0.7")]["model"] == "fraud"
    assert configmap_key("*", "a/b") != configmap_key("*", "a_b")  # sanitized alike, kept apart by the hash


def test_configmap_forbidden_is_final_and_names_the_rbac(tmp_path: Path, k8s: FakeConfigMaps) -> None:
    k8s.fail("PATCH", 403)
    with pytest.raises(Final) as error:
        BlockClient().run(block_params(topic="", configmap={"namespace": "ml", "name": "deny"}), incident(),
                          services(tmp_path, k8s=k8s))
    assert 'verb "patch" on resource "configmaps" in API group "" (core) in namespace ml' in str(error.value)
    assert tracked(tmp_path) == []  # nothing was written, nothing to lift


def test_configmap_unavailable_is_transient_with_its_retry_after(tmp_path: Path, k8s: FakeConfigMaps) -> None:
    k8s.fail("PATCH", 503, headers={"Retry-After": "7"})
    with pytest.raises(Transient) as error:
        BlockClient().run(block_params(topic="", configmap={"namespace": "ml", "name": "deny"}), incident(),
                          services(tmp_path, k8s=k8s))
    assert error.value.retry_after == 7.0 and "503" in str(error.value)


def test_no_kubernetes_api_answering_is_transient(tmp_path: Path) -> None:
    closed = kubernetes.client.Configuration(host="http://127.0.0.1:9")  # discard port: nothing listens
    closed.retries = 0
    api = kubernetes.client.ApiClient(closed)
    svc = Services(state_dir=tmp_path, http_timeout=2.0, now=Clock(), kubernetes=lambda: api)
    with pytest.raises(Transient, match="did not answer"):
        BlockClient().run(block_params(topic="", configmap={"namespace": "ml", "name": "deny"}), incident(), svc)


# ----------------------------------------------------------------------------- block_client: after a crash

def test_reconcile_finds_a_finished_block_and_not_a_half_written_one(tmp_path: Path, producer: KafkaProducer,
                                                                      denylist: str, k8s: FakeConfigMaps) -> None:
    cm = {"namespace": "ml", "name": "deny"}
    svc = services(tmp_path, producer=producer, topic=denylist, k8s=k8s)
    params = block_params(ttl="1h", configmap=cm)
    detail = BlockClient().run(params, incident("inc0001"), svc)
    assert BlockClient().reconcile(params, incident("inc0001"), svc, {}) == detail
    assert BlockClient().reconcile(params, incident("inc0009"), svc, {}) is None
    elsewhere = block_params(ttl="1h", topic="", configmap={"namespace": "ml", "name": "other"})
    assert BlockClient().reconcile(elsewhere, incident("inc0001"), svc, {}) is None  # never written there

    # Crash-like: the topic is written, the ConfigMap write fails; the step must run again.
    k8s.fail("PATCH", 500)
    with pytest.raises(Transient):
        BlockClient().run(block_params(client_id="c5", configmap=cm), incident("inc0002", "c5"), svc)
    assert BlockClient().reconcile(block_params(client_id="c5", configmap=cm), incident("inc0002", "c5"), svc, {}) is None
    half = {next(iter(b["place"])): b["written"] for b in tracked(tmp_path) if b["client_id"] == "c5"}
    assert half == {"topic": True, "configmap": False}  # expiry will still tombstone the topic entry


def test_state_file_is_written_atomically(tmp_path: Path, producer: KafkaProducer, denylist: str) -> None:
    BlockClient().run(block_params(), incident(), services(tmp_path, producer=producer, topic=denylist))
    assert [p.name for p in tmp_path.iterdir()] == ["denylist.json"]  # no temporary file left
    assert json.loads((tmp_path / "denylist.json").read_text())["format"] == 1
