"""The datasheet model must reproduce DESIGN.md's A100 Llama-2-7B profile within about 10%."""

import pytest

from services.catalog import GPUS, MODELS
from services.latency import LatencyModel


@pytest.mark.parametrize("prompt,low_ms,high_ms", [(512, 37, 37), (2048, 158, 158)])
def test_prefill_matches_published_profile(prompt, low_ms, high_ms):
    got = LatencyModel.from_names("A100-80G", "llama-2-7b").prefill_time(prompt) * 1000
    assert low_ms * 0.9 <= got <= high_ms * 1.1


@pytest.mark.parametrize("batch,expected_ms", [(1, 9.7), (64, 29.0)])
def test_decode_matches_published_profile(batch, expected_ms):
    got = LatencyModel.from_names("A100-80G", "llama-2-7b").decode_time(batch, 1000) * 1000
    assert got == pytest.approx(expected_ms, rel=0.11)


def test_faster_gpu_is_faster_and_every_pair_is_known():
    for model in MODELS:
        times = {g: LatencyModel.from_names(g, model).decode_time(8, 1000) for g in GPUS}
        assert times["h200"] < times["a100-80g"] < times["t4"]


def test_unknown_names_are_clear_errors():
    with pytest.raises(KeyError, match="unknown GPU type 'B300'"):
        LatencyModel.from_names("B300", "llama-2-7b")
    with pytest.raises(KeyError, match="unknown model"):
        LatencyModel.from_names("A10", "gpt-9")


def test_kv_capacity_leaves_room_for_weights():
    a10 = LatencyModel.from_names("A10", "llama-2-7b")
    # 24 GB * 0.9 - 13.5 GB of weights, at 0.5 MiB per token
    assert 14_000 < a10.kv_capacity_tokens() < 17_000
    assert LatencyModel.from_names("T4", "llama-2-13b").kv_capacity_tokens() == 0


def test_saturated_capacity_ranks_gpus_and_is_bounded_by_kv():
    cap = {g: LatencyModel.from_names(g, "llama-2-7b").saturated_decode_tok_s() for g in ("A100-80G", "L40S", "A10")}
    assert cap["A100-80G"] > cap["L40S"] > cap["A10"] > 0
    # the A10 holds ~15k tokens of KV: 15 sequences of 1,024 tokens, each step ~ 45 ms
    a10 = LatencyModel.from_names("A10", "llama-2-7b")
    assert cap["A10"] == pytest.approx(15 / a10.decode_time(15, 1024))
