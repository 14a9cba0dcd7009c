"""A Llama-family forward pass over the engine's paged KV blocks, in plain PyTorch.

Reads a Hugging-Face-format checkpoint folder (config.json plus safetensors, sharded or not) for the
architectures that share Llama's layout (Llama, Mistral, Qwen2 with its QKV biases). The KV cache is one
flat slot array per layer: slot = block_id * block_size + offset, so the scheduler's block tables index it
directly, and reads gather whole blocks (index_select of block ids, a contiguous copy each), which is several
times faster on CPU than gathering single slots. Decodes of a step run as a few padded batches of similar
context length (padding everything to the longest wasted up to half the gather); prefill chunks run per
sequence. Numerics follow
transformers' implementation (RMSNorm in float32, rotate-half RoPE) so greedy output matches its ``generate``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"}


class CheckpointError(ValueError):
    pass


@dataclass(frozen=True)
class LlamaArch:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    eos_token_id: int | None
    dtype: str

    @classmethod
    def from_folder(cls, folder: Path) -> "LlamaArch":
        path = folder / "config.json"
        try:
            cfg = json.loads(path.read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{folder} has no config.json; is it a Hugging Face checkpoint folder?") from None
        archs = set(cfg.get("architectures") or [])
        if not archs & SUPPORTED_ARCHITECTURES:
            raise CheckpointError(f"{path}: architectures {sorted(archs)} not supported; "
                                  f"supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))}")
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", cfg.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise CheckpointError(f"{path}: rope type {rope_type!r} is not supported (default, llama3)")
        heads = cfg["num_attention_heads"]
        eos = cfg.get("eos_token_id")
        return cls(
            vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"], num_heads=heads, num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads, rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta), rope_scaling=rope if rope_type == "llama3" else None,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            eos_token_id=eos[0] if isinstance(eos, list) else eos,
            dtype=cfg.get("dtype") or cfg.get("torch_dtype") or "float32")

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim

    def n_params(self) -> int:
        attn = self.hidden_size * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        mlp = 3 * self.hidden_size * self.intermediate_size
        embed = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * (attn + mlp + 2 * self.hidden_size) + embed + self.hidden_size


def load_weights(folder: Path, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, from model.safetensors or the shards its index names."""
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise CheckpointError(f"{folder} has no model.safetensors (or index); only safetensors weights load")
    weights: dict[str, torch.Tensor] = {}
    for name in files:
        for key, tensor in load_file(str(folder / name), device="cpu").items():
            weights[key] = tensor.to(device=device, dtype=dtype)
    return weights


def rope_inv_freq(arch: LlamaArch) -> torch.Tensor:
    d = arch.head_dim
    inv = 1.0 / (arch.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = arch.rope_scaling
    if s:   # llama3: keep high frequencies, divide low ones by the factor, blend in between
        factor, low, high = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
        old = s.get("original_max_position_embeddings", 8192)
        wavelen = 2 * math.pi / inv
        smooth = (old / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old / low, inv / factor, inv)
        mid = (wavelen >= old / high) & (wavelen <= old / low)
        inv = torch.where(mid, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
    return inv


@dataclass
class StepInputs:
    """One step's tensors, built on the event loop before the forward runs in a worker thread."""

    token_ids: torch.Tensor          # [T] every new token of the step, sequence after sequence
    positions: torch.Tensor          # [T]
    slot_mapping: torch.Tensor       # [T] where each new token's K and V go
    # single-token decodes, grouped by similar context: (rows of T [B], block ids [B, W] padded,
    # mask [B, 1, 1, W * block_size] True where a key is real)
    decodes: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    prefills: list[tuple[int, int, int, torch.Tensor | None]]   # (row start, length, context before, block ids)
    logit_rows: torch.Tensor         # [S] rows whose next token is sampled


class PagedLlama:
    def __init__(self, folder: Path, device: torch.device, dtype: torch.dtype, arch: LlamaArch | None = None) -> None:
        self.arch = arch or LlamaArch.from_folder(folder)
        self.device, self.dtype = device, dtype
        w = load_weights(folder, dtype, device)
        a = self.arch

        def get(name: str) -> torch.Tensor:
            try:
                return w[name]
            except KeyError:
                raise CheckpointError(f"{folder}: weight {name} missing") from None

        self.embed = get("model.embed_tokens.weight")
        self.norm = get("model.norm.weight")
        self.lm_head = self.embed if a.tie_word_embeddings or "lm_head.weight" not in w else w["lm_head.weight"]
        self.layers = []
        for i in range(a.num_layers):
            p = f"model.layers.{i}."
            self.layers.append({
                "ln1": get(p + "input_layernorm.weight"), "ln2": get(p + "post_attention_layernorm.weight"),
                "q": get(p + "self_attn.q_proj.weight"), "k": get(p + "self_attn.k_proj.weight"),
                "v": get(p + "self_attn.v_proj.weight"), "o": get(p + "self_attn.o_proj.weight"),
                "qb": w.get(p + "self_attn.q_proj.bias"), "kb": w.get(p + "self_attn.k_proj.bias"),
                "vb": w.get(p + "self_attn.v_proj.bias"), "ob": w.get(p + "self_attn.o_proj.bias"),
                "gate": get(p + "mlp.gate_proj.weight"), "up": get(p + "mlp.up_proj.weight"),
                "down": get(p + "mlp.down_proj.weight"),
            })
        positions = torch.arange(a.max_position_embeddings, dtype=torch.float32)
        freqs = torch.outer(positions, rope_inv_freq(a))
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos, self.sin = emb.cos().to(device, dtype), emb.sin().to(device, dtype)
        self.k_cache: list[torch.Tensor] = []
        self.v_cache: list[torch.Tensor] = []
        # reused outputs of the block gathers: a fresh large tensor every layer costs page faults on first touch,
        # which on CPU made the gather several times slower than the copy itself
        self._gather_k = torch.empty(0, device=device, dtype=dtype)
        self._gather_v = torch.empty(0, device=device, dtype=dtype)

    @property
    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.values() if t is not None) + \
            (self.embed.numel() + (0 if self.lm_head is self.embed else self.lm_head.numel())) * self.embed.element_size()

    def kv_bytes_per_block(self, block_size: int) -> int:
        return self.arch.kv_bytes_per_token * block_size * torch.tensor([], dtype=self.dtype).element_size()

    def allocate_cache(self, num_blocks: int, block_size: int) -> None:
        a = self.arch
        shape = (num_blocks, block_size, a.num_kv_heads, a.head_dim)
        self.k_cache = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in range(a.num_layers)]
        self.v_cache = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in range(a.num_layers)]

    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.arch.rms_norm_eps)
        return weight * h.to(x.dtype)

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    @staticmethod
    def _gather(cache: torch.Tensor, blocks: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
        """``cache[blocks]`` into a reused buffer (grown when too small)."""
        need = blocks.numel() * cache[0].numel()
        if scratch.numel() < need:
            scratch.resize_(need)
        out = scratch[:need].view(blocks.numel(), *cache.shape[1:])
        return torch.index_select(cache, 0, blocks, out=out)

    @torch.inference_mode()
    def forward(self, step: StepInputs) -> torch.Tensor:
        """Logits (float32) for ``step.logit_rows``; writes the step's keys and values into the cache."""
        a = self.arch
        T = step.token_ids.shape[0]
        H, KVH, D = a.num_heads, a.num_kv_heads, a.head_dim
        x = self.embed[step.token_ids]
        cos = self.cos[step.positions].unsqueeze(1)
        sin = self.sin[step.positions].unsqueeze(1)
        scale = 1.0 / math.sqrt(D)
        for li, layer in enumerate(self.layers):
            h = self._rms(x, layer["ln1"])
            q = self._rotate(F.linear(h, layer["q"], layer["qb"]).view(T, H, D), cos, sin)
            k = self._rotate(F.linear(h, layer["k"], layer["kb"]).view(T, KVH, D), cos, sin)
            v = F.linear(h, layer["v"], layer["vb"]).view(T, KVH, D)
            kc, vc = self.k_cache[li], self.v_cache[li]
            kc.view(-1, KVH, D).index_copy_(0, step.slot_mapping, k)
            vc.view(-1, KVH, D).index_copy_(0, step.slot_mapping, v)
            out = torch.empty_like(q)
            for rows, blocks, mask in step.decodes:
                B = rows.shape[0]
                flat = blocks.reshape(-1)
                qd = q[rows].unsqueeze(2)                                     # [B, H, 1, D]
                kd = self._gather(kc, flat, self._gather_k).view(B, -1, KVH, D).transpose(1, 2)   # [B, KVH, W*bs, D]
                vd = self._gather(vc, flat, self._gather_v).view(B, -1, KVH, D).transpose(1, 2)
                o = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask, scale=scale, enable_gqa=KVH != H)
                out[rows] = o.squeeze(2)
            for start, n, before, blocks in step.prefills:
                qp = q[start:start + n].transpose(0, 1).unsqueeze(0)         # [1, H, n, D]
                if before == 0:
                    kp = k[start:start + n].transpose(0, 1).unsqueeze(0)
                    vp = v[start:start + n].transpose(0, 1).unsqueeze(0)
                    o = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=scale, enable_gqa=KVH != H)
                else:
                    L = before + n
                    kp = kc.index_select(0, blocks).view(-1, KVH, D)[:L].transpose(0, 1).unsqueeze(0)
                    vp = vc.index_select(0, blocks).view(-1, KVH, D)[:L].transpose(0, 1).unsqueeze(0)
                    mask = torch.ones(n, before + n, dtype=torch.bool, device=x.device).tril(before)
                    o = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, scale=scale, enable_gqa=KVH != H)
                out[start:start + n] = o[0].transpose(0, 1)
            x = x + F.linear(out.reshape(T, H * D), layer["o"], layer["ob"])
            h = self._rms(x, layer["ln2"])
            x = x + F.linear(F.silu(F.linear(h, layer["gate"])) * F.linear(h, layer["up"]), layer["down"])
        rows = self._rms(x[step.logit_rows], self.norm)
        return F.linear(rows, self.lm_head).float()
