"""The torch executor on CPU, through the same code path a GPU uses: real checkpoint loading, paged KV,
batched prefill and decode, and greedy output equal to transformers' ``generate``."""

from __future__ import annotations

import asyncio
import signal

import grpc
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from services.cluster import ClusterSpec, WorkerSpec  # noqa: E402
from services.rpc import gateway_pb2, gateway_pb2_grpc  # noqa: E402
from services.settings import WorkerSettings  # noqa: E402
from tests.helpers import start_stack, tandem_up, worker_stats  # noqa: E402
from workers.build import build_engine  # noqa: E402
from workers.clock import RealClock  # noqa: E402
from workers.executors.checkpoint import make_tiny_llama  # noqa: E402
from workers.executors.llama import CheckpointError  # noqa: E402
from workers.executors.torch_executor import TorchExecutor  # noqa: E402
from workers.request import Request, SamplingParams  # noqa: E402

PROMPTS = [" ".join(["the model of the cluster"] * k) + f" request {k}" for k in range(1, 17)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def hf_greedy(folder, prompts, max_new_tokens):
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    outs = []
    for p in prompts:
        ids = tok(p, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
        outs.append(gen[0, ids.shape[1]:].tolist())
    return outs


@pytest.mark.slow
def test_greedy_through_the_gateway_equals_transformers_generate(tiny, tmp_path):
    spec = ClusterSpec(workers=[WorkerSpec(id="torch-0", executor="torch", model=str(tiny), kv_blocks=512,
                                           max_num_batched_tokens=256)])
    stack = start_stack(spec, tmp_path)
    try:
        async def main():
            async with grpc.aio.insecure_channel(stack.gateway_address) as channel:
                stub = gateway_pb2_grpc.GatewayStub(channel)

                async def one(p):
                    replies = [r async for r in stub.Generate(gateway_pb2.GenerateRequest(
                        prompt=p, max_tokens=24, temperature=0.0), timeout=120)]
                    return [t for r in replies for t in r.token_ids], replies[-1]

                return await asyncio.gather(*(one(p) for p in PROMPTS))

        results = asyncio.run(main())
        stats = worker_stats(stack)["torch-0"]
    finally:
        stack.stop()
    expected = hf_greedy(tiny, PROMPTS, 24)
    lengths = {final.metrics.prompt_tokens for _, final in results}
    assert len(lengths) == 16                                  # prompts of 16 different lengths
    for (tokens, final), want in zip(results, expected):
        assert tokens == want
        assert final.finish_reason == ("length" if len(want) == 24 else "stop")
    assert stats.gpu_type == "CPU" and stats.executor == "torch" and stats.kv_blocks_used == 0


def run_engine(folder, requests_spec, first=(), **cfg_kw):
    """Run ``first`` (prompt, sampling) pairs one after another, then ``requests_spec`` all at once; returns
    each one's (tokens, text, request) in that order, and the engine."""
    cfg = WorkerSettings(executor="torch", model=str(folder), kv_blocks=cfg_kw.pop("kv_blocks", 256), **cfg_kw)

    async def main():
        clock = RealClock()
        engine = build_engine(cfg, clock)
        task = asyncio.create_task(engine.run())

        async def one(i, prompt, sampling):
            tok = engine.executor.tokenizer
            r = Request(f"r{i}", tok.encode(prompt), sampling, clock.now(), eos_token_id=tok.eos_token_id)
            stream = engine.add_request(r)
            tokens, text = [], ""
            while True:
                chunk = await stream.next_chunk()
                tokens += chunk.token_ids
                text += chunk.text
                if chunk.finished:
                    return tokens, text, r

        out = [await one(f"first{i}", p, s) for i, (p, s) in enumerate(first)]
        out += await asyncio.gather(*(one(i, p, s) for i, (p, s) in enumerate(requests_spec)))
        engine.stop()
        await task
        return out, engine

    return asyncio.run(main())


def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy(tiny):
    sample = lambda seed: SamplingParams(max_tokens=16, temperature=1.0, seed=seed, ignore_eos=True)  # noqa: E731
    (a, b, c, greedy, top1), engine = run_engine(tiny, [
        ("hello world", sample(7)), ("hello world", sample(7)), ("hello world", sample(8)),
        ("hello world", SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)),
        ("hello world", SamplingParams(max_tokens=16, temperature=0.7, top_k=1, seed=3, ignore_eos=True)),
    ])
    assert a[0] == b[0] and a[0] != c[0]
    assert top1[0] == greedy[0]
    assert engine.scheduler.blocks.num_used_blocks == 0


def test_weights_cache_and_every_step_stay_on_one_torch_thread(tiny):
    """torch's CPU thread pool belongs to the thread that first runs parallel work; a forward pass started
    from another thread (as asyncio's pool hands out) ran 2-3x slower. Loading, the cache and all steps must
    share one thread, which is not the event loop's."""
    import threading

    seen: list[int] = []
    real = TorchExecutor.run

    def spy(self, step, requests):  # type: ignore[no-untyped-def]
        seen.append(threading.get_ident())
        return real(self, step, requests)

    loader: list[int] = []
    TorchExecutor.run = spy
    try:
        out, engine = run_engine(tiny, [(f"prompt {i} " * (i + 1), SamplingParams(max_tokens=6, temperature=0.0,
                                                                                 ignore_eos=True)) for i in range(6)])
        loader.append(engine.executor._on_torch_thread(threading.get_ident))
    finally:
        TorchExecutor.run = real
    assert len(seen) >= 6 and set(seen) == set(loader)
    assert loader[0] != threading.get_ident()


def test_top_p_keeps_the_smallest_set_reaching_p():
    row = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    r = Request("x", [1], SamplingParams(temperature=1.0, top_p=0.75), 0.0)
    probs = TorchExecutor._probs(row, r)
    assert torch.allclose(probs, torch.tensor([0.625, 0.375, 0.0, 0.0]), atol=1e-6)


def test_preemption_by_recompute_keeps_greedy_output(tiny):
    prompts = [" ".join(["stream batch memory"] * k) for k in (3, 9, 15, 21)]
    greedy = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    out, _ = run_engine(tiny, [(p, greedy) for p in prompts], kv_blocks=40, block_size=4,
                        max_num_batched_tokens=64)
    assert sum(r.num_preemptions for _, _, r in out) > 0
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tiny)).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(tiny))
    for tokens, text, r in out:
        ids = torch.tensor([r.prompt_token_ids])
        want = model.generate(ids, max_new_tokens=20, min_new_tokens=20, do_sample=False)[0, ids.shape[1]:].tolist()
        assert tokens == want and text == tok.decode(want, skip_special_tokens=True)


def test_checkpoint_errors_are_clear(tiny, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        TorchExecutor(tmp_path / "missing")
    bare = tmp_path / "no-tokenizer"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((tiny / name).read_bytes())
    with pytest.raises(CheckpointError, match="has no tokenizer"):
        TorchExecutor(bare)
    broken = tmp_path / "no-weights"
    broken.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (broken / name).write_bytes((tiny / name).read_bytes())
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        TorchExecutor(broken)


@pytest.mark.slow
def test_tandem_up_with_a_torch_worker(tiny, tmp_path):
    proc, address, _ = tandem_up(["--executor", "torch", "--model", str(tiny), "--port", "0", "--log-dir", str(tmp_path)])
    try:
        with grpc.insecure_channel(address) as channel:
            replies = list(gateway_pb2_grpc.GatewayStub(channel).Generate(
                gateway_pb2.GenerateRequest(prompt="hello", max_tokens=5, temperature=0.0), timeout=60))
        assert replies[-1].metrics.worker_id == "torch-0" and replies[-1].finish_reason in ("length", "stop")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


def test_prefix_cache_keeps_greedy_output_and_skips_the_cached_prefill(tiny):
    """Follow-ups that share a long start with an earlier prompt prefill only their own tail from the cache,
    and their greedy answers equal transformers' (and the uncached engine's) token for token."""
    system = "You are a careful assistant for the cluster. Answer briefly and cite the block manager. "
    first = system + "Which worker is fastest?"
    follow = [system + f"Question {k}: how many blocks does request {k} hold?" for k in range(6)]
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)

    results = {caching: run_engine(tiny, [(p, greedy) for p in follow], first=[(first, greedy)], block_size=4,
                                   prefix_caching=caching) for caching in (True, False)}
    cached_out, plain_out = ([tokens for tokens, _, _ in results[c][0]] for c in (True, False))
    blocks, plain_blocks = (results[c][1].scheduler.blocks for c in (True, False))
    assert blocks.hit_tokens >= len(follow) * 16          # the shared start is many 4-token blocks long
    assert plain_blocks.hit_tokens == 0 and blocks.num_used_blocks == 0
    assert cached_out == plain_out == hf_greedy(tiny, [first] + follow, 12)
