"""Stage `normalize`: clean every raw document's text, then drop low-quality documents (Gopher rules).

Per document: the Unicode and whitespace clean-up of `tasks.data.cleanup` (ftfy encoding repair,
`unicode_form`, line breaks, invisible characters, whitespace); its script (`tasks.data.words`: latin,
cjk or other, which decides what a word is); then the length bounds and the Gopher quality and
repetition rules of `tasks.data.gopher`, whose first failing rule gives the drop reason.

Outputs: data/normalized (DOC_SCHEMA + `script`, `id` = content_id(normalized text)), every dropped
document in data/quarantine/normalize (its raw id, source, `reason: detail` and raw text), a length
histogram (plots/normalize_lengths.csv, reports/normalize/length_hist.png) and reports/normalize/drops.csv.
"""

from __future__ import annotations

import csv
import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, get_args

import numpy as np
import pyarrow as pa
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
from tasks.core.params import ParamsError, StageParams
from tasks.data import gopher
from tasks.data.cleanup import UnicodeForm, normalize_text, repair_encoding
from tasks.data.words import SCRIPTS, detect_script

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
REASONS = ("empty_after_normalization", *gopher.REASONS)

QUARANTINE_SUBDIR = "normalize"
LENGTHS_PLOT = PLOTS_DIR / "normalize_lengths.csv"
REPORT_DIR = REPORTS_DIR / "normalize"

#: Histogram bins over log10(characters): 0 (1 char) .. 7 (10M chars) in quarter decades.
HIST_EDGES = np.round(np.arange(0.0, 7.0 + 1e-9, 0.25), 2)

_TOP_NGRAMS = (2, 3, 4)
_DUP_NGRAMS = (5, 6, 7, 8, 9, 10)


@dataclass
class NormalizeParams(StageParams):
    """params.yaml `normalize:`. For every filter threshold, null (or 0) disables that check."""

    unicode_form: UnicodeForm = "NFKC"
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

        if self.unicode_form not in get_args(UnicodeForm):
            fail("unicode_form", f"{self.unicode_form!r} is not one of {', '.join(get_args(UnicodeForm))}")
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
# Batches (the unit of work a worker process gets)
# --------------------------------------------------------------------------------------------------


def classify(text: str, p: NormalizeParams) -> tuple[str, str | None]:
    """(script, None or `reason: detail`) for already-normalized `text`."""
    if not text:
        return "other", "empty_after_normalization"
    script = detect_script(text, p.cjk_min_fraction)
    return script, gopher.quality_reason(text, script, p)


def process_texts(texts: list[str | None], p: NormalizeParams) -> dict[str, list[Any]]:
    """Normalize and judge a batch of raw texts: columns text, id, script, reason (None = kept),
    changed (the cleaned text differs from the raw one) and fixed (ftfy changed it)."""
    out: dict[str, list[Any]] = {key: [] for key in ("text", "id", "script", "reason", "changed", "fixed")}
    for raw in texts:
        raw = raw or ""
        fixed = repair_encoding(raw) if p.fix_encoding and raw else raw
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
