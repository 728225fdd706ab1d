"""Parameter and FLOPs accounting for llmpipe's GPT, and what the hardware can do.

Conventions (the ones nanoGPT's MFU estimate and PaLM's appendix B use):
- A matmul of an (m × k) by a (k × n) matrix costs 2·m·k·n FLOPs; training (forward + backward) costs
  3× the forward pass.
- N in `6N` counts the parameters a token is multiplied by: every weight except the embedding lookups,
  plus the output projection (the tied embedding matrix counts here, once). For GPT-2 124M that is
  123,551,232: all parameters except the 786,432 position embeddings.
- Attention adds 12·L·H·Q·T per token for training (QKᵀ and A·V over a context of T, forward 4·L·H·Q·T),
  with T the attention span (the sliding window when it is shorter than the context). Like nanoGPT, it
  counts the full T×T score matrix, not the causal half a fused kernel actually computes.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

from model.config import GPTConfig


@dataclass(frozen=True)
class ParamCount:
    token_embedding: int
    position_embedding: int  # learned positions only; rope and sinusoidal have none
    attention: int  # all layers: q, k, v, o projections (+ biases)
    mlp: int  # all layers (+ biases)
    norms: int  # all layers + the final norm
    lm_head: int  # 0 when tied to the token embedding

    @property
    def total(self) -> int:
        """What `sum(p.numel() for p in model.parameters())` gives."""
        return (
            self.token_embedding
            + self.position_embedding
            + self.attention
            + self.mlp
            + self.norms
            + self.lm_head
        )

    @property
    def non_embedding(self) -> int:
        """Kaplan et al.'s N: everything except the vocabulary and position embeddings and the head."""
        return self.attention + self.mlp + self.norms

    @property
    def compute(self) -> int:
        """The N of 6N: non-embedding parameters plus the output projection (vocab × width)."""
        return self.non_embedding + (self.lm_head or self.token_embedding)


def count_params(config: GPTConfig) -> ParamCount:
    """Closed-form parameter count of `model.gpt.GPT(config)`, layer by layer."""
    d, layers, bias = config.n_embd, config.n_layer, int(config.bias)
    q_width, kv_width = config.n_head * config.head_dim, config.kv_heads * config.head_dim
    attention = d * q_width + 2 * d * kv_width + q_width * d + bias * (q_width + 2 * kv_width + d)
    hidden = config.hidden
    if config.mlp != "swiglu":  # gelu, relu2: up (d → hidden), down (hidden → d)
        mlp = 2 * d * hidden + bias * (hidden + d)
    else:  # gate and up (d → hidden each), down (hidden → d)
        mlp = 3 * d * hidden + bias * (2 * hidden + d)
    norm = d * (2 if config.norm == "layernorm" and config.bias else 1)
    return ParamCount(
        token_embedding=config.vocab_size * d,
        position_embedding=config.block_size * d if config.pos_encoding == "learned" else 0,
        attention=layers * attention,
        mlp=layers * mlp,
        norms=(2 * layers + 1) * norm + layers * 2 * config.head_dim * config.qk_norm,
        lm_head=0 if config.tie_embeddings else config.vocab_size * d,
    )


def attention_flops_per_token(config: GPTConfig, context: int | None = None, training: bool = True) -> int:
    """Score + weighted-sum FLOPs of one token over `context` previous positions (default: the full block)."""
    span = min(context or config.block_size, config.attention_span)
    forward = 4 * config.n_layer * config.n_head * config.head_dim * span
    return 3 * forward if training else forward


def train_flops_per_token(
    config: GPTConfig, include_attention: bool = True, context: int | None = None
) -> int:
    """Training FLOPs per token: 6N, plus 12·L·H·Q·T for attention unless `include_attention=False`
    (T: `context`, the training sequence length; default a full block)."""
    flops = 6 * count_params(config).compute
    return flops + (attention_flops_per_token(config, context) if include_attention else 0)


def forward_flops_per_token(config: GPTConfig, context: int | None = None, kv_cache: bool = True) -> int:
    """Forward FLOPs to generate one token after `context` tokens (default: a full block).

    With a KV cache only the new token goes through the weights (2N) and attends to the cached keys.
    Without one, every position of the context is recomputed to produce the next token."""
    context = context or config.block_size
    per_position = 2 * count_params(config).compute + attention_flops_per_token(
        config, context, training=False
    )
    return per_position if kv_cache else context * per_position


# --------------------------------------------------------------------------------------------------
# Hardware
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Accelerator:
    name: str
    description: str
    peak_flops: float  # dense bf16 matmul FLOP/s from the vendor's data sheet (no sparsity)
    memory_gb: float


#: Peak dense bf16 tensor-core throughput (FP32 accumulate), per device, from NVIDIA's data sheets.
ACCELERATORS: dict[str, Accelerator] = {
    a.name: a
    for a in (
        Accelerator("h100", "NVIDIA H100 SXM", 989.4e12, 80),
        Accelerator("h100-pcie", "NVIDIA H100 PCIe", 756.5e12, 80),
        Accelerator("h200", "NVIDIA H200 SXM", 989.4e12, 141),
        Accelerator("a100", "NVIDIA A100 (SXM or PCIe)", 312e12, 80),
        Accelerator("l40s", "NVIDIA L40S", 362.1e12, 48),
        Accelerator("l4", "NVIDIA L4", 121e12, 24),
        Accelerator("rtx4090", "NVIDIA GeForce RTX 4090", 165.2e12, 24),
    )
}
CPU = "cpu"
ACCELERATOR_NAMES: tuple[str, ...] = (*ACCELERATORS, CPU)


def accelerator_for(device_name: str) -> str | None:
    """The ACCELERATORS key of a CUDA device name ("NVIDIA H100 80GB HBM3" → "h100"), or None."""
    name = device_name.lower().replace(" ", "").replace("-", "")
    pcie = "pcie" in name
    for key in sorted(ACCELERATORS, key=len, reverse=True):  # "l40s" before "l4", "h100-pcie" before "h100"
        if key.replace("-pcie", "") in name and pcie == key.endswith("-pcie"):
            return key
    return None


def measure_cpu_flops(seconds: float = 0.5, size: int = 1024) -> float:
    """This machine's fp32 matmul FLOP/s with torch on all its threads (the best of a few timed repeats)."""
    import torch  # lazy: counting FLOPs needs no torch, only this measurement does

    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)  # warm-up: thread pool, caches
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        tick = time.perf_counter()
        for _ in range(4):
            torch.mm(a, b)
        best = max(best, 4 * 2 * size**3 / (time.perf_counter() - tick))
    return best


def peak_flops(gpu: str) -> float:
    """Peak FLOP/s of one device: the table's figure, or a measurement for "cpu"."""
    if gpu == CPU:
        return measure_cpu_flops()
    if gpu not in ACCELERATORS:
        raise ValueError(f"unknown GPU {gpu!r}; known: {', '.join(ACCELERATOR_NAMES)}")
    return ACCELERATORS[gpu].peak_flops


def cpu_peak_flops(cache: Path | None = None) -> float:
    """This machine's measured matmul FLOP/s (2 digits), remembered in the JSON file `cache` so that the
    same machine plans the same model run after run (the measurement itself varies by a few percent)."""
    key = f"{platform.machine()}/{platform.processor() or platform.node()}/{os.cpu_count()}"
    if cache is not None and cache.is_file():
        remembered = json.loads(cache.read_text(encoding="utf-8"))
        if remembered.get("machine") == key:
            return float(remembered["peak_flops"])
    peak = float(f"{measure_cpu_flops():.2g}")
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        temporary = cache.with_name(f".{cache.name}.tmp")
        temporary.write_text(json.dumps({"machine": key, "peak_flops": peak}), encoding="utf-8")
        temporary.replace(cache)
    return peak
