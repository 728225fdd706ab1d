"""Stage `tokenize`: encode data/dedup/ with the trained tokenizer into flat token shards for pretraining.

1. Split by document, deterministically: a document goes to the validation split when
   `blake2b(f"{seed}:{id}")` read as a fraction of 2**64 is below `val_fraction`. The decision depends
   only on the seed and the document's id, never on shard layout or order. If that leaves the
   validation split empty although `val_fraction > 0` and there are at least 2 documents (tiny
   corpora), the document with the smallest hash goes to validation instead, so a trainer always has
   something to evaluate on. A cheap first pass over the `id` column finds that document.
2. Encode batch by batch with `Tokenizer.encode_batch_fast` (Rust, parallel on all cores, no offsets).
   Special-token spellings inside ordinary text (a document that *talks about* "<|eos|>") are encoded
   as plain text, never as the special id: the document-end token (`<|eos|>` for llmpipe's tokenizer,
   `<|endoftext|>` for GPT-2-style ones: model.tokens.SpecialTokens) appears in the output only where
   this stage puts it, after every document, so document boundaries are exactly its positions.
3. Write `data/tokens/{train,val}-00000.npy, ...`: flat 1-D arrays (uint16 when the vocabulary fits,
   else uint32) of at most `tokens_per_shard` tokens each, in input document order, plus `meta.json`.
   Memory stays bounded: one shard buffer per split plus one encoded batch. model/data.py reads them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

from model.tokens import TOKENIZER_FILE, load_tokenizer, special_tokens
from tasks.core.io import atomic_dir, file_md5, hash_fraction, iter_batches, write_json
from tasks.core.layout import DEDUP_DIR, TOKENIZER_DIR, TOKENS_DIR
from tasks.core.params import ParamsError, StageParams

SPLITS = ("train", "val")
META_FORMAT = 1


@dataclass
class TokenizeParams(StageParams):
    val_fraction: float = 0.05  # share of documents in the validation split (split by document)
    seed: int = 0  # split seed: which documents are validation
    batch_size: int = 1000  # documents per encode_batch_fast call (bounds memory; Rust parallelises within)
    tokens_per_shard: int = 1 << 26  # max tokens per .npy shard (bounds memory: one buffer per split)

    def validate(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise ParamsError(
                f"params.yaml: tokenize.val_fraction must be in [0, 1), got {self.val_fraction}"
            )
        for name in ("batch_size", "tokens_per_shard"):
            if getattr(self, name) < 1:
                raise ParamsError(f"params.yaml: tokenize.{name} must be ≥ 1, got {getattr(self, name)}")
        if self.seed < 0:
            raise ParamsError(f"params.yaml: tokenize.seed must be ≥ 0, got {self.seed}")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def load_with_eos(directory: Path) -> tuple[Tokenizer, int]:
    """The tokenizer, safe for ordinary text (model.tokens.load_tokenizer), and the id that ends a
    document."""
    tokenizer = load_tokenizer(directory)
    return tokenizer, special_tokens(directory, tokenizer).document_end


@dataclass
class TokenShardWriter:
    """Append token arrays; write `<split>-00000.npy`, ... each time `tokens_per_shard` are buffered."""

    directory: Path
    split: str
    dtype: np.dtype
    tokens_per_shard: int
    tokens: int = 0
    docs: int = 0
    bytes: int = 0
    shards: list[str] = field(default_factory=list)
    _fill: int = 0
    _buffer: np.ndarray | None = None

    def append(self, ids: np.ndarray, docs: int, nbytes: int) -> None:
        self.docs += docs
        self.bytes += nbytes
        self.tokens += len(ids)
        if self._buffer is None:
            self._buffer = np.empty(self.tokens_per_shard, self.dtype)
        while len(ids):
            take = min(len(ids), self.tokens_per_shard - self._fill)
            self._buffer[self._fill : self._fill + take] = ids[:take]
            self._fill += take
            ids = ids[take:]
            if self._fill == self.tokens_per_shard:
                self.flush()

    def flush(self) -> None:
        if self._buffer is None or not self._fill:
            return
        name = f"{self.split}-{len(self.shards):05d}.npy"
        np.save(self.directory / name, self._buffer[: self._fill], allow_pickle=False)
        self.shards.append(name)
        self._fill = 0

    def summary(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "docs": self.docs,
            "bytes": self.bytes,
            "bytes_per_token": round(self.bytes / self.tokens, 6) if self.tokens else 0.0,
            "shards": self.shards,
        }


def _plan_split(source_dir: Path, params: TokenizeParams) -> tuple[int, str | None]:
    """First pass over ids only: (number of documents, id forced into val when val would be empty)."""
    docs = val = 0
    smallest: tuple[float, str] | None = None
    for batch in iter_batches(source_dir, columns=["id"], batch_size=1 << 16):
        for doc_id in batch.column("id").to_pylist():
            fraction = hash_fraction(params.seed, doc_id)
            docs += 1
            val += fraction < params.val_fraction
            if smallest is None or (fraction, doc_id) < smallest:
                smallest = (fraction, doc_id)
    forced = smallest[1] if params.val_fraction > 0 and val == 0 and docs >= 2 and smallest else None
    return docs, forced


def run(params: TokenizeParams, root: Path) -> dict[str, int | float]:
    """Read data/dedup/ + models/tokenizer/tokenizer.json, write data/tokens/, return metrics."""
    started = time.perf_counter()
    root = Path(root)
    source_dir = root / DEDUP_DIR
    tokenizer_path = root / TOKENIZER_DIR / TOKENIZER_FILE
    tokenizer, eos_id = load_with_eos(root / TOKENIZER_DIR)
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    dtype = token_dtype(vocab_size)
    eos = np.array([eos_id], dtype)
    total, forced = _plan_split(source_dir, params)

    encode_seconds = 0.0
    with atomic_dir(root / TOKENS_DIR) as out_dir:
        writers = {
            split: TokenShardWriter(out_dir, split, dtype, params.tokens_per_shard) for split in SPLITS
        }
        progress = tqdm(total=total, unit="doc", desc="tokenize", mininterval=1.0)
        for batch in iter_batches(source_dir, columns=["id", "text"], batch_size=params.batch_size):
            ids, texts = batch.column("id").to_pylist(), batch.column("text").to_pylist()
            tick = time.perf_counter()
            encodings = tokenizer.encode_batch_fast(texts, add_special_tokens=False)  # no offsets: ~2x faster
            encode_seconds += time.perf_counter() - tick
            parts: dict[str, list[np.ndarray]] = {split: [] for split in SPLITS}
            nbytes = dict.fromkeys(SPLITS, 0)
            for doc_id, text, encoding in zip(ids, texts, encodings, strict=True):
                is_val = doc_id == forced or hash_fraction(params.seed, doc_id) < params.val_fraction
                split = "val" if is_val else "train"
                parts[split].append(np.asarray(encoding.ids, dtype))
                parts[split].append(eos)
                nbytes[split] += len(text.encode("utf-8"))
            for split in SPLITS:
                if parts[split]:
                    writers[split].append(np.concatenate(parts[split]), len(parts[split]) // 2, nbytes[split])
            progress.update(len(texts))
        progress.close()
        for writer in writers.values():
            writer.flush()
        if not writers["train"].docs:
            raise ValueError(
                f"{source_dir}: no training documents ({total} in all, val_fraction={params.val_fraction})"
            )
        splits = {split: writer.summary() for split, writer in writers.items()}
        write_json(
            out_dir / "meta.json",
            {
                "format": META_FORMAT,
                "dtype": dtype.name,
                "vocab_size": vocab_size,
                "eos_id": eos_id,
                "eos_token": tokenizer.id_to_token(eos_id),
                "tokenizer_md5": file_md5(tokenizer_path),
                "val_fraction": params.val_fraction,
                "seed": params.seed,
                "tokens_per_shard": params.tokens_per_shard,
                "splits": splits,
            },
        )

    total_bytes = sum(split["bytes"] for split in splits.values())
    return {
        "train_tokens": splits["train"]["tokens"],
        "val_tokens": splits["val"]["tokens"],
        "train_docs": splits["train"]["docs"],
        "val_docs": splits["val"]["docs"],
        "train_bytes_per_token": splits["train"]["bytes_per_token"],
        "val_bytes_per_token": splits["val"]["bytes_per_token"],
        "train_shards": len(splits["train"]["shards"]),
        "val_shards": len(splits["val"]["shards"]),
        "encode_mb_per_s": round(total_bytes / 1e6 / encode_seconds, 3) if encode_seconds else 0.0,
        "seconds": round(time.perf_counter() - started, 3),
    }


if __name__ == "__main__":  # pragma: no cover - `python -m tasks.tokenize [root]` for a quick manual run
    import sys

    print(run(TokenizeParams(), Path(sys.argv[1] if len(sys.argv) > 1 else ".")))
