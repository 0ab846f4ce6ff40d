"""Without alibi-detect (the main environment): a config that names the `alibi` detector is refused when
it loads, with the install command, rather than failing at the first event."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(importlib.util.find_spec("alibi_detect") is not None,
                                reason="alibi-detect is installed here (the `make test-alibi` environment)")


def test_check_of_a_config_with_alibi_exits_2_saying_how_to_install_it(tmp_path):
    saved = tmp_path / "saved-detector"
    saved.mkdir()
    (saved / "config.toml").write_text('name = "KSDrift"\n')
    config = tmp_path / "inferwatch.yaml"
    config.write_text(f"detectors:\n  alibi:\n    path: {saved}\n")
    result = subprocess.run([sys.executable, "-m", "monitor", "check", "-c", str(config)], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "$.detectors.alibi.path: alibi-detect is not installed" in result.stderr
    assert "pip install 'inferwatch[alibi]'" in result.stderr
    assert "Business Source License" in result.stderr and "numpy<2" in result.stderr
