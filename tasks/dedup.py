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
Decisions depend only on ids and texts, never on shard order or worker count. Steps 1, 3 and 5 live in
tasks/data/dedup_decisions.py; the removed-documents schema, examples and plots in tasks/data/dedup_report.py.
"""

from __future__ import annotations

import os
import shutil
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from tasks.core.io import ShardWriter, atomic_dir, clean_stale_temps, count_rows, iter_batches, shard_paths
from tasks.core.layout import DEDUP_DIR, NORMALIZED_DIR, PLOTS_DIR, REPORTS_DIR, state_dir
from tasks.core.parallel import ordered_map
from tasks.core.params import ParamsError, StageParams
from tasks.data import minhash
from tasks.data.dedup_decisions import Decisions, add_exact, candidate_pairs, decide, exact_duplicates
from tasks.data.dedup_report import REMOVED_SCHEMA, write_examples, write_plots

REPORT_DIR = REPORTS_DIR / "dedup"
JACCARD_PLOT = PLOTS_DIR / "dedup_jaccard.csv"
SCURVE_PLOT = PLOTS_DIR / "dedup_scurve.csv"

#: The LSH band keys of pass 1, one folder per band: the on-disk replacement for an LSH index.
BAND_SCHEMA = pa.schema([("doc", pa.int64()), ("bucket", pa.uint64())])


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
# Verification: pass 2 over the candidates' texts
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
        exact = exact_duplicates(corpus.exact_keys, rank)
        alive = corpus.has_shingles.copy()
        alive[list(exact)] = False
        pairs = candidate_pairs(scratch, alive, rank, params.max_bucket_size)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    similarity = _pair_similarities(source_dir, pairs, params, config) if len(pairs) else np.zeros(0)
    verified = similarity >= params.threshold
    decisions = decide(pairs[verified], similarity[verified], rank)
    add_exact(decisions, exact)

    docs_out = _write_outputs(root, source_dir, corpus, decisions, params.batch_size)
    write_plots(root / REPORT_DIR, root / JACCARD_PLOT, root / SCURVE_PLOT, similarity, params)
    write_examples(root / REPORT_DIR)

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
