"""Trace loading and DESIGN.md's metric definitions, on hand-computed cases."""

import math

import pytest

from bench.metrics import RequestRecord, e2e, satisfaction, slo_met, summarize, tpot, ttft
from bench.traces import TraceError, default_trace_path, load_azure, load_sharegpt_lengths
from services.slo import SloClass

INTERACTIVE = SloClass(ttft_ms=1000, tpot_ms=100)
CODE = SloClass(e2e_ms=2000)


def rec(times, slo=INTERACTIVE, ok=True, arrival=0.0):
    return RequestRecord("r", "interactive" if slo is INTERACTIVE else "code", slo, arrival, list(times), ok=ok)


def test_timings():
    r = rec([0.5, 0.6, 0.8], arrival=0.1)
    assert ttft(r) == pytest.approx(0.4) and tpot(r) == pytest.approx(0.15) and e2e(r) == pytest.approx(0.7)
    assert tpot(rec([0.5])) is None


def test_slo_met_rules():
    assert slo_met(rec([0.9, 0.95, 1.0]))
    assert not slo_met(rec([1.1, 1.2]))                  # TTFT over 1 s
    assert not slo_met(rec([0.2, 0.5]))                  # TPOT 300 ms
    assert slo_met(rec([1.9], slo=CODE)) and not slo_met(rec([2.1], slo=CODE))
    assert not slo_met(rec([0.1], ok=False)) and not slo_met(rec([]))


def test_satisfaction_hand_computed():
    assert satisfaction(rec([0.5, 0.6, 0.7])) == pytest.approx(1.0)
    # one token, 1 s late: weight 1, exp(-1/1)
    assert satisfaction(rec([2.0])) == pytest.approx(math.exp(-1))
    # first on time (0.5), second due at 1.1 arrives 1.6: 0.5 + 0.5 * exp(-0.5)
    assert satisfaction(rec([0.5, 1.6])) == pytest.approx(0.5 + 0.5 * math.exp(-0.5))
    # three tokens: first late by 0.5; second due 1.1 on time; third due 1.2 arrives 1.7
    assert satisfaction(rec([1.5, 1.1, 1.7])) == pytest.approx(0.5 * math.exp(-0.5) + 0.25 + 0.25 * math.exp(-0.5))
    assert satisfaction(rec([0.1], ok=False)) == 0.0


def test_summary_counts_failures_as_misses():
    records = [rec([0.5, 0.55]), rec([], ok=False), rec([3.0], slo=CODE)]
    s = summarize(records, duration_s=2.0)
    assert s["all"]["offered"] == 3 and s["all"]["failed"] == 1
    assert s["all"]["slo_attainment"] == pytest.approx(1 / 3)
    assert s["interactive"]["slo_attainment"] == pytest.approx(0.5)
    assert s["all"]["throughput_tok_s"] == pytest.approx(1.5)
    assert s["interactive"]["ttft_ms_p50"] == pytest.approx(500)


def test_load_real_azure_slice():
    rows = load_azure(default_trace_path("conv"), duration_s=60)
    assert rows[0].arrival_s == 0.0 and all(0 <= r.arrival_s < 60 for r in rows)
    assert all(b.arrival_s >= a.arrival_s for a, b in zip(rows, rows[1:]))
    assert len(rows) > 50 and all(r.input_tokens > 0 for r in rows)


def test_window_offsets_rebase_to_zero():
    rows = load_azure(default_trace_path("code"), start_s=100, duration_s=300)
    assert rows[0].arrival_s >= 0 and rows[-1].arrival_s < 300


@pytest.mark.parametrize("content,problem", [
    ("a,b,c\n1,2,3\n", "expected header"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.97,12\n", ":2: expected 3 fields"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\nyesterday,12,3\n", ":2:"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.97,12,x\n", ":2:"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.97,-1,3\n", ">= 0"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n", "no requests"),
    ("", "expected header"),
])
def test_malformed_traces_are_clear_errors(tmp_path, content, problem):
    path = tmp_path / "trace.csv"
    path.write_text(content)
    with pytest.raises(TraceError, match=problem):
        load_azure(path)


def test_fractional_seconds_keep_100ns_digits(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.9799600,5,5\n"
                    "2023-11-16 18:17:04.0000001,5,5")
    rows = load_azure(path)
    assert rows[1].arrival_s == pytest.approx(0.0200401, abs=1e-7)


def test_sharegpt_lengths():
    pairs = load_sharegpt_lengths()
    assert len(pairs) == 30731 and all(i > 0 and o > 0 for i, o in pairs)
    assert max(o for _, o in pairs) <= 1024


@pytest.mark.parametrize("content,problem", [
    ("a,b\n1,2\n", "missing columns"),
    ("num_prefill_tokens,num_decode_tokens\n5,x\n", ":2:"),
    ("num_prefill_tokens,num_decode_tokens\n5,0\n", "positive"),
    ("num_prefill_tokens,num_decode_tokens\n", "no rows"),
])
def test_malformed_length_files(tmp_path, content, problem):
    path = tmp_path / "lengths.csv"
    path.write_text(content)
    with pytest.raises(TraceError, match=problem):
        load_sharegpt_lengths(path)
