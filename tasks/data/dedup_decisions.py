"""Which documents the `dedup` stage removes, and in favour of which: exact duplicates, LSH candidate
pairs read band by band from the stage's band-key Parquet folders, and the best-first removal walk over
verified edges.

Kept apart from the stage (tasks/dedup.py), which streams texts and writes outputs: everything here
works on document numbers (row order in data/normalized/) and a survivor `rank` (0 = best), so a
decision depends only on those, never on shard order or worker count.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from tasks.data import minhash


def exact_duplicates(exact_keys: list[bytes], rank: np.ndarray) -> dict[int, int]:
    """{removed doc: its survivor} for documents whose hashing-normalized text is identical."""
    best: dict[bytes, int] = {}
    for doc, key in enumerate(exact_keys):
        if key not in best or rank[doc] < rank[best[key]]:
            best[key] = doc
    return {doc: best[key] for doc, key in enumerate(exact_keys) if best[key] != doc}


# --------------------------------------------------------------------------------------------------
# LSH candidates, band by band
# --------------------------------------------------------------------------------------------------


def bucket_pairs(members: np.ndarray, max_bucket_size: int) -> Iterator[tuple[int, int]]:
    """Pairs to check within one bucket (members sorted best-first): all pairs, or a star if huge."""
    if len(members) <= max_bucket_size:
        for i in range(len(members) - 1):
            for j in range(i + 1, len(members)):
                yield int(members[i]), int(members[j])
    else:
        for other in members[1:]:
            yield int(members[0]), int(other)


def candidate_pairs(bands_dir: Path, alive: np.ndarray, rank: np.ndarray, max_bucket_size: int) -> np.ndarray:
    """int64[n_pairs, 2] of (better, worse) documents sharing a bucket in at least one band
    (`bands_dir`: one folder of (doc, bucket) rows per band)."""
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
            found.update(bucket_pairs(docs[start:end], max_bucket_size))
    return np.array(sorted(found), dtype=np.int64).reshape(-1, 2)


# --------------------------------------------------------------------------------------------------
# Removal decisions
# --------------------------------------------------------------------------------------------------


@dataclass
class Decisions:
    survivor: dict[int, int]  # removed doc → the kept doc it duplicates
    jaccard: dict[int, float]  # removed doc → its Jaccard with that survivor
    kind: dict[int, str]  # removed doc → "exact" | "near"
    cluster_sizes: list[int]  # sizes of the connected components of verified edges (≥ 2)


def decide(edges: np.ndarray, similarity: np.ndarray, rank: np.ndarray) -> Decisions:
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


def add_exact(decisions: Decisions, exact: dict[int, int]) -> None:
    """Record the exact duplicates (`exact_duplicates`) in `decisions`, after the near ones."""
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
