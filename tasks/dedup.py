"""Stage `dedup`: remove exact and near-duplicate documents, and explain every removal.

1. Exact: documents whose hashing-normalized text (lowercase, no accents/punctuation, digits → 0) has
   the same 128-bit hash; one survivor each, they never reach the fuzzy step.
2. Signatures: MinHash over word 5-grams (character n-grams for CJK), computed batch by batch on
   local processes or a Dask cluster (tasks/core/parallel.py); each document's LSH band keys are written
   to Parquet, one folder per band, so no in-memory LSH index is ever built.
3. Candidates: per band, documents sharing a bucket key (grouped with a sort, band by band).
4. Verification: each candidate pair's exact Jaccard of shingle sets (or the MinHash estimate with
   `verify: false`) against `threshold`; only verified pairs become edges.
5. Removal, in survivor order (longest text first, then smallest id): a document is removed when a
   verified edge links it to a document already kept, and records that survivor and their Jaccard. So
   every removed document is within the threshold of the survivor it duplicates; a chain A~B~C with
   A≁C never removes C because of A. Clusters (connected components of verified edges) are reported.
Decisions depend only on ids and texts, never on shard order or worker count.
"""

from __future__ import annotations

import csv
import os
import shutil
import time
from collections import defaultdict, deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from tasks.core.io import (
    ShardWriter,
    atomic_dir,
    atomic_file,
    clean_stale_temps,
    count_rows,
    iter_batches,
    shard_paths,
)
from tasks.core.layout import DEDUP_DIR, NORMALIZED_DIR, PLOTS_DIR, REPORTS_DIR, state_dir
from tasks.core.parallel import ordered_map
from tasks.core.params import ParamsError, StageParams
from tasks.data import minhash

REPORT_DIR = REPORTS_DIR / "dedup"
JACCARD_PLOT = PLOTS_DIR / "dedup_jaccard.csv"
SCURVE_PLOT = PLOTS_DIR / "dedup_scurve.csv"
JACCARD_BINS = np.round(np.linspace(0.0, 1.0, 21), 2)

#: The LSH band keys of pass 1, one folder per band: the on-disk replacement for an LSH index.
BAND_SCHEMA = pa.schema([("doc", pa.int64()), ("bucket", pa.uint64())])

#: One row per removed document: what it duplicates, how closely, and its text (nothing is lost).
REMOVED_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),
        ("kind", pa.string()),  # "exact" or "near"
        ("survivor_id", pa.string()),
        ("survivor_source", pa.string()),
        ("jaccard", pa.float64()),
        ("text", pa.large_string()),
    ]
)


@dataclass
class DedupParams(StageParams):
    threshold: float = 0.8  # Jaccard at or above which two documents are duplicates
    num_perm: int = 112  # MinHash permutations (= bands × rows)
    bands: int = 14  # LSH bands: P(candidate | J) = 1 - (1 - J^rows)^bands
    rows: int = 8  # rows (signature values) per band
    verify: bool = True  # check candidates with the exact Jaccard of their shingle sets
    shingle: Literal["auto", "word", "char"] = "auto"  # auto: char n-grams for CJK documents, else words
    word_ngram: int = 5  # words per shingle
    char_ngram: int = 5  # characters per shingle (CJK)
    seed: int = 1  # MinHash permutation seed (datasketch's)
    max_bucket_size: int = 200  # larger buckets pair every member with the bucket's best only (not all pairs)
    batch_size: int = 1000  # documents per work item
    workers: int = 0  # local worker processes; 0 = all CPUs
    dask_address: str | None = None  # run signatures on a Dask cluster: "tcp://host:8786", or "local"

    def validate(self) -> None:
        if self.bands * self.rows != self.num_perm:
            raise ParamsError(
                f"params.yaml: dedup.bands × dedup.rows must equal dedup.num_perm: "
                f"{self.bands} × {self.rows} = {self.bands * self.rows} ≠ {self.num_perm}"
            )
        if not 0.0 < self.threshold <= 1.0:
            raise ParamsError(f"params.yaml: dedup.threshold must be in (0, 1], got {self.threshold}")
        for name in (
            "num_perm",
            "bands",
            "rows",
            "word_ngram",
            "char_ngram",
            "batch_size",
            "max_bucket_size",
        ):
            if getattr(self, name) < 1:
                raise ParamsError(f"params.yaml: dedup.{name} must be ≥ 1, got {getattr(self, name)}")
        if self.workers < 0:
            raise ParamsError(f"params.yaml: dedup.workers must be ≥ 0 (0 = all CPUs), got {self.workers}")


@dataclass(frozen=True)
class ShingleConfig:
    """What a worker needs to turn texts into shingles and signatures (picklable, small)."""

    shingle: str
    word_ngram: int
    char_ngram: int
    num_perm: int
    seed: int
    bands: int
    rows: int

    def mode(self, script: str | None) -> str:
        if self.shingle != "auto":
            return self.shingle
        return "char" if script == "cjk" else "word"

    def shingles(self, normalized: list[str], scripts: list[str | None]) -> list[np.ndarray]:
        """Shingle hashes of hashing-normalized texts: word n-grams for the whole batch in one pass,
        character n-grams text by text."""
        modes = [self.mode(script) for script in scripts]
        words = [i for i, mode in enumerate(modes) if mode == "word"]
        shingles = [np.empty(0, np.uint64)] * len(normalized)
        word_shingles = minhash.word_shingles([normalized[i] for i in words], self.word_ngram)
        for i, values in zip(words, word_shingles, strict=True):
            shingles[i] = values
        for i, mode in enumerate(modes):
            if mode != "word":
                shingles[i] = minhash.shingle_hashes(normalized[i], mode, self.word_ngram, self.char_ngram)
        return shingles


@dataclass
class BatchSignatures:
    """A worker's answer for one batch: exact keys, band keys, and whether each doc had any shingle."""

    exact_keys: list[bytes]
    band_keys: np.ndarray  # uint64[n, bands]
    has_shingles: np.ndarray  # bool[n]


def sign_batch(texts: list[str], scripts: list[str | None], config: ShingleConfig) -> BatchSignatures:
    """Hashing-normalize, shingle and MinHash one batch (runs in a worker process)."""
    hasher = minhash.minhasher(config.num_perm, config.seed)
    normalized = [minhash.hashing_normalize(text) for text in texts]
    shingles = config.shingles(normalized, scripts)
    signatures = np.empty((len(texts), config.num_perm), np.uint32)
    for i, values in enumerate(shingles):
        signatures[i] = hasher.signature(values)
    return BatchSignatures(
        [minhash.exact_key(text) for text in normalized],
        minhash.band_hashes(signatures, config.bands, config.rows),
        np.fromiter((len(values) > 0 for values in shingles), bool, len(texts)),
    )


# --------------------------------------------------------------------------------------------------
# Pass 1: ids, lengths, exact keys, band keys → Parquet
# --------------------------------------------------------------------------------------------------


@dataclass
class Corpus:
    """Per-document facts kept in memory (id, source, length, exact key; a few hundred bytes per document);
    signatures and band keys stay on disk."""

    ids: list[str]
    sources: list[str]
    lengths: np.ndarray
    has_shingles: np.ndarray
    exact_keys: list[bytes]

    def priority(self) -> np.ndarray:
        """rank[doc]: 0 = best survivor (longest text, then smallest id, then source: rows tied on all
        three are identical, so input order never decides)."""
        order = sorted(
            range(len(self.ids)), key=lambda i: (-int(self.lengths[i]), self.ids[i], self.sources[i])
        )
        rank = np.empty(len(order), dtype=np.int64)
        rank[order] = np.arange(len(order))
        return rank


def _signature_pass(source_dir: Path, bands_dir: Path, params: DedupParams, config: ShingleConfig) -> Corpus:
    ids: list[str] = []
    sources: list[str] = []
    lengths: list[int] = []
    keys: list[bytes] = []
    has_shingles: list[np.ndarray] = []
    pending: deque[pa.RecordBatch] = deque()

    def work() -> Iterator[tuple[list[str], list[str | None], ShingleConfig]]:
        columns = ["id", "text", "source", "script"]
        for batch in iter_batches(source_dir, columns=columns, batch_size=params.batch_size):
            pending.append(batch)
            yield batch.column("text").to_pylist(), batch.column("script").to_pylist(), config

    total = count_rows(source_dir)
    writers = [
        ShardWriter(bands_dir / f"band={b:03d}", BAND_SCHEMA, rows_per_shard=1 << 22)
        for b in range(params.bands)
    ]
    with tqdm(total=total, unit="doc", desc="dedup signatures", mininterval=1.0) as progress:
        for result in ordered_map(sign_batch, work(), params.workers, params.dask_address):
            batch = pending.popleft()
            first = len(ids)
            texts = batch.column("text").to_pylist()
            ids.extend(batch.column("id").to_pylist())
            sources.extend(batch.column("source").to_pylist())
            lengths.extend(map(len, texts))
            keys.extend(result.exact_keys)
            has_shingles.append(result.has_shingles)
            docs = np.arange(first, first + len(texts), dtype=np.int64)
            for b, writer in enumerate(writers):
                writer.write_table(pa.table({"doc": docs, "bucket": result.band_keys[:, b]}))
            progress.update(len(texts))
    for writer in writers:
        writer.close()
    return Corpus(
        ids,
        sources,
        np.asarray(lengths, dtype=np.int64),
        np.concatenate(has_shingles) if has_shingles else np.zeros(0, bool),
        keys,
    )


# --------------------------------------------------------------------------------------------------
# Exact duplicates, then LSH candidates band by band
# --------------------------------------------------------------------------------------------------


def _exact_duplicates(corpus: Corpus, rank: np.ndarray) -> dict[int, int]:
    """{removed doc: its survivor} for documents whose hashing-normalized text is identical."""
    best: dict[bytes, int] = {}
    for doc, key in enumerate(corpus.exact_keys):
        if key not in best or rank[doc] < rank[best[key]]:
            best[key] = doc
    return {doc: best[key] for doc, key in enumerate(corpus.exact_keys) if best[key] != doc}


def _bucket_pairs(members: np.ndarray, max_bucket_size: int) -> Iterator[tuple[int, int]]:
    """Pairs to check within one bucket (members sorted best-first): all pairs, or a star if huge."""
    if len(members) <= max_bucket_size:
        for i in range(len(members) - 1):
            for j in range(i + 1, len(members)):
                yield int(members[i]), int(members[j])
    else:
        for other in members[1:]:
            yield int(members[0]), int(other)


def _candidate_pairs(bands_dir: Path, alive: np.ndarray, rank: np.ndarray, params: DedupParams) -> np.ndarray:
    """int64[n_pairs, 2] of (better, worse) documents sharing a bucket in at least one band."""
    found: set[tuple[int, int]] = set()
    for band_dir in sorted(bands_dir.iterdir()):
        table = pq.read_table(band_dir)
        docs = table.column("doc").to_numpy()
        buckets = table.column("bucket").to_numpy()
        keep = alive[docs]
        docs, buckets = docs[keep], buckets[keep]
        order = np.lexsort((rank[docs], buckets))  # by bucket, best member first
        docs, buckets = docs[order], buckets[order]
        boundaries = np.flatnonzero(np.diff(buckets)) + 1
        starts = np.concatenate(([0], boundaries))
        ends = np.concatenate((boundaries, [len(buckets)]))
        for start, end in zip(starts[ends - starts > 1], ends[ends - starts > 1], strict=True):
            found.update(_bucket_pairs(docs[start:end], params.max_bucket_size))
    return np.array(sorted(found), dtype=np.int64).reshape(-1, 2)


# --------------------------------------------------------------------------------------------------
# Verification (pass 2 over the candidates' texts) and removal decisions
# --------------------------------------------------------------------------------------------------


def _pair_similarities(
    source_dir: Path, pairs: np.ndarray, params: DedupParams, config: ShingleConfig
) -> np.ndarray:
    """Jaccard of each candidate pair: exact over shingle sets, or the MinHash estimate."""
    wanted = set(np.unique(pairs).tolist())
    shingles: dict[int, np.ndarray] = {}
    first = 0
    for batch in iter_batches(source_dir, columns=["text", "script"], batch_size=params.batch_size):
        picked = [offset for offset in range(batch.num_rows) if first + offset in wanted]
        if picked:
            texts, scripts = batch.column("text").to_pylist(), batch.column("script").to_pylist()
            normalized = [minhash.hashing_normalize(texts[offset]) for offset in picked]
            values = config.shingles(normalized, [scripts[offset] for offset in picked])
            shingles.update({first + offset: np.unique(v) for offset, v in zip(picked, values, strict=True)})
        first += batch.num_rows
    if params.verify:
        return np.array([minhash.jaccard(shingles[a], shingles[b]) for a, b in pairs], dtype=np.float64)
    hasher = minhash.minhasher(params.num_perm, params.seed)
    signatures = {doc: hasher.signature(values) for doc, values in shingles.items()}
    return np.array([np.mean(signatures[a] == signatures[b]) for a, b in pairs], dtype=np.float64)


@dataclass
class Decisions:
    survivor: dict[int, int]  # removed doc → the kept doc it duplicates
    jaccard: dict[int, float]  # removed doc → its Jaccard with that survivor
    kind: dict[int, str]  # removed doc → "exact" | "near"
    cluster_sizes: list[int]  # sizes of the connected components of verified edges (≥ 2)


def _decide(edges: np.ndarray, similarity: np.ndarray, rank: np.ndarray) -> Decisions:
    """Walk documents best-first; remove one if a verified edge links it to an already-kept document."""
    neighbours: dict[int, list[tuple[int, float]]] = defaultdict(list)
    for (a, b), value in zip(edges.tolist(), similarity.tolist(), strict=True):
        neighbours[a].append((b, value))
        neighbours[b].append((a, value))
    decisions = Decisions({}, {}, {}, [])
    for doc in sorted(neighbours, key=lambda d: rank[d]):
        kept = [(value, -rank[other], other) for other, value in neighbours[doc] if rank[other] < rank[doc]]
        kept = [entry for entry in kept if entry[2] not in decisions.survivor]
        if kept:
            value, _, other = max(kept)  # the closest kept document (ties: the better-ranked one)
            decisions.survivor[doc], decisions.jaccard[doc], decisions.kind[doc] = other, value, "near"
    union = minhash.UnionFind(len(rank))
    for a, b in edges.tolist():
        union.union(a, b)
    roots: defaultdict[int, int] = defaultdict(int)
    for doc in neighbours:
        roots[union.find(doc)] += 1
    decisions.cluster_sizes = sorted(roots.values(), reverse=True)
    return decisions


# --------------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------------


def _write_outputs(
    root: Path, source_dir: Path, corpus: Corpus, decisions: Decisions, batch_size: int
) -> int:
    """Survivors → data/dedup/, removed documents → reports/dedup/removed.parquet; returns docs kept."""
    schema = pq.read_schema(shard_paths(source_dir)[0])
    with atomic_dir(root / DEDUP_DIR) as out_dir, atomic_dir(root / REPORT_DIR / "removed") as removed_dir:
        kept = ShardWriter(out_dir, schema)
        removed = ShardWriter(removed_dir, REMOVED_SCHEMA)
        doc = 0
        for batch in iter_batches(source_dir, batch_size=batch_size):
            drop = np.array([d in decisions.survivor for d in range(doc, doc + batch.num_rows)], dtype=bool)
            kept.write_table(pa.Table.from_batches([batch]).filter(pa.array(~drop)))
            for offset in np.flatnonzero(drop).tolist():
                victim = doc + offset
                survivor = decisions.survivor[victim]
                removed.write(
                    {
                        "id": corpus.ids[victim],
                        "source": corpus.sources[victim],
                        "kind": decisions.kind[victim],
                        "survivor_id": corpus.ids[survivor],
                        "survivor_source": corpus.sources[survivor],
                        "jaccard": decisions.jaccard[victim],
                        "text": batch.column("text")[offset].as_py(),
                    }
                )
            doc += batch.num_rows
        kept.close()
        removed.close()
    return kept.rows_written


def _write_plots(root: Path, similarity: np.ndarray, threshold: float, bands: int, rows: int) -> None:
    """Verified-Jaccard histogram and the LSH S-curve: CSVs for `dvc plots`, PNGs for MLflow."""
    from matplotlib.figure import Figure

    verified, _ = np.histogram(similarity[similarity >= threshold], bins=JACCARD_BINS)
    rejected, _ = np.histogram(similarity[similarity < threshold], bins=JACCARD_BINS)
    with atomic_file(root / JACCARD_PLOT) as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["jaccard", "verified", "rejected"])
        writer.writerows(zip(JACCARD_BINS[:-1].tolist(), verified.tolist(), rejected.tolist(), strict=True))
    grid = np.round(np.linspace(0.0, 1.0, 101), 2)
    curve = np.asarray(minhash.candidate_probability(grid, bands, rows))
    with atomic_file(root / SCURVE_PLOT) as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["jaccard", "p_candidate"])
        writer.writerows((j, f"{p:.6f}") for j, p in zip(grid.tolist(), curve.tolist(), strict=True))

    figure = Figure(figsize=(11, 4))
    left, right = figure.subplots(1, 2)
    width = JACCARD_BINS[1] - JACCARD_BINS[0]
    left.bar(
        JACCARD_BINS[:-1], rejected, width=width, align="edge", label="rejected (< threshold)", color="#bbb"
    )
    left.bar(
        JACCARD_BINS[:-1], verified, width=width, align="edge", bottom=rejected, label="verified duplicate"
    )
    left.axvline(threshold, color="k", linestyle="--", linewidth=1)
    left.set(title="candidate pairs by Jaccard", xlabel="Jaccard of shingle sets", ylabel="pairs")
    left.legend()
    right.plot(grid, curve)
    right.axvline(threshold, color="k", linestyle="--", linewidth=1)
    right.set(
        title=f"LSH S-curve, {bands} bands × {rows} rows",
        xlabel="Jaccard",
        ylabel="P(candidate)",
        ylim=(0, 1.02),
    )
    figure.tight_layout()
    (root / REPORT_DIR).mkdir(parents=True, exist_ok=True)
    with atomic_file(root / REPORT_DIR / "jaccard_and_scurve.png", mode="wb") as handle:
        figure.savefig(handle, format="png", dpi=100)


def _write_examples(root: Path, limit: int = 200) -> None:
    """A human-sized CSV of removed documents (the full list is reports/dedup/removed/)."""
    table = pq.read_table(root / REPORT_DIR / "removed", columns=REMOVED_SCHEMA.names[:-1])
    with atomic_file(root / REPORT_DIR / "removed_examples.csv") as handle:
        writer = csv.DictWriter(handle, fieldnames=table.column_names, lineterminator="\n")
        writer.writeheader()
        writer.writerows(table.slice(0, limit).to_pylist())


# --------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------


def run(params: DedupParams, root: Path) -> dict[str, int | float]:
    """Read data/normalized/, write data/dedup/ + reports/dedup/ + plots, return metrics."""
    started = time.perf_counter()
    root = Path(root)
    source_dir = root / NORMALIZED_DIR
    config = ShingleConfig(
        params.shingle,
        params.word_ngram,
        params.char_ngram,
        params.num_perm,
        params.seed,
        params.bands,
        params.rows,
    )
    # Band keys live in a scratch folder named after this process, swept by a later run if we are killed.
    scratch = state_dir(root) / "tmp" / f".dedup-bands.tmp-{os.getpid()}"
    clean_stale_temps(scratch.parent / "dedup-bands")
    scratch.mkdir(parents=True)
    try:
        signing = time.perf_counter()
        corpus = _signature_pass(source_dir, scratch, params, config)
        signing = time.perf_counter() - signing
        rank = corpus.priority()
        exact = _exact_duplicates(corpus, rank)
        alive = corpus.has_shingles.copy()
        alive[list(exact)] = False
        pairs = _candidate_pairs(scratch, alive, rank, params)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    similarity = _pair_similarities(source_dir, pairs, params, config) if len(pairs) else np.zeros(0)
    verified = similarity >= params.threshold
    decisions = _decide(pairs[verified], similarity[verified], rank)
    for doc, survivor in exact.items():
        # An exact copy has the same shingles as its exact survivor; if that one was removed as a near
        # duplicate, point at the document it was kept in favour of (same Jaccard).
        final, similarity_to_final = (
            decisions.survivor.get(survivor, survivor),
            decisions.jaccard.get(survivor, 1.0),
        )
        decisions.survivor[doc], decisions.jaccard[doc], decisions.kind[doc] = (
            final,
            similarity_to_final,
            "exact",
        )

    docs_out = _write_outputs(root, source_dir, corpus, decisions, params.batch_size)
    _write_plots(root, similarity, params.threshold, params.bands, params.rows)
    _write_examples(root)

    docs_in = len(corpus.ids)
    near = sum(1 for kind in decisions.kind.values() if kind == "near")
    assert docs_in == docs_out + len(exact) + near, (docs_in, docs_out, len(exact), near)
    return {
        "docs_in": docs_in,
        "exact_duplicates": len(exact),
        "near_duplicates": near,
        "docs_out": docs_out,
        "removed_fraction": round((docs_in - docs_out) / docs_in, 6) if docs_in else 0.0,
        "candidate_pairs": len(pairs),
        "verified_pairs": int(verified.sum()),
        "rejected_pairs": int((~verified).sum()),
        "clusters": len(decisions.cluster_sizes),
        "largest_cluster": decisions.cluster_sizes[0] if decisions.cluster_sizes else 0,
        "docs_without_shingles": int((~corpus.has_shingles).sum()),
        "p_candidate_at_threshold": round(
            float(minhash.candidate_probability(params.threshold, params.bands, params.rows)), 4
        ),
        "signature_docs_per_second": round(docs_in / signing, 1) if signing else 0.0,
        "seconds": round(time.perf_counter() - started, 3),
    }
