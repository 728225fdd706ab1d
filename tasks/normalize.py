"""Stage `normalize`: clean every raw document's text, then drop low-quality documents (Gopher rules).

Per document, in this order:

1. broken-encoding repair with ftfy (`fix_encoding`, a conservative config: no HTML unescaping, no quote
   uncurling, no width/ligature folding; those are left to step 2);
2. Unicode normalization (`unicode_form`, NFKC by default);
3. line breaks unified (\\r\\n, \\r, VT, FF, NEL, U+2028/9 → \\n); control characters (Cc except \\n, \\t)
   and invisible format characters (zero-width space/joiners, word joiner, BOM, soft hyphen, bidi
   controls) removed;
4. whitespace collapsed: runs of spaces/tabs (any horizontal whitespace) → one space, trailing spaces
   per line stripped, 3+ newlines → one blank line, document stripped;
5. length bounds in characters, then the Gopher quality filters (word count, mean word length,
   `#`/ellipsis-to-word ratios, bullet/ellipsis lines, fraction of words with a letter) and the Gopher
   repetition filters (duplicate paragraphs/lines, top 2/3/4-gram and duplicate 5..10-gram character
   fractions), datatrove's GopherQualityFilter/GopherRepetitionFilter being the reference. The first
   failing check gives the drop reason.

Words depend on the document's script (`detect_script`). Latin/other text: whitespace-separated tokens
(the Gopher paper's words). CJK text (Han/kana/Hangul above `cjk_min_fraction` of the letters): every
CJK character is one token, runs of other letters/digits and runs of symbols are tokens. For CJK the
mean-word-length filter is skipped (a character is not a word), word counts are divided by
`cjk_chars_per_word` before the min/max word bounds, and the n-gram filters use n × `cjk_chars_per_word`
character tokens, so a word 2-gram becomes a 4-character gram and a word 10-gram a 20-character one.

Outputs: data/normalized (DOC_SCHEMA + `script`, `id` = content_id(normalized text)), every dropped
document in data/quarantine/normalize (its raw id, source, `reason: detail` and raw text), a length
histogram (plots/normalize_lengths.csv, reports/normalize/length_hist.png) and reports/normalize/drops.csv.
"""

from __future__ import annotations

import csv
import itertools
import re
import time
import unicodedata
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

import ftfy
import numpy as np
import pyarrow as pa
import regex
from tqdm import tqdm

from tasks.core.io import (
    DOC_SCHEMA,
    ShardWriter,
    atomic_dir,
    atomic_file,
    content_id,
    count_rows,
    iter_batches,
)
from tasks.core.layout import NORMALIZED_DIR, PLOTS_DIR, QUARANTINE_DIR, RAW_DIR, REPORTS_DIR
from tasks.core.parallel import ordered_map
from tasks.core.params import ParamsError

#: data/normalized: the document schema plus the script later stages (dedup shingling) key on.
NORMALIZED_SCHEMA = DOC_SCHEMA.append(pa.field("script", pa.string()))

#: data/quarantine/normalize: the dropped document as it came in (raw id and text) and why it was dropped.
NORMALIZE_QUARANTINE_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),
        ("reason", pa.string()),
        ("text", pa.large_string()),
    ]
)

#: Drop reasons in the order the checks run (the first failing one is recorded).
REASONS = (
    "empty_after_normalization",
    "too_short",
    "too_long",
    "too_few_words",
    "too_many_words",
    "mean_word_length",
    "symbol_ratio",
    "bullet_lines",
    "ellipsis_lines",
    "alpha_ratio",
    "duplicate_paragraphs",
    "duplicate_lines",
    "top_ngram",
    "duplicate_ngram",
)

SCRIPTS = ("latin", "cjk", "other")

QUARANTINE_SUBDIR = "normalize"
LENGTHS_PLOT = PLOTS_DIR / "normalize_lengths.csv"
REPORT_DIR = REPORTS_DIR / "normalize"

#: Histogram bins over log10(characters): 0 (1 char) .. 7 (10M chars) in quarter decades.
HIST_EDGES = np.round(np.arange(0.0, 7.0 + 1e-9, 0.25), 2)

_TOP_NGRAMS = (2, 3, 4)
_DUP_NGRAMS = (5, 6, 7, 8, 9, 10)


@dataclass
class NormalizeParams:
    """params.yaml `normalize:`. For every filter threshold, null (or 0) disables that check."""

    unicode_form: Literal["NFKC", "NFC", "NFKD", "NFD", "none"] = "NFKC"
    fix_encoding: bool = True  # repair mojibake (UTF-8 read as Latin-1/cp1252, ...) with ftfy
    min_chars: int | None = 100  # documents shorter than this (after normalization) are dropped
    max_chars: int | None = 1_000_000  # ... and longer than this
    min_words: int | None = 50  # Gopher: at least 50 words (CJK: characters / cjk_chars_per_word)
    max_words: int | None = 100_000  # Gopher: at most 100k words
    min_mean_word_length: float | None = 3.0  # Gopher: mean word length in [3, 10] chars (not for CJK)
    max_mean_word_length: float | None = 10.0
    max_symbol_word_ratio: float | None = 0.1  # Gopher: '#' per word and '...'/'…' per word at most 0.1
    max_bullet_line_fraction: float | None = 0.9  # Gopher: at most 90% of lines start with '•' or '-'
    max_ellipsis_line_fraction: float | None = 0.3  # Gopher: at most 30% of lines end with '...'/'…'
    min_alpha_word_fraction: float | None = 0.8  # Gopher: at least 80% of words contain a letter
    max_duplicate_paragraph_fraction: float | None = 0.3  # Gopher: duplicate paragraphs / paragraphs
    max_duplicate_paragraph_char_fraction: float | None = 0.2  # chars in duplicate paragraphs / chars
    max_duplicate_line_fraction: float | None = 0.3  # Gopher: duplicate lines / lines
    max_duplicate_line_char_fraction: float | None = 0.2  # chars in duplicate lines / chars
    max_top_2gram_char_fraction: float | None = 0.20  # Gopher: chars in the most frequent 2-gram / chars
    max_top_3gram_char_fraction: float | None = 0.18
    max_top_4gram_char_fraction: float | None = 0.16
    max_duplicate_5gram_char_fraction: float | None = 0.15  # Gopher: chars in repeated 5-grams / chars
    max_duplicate_6gram_char_fraction: float | None = 0.14
    max_duplicate_7gram_char_fraction: float | None = 0.13
    max_duplicate_8gram_char_fraction: float | None = 0.12
    max_duplicate_9gram_char_fraction: float | None = 0.11
    max_duplicate_10gram_char_fraction: float | None = 0.10
    cjk_min_fraction: float = 0.3  # a document is "cjk" when Han/kana/Hangul exceed this share of letters
    cjk_chars_per_word: float = 2.0  # CJK characters per "word": scales word counts and n-gram sizes
    batch_size: int = 256  # rows per batch (memory / parallel granularity; output does not depend on it)
    workers: int = 0  # processes; 0 = all CPUs (output identical whatever the value)
    dask_address: str | None = None  # run batches on a Dask cluster: "tcp://host:8786", or "local"

    def validate(self) -> None:
        def fail(key: str, message: str) -> None:
            raise ParamsError(f"params.yaml: normalize.{key}: {message}")

        if self.unicode_form not in ("NFKC", "NFC", "NFKD", "NFD", "none"):
            fail("unicode_form", f"{self.unicode_form!r} is not one of NFKC, NFC, NFKD, NFD, none")
        if not isinstance(self.fix_encoding, bool):
            fail("fix_encoding", f"expected true/false, got {self.fix_encoding!r}")
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("unicode_form", "fix_encoding", "dask_address"):
                continue
            if value is None:
                if f.name in ("cjk_min_fraction", "cjk_chars_per_word", "batch_size", "workers"):
                    fail(f.name, "must be set (null is not allowed)")
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                fail(f.name, f"expected a number, got {value!r}")
            if value < 0:
                fail(f.name, f"must be >= 0, got {value!r}")
            if f.name.endswith("_fraction") and value > 1:
                fail(f.name, f"is a fraction, must be in [0, 1], got {value!r}")
        for low, high in (
            ("min_chars", "max_chars"),
            ("min_words", "max_words"),
            ("min_mean_word_length", "max_mean_word_length"),
        ):
            lo, hi = getattr(self, low), getattr(self, high)
            if lo and hi and lo > hi:
                fail(low, f"{lo} is above normalize.{high} = {hi}")
        if self.cjk_min_fraction == 0:
            fail("cjk_min_fraction", "must be > 0")
        if self.cjk_chars_per_word < 1:
            fail("cjk_chars_per_word", f"must be >= 1, got {self.cjk_chars_per_word}")
        if self.batch_size < 1:
            fail("batch_size", f"must be >= 1, got {self.batch_size}")

    def top_ngram_limits(self) -> list[tuple[int, float]]:
        """[(n, max char fraction)] for the enabled top-n-gram checks."""
        limits = ((n, getattr(self, f"max_top_{n}gram_char_fraction")) for n in _TOP_NGRAMS)
        return [(n, limit) for n, limit in limits if limit]

    def duplicate_ngram_limits(self) -> list[tuple[int, float]]:
        """[(n, max char fraction)] for the enabled duplicate-n-gram checks."""
        limits = ((n, getattr(self, f"max_duplicate_{n}gram_char_fraction")) for n in _DUP_NGRAMS)
        return [(n, limit) for n, limit in limits if limit]


# --------------------------------------------------------------------------------------------------
# Text normalization
# --------------------------------------------------------------------------------------------------

#: Encoding repair only: everything else ftfy could do is either left to unicodedata or out of scope.
_FTFY_CONFIG = ftfy.TextFixerConfig(
    unescape_html=False,
    remove_terminal_escapes=True,
    fix_encoding=True,
    restore_byte_a0=True,
    replace_lossy_sequences=True,
    decode_inconsistent_utf8=True,
    fix_c1_controls=True,
    fix_latin_ligatures=False,
    fix_character_width=False,
    uncurl_quotes=False,
    fix_line_breaks=False,
    fix_surrogates=True,
    remove_control_chars=False,
    normalization=None,
    explain=False,
)

_LINE_BREAK_RE = re.compile("\r\n?|[\x0b\x0c\x85\u2028\u2029]")
# Cc except \t \n (\r, VT, FF, NEL became \n above) + soft hyphen, Arabic letter mark, Mongolian vowel
# separator, zero-width space/non-joiner/joiner, LRM/RLM, bidi embeddings/overrides/isolates, word joiner
# and invisible operators, BOM/zero-width no-break space.
_INVISIBLE_RE = re.compile(
    "[\x00-\x08\x0e-\x1f\x7f-\x84\x86-\x9f\u00ad\u061c\u180e\u200b-\u200f\u202a-\u202e"
    "\u2060-\u2064\u2066-\u2069\ufeff]+"
)
_HSPACE_RE = re.compile(r"[^\S\n]+")
_TRAILING_SPACE_RE = re.compile(r" \n")
_BLANK_LINES_RE = re.compile(r"\n{3,}")


def normalize_text(text: str, unicode_form: str = "NFKC", fix_encoding: bool = True) -> str:
    """The cleaned text (steps 1-4 of the module docstring); may be empty."""
    if fix_encoding:
        text = ftfy.fix_text(text, _FTFY_CONFIG)
    if unicode_form != "none" and not unicodedata.is_normalized(unicode_form, text):
        text = unicodedata.normalize(unicode_form, text)
    text = _LINE_BREAK_RE.sub("\n", text)
    text = _INVISIBLE_RE.sub("", text)
    text = _HSPACE_RE.sub(" ", text)
    text = _TRAILING_SPACE_RE.sub("\n", text)
    text = _BLANK_LINES_RE.sub("\n\n", text)
    return text.strip()


# --------------------------------------------------------------------------------------------------
# Script detection and words
# --------------------------------------------------------------------------------------------------

# ー (prolonged sound mark), 々 〆 ヽヾゝゞ (iteration marks) are Common-script but part of Japanese words.
_CJK_CLASS = r"\p{Han}\p{Hiragana}\p{Katakana}\p{Hangul}\u30fc\u3005\u3006\u30fd\u30fe\u309d\u309e"
_CJK_RUN_RE = regex.compile(f"[{_CJK_CLASS}]+")
_LETTER_RUN_RE = regex.compile(r"\p{L}+")
_LATIN_RUN_RE = regex.compile(r"\p{Latin}+")
_ASCII_LETTER_RE = re.compile(r"[A-Za-z]")
# CJK tokens: one CJK character | a run of other letters/digits | a run of symbols.
_CJK_TOKEN_RE = regex.compile(rf"[{_CJK_CLASS}]|[^\W_{_CJK_CLASS}]+|(?:[^\w\s]|_)+")
_NON_CJK_WORD_RE = regex.compile(rf"[^\W_{_CJK_CLASS}]+")
_NON_CJK_CHUNK_RE = regex.compile(rf"[^\s{_CJK_CLASS}]+")
_PUNCT_ONLY_RE = regex.compile(r"\p{P}+")
_LETTER_RE = regex.compile(r"\p{L}")
# (stdlib `re` where it is faster: [^\W_] is a letter or digit, [^\W\d_] a letter.)
# Within each whitespace token that has a letter or digit, the span from its first to its last one:
# exactly one match per such token, so its length is the token's word length without punctuation.
_WORD_CORE_RE = re.compile(r"[^\W_](?:\S*[^\W_])?")
# Whitespace tokens that contain a letter (anchored at the token start, so linear time).
_ALPHA_TOKEN_RE = re.compile(r"(?<!\S)(?:[^\w\s]|[\d_])*[^\W\d_]")


def _count_chars(pattern: regex.Pattern[str], text: str) -> int:
    return sum(map(len, pattern.findall(text)))


def detect_script(text: str, cjk_min_fraction: float = 0.3) -> str:
    """The document's script: "cjk" when Han/kana/Hangul are above `cjk_min_fraction` of its letters,
    "latin" when Latin letters are at least half of them, else "other" (also for text without letters)."""
    if text.isascii():
        return "latin" if _ASCII_LETTER_RE.search(text) else "other"
    letters = _count_chars(_LETTER_RUN_RE, text)
    if not letters:
        return "other"
    if _count_chars(_CJK_RUN_RE, text) / letters > cjk_min_fraction:
        return "cjk"
    if _count_chars(_LATIN_RUN_RE, text) / letters >= 0.5:
        return "latin"
    return "other"


def tokenize(text: str, script: str) -> list[str]:
    """The tokens the n-gram filters run on: whitespace tokens, or CJK tokens for script "cjk"."""
    return _CJK_TOKEN_RE.findall(text) if script == "cjk" else text.split()


# --------------------------------------------------------------------------------------------------
# Gopher filters
# --------------------------------------------------------------------------------------------------


def _duplicates(elements: list[str]) -> tuple[int, int]:
    """(#elements that repeat an earlier one, #characters in them), as datatrove's find_duplicates."""
    counts = Counter(elements)
    dup_elements = dup_chars = 0
    for element, count in counts.items():
        if count > 1:
            dup_elements += count - 1
            dup_chars += len(element) * (count - 1)
    return dup_elements, dup_chars


def _ngrams(tokens: list[str], n: int) -> list[tuple[str, ...]]:
    return list(zip(*(itertools.islice(tokens, k, None) for k in range(n)), strict=False))


def _top_ngram_chars(tokens: list[str], n: int, sep: int) -> int:
    """Characters covered by all occurrences of the most frequent n-gram (0 if no n-gram repeats)."""
    grams = _ngrams(tokens, n)
    if not grams:
        return 0
    gram, count = Counter(grams).most_common(1)[0]
    if count < 2:
        return 0
    return (sum(map(len, gram)) + sep * (n - 1)) * count


def _duplicate_ngram_chars(grams: list[tuple[str, ...]], prefix: list[int], n: int) -> int:
    """Characters in n-grams repeating an earlier n-gram, non-overlapping (datatrove's find_all_duplicate)."""
    seen: set[tuple[str, ...]] = set()
    repeated = 0
    i, end = 0, len(grams)
    while i < end:
        gram = grams[i]
        if gram in seen:
            repeated += prefix[i + n] - prefix[i]
            i += n
        else:
            seen.add(gram)
            i += 1
    return repeated


def _too_high(value: float, limit: float | None) -> bool:
    return limit is not None and limit > 0 and value > limit


def quality_reason(text: str, script: str, p: NormalizeParams) -> str | None:
    """None if normalized, non-empty `text` passes every check, else `reason: detail` of the first failure."""
    n_chars = len(text)
    if p.min_chars and n_chars < p.min_chars:
        return f"too_short: {n_chars} chars < {p.min_chars}"
    if p.max_chars and n_chars > p.max_chars:
        return f"too_long: {n_chars} chars > {p.max_chars}"

    cjk = script == "cjk"
    if cjk:
        # Words: each CJK character, plus each run of other letters/digits. Alpha/symbol denominators:
        # CJK characters plus the non-CJK chunks between spaces and CJK characters, where chunks of
        # punctuation only (、。「」...) are ignored: in Latin text punctuation sticks to a word instead.
        n_cjk = _count_chars(_CJK_RUN_RE, text)
        chunks = [chunk for chunk in _NON_CJK_CHUNK_RE.findall(text) if not _PUNCT_ONLY_RE.fullmatch(chunk)]
        n_tokens = n_cjk + len(chunks)
        n_alpha = n_cjk + sum(1 for chunk in chunks if _LETTER_RE.search(chunk))
        word_count = n_cjk / p.cjk_chars_per_word + len(_NON_CJK_WORD_RE.findall(text))
        cores: list[str] = []
    else:
        n_tokens = len(text.split())
        cores = _WORD_CORE_RE.findall(text)
        n_alpha = len(_ALPHA_TOKEN_RE.findall(text))
        word_count = len(cores)
    shown_words = f"{word_count:.0f}" + (" (CJK chars / cjk_chars_per_word + other words)" if cjk else "")
    if p.min_words and word_count < p.min_words:
        return f"too_few_words: {shown_words} < {p.min_words}"
    if p.max_words and word_count > p.max_words:
        return f"too_many_words: {shown_words} > {p.max_words}"
    if n_tokens == 0:
        return "alpha_ratio: no words"

    if not cjk and cores:
        mean = sum(map(len, cores)) / len(cores)
        if p.min_mean_word_length and mean < p.min_mean_word_length:
            return f"mean_word_length: {mean:.2f} < {p.min_mean_word_length}"
        if p.max_mean_word_length and mean > p.max_mean_word_length:
            return f"mean_word_length: {mean:.2f} > {p.max_mean_word_length}"

    hash_ratio = text.count("#") / n_tokens
    if _too_high(hash_ratio, p.max_symbol_word_ratio):
        return f"symbol_ratio: '#' per word {hash_ratio:.3f} > {p.max_symbol_word_ratio}"
    ellipsis_ratio = (text.count("...") + text.count("…")) / n_tokens
    if _too_high(ellipsis_ratio, p.max_symbol_word_ratio):
        return f"symbol_ratio: ellipses per word {ellipsis_ratio:.3f} > {p.max_symbol_word_ratio}"

    lines = [line for line in text.split("\n") if line]
    n_lines = len(lines)
    if p.max_bullet_line_fraction:
        bullets = sum(1 for line in lines if line.lstrip().startswith(("•", "-")))
        if bullets / n_lines > p.max_bullet_line_fraction:
            return f"bullet_lines: {bullets / n_lines:.3f} of lines > {p.max_bullet_line_fraction}"
    if p.max_ellipsis_line_fraction:
        ellipses = sum(1 for line in lines if line.endswith(("...", "…")))
        if ellipses / n_lines > p.max_ellipsis_line_fraction:
            return f"ellipsis_lines: {ellipses / n_lines:.3f} of lines > {p.max_ellipsis_line_fraction}"

    alpha = n_alpha / n_tokens
    if p.min_alpha_word_fraction and alpha < p.min_alpha_word_fraction:
        return f"alpha_ratio: {alpha:.3f} of words have a letter < {p.min_alpha_word_fraction}"

    paragraphs = text.split("\n\n")
    dup, dup_chars = _duplicates(paragraphs)
    if _too_high(dup / len(paragraphs), p.max_duplicate_paragraph_fraction):
        return (
            f"duplicate_paragraphs: {dup / len(paragraphs):.3f} of paragraphs > "
            f"{p.max_duplicate_paragraph_fraction}"
        )
    if _too_high(dup_chars / n_chars, p.max_duplicate_paragraph_char_fraction):
        return (
            f"duplicate_paragraphs: {dup_chars / n_chars:.3f} of chars > "
            f"{p.max_duplicate_paragraph_char_fraction}"
        )
    dup, dup_chars = _duplicates(lines)
    if _too_high(dup / n_lines, p.max_duplicate_line_fraction):
        return f"duplicate_lines: {dup / n_lines:.3f} of lines > {p.max_duplicate_line_fraction}"
    if _too_high(dup_chars / n_chars, p.max_duplicate_line_char_fraction):
        return f"duplicate_lines: {dup_chars / n_chars:.3f} of chars > {p.max_duplicate_line_char_fraction}"

    tokens = tokenize(text, script)
    scale = p.cjk_chars_per_word if cjk else 1.0
    sep = 0 if cjk else 1
    lengths = list(map(len, tokens))
    for n, limit in p.top_ngram_limits():
        size = max(1, round(n * scale))
        fraction = _top_ngram_chars(tokens, size, sep) / n_chars
        if fraction > limit:
            return f"top_ngram: most frequent {size}-gram covers {fraction:.3f} of chars > {limit}"
    prefix = [0, *itertools.accumulate(lengths)]
    for n, limit in p.duplicate_ngram_limits():
        size = max(1, round(n * scale))
        grams = _ngrams(tokens, size)
        if len(set(grams)) == len(grams):
            break  # no repeated n-gram, hence no repeated longer n-gram either
        fraction = _duplicate_ngram_chars(grams, prefix, size) / n_chars
        if fraction > limit:
            return f"duplicate_ngram: repeated {size}-grams cover {fraction:.3f} of chars > {limit}"
    return None


# --------------------------------------------------------------------------------------------------
# Batches (the unit of work a worker process gets)
# --------------------------------------------------------------------------------------------------


def classify(text: str, p: NormalizeParams) -> tuple[str, str | None]:
    """(script, None or `reason: detail`) for already-normalized `text`."""
    if not text:
        return "other", "empty_after_normalization"
    script = detect_script(text, p.cjk_min_fraction)
    return script, quality_reason(text, script, p)


def process_texts(texts: list[str | None], p: NormalizeParams) -> dict[str, list[Any]]:
    """Normalize and judge a batch of raw texts: columns text, id, script, reason (None = kept),
    changed (the cleaned text differs from the raw one) and fixed (ftfy changed it)."""
    out: dict[str, list[Any]] = {key: [] for key in ("text", "id", "script", "reason", "changed", "fixed")}
    for raw in texts:
        raw = raw or ""
        fixed = ftfy.fix_text(raw, _FTFY_CONFIG) if p.fix_encoding and raw else raw
        text = normalize_text(fixed, p.unicode_form, fix_encoding=False)
        script, reason = classify(text, p)
        out["text"].append(text)
        out["id"].append(content_id(text))
        out["script"].append(script)
        out["reason"].append(reason)
        out["changed"].append(text != raw)
        out["fixed"].append(fixed != raw)
    return out


def _results(
    batches: Iterator[pa.RecordBatch], p: NormalizeParams
) -> Iterator[tuple[pa.RecordBatch, dict[str, list[Any]]]]:
    """(batch, processed) in input order; with workers != 1 a bounded window of batches runs in parallel."""
    pending: deque[pa.RecordBatch] = deque()

    def work() -> Iterator[tuple[list[str | None], NormalizeParams]]:
        for batch in batches:
            pending.append(batch)
            yield batch.column("text").to_pylist(), p

    for result in ordered_map(process_texts, work(), p.workers, p.dask_address):
        yield pending.popleft(), result


# --------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------


def _histogram(lengths: list[int]) -> np.ndarray:
    values = np.log10(np.maximum(np.asarray(lengths, dtype=np.float64), 1.0))
    values = np.clip(values, HIST_EDGES[0], HIST_EDGES[-1])
    counts, _ = np.histogram(values, bins=HIST_EDGES)
    return counts


def _write_length_plots(root: Path, before: np.ndarray, after: np.ndarray) -> None:
    with atomic_file(root / LENGTHS_PLOT) as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["log10_chars", "before", "after"])
        for edge, b, a in zip(HIST_EDGES[:-1], before, after, strict=True):
            writer.writerow([f"{edge:.2f}", int(b), int(a)])

    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state (Agg via savefig)

    fig = Figure(figsize=(8, 4.5))
    ax = fig.subplots()
    ax.stairs(before, HIST_EDGES, label="before (raw)", linewidth=1.5)
    ax.stairs(after, HIST_EDGES, label="after (normalized, kept)", linewidth=1.5)
    ax.set_title("normalize: document length distribution")
    ax.set_xlabel("log10(characters per document)")
    ax.set_ylabel("documents")
    ax.legend()
    fig.tight_layout()
    with atomic_file(root / REPORT_DIR / "length_hist.png", "wb") as handle:
        fig.savefig(handle, format="png", dpi=100)


def _write_drops(root: Path, counts: Counter[str], examples: dict[str, str]) -> None:
    with atomic_file(root / REPORT_DIR / "drops.csv") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["reason", "count", "example_source"])
        for reason in REASONS:
            writer.writerow([reason, counts[reason], examples.get(reason, "")])


def run(params: NormalizeParams, root: Path) -> dict[str, int | float]:
    """Read data/raw/, write data/normalized/ (+ data/quarantine/normalize/ + plot/report), return metrics.

    Metrics: docs_in, docs_out, dropped, dropped_<reason> for every reason in REASONS, chars_in,
    chars_out, docs_changed, docs_encoding_fixed, docs_out_<script>, seconds. docs_in == docs_out + dropped.
    """
    params.validate()
    started = time.perf_counter()
    root = Path(root)
    raw_dir = root / RAW_DIR
    total = count_rows(raw_dir)
    batches = iter_batches(raw_dir, columns=["id", "text", "source"], batch_size=params.batch_size)

    drops: Counter[str] = Counter()
    examples: dict[str, str] = {}
    scripts: Counter[str] = Counter()
    docs_in = docs_out = chars_in = chars_out = changed = fixed = 0
    hist_before = np.zeros(len(HIST_EDGES) - 1, dtype=np.int64)
    hist_after = np.zeros_like(hist_before)

    with (
        atomic_dir(root / NORMALIZED_DIR) as out_dir,
        atomic_dir(root / QUARANTINE_DIR / QUARANTINE_SUBDIR) as quarantine_dir,
        tqdm(total=total, unit="doc", desc="normalize", mininterval=1.0) as progress,
    ):
        kept = ShardWriter(out_dir, NORMALIZED_SCHEMA)
        dropped = ShardWriter(quarantine_dir, NORMALIZE_QUARANTINE_SCHEMA)
        for batch, result in _results(batches, params):
            raw_ids = batch.column("id").to_pylist()
            raw_texts = [text or "" for text in batch.column("text").to_pylist()]
            sources = batch.column("source").to_pylist()
            raw_lengths = list(map(len, raw_texts))
            kept_lengths = []
            for i, reason in enumerate(result["reason"]):
                text = result["text"][i]
                if reason is None:
                    kept.write(
                        {
                            "id": result["id"][i],
                            "text": text,
                            "source": sources[i],
                            "bytes": len(text.encode("utf-8")),
                            "script": result["script"][i],
                        }
                    )
                    kept_lengths.append(len(text))
                    scripts[result["script"][i]] += 1
                else:
                    code = reason.split(":", 1)[0]
                    drops[code] += 1
                    examples.setdefault(code, sources[i])
                    dropped.write(
                        {"id": raw_ids[i], "source": sources[i], "reason": reason, "text": raw_texts[i]}
                    )
            docs_in += len(raw_texts)
            docs_out += len(kept_lengths)
            chars_in += sum(raw_lengths)
            chars_out += sum(kept_lengths)
            changed += sum(result["changed"])
            fixed += sum(result["fixed"])
            hist_before += _histogram(raw_lengths)
            hist_after += _histogram(kept_lengths)
            progress.update(len(raw_texts))
        kept.close()
        dropped.close()

    _write_length_plots(root, hist_before, hist_after)
    _write_drops(root, drops, examples)

    n_dropped = sum(drops.values())
    assert docs_in == docs_out + n_dropped, (docs_in, docs_out, n_dropped)
    metrics: dict[str, int | float] = {
        "docs_in": docs_in,
        "docs_out": docs_out,
        "dropped": n_dropped,
        **{f"dropped_{reason}": drops[reason] for reason in REASONS},
        "chars_in": chars_in,
        "chars_out": chars_out,
        "docs_changed": changed,
        "docs_encoding_fixed": fixed,
        **{f"docs_out_{script}": scripts[script] for script in SCRIPTS},
        "seconds": round(time.perf_counter() - started, 3),
    }
    return metrics
