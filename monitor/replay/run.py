"""``inferwatch replay``: the detect stage and the playbooks (dry run) over history, on event time.

The pipeline is the daemon's, batched by ticks of event time (``event_time.tick``) as the daemon is,
so a replay finds what the live daemon found on the same events. The playbooks run in a dry run on a
throw-away journal whose clock is the events' time: cooldowns, budgets and quiet periods count event
seconds, and the report says what each step would have done. Nothing is sent, changed or committed.
"""

from __future__ import annotations

import fnmatch
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import msgspec

from monitor.config import Config, seconds
from monitor.errors import InferWatchError
from monitor.ops.metrics import Metrics
from monitor.pipeline import BatchResult, Pipeline
from monitor.publish import FileOutputs
from monitor.replay import report as rep
from monitor.replay.kafka import Bound

log = logging.getLogger("inferwatch.replay")


class FilteredPipeline(Pipeline):
    """The pipeline with the replay's filters on models, clients and event time, applied after decoding
    (dead letters are kept whatever they are: a bad message has no trustworthy model or client)."""

    def __init__(self, config: Config, metrics: Metrics, models: Sequence[str], clients: Sequence[str],
                 start: float | None, end: float | None):
        super().__init__(config, metrics)
        self.models = list(models)
        self.clients = set(clients)
        self.client_globs = [c for c in clients if any(ch in c for ch in "*?[")]
        self.start, self.end = start, end
        self.filtered = 0

    def _decode(self, records: list[Any]) -> tuple[dict, list]:
        grouped, dead = super()._decode(records)
        if not (self.models or self.clients or self.start is not None or self.end is not None):
            return grouped, dead
        for model in list(grouped):
            events, recs = grouped[model]
            if self.models and not any(fnmatch.fnmatchcase(model, glob) for glob in self.models):
                self.filtered += len(events)
                del grouped[model]
                continue
            keep = [i for i, e in enumerate(events) if self._wanted(e)]
            if len(keep) < len(events):
                self.filtered += len(events) - len(keep)
                grouped[model] = ([events[i] for i in keep], [recs[i] for i in keep])
        return grouped, dead

    def _wanted(self, event: Any) -> bool:
        if self.start is not None and event.ts < self.start:
            return False
        if self.end is not None and event.ts > self.end:
            return False
        if self.clients:
            client = event.client_id
            if client is None:
                return False
            return client in self.clients or any(fnmatch.fnmatchcase(client, g) for g in self.client_globs)
        return True


class Progress:
    """A one-line progress bar on a terminal (events, events/s, ETA); silent otherwise."""

    def __init__(self, stream: Any, total: float | None, unit: str):
        self.stream = stream
        self.on = bool(getattr(stream, "isatty", lambda: False)())
        self.total, self.unit = total, unit
        self.started = time.monotonic()
        self.shown = 0.0

    def update(self, done: float, events: int, final: bool = False) -> None:
        now = time.monotonic()
        if not self.on or (not final and now - self.shown < 0.5):
            return
        self.shown = now
        elapsed = max(now - self.started, 1e-9)
        line = f"{events:,} events  {events / elapsed:,.0f} ev/s"
        if self.total:
            share = min(1.0, done / self.total)
            bar = "#" * int(share * 30)
            left = elapsed * (1 - share) / share if share > 0 else float("inf")
            eta = "--:--" if left == float("inf") else time.strftime("%H:%M:%S", time.gmtime(left))
            line += f"  [{bar:<30}] {share:4.0%}  ETA {eta}"
        self.stream.write("\r" + line + ("\n" if final else ""))
        self.stream.flush()


class Replay:
    def __init__(self, config: Config, *, inputs: Sequence[str] = (), topic: str | None = None,
                 start: Bound | None = None, end: Bound | None = None, models: Sequence[str] = (),
                 clients: Sequence[str] = (), playbooks: str | None = None, dead_letters: Path | None = None,
                 progress: Any = None):
        if bool(inputs) == (topic is not None):
            raise InferWatchError("replay reads either files (--input) or a Kafka topic (--topic), one of them")
        for bound, flag in ((start, "--from"), (end, "--to")):
            if inputs and bound is not None and bound.offsets is not None:
                raise InferWatchError(f"{flag}: offsets go with --topic; files take times (RFC 3339 or epoch seconds)")
        self.config = config
        self.inputs = list(inputs)
        self.topic = topic
        self.start, self.end = start, end
        self.playbooks = playbooks
        self.dead_letters_out = FileOutputs(None, dead_letters)  # a file run's dead-letter file, or none
        self.progress_stream = progress
        self.metrics = Metrics()
        self.pipeline = FilteredPipeline(config, self.metrics, models, clients,
                                         start.time if start else None, end.time if end else None)
        self.pipeline.after_batch = self._observe
        self.width = seconds(config.event_time.tick) if config.event_time.tick is not None else 1.0
        self.figures: dict[str, rep.ModelFigures] = {}
        self.detections: list[dict[str, Any]] = []
        self.dead: dict[str, int] = {}
        self.dead_samples: list[dict[str, Any]] = []
        self.read = 0
        self.clock = 0.0
        self.responder: Any = None
        self._tmp: str | None = None
        self.filters = {"from": start.describe() if start else None, "to": end.describe() if end else None,
                        "models": list(models), "clients": list(clients)}

    # -- the run -------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Read everything, run the detectors and the playbooks; the report."""
        try:
            source, described_inputs, progress = self._source()
            self._start_playbooks()
            for records in source.batches():
                self.read += len(records)
                self._handle(self.pipeline.process(records))
                progress.update(self._done(source), self.read)
            self._handle(self.pipeline.flush())  # the input is read: its last ticks are complete
            progress.update(self._done(source), self.read, final=True)
            if self.responder is not None:
                self.responder.tick()
            return self._report(described_inputs())
        finally:
            self._stop_playbooks()

    def _source(self) -> tuple[Any, Callable[[], list[dict[str, Any]]], Progress]:
        """The source, what the report says of its inputs (known once they are read), the progress bar."""
        batch = self.config.kafka.poll.max_records
        if self.topic is not None:
            from monitor.replay.kafka import KafkaRange

            source = KafkaRange(self.config, self.topic, self.start, self.end, batch)
            return source, lambda: [source.describe()], Progress(self.progress_stream, source.total, "records")
        from monitor.sources.files import FileSource, expand_inputs

        named = expand_inputs(self.inputs)
        if named.count("-") > 1:
            raise InferWatchError("--input: standard input (-) can be read once")
        paths = [self._spool_stdin() if p == "-" else p for p in named]
        described = [{**rep.file_digest(path), "path": name} for path, name in zip(paths, named)]
        source = FileSource(paths, batch, self.config.limits.max_message_bytes)
        return source, lambda: described, Progress(self.progress_stream, sum(d["bytes"] for d in described), "bytes")

    def _done(self, source: Any) -> float:
        return source.read_records if self.topic is not None else source.raw_position()

    def _spool_stdin(self) -> str:
        """Standard input copied to a temporary file, so that it is digested and read like a file."""
        self._tmp = self._tmp or tempfile.mkdtemp(prefix="inferwatch-replay-")
        path = Path(self._tmp) / "stdin"
        with open(path, "wb") as out:
            shutil.copyfileobj(sys.stdin.buffer, out, 1 << 20)
        return str(path)

    def _observe(self, route: Any, batch: Any) -> None:
        figures: dict[str, Any] = {}
        for detector in route.detectors:
            try:
                figures.update(detector.report_figures(batch))
            except Exception:  # a plot is not worth a replay: the detections are what matter
                log.exception("detector %s: figures for the report failed", detector.name)
        model = self.figures.get(route.model)
        if model is None:
            model = self.figures[route.model] = rep.ModelFigures(self.width)
        model.observe(batch, figures)

    def _handle(self, result: Any) -> None:
        for letter in result.dead_letters:
            self.dead[letter.reason] = self.dead.get(letter.reason, 0) + 1
            if len(self.dead_samples) < 100:
                envelope = letter.envelope()
                envelope.pop("value_b64", None)
                envelope.pop("key_b64", None)
                self.dead_samples.append(envelope)
        self.dead_letters_out.publish(BatchResult(dead_letters=result.dead_letters))
        for d in result.detections:
            detection = msgspec.to_builtins(d)
            self.detections.append(detection)
            if self.responder is not None:
                self.clock = max(self.clock, float(d.ts))
                self.responder.tick()  # incidents quiet for their period close before this one is matched
                self.responder.handle(detection)
                self.responder.run_queued()
        if self.responder is not None and self.pipeline.routes:
            latest = max((r.last_ts for r in self.pipeline.watched()), default=self.clock)
            if latest > self.clock:
                self.clock = latest
                self.responder.tick()

    # -- playbooks -----------------------------------------------------------------------------

    def _start_playbooks(self) -> None:
        if self.playbooks is None:
            return
        from monitor.respond.actions.base import Services
        from monitor.respond.engine import Responder
        from monitor.respond.journal import Journal
        from monitor.respond.playbooks import PlaybookError

        self._tmp = self._tmp or tempfile.mkdtemp(prefix="inferwatch-replay-")
        self.journal = Journal(Path(self._tmp) / "journal.sqlite")
        services = Services(state_dir=Path(self._tmp), http_timeout=1.0)
        try:
            # retention: a replay of months must keep every incident it opened for the report
            self.responder = Responder(self.playbooks, self.journal, services, dry_run=True, require_env=False,
                                       workers=0, clock=lambda: self.clock, retention=float("inf"))
        except PlaybookError as exc:
            raise InferWatchError(f"playbooks {self.playbooks}: {exc}") from None

    def _stop_playbooks(self) -> None:
        if self.responder is not None:
            self.journal.close()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)

    # -- the report ----------------------------------------------------------------------------

    def _report(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        self.detections.sort(key=lambda d: (d["ts"], d["detection_id"]))
        processed = sum(r.events for r in self.pipeline.watched())
        dead = sum(self.dead.values())
        models = {}
        series = {}
        for route in self.pipeline.watched():
            f = self.figures.get(route.model)
            if f is None:
                continue
            kinds: dict[str, int] = {}
            for d in self.detections:
                if d["model"] == route.model:
                    kinds[d["kind"]] = kinds.get(d["kind"], 0) + 1
            models[route.model] = {
                "events": route.events, "first_ts": f.first_ts, "last_ts": f.last_ts,
                "versions": dict(sorted(f.versions.items())),
                "clients": len(f.clients), "clients_at_least": f.clients_overflow,
                "detections": dict(sorted(kinds.items())),
                "detectors": {d.name: d.describe().get("state", "running") for d in route.detectors}}
            series[route.model] = f.series({d.name for d in route.detectors})
        firsts = [m["first_ts"] for m in models.values()]
        lasts = [m["last_ts"] for m in models.values()]
        books = rep.playbooks_digest(self.playbooks)
        if books is not None and self.responder is not None:
            books["loaded"] = sorted(book.name for book in self.responder.playbooks.playbooks)
        ignored = self._count_ignored()
        return {
            "format": rep.FORMAT, "tool": rep.tool(), "config": rep.config_digest(self.config),
            "playbooks": books, "inputs": inputs, "filters": self.filters,
            "events": {"read": self.read, "filtered_out": self.pipeline.filtered, "processed": processed,
                       "not_watched": ignored, "dead_lettered": dead,
                       "dead_letter_reasons": dict(sorted(self.dead.items()))},
            "dead_letter_samples": self.dead_samples,
            "time_range": {"first": min(firsts) if firsts else None, "last": max(lasts) if lasts else None},
            "models": models, "detections": self.detections,
            "incidents": rep.incidents(self.journal) if self.responder is not None else [],
            "series": series,
            "suspicious_clients": rep.suspicious_clients(self.detections, self.figures),
        }

    def _count_ignored(self) -> int:
        total = 0
        for metric in self.metrics.events.collect():
            for sample in metric.samples:
                if sample.name.endswith("_total") and sample.labels.get("outcome") in ("ignored", "untracked"):
                    total += int(sample.value)
        return total
