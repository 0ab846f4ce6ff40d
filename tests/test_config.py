"""The config: `inferwatch check` on the shipped file and on broken ones (exit 2, a message that says
which file, where in it and what was expected), command-line overrides, per-model detector settings,
watch/ignore globs and ${VAR} secrets in kafka.security."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from monitor.cli import overrides
from monitor.config import load_config
from monitor.errors import ConfigError
from monitor.sources.kafka import security_settings

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "configs" / "inferwatch.yaml"


def check(path: Path | str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "monitor", "check", "-c", str(path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)


def written(tmp_path: Path, text: str, name: str = "inferwatch.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_shipped_config_passes_check():
    result = check(SHIPPED)
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout


# YAML -> what the error must name besides the file: the YAML path and what was expected
BROKEN = {
    "wrong type": ("kafka:\n  poll:\n    max_records: lots\n",
                   ["$.kafka.poll.max_records", "Expected `int`, got `str`"]),
    "number below its minimum": ("kafka:\n  poll:\n    max_records: 0\n",
                                 ["$.kafka.poll.max_records", ">= 1"]),
    "unknown key (typo)": ("kafka:\n  bootstrap_server: ['kafka:9092']\n",
                           ["$.kafka", "unknown field `bootstrap_server`"]),
    "unknown section": ("kafak:\n  group_id: x\n", ["$", "unknown field `kafak`"]),
    "bad detector parameter": ("detectors:\n  drift:\n    delta: 5\n",
                               ["$.detectors.drift.delta", "0 < delta < 1"]),
    "unknown detector parameter": ("detectors:\n  drift:\n    delat: 0.01\n",
                                   ["$.detectors.drift", "unknown field `delat`", "known keys here", "sample_every"]),
    "bad detector stream": ("detectors:\n  drift:\n    streams: [confidnce]\n",
                            ["$.detectors.drift.streams[0]", "confidnce", "expected one of", "latency_ms"]),
    "missing drift reference": ("detectors:\n  drift:\n    reference: /no/such/ref.jsonl\n",
                                ["$.detectors.drift.reference", "no such file: /no/such/ref.jsonl"]),
    "unknown detector name": ("detectors:\n  drfit: {}\n", ["$.detectors.drfit", "unknown detector 'drfit'", "drift"]),
    "bad override parameter": ("models:\n  overrides:\n    - model: 'fraud-*'\n      detectors: {drift: {delta: 2}}\n",
                               ["$.models.overrides[0].detectors.drift.delta", "0 < delta < 1"]),
    "unknown detector in an override": ("models:\n  overrides:\n    - model: 'x*'\n      detectors: {nope: false}\n",
                                        ["$.models.overrides[0].detectors.nope", "unknown detector 'nope'"]),
    "bad duration": ("state:\n  checkpoint_interval: soon\n",
                     ["$.state.checkpoint_interval", "duration such as 30s", "'soon'"]),
    "bootstrap host without port": ("kafka:\n  bootstrap_servers: [kafka]\n",
                                    ["$.kafka.bootstrap_servers[0]", "host:port", "'kafka'"]),
    "same topic twice": ("kafka:\n  topics: {logs: a, dead_letters: a}\n",
                         ["$.kafka.topics", "three different topics"]),
    "invalid enum": ("logging:\n  level: LOUD\n", ["$.logging.level", "LOUD"]),
    "not a mapping": ("- kafka\n- models\n", ["$", "expected a mapping of sections"]),
}


@pytest.mark.parametrize("text, expected", BROKEN.values(), ids=BROKEN.keys())
def test_broken_config_exits_2_naming_file_path_and_expectation(tmp_path, text, expected):
    path = written(tmp_path, text)
    result = check(path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert str(path) in result.stderr
    for part in expected:
        assert part in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_invalid_yaml_names_the_line(tmp_path):
    path = written(tmp_path, "kafka:\n  group_id: watch\n  client_id: a: b\nmodels:\n  watch: ['*']\n")
    result = check(path)
    assert result.returncode == 2
    assert str(path) in result.stderr
    assert "line 3, column 15: not valid YAML: mapping values are not allowed here" in result.stderr


def test_missing_config_file_exits_2(tmp_path):
    path = tmp_path / "nowhere.yaml"
    result = check(path)
    assert result.returncode == 2
    assert str(path) in result.stderr and "cannot read the config file" in result.stderr
    assert "Traceback" not in result.stderr


def test_empty_config_file_means_defaults(tmp_path):
    assert check(written(tmp_path, "")).returncode == 0


def test_defaults_apply_without_a_file():
    config = load_config(None)
    assert config.kafka.bootstrap_servers == ["localhost:9092"]
    assert config.detectors == {"drift": {}}
    assert config.source == "<defaults>"


# -- command-line overrides -----------------------------------------------------------------------

def namespace(**given: object) -> argparse.Namespace:
    flags = {"bootstrap": None, "topic": None, "group": None, "http_port": None, "state_dir": None,
             "log_level": None, "log_format": None}
    return argparse.Namespace(**{**flags, **given})


def test_bootstrap_flag_becomes_a_list_replacing_the_file_value():
    config = load_config(SHIPPED, overrides(namespace(bootstrap="a:1, b:2,")))
    assert config.kafka.bootstrap_servers == ["a:1", "b:2"]


def test_flags_replace_file_values():
    config = load_config(SHIPPED, overrides(namespace(topic="logs-eu", group="watch-eu", http_port=0,
                                                      state_dir="/var/lib/iw", log_level="DEBUG")))
    assert config.kafka.topics.logs == "logs-eu"
    assert config.kafka.group_id == "watch-eu"
    assert config.http.port == 0
    assert config.state.dir == "/var/lib/iw"
    assert config.logging.level == "DEBUG"


def test_flags_leave_other_file_values_alone(tmp_path):
    path = written(tmp_path, "kafka:\n  group_id: from-file\n  topics: {logs: file-logs}\n")
    config = load_config(path, overrides(namespace(topic="flag-logs")))
    assert config.kafka.topics.logs == "flag-logs"
    assert config.kafka.group_id == "from-file"


def test_no_flags_no_overrides():
    assert overrides(namespace()) == {}


def test_bad_override_is_a_config_error_naming_the_key():
    with pytest.raises(ConfigError, match=r"\$\.kafka\.bootstrap_servers\[1\]: expected host:port"):
        load_config(None, overrides(namespace(bootstrap="a:1,b")))


# -- per-model detector settings ------------------------------------------------------------------

OVERRIDES = """
detectors:
  drift: {delta: 0.002, streams: [confidence, latency_ms]}
models:
  overrides:
    - model: "fraud-*"
      detectors:
        drift: {delta: 0.0005}
    - model: "fraud-eu"
      detectors:
        drift: {delta: 0.1}
    - model: "canary-*"
      detectors: {drift: false}
"""


def test_detector_params_apply_the_first_matching_override(tmp_path):
    config = load_config(written(tmp_path, OVERRIDES))
    assert config.detector_params("fraud-eu") == {"drift": {"delta": 0.0005, "streams": ["confidence", "latency_ms"]}}


def test_detector_params_without_a_matching_override_are_the_defaults(tmp_path):
    config = load_config(written(tmp_path, OVERRIDES))
    assert config.detector_params("credit") == {"drift": {"delta": 0.002, "streams": ["confidence", "latency_ms"]}}


def test_false_switches_a_detector_off_for_matching_models(tmp_path):
    config = load_config(written(tmp_path, OVERRIDES))
    assert config.detector_params("canary-7") == {}


def test_detector_params_do_not_change_the_configured_defaults(tmp_path):
    config = load_config(written(tmp_path, OVERRIDES))
    config.detector_params("fraud-eu")
    config.detector_params("canary-7")
    assert config.detectors == {"drift": {"delta": 0.002, "streams": ["confidence", "latency_ms"]}}


def test_watch_and_ignore_globs(tmp_path):
    config = load_config(written(tmp_path, "models:\n  watch: ['fraud-*', 'credit']\n  ignore: ['*-shadow']\n"))
    assert config.watches("fraud-eu")
    assert config.watches("credit")
    assert not config.watches("credit-v2")  # a glob without * matches only itself
    assert not config.watches("fraud-eu-shadow")  # ignore wins over watch
    assert not config.watches("churn")


def test_globs_are_case_sensitive(tmp_path):
    config = load_config(written(tmp_path, "models:\n  watch: ['fraud-*']\n"))
    assert not config.watches("Fraud-eu")


# -- ${VAR} in kafka.security ---------------------------------------------------------------------

SECURITY = """
kafka:
  security:
    security_protocol: SASL_SSL
    sasl_mechanism: SCRAM-SHA-512
    sasl_plain_username: ${KAFKA_USER}
    sasl_plain_password: ${KAFKA_PASSWORD}
    ssl_password: literal-${KAFKA_KEY_PASSWORD}
"""


def test_security_values_are_read_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("KAFKA_USER", "inferwatch")
    monkeypatch.setenv("KAFKA_PASSWORD", "s3cr3t-pw")
    monkeypatch.setenv("KAFKA_KEY_PASSWORD", "k3y")
    settings = security_settings(load_config(written(tmp_path, SECURITY)))
    assert settings == {"security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512",
                        "sasl_plain_username": "inferwatch", "sasl_plain_password": "s3cr3t-pw",
                        "ssl_password": "literal-k3y"}


def test_unset_security_variable_is_a_config_error_naming_it_without_leaking_secrets(tmp_path, monkeypatch):
    monkeypatch.setenv("KAFKA_USER", "inferwatch-user-value")
    monkeypatch.delenv("KAFKA_PASSWORD", raising=False)
    monkeypatch.setenv("KAFKA_KEY_PASSWORD", "k3y-very-secret")
    path = written(tmp_path, SECURITY)
    with pytest.raises(ConfigError) as caught:
        security_settings(load_config(path))
    message = str(caught.value)
    assert "KAFKA_PASSWORD" in message
    assert str(path) in message and "$.kafka.security.sasl_plain_password" in message
    assert "inferwatch-user-value" not in message
    assert "k3y-very-secret" not in message


def test_bootstrap_port_out_of_range_is_rejected(tmp_path):
    result = check(written(tmp_path, "kafka:\n  bootstrap_servers: ['kafka:99999']\n"))
    assert result.returncode == 2
    assert "$.kafka.bootstrap_servers[0]" in result.stderr


def test_duration_as_a_plain_number_of_seconds(tmp_path):
    result = check(written(tmp_path, "state:\n  checkpoint_interval: 60\n"))
    assert result.returncode == 0, result.stderr
