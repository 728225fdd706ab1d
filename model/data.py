"""Read the token shards of the `tokenize` stage (data/tokens/) for training: zero-copy, resumable.

    shards = TokenShards("data/tokens", "train")
    cursor = BatchCursor(seed=1337)
    x, y = shards.sample_batch(batch_size=32, context=256, cursor=cursor)   # int64 (B, T), y = x shifted
    cursor = cursor.advance()                                                # save cursor.step to resume

Each split is a list of flat `.npy` shards (uint16/uint32) opened with `np.load(mmap_mode="r")`, so
nothing is read until used and the OS page cache is shared between processes. Documents are separated
by `eos_id` (one after every document). Batches are random windows drawn from an RNG seeded with
(seed, step) only, so step N yields the same batch whether or not the run was interrupted before it —
nanoGPT's `get_batch`, made reproducible. Pure numpy: no torch, Prefect, MLflow or DVC here.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class BatchCursor:
    """Where a training run is in its batch stream: `(seed, step)` fully determines the next batch.
    `stream` gives independent draws for the same step (a mixture's choice, its second source)."""

    seed: int = 0
    step: int = 0
    stream: int = 0

    def advance(self, steps: int = 1) -> BatchCursor:
        return BatchCursor(self.seed, self.step + steps, self.stream)

    def fork(self, stream: int) -> BatchCursor:
        return BatchCursor(self.seed, self.step, stream)

    def rng(self) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.step, *([self.stream] if self.stream else [])])


class TokenShards:
    """One split ("train" or "val") of data/tokens/ as a single virtual array of tokens."""

    def __init__(self, directory: str | Path, split: str = "train") -> None:
        self.directory = Path(directory)
        meta_path = self.directory / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path}: no token shards (run the `tokenize` stage first)")
        self.meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if split not in self.meta["splits"]:
            raise KeyError(f"{meta_path}: no split {split!r} (have {sorted(self.meta['splits'])})")
        self.split = split
        self.info = self.meta["splits"][split]
        self.dtype = np.dtype(self.meta["dtype"])
        self.eos_id: int = self.meta["eos_id"]
        self.vocab_size: int = self.meta["vocab_size"]
        self.shards = [np.load(self.directory / name, mmap_mode="r") for name in self.info["shards"]]
        #: offsets[i] = index of shard i's first token in the split; offsets[-1] = total tokens.
        self.offsets = np.cumsum([0, *(len(shard) for shard in self.shards)], dtype=np.int64)
        if int(self.offsets[-1]) != self.info["tokens"]:
            raise ValueError(
                f"{meta_path}: split {split!r} should hold {self.info['tokens']} tokens, shards hold "
                f"{int(self.offsets[-1])} (stale or partial data/tokens/?)"
            )

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def num_docs(self) -> int:
        return int(self.info["docs"])

    def tokens(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) as a new array in the stored dtype, across shard boundaries."""
        end = start + length
        if start < 0 or length < 0 or end > len(self):
            raise IndexError(f"tokens [{start}, {end}) outside [0, {len(self)}) of split {self.split!r}")
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        if first >= len(self.shards) or end <= self.offsets[first + 1]:  # common case: one shard
            if length == 0:
                return np.empty(0, self.dtype)
            base = int(self.offsets[first])
            return np.array(self.shards[first][start - base : end - base])
        out = np.empty(length, self.dtype)
        filled, shard = 0, first
        while filled < length:
            base = int(self.offsets[shard])
            lo = start + filled - base
            take = min(length - filled, len(self.shards[shard]) - lo)
            out[filled : filled + take] = self.shards[shard][lo : lo + take]
            filled += take
            shard += 1
        return out

    def iter_documents(self) -> Iterator[np.ndarray]:
        """Each document's tokens (without its trailing eos), in order; reads shard by shard."""
        carry = np.empty(0, self.dtype)
        for shard in self.shards:
            ends = np.flatnonzero(np.asarray(shard) == self.eos_id)
            begin = 0
            for end in ends.tolist():
                piece = np.asarray(shard[begin:end])
                yield np.concatenate([carry, piece]) if len(carry) else np.array(piece)
                carry = np.empty(0, self.dtype)
                begin = end + 1
            carry = np.concatenate([carry, shard[begin:]])
        if len(carry):  # cannot happen for stage output: every document ends with eos
            yield carry

    def sample_batch(
        self, batch_size: int, context: int, cursor: BatchCursor
    ) -> tuple[np.ndarray, np.ndarray]:
        """(x, y) int64 arrays of shape (batch_size, context): random windows, y = x shifted left by one.

        Window starts are uniform over the split (windows may span documents; the eos between them
        tells the model where one ends). Deterministic in (cursor.seed, cursor.step).
        """
        if len(self) < context + 1:
            raise ValueError(
                f"split {self.split!r} has {len(self)} tokens, fewer than context + 1 = {context + 1}"
            )
        starts = cursor.rng().integers(0, len(self) - context, size=batch_size)
        windows = np.stack([self.tokens(int(s), context + 1) for s in starts]).astype(np.int64)
        return windows[:, :-1], windows[:, 1:]


class MixedBatches:
    """Each row from `primary`, or with probability `weight` from `secondary` (e.g. domain text with some
    general text replayed to limit forgetting). Both must yield full-context rows."""

    def __init__(self, primary: TokenShards, secondary: TokenShards, weight: float) -> None:
        if not 0 <= weight <= 1:
            raise ValueError(f"mixing weight must be in [0, 1], got {weight}")
        self.primary, self.secondary, self.weight = primary, secondary, weight

    def sample_batch(
        self, batch_size: int, context: int, cursor: BatchCursor
    ) -> tuple[np.ndarray, np.ndarray]:
        from_secondary = int(cursor.fork(1).rng().binomial(batch_size, self.weight))
        parts = []
        if from_secondary < batch_size:
            parts.append(self.primary.sample_batch(batch_size - from_secondary, context, cursor))
        if from_secondary:
            parts.append(self.secondary.sample_batch(from_secondary, context, cursor.fork(2)))
        return np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts])


class ExampleBatches:
    """Supervised examples (token ids + a 0/1 mask of the tokens to learn), one per row, right-padded to
    the longest in the batch (at most `context`): y is the next token where the mask is 1, else -100, so
    prompt and padding contribute no loss. Rows are drawn with replacement, deterministic in the cursor."""

    def __init__(self, examples: list[tuple[np.ndarray, np.ndarray]], pad_id: int) -> None:
        if not examples:
            raise ValueError("no examples")
        self.examples, self.pad_id = examples, pad_id

    def __len__(self) -> int:
        return len(self.examples)

    def sample_batch(
        self, batch_size: int, context: int, cursor: BatchCursor
    ) -> tuple[np.ndarray, np.ndarray]:
        rows = [self.examples[i] for i in cursor.rng().integers(0, len(self.examples), size=batch_size)]
        width = min(context, max(len(ids) for ids, _ in rows) - 1)
        x = np.full((batch_size, width), self.pad_id, np.int64)
        y = np.full((batch_size, width), -100, np.int64)
        for row, (ids, mask) in enumerate(rows):
            ids, mask = ids[: width + 1], mask[: width + 1]
            x[row, : len(ids) - 1] = ids[:-1]
            y[row, : len(ids) - 1] = np.where(mask[1:] > 0, ids[1:], -100)
        return x, y
