"""The torch executor: runs a local Hugging-Face-format Llama-family checkpoint on CPU or CUDA.

Inputs of each step are built from the scheduler's block tables on the event loop; the forward pass and
sampling then run in the executor's one torch thread, so the service keeps streaming while the model computes.
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
from pathlib import Path
from typing import Callable, Sequence, TypeVar

import torch

from workers.block_manager import BlockManager
from workers.executors.llama import CheckpointError, LlamaArch, PagedLlama, StepInputs
from workers.request import Request
from workers.scheduler import SchedulerOutput
from workers.true_lengths import TrueLengths

T = TypeVar("T")

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
    def prepare(self, batch: SchedulerOutput) -> tuple[StepInputs, list[Request]]:
        assert self.blocks is not None, "bind_blocks first"
        bs = self.blocks.block_size
        tokens: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        decode_rows: list[int] = []
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        prefills: list[tuple[int, int, int, torch.Tensor | None]] = []
        logit_rows: list[int] = []
        sampled: list[Request] = []
        for item in batch.scheduled:
            r, n, before = item.request, item.num_new_tokens, item.context_before
            table = self.blocks.block_table(r.request_id)
            start = len(tokens)
            prompt_len = len(r.prompt_token_ids)
            if before + n <= prompt_len:
                tokens.extend(r.prompt_token_ids[before:before + n])
            else:
                tokens.extend((r.prompt_token_ids + r.output_token_ids)[before:before + n])
            positions.extend(range(before, before + n))
            slots.extend(table[p // bs] * bs + p % bs for p in range(before, before + n))
            if n == 1 and before > 0:
                decode_rows.append(start)
                decode_tables.append(table)
                decode_lens.append(before + 1)
            else:
                key_blocks = torch.tensor(table[:-(-(before + n) // bs)]) if before > 0 else None
                prefills.append((start, n, before, key_blocks))
            if item.samples:
                logit_rows.append(len(tokens) - 1)
                sampled.append(r)
        dev = self.device
        step = StepInputs(
            token_ids=torch.tensor(tokens, device=dev), positions=torch.tensor(positions, device=dev),
            slot_mapping=torch.tensor(slots, device=dev),
            decodes=self._decode_groups(decode_rows, decode_tables, decode_lens, bs),
            prefills=[(s, n, b, k.to(dev) if k is not None else None) for s, n, b, k in prefills],
            logit_rows=torch.tensor(logit_rows, device=dev, dtype=torch.long))
        return step, sampled

    GROUP_SPREAD = 1.5      # a decode group's longest context is at most this times its shortest (plus a block)

    def _decode_groups(self, rows: list[int], tables: list[list[int]], lens: list[int], bs: int
                       ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Decodes sorted by context and cut into groups of similar length, each padded to its own longest."""
        order = sorted(range(len(rows)), key=lens.__getitem__)
        groups: list[list[int]] = []
        for i in order:
            if groups and lens[i] <= self.GROUP_SPREAD * lens[groups[-1][0]] + bs:
                groups[-1].append(i)
            else:
                groups.append([i])
        out = []
        dev = self.device
        for group in groups:
            width = -(-max(lens[i] for i in group) // bs)      # blocks the group's longest decode reads
            blocks = torch.tensor([tables[i][:width] + [0] * (width - len(tables[i][:width])) for i in group])
            mask = torch.arange(width * bs)[None, :] < torch.tensor([lens[i] for i in group])[:, None]
            out.append((torch.tensor([rows[i] for i in group], device=dev), blocks.to(dev),
                        mask.view(len(group), 1, 1, width * bs).to(dev)))
        return out

    def run(self, step: StepInputs, requests: list[Request]) -> dict[str, int]:
        logits = self.model.forward(step)
        return self.sample(logits, requests)

    async def execute(self, batch: SchedulerOutput) -> dict[str, int]:
        step, requests = self.prepare(batch)
        sampled = await asyncio.get_running_loop().run_in_executor(self._torch_thread, self.run, step, requests)
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
