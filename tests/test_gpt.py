"""model/gpt.py: parameter counts, causality, attention weights, KV cache, and that it learns."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from model.config import GPTConfig
from model.flops import count_params
from model.gpt import GPT, KVCache

BASE = GPTConfig(vocab_size=97, n_layer=2, n_head=4, n_embd=32, block_size=24)
VARIANTS = {
    "rope-rmsnorm-swiglu": BASE,
    "learned-layernorm-gelu-bias": dataclasses.replace(
        BASE, pos_encoding="learned", norm="layernorm", mlp="gelu", bias=True, tie_embeddings=False
    ),
    "sinusoidal": dataclasses.replace(BASE, pos_encoding="sinusoidal", mlp="gelu"),
    "gqa": dataclasses.replace(BASE, n_kv_head=2),
    "sliding-window": dataclasses.replace(BASE, sliding_window=5),
}


def build(config: GPTConfig, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(config).eval()


@pytest.mark.parametrize("name", VARIANTS)
def test_parameter_count_equals_the_planner(name: str) -> None:
    config = VARIANTS[name]
    assert build(config).num_params() == count_params(config).total


@pytest.mark.parametrize("name", VARIANTS)
def test_causal_outputs_ignore_future_tokens(name: str) -> None:
    model = build(VARIANTS[name])
    idx = torch.randint(0, 97, (2, 20))
    changed = idx.clone()
    changed[:, 12:] = torch.randint(0, 97, (2, 8))
    with torch.no_grad():
        before, _, _ = model(idx)
        after, _, _ = model(changed)
    torch.testing.assert_close(before[:, :12], after[:, :12], rtol=0, atol=1e-6)
    assert not torch.allclose(before[:, 12:], after[:, 12:])


@pytest.mark.parametrize("name", ["rope-rmsnorm-swiglu", "sliding-window"])
def test_attention_weights_are_causal_and_match_the_fast_path(name: str) -> None:
    config = VARIANTS[name]
    model = build(config)
    idx = torch.randint(0, 97, (1, 16))
    with torch.no_grad():
        fast, _, none = model(idx)
        slow, _, weights = model(idx, return_attention=True)
    assert none == [] and len(weights) == config.n_layer
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    for layer in weights:
        assert layer.shape == (1, config.n_head, 16, 16)
        assert torch.all(torch.triu(layer, diagonal=1) == 0)
        torch.testing.assert_close(layer.sum(-1), torch.ones(1, config.n_head, 16))
        if config.sliding_window:
            assert torch.all(torch.tril(layer, diagonal=-config.sliding_window) == 0)


@pytest.mark.parametrize("name", VARIANTS)
def test_kv_cache_logits_equal_full_recompute(name: str) -> None:
    model = build(VARIANTS[name])
    idx = torch.randint(0, 97, (2, 18))
    with torch.no_grad():
        full, _, _ = model(idx)
        cache = KVCache()
        pieces = [model(idx[:, :7], cache=cache)[0]]  # prefill, then a chunk, then one token at a time
        pieces.append(model(idx[:, 7:10], cache=cache)[0])
        pieces += [model(idx[:, t : t + 1], cache=cache)[0] for t in range(10, 18)]
    assert cache.length == 18
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", VARIANTS)
def test_left_padding_changes_nothing_for_the_real_tokens(name: str) -> None:
    """A left-padded row (masked, positions counted from its first token) computes what it does alone,
    in one pass and through the KV cache."""
    model = build(VARIANTS[name])
    idx = torch.randint(1, 97, (1, 14))
    padded = torch.cat([torch.zeros(1, 6, dtype=torch.long), idx], dim=1)
    mask = torch.cat([torch.zeros(1, 6), torch.ones(1, 14)], dim=1).long()
    with torch.no_grad():
        alone = model(idx)[0]
        together = model(padded, attention_mask=mask)[0][:, 6:]
        cache = KVCache()
        model(padded[:, :10], cache=cache, attention_mask=mask[:, :10])
        cached = [
            model(padded[:, t : t + 1], cache=cache, attention_mask=mask[:, : t + 1])[0]
            for t in range(10, 20)
        ]
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat(cached, dim=1), alone[:, 4:], rtol=1e-5, atol=1e-5)


def test_block_size_is_enforced() -> None:
    model = build(BASE)
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 25, dtype=torch.long))


@pytest.mark.slow  # trains three models to convergence on one batch
@pytest.mark.parametrize("name", ["rope-rmsnorm-swiglu", "learned-layernorm-gelu-bias", "sinusoidal"])
def test_initial_loss_is_uniform_and_a_single_batch_overfits(name: str) -> None:
    config = dataclasses.replace(VARIANTS[name], vocab_size=512)
    model = build(config).train()
    idx = torch.randint(0, 512, (4, 24))
    _, loss, _ = model(idx[:, :-1], idx[:, 1:])
    assert loss is not None and abs(loss.item() - math.log(512)) < 0.1
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        _, loss, _ = model(idx[:, :-1], idx[:, 1:])
        assert loss is not None
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1


def test_ignore_index_masks_targets() -> None:
    model = build(BASE)
    idx = torch.randint(0, 97, (2, 10))
    targets = idx.clone()
    targets[:, :5] = -100
    logits, loss, _ = model(idx, targets)
    expected = torch.nn.functional.cross_entropy(logits[:, 5:].reshape(-1, 97), idx[:, 5:].reshape(-1))
    assert loss is not None
    torch.testing.assert_close(loss, expected)
