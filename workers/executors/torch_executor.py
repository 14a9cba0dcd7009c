"""The torch executor: runs a local Hugging-Face-format Llama-family checkpoint on CPU or CUDA.

Each step is read from the scheduler's block tables on the event loop as plain lists; its tensors, the forward
pass and sampling then run in the executor's one torch thread, so the service keeps streaming while the model computes.
That thread also loads the weights and allocates the KV cache: on CPU, torch's OpenMP pool belongs to the
thread that first runs parallel work, and a second thread doing so (the loop's, or whichever of asyncio's pool
threads came next) made the forward pass 2-3x slower here (2.9-3.6 ms against 8.7-9.4 ms a batch-64 step of
the hidden-128 checkpoint, both threads idle otherwise). Sampling
supports greedy (temperature 0), temperature, top-k and top-p, with a generator per request seeded from the
request's seed, so the same seed gives the same answer.
"""

from __future__ import annotations

import asyncio
import secrets
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence, TypeVar

import torch

from workers.block_manager import BlockManager
from workers.executors.llama import CheckpointError, LlamaArch, PagedLlama, StepInputs
from workers.request import Request
from workers.scheduler import SchedulerOutput
from workers.true_lengths import TrueLengths

T = TypeVar("T")


@dataclass
class StepPlan:
    """One step as plain lists: new tokens in order, their positions and cache slots, decodes as (row, blocks
    read, context length), prefill chunks as (row start, length, context before, blocks read or None), and the
    rows whose next token is sampled."""

    tokens: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    decodes: list[tuple[int, list[int], int]] = field(default_factory=list)
    prefills: list[tuple[int, int, int, list[int] | None]] = field(default_factory=list)
    logit_rows: list[int] = field(default_factory=list)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class HfTokenizer:
    """The checkpoint's own tokenizer, behind the engine's small tokenizer interface."""

    def __init__(self, folder: Path) -> None:
        names = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
        if not any((folder / n).exists() for n in names):
            raise CheckpointError(f"{folder} has no tokenizer ({', '.join(names)}); save one with the checkpoint "
                                  "(tokenizer.save_pretrained) or make a test checkpoint with "
                                  "`tandem make-checkpoint`")
        from transformers import AutoTokenizer

        self.hf = AutoTokenizer.from_pretrained(str(folder))
        self.eos_token_id: int | None = self.hf.eos_token_id
        self._fast_decode = self._backend_decode(self.hf)

    @staticmethod
    def _backend_decode(hf: object) -> Callable[..., str] | None:
        """The Rust tokenizer's own decode when transformers' would add nothing to it (no clean-up pass to apply):
        the engine decodes twice per token per request, and transformers' wrapper costs four times the decode."""
        backend = getattr(hf, "_tokenizer", None)
        if backend is None or not hasattr(backend, "decode"):
            return None
        cleans = getattr(hf, "clean_up_tokenization_spaces", False)
        if cleans and not (type(backend.model).__name__ == "BPE" and not getattr(
                hf, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False)):
            return None
        return backend.decode

    def encode(self, text: str) -> list[int]:
        return list(self.hf(text)["input_ids"])

    def decode(self, token_ids: Sequence[int]) -> str:
        if self._fast_decode is not None:
            return self._fast_decode(list(token_ids), skip_special_tokens=True)
        return self.hf.decode(list(token_ids), skip_special_tokens=True)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device, checkpoint_dtype: str) -> torch.dtype:
    if name != "auto":
        return DTYPES[name]
    if device.type == "cpu":
        return torch.float32                # half precision matmuls are slow on CPU
    return DTYPES.get(checkpoint_dtype, torch.bfloat16)


class TorchExecutor:
    name = "torch"

    def __init__(self, folder: str | Path, device: str = "auto", dtype: str = "auto",
                 max_model_len: int = 0, threads: int = 0) -> None:
        folder = Path(folder)
        if threads:
            torch.set_num_threads(threads)
        self._torch_thread = ThreadPoolExecutor(1, thread_name_prefix="torch", initializer=torch.set_num_threads,
                                                initargs=(threads or torch.get_num_threads(),))
        if not folder.is_dir():
            raise CheckpointError(f"checkpoint folder {folder} does not exist")
        self.tokenizer = HfTokenizer(folder)
        self.device = pick_device(device)
        arch = LlamaArch.from_folder(folder)
        self.model = self._on_torch_thread(PagedLlama, folder, self.device,
                                           pick_dtype(dtype, self.device, arch.dtype), arch)
        if self.tokenizer.eos_token_id is None:
            self.tokenizer.eos_token_id = arch.eos_token_id
        self.max_model_len = min(max_model_len, arch.max_position_embeddings) if max_model_len else \
            arch.max_position_embeddings
        self.blocks: BlockManager | None = None
        self._generators: dict[str, torch.Generator] = {}
        self.true_lengths = TrueLengths()

    # ----- KV memory ---------------------------------------------------------------------------------
    def kv_blocks_for_memory(self, block_size: int, memory_utilization: float) -> int:
        """On CUDA: the blocks that fit in ``memory_utilization`` of the device beside what is already used."""
        if self.device.type != "cuda":
            raise ValueError("device memory sizing needs CUDA; on CPU set --kv-blocks")
        free, total = torch.cuda.mem_get_info(self.device)
        used = total - free
        budget = total * memory_utilization - used
        return max(0, int(budget // self.model.kv_bytes_per_block(block_size)))

    def bind_blocks(self, blocks: BlockManager) -> None:
        self.blocks = blocks
        self._on_torch_thread(self.model.allocate_cache, blocks.num_blocks, blocks.block_size)

    def _on_torch_thread(self, fn: Callable[..., T], *args: object) -> T:
        """``fn(*args)`` on the torch thread, waited for (start-up work: weights, cache)."""
        return self._torch_thread.submit(fn, *args).result()

    # ----- one step ----------------------------------------------------------------------------------
    def prepare(self, batch: SchedulerOutput) -> tuple[StepPlan, list[Request]]:
        """The step as plain lists, copied from the block tables on the event loop (an abort may change a table
        the moment the loop moves on); the torch thread turns them into tensors."""
        assert self.blocks is not None, "bind_blocks first"
        bs = self.blocks.block_size
        plan = StepPlan()
        sampled: list[Request] = []
        for item in batch.scheduled:
            r, n, before = item.request, item.num_new_tokens, item.context_before
            table = self.blocks.block_table(r.request_id)
            start = len(plan.tokens)
            plan.tokens.extend(r.token_ids(before, before + n))
            plan.positions.extend(range(before, before + n))
            plan.slots.extend(table[p // bs] * bs + p % bs for p in range(before, before + n))
            reads = table[:-(-(before + n) // bs)]      # the blocks its keys are read from
            if n == 1 and before > 0:
                plan.decodes.append((start, reads, before + 1))
            else:
                plan.prefills.append((start, n, before, reads if before > 0 else None))
            if item.samples:
                plan.logit_rows.append(len(plan.tokens) - 1)
                sampled.append(r)
        return plan, sampled

    def inputs(self, plan: StepPlan) -> StepInputs:
        """The step's tensors (on the torch thread: on CPU the larger ones are filled by its thread pool)."""
        dev = self.device
        assert self.blocks is not None
        return StepInputs(
            token_ids=torch.tensor(plan.tokens, device=dev), positions=torch.tensor(plan.positions, device=dev),
            slot_mapping=torch.tensor(plan.slots, device=dev),
            decodes=self._decode_groups(plan.decodes, self.blocks.block_size),
            prefills=[(s, n, b, torch.tensor(k, device=dev) if k is not None else None)
                      for s, n, b, k in plan.prefills],
            logit_rows=torch.tensor(plan.logit_rows, device=dev, dtype=torch.long))

    GROUP_SPREAD = 1.5      # a decode group's longest context is at most this times its shortest (plus a block)

    def _decode_groups(self, decodes: list[tuple[int, list[int], int]], bs: int
                       ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Decodes (row, blocks read, context length) sorted by context and cut into groups of similar length,
        each padded to its own longest."""
        order = sorted(decodes, key=lambda d: d[2])
        groups: list[list[tuple[int, list[int], int]]] = []
        for d in order:
            if groups and d[2] <= self.GROUP_SPREAD * groups[-1][0][2] + bs:
                groups[-1].append(d)
            else:
                groups.append([d])
        out = []
        dev = self.device
        for group in groups:
            width = max(len(reads) for _, reads, _ in group)      # blocks the group's longest decode reads
            blocks = torch.tensor([reads + [0] * (width - len(reads)) for _, reads, _ in group], device=dev)
            lens = torch.tensor([n for _, _, n in group], device=dev)
            mask = torch.arange(width * bs, device=dev)[None, :] < lens[:, None]
            out.append((torch.tensor([row for row, _, _ in group], device=dev), blocks,
                        mask.view(len(group), 1, 1, width * bs)))
        return out

    def run(self, plan: StepPlan, requests: list[Request]) -> dict[str, int]:
        logits = self.model.forward(self.inputs(plan))
        return self.sample(logits, requests)

    async def execute(self, batch: SchedulerOutput) -> dict[str, int]:
        plan, requests = self.prepare(batch)
        sampled = await asyncio.get_running_loop().run_in_executor(self._torch_thread, self.run, plan, requests)
        self.true_lengths.end_answers(batch, sampled, self.tokenizer.eos_token_id)
        return sampled

    def release(self, request_id: str) -> None:
        self._generators.pop(request_id, None)
        self.true_lengths.forget(request_id)

    # ----- sampling ----------------------------------------------------------------------------------
    def sample(self, logits: torch.Tensor, requests: list[Request]) -> dict[str, int]:
        out: dict[str, int] = {}
        greedy = [i for i, r in enumerate(requests) if r.sampling.temperature == 0]
        if greedy:
            picks = logits[greedy].argmax(dim=-1).tolist()
            for i, token in zip(greedy, picks):
                out[requests[i].request_id] = token
        for i, r in enumerate(requests):
            if r.sampling.temperature == 0:
                continue
            probs = self._probs(logits[i], r)
            out[r.request_id] = int(torch.multinomial(probs, 1, generator=self._generator(r)).item())
        return out

    @staticmethod
    def _probs(row: torch.Tensor, r: Request) -> torch.Tensor:
        sp = r.sampling
        row = row / sp.temperature
        if 0 < sp.top_k < row.shape[-1]:
            kth = torch.topk(row, sp.top_k).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        probs = torch.softmax(row, dim=-1)
        if sp.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            outside = sorted_probs.cumsum(-1) - sorted_probs > sp.top_p    # keep the smallest set reaching top_p
            sorted_probs[outside] = 0.0
            probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        return probs / probs.sum()

    def _generator(self, r: Request) -> torch.Generator:
        g = self._generators.get(r.request_id)
        if g is None:
            g = torch.Generator(device=self.device)
            g.manual_seed(r.sampling.seed if r.sampling.seed is not None else secrets.randbits(63))
            self._generators[r.request_id] = g
        return g
