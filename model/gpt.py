"""A decoder-only GPT in plain PyTorch, every choice in GPTConfig (model/config.py).

    token ids ─► embedding (+ learned or sinusoidal positions) ─► n_layer × Block ─► final norm ─► head
    Block:  x = x + Attention(norm(x));  x = x + MLP(norm(x))        (pre-norm, residual stream)

- Attention: separate q/k/v/o projections (what LoRA targets and what Llama checkpoints store), optional
  grouped-query attention (n_kv_head < n_head), rotary positions applied to q and k, and
  `scaled_dot_product_attention` with `is_causal=True` (flash kernels on GPU) whenever no explicit mask
  is needed. A sliding window, a chunk appended to a KV cache, or padding uses an explicit boolean mask.
- Batches of prompts of different lengths are left-padded: `attention_mask` (1 = token, 0 = padding, as
  transformers takes it) hides the padding from attention, and positions count real tokens only, so
  each row computes exactly what it would alone.
- `return_attention=True` takes the slow path (softmax(QKᵀ/√d) materialised) to hand back the weights.
- A KVCache makes incremental decoding cost one position per step instead of the whole prefix.
- Initialisation follows GPT-2: N(0, 0.02), residual output projections scaled by 1/√(2·n_layer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from model.config import GPTConfig


def make_norm(config: GPTConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd, eps=config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


def rope_tables(config: GPTConfig, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (length, head_dim) in Llama's half-split layout: frequencies repeated for both halves."""
    half = torch.arange(0, config.head_dim, 2, dtype=torch.float32) / config.head_dim
    inv_freq = 1.0 / (config.rope_theta**half)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, heads, T, head_dim) by position: x·cos + rotate_half(x)·sin (as HF Llama does); cos and
    sin are (B or 1, 1, T, head_dim), one row of positions per sequence."""
    first, second = x.chunk(2, dim=-1)
    rotated = torch.cat([-second, first], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


def sinusoidal_table(config: GPTConfig) -> torch.Tensor:
    """Vaswani et al.'s fixed positions (block_size, n_embd): sin on even, cos on odd dimensions."""
    position = torch.arange(config.block_size, dtype=torch.float32)[:, None]
    scale = torch.exp(
        torch.arange(0, config.n_embd, 2, dtype=torch.float32) * (-math.log(10000.0) / config.n_embd)
    )
    table = torch.zeros(config.block_size, config.n_embd)
    table[:, 0::2] = torch.sin(position * scale)
    table[:, 1::2] = torch.cos(position * scale)
    return table


@dataclass
class KVCache:
    """Keys and values of every layer for the positions seen so far: (B, kv_heads, length, head_dim).

    Each layer's are stored in a buffer with room to grow (doubling when full), so appending a token
    writes one position instead of copying the whole cache (torch.cat) at every step."""

    keys: list[torch.Tensor] = field(default_factory=list)  # buffers (B, kv_heads, capacity, head_dim)
    values: list[torch.Tensor] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)  # positions filled, per layer

    @property
    def length(self) -> int:
        return self.lengths[0] if self.lengths else 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new positions' k and v to layer `layer`; return all of its keys and values."""
        if layer == len(self.keys):
            self.keys.append(k.new_empty(*k.shape[:2], 0, k.shape[3]))
            self.values.append(v.new_empty(*v.shape[:2], 0, v.shape[3]))
            self.lengths.append(0)
        start, end = self.lengths[layer], self.lengths[layer] + k.shape[2]
        if end > self.keys[layer].shape[2]:  # full: a buffer twice as large, the filled part copied
            capacity = max(2 * end, 16)
            for buffers, new in ((self.keys, k), (self.values, v)):
                grown = new.new_empty(new.shape[0], new.shape[1], capacity, new.shape[3])
                grown[:, :, :start] = buffers[layer][:, :, :start]
                buffers[layer] = grown
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        self.lengths[layer] = end
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep batch rows `rows`, in that order (beam search continues from the beams it chose)."""
        self.keys = [k.index_select(0, rows) for k in self.keys]
        self.values = [v.index_select(0, rows) for v in self.values]


def causal_mask(queries: int, start: int, window: int | None, device: torch.device) -> torch.Tensor:
    """Boolean (queries, start + queries) mask, True = may attend: causal, and within `window` if set."""
    q = torch.arange(start, start + queries, device=device)[:, None]
    k = torch.arange(start + queries, device=device)[None, :]
    allowed = k <= q
    if window is not None:
        allowed &= k > q - window
    return allowed


class Attention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int) -> None:
        super().__init__()
        self.config, self.layer = config, layer
        d, hd = config.n_embd, config.head_dim
        self.q_proj = nn.Linear(d, config.n_head * hd, bias=config.bias)
        self.k_proj = nn.Linear(d, config.kv_heads * hd, bias=config.bias)
        self.v_proj = nn.Linear(d, config.kv_heads * hd, bias=config.bias)
        self.o_proj = nn.Linear(config.n_head * hd, d, bias=config.bias)
        if config.qk_norm:  # per-head RMSNorm of q and k (Qwen3's q_norm/k_norm): bounded logits
            self.q_norm = nn.RMSNorm(hd, eps=config.norm_eps)
            self.k_norm = nn.RMSNorm(hd, eps=config.norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | None,
        cache: KVCache | None = None,
        return_attention: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`mask`: True where a query may attend, (T, S) or (B, 1, T, S); None = plain causal attention."""
        cfg = self.config
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, cfg.n_head, cfg.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, length, cfg.kv_heads, cfg.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, cfg.kv_heads, cfg.head_dim).transpose(1, 2)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        start = k.shape[2] - length  # positions already cached before this call
        # Grouped-query attention: each k/v head serves n_head / kv_heads query heads (SDPA's enable_gqa
        # reads them in place; the slow path repeats them).
        gqa = cfg.kv_heads != cfg.n_head

        dropout = cfg.dropout if self.training else 0.0
        weights = None
        if return_attention:  # the slow path: materialise the weights to return them
            if mask is None:
                mask = causal_mask(length, start, None, x.device)
            if gqa:
                k = k.repeat_interleave(cfg.n_head // cfg.kv_heads, dim=1)
                v = v.repeat_interleave(cfg.n_head // cfg.kv_heads, dim=1)
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(cfg.head_dim)
            weights = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
            y = F.dropout(weights, dropout, self.training) @ v
        elif mask is None:  # causal from position 0, or one new token attending to everything cached
            y = F.scaled_dot_product_attention(
                q, k, v, dropout_p=dropout, is_causal=start == 0, enable_gqa=gqa
            )
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, enable_gqa=gqa)
        y = y.transpose(1, 2).reshape(batch, length, cfg.n_head * cfg.head_dim)
        return self.o_proj(y), weights


class MLP(nn.Module):
    """GELU (tanh approximation, as GPT-2): down(gelu(up(x))). SwiGLU (Llama): down(silu(gate(x))·up(x)).
    ReLU² (Primer, So et al. 2021; modded-nanogpt): down(relu(up(x))²), no gate."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.kind = config.mlp
        self.swiglu = config.mlp == "swiglu"
        self.up_proj = nn.Linear(config.n_embd, config.hidden, bias=config.bias)
        self.down_proj = nn.Linear(config.hidden, config.n_embd, bias=config.bias)
        if self.swiglu:
            self.gate_proj = nn.Linear(config.n_embd, config.hidden, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        if self.kind == "relu2":
            return self.down_proj(F.relu(self.up_proj(x)).square())
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer: int) -> None:
        super().__init__()
        self.attn_norm = make_norm(config)
        self.attn = Attention(config, layer)
        self.mlp_norm = make_norm(config)
        self.mlp = MLP(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | None,
        cache: KVCache | None = None,
        return_attention: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attended, weights = self.attn(self.attn_norm(x), rope, mask, cache, return_attention)
        x = x + self.dropout(attended)
        x = x + self.dropout(self.mlp(self.mlp_norm(x)))
        return x, weights


class GPT(nn.Module):
    pos_table: torch.Tensor  # sinusoidal: (block_size, n_embd), a buffer
    rope_cos: torch.Tensor  # rope: (block_size, head_dim / 2), buffers
    rope_sin: torch.Tensor

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        if config.pos_encoding == "learned":
            self.pos_emb = nn.Embedding(config.block_size, config.n_embd)
        elif config.pos_encoding == "sinusoidal":
            self.register_buffer("pos_table", sinusoidal_table(config), persistent=False)
        else:
            cos, sin = rope_tables(config, config.block_size)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, layer) for layer in range(config.n_layer))
        self.norm = make_norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.apply(self._init_weights)
        residual_std = 0.02 / math.sqrt(2 * config.n_layer)
        for name, parameter in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(parameter, mean=0.0, std=residual_std)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
        return_attention: bool = False,
        attention_mask: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor]]:
        """Logits (B, T, vocab), or (B, 1, vocab) for the last position only with `last_only` (what
        decoding needs: the head is the largest matmul of a small model's prefill); the mean cross-entropy
        over targets ≠ -100 when given; attention weights per layer (B, heads, T, start + T) when
        `return_attention`. `attention_mask` (B, start + T): 1 for tokens, 0 for left padding, covering the
        cached positions too."""
        start = cache.length if cache is not None else 0
        # Padding takes no position, so a padded row may be longer than the context (generation only).
        longest = start + idx.shape[1] if attention_mask is None else int(attention_mask.sum(-1).max())
        if longest > self.config.block_size:
            raise ValueError(f"sequence of {longest} tokens exceeds block_size {self.config.block_size}")
        positions, mask = self._positions_and_mask(idx, start, attention_mask)
        x = self.tok_emb(idx)
        if self.config.pos_encoding == "learned":
            x = x + self.pos_emb(positions)
        elif self.config.pos_encoding == "sinusoidal":
            x = x + self.pos_table[positions].to(x.dtype)
        rope = None
        if self.config.pos_encoding == "rope":
            rope = (self.rope_cos[positions][:, None], self.rope_sin[positions][:, None])
        x = self.dropout(x)
        attention: list[torch.Tensor] = []
        for block in self.blocks:
            x, weights = block(x, rope, mask, cache, return_attention)
            if weights is not None:
                attention.append(weights)
        if last_only and targets is None:
            x = x[:, -1:]
        logits = self.lm_head(self.norm(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.reshape(-1), ignore_index=-100)
        return logits, loss, attention

    def _positions_and_mask(
        self, idx: torch.Tensor, start: int, attention_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Positions (1 or B, T) of the new tokens, and the attention mask (None: plain causal)."""
        length, device = idx.shape[1], idx.device
        window = self.config.sliding_window
        window = window if window and window < start + length else None
        if attention_mask is None:
            positions = torch.arange(start, start + length, device=device)[None]
            needs_mask = window is not None or (start > 0 and length > 1)
            return positions, causal_mask(length, start, window, device) if needs_mask else None
        real = attention_mask.to(device=device, dtype=torch.bool)
        positions = (real.long().cumsum(-1) - 1).clamp(min=0)[:, start : start + length]
        mask = causal_mask(length, start, window, device) & real[:, None, None, :]
        # A padding query sees only padding; letting it see itself keeps its (unused) row finite.
        return positions, mask | causal_mask(length, start, 1, device)

    def num_params(self) -> int:
        """Parameters counted once (a tied head is the embedding); equals model.flops.count_params().total."""
        return sum(p.numel() for p in self.parameters())
