"""Replay speed: events/s of ``inferwatch replay`` over a JSONL.gz file, all detectors, 64-feature events.

The file is the demo's traffic in simulated time (scikit-learn digits, 64 features, two thirds of the
events, and breast-cancer, 30 features; a sponge client, a probing client, a drift, a slower release,
malformed messages), written once and reused. The replay runs as the command does (shipped config,
shipped playbooks in their dry run, the JSON and HTML reports), timed from start to the report on disk;
then once more without playbooks and reports, and once with batches as polled (``event_time.tick:
null``) for what the ticks of event time cost.

    python bench/replay.py [--seconds 120] [--rate 2000]
"""

from __future__ import annotations

import argparse
import gzip
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import monitor  # noqa: E402,F401  (first: single-threaded BLAS, as the daemon)

from monitor.config import load_config  # noqa: E402
from monitor.replay.html import render  # noqa: E402
from monitor.replay.report import dumps  # noqa: E402
from monitor.replay.run import Replay  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def traffic(path: Path, seconds: float, rate: float) -> int:
    from monitor.demo.traffic import TrafficGenerator, TrafficPlan

    with gzip.open(path, "wb", compresslevel=3) as out:
        generator = TrafficGenerator(lambda key, value: out.write(value + b"\n"), TrafficPlan(seconds, rate))
        generator.simulate()
    return generator.sent + generator.malformed


def timed(label: str, config_path: Path, path: Path, playbooks: str | None, reports: bool,
          **overrides: object) -> None:
    config = load_config(config_path, dict(overrides))
    started = time.perf_counter()
    report = Replay(config, inputs=[str(path)], playbooks=playbooks).run()
    if reports:
        with tempfile.TemporaryDirectory() as out:
            Path(out, "r.json").write_text(dumps(report))
            Path(out, "r.html").write_text(render(report))
    took = time.perf_counter() - started
    events = report["events"]["read"]
    print(f"{label:<48} {events:>9,} events {took:7.1f} s {events / took:>9,.0f} events/s "
          f"{1e6 * took / events:6.1f} us/event  ({len(report['detections'])} detections, "
          f"{len(report['incidents'])} incidents)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=120.0, help="event time of traffic (default 120)")
    parser.add_argument("--rate", type=float, default=2000.0, help="events per second of event time (default 2000)")
    parser.add_argument("--config", default=str(ROOT / "configs/inferwatch.yaml"))
    args = parser.parse_args()
    cache = Path(tempfile.gettempdir()) / f"inferwatch-bench-replay-{args.seconds:g}s-{args.rate:g}.jsonl.gz"
    if not cache.exists():
        print(f"writing {cache} ...", flush=True)
        n = traffic(cache, args.seconds, args.rate)
        print(f"  {n:,} messages, {cache.stat().st_size / 1e6:.1f} MB", flush=True)
    print(f"replaying {cache} ({os.cpu_count()} cores)")
    timed("replay (playbooks dry, JSON + HTML report)", Path(args.config), cache, str(ROOT / "playbooks"), True)
    timed("detectors only (no playbooks, no report files)", Path(args.config), cache, None, False)
    timed("detectors only, batches as read (tick: null)", Path(args.config), cache, None, False,
          **{"event_time.tick": None})


if __name__ == "__main__":
    main()
