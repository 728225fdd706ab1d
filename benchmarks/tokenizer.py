"""Tokenizer training, encode throughput and shard read throughput on the bundled corpus.

    python benchmarks/tokenizer.py [--vocab 8192] [--chunk 20000] [--rss-scaling 64,256]

1. Documents: Shakespeare plays (corpus/en/shakespeare/*.txt) cut into ~20k-character chunks at line
   breaks, plus KJV chapters (corpus/en/kjv/kjv_chapters.jsonl.gz).
2. Train the stage's tokenizer (tasks.tokenizer: GPT-4 regex, byte-level BPE, vocab 8192) in a fresh
   subprocess, streaming batches as the stage does: wall time and peak RSS.
3. Encode throughput: `encode_batch_fast` in batches of 1000 documents (what the tokenize stage does, Rust
   threads on all cores) vs one `encode()` call per document, on the same documents; checks both give
   identical ids. A third row runs the batched encode on one thread (RAYON_NUM_THREADS=1, a subprocess)
   to separate what batching gains from what parallelism gains.
4. The tokenize stage end to end (tasks/tokenize.run) on those documents, then TokenShards read
   throughput: a full copy of the split out of the memmaps, and random (B, T) batches per second.
5. With --rss-scaling: training peak RSS on larger corpora made from the same text, in two regimes that
   bracket real text: `repeated` (the text over and over: no new words, the lower bound) and `novel`
   (one word in 20 turned into a never-seen spelling: the word-count table grows linearly, far faster
   than Heaps' law lets real text grow it, the upper bound).
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
from model.tokens import TOKENIZER_FILE  # noqa: E402
from tasks.core.io import content_id  # noqa: E402
from tasks.core.layout import TOKENIZER_DIR, TOKENS_DIR  # noqa: E402
from tasks.core.parallel import available_cpus  # noqa: E402
from tasks.tokenize import TokenizeParams, run  # noqa: E402

console = Console(width=120)

#: Runs in a fresh interpreter (argv: docs.json, out tokenizer.json, vocab, target MB, regime) so that
#: peak RSS is the training's own. Batches are generated on the fly, as the stage streams Parquet.
TRAIN_SCRIPT = """
import itertools, json, sys, time
from tasks.tokenizer import TokenizerParams, bpe_trainer, byte_level_bpe
docs_path, out, vocab, target_mb, regime = sys.argv[1:6]
docs = json.load(open(docs_path, encoding="utf-8"))
target = float(target_mb) * 1e6 if float(target_mb) > 0 else sum(len(d.encode()) for d in docs)
stats = {"bytes": 0}

def novel(text, serial):
    words = text.split(" ")
    for i in range(serial % 20, len(words), 20):
        words[i] = f"{words[i]}{serial * 1000003 + i:x}"
    return " ".join(words)

def batches():
    batch = []
    for serial, doc in enumerate(itertools.cycle(docs)):
        if stats["bytes"] >= target:
            break
        doc = novel(doc, serial) if regime == "novel" else doc
        stats["bytes"] += len(doc.encode())
        batch.append(doc)
        if len(batch) == 1000:
            yield batch
            batch = []
    if batch:
        yield batch

params = TokenizerParams(vocab_size=int(vocab))
tokenizer = byte_level_bpe(params.pattern)
tick = time.perf_counter()
tokenizer.train_from_iterator(batches(), trainer=bpe_trainer(params))
seconds = time.perf_counter() - tick
tokenizer.save(out)
# VmHWM, not ru_maxrss: ru_maxrss survives exec and would report the (larger) parent's peak.
rss = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")) / 1024
print(json.dumps({"seconds": seconds, "peak_rss_mb": rss, "mb": stats["bytes"] / 1e6,
                  "vocab": tokenizer.get_vocab_size()}))
"""

#: Batched encode on however many Rust threads RAYON_NUM_THREADS allows (argv: tokenizer, docs.json).
ENCODE_SCRIPT = """
import json, sys, time
from model.tokens import load_tokenizer
tokenizer = load_tokenizer(sys.argv[1])
docs = json.load(open(sys.argv[2], encoding="utf-8"))
tokenizer.encode_batch_fast(docs[:50], add_special_tokens=False)
tick = time.perf_counter()
for start in range(0, len(docs), 1000):
    tokenizer.encode_batch_fast(docs[start : start + 1000], add_special_tokens=False)
print(json.dumps({"seconds": time.perf_counter() - tick}))
"""


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


def run_script(script: str, *args: object, env: dict[str, str] | None = None) -> dict[str, float]:
    result = subprocess.run(
        [sys.executable, "-c", script, *map(str, args)],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def rss_scaling(texts_path: Path, out: Path, vocab: int, sizes_mb: list[float]) -> None:
    table = Table(title=f"BPE training peak RSS vs corpus size (vocab {vocab}, streamed batches)")
    for column in ("regime", "text MB", "seconds", "peak RSS (MB)", "RSS per GB of text (MB)"):
        table.add_column(column, justify="right")
    for regime in ("repeated", "novel"):
        previous: dict[str, float] | None = None
        for size in sizes_mb:
            row = run_script(TRAIN_SCRIPT, texts_path, out, vocab, size, regime)
            slope = ""
            if previous is not None:  # marginal cost: RSS growth per GB of extra text
                growth = (row["peak_rss_mb"] - previous["peak_rss_mb"]) / (row["mb"] - previous["mb"])
                slope = f"{growth * 1e3:.0f}"
            mb, seconds, rss = row["mb"], row["seconds"], row["peak_rss_mb"]
            table.add_row(regime, f"{mb:.0f}", f"{seconds:.1f}", f"{rss:.0f}", slope)
            previous = row
    console.print(table)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--chunk", type=int, default=20_000, help="characters per Shakespeare chunk")
    parser.add_argument("--target-ratio", type=float, default=4.0, help="batched / loop encode speedup")
    parser.add_argument("--rss-scaling", default="", help="comma-separated corpus sizes in MB, e.g. 64,256")
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
        tokenizer_path = root / TOKENIZER_DIR / TOKENIZER_FILE
        tokenizer_path.parent.mkdir(parents=True)
        trained = run_script(TRAIN_SCRIPT, texts_path, tokenizer_path, args.vocab, 0, "repeated")

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

        from model.tokens import load_tokenizer

        tokenizer = load_tokenizer(tokenizer_path)
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
        one_thread_s = run_script(ENCODE_SCRIPT, tokenizer_path, texts_path, env={"RAYON_NUM_THREADS": "1"})[
            "seconds"
        ]

        table = Table(title="Encode throughput (same documents, same ids)")
        for column in ("method", "seconds", "MB/s", "Mtok/s", "speedup"):
            table.add_column(column, justify="right")
        rows = [
            ("encode() per doc, 1 thread", loop_s),
            ("encode_batch_fast(1000), 1 thread", one_thread_s),
            (f"encode_batch_fast(1000), {cpus} CPUs", batch_s),
        ]
        for method, seconds in rows:
            mb_s, mtok_s = total_mb / seconds, tokens / seconds / 1e6
            speedup = f"{loop_s / seconds:.1f}×"
            table.add_row(method, f"{seconds:.2f}", f"{mb_s:.2f}", f"{mtok_s:.2f}", speedup)
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
        if args.rss_scaling:
            sizes = [float(size) for size in args.rss_scaling.split(",")]
            rss_scaling(texts_path, root / "scaling.json", args.vocab, sizes)

    console.print()
    for name, ok, detail in results:
        mark = "[green]PASS[/green]" if ok else "[red]FAIL[/red]"
        console.print(f"{mark} {name}" + (f" ({detail})" if detail else ""))
    return 0 if all(ok for _, ok, _ in results) else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    sys.exit(main())
