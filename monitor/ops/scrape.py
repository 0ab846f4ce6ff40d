"""The ``scrape`` job: read the model servers' own Prometheus endpoints and hand their CPU, memory and
GPU figures to the resource detector.

It runs on APScheduler's thread and touches no detector: each scrape's figures go into a queue that the
main loop drains between batches (``Scraper.drain``). The text is parsed with prometheus_client's own
parser. CPU is a counter of seconds, so the figure is its rate between two scrapes (cores in use); a
counter that went back (a restarted server) starts the rate afresh. A target that fails (refused,
timed out, not the exposition format) is logged when it starts and stops failing, counted in
``inferwatch_job_failures{job="scrape"}`` and shown by ``inferwatch_scrape_up``; the others are still read.
URLs can hold credentials: logs and metrics name a target by its ``name`` (default host:port).
"""

from __future__ import annotations

import logging
import queue
import time
import urllib.request
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from monitor.config import ScrapeTarget
from monitor.ops.metrics import Metrics

log = logging.getLogger("inferwatch.scrape")

MAX_BYTES = 16 * 1024 * 1024  # an exposition larger than this is refused


class ScrapeError(Exception):
    pass


def read_figures(text: str, target: ScrapeTarget) -> dict[str, float]:
    """The configured metrics of one exposition: CPU seconds and memory summed over their series, GPU
    utilisation averaged. A metric absent from the text is absent from the result."""
    wanted = {target.cpu_seconds: "cpu_seconds", target.memory_bytes: "memory_bytes"}
    if target.gpu_utilization:
        wanted[target.gpu_utilization] = "gpu_utilization"
    values: dict[str, list[float]] = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                key = wanted.get(sample.name)
                if key is not None:
                    values.setdefault(key, []).append(float(sample.value))
    except ValueError as exc:
        raise ScrapeError(f"not the Prometheus text format: {exc}") from None
    out = {key: sum(v) for key, v in values.items() if key != "gpu_utilization"}
    if values.get("gpu_utilization"):
        gpu = values["gpu_utilization"]
        out["gpu_utilization"] = sum(gpu) / len(gpu)
    return out


class Scraper:
    def __init__(self, targets: list[ScrapeTarget], timeout: float, metrics: Metrics):
        self.targets = targets
        self.timeout = timeout
        self.metrics = metrics
        self.samples: queue.SimpleQueue[tuple[str, str, float, dict[str, float]]] = queue.SimpleQueue()
        self.previous: dict[str, tuple[float, float]] = {}  # target -> (cpu seconds, when)
        self.failing: set[str] = set()

    def run(self) -> bool:
        """One round over the targets (the job); False when any failed."""
        ok = True
        for target in self.targets:
            name = target.label()
            try:
                figures = self.scrape(target)
            except Exception as exc:  # a failing target is reported, never fatal
                ok = False
                self.metrics.scrape_up.labels(name).set(0)
                if name not in self.failing:
                    self.failing.add(name)
                    log.warning("scraping %s failed: %s", name, _describe(exc, target))
                continue
            if name in self.failing:
                self.failing.discard(name)
                log.info("scraping %s works again", name)
            self.metrics.scrape_up.labels(name).set(1)
            for figure, value in figures.items():
                self.metrics.server_resource.labels(target.model, name, figure).set(value)
            self.samples.put((target.model, name, time.time(), figures))
        return ok

    def scrape(self, target: ScrapeTarget) -> dict[str, float]:
        """Figures of one target: ``cpu_cores`` (from the second scrape on), ``memory_mb``, ``gpu_utilization``."""
        request = urllib.request.Request(target.url, headers={"Accept": "text/plain;version=0.0.4"})
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            body = response.read(MAX_BYTES + 1)
        if len(body) > MAX_BYTES:
            raise ScrapeError(f"exposition larger than {MAX_BYTES} bytes")
        raw = read_figures(body.decode("utf-8", errors="replace"), target)
        now = time.monotonic()
        figures: dict[str, float] = {}
        if "cpu_seconds" in raw:
            before = self.previous.get(target.label())
            self.previous[target.label()] = (raw["cpu_seconds"], now)
            if before is not None and raw["cpu_seconds"] >= before[0] and now > before[1]:
                figures["cpu_cores"] = (raw["cpu_seconds"] - before[0]) / (now - before[1])
        if "memory_bytes" in raw:
            figures["memory_mb"] = raw["memory_bytes"] / 2**20
        if "gpu_utilization" in raw:
            figures["gpu_utilization"] = raw["gpu_utilization"]
        if not raw:
            raise ScrapeError("none of the configured metrics is in the exposition")
        return figures

    def drain(self) -> list[tuple[str, str, float, dict[str, float]]]:
        """The scrapes done since the last call: (model, target, time, figures)."""
        out = []
        while True:
            try:
                out.append(self.samples.get_nowait())
            except queue.Empty:
                return out


def _describe(exc: Exception, target: ScrapeTarget) -> str:
    """The error, with the URL (which may carry credentials) replaced by the target's name."""
    reason: Any = getattr(exc, "reason", None)
    if getattr(exc, "code", None) is not None:
        text = f"HTTP {exc.code}"  # type: ignore[attr-defined]
    elif reason is not None:
        text = f"{type(exc).__name__}: {reason}"
    else:
        text = f"{type(exc).__name__}: {exc}"
    return text.replace(target.url, target.label())
