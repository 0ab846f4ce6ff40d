"""Files as a source and the command line: `inferwatch run --input` on JSONL, gzip, stdin and globs,
with detections and dead letters written to files, and the help and usage errors of `inferwatch`."""

from __future__ import annotations

import base64
import gzip
import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from monitor.errors import InferWatchError
from monitor.sources.files import FileSource

ROOT = Path(__file__).resolve().parent.parent


def confidence_drop(seed: int = 11) -> list[bytes]:
    """3000 confident events, then 1500 unsure ones: a change the drift detector reports."""
    rng = random.Random(seed)
    lines = []
    for i in range(4500):
        confidence = rng.gauss(0.93, 0.02) if i < 3000 else rng.gauss(0.6, 0.05)
        lines.append(json.dumps({"event_id": f"e{i}", "ts": 1_764_000_000 + i * 0.01, "model": "fraud",
                                 "client_id": f"c{i % 7}", "confidence": min(1.0, max(0.0, confidence))}).encode())
    return lines


def jsonl(lines: list[bytes]) -> bytes:
    return b"".join(line + b"\n" for line in lines)


def inferwatch(*args: str, state: Path | None = None, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    """`inferwatch ARGS`; with ``state`` it is a run: its own state directory and a free HTTP port."""
    extra = ["--state-dir", str(state), "--http-port", "0"] if state is not None else []
    return subprocess.run([sys.executable, "-m", "monitor", *args, *extra], cwd=ROOT, input=stdin,
                          capture_output=True, timeout=120)


def detections(text: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def assert_confidence_drift(found: list[dict[str, Any]], result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    assert found, result.stderr.decode()[-3000:]
    assert (found[0]["model"], found[0]["kind"], found[0]["evidence"]["features"]) == (
        "fraud", "prediction_drift", ["confidence"])


# -- the file source ------------------------------------------------------------------------------

def read_all(*patterns: str, max_line_bytes: int = 1_048_576) -> list[Any]:
    source = FileSource(list(patterns), batch_size=3, max_line_bytes=max_line_bytes)
    return [record for batch in source.batches() for record in batch]


def test_each_line_is_a_record_named_by_file_and_line(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_bytes(b'{"a": 1}\n{"b": 2}\r\n{"c": 3}')  # CRLF and no final newline are fine
    assert [(r.value, r.topic, r.offset) for r in read_all(str(path))] == [
        (b'{"a": 1}', str(path), 1), (b'{"b": 2}', str(path), 2), (b'{"c": 3}', str(path), 3)]


def test_blank_lines_are_skipped_and_line_numbers_kept(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_bytes(b'{"a": 1}\n\n   \n\t\r\n{"b": 2}\n\n')
    assert [(r.value, r.offset) for r in read_all(str(path))] == [(b'{"a": 1}', 1), (b'{"b": 2}', 5)]


def test_gzip_is_detected_by_content_whatever_the_name(tmp_path):
    path = tmp_path / "events.log"
    path.write_bytes(gzip.compress(b'{"a": 1}\n{"b": 2}\n'))
    assert [r.value for r in read_all(str(path))] == [b'{"a": 1}', b'{"b": 2}']


def test_a_glob_reads_its_files_in_sorted_order(tmp_path):
    for name in ("c", "a", "b"):
        (tmp_path / f"part-{name}.jsonl").write_bytes(name.encode() + b"\n")
    (tmp_path / "other.jsonl").write_bytes(b"not matched\n")
    assert [r.value for r in read_all(str(tmp_path / "part-*.jsonl"))] == [b"a", b"b", b"c"]


def test_an_over_long_line_is_cut_and_the_next_line_still_read(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"x" * 5000 + b"\n" + b'{"next": 1}\n')
    long, following = read_all(str(path), max_line_bytes=100)
    assert len(long.value) == 101  # one byte over the limit: enough for the decoder to reject it
    assert (following.value, following.offset) == (b'{"next": 1}', 2)


@pytest.mark.parametrize("pattern, message", [("missing.jsonl", "no such file"), ("none-*.jsonl", "no file matches")])
def test_missing_input_is_a_user_error(tmp_path, pattern, message):
    with pytest.raises(InferWatchError, match=message):
        FileSource([str(tmp_path / pattern)])


# -- inferwatch run --input -----------------------------------------------------------------------

def test_run_writes_detections_as_json_lines_to_output(tmp_path):
    events = tmp_path / "events.jsonl"
    events.write_bytes(jsonl(confidence_drop()))
    out = tmp_path / "detections.jsonl"
    result = inferwatch("run", "--input", str(events), "--output", str(out), state=tmp_path / "state")
    found = detections(out.read_bytes())
    assert_confidence_drift(found, result)
    assert found[0]["source"]["topic"] == str(events)
    assert 3000 < found[0]["source"]["offset"] <= 4500


def test_run_reads_gzip_input(tmp_path):
    events = tmp_path / "events.jsonl.gz"
    events.write_bytes(gzip.compress(jsonl(confidence_drop())))
    out = tmp_path / "detections.jsonl"
    result = inferwatch("run", "--input", str(events), "--output", str(out), state=tmp_path / "state")
    assert_confidence_drift(detections(out.read_bytes()), result)


def test_run_reads_standard_input_and_writes_detections_to_standard_output(tmp_path):
    result = inferwatch("run", "--input", "-", state=tmp_path / "state", stdin=jsonl(confidence_drop()))
    found = detections(result.stdout)
    assert_confidence_drift(found, result)
    assert found[0]["source"]["topic"] == "stdin"


def test_run_reads_every_file_of_a_glob_in_order(tmp_path):
    lines = confidence_drop()
    for name, part in zip("abc", (lines[:1500], lines[1500:3000], lines[3000:])):
        (tmp_path / f"part-{name}.jsonl").write_bytes(jsonl(part))
    out = tmp_path / "detections.jsonl"
    result = inferwatch("run", "--input", str(tmp_path / "part-*.jsonl"), "--output", str(out),
                        state=tmp_path / "state")
    found = detections(out.read_bytes())
    assert_confidence_drift(found, result)
    assert found[0]["source"]["topic"] == str(tmp_path / "part-c.jsonl")


def test_run_writes_dead_letters_with_reason_and_source_line(tmp_path):
    config = tmp_path / "inferwatch.yaml"
    config.write_text("limits:\n  max_message_bytes: 1024\n")
    events = tmp_path / "events.jsonl"
    too_long = json.dumps({"event_id": "big", "ts": 1, "model": "fraud", "pad": "x" * 5000}).encode()
    events.write_bytes(jsonl([b'{"event_id": "e0", "ts": 1, "model": "fraud"}', too_long, b"not json",
                              b'{"event_id": "e3", "ts": 2, "model": "fraud", "confidence": 1.5}']))
    letters_path = tmp_path / "dead-letters.jsonl"
    result = inferwatch("run", "-c", str(config), "--input", str(events), "--output", str(tmp_path / "d.jsonl"),
                        "--dead-letters", str(letters_path), state=tmp_path / "state")
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    letters = [json.loads(line) for line in letters_path.read_text().splitlines()]
    assert [(d["reason"], d["source"]["topic"], d["source"]["offset"]) for d in letters] == [
        ("message_too_large", str(events), 2), ("invalid_json", str(events), 3), ("out_of_range", str(events), 4)]
    assert base64.b64decode(letters[1]["value_b64"]) == b"not json"
    assert all(d["error"] for d in letters)


def test_run_with_a_missing_input_exits_2_naming_it(tmp_path):
    missing = tmp_path / "missing.jsonl"
    result = inferwatch("run", "--input", str(missing), state=tmp_path / "state")
    assert result.returncode == 2
    assert f"--input {missing}: no such file" in result.stderr.decode()
    assert b"Traceback" not in result.stderr


def test_output_without_input_is_a_usage_error(tmp_path):
    result = inferwatch("run", "--output", str(tmp_path / "d.jsonl"), state=tmp_path / "state")
    assert result.returncode == 2
    assert "--output and --dead-letters go with --input" in result.stderr.decode()


def test_unwritable_output_exits_2_naming_it(tmp_path):
    events = tmp_path / "events.jsonl"
    events.write_bytes(b'{"event_id": "e0", "ts": 1, "model": "fraud"}\n')
    out = events / "detections.jsonl"  # under a file: no directory can be made there
    result = inferwatch("run", "--input", str(events), "--output", str(out), state=tmp_path / "state")
    assert result.returncode == 2
    assert str(out) in result.stderr.decode()
    assert b"Traceback" not in result.stderr


# -- help and usage -------------------------------------------------------------------------------

@pytest.mark.parametrize("args, flags", [
    ((), ["run", "check", "demo", "playbooks", "pending", "approve", "reject", "--version"]),
    (("run",), ["--input", "--output", "--dead-letters", "--config", "--bootstrap", "--topic", "--group",
                "--http-port", "--state-dir", "--stage", "--playbooks", "--dry-run"]),
    (("check",), ["--config", "--playbooks"]),
    (("playbooks", "test"), ["--playbooks", "--detection"]),
    (("approve",), ["incident", "step", "--by", "--url", "--token-env"]),
], ids=["inferwatch", "run", "check", "playbooks-test", "approve"])
def test_help_exits_0_and_names_the_key_flags(args, flags):
    result = inferwatch(*args, "--help")
    assert result.returncode == 0, result.stderr.decode()
    text = result.stdout.decode()
    assert text.startswith("usage: inferwatch")
    for flag in flags:
        assert flag in text


def test_no_command_exits_2_with_the_usage():
    result = inferwatch()
    assert result.returncode == 2
    assert b"usage: inferwatch" in result.stdout + result.stderr


def test_a_missing_secret_variable_stops_run_with_exit_2_naming_it(tmp_path, monkeypatch):
    config = tmp_path / "c.yaml"
    config.write_text("kafka:\n  security:\n    sasl_plain_password: ${IW_NOT_SET_ANYWHERE}\n")
    monkeypatch.delenv("IW_NOT_SET_ANYWHERE", raising=False)
    result = subprocess.run([sys.executable, "-m", "monitor", "run", "-c", str(config), "--bootstrap", "127.0.0.1:1",
                             "--http-port", "0", "--state-dir", str(tmp_path / "state")],
                            cwd=ROOT, capture_output=True, timeout=60)
    assert result.returncode == 2
    assert b"IW_NOT_SET_ANYWHERE" in result.stderr and b"$.kafka.security.sasl_plain_password" in result.stderr


def test_waiting_for_a_broker_that_is_down_stays_healthy_not_ready_and_stops_on_sigterm(tmp_path):
    import json as _json
    import signal
    import time
    import urllib.error
    import urllib.request

    from monitor.broker import free_port

    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "monitor", "run", "--bootstrap", f"127.0.0.1:{free_port()}",
                                "--http-port", str(port), "--state-dir", str(tmp_path / "state")],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        def get(path):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
                    return response.status, _json.loads(response.read())
            except urllib.error.HTTPError as exc:
                return exc.code, _json.loads(exc.read())

        for _ in range(100):
            try:
                status, body = get("/readyz")
                if body["reason"] != "starting":
                    break
            except OSError:
                pass
            time.sleep(0.1)
        assert (status, body["reason"]) == (503, "waiting for the broker")
        assert get("/healthz")[0] == 200
        process.send_signal(signal.SIGTERM)
        # it stops within the wait's back-off, not after a client's 30-second bootstrap timeout
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    output = process.stdout.read().decode()
    assert output.count("not reachable") == 1, output
