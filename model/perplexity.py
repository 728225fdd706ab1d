"""Perplexity of a token stream longer than the context, with strided sliding windows.

    scored = strided_nll(model, tokens, stride=128)        # per target token: index and NLL (nats)
    perplexity = exp(scored.nll.mean());  bits_per_byte = scored.nll.sum() / ln 2 / token_bytes[...].sum()

The stream is cut into windows of the model's context that start `stride` tokens apart (the Hugging Face
perplexity recipe). Every token after the first is scored exactly once, by the first window that
reaches it, with the window's earlier tokens as context: a smaller stride gives each token more
context (and costs more forward passes). stride = context gives disjoint chunks, where the first token
of each chunk is not scored (it has no context inside its chunk).

Bits per byte divides the summed loss (in bits) by the UTF-8 bytes of the scored tokens, so tokenizers
with different vocabularies are compared on one scale; special tokens count 0 bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from model.checkpoint import TrainedModel


@dataclass
class Scored:
    index: np.ndarray  # positions in the stream of the scored tokens (ascending)
    nll: np.ndarray  # their negative log-likelihood in nats (float64)

    @property
    def mean(self) -> float:
        return float(self.nll.mean())

    def bits_per_byte(self, token_bytes: np.ndarray, tokens: np.ndarray) -> float:
        """Summed NLL in bits over the UTF-8 bytes of the scored tokens (`token_bytes[id]`)."""
        return float(self.nll.sum() / np.log(2) / token_bytes[tokens[self.index]].sum())


def windows(length: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored target) for each window over a stream of `length` tokens."""
    if not 1 <= stride <= context:
        raise ValueError(f"stride must be in [1, context={context}], got {stride}")
    spans, scored_to = [], 1  # target 0 has no context: never scored
    for begin in range(0, max(length - 1, 1), stride):
        end = min(begin + context, length)
        first = max(scored_to, begin + 1)
        if first < end:
            spans.append((begin, end, first))
            scored_to = end
        if end == length:
            break
    return spans


#: Logit values one scoring batch may hold (2^26 floats = 256 MB): windows × width × vocabulary.
MAX_BATCH_LOGITS = 1 << 26


@torch.no_grad()
def strided_nll(
    model: TrainedModel,
    tokens: np.ndarray,
    stride: int | None = None,
    context: int | None = None,
    batch_size: int = 8,
) -> Scored:
    """NLL of every scored token of `tokens` (1-D ids); windows of `context` tokens (at most, and by
    default, the model's), `stride` apart (default: half the window). Batches hold at most `batch_size`
    windows and MAX_BATCH_LOGITS logits (a 49k vocabulary over a 1k window is 200 MB)."""
    context = min(context or model.config.block_size, model.config.block_size)
    batch_size = max(1, min(batch_size, MAX_BATCH_LOGITS // (context * model.config.vocab_size)))
    spans = windows(len(tokens), context, stride or max(1, context // 2))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    index, nll = [], []
    try:
        for start in range(0, len(spans), batch_size):
            group = spans[start : start + batch_size]
            width = max(end - begin for begin, end, _ in group)
            x = torch.zeros((len(group), width), dtype=torch.long)
            y = torch.full((len(group), width), -100, dtype=torch.long)
            for row, (begin, end, first) in enumerate(group):
                x[row, : end - begin] = torch.from_numpy(tokens[begin:end].astype(np.int64))
                y[row, first - begin - 1 : end - begin - 1] = torch.from_numpy(
                    tokens[first:end].astype(np.int64)
                )
                index.append(np.arange(first, end))
            logits = model(x.to(device))[0].float()
            losses = F.cross_entropy(
                logits.flatten(0, 1), y.to(device).flatten(), reduction="none", ignore_index=-100
            )
            kept = y.flatten() != -100
            nll.append(losses[kept.to(device)].double().cpu().numpy())
    finally:
        model.train(was_training)
    return Scored(np.concatenate(index), np.concatenate(nll))
