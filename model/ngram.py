"""Count-based n-gram language models with add-k smoothing: the baselines a neural model must beat.

    trigram = NgramModel(train_tokens, n=3, vocab_size=8192, k=0.01, boundary=eos_id)
    log_p = trigram.log_prob(val_tokens, index)     # ln P(token[j] | the n-1 tokens before it), j in index

P(w | h) = (count(h, w) + k) / (count(h) + k·V): every token of the vocabulary gets some probability,
so the distribution over the next token sums to 1 and unseen text has a finite loss. The stream is
preceded by n-1 `boundary` tokens (the end-of-document id), so its first tokens have a context too.
Counts are numpy `unique` over n-gram keys packed into int64: a few seconds for millions of tokens.
"""

from __future__ import annotations

import numpy as np


def _keys(padded: np.ndarray, order: int, positions: np.ndarray, vocab_size: int) -> np.ndarray:
    """The int64 key of the `order` tokens ending just before each position of `padded`."""
    key = np.zeros(len(positions), np.int64)
    for offset in range(order, 0, -1):
        key = key * vocab_size + padded[positions - offset]
    return key


def _lookup(keys: np.ndarray, counts: np.ndarray, query: np.ndarray) -> np.ndarray:
    found = np.searchsorted(keys, query)
    clipped = np.minimum(found, len(keys) - 1)
    return np.where((found < len(keys)) & (keys[clipped] == query), counts[clipped], 0)


class NgramModel:
    def __init__(
        self, tokens: np.ndarray, n: int, vocab_size: int, k: float = 0.01, boundary: int = 0
    ) -> None:
        if n < 1 or k <= 0:
            raise ValueError(f"need n ≥ 1 and k > 0, got n={n}, k={k}")
        if vocab_size**n >= 2**62:
            raise ValueError(f"a {n}-gram over {vocab_size} tokens does not fit an int64 key")
        self.n, self.vocab_size, self.k, self.boundary = n, vocab_size, k, boundary
        padded = self._pad(tokens)
        positions = np.arange(n - 1, len(padded))
        history = _keys(padded, n - 1, positions, vocab_size)
        self.history_keys, self.history_counts = np.unique(history, return_counts=True)
        self.gram_keys, self.gram_counts = np.unique(
            history * vocab_size + padded[positions], return_counts=True
        )

    def _pad(self, tokens: np.ndarray) -> np.ndarray:
        return np.concatenate([np.full(self.n - 1, self.boundary, np.int64), np.asarray(tokens, np.int64)])

    def log_prob(self, tokens: np.ndarray, index: np.ndarray) -> np.ndarray:
        """ln P(tokens[j] | tokens[j-n+1 .. j-1]) for every j in `index` (float64)."""
        padded = self._pad(tokens)
        positions = np.asarray(index, np.int64) + self.n - 1
        history = _keys(padded, self.n - 1, positions, self.vocab_size)
        gram = _lookup(self.gram_keys, self.gram_counts, history * self.vocab_size + padded[positions])
        seen = _lookup(self.history_keys, self.history_counts, history)
        return np.log((gram + self.k) / (seen + self.k * self.vocab_size))

    def distribution(self, history: list[int]) -> np.ndarray:
        """P(w | history) for every w in the vocabulary (`history`: the n-1 previous ids)."""
        key = 0
        for token in history[len(history) - (self.n - 1) :] if self.n > 1 else []:
            key = key * self.vocab_size + token
        grams = key * self.vocab_size + np.arange(self.vocab_size, dtype=np.int64)
        counts = _lookup(self.gram_keys, self.gram_counts, grams)
        seen = _lookup(self.history_keys, self.history_counts, np.array([key]))[0]
        return (counts + self.k) / (seen + self.k * self.vocab_size)
