"""GPTConfig: every architectural choice of llmpipe's GPT in one dataclass.

It lives apart from the model code so that the planner (model/flops.py, model/scaling.py) and the CLI can
count parameters and FLOPs without importing torch. `GPTConfig.from_dict(config.to_dict())` round-trips,
which is how plan.json and checkpoints store it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from dataclasses import dataclass
from typing import Any, Literal

# The allowed values of each choice, spelled only here (`typing.get_args` gives them as a tuple).
PositionalEncoding = Literal["rope", "learned", "sinusoidal"]
Norm = Literal["layernorm", "rmsnorm"]
MLPKind = Literal["gelu", "swiglu", "relu2"]


def swiglu_hidden(n_embd: int, multiple_of: int = 64) -> int:
    """Llama's SwiGLU width: 2/3 of 4·d (same parameter count as a 4·d GELU MLP), rounded up."""
    return multiple_of * math.ceil(8 * n_embd / 3 / multiple_of)


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int
    n_layer: int
    n_head: int
    n_embd: int
    block_size: int  # context length in tokens
    n_kv_head: int | None = None  # key/value heads; None = n_head (multi-head), fewer = grouped-query
    mlp_hidden: int | None = None  # None: 4·n_embd for gelu, swiglu_hidden(n_embd) for swiglu
    pos_encoding: PositionalEncoding = "rope"
    norm: Norm = "rmsnorm"
    mlp: MLPKind = "swiglu"
    bias: bool = False  # biases in linear layers and LayerNorm
    tie_embeddings: bool = True  # the output head reuses the token embedding matrix
    qk_norm: bool = False  # RMS-normalise each head's queries and keys before attention (OLMo 2, Qwen3)
    dropout: float = 0.0
    sliding_window: int | None = None  # attend to at most this many previous tokens (None: all)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        def fail(key: str, message: str) -> None:
            raise ValueError(f"GPTConfig.{key} {message}")

        for key in ("vocab_size", "n_layer", "n_head", "n_embd", "block_size"):
            if getattr(self, key) < 1:
                fail(key, f"must be ≥ 1, got {getattr(self, key)}")
        if self.n_embd % self.n_head:
            fail("n_embd", f"({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.pos_encoding in ("rope", "sinusoidal") and self.head_dim % 2:
            fail(
                "n_head",
                f"gives an odd head dimension {self.head_dim}; {self.pos_encoding} needs an even one",
            )
        if self.n_kv_head is not None and (self.n_kv_head < 1 or self.n_head % self.n_kv_head):
            fail("n_kv_head", f"({self.n_kv_head}) must divide n_head ({self.n_head})")
        if self.mlp_hidden is not None and self.mlp_hidden < 1:
            fail("mlp_hidden", f"must be ≥ 1, got {self.mlp_hidden}")
        for key, allowed in _choices().items():
            if getattr(self, key) not in allowed:
                fail(key, f"must be one of {', '.join(allowed)}; got {getattr(self, key)!r}")
        if not 0.0 <= self.dropout < 1.0:
            fail("dropout", f"must be in [0, 1), got {self.dropout}")
        if self.sliding_window is not None and self.sliding_window < 1:
            fail("sliding_window", f"must be ≥ 1 or null, got {self.sliding_window}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def hidden(self) -> int:
        """Width of the MLP's inner layer: 4·n_embd, or Llama's 2/3 of that for the gated SwiGLU."""
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        return swiglu_hidden(self.n_embd) if self.mlp == "swiglu" else 4 * self.n_embd

    @property
    def attention_span(self) -> int:
        """How many positions one query attends to at most."""
        return min(self.block_size, self.sliding_window or self.block_size)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def train_flops_per_token(self, context: int | None = None) -> int:
        """Training FLOPs per token over `context` positions (model/flops.py: 6N + attention)."""
        from model.flops import train_flops_per_token  # model/flops.py imports this module

        return train_flops_per_token(self, context=context)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> GPTConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"GPTConfig: unknown field(s) {', '.join(unknown)}")
        return cls(**values)


@functools.cache
def _choices() -> dict[str, tuple[Any, ...]]:
    """The allowed values of each GPTConfig field typed as a Literal, read from the type hints."""
    hints = typing.get_type_hints(GPTConfig)
    return {name: typing.get_args(hint) for name, hint in hints.items() if typing.get_origin(hint) is Literal}
