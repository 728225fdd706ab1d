"""Unicode and whitespace clean-up of one document's text (the first steps of stage `normalize`).

1. broken-encoding repair with ftfy (`fix_encoding`, a conservative config: no HTML unescaping, no quote
   uncurling, no width/ligature folding; those are left to step 2);
2. Unicode normalization (`unicode_form`, NFKC by default);
3. line breaks unified (\\r\\n, \\r, VT, FF, NEL, U+2028/9 → \\n); control characters (Cc except \\n, \\t)
   and invisible format characters (zero-width space/joiners, word joiner, BOM, soft hyphen, bidi
   controls) removed;
4. whitespace collapsed: runs of spaces/tabs (any horizontal whitespace) → one space, trailing spaces
   per line stripped, 3+ newlines → one blank line, document stripped.

Cleaning changes the text; judging it is `tasks.data.gopher`, which sees only cleaned text.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Literal

import ftfy

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


def repair_encoding(text: str) -> str:
    """Step 1 alone (mojibake such as UTF-8 read as cp1252 repaired), so a caller can tell what it did."""
    return ftfy.fix_text(text, _FTFY_CONFIG)


#: Unicode normalization forms (NFKC also folds compatibility characters: ligatures, full-width forms).
UnicodeForm = Literal["NFKC", "NFC", "NFKD", "NFD", "none"]


def normalize_text(text: str, unicode_form: UnicodeForm = "NFKC", fix_encoding: bool = True) -> str:
    """The cleaned text (steps 1-4 of the module docstring); may be empty."""
    if fix_encoding:
        text = repair_encoding(text)
    if unicode_form != "none" and not unicodedata.is_normalized(unicode_form, text):
        text = unicodedata.normalize(unicode_form, text)
    text = _LINE_BREAK_RE.sub("\n", text)
    text = _INVISIBLE_RE.sub("", text)
    text = _HSPACE_RE.sub(" ", text)
    text = _TRAILING_SPACE_RE.sub("\n", text)
    text = _BLANK_LINES_RE.sub("\n\n", text)
    return text.strip()
