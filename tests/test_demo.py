"""`inferwatch demo` end to end: embedded broker, real models' traffic, injected incidents found."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.conftest import ROOT


def test_demo_detects_the_injected_incidents_and_counts_the_malformed_messages(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "monitor", "demo", "--duration", "24", "--rate", "1500", "--http-port", "0",
         "--state-dir", str(tmp_path / "state")],
        cwd=ROOT, capture_output=True, text=True, timeout=180)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "incident injected: digits input drift" in out
    assert "incident injected: cancer release 2024-12, 1.6x slower" in out
    # the drift of digits and the slower release of cancer are both reported, each as one line
    assert re.search(r"digits\s+prediction_drift\s+confidence fell", out), out
    assert re.search(r"digits\s+feature_drift\s+\d+ input columns? drifted", out), out
    assert re.search(r"cancer\s+latency_anomaly\s+latency_ms of cancer 2024-12 is 1\.\d+x the baseline of 2024-11", out), out
    # the client sending costly requests, by the resource detector
    assert re.search(r"digits\s+resource_anomaly\s+client=sponge client sponge sends expensive requests", out), out
    # and the client probing digits with random images, by the probing detector
    assert re.search(r"digits\s+model_extraction\s+client=mallory ", out), out
    # every message sent was consumed, and the malformed ones are dead letters, counted by reason
    sent = re.search(r"events sent (\d+) \(malformed (\d+)\), consumed (\d+)", out)
    assert sent, out
    total, malformed, processed = map(int, sent.groups())
    assert processed == total and malformed > 0
    letters = re.search(r"dead letters: (.*)", out).group(1)
    assert sum(int(n) for n in re.findall(r"\b(\d+)\b", letters)) == malformed
    assert "http://127.0.0.1:" in out and "/metrics" in out
    # the shipped playbooks answered, in a dry run: the prober's incident, every step shown, none run
    assert re.search(r"probing-response \[digits/mallory\] x\d+: tell dry_run, evidence dry_run, block dry_run", out), out
    assert re.search(r"slow-release \[cancer/2024-12\] x\d+: page dry_run, alert dry_run, rollback dry_run", out), out
