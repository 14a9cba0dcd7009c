"""Output-length predictor: cold start from the class prior, learning per prompt length and content, live."""

from __future__ import annotations

import random

import grpc
import pytest

from profiler import priors
from profiler.predictor import LengthPredictor, pinball_loss, prompt_feature
from services.rpc import gateway_pb2, gateway_pb2_grpc, profiler_pb2, profiler_pb2_grpc
from tests.helpers import wait_until


def test_cold_start_is_the_class_prior_clipped_to_max_tokens():
    p = LengthPredictor()
    assert p.predict("code", 100) == (priors.prior("code", 0), "class_prior")
    lengths, _ = p.predict("interactive", 100, max_tokens=50)
    assert max(lengths) == 50


def test_learns_lengths_per_prompt_length_bucket():
    p = LengthPredictor(shrink=10)
    rng = random.Random(0)
    for _ in range(2000):
        p.observe("interactive", 100, "", rng.randint(10, 30))      # short prompts: short answers
        p.observe("interactive", 3000, "", rng.randint(400, 600))   # long prompts: long answers
    short, source = p.predict("interactive", 110, "")
    long_, _ = p.predict("interactive", 2900, "")
    assert source == "learned"
    assert 10 <= short[0] < short[1] < short[2] <= 40 and 380 <= long_[0] < long_[1] < long_[2] <= 620


def test_few_samples_stay_near_the_parent():
    p = LengthPredictor(shrink=30)
    p.observe("interactive", 100, "", 5000)
    lengths, _ = p.predict("interactive", 100, "")
    assert lengths[1] < 0.1 * 5000 + priors.prior("interactive", 0)[1]


def test_pinball_and_features():
    assert pinball_loss(10, (10, 10, 10)) == 0
    assert pinball_loss(20, (0, 10, 30)) == pytest.approx((0.1 * 20 + 0.5 * 10 + 0.1 * 10) / 3)
    assert prompt_feature("def f(x):\n    return x") == "code"
    assert prompt_feature("Explain how tides work") == "long"
    assert prompt_feature("Is it raining?") == "question"


@pytest.mark.slow
def test_profiler_learns_from_completions_through_the_gateway(stack):
    """The gateway records every finished request; the Profiler's predictions move off the prior."""
    with grpc.insecure_channel(stack.gateway_address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        for _ in range(40):
            list(stub.Generate(gateway_pb2.GenerateRequest(prompt="x " * 400, max_tokens=7, slo_class="code",
                                                           ignore_eos=True), timeout=30))
    with grpc.insecure_channel(stack.profiler_address) as channel:
        profiler = profiler_pb2_grpc.ProfilerStub(channel)

        def learned() -> bool:
            # the same prompt-length bucket (the gateway's 800 characters / 4) and feature the records carry
            got = profiler.PredictLength(profiler_pb2.PredictLengthRequest(slo_class="code", prompt_tokens=200,
                                                                           prompt_feature="other"), timeout=5)
            return got.source == "learned" and abs(got.lengths[1] - 7) < 2.5

        wait_until(learned, 5, 0.1)
