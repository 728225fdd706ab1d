"""Throughput, memory and planted-duplicate quality of the dedup stage (tasks/dedup.py).

    python benchmarks/dedup.py [--docs 20000] [--pairs 200] [--workers 1 2] [--quick]

1. Builds a corpus of real text (Shakespeare chunks, KJV chapter chunks from corpus/en), synthetic
   documents (words drawn from the real vocabulary by frequency) and planted near-duplicate pairs whose
   exact Jaccard (word 5-gram sets, as the stage computes it) is measured and bucketed.
2. Signature throughput on one core: `sign_batch` vs the naive datasketch loop (a `MinHash` per doc,
   one `update()` per shingle), on the same documents.
3. End to end: `run(DedupParams(workers=N))` in a fresh subprocess per N: docs/s, peak RSS, and RSS
   growth per document extrapolated to a million documents.
4. Quality per Jaccard bucket: LSH candidate rate (band keys of the pair's signatures), removal rate
   after verification, the theoretical S-curve, and precision over every removed document.
Ends with one PASS/FAIL line per requirement (exit status 1 if any fails).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tasks.core.io import content_id  # noqa: E402
from tasks.data import minhash  # noqa: E402
from tasks.dedup import DedupParams, ShingleConfig, run, sign_batch  # noqa: E402
from tasks.normalize import NORMALIZED_SCHEMA  # noqa: E402

THRESHOLD = 0.8
#: Bucket → the band of exact Jaccard its pairs are generated in. Buckets under the threshold lie at or
#: below their nominal value, buckets at/over it at or above: "J ≤ 0.6" and "J ≥ 0.8" are exact claims.
BUCKETS = {
    0.5: (0.47, 0.50),
    0.6: (0.57, 0.60),
    0.7: (0.67, 0.70),
    0.8: (0.80, 0.83),
    0.9: (0.90, 0.93),
    1.0: (1.0, 1.0),
}
console = Console(width=130)


# --------------------------------------------------------------------------------------------------
# Corpus
# --------------------------------------------------------------------------------------------------


def chunks(words: list[str], rng: random.Random, low: int = 150, high: int = 300) -> list[list[str]]:
    out, at = [], 0
    while at + low <= len(words):
        n = rng.randint(low, high)
        out.append(words[at : at + n])
        at += n
    return out


def real_chunks(rng: random.Random) -> tuple[list[list[str]], list[list[str]]]:
    """(Shakespeare chunks, KJV chunks). Only the non-folio plays: `_gut_f` files are near-copies."""
    plays = []
    for path in sorted((REPO / "corpus/en/shakespeare").glob("*_gut.txt")):
        words = path.read_text(encoding="utf-8", errors="replace").split()
        if len(words) > 12_000:
            plays.extend(chunks(words[2000:], rng))
    bible = []
    with gzip.open(REPO / "corpus/en/kjv/kjv_chapters.jsonl.gz", "rt", encoding="utf-8") as handle:
        for line in handle:
            bible.extend(chunks(json.loads(line)["text"].split(), rng, 100, 300))
    return plays, bible


def wrap(words: list[str], width: int = 76) -> str:
    return textwrap.fill(" ".join(words), width=width)


def shingle_set(text: str) -> np.ndarray:
    return np.unique(minhash.shingle_hashes(minhash.hashing_normalize(text), "word"))


def cosmetic(words: list[str], rng: random.Random) -> str:
    """Case, punctuation and line-wrapping noise: identical after hashing normalization."""
    out = []
    for word in words:
        r = rng.random()
        word = word.upper() if r < 0.07 else word.capitalize() if r < 0.14 else word
        out.append(word + (rng.choice([",", ";", "!", " --"]) if rng.random() < 0.05 else ""))
    return wrap(out, rng.randint(40, 100))


def edited(words: list[str], edits: int, vocab: list[str], rng: random.Random) -> list[str]:
    out = list(words)
    for _ in range(edits):
        op, at = rng.random(), rng.randrange(len(out))
        if op < 0.5:
            out[at] = rng.choice(vocab)
        elif op < 0.75:
            out.insert(at, rng.choice(vocab))
        else:
            del out[at]
    return out


def plant(
    originals: list[list[str]], per_bucket: int, vocab: list[str], rng: random.Random
) -> list[tuple[str, str, float, float]]:
    """(original text, copy text, exact Jaccard, bucket): k random edits, k adjusted until J is in band."""
    pairs, source = [], iter(originals)
    for bucket, (low, high) in BUCKETS.items():
        made = 0
        while made < per_bucket:
            words = next(source)
            base = wrap(words)
            if bucket == 1.0:
                pairs.append((base, cosmetic(words, rng), 1.0, bucket))
                made += 1
                continue
            base_set, m = shingle_set(base), max(len(words) - 4, 1)
            target = (low + high) / 2
            k = max(1, round(m * (1 - target) / (5 * (1 + target)) * 1.3))
            for _ in range(12):
                copy = edited(words, k, vocab, rng)
                j = minhash.jaccard(base_set, shingle_set(wrap(copy)))
                if low <= j <= high:
                    pairs.append((base, cosmetic(copy, rng), j, bucket))
                    made += 1
                    break
                k = max(1, k + (1 if j > high else -1) * max(1, k // 8))
    return pairs


def build_corpus(n_docs: int, per_bucket: int, seed: int = 0) -> tuple[list[str], list[tuple]]:
    rng = random.Random(seed)
    plays, bible = real_chunks(rng)
    rng.shuffle(plays)
    counts = Counter(w for c in plays + bible for w in c)
    vocab = [w for w, _ in counts.most_common()]
    n_planted_originals = len(BUCKETS) * per_bucket * 2  # retries consume originals too
    originals, background = plays[:n_planted_originals], plays[n_planted_originals:] + bible
    pairs = plant(originals, per_bucket, vocab, rng)
    texts = [t for a, b, _, _ in pairs for t in (a, b)]
    rng.shuffle(background)
    texts += [wrap(c) for c in background[: max(0, n_docs - len(texts))]]
    # synthetic documents: real words at their real frequencies, random order
    weights = np.array([counts[w] for w in vocab], dtype=np.float64)
    nprng = np.random.default_rng(seed)
    vocab_array = np.array(vocab)
    while len(texts) < n_docs:
        n = int(nprng.integers(50, 400))
        texts.append(wrap(vocab_array[nprng.choice(len(vocab), n, p=weights / weights.sum())].tolist()))
    rng.shuffle(texts)
    return texts, pairs


def write_normalized(root: Path, texts: list[str]) -> None:
    out = root / "data" / "normalized"
    out.mkdir(parents=True, exist_ok=True)
    rows = [
        {"id": content_id(t), "text": t, "source": "bench", "bytes": len(t.encode()), "script": "latin"}
        for t in texts
    ]
    for index, part in enumerate(np.array_split(np.arange(len(rows)), 4)):
        table = pa.Table.from_pylist([rows[i] for i in part], schema=NORMALIZED_SCHEMA)
        pq.write_table(table, out / f"part-{index:05d}.parquet")


# --------------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------------


def signature_throughput(texts: list[str], naive_docs: int) -> dict[str, float]:
    from datasketch import MinHash

    params = DedupParams()
    config = ShingleConfig("auto", 5, 5, params.num_perm, params.seed, params.bands, params.rows)
    sign_batch(texts[:10], ["latin"] * 10, config)  # warm the per-process MinHasher
    subset = texts[:naive_docs]

    def ours(docs: list[str]) -> float:
        started = time.perf_counter()
        for i in range(0, len(docs), 1000):
            sign_batch(docs[i : i + 1000], ["latin"] * len(docs[i : i + 1000]), config)
        return len(docs) / (time.perf_counter() - started)

    started = time.perf_counter()
    for text in subset:
        words = text.lower().split()
        m = MinHash(num_perm=params.num_perm)
        for i in range(max(len(words) - 4, 1)):
            m.update(" ".join(words[i : i + 5]).encode("utf-8"))
    naive = len(subset) / (time.perf_counter() - started)
    return {"ours_all": ours(texts), "ours_subset": ours(subset), "naive_subset": naive}


def _vm_rss_kb() -> int:
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith("VmRSS:"))


def end_to_end_child(root: str, workers: int) -> None:
    """Runs in a fresh interpreter: the stage's own memory, not the benchmark's corpus."""
    import matplotlib.figure  # noqa: F401  (imported by the stage's plots: not per-document memory)

    baseline = _vm_rss_kb()
    started = time.perf_counter()
    metrics = run(DedupParams(workers=workers, threshold=THRESHOLD), Path(root))
    seconds = time.perf_counter() - started
    print(
        json.dumps(
            {
                "seconds": seconds,
                "metrics": metrics,
                "baseline_kb": baseline,
                "self_peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                "children_peak_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
            }
        )
    )


def end_to_end(root: Path, workers: int) -> dict:
    env = {**os.environ, "TQDM_DISABLE": "1"}
    result = subprocess.run(
        [sys.executable, __file__, "--_child", str(root), str(workers)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def quality(pairs: list[tuple], root: Path) -> tuple[list[dict], dict]:
    """Per bucket: candidate rate (band keys), removal rate (the stage's report), theoretical P."""
    params = DedupParams()
    hasher = minhash.minhasher(params.num_perm, params.seed)
    removed = {
        row["id"]: row
        for row in pq.read_table(
            root / "reports/dedup/removed", columns=["id", "survivor_id", "jaccard"]
        ).to_pylist()
    }
    rows = []
    for bucket in BUCKETS:
        group = [p for p in pairs if p[3] == bucket]
        js = np.array([p[2] for p in group])
        signatures = np.array(
            [hasher.signature(shingle_set(t)) for a, b, _, _ in group for t in (a, b)], dtype=np.uint32
        )
        keys = minhash.band_hashes(signatures, params.bands, params.rows)
        candidate = (keys[0::2] == keys[1::2]).any(axis=1)
        gone = []
        for a, b, _, _ in group:
            ia, ib = content_id(a), content_id(b)
            gone.append(
                removed.get(ia, {}).get("survivor_id") == ib or removed.get(ib, {}).get("survivor_id") == ia
            )
        rows.append(
            {
                "bucket": bucket,
                "pairs": len(group),
                "j_min": float(js.min()),
                "j_max": float(js.max()),
                "candidate": float(candidate.mean()),
                "removed": float(np.mean(gone)),
                "theory": float(np.mean(minhash.candidate_probability(js, params.bands, params.rows))),
            }
        )
    return rows, removed


def precision(texts: list[str], removed: dict[str, dict]) -> tuple[float, int, float]:
    """Fraction of removed documents whose exact Jaccard with their survivor is ≥ threshold; also checks
    that the recorded Jaccard is that exact value (largest disagreement returned)."""
    by_id = {content_id(t): t for t in texts}
    ok, worst = 0, 0.0
    for doc, row in removed.items():
        j = minhash.jaccard(shingle_set(by_id[doc]), shingle_set(by_id[row["survivor_id"]]))
        ok += j >= THRESHOLD
        worst = max(worst, abs(j - row["jaccard"]))
    return (ok / len(removed) if removed else 1.0), len(removed), worst


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--docs", type=int, default=20_000)
    parser.add_argument("--pairs", type=int, default=200, help="planted pairs per Jaccard bucket")
    parser.add_argument("--naive-docs", type=int, default=1000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--quick", action="store_true", help="5000 docs, 60 pairs per bucket, 300 naive")
    parser.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        end_to_end_child(args._child[0], int(args._child[1]))
        return 0
    if args.quick:
        args.docs, args.pairs, args.naive_docs = 5000, 60, 300

    started = time.perf_counter()
    texts, pairs = build_corpus(args.docs, args.pairs)
    words = sum(len(t.split()) for t in texts)
    console.print(
        f"corpus: {len(texts)} documents, {words / len(texts):.0f} words/doc on average, "
        f"{len(pairs)} planted pairs; built in {time.perf_counter() - started:.1f} s"
    )
    checks: list[tuple[str, bool, str]] = []

    speed = signature_throughput(texts, args.naive_docs)
    ratio = speed["ours_subset"] / speed["naive_subset"]
    table = Table(title="MinHash signatures, one core (num_perm=112, word 5-grams)")
    for column in ("implementation", "documents", "docs/s", "vs naive"):
        table.add_column(column, justify="right" if column != "implementation" else "left")
    table.add_row(
        "naive datasketch loop",
        f"{min(args.naive_docs, len(texts))}",
        f"{speed['naive_subset']:,.0f}",
        "1.0×",
    )
    table.add_row(
        "llmpipe sign_batch",
        f"{min(args.naive_docs, len(texts))}",
        f"{speed['ours_subset']:,.0f}",
        f"{ratio:.1f}×",
    )
    table.add_row(
        "llmpipe sign_batch",
        f"{len(texts)}",
        f"{speed['ours_all']:,.0f}",
        f"{speed['ours_all'] / speed['naive_subset']:.1f}×",
    )
    console.print(table)
    checks.append(("signature speed-up ≥ 20× over naive datasketch", ratio >= 20, f"{ratio:.1f}×"))

    scratch = Path(tempfile.mkdtemp(prefix="llmpipe-dedup-bench-"))
    runs = {}
    try:
        table = Table(title=f"End to end: run(DedupParams(workers=N)) on {len(texts)} documents")
        for column in (
            "workers",
            "seconds",
            "docs/s",
            "docs out",
            "exact",
            "near",
            "candidates",
            "peak RSS main",
            "peak RSS workers",
            "RSS growth",
            "est. GB / 1M docs",
        ):
            table.add_column(column, justify="right")
        for n in args.workers:
            root = scratch / f"w{n}"
            write_normalized(root, texts)
            result = end_to_end(root, n)
            runs[n] = (root, result)
            m = result["metrics"]
            growth_kb = max(result["self_peak_kb"] - result["baseline_kb"], 0)
            per_million_gb = growth_kb / len(texts) * 1e6 / 2**20
            table.add_row(
                str(n),
                f"{result['seconds']:.1f}",
                f"{len(texts) / result['seconds']:,.0f}",
                str(m["docs_out"]),
                str(m["exact_duplicates"]),
                str(m["near_duplicates"]),
                str(m["candidate_pairs"]),
                f"{result['self_peak_kb'] / 1024:.0f} MB",
                f"{result['children_peak_kb'] / 1024:.0f} MB" if result["children_peak_kb"] else "-",
                f"{growth_kb / 1024:.0f} MB",
                f"{per_million_gb:.2f}",
            )
        half = len(texts) // 2
        root = scratch / "half"
        write_normalized(root, texts[:half])
        result = end_to_end(root, 1)
        growth_half = max(result["self_peak_kb"] - result["baseline_kb"], 0)
        growth_full = max(
            runs[args.workers[0]][1]["self_peak_kb"] - runs[args.workers[0]][1]["baseline_kb"], 0
        )
        slope_kb = (growth_full - growth_half) / (len(texts) - half)
        table.add_row(
            "1 (½ corpus)",
            f"{result['seconds']:.1f}",
            f"{half / result['seconds']:,.0f}",
            str(result["metrics"]["docs_out"]),
            str(result["metrics"]["exact_duplicates"]),
            str(result["metrics"]["near_duplicates"]),
            str(result["metrics"]["candidate_pairs"]),
            f"{result['self_peak_kb'] / 1024:.0f} MB",
            "-",
            f"{growth_half / 1024:.0f} MB",
            "",
        )
        console.print(table)
        console.print(
            "  peak RSS = ru_maxrss: RUSAGE_SELF of a fresh process running only the stage, "
            "RUSAGE_CHILDREN = its largest worker.\n  RSS growth = main-process peak minus its RSS after "
            "imports (matplotlib included), before run().\n  est. GB / 1M docs (column) = growth / docs "
            "× 10⁶: an upper bound, it charges fixed overhead (Arrow buffers, allocator) to documents."
        )
        console.print(
            f"  marginal memory: (growth at {len(texts)} docs − growth at {half} docs) / "
            f"{len(texts) - half} = {slope_kb * 1024:,.0f} bytes/doc → "
            f"≈ {slope_kb * 1e6 / 2**20:.2f} GB per million documents "
            "(per-document lists in the main process + candidates' shingle sets; band keys stay on disk)."
        )
        if len(runs) > 1:
            outs = {
                n: sorted(pq.read_table(r / "data/dedup", columns=["id"]).column("id").to_pylist())
                for n, (r, _) in runs.items()
            }
            same = len({tuple(v) for v in outs.values()}) == 1
            checks.append(("identical survivors for every worker count", same, f"workers {args.workers}"))

        root, result = runs[args.workers[0]]
        rows, removed = quality(pairs, root)
        table = Table(title=f"Planted pairs by exact Jaccard (threshold {THRESHOLD}, 14 bands × 8 rows)")
        for column in (
            "bucket",
            "J range",
            "pairs",
            "LSH candidate rate",
            "P(candidate) theory",
            "removed (recall)",
        ):
            table.add_column(column, justify="right")
        for row in rows:
            table.add_row(
                f"{row['bucket']:.1f}",
                f"{row['j_min']:.3f}–{row['j_max']:.3f}",
                str(row["pairs"]),
                f"{row['candidate']:.3f}",
                f"{row['theory']:.3f}",
                f"{row['removed']:.3f}",
            )
        console.print(table)
        prec, n_removed, worst = precision(texts, removed)
        console.print(
            f"precision: {prec:.4f} of {n_removed} removed documents have exact J ≥ {THRESHOLD} with their "
            f"survivor; largest |recorded − exact J| = {worst:.2e}"
        )
        for row in rows:
            if row["bucket"] >= THRESHOLD:
                checks.append(
                    (
                        f"recall ≥ 0.92 at J bucket {row['bucket']:.1f}",
                        row["removed"] >= 0.92,
                        f"{row['removed']:.3f}",
                    )
                )
            elif row["bucket"] <= 0.6:
                checks.append(
                    (
                        f"candidate rate ≤ 0.25 at J bucket {row['bucket']:.1f}",
                        row["candidate"] <= 0.25,
                        f"{row['candidate']:.3f}",
                    )
                )
            else:
                checks.append(
                    (
                        f"nothing removed at J bucket {row['bucket']:.1f} (< threshold)",
                        row["removed"] == 0.0,
                        f"{row['removed']:.3f}",
                    )
                )
        checks.append(("precision = 1.0 (no removed doc under the threshold)", prec == 1.0, f"{prec:.4f}"))
        checks.append(("recorded Jaccard = exact Jaccard with the survivor", worst < 1e-9, f"{worst:.1e}"))
    finally:
        import shutil

        shutil.rmtree(scratch, ignore_errors=True)

    for name, ok, value in checks:
        console.print(f"{'[green]PASS[/green]' if ok else '[red]FAIL[/red]'}  {name}: {value}")
    console.print(f"total {time.perf_counter() - started:.0f} s")
    return 0 if all(ok for _, ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
