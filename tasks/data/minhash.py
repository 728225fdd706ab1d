"""MinHash/LSH building blocks for near-duplicate detection, vectorized with numpy.

Flow for one document: `hashing_normalize` (a dedup-only view of the text; the training text is never
changed) → `shingle_hashes` (word n-grams, or character n-grams for CJK, as 64-bit hashes) →
`MinHasher.signature` (datasketch's default `affine32` scheme, bit-identical to
`datasketch.MinHash(num_perm, seed).update_batch(...)` fed the same 32-bit shingle hashes) →
`band_hashes` (one 64-bit bucket key per LSH band). Candidate pairs share a bucket in some band; they
are verified with the exact `jaccard` of their shingle sets.
"""

from __future__ import annotations

import functools
import string
import unicodedata

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import regex
import xxhash
from datasketch import MinHash

_PUNCT_OR_SYMBOL = regex.compile(r"[\p{P}\p{S}]+")
_DIGIT = regex.compile(r"\p{Nd}")
_COMBINING_MARKS = regex.compile(r"\p{Mn}+")

_MIX = np.uint64(0x9E3779B97F4A7C15)  # odd multiplier combining the n token hashes of an n-gram
EMPTY_SIGNATURE_VALUE = np.uint32(0xFFFFFFFF)  # datasketch's value for a MinHash that saw nothing


#: ASCII fast path of `hashing_normalize`: punctuation/symbols → space, digits → 0 in one C-level pass.
_ASCII_TABLE = str.maketrans(
    {**{ch: " " for ch in string.punctuation}, **{digit: "0" for digit in string.digits}}
)


def hashing_normalize(text: str) -> str:
    """Lowercase, strip accents (NFD + drop combining marks), punctuation/symbols → space, digits → 0,
    whitespace collapsed: copies differing only in these ways hash identically."""
    if text.isascii():  # most English text: no accents to strip, and str.translate beats regex
        return " ".join(text.lower().translate(_ASCII_TABLE).split())
    stripped = _COMBINING_MARKS.sub("", unicodedata.normalize("NFD", text))
    lowered = _DIGIT.sub("0", _PUNCT_OR_SYMBOL.sub(" ", stripped.lower()))
    return " ".join(lowered.split())


def exact_key(normalized: str) -> bytes:
    """128-bit key of the hashing-normalized text: equal keys are exact duplicates."""
    return xxhash.xxh3_128_digest(normalized.encode("utf-8"))


#: MurmurHash3's finalizer constants per width: (shift, multiplier, shift, multiplier, shift).
_FMIX_CONSTANTS = {
    np.uint64: (33, 0xFF51AFD7ED558CCD, 33, 0xC4CEB9FE1A85EC53, 33),
    np.uint32: (16, 0x85EBCA6B, 13, 0xC2B2AE35, 16),
}


def _fmix(values: np.ndarray) -> np.ndarray:
    """MurmurHash3's finalizer for the array's width (uint64 or uint32), a bijection that spreads bits;
    the 32-bit one is exactly datasketch's pre-mix in its affine32 scheme."""
    kind = values.dtype.type
    shift1, multiplier1, shift2, multiplier2, shift3 = (kind(c) for c in _FMIX_CONSTANTS[kind])
    values = values ^ (values >> shift1)
    values = values * multiplier1
    values = values ^ (values >> shift2)
    values = values * multiplier2
    return values ^ (values >> shift3)


def _ngram_hashes(token_hashes: np.ndarray, n: int) -> np.ndarray:
    """Hash every run of n consecutive tokens; a document shorter than n is one shingle."""
    n = min(n, len(token_hashes))
    if n == 0:
        return np.empty(0, dtype=np.uint64)
    count = len(token_hashes) - n + 1
    combined = token_hashes[:count].copy()
    for offset in range(1, n):
        combined = combined * _MIX + token_hashes[offset : offset + count]
    return _fmix(combined)


#: word → 64-bit hash, shared by all batches of a process (word frequencies are Zipfian, so most
#: lookups hit); emptied when it grows past _TOKEN_CACHE_LIMIT entries to bound memory.
_TOKEN_CACHE: dict[str, int] = {}
_TOKEN_CACHE_LIMIT = 1 << 20


def _token_hashes(tokens: list[str]) -> np.ndarray:
    """uint64 xxh3 hash of each (distinct) token, hashing each word once per process."""
    if len(_TOKEN_CACHE) > _TOKEN_CACHE_LIMIT:
        _TOKEN_CACHE.clear()
    for token in set(tokens).difference(_TOKEN_CACHE):
        _TOKEN_CACHE[token] = xxhash.xxh3_64_intdigest(token.encode("utf-8"))
    return np.fromiter(map(_TOKEN_CACHE.__getitem__, tokens), np.uint64, len(tokens))


def word_shingles(normalized_texts: list[str], n: int = 5) -> list[np.ndarray]:
    """Word n-gram hashes of each text, for a whole batch at once: Arrow splits and dictionary-encodes
    all tokens in C++, each distinct word is hashed once, one vectorized pass builds every n-gram. A
    text shorter than n words is a single shingle; an empty text has none."""
    shingles = [np.empty(0, np.uint64)] * len(normalized_texts)
    present = [i for i, text in enumerate(normalized_texts) if text]
    if not present:
        return shingles
    tokens = pc.split_pattern(pa.array([normalized_texts[i] for i in present], pa.large_string()), " ")
    encoded = pc.dictionary_encode(tokens.flatten())
    hashes = _token_hashes(encoded.dictionary.to_pylist())[encoded.indices.to_numpy()]
    offsets = tokens.offsets.to_numpy()
    grams = _ngram_hashes(hashes, n) if len(hashes) >= n else np.empty(0, np.uint64)
    for i, start, end in zip(present, offsets[:-1].tolist(), offsets[1:].tolist(), strict=True):
        if end - start >= n:
            shingles[i] = grams[start : end - n + 1]
        else:  # shorter than one n-gram: the whole text is its only shingle
            shingles[i] = _ngram_hashes(hashes[start:end], n)
    return shingles


def shingle_hashes(normalized: str, mode: str, word_ngram: int = 5, char_ngram: int = 5) -> np.ndarray:
    """64-bit hashes of the document's shingles (with repeats), from hashing-normalized text.

    `mode="word"`: word n-grams (space-delimited scripts). `mode="char"`: character n-grams over the
    text with spaces removed (CJK, where words are not separated by spaces).
    """
    if mode == "word":
        return word_shingles([normalized], word_ngram)[0]
    if mode == "char":
        code_points = np.frombuffer(normalized.replace(" ", "").encode("utf-32-le"), dtype=np.uint32)
        return _ngram_hashes(_fmix(code_points.astype(np.uint64)), char_ngram)
    raise ValueError(f"unknown shingle mode {mode!r} (expected 'word' or 'char')")


class MinHasher:
    """MinHash signatures with datasketch's permutations (`affine32`: h ↦ a·fmix32(h) + b mod 2³²)."""

    def __init__(self, num_perm: int, seed: int) -> None:
        a, b = MinHash(num_perm=num_perm, seed=seed).permutations
        self.num_perm = num_perm
        self._a = np.asarray(a, dtype=np.uint32)
        self._b = np.asarray(b, dtype=np.uint32)
        self._scratch = np.empty((0, num_perm), dtype=np.uint32)

    def signature(self, shingles: np.ndarray) -> np.ndarray:
        """uint32[num_perm]; the low 32 bits of each shingle hash are what datasketch would hash."""
        if len(shingles) == 0:
            return np.full(self.num_perm, EMPTY_SIGNATURE_VALUE, dtype=np.uint32)
        mixed = _fmix(shingles.astype(np.uint32))  # astype keeps the low 32 bits
        if len(mixed) > len(self._scratch):  # one reusable (shingles × permutations) buffer
            self._scratch = np.empty((len(mixed), self.num_perm), dtype=np.uint32)
        permuted = self._scratch[: len(mixed)]
        np.multiply(mixed[:, None], self._a, out=permuted)
        np.add(permuted, self._b, out=permuted)
        return permuted.min(axis=0)


@functools.lru_cache(maxsize=8)
def minhasher(num_perm: int, seed: int) -> MinHasher:
    """One MinHasher per (num_perm, seed) and process (worker processes build theirs once)."""
    return MinHasher(num_perm, seed)


def band_hashes(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """uint64[n_docs, bands]: each band's `rows` signature values folded into one bucket key."""
    grouped = signatures.reshape(len(signatures), bands, rows).astype(np.uint64)
    keys = grouped[:, :, 0].copy()
    for row in range(1, rows):
        keys = keys * _MIX + grouped[:, :, row]
    return _fmix(keys)


def candidate_probability(jaccard: np.ndarray | float, bands: int, rows: int) -> np.ndarray | float:
    """The LSH S-curve: P(two documents share a bucket in some band | their Jaccard) = 1-(1-J^r)^b."""
    return 1.0 - (1.0 - np.power(jaccard, rows)) ** bands


def jaccard(first: np.ndarray, second: np.ndarray) -> float:
    """Exact Jaccard of two shingle sets given as sorted unique arrays."""
    if len(first) == 0 and len(second) == 0:
        return 1.0
    shared = len(np.intersect1d(first, second, assume_unique=True))
    return shared / (len(first) + len(second) - shared)


class UnionFind:
    """Disjoint sets over 0..n-1 with path halving and union by size (plain lists: element access in
    a Python loop is several times faster than on numpy arrays)."""

    def __init__(self, size: int) -> None:
        self.parent = list(range(size))
        self.size = [1] * size

    def find(self, item: int) -> int:
        parent = self.parent
        while parent[item] != item:
            parent[item] = parent[parent[item]]
            item = parent[item]
        return item

    def union(self, first: int, second: int) -> None:
        root_a, root_b = self.find(first), self.find(second)
        if root_a == root_b:
            return
        if self.size[root_a] < self.size[root_b]:
            root_a, root_b = root_b, root_a
        self.parent[root_b] = root_a
        self.size[root_a] += self.size[root_b]
