"""Tokenizer training, encode throughput and shard read throughput on the bundled corpus.

    python benchmarks/tokenizer.py [--vocab 8192] [--chunk 20000]

1. Documents: Shakespeare plays (corpus/en/shakespeare/*.txt) cut into ~20k-character chunks at line
   breaks, plus KJV chapters (corpus/en/kjv/kjv_chapters.jsonl.gz).
2. Train a byte-level BPE (vocab 8192) in a fresh subprocess: wall time and peak RSS.
3. Encode throughput: `encode_batch_fast` in batches of 1000 documents (what the tokenize stage does, Rust
   threads on all cores) vs one `encode()` call per document, on the same documents; checks both give
   identical ids.
4. The tokenize stage end to end (tasks/tokenize.run) on those documents, then TokenShards read
   throughput: a full copy of the split out of the memmaps, and random (B, T) batches per second.
Ends with one PASS/FAIL line per target (exit status 1 if any fails).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from model.data import BatchCursor, TokenShards  # noqa: E402
from tasks.io import content_id  # noqa: E402
from tasks.parallel import available_cpus  # noqa: E402
from tasks.tokenize import EOS_TOKEN, TOKENIZER_FILE, TOKENS_DIR, TokenizeParams, run  # noqa: E402

SPECIALS = ["<|bos|>", EOS_TOKEN, "<|pad|>"]
console = Console(width=120)


def load_documents(chunk: int) -> list[str]:
    docs: list[str] = []
    for path in sorted((REPO / "corpus/en/shakespeare").glob("*.txt")):
        text = path.read_text(encoding="utf-8", errors="replace")
        start = 0
        while start < len(text):
            end = text.find("\n", start + chunk)
            end = len(text) if end < 0 else end + 1
            docs.append(text[start:end])
            start = end
    with gzip.open(REPO / "corpus/en/kjv/kjv_chapters.jsonl.gz", "rt", encoding="utf-8") as handle:
        docs.extend(json.loads(line)["text"] for line in handle if line.strip())
    return [doc for doc in docs if doc.strip()]


def train_in_subprocess(texts_path: Path, out: Path, vocab: int) -> dict[str, float]:
    """Train in a fresh interpreter so peak RSS is the training's own."""
    code = f"""
import json, resource, sys, time
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
texts = json.load(open({str(texts_path)!r}, encoding="utf-8"))
tok = Tokenizer(models.BPE())
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
trainer = trainers.BpeTrainer(vocab_size={vocab}, special_tokens={SPECIALS!r},
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
t = time.perf_counter()
tok.train_from_iterator(texts, trainer)
seconds = time.perf_counter() - t
tok.save({str(out)!r})
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({{"seconds": seconds, "peak_rss_mb": rss, "vocab": tok.get_vocab_size()}}))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--chunk", type=int, default=20_000, help="characters per Shakespeare chunk")
    parser.add_argument("--target-ratio", type=float, default=4.0, help="batched / loop encode speedup")
    args = parser.parse_args()

    docs = load_documents(args.chunk)
    total_mb = sum(len(d.encode("utf-8")) for d in docs) / 1e6
    cpus = available_cpus()
    console.print(f"[bold]{len(docs)} documents, {total_mb:.1f} MB, {cpus} CPUs[/bold]")

    results: list[tuple[str, bool, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        texts_path = root / "texts.json"
        texts_path.write_text(json.dumps(docs), encoding="utf-8")
        tokenizer_path = root / TOKENIZER_FILE
        tokenizer_path.parent.mkdir(parents=True)
        trained = train_in_subprocess(texts_path, tokenizer_path, args.vocab)

        table = Table(title=f"Byte-level BPE training (vocab {args.vocab})")
        for column in ("docs", "MB", "seconds", "MB/s", "peak RSS (MB)", "vocab"):
            table.add_column(column, justify="right")
        table.add_row(
            str(len(docs)),
            f"{total_mb:.1f}",
            f"{trained['seconds']:.2f}",
            f"{total_mb / trained['seconds']:.2f}",
            f"{trained['peak_rss_mb']:.0f}",
            str(trained["vocab"]),
        )
        console.print(table)

        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(tokenizer_path))
        tokenizer.encode_special_tokens = True
        tokenizer.encode_batch_fast(docs[:50], add_special_tokens=False)  # warm up the thread pool

        tick = time.perf_counter()
        looped = [tokenizer.encode(doc, add_special_tokens=False).ids for doc in docs]
        loop_s = time.perf_counter() - tick
        tick = time.perf_counter()
        batched: list[list[int]] = []
        for start in range(0, len(docs), 1000):
            batched.extend(
                e.ids
                for e in tokenizer.encode_batch_fast(docs[start : start + 1000], add_special_tokens=False)
            )
        batch_s = time.perf_counter() - tick
        identical = looped == batched
        tokens = sum(map(len, looped))
        ratio = loop_s / batch_s

        table = Table(title="Encode throughput (same documents, same ids)")
        for column in ("method", "seconds", "MB/s", "Mtok/s", "speedup"):
            table.add_column(column, justify="right")
        table.add_row("encode() per doc, 1 thread", f"{loop_s:.2f}", f"{total_mb / loop_s:.2f}",
                      f"{tokens / loop_s / 1e6:.2f}", "1.0×")  # fmt: skip
        table.add_row(f"encode_batch_fast(1000), {cpus} CPUs", f"{batch_s:.2f}", f"{total_mb / batch_s:.2f}",
                      f"{tokens / batch_s / 1e6:.2f}", f"{ratio:.1f}×")  # fmt: skip
        console.print(table)
        console.print(f"bytes/token: {total_mb * 1e6 / tokens:.3f}; ids identical: {identical}")
        results.append(("batched and looped encodes give identical ids", identical, ""))
        results.append(
            (f"batched encode ≥ {args.target_ratio}× the per-document loop", ratio >= args.target_ratio,
             f"{ratio:.2f}× on {cpus} CPUs")
        )  # fmt: skip

        dedup = root / "data/dedup"
        dedup.mkdir(parents=True)
        pq.write_table(
            pa.table(
                {
                    "id": [content_id(d) for d in docs],
                    "text": pa.array(docs, pa.large_string()),
                    "source": ["bench"] * len(docs),
                    "bytes": [len(d.encode()) for d in docs],
                    "script": ["latin"] * len(docs),
                }
            ),
            dedup / "part-00000.parquet",
        )
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        metrics = run(TokenizeParams(tokens_per_shard=1 << 20), root)
        rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        table = Table(title="tokenize stage (tokens_per_shard = 2^20)")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for key, value in metrics.items():
            table.add_row(key, str(value))
        table.add_row("peak RSS growth (MB)", f"{rss1 - rss0:.0f}")
        console.print(table)

        shards = TokenShards(root / TOKENS_DIR, "train")
        nbytes = len(shards) * shards.dtype.itemsize
        for _ in range(2):  # second pass: page cache warm
            tick = time.perf_counter()
            checksum = int(shards.tokens(0, len(shards)).sum(dtype=np.int64))
            full_s = time.perf_counter() - tick
        batch_size, context, steps = 32, 512, 200
        tick = time.perf_counter()
        cursor = BatchCursor(seed=0)
        for _ in range(steps):
            _x, _y = shards.sample_batch(batch_size, context, cursor)
            cursor = cursor.advance()
        sample_s = time.perf_counter() - tick
        table = Table(
            title=f"TokenShards read ({len(shards.shards)} shards, {len(shards):,} tokens, {shards.dtype})"
        )
        for column in ("read", "seconds", "GB/s", "per second"):
            table.add_column(column, justify="right")
        table.add_row("tokens(0, len) + sum (warm)", f"{full_s:.4f}", f"{nbytes / full_s / 1e9:.2f}", "")
        table.add_row(
            f"sample_batch({batch_size}, {context}) × {steps}",
            f"{sample_s:.3f}",
            f"{steps * batch_size * (context + 1) * 8 / sample_s / 1e9:.2f} (int64 out)",
            f"{steps / sample_s:.0f} batches",
        )
        console.print(table)
        console.print(f"checksum {checksum}")

    console.print()
    for name, ok, detail in results:
        mark = "[green]PASS[/green]" if ok else "[red]FAIL[/red]"
        console.print(f"{mark} {name}" + (f" ({detail})" if detail else ""))
    return 0 if all(ok for _, ok, _ in results) else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    sys.exit(main())
