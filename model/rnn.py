"""A GRU language model: the recurrent baseline the transformer is measured against (the course's step
from n-grams to neural models, before attention).

    token ids ─► embedding ─► n_layer × GRU ─► RMSNorm ─► head (tied to the embedding) ─► logits

It trains in model/train.py's loop like the GPT (same batches, schedule, checkpoints): `forward` has the
GPT's signature and `config.block_size` is the training and scoring window. Each window starts from a
zero hidden state, as each GPT window starts with no context, so the two are scored alike.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_model, save_model
from torch import nn


@dataclass(frozen=True)
class GRUConfig:
    vocab_size: int
    n_embd: int  # embedding and hidden width
    n_layer: int
    block_size: int  # tokens per training and scoring window

    def __post_init__(self) -> None:
        for key in ("vocab_size", "n_embd", "n_layer", "block_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"GRUConfig.{key} must be ≥ 1, got {getattr(self, key)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def train_flops_per_token(self, context: int | None = None) -> int:
        """Forward + backward = 3 × forward; forward per token and layer: the three gates' input and
        recurrent matmuls (2 · 3 · (d·d + d·d)), plus the head (2 · d · vocab)."""
        d = self.n_embd
        return 3 * (self.n_layer * 12 * d * d + 2 * d * self.vocab_size)


class GRULM(nn.Module):
    def __init__(self, config: GRUConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.gru = nn.GRU(config.n_embd, config.n_embd, config.n_layer, batch_first=True)
        self.norm = nn.RMSNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight
        nn.init.normal_(self.tok_emb.weight, mean=0.0, std=0.02)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, **_: Any
    ) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor]]:
        """Logits (B, T, vocab) and the mean cross-entropy over targets ≠ -100, like GPT.forward."""
        hidden, _ = self.gru(self.tok_emb(idx))  # (B, T, n_embd)
        logits = self.lm_head(self.norm(hidden))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.reshape(-1), ignore_index=-100)
        return logits, loss, []

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def save_gru(model: GRULM, directory: Path) -> None:
    """config.json + model.safetensors (the tied head stored once)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(
        json.dumps(model.config.to_dict(), indent=2) + "\n", encoding="utf-8"
    )
    save_model(model, str(directory / "model.safetensors"))


def load_gru(directory: Path) -> GRULM:
    """The GRU that `save_gru` wrote, in eval mode."""
    config = GRUConfig(**json.loads((directory / "config.json").read_text(encoding="utf-8")))
    model = GRULM(config)
    load_model(model, str(directory / "model.safetensors"))
    return model.eval()
