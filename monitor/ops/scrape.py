"""The ``scrape`` job: read the model servers' own Prometheus endpoints and hand their CPU, memory and
GPU figures to the resource detector.

It runs on APScheduler's thread and touches no detector: each scrape's figures go into a queue that the
main loop drains between batches (``Scraper.drain``). The text is parsed with prometheus_client's own
parser. CPU is a counter of seconds, so the figure is its rate between two scrapes (cores in use); a
counter that went back (a restarted server) starts the rate afresh. A target that fails (refused,
timed out, not the exposition format) is logged when it starts and stops failing, counted in
``inferwatch_job_failures{job="scrape"}`` and shown by ``inferwatch_scrape_up``; the others are still read.
Targets run in parallel, so one that times out does not delay the others. Credentials: a URL's
``user:password@`` becomes a basic ``Authorization`` header, ``bearer_token`` a bearer one, and
``${VAR}`` in either reads the environment (a Kubernetes Secret); all of them are registered with the
log formatter, and logs and metrics name a target by its ``name`` (default host:port), never its URL.
"""

from __future__ import annotations

import base64
import logging
import os
import queue
import re
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from monitor.config import ScrapeTarget
from monitor.errors import ConfigError
from monitor.ops import logs
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


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _expand(text: str, where: str) -> str:
    missing = [name for name in _ENV_REF.findall(text) if name not in os.environ]
    if missing:
        raise ConfigError(f"{where}: environment variable {missing[0]} is not set")
    return _ENV_REF.sub(lambda m: os.environ[m.group(1)], text)


def prepare(target: ScrapeTarget, where: str) -> tuple[str, dict[str, str]]:
    """(the URL without credentials, the request's headers), secrets registered with the log formatter."""
    url = _expand(target.url, f"{where}.url")
    parts = urllib.parse.urlsplit(url)
    headers = {"Accept": "text/plain;version=0.0.4"}
    if parts.username is not None or parts.password is not None:
        user = urllib.parse.unquote(parts.username or "")
        password = urllib.parse.unquote(parts.password or "")
        for secret in (password, parts.netloc.rsplit("@", 1)[0], url):
            if secret:
                logs.redact(secret)
        headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        host = parts.hostname + (f":{parts.port}" if parts.port else "")
        url = urllib.parse.urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
    if target.bearer_token:
        token = _expand(target.bearer_token, f"{where}.bearer_token")
        logs.redact(token)
        headers["Authorization"] = f"Bearer {token}"
    return url, headers


class Scraper:
    def __init__(self, targets: list[ScrapeTarget], timeout: float, metrics: Metrics, where: str = "jobs.scrape"):
        self.targets = targets
        self.requests = [prepare(t, f"{where}.targets[{i}]") for i, t in enumerate(targets)]
        self.timeout = timeout
        self.metrics = metrics
        self.samples: queue.SimpleQueue[tuple[str, str, float, dict[str, float]]] = queue.SimpleQueue()
        self.previous: dict[str, tuple[float, float]] = {}  # target -> (cpu seconds, when)
        self.failing: set[str] = set()

    def run(self) -> bool:
        """One round over the targets, in parallel (the job); False when any failed."""
        with ThreadPoolExecutor(max_workers=min(8, max(1, len(self.targets)))) as pool:
            outcomes = list(pool.map(self._attempt, range(len(self.targets))))
        ok = True
        for target, (url, _), (figures, error) in zip(self.targets, self.requests, outcomes):
            name = target.label()
            if error is not None:  # a failing target is reported, never fatal
                ok = False
                self.metrics.scrape_up.labels(name).set(0)
                if name not in self.failing:
                    self.failing.add(name)
                    log.warning("scraping %s failed: %s", name, _describe(error, url, name))
                continue
            if name in self.failing:
                self.failing.discard(name)
                log.info("scraping %s works again", name)
            self.metrics.scrape_up.labels(name).set(1)
            for figure, value in figures.items():
                self.metrics.server_resource.labels(target.model, name, figure).set(value)
            self.samples.put((target.model, name, time.time(), figures))
        return ok

    def _attempt(self, i: int) -> tuple[dict[str, float] | None, Exception | None]:
        try:
            return self.scrape(i), None
        except Exception as exc:
            return None, exc

    def scrape(self, i: int) -> dict[str, float]:
        """Figures of target ``i``: ``cpu_cores`` (from the second scrape on), ``memory_mb``, ``gpu_utilization``."""
        target = self.targets[i]
        url, headers = self.requests[i]
        request = urllib.request.Request(url, headers=headers)
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


def _describe(exc: Exception, url: str, name: str) -> str:
    """The error, with the URL replaced by the target's name (the log formatter hides the secrets)."""
    reason: Any = getattr(exc, "reason", None)
    if getattr(exc, "code", None) is not None:
        text = f"HTTP {exc.code}"  # type: ignore[attr-defined]
    elif reason is not None:
        text = f"{type(exc).__name__}: {reason}"
    else:
        text = f"{type(exc).__name__}: {exc}"
    return text.replace(url, name)
