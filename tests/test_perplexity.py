"""model/perplexity.py and model/ngram.py: strided perplexity, bits per byte, add-k n-gram baselines."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model.config import GPTConfig
from model.data import TokenShards
from model.gpt import GPT
from model.ngram import NgramModel
from model.perplexity import strided_nll, windows
from model.train import TrainConfig, train

CONTEXT = 32


def test_every_token_after_the_first_is_scored_once() -> None:
    for length, stride in ((100, 32), (100, 7), (33, 32), (5, 1), (64, 16)):
        targets = [j for _, end, first in windows(length, CONTEXT, stride) for j in range(first, end)]
        if stride == CONTEXT:  # disjoint chunks: each chunk's first token has no context
            assert targets == [j for j in range(1, length) if j % CONTEXT]
        else:
            assert targets == list(range(1, length))
        assert all(end - begin <= CONTEXT for begin, end, _ in windows(length, CONTEXT, stride))
    with pytest.raises(ValueError, match="stride"):
        windows(100, CONTEXT, CONTEXT + 1)


@pytest.fixture(scope="module")
def memorised(tmp_path_factory: pytest.TempPathFactory) -> tuple[GPT, np.ndarray]:
    """A model trained until it has memorised a random 200-token passage over 8 symbols (repeated):
    the next token is predictable from the long context, rarely from the last two tokens."""
    rng = np.random.default_rng(0)
    passage = rng.integers(0, 8, 200)
    stream = np.tile(passage, 50).astype(np.uint16)
    directory = tmp_path_factory.mktemp("tokens")
    np.save(directory / "train-00000.npy", stream)
    np.save(directory / "val-00000.npy", stream[:600])
    splits = {
        s: {"tokens": n, "docs": 1, "bytes": n, "shards": [f"{s}-00000.npy"]}
        for s, n in (("train", len(stream)), ("val", 600))
    }
    (directory / "meta.json").write_text(
        json.dumps({"format": 1, "dtype": "uint16", "vocab_size": 9, "eos_id": 8, "splits": splits})
    )
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=9, n_layer=2, n_head=2, n_embd=64, block_size=CONTEXT))
    cfg = TrainConfig(
        steps=300,
        batch_size=16,
        lr=1e-2,
        warmup_steps=10,
        eval_every=300,
        eval_batches=1,
        checkpoint_every=300,
    )
    train(model, TokenShards(directory, "train"), None, cfg, Path(directory) / "ck", "fp", progress=False)
    return model.eval(), stream[:600].astype(np.int64)


def test_stride_equal_to_the_context_is_disjoint_chunk_perplexity(memorised) -> None:
    model, tokens = memorised
    scored = strided_nll(model, tokens, stride=CONTEXT)
    losses = []
    with torch.no_grad():
        for begin in range(0, len(tokens), CONTEXT):
            chunk = torch.from_numpy(tokens[begin : begin + CONTEXT])[None]
            if chunk.shape[1] > 1:
                logits = model(chunk[:, :-1])[0]
                losses += F.cross_entropy(logits[0], chunk[0, 1:], reduction="none").tolist()
    assert scored.mean == pytest.approx(float(np.mean(losses)), rel=1e-6)
    assert len(scored.nll) == len(losses)


def test_a_smaller_stride_never_raises_perplexity(memorised) -> None:
    model, tokens = memorised
    means = [strided_nll(model, tokens, stride=s).mean for s in (CONTEXT, 16, 8, 1)]
    assert means[1] < means[0] / 5  # the chunk starts, badly predicted without context, now have some
    # Once the text is memorised, more context cannot help further: equal up to a 1e-3 nats tolerance.
    assert all(later <= earlier + 1e-3 for earlier, later in itertools.pairwise(means))


def test_bits_per_byte_is_log2_of_byte_perplexity(memorised) -> None:
    model, tokens = memorised
    scored = strided_nll(model, tokens, stride=16)
    token_bytes = np.array([1, 2, 1, 3, 1, 1, 2, 4, 0])  # any byte lengths; the eos counts 0 bytes
    total_bytes = token_bytes[tokens[scored.index]].sum()
    byte_perplexity = math.exp(scored.nll.sum() / total_bytes)
    assert scored.bits_per_byte(token_bytes, tokens) == pytest.approx(math.log2(byte_perplexity))


@pytest.mark.parametrize("n", [1, 2, 3])
def test_add_k_distributions_sum_to_one_and_match_log_prob(n: int) -> None:
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 20, 500)
    model = NgramModel(tokens, n=n, vocab_size=20, k=0.5, boundary=19)
    for history in ([3, 4], [19, 19], [0, 0]):  # seen, the start padding, maybe unseen
        assert model.distribution(history).sum() == pytest.approx(1.0)
    index = np.arange(0, 50)
    expected = [
        math.log(
            model.distribution([*([19] * (n - 1)), *tokens[:j].tolist()][-(n - 1) :] if n > 1 else [])[
                tokens[j]
            ]
        )
        for j in index
    ]
    assert model.log_prob(tokens, index) == pytest.approx(expected)


def test_a_memorising_model_beats_the_ngram_baselines(memorised) -> None:
    model, tokens = memorised
    scored = strided_nll(model, tokens, stride=16)
    for n in (1, 2, 3):
        baseline = NgramModel(tokens, n=n, vocab_size=9, k=0.01, boundary=8)
        assert scored.mean < -baseline.log_prob(tokens, scored.index).mean()
