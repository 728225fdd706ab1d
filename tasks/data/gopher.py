"""The Gopher quality and repetition rules (Rae et al. 2021, "Scaling Language Models", App. A.1.1 and
Table A1), with datatrove's GopherQualityFilter/GopherRepetitionFilter as the reference implementation.

Each rule is a small function returning its drop reason (`reason: detail`) or None, datatrove's
"each filter returning its reason"; `quality_reason` runs them in the order of `REASONS` and returns the
first reason. A threshold of None (or 0) disables its rule. For CJK text (`tasks.data.words`) the
mean-word-length rule is skipped (a character is not a word) and the n-gram rules use n ×
`cjk_chars_per_word` character tokens, so a word 2-gram becomes a 4-character gram.
"""

from __future__ import annotations

import itertools
from collections import Counter
from functools import cached_property
from typing import Protocol

from tasks.data.words import WordCounts, count_words, tokenize

#: Drop reasons in the order the rules run (the first failing one is recorded).
REASONS = (
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


class Thresholds(Protocol):
    """The settings the rules read (the normalize stage's params)."""

    min_chars: int | None
    max_chars: int | None
    min_words: int | None
    max_words: int | None
    min_mean_word_length: float | None
    max_mean_word_length: float | None
    max_symbol_word_ratio: float | None
    max_bullet_line_fraction: float | None
    max_ellipsis_line_fraction: float | None
    min_alpha_word_fraction: float | None
    max_duplicate_paragraph_fraction: float | None
    max_duplicate_paragraph_char_fraction: float | None
    max_duplicate_line_fraction: float | None
    max_duplicate_line_char_fraction: float | None
    cjk_chars_per_word: float

    def top_ngram_limits(self) -> list[tuple[int, float]]: ...
    def duplicate_ngram_limits(self) -> list[tuple[int, float]]: ...


class Document:
    """A document as the rules see it: its text and the statistics several rules share, each computed on
    first use, so a document an early rule drops never pays for the later ones."""

    def __init__(self, text: str, script: str, cjk_chars_per_word: float) -> None:
        self.text = text
        self.script = script
        self.cjk = script == "cjk"
        self.chars = len(text)
        self.cjk_chars_per_word = cjk_chars_per_word

    @cached_property
    def counts(self) -> WordCounts:
        """Its words, counted the way its script needs (`count_words`)."""
        return count_words(self.text, self.script, self.cjk_chars_per_word)

    @cached_property
    def lines(self) -> list[str]:
        """The non-empty lines."""
        return [line for line in self.text.split("\n") if line]

    @cached_property
    def tokens(self) -> list[str]:
        """What n-grams are made of: words, or CJK tokens (`tokenize`)."""
        return tokenize(self.text, self.script)

    def gram_size(self, n: int) -> int:
        """Tokens in a word n-gram: n, or n × cjk_chars_per_word CJK tokens."""
        return max(1, round(n * (self.cjk_chars_per_word if self.cjk else 1.0)))


def quality_reason(text: str, script: str, p: Thresholds) -> str | None:
    """None if normalized, non-empty `text` passes every rule, else `reason: detail` of the first failure."""
    doc = Document(text, script, p.cjk_chars_per_word)
    return (
        check_length(doc, p.min_chars, p.max_chars)
        or check_word_count(doc, p.min_words, p.max_words)
        or check_has_words(doc)
        or check_mean_word_length(doc, p.min_mean_word_length, p.max_mean_word_length)
        or check_symbol_ratio(doc, p.max_symbol_word_ratio)
        or check_bullet_lines(doc, p.max_bullet_line_fraction)
        or check_ellipsis_lines(doc, p.max_ellipsis_line_fraction)
        or check_alpha_words(doc, p.min_alpha_word_fraction)
        or check_duplicate_paragraphs(
            doc, p.max_duplicate_paragraph_fraction, p.max_duplicate_paragraph_char_fraction
        )
        or check_duplicate_lines(doc, p.max_duplicate_line_fraction, p.max_duplicate_line_char_fraction)
        or check_top_ngrams(doc, p.top_ngram_limits())
        or check_duplicate_ngrams(doc, p.duplicate_ngram_limits())
    )


# --------------------------------------------------------------------------------------------------
# Quality rules (App. A.1.1)
# --------------------------------------------------------------------------------------------------


def check_length(doc: Document, min_chars: int | None, max_chars: int | None) -> str | None:
    """Not a Gopher rule: length bounds in characters, a cheap first cut before any word is counted."""
    if min_chars and doc.chars < min_chars:
        return f"too_short: {doc.chars} chars < {min_chars}"
    if max_chars and doc.chars > max_chars:
        return f"too_long: {doc.chars} chars > {max_chars}"
    return None


def check_word_count(doc: Document, min_words: int | None, max_words: int | None) -> str | None:
    """Gopher: between 50 and 100,000 words."""
    count = doc.counts.words
    shown = f"{count:.0f}" + (" (CJK chars / cjk_chars_per_word + other words)" if doc.cjk else "")
    if min_words and count < min_words:
        return f"too_few_words: {shown} < {min_words}"
    if max_words and count > max_words:
        return f"too_many_words: {shown} > {max_words}"
    return None


def check_has_words(doc: Document) -> str | None:
    """Not a Gopher rule: the per-word ratios below need at least one word (none counts as alpha_ratio)."""
    return "alpha_ratio: no words" if doc.counts.tokens == 0 else None


def check_mean_word_length(doc: Document, low: float | None, high: float | None) -> str | None:
    """Gopher: mean word length between 3 and 10 characters (not for CJK, where a character is no word)."""
    mean = doc.counts.mean_length
    if mean is None:
        return None
    if low and mean < low:
        return f"mean_word_length: {mean:.2f} < {low}"
    if high and mean > high:
        return f"mean_word_length: {mean:.2f} > {high}"
    return None


def check_symbol_ratio(doc: Document, max_ratio: float | None) -> str | None:
    """Gopher: at most 0.1 hash symbols per word, and at most 0.1 ellipses per word."""
    hash_ratio = doc.text.count("#") / doc.counts.tokens
    if _too_high(hash_ratio, max_ratio):
        return f"symbol_ratio: '#' per word {hash_ratio:.3f} > {max_ratio}"
    ellipsis_ratio = (doc.text.count("...") + doc.text.count("…")) / doc.counts.tokens
    if _too_high(ellipsis_ratio, max_ratio):
        return f"symbol_ratio: ellipses per word {ellipsis_ratio:.3f} > {max_ratio}"
    return None


def check_bullet_lines(doc: Document, max_fraction: float | None) -> str | None:
    """Gopher: at most 90% of lines start with a bullet point ('•' or '-')."""
    if not max_fraction:
        return None
    share = sum(1 for line in doc.lines if line.lstrip().startswith(("•", "-"))) / len(doc.lines)
    return f"bullet_lines: {share:.3f} of lines > {max_fraction}" if share > max_fraction else None


def check_ellipsis_lines(doc: Document, max_fraction: float | None) -> str | None:
    """Gopher: at most 30% of lines end with an ellipsis ('...' or '…')."""
    if not max_fraction:
        return None
    share = sum(1 for line in doc.lines if line.endswith(("...", "…"))) / len(doc.lines)
    return f"ellipsis_lines: {share:.3f} of lines > {max_fraction}" if share > max_fraction else None


def check_alpha_words(doc: Document, min_fraction: float | None) -> str | None:
    """Gopher: at least 80% of words contain an alphabetic character."""
    alpha = doc.counts.alpha_tokens / doc.counts.tokens
    if min_fraction and alpha < min_fraction:
        return f"alpha_ratio: {alpha:.3f} of words have a letter < {min_fraction}"
    return None


# --------------------------------------------------------------------------------------------------
# Repetition rules (Table A1)
# --------------------------------------------------------------------------------------------------


def check_duplicate_paragraphs(
    doc: Document, max_fraction: float | None, max_char_fraction: float | None
) -> str | None:
    """Gopher: at most 30% duplicate paragraphs, holding at most 20% of the characters."""
    return _duplicate_share(doc, "paragraphs", doc.text.split("\n\n"), max_fraction, max_char_fraction)


def check_duplicate_lines(
    doc: Document, max_fraction: float | None, max_char_fraction: float | None
) -> str | None:
    """Gopher: at most 30% duplicate lines, holding at most 20% of the characters."""
    return _duplicate_share(doc, "lines", doc.lines, max_fraction, max_char_fraction)


def check_top_ngrams(doc: Document, limits: list[tuple[int, float]]) -> str | None:
    """Gopher: the most frequent 2/3/4-gram covers at most 20/18/16% of the characters."""
    sep = 0 if doc.cjk else 1
    for n, limit in limits:
        size = doc.gram_size(n)
        fraction = _top_ngram_chars(doc.tokens, size, sep) / doc.chars
        if fraction > limit:
            return f"top_ngram: most frequent {size}-gram covers {fraction:.3f} of chars > {limit}"
    return None


def check_duplicate_ngrams(doc: Document, limits: list[tuple[int, float]]) -> str | None:
    """Gopher: repeated 5..10-grams cover at most 15..10% of the characters."""
    prefix = [0, *itertools.accumulate(map(len, doc.tokens))]
    for n, limit in limits:
        size = doc.gram_size(n)
        grams = _ngrams(doc.tokens, size)
        if len(set(grams)) == len(grams):
            break  # no repeated n-gram, hence no repeated longer n-gram either
        fraction = _duplicate_ngram_chars(grams, prefix, size) / doc.chars
        if fraction > limit:
            return f"duplicate_ngram: repeated {size}-grams cover {fraction:.3f} of chars > {limit}"
    return None


def _too_high(value: float, limit: float | None) -> bool:
    return limit is not None and limit > 0 and value > limit


def _duplicate_share(
    doc: Document, unit: str, elements: list[str], max_fraction: float | None, max_char_fraction: float | None
) -> str | None:
    """The duplicate paragraph/line rule: the share of repeated elements, then of their characters."""
    dup, dup_chars = _duplicates(elements)
    if _too_high(dup / len(elements), max_fraction):
        return f"duplicate_{unit}: {dup / len(elements):.3f} of {unit} > {max_fraction}"
    if _too_high(dup_chars / doc.chars, max_char_fraction):
        return f"duplicate_{unit}: {dup_chars / doc.chars:.3f} of chars > {max_char_fraction}"
    return None


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
