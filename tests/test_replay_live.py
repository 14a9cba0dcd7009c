"""A short live replay in CI: a scenario through `tandem bench replay` against a local stack, as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_short_live_replay_of_a_multi_slo_scenario(tmp_path):
    scenario = tmp_path / "scenario.yaml"
    scenario.write_text("name: ci-slice\nduration_s: 8\nrate_scale: 1.0\nsources:\n"
                        "  - {trace: azure-conv, slo_class: interactive}\n"
                        "  - {trace: azure-code, slo_class: code}\n")
    out = tmp_path / "replay.json"
    done = subprocess.run([sys.executable, "-m", "tandem.cli", "bench", "replay", "--scenario", str(scenario),
                           "--out", str(out)], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    summary = result["summary"]
    assert summary["all"]["offered"] >= 5 and summary["all"]["failed"] == 0
    assert {"interactive", "code"} <= set(summary)
    assert 0 < summary["all"]["ttft_ms_p50"] <= summary["all"]["e2e_ms_p50"]
    assert summary["all"]["slo_attainment"] > 0.5 and "SLO met" in done.stderr
