"""``inferwatch demo``: the embedded broker, real models' traffic with incidents, the daemon, and the
detections printed as they happen."""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from monitor.config import load_config
from monitor.detections import Detection
from monitor.errors import InferWatchError

BOLD, RED, YELLOW, DIM, RESET = "\033[1m", "\033[31m", "\033[33m", "\033[2m", "\033[0m"


class Console:
    """Prints one line per detection and a heartbeat line, in colour on a terminal."""

    def __init__(self, stream: Any = None):
        self.stream = stream or sys.stdout
        self.colour = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.lock = threading.Lock()
        self.count = 0

    def _c(self, code: str, text: str) -> str:
        return f"{code}{text}{RESET}" if self.colour else text

    def say(self, text: str) -> None:
        with self.lock:
            print(text, file=self.stream, flush=True)

    def detection(self, d: Detection) -> None:
        self.count += 1
        colour = RED if d.severity == "critical" else YELLOW
        when = time.strftime("%H:%M:%S", time.localtime(d.ts))
        who = f" client={d.client_id}" if d.client_id else ""
        atlas = ",".join(d.atlas) or "-"
        level = self._c(colour + BOLD, d.severity.upper().ljust(8))
        self.say(f"{self._c(DIM, when)} {level} "
                 f"{d.model:<7} {d.kind:<18}{who} {d.summary}  [ATLAS {atlas}]")


FINISH_GRACE_SECONDS = 60.0  # after the traffic, at most this long for the daemon to read the rest
SHIPPED_PLAYBOOKS = Path(__file__).resolve().parents[2] / "playbooks"


def write_traffic(path: str, duration: float, rate: float) -> int:
    """The demo's traffic in simulated time (from 2025-11-27T08:00:00Z) to a JSONL file (gzip when it
    ends in .gz), for ``inferwatch replay`` or ``run --input``; the same file every time."""
    import gzip

    from monitor.demo.traffic import TrafficGenerator, TrafficPlan
    from monitor.errors import InferWatchError

    try:
        out = gzip.open(path, "wb") if path.endswith(".gz") else open(path, "wb")
    except OSError as exc:
        raise InferWatchError(f"--write {path}: cannot write there ({exc.strerror})") from None
    with out:
        traffic = TrafficGenerator(lambda key, value: out.write(value + b"\n"), TrafficPlan(duration, rate),
                                   on_incident=lambda name: print(f"  incident: {name}", file=sys.stderr))
        traffic.simulate()
    print(f"wrote {traffic.sent + traffic.malformed:,} messages ({duration:g} s of event time) to {path}",
          file=sys.stderr)
    return 0


def run_demo(args: argparse.Namespace) -> int:
    if getattr(args, "write", None):
        return write_traffic(args.write, args.duration, args.rate)
    from kafka import KafkaProducer

    from monitor.broker import EmbeddedBroker
    from monitor.daemon import DetectDaemon
    from monitor.demo.traffic import TrafficGenerator, TrafficPlan
    from monitor.ops import logs

    logs.setup("WARNING", "text")
    import os
    if os.environ.get("IW_DEBUG"):
        logging.getLogger("inferwatch.detectors").setLevel("DEBUG")
    console = Console()
    broker = None
    bootstrap = args.bootstrap
    if not bootstrap:
        broker = EmbeddedBroker().start()
        bootstrap = broker.bootstrap
        console.say(f"embedded Kafka-protocol broker (Tansu, in memory) on {bootstrap}")
    tag = uuid.uuid4().hex[:6]
    state_dir = args.state_dir or tempfile.mkdtemp(prefix="inferwatch-demo-")
    config = load_config(None, {
        "kafka.bootstrap_servers": [bootstrap],
        "kafka.group_id": f"inferwatch-demo-{tag}",
        "kafka.create_topics": True,
        "kafka.topic_partitions": 3,
        "kafka.max_poll_interval_ms": 10000,
        "kafka.poll.timeout_ms": 200,
        "detectors": {"drift": {"streams": ["confidence"], "reference_size": 1000, "cooldown": 3000},
                      "resource": {},
                      "confidence": {"ert": 100000, "client_ert": 1000000, "reference_size": 1000,
                                     "cooldown": 5000},
                      "probing": {"reference_size": 1000}},
        "http.port": args.http_port,
        "http.host": "127.0.0.1",
        "state.dir": state_dir,
        "logging.level": "WARNING",
        "logging.format": "text",
        # The shipped playbooks, in a dry run: each incident's steps are shown, none is sent or done.
        "respond.playbooks": str(SHIPPED_PLAYBOOKS) if SHIPPED_PLAYBOOKS.is_dir() else None,
        "respond.dry_run": True,
        "respond.group_id": f"inferwatch-demo-respond-{tag}",
    })
    try:
        daemon = DetectDaemon(config)
    except InferWatchError:
        if broker:
            broker.stop()
        raise
    daemon.listeners.append(console.detection)
    daemon.install_signal_handlers()

    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=20)
    logs_topic = config.kafka.topics.logs

    def send(key: bytes | None, value: bytes) -> None:
        producer.send(logs_topic, key=key, value=value)

    console.say("training the demo models (scikit-learn digits and breast-cancer) ...")
    plan = TrafficPlan(duration=args.duration, rate=args.rate)
    traffic = TrafficGenerator(send, plan, on_incident=lambda name: console.say(
        console._c(BOLD, f"--- incident injected: {name} ---")))

    def heartbeat() -> None:
        while not daemon.stopping.wait(10):
            letters = int(sum(s.value for s in daemon.metrics.dead_letters.collect()[0].samples
                              if s.name.endswith("_total")))
            console.say(console._c(DIM, f"... {traffic.sent} events sent, {daemon.processed} processed, "
                                        f"{letters} dead letters, {console.count} detections"))

    def finish() -> None:
        """Stop once the traffic is sent and the daemon has read it all (a loaded machine reads
        late), or ``FINISH_GRACE_SECONDS`` after the traffic."""
        traffic.thread.join(args.duration + FINISH_GRACE_SECONDS)
        traffic.stop.set()
        producer.flush(10)
        deadline = time.monotonic() + FINISH_GRACE_SECONDS
        while daemon.processed < traffic.sent + traffic.malformed and time.monotonic() < deadline:
            if daemon.stopping.wait(0.2):
                return
        daemon.stop()

    finisher = threading.Thread(target=finish, name="demo-finish", daemon=True)
    port = daemon.http.port if daemon.http else args.http_port
    console.say(f"metrics: http://127.0.0.1:{port}/metrics   health: /healthz /readyz")
    console.say(f"streaming ~{args.rate:.0f} events/s for {args.duration:.0f}s; detections appear below "
                "(the detectors first learn a reference from the opening traffic)")
    traffic.start()
    finisher.start()
    threading.Thread(target=heartbeat, daemon=True).start()
    try:
        code = daemon.run()
    finally:
        traffic.stop.set()
        producer.close(timeout=5)
        if broker:
            broker.stop()
    summary = _summary(daemon, traffic, console)
    console.say(summary)
    return code


def _summary(daemon: Any, traffic: Any, console: Console) -> str:
    reasons = {s.labels["reason"]: int(s.value) for s in daemon.metrics.dead_letters.collect()[0].samples
               if s.name.endswith("_total")}
    kinds: dict[str, int] = {}
    for s in daemon.metrics.detections.collect()[0].samples:
        if s.name.endswith("_total"):
            key = f"{s.labels['model']}/{s.labels['kind']}"
            kinds[key] = kinds.get(key, 0) + int(s.value)
    lines = [console._c(BOLD, "--- demo summary ---"),
             f"events sent {traffic.sent + traffic.malformed} (malformed {traffic.malformed}), "
             f"consumed {daemon.processed}",
             "dead letters: " + (", ".join(f"{r} {n}" for r, n in sorted(reasons.items())) or "none"),
             "detections: " + (", ".join(f"{k} {n}" for k, n in sorted(kinds.items())) or "none")]
    lines += _incidents(daemon)
    logging.getLogger("inferwatch.demo").debug("summary printed")
    return "\n".join(lines)


def _incidents(daemon: Any) -> list[str]:
    """The respond stage's incidents, read from its journal: playbook, key, and each step's state."""
    if daemon.respond is None:
        return ["incidents: no respond stage (no playbooks directory)"]
    import sqlite3

    with sqlite3.connect(daemon.respond.journal.path) as db:
        rows = db.execute("SELECT id, playbook, key, detections FROM incidents ORDER BY opened_at").fetchall()
        lines = [f"incidents ({daemon.config.respond.playbooks}, dry run): {len(rows)}"]
        for incident_id, playbook, key, count in rows[:40]:
            steps = db.execute("SELECT step_id, state FROM steps WHERE incident_id = ? ORDER BY position",
                               (incident_id,)).fetchall()
            shown = ", ".join(f"{step} {state}" for step, state in steps)
            lines.append(f"  {playbook} [{key.split(':', 1)[-1]}] x{count}: {shown}")
    return lines
