"""Periodic work on APScheduler. A job only raises a flag; the main loop does the work between batches
(so detectors are never used from two threads) and reports it with ``done``: a failure is logged and
counted, never fatal, and the last run shows in /metrics.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from apscheduler.schedulers.background import BackgroundScheduler

from monitor.ops.metrics import Metrics

log = logging.getLogger("inferwatch.jobs")


class Jobs:
    def __init__(self, metrics: Metrics):
        self.metrics = metrics
        self.scheduler = BackgroundScheduler(daemon=True, job_defaults={"coalesce": True, "max_instances": 1})
        self.due: dict[str, threading.Event] = {}

    def flag_every(self, name: str, seconds: float) -> threading.Event:
        """An event set every ``seconds``; the main loop clears it and does the job itself."""
        flag = self.due.setdefault(name, threading.Event())
        self.scheduler.add_job(flag.set, "interval", seconds=seconds, id=name, name=name)
        return flag

    def run_every(self, name: str, seconds: float, work: Callable[[], bool]) -> None:
        """Run ``work`` every ``seconds`` on the scheduler's thread (it must not touch detectors); it
        returns False or raises on failure, which is logged and counted."""
        def job() -> None:
            try:
                ok = work()
            except Exception:
                log.exception("scheduled job %s failed", name)
                self.done(name, False)
                return
            # it ran (the last-run time moves), and a partial failure is counted
            self.metrics.job_last_run.labels(name).set(time.time())
            if not ok:
                self.metrics.job_failures.labels(name).inc()

        self.scheduler.add_job(job, "interval", seconds=seconds, id=name, name=name)

    def done(self, name: str, ok: bool) -> None:
        """Called by the main loop after a flagged job ran."""
        if ok:
            self.metrics.job_last_run.labels(name).set(time.time())
        else:
            self.metrics.job_failures.labels(name).inc()

    def start(self) -> None:
        self.scheduler.start()

    def stop(self) -> None:
        if self.scheduler.running:
            self.scheduler.shutdown(wait=False)
