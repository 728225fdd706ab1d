"""A document's script, and what counts as a word in it: the Gopher rules count words, and CJK text
has no spaces between its words.

Latin/other text: words are whitespace-separated tokens (the Gopher paper's words). CJK text (Han/kana/
Hangul above `cjk_min_fraction` of the letters): every CJK character is one token, runs of other
letters/digits and runs of symbols are tokens, and a word count is the CJK characters divided by
`cjk_chars_per_word` plus the other words.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import regex

#: Every script `detect_script` can return.
SCRIPTS = ("latin", "cjk", "other")

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


class WordCounts(NamedTuple):
    """A document's words as the Gopher rules count them."""

    words: float  # the word count the min/max word bounds apply to
    tokens: int  # the denominator of the per-word ratios (symbols, words with a letter)
    alpha_tokens: int  # tokens that contain a letter
    mean_length: float | None  # mean word length without edge punctuation; None for CJK or no words


def count_words(text: str, script: str, cjk_chars_per_word: float) -> WordCounts:
    """The word counts of `text` in its script (see the module docstring)."""
    if script == "cjk":
        # Words: each CJK character, plus each run of other letters/digits. Alpha/symbol denominators:
        # CJK characters plus the non-CJK chunks between spaces and CJK characters, where chunks of
        # punctuation only (、。「」...) are ignored: in Latin text punctuation sticks to a word instead.
        n_cjk = _count_chars(_CJK_RUN_RE, text)
        chunks = [chunk for chunk in _NON_CJK_CHUNK_RE.findall(text) if not _PUNCT_ONLY_RE.fullmatch(chunk)]
        return WordCounts(
            words=n_cjk / cjk_chars_per_word + len(_NON_CJK_WORD_RE.findall(text)),
            tokens=n_cjk + len(chunks),
            alpha_tokens=n_cjk + sum(1 for chunk in chunks if _LETTER_RE.search(chunk)),
            mean_length=None,
        )
    cores = _WORD_CORE_RE.findall(text)
    return WordCounts(
        words=len(cores),
        tokens=len(text.split()),
        alpha_tokens=len(_ALPHA_TOKEN_RE.findall(text)),
        mean_length=sum(map(len, cores)) / len(cores) if cores else None,
    )
