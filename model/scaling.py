"""Scaling laws: how to split a FLOPs budget C between parameters N and tokens D, and what loss to expect.

- Chinchilla (Hoffmann et al. 2022), Approach 1: N and D grow as C^0.5, with C = 6·N·D. Its Table 3
  projects the optimum for model sizes from 400M to 10T parameters; the tokens-per-parameter ratio there
  drifts from 20.0 to 21.6. `chinchilla_optimal` follows that table (a power law in C fitted to its rows,
  which it reproduces within 0.3%), and the rule of thumb of 20 tokens per parameter below it.
- Kaplan et al. 2020, for contrast: N_opt = 1.3e9 · C^0.73 (C in PF-days, N without embeddings): bigger
  models on fewer tokens, the allocation GPT-3 was trained with.
- The Chinchilla parametric fit (Approach 3), L(N, D) = E + A/N^α + B/D^β, estimates the final loss. It
  is in nats per token of MassiveText with the paper's tokenizer, so read it as a trend, not a promise.
- `choose_shape` turns a FLOPs budget into a buildable GPTConfig by one depth dial and a tokens-per-
  parameter ratio.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

from model.config import GPTConfig
from model.flops import count_params, train_flops_per_token

PF_DAY = 1e15 * 86400  # FLOPs in one petaFLOP/s-day

#: Hoffmann et al. 2022, Table 3: (parameters, FLOPs, tokens) of the Approach 1 optimum per model size.
CHINCHILLA_TABLE3: tuple[tuple[float, float, float], ...] = (
    (400e6, 1.92e19, 8.0e9),
    (1e9, 1.21e20, 20.2e9),
    (10e9, 1.23e22, 205.1e9),
    (67e9, 5.76e23, 1.5e12),  # tokens rounded to 2 digits: 6·N·D is 4.7% off the FLOPs column
    (175e9, 3.85e24, 3.7e12),
    (280e9, 9.90e24, 5.9e12),
    (520e9, 3.43e25, 11.0e12),
    (1e12, 1.27e26, 21.2e12),
    (10e12, 1.30e28, 216.2e12),
)


def _fit_tokens_per_param() -> tuple[float, float]:
    """Least squares of log(D/N) on log(C) over Table 3 (the rounded 67B row left out): (log k, e)."""
    rows = [row for row in CHINCHILLA_TABLE3 if row[0] != 67e9]
    xs = [math.log(flops) for _, flops, _ in rows]
    ys = [math.log(tokens / params) for params, _, tokens in rows]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mean_x) ** 2 for x in xs
    )
    return mean_y - slope * mean_x, slope


_LOG_K, _EXPONENT = _fit_tokens_per_param()
MIN_TOKENS_PER_PARAM = 20.0


def tokens_per_param(flops: float) -> float:
    """Chinchilla-optimal D/N at budget C: 20 below Table 3's range, its trend (to ~21.6) across it."""
    return max(MIN_TOKENS_PER_PARAM, math.exp(_LOG_K + _EXPONENT * math.log(flops)))


class Allocation(NamedTuple):
    params: float  # N
    tokens: float  # D


def chinchilla_optimal(flops: float) -> Allocation:
    """Approach 1: N and D with C = 6·N·D and D/N = tokens_per_param(C)."""
    if flops <= 0:
        raise ValueError(f"the FLOPs budget must be > 0, got {flops}")
    ratio = tokens_per_param(flops)
    params = math.sqrt(flops / (6 * ratio))
    return Allocation(params, ratio * params)


def kaplan_optimal(flops: float) -> Allocation:
    """Kaplan et al. 2020 (Fig. 14): N = 1.3e9 · (C / PF-day)^0.73 non-embedding parameters, D = C / 6N."""
    if flops <= 0:
        raise ValueError(f"the FLOPs budget must be > 0, got {flops}")
    params = 1.3e9 * (flops / PF_DAY) ** 0.73
    return Allocation(params, flops / (6 * params))


#: Chinchilla's parametric loss fit (Approach 3): E, A, B, alpha, beta.
LOSS_FIT = (1.69, 406.4, 410.7, 0.34, 0.28)
#: The model sizes it was fitted on (Hoffmann et al. 2022 trained 70M to 16B parameters).
LOSS_FIT_PARAMS = (70e6, 16e9)


def chinchilla_loss(params: float, tokens: float) -> float:
    """L(N, D) = E + A/N^α + B/D^β in nats per token (MassiveText; a trend for other corpora)."""
    e, a, b, alpha, beta = LOSS_FIT
    return e + a / params**alpha + b / tokens**beta


def isoflops_curve(flops: float, params: list[float]) -> list[float]:
    """Predicted loss of each model size when the whole budget is spent on it (D = C / 6N)."""
    return [chinchilla_loss(n, flops / (6 * n)) for n in params]


def choose_shape(
    flops: float,
    template: GPTConfig,
    tokens_per_param: float = MIN_TOKENS_PER_PARAM,
    aspect_ratio: int = 64,
    head_dim: int = 64,
    heads_per_kv_head: int = 1,
    max_layers: int = 256,
) -> GPTConfig:
    """The depth whose model, trained on `tokens_per_param` tokens per non-embedding parameter, spends
    `flops` (nearest on a log scale), with width = aspect_ratio · layers (nanochat's one depth dial).

    The parameters counted are Kaplan's N, without the embeddings: a lookup costs no FLOPs, and at small
    scale the vocabulary holds most of the total (91% of a 1 × 64 model at 8,192 tokens), so sizing by the
    total picks the smallest model whatever the budget. The FLOPs per token count everything the model
    multiplies a token by, the output head and attention included (model/flops.py).
    Width is rounded up to a multiple of `head_dim` (so heads = width / head_dim), and key/value heads
    are heads / heads_per_kv_head (rounded down to a divisor). Everything else comes from `template`
    (vocabulary, context, positional encoding, norm, MLP, bias, tying)."""
    best: tuple[float, GPTConfig] | None = None
    for layers in range(1, max_layers + 1):
        width = head_dim * max(1, math.ceil(aspect_ratio * layers / head_dim))
        heads = width // head_dim
        kv_heads = max(1, heads // heads_per_kv_head)
        while heads % kv_heads:
            kv_heads -= 1
        config = dataclasses.replace(
            template,
            n_layer=layers,
            n_embd=width,
            n_head=heads,
            n_kv_head=None if kv_heads == heads else kv_heads,
            mlp_hidden=None,
        )
        spent = tokens_per_param * count_params(config).non_embedding * train_flops_per_token(config)
        distance = abs(math.log(spent / flops))
        if best is None or distance < best[0]:
            best = (distance, config)
        elif spent > flops:
            break  # the cost only grows with depth from here
    assert best is not None
    return best[1]
