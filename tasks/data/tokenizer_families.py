"""The tokenizer-family comparison of the `tokenizer` stage: byte-level BPE, WordPiece, Unigram and a
character baseline, each trained on the same documents and measured on the same holdout.

Kept apart from the stage (tasks/tokenizer.py), which trains and saves the one tokenizer the pipeline
uses: this module only reports. It never imports the stage; the stage hands it its settings
(`FamilySettings`), how to build its untrained byte-level BPE, and how to stream the training texts.
Metrics per family: chars/bytes per token, unk rate, exact round-trips, training time, encoding speed
(reports/tokenizer/comparison.{csv,png}, examples.md, plots/tokenizer_comparison.csv).
"""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from model.tokens import byte_decoder, for_ordinary_text
from tasks.core.io import atomic_file

#: Unknown-token spellings of the comparison families that have one.
WORDPIECE_UNK = "[UNK]"
UNIGRAM_UNK = "<unk>"
CHAR_UNK = "<unk>"
FAMILIES = ("bpe", "wordpiece", "unigram", "char")
COMPARISON_COLUMNS = (
    "family",
    "vocab_size",
    "chars_per_token",
    "bytes_per_token",
    "unk_rate",
    "roundtrip_exact",
    "train_seconds",
    "encode_mb_per_s",
)

#: Sentences segmented by every family in reports/tokenizer/examples.md.
EXAMPLE_SENTENCES = (
    "To be, or not to be, that is the question.",
    "The tokenizer's vocabulary has 8192 entries; unseen words still round-trip.",
    "吾輩は猫である。名前はまだ無い。",
    "パッケージ管理システムを使ってソフトウェアをインストールします。",
)


class FamilySettings(Protocol):
    """The settings the families are trained with (the tokenizer stage's params)."""

    vocab_size: int
    min_frequency: int
    special_tokens: list[str]


#: An untrained tokenizer and its trainer (the stage's byte-level BPE).
UntrainedTokenizer = tuple[Tokenizer, Any]


# --------------------------------------------------------------------------------------------------
# The families
# --------------------------------------------------------------------------------------------------


class CharTokenizer:
    """Character-level baseline: one id per distinct training character, unk for anything unseen."""

    def __init__(self, specials: list[str]) -> None:
        self.vocab: dict[str, int] = {}
        for token in [*specials, CHAR_UNK]:
            self.vocab.setdefault(token, len(self.vocab))
        self.unk_id = self.vocab[CHAR_UNK]
        self.inverse: list[str] = []

    def train(self, batches: Iterator[list[str]]) -> None:
        chars: set[str] = set()
        for texts in batches:
            for text in texts:
                chars.update(text)
        for ch in sorted(chars):
            self.vocab.setdefault(ch, len(self.vocab))
        self.inverse = [""] * len(self.vocab)
        for token, i in self.vocab.items():
            self.inverse[i] = token

    def encode(self, text: str) -> list[int]:
        get, unk = self.vocab.get, self.unk_id
        return [get(ch, unk) for ch in text]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.inverse[i] for i in ids)

    def tokens(self, text: str) -> list[str]:
        return [ch if ch in self.vocab else CHAR_UNK for ch in text]

    def get_vocab_size(self) -> int:
        return len(self.vocab)


def _family_tokenizer(
    family: str, settings: FamilySettings, bpe: Callable[[], UntrainedTokenizer]
) -> tuple[Tokenizer, Any, str | None]:
    specials = list(settings.special_tokens)
    if family == "bpe":
        tokenizer, trainer = bpe()
        return tokenizer, trainer, None
    if family == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token=WORDPIECE_UNK))
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(
            vocab_size=settings.vocab_size,
            min_frequency=settings.min_frequency,
            special_tokens=[*specials, WORDPIECE_UNK],
            show_progress=False,
        )
        return tok, trainer, WORDPIECE_UNK
    if family == "unigram":
        tok = Tokenizer(models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
        unigram = trainers.UnigramTrainer(
            vocab_size=settings.vocab_size,
            special_tokens=[*specials, UNIGRAM_UNK],
            unk_token=UNIGRAM_UNK,
            show_progress=False,
        )
        return tok, unigram, UNIGRAM_UNK
    raise ValueError(f"unknown tokenizer family {family!r}")


# --------------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------------


def measure(
    encode_batch: Callable[[list[str]], list[list[int]]],
    decode: Callable[[list[int]], str],
    unk_id: int | None,
    holdout: list[str],
) -> dict[str, float]:
    """chars/bytes per token, unk rate, exact round-trip fraction and encoding speed on `holdout`."""
    n_chars = sum(len(t) for t in holdout)
    n_bytes = sum(len(t.encode("utf-8", "surrogatepass")) for t in holdout)
    start = time.perf_counter()
    encoded = encode_batch(holdout)
    seconds = max(time.perf_counter() - start, 1e-9)
    n_tokens = sum(len(ids) for ids in encoded)
    n_unk = 0 if unk_id is None else sum(ids.count(unk_id) for ids in encoded)
    exact = sum(decode(ids) == text for ids, text in zip(encoded, holdout, strict=True))
    return {
        "chars_per_token": n_chars / n_tokens if n_tokens else math.nan,
        "bytes_per_token": n_bytes / n_tokens if n_tokens else math.nan,
        "unk_rate": n_unk / n_tokens if n_tokens else 0.0,
        "roundtrip_exact": exact / len(holdout) if holdout else math.nan,
        "encode_mb_per_s": n_bytes / 1e6 / seconds,
    }


def measure_tokenizer(tok: Tokenizer, unk: str | None, holdout: list[str]) -> dict[str, float]:
    """`measure` for a HF `tokenizers` tokenizer (`unk`: its unknown token's spelling, if it has one)."""
    # encode_batch_fast (tokenizers ≥ 0.21) skips offsets: the speed a training-data encoder sees
    fast = getattr(tok, "encode_batch_fast", tok.encode_batch)

    def encode_batch(texts: list[str]) -> list[list[int]]:
        return [e.ids for e in fast(texts, add_special_tokens=False)]

    def decode(ids: list[int]) -> str:
        return tok.decode(ids, skip_special_tokens=False)

    return measure(encode_batch, decode, None if unk is None else tok.token_to_id(unk), holdout)


def compare_families(
    settings: FamilySettings,
    bpe: Callable[[], UntrainedTokenizer],
    training_texts: Callable[[], Iterator[list[str]]],
    holdout: list[str],
) -> tuple[list[dict[str, Any]], dict[str, list[list[str]]]]:
    """Train every family on `training_texts()` (a fresh stream per family; `bpe()` builds the byte-level
    BPE and its trainer); rows of the comparison table + example tokens."""
    rows: list[dict[str, Any]] = []
    examples: dict[str, list[list[str]]] = {}
    for family in FAMILIES:
        start = time.perf_counter()
        if family == "char":
            char = CharTokenizer(list(settings.special_tokens))
            char.train(training_texts())
            seconds = time.perf_counter() - start
            metrics = measure(char.encode_batch, char.decode, char.unk_id, holdout)
            vocab = char.get_vocab_size()
            examples[family] = [char.tokens(s) for s in EXAMPLE_SENTENCES]
        else:
            tok, trainer, unk = _family_tokenizer(family, settings, bpe)
            tok.train_from_iterator(training_texts(), trainer=trainer)
            seconds = time.perf_counter() - start
            for_ordinary_text(tok)
            metrics = measure_tokenizer(tok, unk, holdout)
            vocab = tok.get_vocab_size(with_added_tokens=True)
            examples[family] = [_display_tokens(tok, s) for s in EXAMPLE_SENTENCES]
        rows.append({"family": family, "vocab_size": vocab, **metrics, "train_seconds": seconds})
    return rows, examples


def _token(tok: Tokenizer, token_id: int) -> str:
    token = tok.id_to_token(token_id)
    if token is None:
        raise ValueError(f"id {token_id} is not in the vocabulary")
    return token


def _display_tokens(tok: Tokenizer, text: str) -> list[str]:
    """Readable pieces of `text`: a byte-level token that is not whole UTF-8 shows as its hex bytes
    (`⟨e5 90⟩`), since a multi-byte character can be split across tokens."""
    ids = tok.encode(text, add_special_tokens=False).ids
    if not isinstance(tok.decoder, decoders.ByteLevel):
        return [_token(tok, i) for i in ids]
    table = byte_decoder()
    pieces = []
    for i in ids:
        raw = bytes(table[ch] for ch in _token(tok, i))
        try:
            pieces.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            pieces.append("⟨" + raw.hex(" ") + "⟩")
    return pieces


# --------------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------------


def write_comparison(
    report_dir: Path, plot_csv: Path, rows: list[dict[str, Any]], examples: dict[str, list[list[str]]]
) -> None:
    """comparison.csv, examples.md and comparison.png into `report_dir`; the `dvc plots` CSV to `plot_csv`."""
    with atomic_file(report_dir / "comparison.csv") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(COMPARISON_COLUMNS)
        for row in rows:
            writer.writerow([_fmt(row[c]) for c in COMPARISON_COLUMNS])
    with atomic_file(plot_csv) as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["family", "chars_per_token", "bytes_per_token"])
        for row in rows:
            writer.writerow([row["family"], _fmt(row["chars_per_token"]), _fmt(row["bytes_per_token"])])
    if examples:  # segmentations by each family: none when only one tokenizer was measured
        _write_examples(report_dir / "examples.md", examples)
    _write_figure(report_dir / "comparison.png", rows)


def _write_examples(path: Path, examples: dict[str, list[list[str]]]) -> None:
    lines = [
        "# Tokenizer segmentations",
        "",
        "Tokens separated by │; a byte-level token that is not whole UTF-8 shows as ⟨hex bytes⟩.",
        "",
    ]
    for i, sentence in enumerate(EXAMPLE_SENTENCES):
        lines += [f"## {sentence}", ""]
        for family in FAMILIES:
            pieces = examples[family][i]
            shown = "│".join(piece.replace("\n", "\\n") for piece in pieces)
            lines.append(f"- **{family}** ({len(pieces)} tokens): `{shown}`")
        lines.append("")
    with atomic_file(path) as handle:
        handle.write("\n".join(lines))


def _write_figure(path: Path, rows: list[dict[str, Any]]) -> None:
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    fig = Figure(figsize=(11, 3.8))
    axes = fig.subplots(1, 3)
    names = [row["family"] for row in rows]
    for ax, (key, title) in zip(
        axes,
        (
            ("chars_per_token", "characters / token (↑)"),
            ("unk_rate", "unk rate (↓)"),
            ("encode_mb_per_s", "encode MB/s (↑)"),
        ),
        strict=True,
    ):
        ax.bar(names, [row[key] for row in rows], color=["C0", "C1", "C2", "C3"][: len(rows)])
        ax.set_title(title)
    fig.suptitle("tokenizer families on the holdout")
    fig.tight_layout()
    with atomic_file(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=100)


def _fmt(value: Any) -> Any:
    return f"{value:.6g}" if isinstance(value, float) else value
